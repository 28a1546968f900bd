//! The machine's storage, opened once per process and kept across guest
//! resets: the block graph built from `-blockdev` and `-drive`, the
//! `BlockBackend`s devices attach to, and the device list, where each
//! `-drive if=ide|virtio|...` has become the `-device` QEMU would create
//! for it (`ide-hd,drive=ide0-hd0,bus=ide.0,unit=0`, ...).

use std::collections::BTreeMap;
use std::sync::Arc;

use block::backend::{BackendConfig, BlockBackend};
use block::drive::{Interface, PendingDevice};
use block::graph::BlockGraph;

use crate::config::{DeviceConfig, MachineConfig};
use crate::VmmError;

pub struct Storage {
    pub graph: BlockGraph,
    /// Backends by drive id; `None` for a drive with no medium.
    drives: BTreeMap<String, Option<Arc<BlockBackend>>>,
    pub devices: Vec<DeviceConfig>,
}

/// The `-device` QEMU creates for the device half of a `-drive`.
fn device_for(id: &str, d: &PendingDevice) -> Option<DeviceConfig> {
    let driver = d.device_driver?.to_string();
    let mut props = vec![("drive".to_string(), id.to_string())];
    match d.interface {
        Interface::Ide => {
            props.push(("bus".into(), format!("ide.{}", d.bus)));
            props.push(("unit".into(), d.unit.to_string()));
        }
        Interface::Scsi => {
            props.push(("bus".into(), format!("scsi{}.0", d.bus)));
            props.push(("scsi-id".into(), d.unit.to_string()));
        }
        Interface::Floppy => props.push(("unit".into(), d.unit.to_string())),
        _ => {}
    }
    if let Some(s) = &d.serial {
        props.push(("serial".into(), s.clone()));
    }
    if let Some(a) = &d.addr {
        props.push(("addr".into(), a.clone()));
    }
    props.extend(d.geometry.iter().cloned());
    Some(DeviceConfig { driver, props })
}

impl Storage {
    pub fn open(cfg: &MachineConfig) -> Result<Storage, VmmError> {
        let graph = BlockGraph::new();
        for text in &cfg.blockdevs {
            graph
                .blockdev_add_str(text)
                .map_err(|e| VmmError::Config(format!("-blockdev {text}: {e}")))?;
        }
        let mut drives = BTreeMap::new();
        let mut devices = Vec::new();
        for d in &cfg.drives {
            let backend = d
                .open(&graph)
                .map_err(|e| VmmError::Config(format!("-drive {}: {e}", d.id)))?;
            // Devices see a drive without medium as `None` for now.
            drives.insert(d.id.clone(), Some(backend).filter(|b| b.is_inserted()));
            if let Some(dev) = d.device.as_ref().and_then(|p| device_for(&d.id, p)) {
                devices.push(dev);
            }
        }
        for w in graph.take_warnings() {
            eprintln!("strata: warning: {w}");
        }
        devices.extend(cfg.devices.iter().cloned());
        Ok(Storage {
            graph,
            drives,
            devices,
        })
    }

    /// Routes every drive's `stop` error policy to the main loop.
    pub fn set_stop_handlers(&self, events: &crate::EventSender) {
        for b in self.drives.values().flatten() {
            let (ev, id) = (events.clone(), b.id().to_string());
            b.set_stop_handler(move |e| {
                ev.send(crate::VmEvent::BlockStop {
                    drive: id.clone(),
                    error: e.to_string(),
                })
            });
        }
    }

    /// Retries the requests a `stop` policy parked (the guest continues).
    pub fn resume(&self) {
        for b in self.drives.values().flatten() {
            if b.is_stopped() {
                b.resume();
            }
        }
    }

    /// One line per drive, for the monitor's `info block`.
    pub fn describe(&self) -> Vec<String> {
        self.drives
            .iter()
            .map(|(id, b)| match b.as_ref().and_then(|b| b.root()) {
                Some(node) => format!(
                    "{id}: {} ({}{})",
                    node.name(),
                    if b.as_ref().is_some_and(|b| b.is_read_only()) {
                        "read-only, "
                    } else {
                        ""
                    },
                    if b.as_ref().is_some_and(|b| b.is_stopped()) {
                        "stopped"
                    } else {
                        "ok"
                    }
                ),
                None => format!("{id}: [not inserted]"),
            })
            .collect()
    }

    /// The backend a device's `drive=` names: a `-drive` id, or a
    /// `-blockdev` node-name (which gets an anonymous backend, as in QEMU).
    /// `Ok(None)` means the device names no drive; a drive without medium
    /// is an empty backend (`is_inserted()` is false).
    pub fn backend(&self, dev: &DeviceConfig) -> Result<Option<Arc<BlockBackend>>, VmmError> {
        let Some(name) = dev.prop("drive") else {
            return Ok(None);
        };
        if let Some(b) = self.drives.get(name) {
            return Ok(b.clone());
        }
        match self.graph.get(name) {
            Some(node) => BlockBackend::new(name, node, BackendConfig::default())
                .map(Some)
                .map_err(|e| VmmError::Config(format!("{}: {e}", dev.describe()))),
            None => Err(VmmError::Config(format!(
                "{}: no drive or block node named '{name}'",
                dev.describe()
            ))),
        }
    }
}
