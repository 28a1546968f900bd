//! Running a parsed command against the machine, and the `query-*`
//! answers, shaped as QEMU's QAPI schema defines them (qapi/*.json:
//! `StatusInfo`, `VersionInfo`, `BlockInfo`, `BlockDeviceInfo`,
//! `BlockStats`, `PciInfo`, `MachineInfo`, `CpuInfoFast`), so that
//! clients written for QEMU read them unchanged.

use std::sync::Arc;

use block::node::Node;
use devices::media::Removable;
use serde_json::{json, Value};

use super::command::{self, Command, ErrorClass, QmpError};
use super::{Action, Control, Ctx, RunState};
use crate::device::{AttachCtx, BusKind, DeviceArg, DeviceSpec};

pub fn execute(c: &mut Control, cmd: Command, ctx: &Ctx) -> Result<(Value, Action), QmpError> {
    let ok = |v: Value| Ok((v, Action::None));
    match cmd {
        // Negotiation is the session's business; a repeat reaches here
        // only through human-monitor-command, which has none.
        Command::Capabilities { .. } => Err(QmpError::new(
            ErrorClass::CommandNotFound,
            "Capabilities negotiation is already complete, command ignored",
        )),
        Command::QueryVersion => {
            let (major, minor, micro) = crate::QEMU_VERSION;
            ok(json!({
                "qemu": {"major": major, "minor": minor, "micro": micro},
                "package": crate::package_version(),
            }))
        }
        Command::QueryCommands => ok(Value::Array(
            command::COMMANDS
                .iter()
                .map(|d| json!({"name": d.name}))
                .collect(),
        )),
        Command::QueryStatus => ok(json!({
            "status": c.state.qapi_name(),
            "running": c.state == RunState::Running,
            "singlestep": false,
        })),
        Command::QueryName => ok(match &ctx.cfg.name {
            Some(n) => json!({ "name": n }),
            None => json!({}),
        }),
        Command::QueryKvm => ok(json!({
            "enabled": ctx.cfg.accel == crate::config::Accel::Kvm,
            "present": std::path::Path::new("/dev/kvm").exists(),
        })),
        Command::QueryMachines => ok(query_machines()),
        Command::QueryCpusFast => ok(Value::Array(
            (0..ctx.machine.cpus)
                .map(|i| {
                    json!({
                        "cpu-index": i,
                        "qom-path": format!("/machine/unattached/device[{i}]"),
                        "thread-id": ctx.vcpu_threads.get(i as usize).copied()
                            .unwrap_or_else(|| std::process::id() as i32),
                        "props": {"core-id": 0, "thread-id": 0, "socket-id": i},
                        "target": "x86_64",
                    })
                })
                .collect(),
        )),
        Command::QueryPci => ok(query_pci(ctx)),
        Command::QueryBlock => ok(query_block(ctx)),
        Command::QueryBlockstats => ok(query_blockstats(ctx)),
        Command::QueryNamedBlockNodes => {
            let g = &ctx.storage.graph;
            ok(Value::Array(
                g.node_names()
                    .iter()
                    .filter_map(|n| g.get(n))
                    .map(|n| node_info(&n, None))
                    .collect(),
            ))
        }
        Command::QueryQmpSchema => ok(command::schema()),
        Command::QueryIothreads => ok(Value::Array(
            ctx.cfg
                .iothreads
                .iter()
                .map(|id| {
                    // What the thread polls for before it sleeps: its
                    // `poll-max-ns`, or the default QEMU also uses.
                    let poll = ctx
                        .cfg
                        .iothread_poll_max_ns
                        .iter()
                        .rev()
                        .find(|(i, _)| i == id)
                        .map_or(
                            devices::virtio::event_loop::DEFAULT_POLL_MAX_NS,
                            |(_, ns)| *ns,
                        );
                    json!({"id": id, "thread-id": 0, "poll-max-ns": poll, "poll-grow": 0,
                           "poll-shrink": 0, "aio-max-batch": 0})
                })
                .collect(),
        )),
        Command::QueryChardev => ok(Value::Array(
            ctx.cfg
                .serial
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    json!({"label": format!("serial{i}"),
                           "filename": crate::console::describe(d),
                           "frontend-open": true})
                })
                .chain(ctx.cfg.monitors.iter().enumerate().map(|(i, m)| {
                    json!({"label": format!("compat_monitor{i}"),
                           "filename": crate::console::describe(&m.chardev),
                           "frontend-open": true})
                }))
                .collect(),
        )),
        Command::QomListTypes { implements } => {
            let types = crate::device::TYPES.iter().filter(|t| match &implements {
                None => true,
                Some(i) => i == "device" || (i == "pci-device" && t.name.ends_with("-pci")),
            });
            ok(Value::Array(
                types
                    .map(|t| json!({"name": t.name, "parent": "device"}))
                    .collect(),
            ))
        }
        // Before an incoming migration is loaded, `stop` and `cont` only
        // say whether the guest runs once it is (QEMU's autostart).
        Command::Stop if c.state == RunState::InMigrate => {
            c.autostart = false;
            ok(json!({}))
        }
        Command::Cont if c.state == RunState::InMigrate => {
            c.autostart = true;
            ok(json!({}))
        }
        Command::Stop => {
            c.stop(RunState::Paused);
            Ok((json!({}), Action::Pause))
        }
        Command::Cont if c.state == RunState::PostMigrate => Err(QmpError::generic(
            "The guest was migrated away: its images belong to the destination now",
        )),
        Command::Cont => {
            c.resume();
            Ok((json!({}), Action::Resume))
        }
        Command::Migrate {
            uri,
            blk,
            inc,
            resume,
        } => migrate(c, ctx, &uri, blk || inc, resume),
        Command::QueryMigrate => {
            let mut info = c.migration.clone();
            info.blocked = blockers(ctx);
            ok(info.to_json())
        }
        // Migrations run to their end on the main loop: nothing is ever
        // in progress when this is read.
        Command::MigrateCancel => ok(json!({})),
        Command::SystemReset => Ok((json!({}), Action::Reset)),
        Command::SystemPowerdown => {
            c.events.emit("POWERDOWN", None);
            if let Some(pm) = &ctx.machine.power_button {
                devices::bus::lock(pm).power_button();
            }
            ok(json!({}))
        }
        Command::Quit => Ok((json!({}), Action::Quit)),
        Command::Block { name, args } => ok(super::jobs::execute(ctx, name, args)?),
        Command::QomList { path } => ok(super::qom::list(ctx, &path)?),
        Command::QomGet { path, property } => ok(super::qom::get(ctx, &path, &property)?),
        Command::BlockdevAdd(args) => {
            let text = Value::Object(args).to_string();
            ctx.storage
                .graph
                .blockdev_add_str(&text)
                .map_err(|e| QmpError::generic(e.to_string()))?;
            ok(json!({}))
        }
        Command::BlockdevDel { node_name } => {
            let g = &ctx.storage.graph;
            let Some(node) = g.get(&node_name) else {
                return Err(QmpError::generic(format!(
                    "Failed to find node with node-name='{node_name}'"
                )));
            };
            // The table holds one reference and this lookup another; any
            // more is a user (a backend, a parent node).
            if Arc::strong_count(&node) > 2 {
                return Err(QmpError::generic(format!("Node {node_name} is in use")));
            }
            drop(node);
            g.remove(&node_name);
            ok(json!({}))
        }
        Command::BlockResize {
            device,
            node_name,
            size,
        } => {
            let node = lookup_node(ctx, device.as_deref(), node_name.as_deref())?;
            if size < 0 {
                return Err(QmpError::generic("Parameter 'size' expects a >0 size"));
            }
            // The resize permission alone, as QEMU's block_resize takes
            // it; the devices' backends share resize.
            let err = |e: block::error::BlockError| QmpError::generic(e.to_string());
            let perm = node
                .attach(
                    "block_resize",
                    block::driver::Perms::RESIZE,
                    block::driver::Perms::ALL,
                )
                .map_err(err)?;
            node.truncate(size as u64).map_err(err)?;
            drop(perm);
            for b in ctx.storage.backends_of(&node) {
                b.resized();
            }
            ok(json!({}))
        }
        Command::BlockSetIoThrottle {
            drive,
            id,
            limits,
            iops_size,
            group,
        } => {
            let backend = find_backend(ctx, drive.as_deref(), id.as_deref())?;
            const MAX: i64 = 1_000_000_000_000_000;
            if limits
                .iter()
                .flatten()
                .chain([&iops_size])
                .any(|&v| !(0..=MAX).contains(&v))
            {
                return Err(QmpError::generic(format!(
                    "bps/iops/max values must be within [0, {MAX}]"
                )));
            }
            let [bps, bps_rd, bps_wr, iops, iops_rd, iops_wr] = *limits;
            if (bps[0] != 0 && (bps_rd[0] != 0 || bps_wr[0] != 0))
                || (iops[0] != 0 && (iops_rd[0] != 0 || iops_wr[0] != 0))
            {
                return Err(QmpError::generic(
                    "bps(iops) and bps(iops)_rd/_wr cannot be used at the same time",
                ));
            }
            let limit = |l: [i64; 3]| block::throttle::Limit {
                avg: l[0] as u64,
                max: l[1] as u64,
                max_length: if l[2] == 0 { 1 } else { l[2] as u64 },
            };
            let cfg = block::throttle::ThrottleConfig {
                bps: [limit(bps), limit(bps_rd), limit(bps_wr)],
                iops: [limit(iops), limit(iops_rd), limit(iops_wr)],
                iops_size: iops_size as u64,
            };
            backend.set_io_limits(cfg, group.as_deref());
            ok(json!({}))
        }
        Command::DeviceAdd(args) => {
            let spec = device_add(ctx, args)?;
            c.added.push(spec);
            ok(json!({}))
        }
        Command::DeviceDel { id } => {
            let detach = {
                let devs = devices::bus::lock(&ctx.machine.devices);
                device_by_qdev(&devs, &id)?.1.detach.clone()
            };
            if detach.is_some() {
                unplug_now(c, ctx.machine, &id);
                return ok(json!({}));
            }
            let devs = devices::bus::lock(&ctx.machine.devices);
            let (n, r) = device_by_qdev(&devs, &id)?;
            let not_hotpluggable =
                || QmpError::generic(format!("Bus '{}' does not support hotplugging", r.bus));
            let slot = r.pci_slot.ok_or_else(not_hotpluggable)?;
            let hp = ctx.machine.hotplug.as_ref().ok_or_else(not_hotpluggable)?;
            let hp = devices::bus::lock(hp);
            let pcihp = hp.pcihp.as_ref().ok_or_else(not_hotpluggable)?;
            let mut pcihp = devices::bus::lock(pcihp);
            if !pcihp.is_removable(slot) {
                return Err(not_hotpluggable());
            }
            // The guest ejects the slot (ACPI _EJ0); DEVICE_DELETED follows.
            log::info!(
                "device_del {}: asking the guest to eject slot {slot}",
                r.qdev(n)
            );
            pcihp.unplug_request(slot);
            ok(json!({}))
        }
        Command::Eject { drive, id, force } => {
            let (cd, name) = find_media(ctx, drive.as_deref(), id.as_deref())?;
            open_tray(cd.as_ref(), &name, force)?;
            remove_medium(cd.as_ref(), &name)?;
            ok(json!({}))
        }
        Command::OpenTray { drive, id, force } => {
            let (cd, _) = find_media(ctx, drive.as_deref(), id.as_deref())?;
            // Locked: the guest was asked to eject; QEMU answers success.
            cd.host_open_tray(force);
            ok(json!({}))
        }
        Command::CloseTray { drive, id } => {
            let (cd, _) = find_media(ctx, drive.as_deref(), id.as_deref())?;
            cd.host_close_tray();
            ok(json!({}))
        }
        Command::RemoveMedium { id } => {
            let (cd, name) = find_media(ctx, None, Some(&id))?;
            remove_medium(cd.as_ref(), &name)?;
            ok(json!({}))
        }
        Command::InsertMedium { id, node_name } => {
            let (cd, name) = find_media(ctx, None, Some(&id))?;
            let node = ctx.storage.graph.get(&node_name).ok_or_else(|| {
                QmpError::new(
                    ErrorClass::GenericError,
                    format!("Node '{node_name}' not found"),
                )
            })?;
            insert_medium(cd.as_ref(), &name, node)?;
            ok(json!({}))
        }
        Command::ChangeMedium {
            drive,
            id,
            filename,
            format,
            force,
            read_only_mode,
        } => {
            let (cd, name) = find_media(ctx, drive.as_deref(), id.as_deref())?;
            let backend = cd.backend().ok_or_else(|| no_drive(&name))?;
            let read_only = match read_only_mode.as_deref() {
                None | Some("retain") => backend.is_read_only(),
                Some("read-only") => true,
                Some("read-write") => false,
                Some(v) => {
                    return Err(QmpError::generic(format!(
                        "Parameter 'read-only-mode' does not accept value '{v}'"
                    )))
                }
            };
            // Open the new image first: a bad file name changes nothing.
            let node = ctx
                .storage
                .graph
                .open_image(&filename, format.as_deref(), read_only, &[])
                .map_err(|e| QmpError::generic(format!("Could not open '{filename}': {e}")))?;
            open_tray(cd.as_ref(), &name, force)?;
            remove_medium(cd.as_ref(), &name)?;
            insert_medium(cd.as_ref(), &name, node)?;
            cd.host_close_tray();
            ok(json!({}))
        }
        Command::HumanMonitorCommand { line } => {
            let (text, action) = super::hmp::run(c, &line, ctx);
            Ok((Value::String(text), action))
        }
    }
}

/// `device_add`: the arguments as a `-device` line, realized on the
/// running machine, and the guest told of the new slot.
fn device_add(ctx: &Ctx, args: serde_json::Map<String, Value>) -> Result<DeviceSpec, QmpError> {
    let driver = match args.get("driver") {
        Some(Value::String(d)) => d.clone(),
        Some(_) => {
            return Err(QmpError::generic(
                "Invalid parameter type for 'driver', expected: string",
            ))
        }
        None => return Err(QmpError::generic("Parameter 'driver' is missing")),
    };
    let mut text = driver.replace(',', ",,");
    for (k, v) in &args {
        if k == "driver" {
            continue;
        }
        let v = match v {
            Value::String(s) => s.clone(),
            Value::Bool(b) => if *b { "on" } else { "off" }.to_string(),
            Value::Number(n) => n.to_string(),
            _ => {
                return Err(QmpError::generic(format!(
                    "Parameter '{k}' expects a string, number or boolean"
                )))
            }
        };
        text.push_str(&format!(",{k}={}", v.replace(',', ",,")));
    }
    let mut spec = match DeviceSpec::parse(&text).map_err(QmpError::generic)? {
        DeviceArg::Spec(s) => s,
        DeviceArg::Help(_) => return Err(QmpError::generic("help is not available over QMP")),
    };
    spec.origin = format!("device_add {text}");
    let devs = devices::bus::lock(&ctx.machine.devices);
    if let Some(id) = &spec.id {
        if devs.iter().any(|r| r.id.as_ref() == Some(id)) {
            return Err(QmpError::generic(format!("Duplicate ID '{id}' for device")));
        }
    }
    drop(devs);
    let hp = ctx
        .machine
        .hotplug
        .as_ref()
        .ok_or_else(|| QmpError::generic("Bus 'pci.0' does not support hotplugging"))?;
    if !matches!(spec.ty.bus, BusKind::Pci | BusKind::Scsi | BusKind::Usb) {
        let hp = devices::bus::lock(hp);
        let bus = spec
            .bus
            .as_deref()
            .or_else(|| hp.buses.first_of(spec.ty.bus))
            .unwrap_or(spec.ty.bus.name());
        return Err(QmpError::generic(format!(
            "Bus '{bus}' does not support hotplugging"
        )));
    }
    let mut hp = devices::bus::lock(hp);
    let hp = &mut *hp;
    if spec.ty.bus == BusKind::Pci && hp.pcihp.is_none() {
        let bus = spec
            .bus
            .as_deref()
            .or_else(|| hp.buses.first_of(BusKind::Pci))
            .unwrap_or("pci.0");
        return Err(QmpError::generic(format!(
            "Bus '{bus}' does not support hotplugging"
        )));
    }
    // Nothing a hot-plugged PCI device registers goes to the fixed port or
    // MMIO ranges or the boot order (firmware has run); these are throwaway.
    let (mut io, mut mmio) = (devices::bus::Bus::new(), devices::bus::Bus::memory());
    let mut boot_order = devices::bootorder::BootOrder::new();
    let mut attach = AttachCtx {
        io: &mut io,
        mmio: &mut mmio,
        buses: &mut hp.buses,
        ram: &hp.ram,
        irq: hp.irq.as_ref(),
        intx: hp.intx.as_ref(),
        boot_order: &mut boot_order,
        msi: hp.msi.clone(),
        ioevents: hp.ioevents.clone(),
        iothreads: &mut hp.iothreads,
        cpus: hp.cpus,
        storage: ctx.storage,
        globals: &ctx.cfg.globals,
        used_drives: std::mem::take(&mut hp.used_drives),
        events: hp.events.clone(),
        realized: Vec::new(),
        removable: None,
        claimed: None,
        hotplugged: true,
        detach: None,
        chardevs: &ctx.cfg.chardevs,
        timers: hp.timers.clone(),
    };
    let r = crate::device::realize(&mut attach, &spec);
    let (used, realized) = (attach.used_drives, attach.realized);
    hp.used_drives = used;
    r.map_err(|e| {
        let e = e.strip_prefix(&format!("{}: ", spec.origin)).unwrap_or(&e);
        QmpError::generic(e)
    })?;
    let mut devs = devices::bus::lock(&ctx.machine.devices);
    for r in realized {
        if let (Some(slot), Some(pcihp)) = (r.pci_slot, &hp.pcihp) {
            devices::bus::lock(pcihp).plugged(slot);
        }
        devs.push(r);
    }
    Ok(spec)
}

/// `device_del` of a device its bus takes off at once (a SCSI unit):
/// off the bus (the HBA tells the driver), out of the machine, its unit
/// and drive free again, and DEVICE_DELETED.
fn unplug_now(c: &mut Control, machine: &crate::machine::Machine, qdev: &str) {
    let mut devs = devices::bus::lock(&machine.devices);
    let Some(i) = (0..devs.len()).find(|&i| devs[i].qdev(i) == qdev) else {
        return;
    };
    let path = devs[i].qdev(i);
    let r = devs.remove(i);
    drop(devs);
    if let Some(d) = &r.detach {
        d();
    }
    if let Some(hp) = &machine.hotplug {
        let mut hp = devices::bus::lock(hp);
        hp.buses.release(&r.bus, r.unit);
        if let Some(d) = &r.drive {
            hp.used_drives.retain(|u| u != d);
        }
    }
    deleted(c, &r, path);
}

/// Forgets a device that left and sends its DEVICE_DELETED.
fn deleted(c: &mut Control, r: &crate::device::Realized, qdev: String) {
    c.added.retain(|s| s.id != r.id || r.id.is_none());
    let mut data = json!({"path": match &r.id {
        Some(id) => format!("/machine/peripheral/{id}"),
        None => qdev,
    }});
    if let Some(id) = &r.id {
        data["device"] = json!(id);
    }
    c.events.emit("DEVICE_DELETED", Some(data));
}

/// The guest ejected PCI `slot`: its devices leave the bus and the
/// machine, and each one's DEVICE_DELETED goes out.
pub fn pci_eject(c: &mut Control, machine: &crate::machine::Machine, slot: u8) {
    let Some(hp) = &machine.hotplug else { return };
    let mut hp = devices::bus::lock(hp);
    let mut devs = devices::bus::lock(&machine.devices);
    let mut gone = Vec::new();
    let mut i = 0;
    while i < devs.len() {
        if devs[i].pci_slot == Some(slot) {
            let qdev = devs[i].qdev(i);
            gone.push((devs.remove(i), qdev));
        } else {
            i += 1;
        }
    }
    drop(devs);
    let functions: Vec<_> = (0..8u8)
        .filter_map(|f| hp.pci.remove(slot << 3 | f))
        .collect();
    hp.buses.release_pci_slot(slot);
    // Dropped here: a virtio device finishes its in-flight requests.
    drop(functions);
    for (r, qdev) in gone {
        if let Some(d) = &r.drive {
            hp.used_drives.retain(|u| u != d);
        }
        deleted(c, &r, qdev);
    }
}

fn device_not_found(name: &str) -> QmpError {
    QmpError::new(
        ErrorClass::DeviceNotFound,
        format!("Device '{name}' not found"),
    )
}

/// The device QMP names `qdev` (its `id=`, or its path), with its index.
fn device_by_qdev<'a>(
    devs: &'a [crate::device::Realized],
    qdev: &str,
) -> Result<(usize, &'a crate::device::Realized), QmpError> {
    devs.iter()
        .enumerate()
        .find(|(n, r)| r.qdev(*n) == qdev)
        .ok_or_else(|| device_not_found(qdev))
}

/// The removable-media drive of the device with `id=`, or of the device
/// using the drive `device=`; and the name the user gave, for errors.
fn find_media(
    ctx: &Ctx,
    drive: Option<&str>,
    id: Option<&str>,
) -> Result<(Arc<dyn Removable>, String), QmpError> {
    let devs = devices::bus::lock(&ctx.machine.devices);
    let (name, found) = match (drive, id) {
        (Some(d), None) => (d, devs.iter().find(|r| r.drive.as_deref() == Some(d))),
        (None, Some(i)) => (i, Some(device_by_qdev(&devs, i)?.1)),
        _ => return Err(QmpError::generic("Need exactly one of 'device' and 'id'")),
    };
    let r = found.ok_or_else(|| device_not_found(name))?;
    let cd = r
        .removable
        .clone()
        .ok_or_else(|| QmpError::generic(format!("Device '{name}' is not removable")))?;
    Ok((cd, name.to_string()))
}

/// The backend of the drive `device=`, or of the device with `id=`.
fn find_backend(
    ctx: &Ctx,
    drive: Option<&str>,
    id: Option<&str>,
) -> Result<Arc<block::backend::BlockBackend>, QmpError> {
    match (drive, id) {
        (Some(d), None) => ctx.storage.drive(d).ok_or_else(|| device_not_found(d)),
        (None, Some(i)) => {
            let devs = devices::bus::lock(&ctx.machine.devices);
            let (_, r) = device_by_qdev(&devs, i)?;
            r.backend
                .clone()
                .ok_or_else(|| QmpError::generic(format!("Device '{i}' has no drive")))
        }
        _ => Err(QmpError::generic("Need exactly one of 'device' and 'id'")),
    }
}

fn no_drive(name: &str) -> QmpError {
    QmpError::generic(format!("Device '{name}' has no drive to hold a medium"))
}

/// Opens the tray for `eject` and `blockdev-change-medium`, which fail
/// when the guest holds the drive locked (it is asked to eject).
fn open_tray(cd: &dyn Removable, name: &str, force: bool) -> Result<(), QmpError> {
    if cd.host_open_tray(force) {
        Ok(())
    } else {
        Err(QmpError::generic(format!(
            "Device '{name}' is locked and force was not specified, wait for tray to open and try again"
        )))
    }
}

fn remove_medium(cd: &dyn Removable, name: &str) -> Result<(), QmpError> {
    if !cd.tray_open() {
        return Err(QmpError::generic(format!(
            "Tray of device '{name}' is not open"
        )));
    }
    if let Some(b) = cd.backend().filter(|b| b.is_inserted()) {
        b.eject().map_err(|e| QmpError::generic(e.to_string()))?;
    }
    Ok(())
}

fn insert_medium(cd: &dyn Removable, name: &str, node: Arc<Node>) -> Result<(), QmpError> {
    if !cd.tray_open() {
        return Err(QmpError::generic(format!(
            "Tray of device '{name}' is not open"
        )));
    }
    let b = cd.backend().ok_or_else(|| no_drive(name))?;
    if b.is_inserted() {
        return Err(QmpError::generic(format!(
            "There already is a medium in device '{name}'"
        )));
    }
    b.insert(node).map_err(|e| QmpError::generic(e.to_string()))
}

/// QEMU's `bdrv_lookup_bs`: a drive's medium by `device`, or a node by
/// `node-name`.
fn lookup_node(ctx: &Ctx, device: Option<&str>, node: Option<&str>) -> Result<Arc<Node>, QmpError> {
    if let Some(d) = device {
        if let Some(n) = ctx.storage.drive(d).and_then(|b| b.root()) {
            return Ok(n);
        }
    }
    if let Some(n) = node.and_then(|n| ctx.storage.graph.get(n)) {
        return Ok(n);
    }
    Err(QmpError::generic(format!(
        "Cannot find device={} nor node-name={}",
        device.unwrap_or(""),
        node.unwrap_or("")
    )))
}

/// `query-machines` in QEMU 7.2's `MachineInfo` shape, the version
/// `query-version` reports: 7.2's clients (libqos among them) read it with
/// a strict visitor that refuses members added later, such as 8.0's `acpi`.
fn query_machines() -> Value {
    let mut out = Vec::new();
    for (i, b) in crate::machine::MACHINES.iter().enumerate() {
        let mut m = json!({
            "name": b.name(),
            "is-default": i == 0,
            "cpu-max": if b.name() == "none" { 1 } else { 255 },
            "hotpluggable-cpus": false,
            "numa-mem-supported": false,
            "deprecated": false,
        });
        if b.has_firmware() {
            m["default-cpu-type"] = json!("qemu64-x86_64-cpu");
            m["default-ram-id"] = json!("pc.ram");
        }
        out.push(m);
        for alias in b.help_aliases() {
            out.push(json!({
                "name": alias,
                "alias": b.name(),
                "is-default": false,
                "cpu-max": 255,
                "hotpluggable-cpus": false,
                "numa-mem-supported": false,
                "deprecated": false,
            }));
        }
    }
    Value::Array(out)
}

/// Bus 0's functions, read from their config space as firmware sees it.
fn query_pci(ctx: &Ctx) -> Value {
    let Some(bus) = &ctx.machine.pci else {
        return json!([]);
    };
    let rd = |devfn: u8, off: u16, len: usize| {
        let mut b = [0u8; 4];
        bus.config_read(devfn, off, &mut b[..len]);
        u32::from_le_bytes(b)
    };
    let mut devs = Vec::new();
    for devfn in 0..=255u8 {
        let vendor = rd(devfn, 0, 2);
        if vendor == 0xffff || vendor == 0 {
            continue;
        }
        let class = rd(devfn, 0x0a, 2);
        let mut regions = Vec::new();
        for bar in 0..6u16 {
            let v = rd(devfn, 0x10 + 4 * bar, 4);
            if v == 0 {
                continue;
            }
            let io = v & 1 != 0;
            regions.push(json!({
                "bar": bar,
                "type": if io { "io" } else { "memory" },
                "address": if io { v & !3 } else { v & !0xf },
                "size": 0,
                "prefetch": !io && v & 8 != 0,
                "mem_type_64": !io && (v >> 1) & 3 == 2,
            }));
        }
        let mut d = json!({
            "bus": 0,
            "slot": devfn >> 3,
            "function": devfn & 7,
            "class_info": {"class": class},
            "id": {
                "vendor": vendor,
                "device": rd(devfn, 2, 2),
                "subsystem-vendor": rd(devfn, 0x2c, 2),
                "subsystem": rd(devfn, 0x2e, 2),
            },
            "qdev_id": "",
            "regions": regions,
        });
        let pin = rd(devfn, 0x3d, 1);
        if pin != 0 {
            d["irq"] = json!(rd(devfn, 0x3c, 1));
            d["irq_pin"] = json!(pin);
        }
        devs.push(d);
    }
    json!([{"bus": 0, "devices": devs}])
}

/// `BlockDeviceInfo` of a node (`backend` adds the cache and throttling
/// view of the drive it is the root of).
fn node_info(n: &Arc<Node>, backend: Option<&block::backend::BlockBackend>) -> Value {
    let common = n.common();
    let mut depth = 0;
    let mut b = n.child("backing");
    while let Some(x) = b {
        depth += 1;
        b = x.child("backing");
    }
    let file = n.filename().unwrap_or_default();
    let mut image = json!({
        "filename": file,
        "format": n.driver_name(),
        "virtual-size": n.len(),
    });
    if let Some(bk) = n.child("backing").and_then(|b| b.filename()) {
        image["backing-filename"] = json!(bk);
    }
    let mut v = json!({
        "file": file,
        "node-name": n.name(),
        "ro": n.is_read_only(),
        "drv": n.driver_name(),
        "backing_file_depth": depth,
        "encrypted": false,
        "detect_zeroes": common.detect_zeroes.name(),
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "bps_max": 0, "bps_rd_max": 0, "bps_wr_max": 0,
        "iops_max": 0, "iops_rd_max": 0, "iops_wr_max": 0,
        "write_threshold": 0,
        "cache": {
            "writeback": backend.is_none_or(|b| b.write_cache_enabled()),
            "direct": common.direct,
            "no-flush": common.no_flush,
        },
        "image": image,
    });
    if let Some(bk) = n.child("backing").and_then(|b| b.filename()) {
        v["backing_file"] = json!(bk);
    }
    // QAPI `BlockDirtyInfo`; jobs' private bitmaps (named `#...`) are not
    // the user's.
    let bitmaps: Vec<Value> = n
        .bitmaps()
        .iter()
        .filter(|b| !b.name().starts_with('#'))
        .map(|b| {
            json!({
                "name": b.name(),
                "count": b.count(),
                "granularity": b.granularity(),
                "recording": b.is_enabled(),
                "busy": b.is_busy(),
                "persistent": b.is_persistent(),
            })
        })
        .collect();
    if !bitmaps.is_empty() {
        v["dirty-bitmaps"] = json!(bitmaps);
    }
    if let Some(b) = backend {
        let l = b.io_limits();
        for (i, name) in ["bps", "bps_rd", "bps_wr"].iter().enumerate() {
            v[*name] = json!(l.bps[i].avg);
            v[format!("{name}_max")] = json!(l.bps[i].max);
        }
        for (i, name) in ["iops", "iops_rd", "iops_wr"].iter().enumerate() {
            v[*name] = json!(l.iops[i].avg);
            v[format!("{name}_max")] = json!(l.iops[i].max);
        }
        if l.iops_size > 0 {
            v["iops_size"] = json!(l.iops_size);
        }
    }
    v
}

fn query_block(ctx: &Ctx) -> Value {
    let mut out = Vec::new();
    for d in ctx.storage.drives() {
        let devs = devices::bus::lock(&ctx.machine.devices);
        let dev = devs
            .iter()
            .enumerate()
            .find(|(_, r)| r.drive.as_deref() == Some(d.id.as_str()));
        let cd = dev.and_then(|(_, r)| r.removable.clone());
        let mut info = json!({
            "device": d.id,
            "qdev": dev.map(|(i, r)| r.qdev(i)).unwrap_or_default(),
            "locked": cd.as_ref().is_some_and(|c| c.locked()),
            // QEMU: a drive no device uses counts as removable media.
            "removable": cd.is_some() || dev.is_none(),
            "type": "unknown",
        });
        if let Some(b) = ctx.storage.drive(&d.id) {
            info["io-status"] = json!(if b.is_stopped() { "failed" } else { "ok" });
            if let Some(root) = b.root() {
                info["inserted"] = node_info(&root, Some(&b));
            }
        }
        if let Some(c) = cd.as_ref().filter(|c| c.has_tray()) {
            info["tray_open"] = json!(c.tray_open());
        }
        out.push(info);
    }
    // Devices on a -blockdev node have an anonymous backend, listed with
    // an empty device name, as QEMU does.
    let devs = devices::bus::lock(&ctx.machine.devices);
    for (i, r) in devs.iter().enumerate() {
        let Some(b) = r.backend.as_ref().filter(|b| b.id().is_empty()) else {
            continue;
        };
        let mut info = json!({
            "device": "",
            "qdev": r.qdev(i),
            "locked": false,
            "removable": r.removable.is_some(),
            "type": "unknown",
            "io-status": if b.is_stopped() { "failed" } else { "ok" },
        });
        if let Some(root) = b.root() {
            info["inserted"] = node_info(&root, Some(b));
        }
        out.push(info);
    }
    Value::Array(out)
}

fn query_blockstats(ctx: &Ctx) -> Value {
    let mut out = Vec::new();
    for d in ctx.storage.drives() {
        let Ok(Some(b)) = ctx.storage.backend(&d.id) else {
            out.push(json!({"device": d.id, "stats": stats(&Default::default())}));
            continue;
        };
        let mut s = json!({"device": d.id, "qdev": "", "stats": stats(&b.stats())});
        if let Some(root) = b.root() {
            s["node-name"] = json!(root.name());
        }
        out.push(s);
    }
    Value::Array(out)
}

fn stats(s: &block::backend::BlockStats) -> Value {
    json!({
        "rd_bytes": s.read.bytes,
        "wr_bytes": s.write.bytes,
        "zone_append_bytes": 0,
        "unmap_bytes": s.discard.bytes,
        "rd_operations": s.read.ops,
        "wr_operations": s.write.ops,
        "zone_append_operations": 0,
        "flush_operations": s.flush.ops,
        "unmap_operations": s.discard.ops,
        "rd_total_time_ns": s.read.total_time_ns,
        "wr_total_time_ns": s.write.total_time_ns,
        "zone_append_total_time_ns": 0,
        "flush_total_time_ns": s.flush.total_time_ns,
        "unmap_total_time_ns": s.discard.total_time_ns,
        "wr_highest_offset": 0,
        "rd_merged": 0,
        "wr_merged": 0,
        "zone_append_merged": 0,
        "unmap_merged": 0,
        "failed_rd_operations": s.read.failed,
        "failed_wr_operations": s.write.failed,
        "failed_zone_append_operations": 0,
        "failed_flush_operations": s.flush.failed,
        "failed_unmap_operations": s.discard.failed,
        "invalid_rd_operations": 0,
        "invalid_wr_operations": 0,
        "invalid_zone_append_operations": 0,
        "invalid_flush_operations": 0,
        "invalid_unmap_operations": 0,
        "account_invalid": true,
        "account_failed": true,
        "timed_stats": [],
    })
}

/// Why this machine cannot migrate: its own blockers (devices without
/// state), and a KVM guest's vCPUs.
pub(crate) fn blockers(ctx: &Ctx) -> Vec<String> {
    let mut b = Vec::new();
    if ctx.cfg.accel == crate::config::Accel::Kvm {
        b.push(crate::migration::KVM_BLOCKER.to_string());
    }
    b.extend(ctx.machine.vmstate.blockers().iter().cloned());
    b.extend(crate::migration::device_blockers(&devices::bus::lock(
        &ctx.machine.devices,
    )));
    b.extend(ctx.storage.graph.migration_blockers());
    b.extend(ctx.storage.jobs.migration_blockers());
    for (id, node) in ctx.storage.nbd.list() {
        b.push(format!(
            "NBD export '{id}' of node '{node}' is running: remove it before migrating"
        ));
    }
    b
}

/// `migrate`: check, connect, stop the guest; the main loop sends.
fn migrate(
    c: &mut Control,
    ctx: &Ctx,
    uri: &str,
    block_migration: bool,
    resume: bool,
) -> Result<(Value, Action), QmpError> {
    if block_migration {
        return Err(QmpError::generic(
            "Block migration (blk/inc) is not supported: share the images or copy them with drive-mirror first",
        ));
    }
    if resume {
        return Err(QmpError::generic("Postcopy recovery is not supported"));
    }
    match c.state {
        RunState::InMigrate => {
            return Err(QmpError::generic(
                "Guest is waiting for an incoming migration",
            ))
        }
        RunState::PostMigrate => {
            return Err(QmpError::generic("The guest has already been migrated"))
        }
        _ => {}
    }
    let b = blockers(ctx);
    if !b.is_empty() {
        return Err(QmpError::generic(b.join("; ")));
    }
    let uri = crate::migration::Uri::parse(uri).map_err(QmpError::generic)?;
    let conn = crate::migration::connect(&uri).map_err(QmpError::generic)?;
    let was = c.state.clone();
    c.stop(RunState::FinishMigrate);
    c.state = RunState::FinishMigrate;
    c.migration = crate::migration::Info {
        status: Some("active"),
        ..Default::default()
    };
    c.outgoing = Some((conn, was));
    Ok((json!({}), Action::Migrate))
}
