//! `qom-list` and `qom-get` (qapi/qom.json): the machine as QEMU's object
//! tree shows it to management tools. Strata has no object model of its
//! own; this is a view over the machine: `/machine` with its containers
//! `peripheral` (devices with an `id`), `peripheral-anon` (`device[N]`)
//! and `unattached`, and each device with `type`, `realized`,
//! `hotpluggable`, `parent_bus` and its qdev properties (after defaults
//! and `-global`). Paths are absolute, or partial (a device `id` alone),
//! as QEMU resolves them.

use serde_json::{json, Value};

use super::command::{ErrorClass, QmpError};
use super::Ctx;

/// What a path names.
enum Obj {
    Root,
    Machine,
    Container(&'static str),
    /// A device, by index in the machine's device list.
    Device(usize),
}

fn not_found(path: &str) -> QmpError {
    QmpError::new(
        ErrorClass::DeviceNotFound,
        format!("Device '{path}' not found"),
    )
}

fn resolve(ctx: &Ctx, path: &str) -> Result<Obj, QmpError> {
    let devs = devices::bus::lock(&ctx.machine.devices);
    let p = path.trim_end_matches('/');
    let by_id = |id: &str| devs.iter().position(|r| r.id.as_deref() == Some(id));
    Ok(match p {
        "" => Obj::Root,
        "/machine" => Obj::Machine,
        "/objects" => Obj::Container("objects"),
        "/chardevs" => Obj::Container("chardevs"),
        "/machine/peripheral" => Obj::Container("peripheral"),
        "/machine/peripheral-anon" => Obj::Container("peripheral-anon"),
        "/machine/unattached" => Obj::Container("unattached"),
        _ => {
            if let Some(id) = p.strip_prefix("/machine/peripheral/") {
                return by_id(id).map(Obj::Device).ok_or_else(|| not_found(path));
            }
            if let Some(n) = p
                .strip_prefix("/machine/peripheral-anon/device[")
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|n| n.parse::<usize>().ok())
            {
                return match devs.get(n) {
                    Some(r) if r.id.is_none() => Ok(Obj::Device(n)),
                    _ => Err(not_found(path)),
                };
            }
            // A partial path: a device id anywhere in the tree.
            if !p.starts_with('/') {
                return by_id(p).map(Obj::Device).ok_or_else(|| not_found(path));
            }
            return Err(not_found(path));
        }
    })
}

fn machine_type(ctx: &Ctx) -> String {
    format!("{}-machine", crate::machine::board(ctx.cfg).name())
}

/// `qom-list`: the properties (children and links among them) of `path`.
pub fn list(ctx: &Ctx, path: &str) -> Result<Value, QmpError> {
    let prop = |name: &str, ty: &str| json!({"name": name, "type": ty});
    // Resolved before the device list is locked (resolving locks it too).
    let obj = resolve(ctx, path)?;
    let devs = devices::bus::lock(&ctx.machine.devices);
    let mut out = vec![prop("type", "string")];
    match obj {
        Obj::Root => {
            out.push(prop("machine", &format!("child<{}>", machine_type(ctx))));
            out.push(prop("objects", "child<container>"));
            out.push(prop("chardevs", "child<container>"));
        }
        Obj::Machine => {
            for c in ["peripheral", "peripheral-anon", "unattached"] {
                out.push(prop(c, "child<container>"));
            }
        }
        Obj::Container(c) => {
            for (i, r) in devs.iter().enumerate() {
                let name = match (c, &r.id) {
                    ("peripheral", Some(id)) => id.clone(),
                    ("peripheral-anon", None) => format!("device[{i}]"),
                    _ => continue,
                };
                out.push(prop(&name, &format!("child<{}>", r.ty.name)));
            }
        }
        Obj::Device(i) => {
            let r = &devs[i];
            out.push(prop("realized", "bool"));
            out.push(prop("hotpluggable", "bool"));
            out.push(prop("parent_bus", "link<bus>"));
            for d in r.ty.all_props() {
                out.push(prop(d.name, d.ty.name()));
            }
        }
    }
    Ok(Value::Array(out))
}

/// `qom-get`: one property of `path`.
pub fn get(ctx: &Ctx, path: &str, property: &str) -> Result<Value, QmpError> {
    let missing = || QmpError::generic(format!("Property '{property}' not found"));
    let obj = resolve(ctx, path)?;
    let devs = devices::bus::lock(&ctx.machine.devices);
    match (obj, property) {
        (Obj::Root | Obj::Container(_), "type") => Ok(json!("container")),
        (Obj::Machine, "type") => Ok(json!(machine_type(ctx))),
        (Obj::Device(i), p) => {
            let r = &devs[i];
            match p {
                "type" => Ok(json!(r.ty.name)),
                "realized" => Ok(json!(true)),
                "hotpluggable" => Ok(json!(r.pci_slot.is_some())),
                "parent_bus" => Ok(json!(format!("/machine/unattached/{}", r.bus))),
                p if r.ty.all_props().any(|d| d.name == p) => {
                    // Unset properties without a default read as QEMU's
                    // empty values.
                    Ok(r.props.json(p).unwrap_or_else(|| json!("")))
                }
                _ => Err(missing()),
            }
        }
        _ => Err(missing()),
    }
}
