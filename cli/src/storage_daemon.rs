//! `strata-storage-daemon`'s command line: qemu-storage-daemon's options
//! (QEMU's `docs/tools/qemu-storage-daemon.rst`). `--blockdev`,
//! `--object`, `--chardev`, `--monitor`, `--pidfile` and `--daemonize` mean
//! what their single-dash forms mean to `strata`, so they are handed to
//! [`crate::system_args::parse`] as those; `--nbd-server` and `--export`
//! become the QMP commands `nbd-server-start` and `block-export-add`, run
//! in command-line order before the monitors start
//! ([`vmm::storage_daemon`]).

use block::keyval::{self, Value as Kv};
use serde_json::{Map, Value};

use crate::system_args::{self, Parsed, Process};
use vmm::storage_daemon::Startup;

pub const USAGE: &str = "\
Usage: strata-storage-daemon [options]
Strata storage daemon: QEMU's block graph, exported, with no guest
(the options of qemu-storage-daemon)

  -h, --help             display this help and exit
  -V, --version          output version information and exit
  --blockdev [driver=]<driver>[,node-name=<N>][,<option>=<value>...]
                         (or its JSON form) add a block node
  --chardev <options>    configure a character device (for --monitor)
  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>]
           [,writable=on|off][,bitmap=<name>]
                         export a node over the --nbd-server
  --export [type=]vhost-user-blk,id=<id>,node-name=<node-name>,
           addr.type=unix,addr.path=<socket-path>[,writable=on|off]
           [,logical-block-size=<size>][,num-queues=<n>]
           (or addr.type=fd,addr.str=<n>: a listening socket inherited
           on descriptor <n>)
                         export a node as a vhost-user-blk device
  --export [type=]vduse-blk,id=<id>,node-name=<node-name>[,writable=on|off]
           [,num-queues=<n>][,queue-size=<n>][,logical-block-size=<size>]
           [,serial=<str>]
                         export a node as a VDUSE device named <id> (then
                         `vdpa dev add name <id> mgmtdev vduse`)
  --monitor [chardev=]<name>[,mode=control][,pretty[=on|off]]
                         a QMP monitor on a --chardev
  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>
               [,tls-creds=<id>][,max-connections=<n>]
  --nbd-server addr.type=unix,addr.path=<path>[,tls-creds=<id>]
                         start the NBD server for nbd exports
  --object <type>,id=<id>[,<property>=<value>...]
                         create an object (secret, tls-creds-x509, ...)
  --pidfile <path>       write the process id to a file
  --daemonize            detach once the exports and monitors listen
";

pub enum DaemonArgs {
    Run(Box<vmm::config::MachineConfig>, Process, Vec<Startup>),
    Help,
    Version,
}

/// Options whose values are booleans or integers in the QAPI schema of
/// `BlockExportOptions` and `NbdServerOptions`: the dotted form spells
/// every value as text.
const BOOL_KEYS: &[&str] = &[
    "writable",
    "writethrough",
    "fixed-iothread",
    "allocation-depth",
    "abstract",
    "tight",
    "ipv4",
    "ipv6",
    "keep-alive",
    "numeric",
    "growable",
    "allow-other",
];
const INT_KEYS: &[&str] = &[
    "num-queues",
    "queue-size",
    "logical-block-size",
    "max-connections",
];

/// A keyval tree as QMP arguments.
fn to_json(option: &str, m: keyval::Map) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    for (k, v) in m {
        let j = match v {
            Kv::Str(s) if BOOL_KEYS.contains(&k.as_str()) => Value::Bool(
                keyval::parse_bool_str(&s)
                    .ok_or_else(|| format!("{option}: {k}={s}: expected on or off"))?,
            ),
            Kv::Str(s) if INT_KEYS.contains(&k.as_str()) => Value::from(
                keyval::parse_int_str(&s)
                    .ok_or_else(|| format!("{option}: {k}={s}: expected a number"))?,
            ),
            Kv::Str(s) => Value::String(s),
            Kv::Null => Value::Null,
            Kv::Map(m) => Value::Object(to_json(option, m)?),
            Kv::List(l) => Value::Array(
                l.into_iter()
                    .map(|v| match v {
                        Kv::Str(s) => Ok(Value::String(s)),
                        _ => Err(format!("{option}: {k}: expected a list of names")),
                    })
                    .collect::<Result<_, _>>()?,
            ),
        };
        out.insert(k, j);
    }
    Ok(out)
}

/// Parses the daemon's arguments.
pub fn parse(args: &[String]) -> Result<DaemonArgs, String> {
    let mut sys: Vec<String> = ["-machine", "none", "-nodefaults", "-display", "none"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut startup = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        // `--opt=value` and `--opt value` both.
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let value = |i: &mut usize| -> Result<String, String> {
            if let Some(v) = &inline {
                return Ok(v.clone());
            }
            let v = args
                .get(*i)
                .cloned()
                .ok_or_else(|| format!("{name}: requires an argument"))?;
            *i += 1;
            Ok(v)
        };
        match name.as_str() {
            "-h" | "--help" => return Ok(DaemonArgs::Help),
            "-V" | "--version" => return Ok(DaemonArgs::Version),
            "--daemonize" => sys.push("-daemonize".into()),
            "--blockdev" | "--object" | "--chardev" | "--pidfile" => {
                let v = value(&mut i)?;
                sys.push(name[1..].to_string());
                sys.push(v);
            }
            "--monitor" => {
                let v = value(&mut i)?;
                let m =
                    keyval::parse("--monitor", &v, Some("chardev")).map_err(|e| e.to_string())?;
                let mut chardev = None;
                let mut mode = "control".to_string();
                let mut pretty = None;
                for (k, val) in m {
                    let Kv::Str(s) = val else {
                        return Err(format!("--monitor {v}: {k}: expected a value"));
                    };
                    match k.as_str() {
                        "chardev" => chardev = Some(s),
                        "mode" if s == "control" => mode = s,
                        "mode" => {
                            return Err(format!(
                                "--monitor {v}: mode={s}: only QMP monitors (mode=control) are \
                                 supported"
                            ))
                        }
                        "pretty" => pretty = Some(s),
                        "id" => {}
                        _ => return Err(format!("--monitor {v}: Invalid parameter '{k}'")),
                    }
                }
                let c = chardev.ok_or_else(|| format!("--monitor {v}: chardev is missing"))?;
                let mut mon = format!("chardev={c},mode={mode}");
                if let Some(p) = pretty {
                    mon.push_str(&format!(",pretty={p}"));
                }
                sys.push("-mon".into());
                sys.push(mon);
            }
            "--nbd-server" | "--export" => {
                let v = value(&mut i)?;
                let option = format!("{name} {v}");
                let implied = (name == "--export").then_some("type");
                let m =
                    keyval::parse_json_or_dotted(&name, &v, implied).map_err(|e| e.to_string())?;
                startup.push(Startup {
                    args: to_json(&option, m)?,
                    option,
                    command: if name == "--export" {
                        "block-export-add"
                    } else {
                        "nbd-server-start"
                    },
                });
            }
            "-T" | "--trace" => {
                let _ = value(&mut i)?;
                eprintln!(
                    "strata-storage-daemon: warning: {name}: tracing is not supported; ignored"
                );
            }
            _ if name.starts_with('-') => return Err(format!("{name}: unrecognized option")),
            _ => {
                return Err(format!(
                    "{name}: unexpected argument (options start with --; see --help)"
                ))
            }
        }
    }
    match system_args::parse(&sys) {
        Ok(Parsed::Run(cfg, process)) => Ok(DaemonArgs::Run(cfg, process, startup)),
        Ok(_) => Err("unexpected option".into()),
        Err(e) => Err(double_dash(e)),
    }
}

/// An error that names an option as `strata` spells it (`-blockdev ...`,
/// from the shared parser or from opening the graph), with the daemon's
/// double dash put back.
pub fn double_dash(e: String) -> String {
    if e.starts_with('-') && !e.starts_with("--") {
        format!("-{e}")
    } else {
        e
    }
}
