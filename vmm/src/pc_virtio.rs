//! `-device virtio-blk-pci` (and `-drive if=virtio`) on the `pc` machine:
//! property parsing with QEMU's names and defaults, the PCI slot, the
//! INTx line through the PIIX3 PIRQ router, the iothread the queues run
//! on, and the bootindex path SeaBIOS matches (`/pci@i0cf8/*@SLOT`).

use std::sync::{Arc, Mutex};

use block::keyval::parse_bool_str;
use devices::virtio::block::{BlockOptions, VirtioBlock};
pub use devices::virtio::event_loop::IoThreads;
use devices::virtio::pci::{TransportOptions, VirtioPci};

use crate::config::DeviceConfig;
use crate::pc::{AttachCtx, MachineError};
use crate::storage::Storage;

fn cfg_err(dev: &DeviceConfig, msg: impl std::fmt::Display) -> MachineError {
    MachineError::Config(format!("{}: {msg}", dev.describe()))
}

fn bool_prop(dev: &DeviceConfig, key: &str, default: bool) -> Result<bool, MachineError> {
    match dev.prop(key) {
        None => Ok(default),
        Some(v) => {
            parse_bool_str(v).ok_or_else(|| cfg_err(dev, format!("{key}={v}: expected on or off")))
        }
    }
}

fn num_prop(dev: &DeviceConfig, key: &str) -> Result<Option<u64>, MachineError> {
    let Some(v) = dev.prop(key) else {
        return Ok(None);
    };
    let r = match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => v.parse(),
    };
    r.map(Some)
        .map_err(|_| cfg_err(dev, format!("{key}={v}: not a number")))
}

/// `addr=SLOT[.FN]` in hex, as QEMU spells PCI addresses.
fn parse_addr(dev: &DeviceConfig, s: &str) -> Result<(u8, u8), MachineError> {
    let (slot, func) = s.split_once('.').unwrap_or((s, "0"));
    let p = |x: &str| u8::from_str_radix(x.trim_start_matches("0x"), 16).ok();
    match (p(slot), p(func)) {
        (Some(d), Some(f)) if d < 32 && f < 8 => Ok((d, f)),
        _ => Err(cfg_err(
            dev,
            format!("addr={s}: expected SLOT[.FUNCTION] in hex"),
        )),
    }
}

const KNOWN: &[&str] = &[
    "drive",
    "id",
    "bus",
    "addr",
    "num-queues",
    "queue-size",
    "iothread",
    "config-wce",
    "write-cache",
    "discard",
    "write-zeroes",
    "logical_block_size",
    "physical_block_size",
    "bootindex",
    "serial",
    "disable-legacy",
    "disable-modern",
    "vectors",
    "event_idx",
    "indirect_desc",
    "ioeventfd",
    "request-merging",
];

pub fn attach_virtio_blk(
    ctx: &mut AttachCtx,
    dev: &DeviceConfig,
    storage: &Storage,
) -> Result<(), MachineError> {
    if let Some((k, _)) = dev.props.iter().find(|(k, _)| !KNOWN.contains(&k.as_str())) {
        return Err(cfg_err(dev, format!("property '{k}' not found")));
    }
    let backend = ctx
        .claim_drive(dev, storage)?
        .ok_or_else(|| cfg_err(dev, "drive property not set (or the drive has no medium)"))?;
    let mut o = BlockOptions {
        num_queues: ctx.cpus.clamp(1, 1024) as u16,
        ..Default::default()
    };
    if let Some(n) = num_prop(dev, "num-queues")? {
        o.num_queues = u16::try_from(n).map_err(|_| cfg_err(dev, "num-queues too large"))?;
    }
    if let Some(n) = num_prop(dev, "queue-size")? {
        o.queue_size = u16::try_from(n).map_err(|_| cfg_err(dev, "queue-size too large"))?;
    }
    for (key, field) in [
        ("logical_block_size", &mut o.logical_block_size),
        ("physical_block_size", &mut o.physical_block_size),
    ] {
        if let Some(n) = num_prop(dev, key)? {
            *field = u32::try_from(n).map_err(|_| cfg_err(dev, format!("{key} too large")))?;
        }
    }
    if num_prop(dev, "physical_block_size")?.is_none() {
        o.physical_block_size = o.physical_block_size.max(o.logical_block_size);
    }
    o.config_wce = bool_prop(dev, "config-wce", true)?;
    o.discard = bool_prop(dev, "discard", true)?;
    o.write_zeroes = bool_prop(dev, "write-zeroes", true)?;
    o.event_idx = bool_prop(dev, "event_idx", true)?;
    o.indirect_desc = bool_prop(dev, "indirect_desc", true)?;
    o.request_merging = bool_prop(dev, "request-merging", true)?;
    o.serial = dev.prop("serial").map(str::to_string);
    match dev.prop("write-cache") {
        None | Some("auto") => {}
        Some(v) => backend.set_write_cache(
            parse_bool_str(v)
                .ok_or_else(|| cfg_err(dev, format!("write-cache={v}: on, off or auto")))?,
        ),
    }
    o.validate().map_err(|e| cfg_err(dev, e))?;

    // QEMU's `pc` (conventional PCI) makes virtio-pci devices transitional
    // unless told otherwise.
    let legacy = match dev.prop("disable-legacy") {
        None | Some("auto") => true,
        Some(v) => !parse_bool_str(v)
            .ok_or_else(|| cfg_err(dev, format!("disable-legacy={v}: on, off or auto")))?,
    };
    let modern = !bool_prop(dev, "disable-modern", false)?;
    let vectors = match num_prop(dev, "vectors")? {
        Some(v) => u16::try_from(v).ok().filter(|&v| v <= 2048),
        None => Some(o.num_queues + 1),
    }
    .ok_or_else(|| cfg_err(dev, "vectors must be 0..2048"))?;
    let topts = TransportOptions {
        modern,
        legacy,
        msix_vectors: vectors,
    };

    let (slot, func) = match dev.prop("addr") {
        Some(a) => parse_addr(dev, a)?,
        None => (
            (2..32u8)
                .find(|&s| ctx.pci.get(s << 3).is_none())
                .ok_or_else(|| cfg_err(dev, "no free PCI slot"))?,
            0,
        ),
    };
    let event_loop = ctx
        .iothreads
        .get(dev.prop("iothread"))
        .map_err(|e| cfg_err(dev, e))?;
    let blk = VirtioBlock::new(backend, o, event_loop).map_err(|e| cfg_err(dev, e))?;
    let intx = ctx.pirq.line(slot, 1);
    let f = VirtioPci::new(
        Box::new(blk),
        topts,
        ctx.ram.clone(),
        intx,
        ctx.msi.clone(),
        ctx.ioevents.clone(),
    )
    .map_err(|e| cfg_err(dev, e))?;
    ctx.pci
        .add(slot, func, Arc::new(Mutex::new(f)))
        .map_err(|e| cfg_err(dev, e))?;
    if let Some(n) = num_prop(dev, "bootindex")? {
        let n = u32::try_from(n).map_err(|_| cfg_err(dev, "bootindex too large"))?;
        let path = if func == 0 {
            format!("/pci@i0cf8/*@{slot:x}")
        } else {
            format!("/pci@i0cf8/*@{slot:x},{func:x}")
        };
        ctx.boot_order
            .register(n, path)
            .map_err(|e| cfg_err(dev, e))?;
    }
    Ok(())
}
