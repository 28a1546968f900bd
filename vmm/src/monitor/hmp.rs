//! HMP, the human monitor: a command line becomes the QMP command that
//! does the same thing (as QEMU's HMP calls its QMP handlers), and the
//! answer is formatted as text. Only `help` and the formatting live here.

use serde_json::{json, Value};

use super::command::Command;
use super::{Action, Control, Ctx};

const HELP: &str = "\
block_resize DEVICE SIZE   resize a drive (the guest is told)
change DEVICE FILE [FMT]   load another medium into a removable drive
cont|c              resume the guest (and retry requests an I/O error stopped)
eject [-f] DEVICE   open a removable drive's tray and remove its medium
help|?              show this help
info block          list the drives
info blockstats     show the drives' I/O statistics
info kvm            show whether KVM is in use
info chardev        list the character devices
info name           show the guest's name
info pci            list the PCI functions
info qtree          list the devices by bus
info status         show the run state
info version        show the version
commit DEVICE|all   write the active image into its backing file, then empty it
drive_mirror [-n] [-f] DEVICE TARGET [FORMAT]
                     mirror to TARGET (-f whole chain, -n TARGET exists)
drive_backup [-n] [-f] DEVICE TARGET [FORMAT]
                     back up to TARGET (-f whole chain, -n TARGET exists)
block_job_cancel|complete|pause|resume DEVICE, block_job_set_speed DEVICE SPEED
info block-jobs     list the block jobs
qemu-io DEVICE \"CMD\"  qemu-io's write|read [-P PATTERN] OFFSET LEN, break EVENT TAG,
                     resume TAG, remove_break TAG
quit|q              exit Strata
stop                pause the guest
system_powerdown    press the ACPI power button
system_reset        reset the machine
";

/// Runs one HMP line; returns the text to print and what the main loop
/// must do.
pub fn run(c: &mut Control, line: &str, ctx: &Ctx) -> (String, Action) {
    let words: Vec<&str> = line.split_whitespace().collect();
    let cmd = match words.as_slice() {
        [] => return (String::new(), Action::None),
        ["help"] | ["?"] | ["help", ..] => return (HELP.to_string(), Action::None),
        ["info", what] => match *what {
            "status" => Command::QueryStatus,
            "block" => Command::QueryBlock,
            "blockstats" => Command::QueryBlockstats,
            "version" => Command::QueryVersion,
            "kvm" => Command::QueryKvm,
            "name" => Command::QueryName,
            "pci" => Command::QueryPci,
            "chardev" => Command::QueryChardev,
            "qtree" => return (qtree(ctx), Action::None),
            "block-jobs" => block_cmd("query-block-jobs", json!({})),
            other => return (format!("info: unknown item '{other}'\n"), Action::None),
        },
        ["info"] => return (HELP.to_string(), Action::None),
        ["eject", rest @ ..] if !rest.is_empty() => {
            let force = rest.contains(&"-f");
            let dev = rest.iter().find(|w| **w != "-f").copied().unwrap_or("");
            Command::Eject {
                drive: Some(dev.to_string()),
                id: None,
                force,
            }
        }
        ["change", dev, file, rest @ ..] => Command::ChangeMedium {
            drive: Some(dev.to_string()),
            id: None,
            filename: file.to_string(),
            format: rest.first().map(|f| f.to_string()),
            force: false,
            read_only_mode: None,
        },
        ["block_resize", dev, size] => match block::keyval::parse_size_str(size, 1) {
            Ok(n) => Command::BlockResize {
                device: Some(dev.to_string()),
                node_name: None,
                size: n as i64,
            },
            Err(_) => {
                return (
                    format!("block_resize: invalid size '{size}'\n"),
                    Action::None,
                )
            }
        },
        ["stop"] => Command::Stop,
        ["cont"] | ["c"] => Command::Cont,
        ["system_reset"] => Command::SystemReset,
        ["system_powerdown"] => Command::SystemPowerdown,
        ["quit"] | ["q"] => Command::Quit,
        ["qemu-io", ..] => return (qemu_io(line, ctx), Action::None),
        ["commit", dev] => {
            return match super::jobs::hmp_commit(ctx, dev) {
                Ok(()) => (String::new(), Action::None),
                Err(e) => (format!("Error: {}\n", e.desc), Action::None),
            }
        }
        [verb @ ("drive_mirror" | "drive_backup"), rest @ ..] => {
            let flags: Vec<&str> = rest
                .iter()
                .copied()
                .filter(|w| w.starts_with('-'))
                .collect();
            let pos: Vec<&str> = rest
                .iter()
                .copied()
                .filter(|w| !w.starts_with('-'))
                .collect();
            let [dev, target, fmt @ ..] = pos.as_slice() else {
                return (
                    format!("{verb}: expected DEVICE TARGET [FORMAT]\n"),
                    Action::None,
                );
            };
            let mut a = json!({
                "device": dev,
                "target": target,
                "sync": if flags.contains(&"-f") { "full" } else { "top" },
                "mode": if flags.contains(&"-n") { "existing" } else { "absolute-paths" },
            });
            if let Some(f) = fmt.first() {
                a["format"] = json!(f);
            }
            block_cmd(
                if *verb == "drive_mirror" {
                    "drive-mirror"
                } else {
                    "drive-backup"
                },
                a,
            )
        }
        ["block_job_cancel", rest @ ..] => {
            let force = rest.contains(&"-f");
            let dev = rest.iter().find(|w| **w != "-f").copied().unwrap_or("");
            block_cmd("block-job-cancel", json!({"device": dev, "force": force}))
        }
        ["block_job_complete", dev] => block_cmd("block-job-complete", json!({"device": dev})),
        ["block_job_pause", dev] => block_cmd("block-job-pause", json!({"device": dev})),
        ["block_job_resume", dev] => block_cmd("block-job-resume", json!({"device": dev})),
        ["block_job_set_speed", dev, speed] => match block::keyval::parse_size_str(speed, 1) {
            Ok(n) => block_cmd("block-job-set-speed", json!({"device": dev, "speed": n})),
            Err(_) => {
                return (
                    format!("block_job_set_speed: invalid speed '{speed}'\n"),
                    Action::None,
                )
            }
        },
        [cmd, ..] => return (format!("unknown command: '{cmd}'\n"), Action::None),
    };
    let what = cmd.clone();
    match c.execute(cmd, ctx) {
        Ok((v, action)) => (format(&what, &v, c), action),
        Err(e) => (format!("Error: {}\n", e.desc), Action::None),
    }
}

/// `qemu-io DEVICE "COMMAND"`: the breakpoint commands of QEMU's qemu-io
/// on a drive (or node name), which tests use to hold a request in flight
/// through a blkdebug node. Output and errors in qemu-io's words.
fn qemu_io(line: &str, ctx: &Ctx) -> String {
    use block::driver::DebugCommand;
    let rest = line.trim().trim_start_matches("qemu-io").trim_start();
    let Some((device, cmd)) = rest.split_once(char::is_whitespace) else {
        return "qemu-io: expected DEVICE \"COMMAND\"\n".into();
    };
    let cmd = cmd.trim();
    let cmd = cmd
        .strip_prefix('"')
        .and_then(|c| c.strip_suffix('"'))
        .unwrap_or(cmd);
    let words: Vec<&str> = cmd.split_whitespace().collect();
    if let Some(out) = qemu_io_data(device, &words, ctx) {
        return out;
    }
    let node = ctx
        .storage
        .drive(device)
        .and_then(|b| b.root())
        .or_else(|| ctx.storage.graph.get(device));
    let Some(node) = node else {
        return format!("Error: Device '{device}' not found\n");
    };
    let (dc, what) = match words.as_slice() {
        ["break", event, tag] => (
            DebugCommand::Break {
                event: event.to_string(),
                tag: tag.to_string(),
            },
            "Could not set breakpoint".to_string(),
        ),
        ["resume", tag] => (
            DebugCommand::Resume {
                tag: tag.to_string(),
            },
            "Could not resume request".to_string(),
        ),
        ["remove_break", tag] => (
            DebugCommand::RemoveBreak {
                tag: tag.to_string(),
            },
            format!("Could not remove breakpoint {tag}"),
        ),
        [c, ..] => return format!("command \"{c}\" not supported by Strata's qemu-io\n"),
        [] => return String::new(),
    };
    match node.debug_command(&dc) {
        Ok(()) => String::new(),
        Err(e) => {
            // strerror's text, without Rust's " (os error N)".
            let msg = std::io::Error::from_raw_os_error(e).to_string();
            let msg = msg.split(" (os error").next().unwrap_or_default();
            format!("{what}: {msg}\n")
        }
    }
}

/// An HMP line that runs one of the block job commands.
fn block_cmd(name: &'static str, args: Value) -> Command {
    Command::Block {
        name,
        args: match args {
            Value::Object(m) => m,
            _ => Default::default(),
        },
    }
}

/// qemu-io's `write [-P PATTERN] OFFSET LEN` and `read [-P PATTERN]
/// OFFSET LEN` through the drive's backend (the path a device's requests
/// take), so that a test can change a running disk the way a guest does
/// and check what it reads; `None` for other commands.
fn qemu_io_data(device: &str, words: &[&str], ctx: &Ctx) -> Option<String> {
    let (write, rest) = match words {
        ["write", rest @ ..] => (true, rest),
        ["read", rest @ ..] => (false, rest),
        _ => return None,
    };
    let (pattern, rest) = match rest {
        ["-P", p, rest @ ..] => {
            let p = p.trim_start_matches("0x");
            match u8::from_str_radix(p, 16) {
                Ok(v) => (v, rest),
                Err(_) => return Some(format!("qemu-io: invalid pattern '{p}'\n")),
            }
        }
        _ => (0xcd, rest),
    };
    let [off, len] = rest else {
        return Some("qemu-io: expected OFFSET LEN\n".into());
    };
    let size = |s: &str| block::keyval::parse_size_str(s, 1).ok();
    let (Some(off), Some(len)) = (size(off), size(len)) else {
        return Some(format!("qemu-io: invalid offset or length '{off} {len}'\n"));
    };
    if len > 64 << 20 {
        return Some("qemu-io: length too large (at most 64 MiB)\n".into());
    }
    let Some(blk) = ctx.storage.job_backend(device) else {
        return Some(format!("Error: Device '{device}' not found\n"));
    };
    let mut buf = vec![pattern; len as usize];
    if write {
        return Some(match blk.write_at(off, &buf) {
            Ok(()) => format!("wrote {len}/{len} bytes at offset {off}\n"),
            Err(e) => format!("write failed: {e}\n"),
        });
    }
    Some(match blk.read_at(off, &mut buf) {
        Err(e) => format!("read failed: {e}\n"),
        Ok(()) => match buf.iter().position(|&b| b != pattern) {
            Some(i) => format!("Pattern verification failed at offset {}\n", off + i as u64),
            None => format!("read {len}/{len} bytes at offset {off}\n"),
        },
    })
}

fn format(cmd: &Command, v: &Value, c: &Control) -> String {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    match cmd {
        Command::QueryStatus => format!("VM status: {}\n", c.state.describe()),
        Command::QueryVersion => format!(
            "{}.{}.{}{}\n",
            v["qemu"]["major"],
            v["qemu"]["minor"],
            v["qemu"]["micro"],
            s(&v["package"])
        ),
        Command::QueryKvm => format!(
            "kvm support: {}\n",
            if v["enabled"] == true {
                "enabled"
            } else {
                "disabled"
            }
        ),
        Command::QueryName => match v.get("name") {
            Some(n) => format!("{}\n", s(n)),
            None => String::new(),
        },
        // QEMU's layout: a head line per drive, then indented details,
        // with a blank line between drives.
        Command::QueryBlock => {
            let mut out = String::new();
            for d in v.as_array().into_iter().flatten() {
                if !out.is_empty() {
                    out.push('\n');
                }
                out.push_str(&s(&d["device"]));
                let inserted = d.get("inserted");
                match inserted {
                    Some(i) => {
                        let ro = if i["ro"] == true { ", read-only" } else { "" };
                        let enc = if i["encrypted"] == true {
                            ", encrypted"
                        } else {
                            ""
                        };
                        out.push_str(&format!(
                            " ({}): {} ({}{ro}{enc})\n",
                            s(&i["node-name"]),
                            s(&i["file"]),
                            s(&i["drv"])
                        ));
                    }
                    None => out.push_str(": [not inserted]\n"),
                }
                let qdev = s(&d["qdev"]);
                if !qdev.is_empty() {
                    out.push_str(&format!("    Attached to:      {qdev}\n"));
                }
                if let Some(st) = d["io-status"].as_str().filter(|st| *st != "ok") {
                    out.push_str(&format!("    I/O status:       {st}\n"));
                }
                if d["removable"] == true {
                    out.push_str(&format!(
                        "    Removable device: {}locked, tray {}\n",
                        if d["locked"] == true { "" } else { "not " },
                        if d["tray_open"] == true {
                            "open"
                        } else {
                            "closed"
                        }
                    ));
                }
                let Some(i) = inserted else { continue };
                let c = &i["cache"];
                out.push_str(&format!(
                    "    Cache mode:       {}{}{}\n",
                    if c["writeback"] == true {
                        "writeback"
                    } else {
                        "writethrough"
                    },
                    if c["direct"] == true { ", direct" } else { "" },
                    if c["no-flush"] == true {
                        ", ignore flushes"
                    } else {
                        ""
                    }
                ));
                if let Some(b) = i["backing_file"].as_str() {
                    out.push_str(&format!(
                        "    Backing file:     {b} (chain depth: {})\n",
                        i["backing_file_depth"]
                    ));
                }
                if let Some(z) = i["detect_zeroes"].as_str().filter(|z| *z != "off") {
                    out.push_str(&format!("    Detect zeroes:    {z}\n"));
                }
            }
            out
        }
        Command::QueryChardev => {
            let mut out = String::new();
            for d in v.as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "{}: filename={}\n",
                    s(&d["label"]),
                    s(&d["filename"])
                ));
            }
            out
        }
        Command::Block {
            name: "query-block-jobs",
            ..
        } => {
            let jobs = v.as_array().cloned().unwrap_or_default();
            if jobs.is_empty() {
                return "No active jobs\n".into();
            }
            let mut out = String::new();
            for j in jobs {
                out.push_str(&format!(
                    "Type {}, device {}: Completed {} of {} bytes, speed limit {} bytes/s\n",
                    s(&j["type"]),
                    s(&j["device"]),
                    j["offset"],
                    j["len"],
                    j["speed"]
                ));
            }
            out
        }
        Command::QueryBlockstats => {
            let mut out = String::new();
            for d in v.as_array().into_iter().flatten() {
                let st = &d["stats"];
                out.push_str(&format!(
                    "{}: rd_bytes={} wr_bytes={} rd_operations={} wr_operations={} \
                     flush_operations={} wr_total_time_ns={} rd_total_time_ns={} \
                     flush_total_time_ns={}\n",
                    s(&d["device"]),
                    st["rd_bytes"],
                    st["wr_bytes"],
                    st["rd_operations"],
                    st["wr_operations"],
                    st["flush_operations"],
                    st["wr_total_time_ns"],
                    st["rd_total_time_ns"],
                    st["flush_total_time_ns"],
                ));
            }
            out
        }
        Command::QueryPci => {
            let mut out = String::new();
            for d in v[0]["devices"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "  Bus  0, device {:>3}, function {}:\n    class {:04x}: PCI device {:04x}:{:04x}\n",
                    d["slot"],
                    d["function"],
                    d["class_info"]["class"].as_u64().unwrap_or(0),
                    d["id"]["vendor"].as_u64().unwrap_or(0),
                    d["id"]["device"].as_u64().unwrap_or(0),
                ));
                if let Some(irq) = d.get("irq") {
                    out.push_str(&format!("      IRQ {irq}, pin {}\n", d["irq_pin"]));
                }
                for r in d["regions"].as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "      BAR{}: {} at {:#x}\n",
                        r["bar"],
                        if r["type"] == "io" { "I/O" } else { "memory" },
                        r["address"].as_u64().unwrap_or(0)
                    ));
                }
            }
            out
        }
        _ => String::new(),
    }
}

/// `info qtree`: the devices the command line and `device_add` made, by
/// bus, with their id, drive and PCI slot.
fn qtree(ctx: &Ctx) -> String {
    let devs = devices::bus::lock(&ctx.machine.devices);
    let mut buses: Vec<&str> = devs.iter().map(|r| r.bus.as_str()).collect();
    buses.sort();
    buses.dedup();
    let mut out = String::new();
    for b in buses {
        out.push_str(&format!("bus: {b}\n"));
        for (i, r) in devs.iter().enumerate().filter(|(_, r)| r.bus == b) {
            out.push_str(&format!(
                "  dev: {}, id \"{}\"\n",
                r.ty.name,
                r.id.as_deref().unwrap_or("")
            ));
            if r.id.is_none() {
                out.push_str(&format!("    path = \"{}\"\n", r.qdev(i)));
            }
            if let Some(d) = &r.drive {
                out.push_str(&format!("    drive = \"{d}\"\n"));
            }
            if let Some(s) = r.pci_slot {
                out.push_str(&format!("    addr = {s:02x}.0\n"));
            }
        }
    }
    out
}
