//! `-drive` desugaring (and `-hda`/`-cdrom`/`-fda` sugar), following the
//! `-drive` section of the `qemu(1)` man page and QEMU's `drive_new`: one
//! `-drive` becomes block-node options (for [`BlockGraph::open_options`]),
//! a [`BackendConfig`] and, unless `if=none`, a pending device description
//! that the machine turns into `-device ide-hd,drive=...` and friends.
//!
//! Mapping: `format` -> `driver` (probed when absent), `file` -> the
//! protocol child (`file.filename`), `aio` -> `file.aio`, `cache=` -> the
//! DESIGN.md table (`cache.direct`, `cache.no-flush`, write cache),
//! `readonly`/`read-only`, `discard`, `detect-zeroes`, `node-name` and any
//! dotted driver key go to the node; `rerror`/`werror` to the backend;
//! `if`, `bus`, `unit`, `index`, `media`, `serial`, `addr` to the device.
//! `media=cdrom` implies read-only; `copy-on-read=on` puts a `copy-on-read`
//! filter on top. `snapshot=on` (and `-snapshot`) opens the image
//! read-only under a temporary qcow2 overlay ([`crate::snapshot_overlay`]).
//! A missing `id` is generated as QEMU does
//! (`ide0-hd0`, `ide1-cd0`, `virtio0`, `floppy0`, `none0`).

use crate::backend::{BackendConfig, BlockBackend, ErrorAction};
use crate::error::{BlockError, BlockResult};
use crate::graph::BlockGraph;
use crate::keyval::{KeyvalError, Map, Options, Parser, Value};
use std::sync::Arc;

/// `if=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interface {
    /// No device: the drive is for `-device ...,drive=id`.
    None,
    /// IDE.
    Ide,
    /// SCSI.
    Scsi,
    /// Floppy.
    Floppy,
    /// virtio-blk.
    Virtio,
    /// SD card.
    Sd,
    /// Parallel flash.
    Pflash,
    /// MTD.
    Mtd,
}

impl Interface {
    /// Every interface.
    pub const ALL: [Interface; 8] = [
        Interface::None,
        Interface::Ide,
        Interface::Scsi,
        Interface::Floppy,
        Interface::Virtio,
        Interface::Sd,
        Interface::Pflash,
        Interface::Mtd,
    ];

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "none" => Interface::None,
            "ide" => Interface::Ide,
            "scsi" => Interface::Scsi,
            "floppy" => Interface::Floppy,
            "virtio" => Interface::Virtio,
            "sd" => Interface::Sd,
            "pflash" => Interface::Pflash,
            "mtd" => Interface::Mtd,
            _ => return None,
        })
    }
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            Interface::None => "none",
            Interface::Ide => "ide",
            Interface::Scsi => "scsi",
            Interface::Floppy => "floppy",
            Interface::Virtio => "virtio",
            Interface::Sd => "sd",
            Interface::Pflash => "pflash",
            Interface::Mtd => "mtd",
        }
    }
    /// Units per bus (QEMU's `if_max_devs`): 2 for IDE, 7 for SCSI, else 0
    /// (one unit per bus index).
    pub fn max_devs(self) -> u32 {
        match self {
            Interface::Ide => 2,
            Interface::Scsi => 7,
            _ => 0,
        }
    }
}

/// `media=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Media {
    /// A disk.
    Disk,
    /// A CD-ROM.
    Cdrom,
}

/// The device half of a `-drive`, for the machine to instantiate: the
/// board decides which device type and bus it becomes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingDevice {
    /// Interface.
    pub interface: Interface,
    /// Bus number.
    pub bus: u32,
    /// Unit on the bus.
    pub unit: u32,
    /// Media.
    pub media: Media,
    /// `serial=`.
    pub serial: Option<String>,
    /// `addr=` (PCI address for virtio).
    pub addr: Option<String>,
    /// `cyls=`, `heads=` and `secs=` (given together or not at all).
    pub chs: Option<[u32; 3]>,
    /// `trans=` (the device's `bios-chs-trans`).
    pub trans: Option<String>,
}

/// A desugared `-drive`.
#[derive(Clone, Debug, PartialEq)]
pub struct DriveSpec {
    /// The option text this came from (for messages about its device).
    pub text: String,
    /// The drive id (the BlockBackend name).
    pub id: String,
    /// Node options, `None` for an empty drive (e.g. a CD-ROM with no medium).
    pub node: Option<Map>,
    /// The format was not given: probe it.
    pub probe: bool,
    /// Backend configuration.
    pub backend: BackendConfig,
    /// The device, unless `if=none`.
    pub device: Option<PendingDevice>,
    /// `media=`, also kept for `if=none`: a device that makes its unit
    /// from the drive (`usb-storage`) makes a CD-ROM of a cdrom drive.
    pub media: Media,
    /// `copy-on-read=on`: a `copy-on-read` filter goes on top of the node.
    pub copy_on_read: bool,
    /// `snapshot=on|off` (`None`: not given; `-snapshot` turns it on):
    /// the guest writes into a temporary qcow2 overlay, the image itself
    /// is opened read-only.
    pub snapshot: Option<bool>,
}

/// Tracks drives already defined, to pick free units and ids.
#[derive(Debug)]
pub struct DriveTable {
    used: Vec<(Interface, u32, u32)>,
    ids: Vec<String>,
    /// Units per bus of each interface (QEMU's `if_max_devs`), as the
    /// machine has them.
    max_devs: Vec<(Interface, u32)>,
}

impl Default for DriveTable {
    fn default() -> Self {
        Self::with_max_devs(Interface::max_devs)
    }
}

fn bad(key: &str, expected: &str, value: &str) -> BlockError {
    KeyvalError::InvalidValue {
        option: "-drive".into(),
        key: key.into(),
        expected: expected.into(),
        value: value.into(),
    }
    .into()
}

impl DriveTable {
    /// An empty table with QEMU's default units per bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty table for a machine with its own units per bus.
    pub fn with_max_devs(max_devs: impl Fn(Interface) -> u32) -> Self {
        DriveTable {
            used: Vec::new(),
            ids: Vec::new(),
            max_devs: Interface::ALL.iter().map(|&i| (i, max_devs(i))).collect(),
        }
    }

    /// Desugar `-drive <text>`.
    pub fn parse_drive(&mut self, text: &str) -> BlockResult<DriveSpec> {
        // QemuOpts keeps keys flat: `file=x` and `file.locking=off` may both
        // appear, so the scalar `file` is taken out before nesting the rest.
        let p = Parser::new("-drive").bare_flags(true);
        let mut pairs = p.parse_flat(text)?;
        let mut filename = None;
        pairs.retain(|(k, v)| {
            if k == "file" {
                filename = Some(v.clone());
                false
            } else {
                true
            }
        });
        let mut map = p.build(pairs)?;
        if let Some(f) = filename {
            match map.get_mut("file") {
                Some(Value::Map(m)) => {
                    m.insert("filename".into(), Value::Str(f));
                }
                _ => {
                    map.insert("file".into(), Value::Str(f));
                }
            }
        }
        let mut spec = self.desugar(map)?;
        spec.text = text.to_string();
        Ok(spec)
    }

    /// `-hda`..`-hdd` (`n` = 0..3): `-drive file=f,index=n,media=disk`.
    pub fn hd(&mut self, n: u32, file: &str) -> BlockResult<DriveSpec> {
        self.parse_drive(&format!(
            "file={},index={n},media=disk",
            file.replace(',', ",,")
        ))
    }
    /// `-cdrom f`: `-drive file=f,index=2,media=cdrom`.
    pub fn cdrom(&mut self, file: &str) -> BlockResult<DriveSpec> {
        self.parse_drive(&format!(
            "file={},index=2,media=cdrom",
            file.replace(',', ",,")
        ))
    }
    /// `-fda`/`-fdb` (`n` = 0, 1): `-drive file=f,index=n,if=floppy`.
    pub fn fd(&mut self, n: u32, file: &str) -> BlockResult<DriveSpec> {
        self.parse_drive(&format!(
            "file={},index={n},if=floppy",
            file.replace(',', ",,")
        ))
    }

    /// Desugar a parsed `-drive`.
    pub fn desugar(&mut self, map: Map) -> BlockResult<DriveSpec> {
        let mut o = Options::new("-drive", map);
        let interface = match o.take_str("if")? {
            None => Interface::Ide,
            Some(s) => Interface::parse(&s).ok_or_else(|| {
                bad(
                    "if",
                    "one of none, ide, scsi, floppy, virtio, sd, pflash, mtd",
                    &s,
                )
            })?,
        };
        let media = match o.take_str("media")?.as_deref() {
            None | Some("disk") => Media::Disk,
            Some("cdrom") => Media::Cdrom,
            Some(s) => return Err(bad("media", "'disk' or 'cdrom'", s)),
        };
        let mut bus = o.take_u64("bus")?.map(|v| v as u32);
        let mut unit = o.take_u64("unit")?.map(|v| v as u32);
        let index = o.take_u64("index")?.map(|v| v as u32);
        let max = self
            .max_devs
            .iter()
            .find(|(i, _)| *i == interface)
            .map_or(0, |(_, n)| *n);
        if let Some(i) = index {
            if bus.is_some() || unit.is_some() {
                return Err(BlockError::Open(
                    "-drive: index cannot be used with bus and unit".into(),
                ));
            }
            match i.checked_div(max) {
                Some(b) => {
                    bus = Some(b);
                    unit = Some(i % max);
                }
                None => {
                    bus = Some(0);
                    unit = Some(i);
                }
            }
        }
        let mut bus = bus.unwrap_or(0);
        let unit = match unit {
            Some(u) => u,
            None => {
                // The first free unit from `bus` on, moving to the next
                // bus past the last unit (QEMU's drive_new).
                let mut u = 0;
                while self.used.contains(&(interface, bus, u)) {
                    u += 1;
                    if max > 0 && u >= max {
                        u -= max;
                        bus += 1;
                    }
                }
                u
            }
        };
        if max > 0 && unit >= max {
            return Err(BlockError::Open(format!(
                "-drive: unit {unit} too big (max is {})",
                max - 1
            )));
        }
        let serial = o.take_str("serial")?;
        let addr = o.take_str("addr")?;
        let chs = match (
            o.take_u64("cyls")?,
            o.take_u64("heads")?,
            o.take_u64("secs")?,
        ) {
            (None, None, None) => None,
            (Some(c), Some(h), Some(s)) => {
                let n = |v: u64, key: &str| {
                    u32::try_from(v).map_err(|_| bad(key, "a 32-bit number", &v.to_string()))
                };
                Some([n(c, "cyls")?, n(h, "heads")?, n(s, "secs")?])
            }
            _ => {
                return Err(BlockError::Open(
                    "-drive: cyls, heads and secs must be given together".into(),
                ))
            }
        };
        let trans = o.take_str("trans")?;
        let id = match o.take_str("id")? {
            Some(id) if !crate::graph::valid_id(&id) => {
                return Err(BlockError::Open(format!(
                    "-drive: Parameter 'id' expects an identifier (letters, digits, '-', '.', '_', starting with a letter), got '{id}'"
                )))
            }
            Some(id) => id,
            None => {
                let mediastr = match (interface, media) {
                    (Interface::Ide | Interface::Scsi, Media::Cdrom) => "-cd",
                    (Interface::Ide | Interface::Scsi, Media::Disk) => "-hd",
                    _ => "",
                };
                if max > 0 {
                    format!("{}{bus}{mediastr}{unit}", interface.name())
                } else {
                    format!("{}{mediastr}{unit}", interface.name())
                }
            }
        };
        if self.ids.contains(&id) {
            return Err(BlockError::Open(format!(
                "-drive: Duplicate ID '{id}' for drive"
            )));
        }
        if interface != Interface::None && self.used.contains(&(interface, bus, unit)) {
            return Err(BlockError::Open(format!(
                "-drive: drive with bus={bus}, unit={unit} (index={}) exists",
                index.unwrap_or(if max > 0 { bus * max + unit } else { unit })
            )));
        }

        // Backend side.
        let mut backend = BackendConfig::default();
        let ro_a = o.take_bool("readonly")?;
        let ro_b = o.take_bool("read-only")?;
        let mut read_only = ro_a.or(ro_b).unwrap_or(false);
        if media == Media::Cdrom {
            read_only = true;
        }
        backend.read_only = read_only;
        if let Some(s) = o.take_str("werror")? {
            backend.werror = ErrorAction::parse(&s)
                .ok_or_else(|| bad("werror", "one of report, ignore, stop, enospc", &s))?;
        }
        if let Some(s) = o.take_str("rerror")? {
            backend.rerror = match ErrorAction::parse(&s) {
                Some(ErrorAction::Enospc) | None => {
                    return Err(bad("rerror", "one of report, ignore, stop", &s))
                }
                Some(a) => a,
            };
        }

        // Node side.
        let mut node = Map::new();
        let s = |v: &str| Value::Str(v.to_string());
        let format = o.take_str("format")?;
        if let Some(f) = &format {
            node.insert("driver".into(), s(f));
        }
        if let Some(n) = o.take_str("node-name")? {
            node.insert("node-name".into(), s(&n));
        }
        let mut cache = Map::new();
        if let Some(c) = o.take_str("cache")? {
            let (direct, no_flush, wce) = match c.as_str() {
                "writeback" => (false, false, true),
                "none" | "off" => (true, false, true),
                "writethrough" => (false, false, false),
                "directsync" => (true, false, false),
                "unsafe" => (false, true, true),
                _ => {
                    return Err(bad(
                        "cache",
                        "one of writeback, none, writethrough, directsync, unsafe",
                        &c,
                    ))
                }
            };
            cache.insert("direct".into(), s(if direct { "on" } else { "off" }));
            cache.insert("no-flush".into(), s(if no_flush { "on" } else { "off" }));
            backend.write_cache = wce;
        }
        if let Some(mut co) = o.take_object("cache")? {
            if let Some(d) = co.take_bool("direct")? {
                cache.insert("direct".into(), s(if d { "on" } else { "off" }));
            }
            if let Some(n) = co.take_bool("no-flush")? {
                cache.insert("no-flush".into(), s(if n { "on" } else { "off" }));
            }
            if let Some(w) = co.take_bool("writeback")? {
                backend.write_cache = w;
            }
            co.finish()?;
        }
        if !cache.is_empty() {
            node.insert("cache".into(), Value::Map(cache));
        }
        if read_only {
            node.insert("read-only".into(), s("on"));
        }
        for k in ["discard", "detect-zeroes", "auto-read-only", "force-share"] {
            if let Some(v) = o.take_str(k)? {
                node.insert(k.into(), s(&v));
            }
        }
        let snapshot = o.take_bool("snapshot")?;
        let copy_on_read = o.take_bool("copy-on-read")?.unwrap_or(false);
        if copy_on_read && read_only {
            return Err(BlockError::Open(
                "-drive: Can't use copy-on-read on read-only device".into(),
            ));
        }
        parse_throttling(&mut o, &mut backend)?;
        let _ = o.take_str("boot")?;
        // Accounting knobs of QEMU's BlockBackend statistics: accepted;
        // Strata always counts failed requests separately.
        let _ = o.take_bool("stats-account-invalid")?;
        let _ = o.take_bool("stats-account-failed")?;
        let _ = o.take_value("stats-intervals");
        let aio = o.take_str("aio")?;
        let file = o.take_value("file");
        // Remaining keys are driver-specific (dotted) options.
        let rest = std::mem::take(&mut o);
        let rest_map = rest.into_map();
        let has_file = file.is_some();
        match file {
            None => {}
            Some(Value::Str(f)) if f.is_empty() => {}
            Some(Value::Str(f)) if f.starts_with("json:") => {
                // QEMU's `json:{...}` pseudo-protocol describes the node tree.
                let tree = crate::keyval::parse_json_filename("-drive", &f["json:".len()..])?;
                for (k, v) in tree {
                    node.entry(k).or_insert(v);
                }
            }
            Some(Value::Str(f)) if crate::filename::parse(&f)?.is_some() => {
                // `null-co://`, `blkdebug:CONFIG:IMAGE`: the protocol node
                // the name stands for, with any `file.*` keys on top.
                let mut fm = crate::filename::parse(&f)?.unwrap_or_default();
                if let Some(Value::Map(m)) = rest_map.get("file") {
                    // Deep: `blkdebug::null-co://` with
                    // `file.image.read-zeroes=on` keeps the image's driver.
                    merge_options(&mut fm, m.clone());
                }
                node.insert("file".into(), Value::Map(fm));
            }
            Some(Value::Str(f)) => {
                let mut fm = match rest_map.get("file") {
                    Some(Value::Map(m)) => m.clone(),
                    _ => Map::new(),
                };
                fm.entry("driver".to_string()).or_insert_with(|| {
                    let proto = match std::fs::metadata(&f) {
                        Ok(m)
                            if std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()) =>
                        {
                            "host_device"
                        }
                        _ => "file",
                    };
                    s(proto)
                });
                fm.insert("filename".into(), s(&f));
                if let Some(a) = &aio {
                    fm.insert("aio".into(), s(a));
                }
                node.insert("file".into(), Value::Map(fm));
            }
            Some(Value::Map(m)) => {
                let mut fm = m;
                // `file=null-co://,file.size=...`: the prefix names the
                // driver; the dotted keys stay its options.
                let prefixed = match (fm.get("driver"), fm.get("filename")) {
                    (None, Some(Value::Str(f))) => crate::filename::parse(f)?,
                    _ => None,
                };
                if let Some(mut p) = prefixed {
                    fm.remove("filename");
                    // What was given explicitly wins over the prefix.
                    merge_options(&mut p, std::mem::take(&mut fm));
                    fm = p;
                }
                if !fm.contains_key("driver") {
                    if let Some(Value::Str(f)) = fm.get("filename") {
                        let proto = match std::fs::metadata(f) {
                            Ok(m)
                                if std::os::unix::fs::FileTypeExt::is_block_device(
                                    &m.file_type(),
                                ) =>
                            {
                                "host_device"
                            }
                            _ => "file",
                        };
                        fm.insert("driver".into(), s(proto));
                    }
                }
                if let Some(a) = &aio {
                    fm.insert("aio".into(), s(a));
                }
                node.insert("file".into(), Value::Map(fm));
            }
            Some(_) => return Err(bad("file", "a file name", "a list")),
        }
        for (k, v) in rest_map {
            if k == "file" {
                if !has_file {
                    node.insert(k, v);
                }
                continue;
            }
            node.insert(k, v);
        }
        let empty = !node.contains_key("file") && !node.contains_key("driver");

        let device = if interface == Interface::None {
            None
        } else {
            Some(PendingDevice {
                interface,
                bus,
                unit,
                media,
                serial,
                addr,
                chs,
                trans,
            })
        };
        if interface != Interface::None {
            self.used.push((interface, bus, unit));
        }
        self.ids.push(id.clone());
        Ok(DriveSpec {
            text: String::new(),
            media,
            id,
            node: if empty { None } else { Some(node) },
            probe: format.is_none(),
            backend,
            device,
            copy_on_read,
            snapshot,
        })
    }
}

/// `throttling.*` (and QEMU's legacy spellings `iops`, `bps_rd`, ...).
fn parse_throttling(o: &mut Options, backend: &mut BackendConfig) -> BlockResult<()> {
    use crate::throttle::Limit;
    let mut t = o.take_object("throttling")?.unwrap_or_default();
    let mut get = |new: &str, legacy: &str, o: &mut Options| -> BlockResult<u64> {
        let a = t.take_u64(new)?;
        let b = o.take_u64(legacy)?;
        Ok(a.or(b).unwrap_or(0))
    };
    let names = ["total", "read", "write"];
    let legacy = ["", "_rd", "_wr"];
    let mut cfg = crate::throttle::ThrottleConfig::default();
    for (kind, arr) in [("bps", 0), ("iops", 1)] {
        for i in 0..3 {
            let avg = get(
                &format!("{kind}-{}", names[i]),
                &format!("{kind}{}", legacy[i]),
                o,
            )?;
            let max = get(
                &format!("{kind}-{}-max", names[i]),
                &format!("{kind}{}_max", legacy[i]),
                o,
            )?;
            let len = get(
                &format!("{kind}-{}-max-length", names[i]),
                &format!("{kind}{}_max_length", legacy[i]),
                o,
            )?;
            if max > 0 && avg == 0 {
                return Err(BlockError::Open(format!(
                    "-drive: {kind}-{}-max requires {kind}-{}",
                    names[i], names[i]
                )));
            }
            if max > 0 && max < avg {
                return Err(BlockError::Open(format!(
                    "-drive: {kind}-{}-max must be at least {kind}-{}",
                    names[i], names[i]
                )));
            }
            let l = Limit {
                avg,
                max,
                max_length: if len == 0 { 1 } else { len },
            };
            if arr == 0 {
                cfg.bps[i] = l;
            } else {
                cfg.iops[i] = l;
            }
        }
    }
    for (kind, lims) in [("bps", cfg.bps), ("iops", cfg.iops)] {
        if lims[0].avg > 0 && (lims[1].avg > 0 || lims[2].avg > 0) {
            return Err(BlockError::Open(format!(
                "-drive: {kind}-total and {kind}-read/{kind}-write cannot be used at the same time"
            )));
        }
    }
    cfg.iops_size = get("iops-size", "iops_size", o)?;
    let group = t.take_str("group")?;
    let legacy_group = o.take_str("group")?;
    t.finish()?;
    backend.throttle = cfg;
    backend.throttle_group = group.or(legacy_group);
    Ok(())
}

impl DriveSpec {
    /// Open the node graph and attach the backend; a drive without a
    /// medium (`-drive if=ide,media=cdrom`) gets an empty backend.
    pub fn open(&self, graph: &BlockGraph) -> BlockResult<Arc<BlockBackend>> {
        let Some(map) = &self.node else {
            return Ok(BlockBackend::new_empty(&self.id, self.backend.clone()));
        };
        let snapshot = self.snapshot == Some(true) && !self.backend.read_only;
        let mut node = if snapshot {
            let mut base = map.clone();
            base.insert("read-only".into(), Value::Str("on".into()));
            let base = graph.open_options(Options::new("-drive", base), None, self.probe)?;
            let cache = map.get("cache").cloned();
            crate::snapshot_overlay::open_temp_overlay(graph, &base, cache)?
        } else {
            graph.open_options(Options::new("-drive", map.clone()), None, self.probe)?
        };
        if self.copy_on_read {
            let mut cor = Map::new();
            cor.insert("driver".into(), Value::Str("copy-on-read".into()));
            cor.insert("file".into(), Value::Str(node.name().to_string()));
            node = graph.open_options(Options::new("-drive", cor), None, false)?;
        }
        BlockBackend::new(&self.id, node, self.backend.clone())
    }
}

/// Parse a `-drive` string without a table (for tests and one-offs).
pub fn parse_drive(text: &str) -> BlockResult<DriveSpec> {
    DriveTable::new().parse_drive(text)
}

/// Merges option tree `src` into `dst`: nested maps merge key by key,
/// anything else in `src` replaces what `dst` has.
fn merge_options(dst: &mut Map, src: Map) {
    for (k, v) in src {
        match (dst.get_mut(&k), v) {
            (Some(Value::Map(d)), Value::Map(v)) => merge_options(d, v),
            (_, v) => {
                dst.insert(k, v);
            }
        }
    }
}
