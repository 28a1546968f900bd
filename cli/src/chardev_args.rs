//! Character devices and monitors on the command line, in QEMU's grammar:
//! the short forms `-serial`, `-debugcon`, `-qtest`, `-qmp` and `-monitor`
//! take (`stdio`, `mon:stdio`, `file:PATH`, `unix:PATH[,server=on][,wait=off]`,
//! `tcp:HOST:PORT[,server=on][,wait=off]`, `null`, `none`), and `-chardev
//! BACKEND,id=ID,...` with `-mon chardev=ID` and `-serial chardev:ID`,
//! which refer to chardevs by id.

use std::path::PathBuf;

use vmm::config::{CharDev, MonitorConfig, MonitorMode};

use crate::system_args::split_opts;

fn parse_bool(opt: &str, key: &str, v: &str) -> Result<bool, String> {
    block::keyval::parse_bool(opt, key, v).map_err(|e| e.to_string())
}

/// Socket options shared by the short forms and `-chardev socket`.
#[derive(Default)]
struct SocketOpts {
    server: bool,
    wait: Option<bool>,
}

impl SocketOpts {
    /// Takes one socket option; `false` if `k` is not one.
    fn take(&mut self, opt: &str, k: &str, v: &str) -> Result<bool, String> {
        match k {
            "server" => self.server = parse_bool(opt, k, v)?,
            "wait" => self.wait = Some(parse_bool(opt, k, v)?),
            "nowait" => self.wait = Some(false),
            // Strata sends no telnet negotiation; plain clients need none.
            "telnet" | "tn3270" | "websocket" | "nodelay" | "reconnect" | "delay" => {}
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// QEMU: a server waits for its first client unless told not to.
    fn wait(&self) -> bool {
        self.server && self.wait.unwrap_or(true)
    }
}

fn parse_port(opt: &str, spec: &str, port: &str) -> Result<u16, String> {
    port.parse()
        .map_err(|_| format!("{opt} {spec}: invalid port '{port}'"))
}

/// Parses a chardev in the short form `-serial` and friends take.
/// `Ok(None)` is `none`.
pub fn parse_chardev(opt: &str, spec: &str) -> Result<Option<CharDev>, String> {
    let (kind, rest) = spec.split_once(':').unwrap_or((spec, ""));
    Ok(Some(match kind {
        "none" => return Ok(None),
        "null" => CharDev::Null,
        "stdio" => CharDev::Stdio { mux: false },
        "pty" => CharDev::Pty,
        "mon" if rest == "stdio" => CharDev::Stdio { mux: true },
        "file" if !rest.is_empty() => CharDev::File(PathBuf::from(rest)),
        "unix" if !rest.is_empty() => {
            let mut opts = split_opts(opt, rest, Some("path"))?;
            let path = PathBuf::from(opts.remove(0).1);
            let mut so = SocketOpts::default();
            for (k, v) in opts {
                if !so.take(opt, &k, &v)? {
                    return Err(format!("{opt} {spec}: unknown unix socket option '{k}'"));
                }
            }
            CharDev::Unix {
                path,
                server: so.server,
                wait: so.wait(),
            }
        }
        "tcp" | "telnet" if !rest.is_empty() => {
            let (addr, opts) = rest.split_once(',').unwrap_or((rest, ""));
            let (host, port) = addr
                .rsplit_once(':')
                .ok_or_else(|| format!("{opt} {spec}: expected HOST:PORT"))?;
            let port = parse_port(opt, spec, port)?;
            let mut so = SocketOpts::default();
            for (k, v) in split_opts(opt, opts, None)? {
                if !so.take(opt, &k, &v)? {
                    return Err(format!("{opt} {spec}: unknown tcp socket option '{k}'"));
                }
            }
            CharDev::Tcp {
                host: host.trim_matches(['[', ']']).to_string(),
                port,
                server: so.server,
                wait: so.wait(),
            }
        }
        "chardev" if !rest.is_empty() => {
            return Err(format!(
                "{opt} {spec}: refers to a -chardev (resolved later)"
            ))
        }
        _ => return Err(format!("{opt} {spec}: unsupported character device")),
    }))
}

/// A `-chardev`: its backend and whether it is a `mux=on` stdio (shared by
/// a serial port and the human monitor, switched with Ctrl-A c).
struct Named {
    id: String,
    dev: CharDev,
    mux: bool,
    /// Who uses it, for QEMU's "in use" refusal.
    user: Option<String>,
}

/// The `-chardev`s of a command line, and the frontends that refer to
/// them, resolved once every option has been read (QEMU creates chardevs
/// before their users, whatever the order on the command line).
#[derive(Default)]
pub struct Chardevs {
    named: Vec<Named>,
    /// `-serial chardev:ID` (index into the serial list) and `-mon`s.
    serial_refs: Vec<(usize, String, String)>,
    mon_refs: Vec<(String, MonitorMode, bool, String)>,
}

impl Chardevs {
    /// `-chardev BACKEND,id=ID,...`.
    pub fn add(&mut self, text: &str) -> Result<(), String> {
        let opt = "-chardev";
        let fail = |m: String| format!("{opt} {text}: {m}");
        let props = split_opts(opt, text, Some("backend"))?;
        let mut backend = String::new();
        let mut id = None;
        let (mut path, mut host, mut port) = (None, None, None);
        let mut so = SocketOpts::default();
        let mut mux = false;
        for (k, v) in props {
            match k.as_str() {
                "backend" => backend = v,
                "id" => id = Some(v),
                "path" => path = Some(v),
                "host" => host = Some(v),
                "port" => port = Some(v),
                "mux" => mux = parse_bool(opt, &k, &v)?,
                "signal" | "logfile" | "logappend" | "append" => {}
                k => {
                    if !so.take(opt, k, &v)? {
                        return Err(fail(format!("Parameter '{k}' is unexpected")));
                    }
                }
            }
        }
        let id = id.ok_or_else(|| fail("Parameter 'id' is missing".into()))?;
        if !block::graph::valid_id(&id) {
            return Err(fail(format!(
                "Parameter 'id' expects an identifier; got '{id}'"
            )));
        }
        if self.named.iter().any(|n| n.id == id) {
            return Err(fail(format!("Duplicate ID '{id}' for chardev")));
        }
        let dev = match backend.as_str() {
            "null" => CharDev::Null,
            "stdio" => CharDev::Stdio { mux },
            "file" => CharDev::File(PathBuf::from(
                path.ok_or_else(|| fail("Parameter 'path' is missing".into()))?,
            )),
            "socket" => match (path, port) {
                (Some(p), None) => CharDev::Unix {
                    path: PathBuf::from(p),
                    server: so.server,
                    wait: so.wait(),
                },
                (None, Some(port)) => CharDev::Tcp {
                    host: host.unwrap_or_default(),
                    port: parse_port(opt, text, &port)?,
                    server: so.server,
                    wait: so.wait(),
                },
                _ => return Err(fail("chardev: socket: exactly one of 'path' and 'port' is needed".into())),
            },
            "pty" => CharDev::Pty,
            "serial" | "tty" | "parallel" | "pipe" | "udp" | "ringbuf" | "memory"
            | "spicevmc" | "spiceport" | "vc" | "msmouse" | "braille" | "testdev" => {
                return Err(fail(format!(
                    "chardev backend '{backend}' is not supported by Strata (use socket, stdio, file or null)"
                )))
            }
            "" => return Err(fail("Parameter 'backend' is missing".into())),
            b => return Err(fail(format!("'{b}' is not a valid char driver name"))),
        };
        self.named.push(Named {
            id,
            dev,
            mux,
            user: None,
        });
        Ok(())
    }

    /// Every `-chardev`, by id: devices that name one (`chardev=`)
    /// look it up in the machine's configuration.
    pub fn all(&self) -> Vec<(String, CharDev)> {
        self.named
            .iter()
            .map(|n| (n.id.clone(), n.dev.clone()))
            .collect()
    }

    /// `-serial chardev:ID`; `index` is its place among the serial ports.
    pub fn serial_ref(&mut self, index: usize, id: &str, text: &str) {
        self.serial_refs
            .push((index, id.to_string(), text.to_string()));
    }

    /// `-mon chardev=ID[,mode=readline|control][,pretty=on|off]`.
    pub fn mon(&mut self, text: &str) -> Result<(), String> {
        let opt = "-mon";
        let mut chardev = None;
        let mut mode = MonitorMode::Readline;
        let mut pretty = false;
        for (k, v) in split_opts(opt, text, Some("chardev"))? {
            match k.as_str() {
                "chardev" => chardev = Some(v),
                "mode" => {
                    mode = match v.as_str() {
                        "readline" => MonitorMode::Readline,
                        "control" => MonitorMode::Control,
                        _ => {
                            return Err(format!(
                                "{opt} {text}: Parameter 'mode' does not accept value '{v}'"
                            ))
                        }
                    }
                }
                "pretty" => pretty = parse_bool(opt, &k, &v)?,
                "default" | "id" => {}
                _ => return Err(format!("{opt} {text}: Parameter '{k}' is unexpected")),
            }
        }
        let chardev =
            chardev.ok_or_else(|| format!("{opt} {text}: Parameter 'chardev' is missing"))?;
        self.mon_refs
            .push((chardev, mode, pretty, text.to_string()));
        Ok(())
    }

    fn claim(&mut self, id: &str, user: &str, opt: &str) -> Result<(CharDev, bool), String> {
        let n = self
            .named
            .iter_mut()
            .find(|n| n.id == id)
            .ok_or_else(|| format!("{opt}: Chardev '{id}' not found"))?;
        // A mux=on chardev is shared by design; anything else has one user.
        if let Some(u) = &n.user {
            if !n.mux {
                return Err(format!("{opt}: Device '{id}' is in use (by {u})"));
            }
        }
        n.user = Some(user.to_string());
        Ok((n.dev.clone(), n.mux))
    }

    /// Resolves the references: fills `serial`'s `chardev:` slots and
    /// returns the `-mon` monitors. A `mux=on` stdio shared by a serial
    /// port and a readline monitor is the `mon:stdio` console.
    pub fn resolve(mut self, serial: &mut [Option<CharDev>]) -> Result<Vec<MonitorConfig>, String> {
        let mut muxed = Vec::new();
        for (i, id, text) in std::mem::take(&mut self.serial_refs) {
            let (dev, mux) = self.claim(&id, "a serial port", &format!("-serial {text}"))?;
            if mux {
                muxed.push(id.clone());
            }
            if let Some(slot) = serial.get_mut(i) {
                *slot = Some(match dev {
                    CharDev::Stdio { .. } if mux => CharDev::Stdio { mux: true },
                    d => d,
                });
            }
        }
        let mut monitors = Vec::new();
        for (id, mode, pretty, text) in std::mem::take(&mut self.mon_refs) {
            let (dev, mux) = self.claim(&id, "a monitor", &format!("-mon {text}"))?;
            if mux && mode == MonitorMode::Readline && muxed.contains(&id) {
                // Ctrl-A c on the serial console reaches this monitor.
                continue;
            }
            monitors.push(MonitorConfig {
                chardev: dev,
                mode,
                pretty,
            });
        }
        Ok(monitors)
    }
}

/// `-qmp DEV` or `-monitor DEV` in the short form.
pub fn monitor(opt: &str, spec: &str, pretty: bool) -> Result<Option<MonitorConfig>, String> {
    let mode = if opt == "-qmp" {
        MonitorMode::Control
    } else {
        MonitorMode::Readline
    };
    Ok(parse_chardev(opt, spec)?.map(|chardev| MonitorConfig {
        chardev,
        mode,
        pretty,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_forms() {
        assert_eq!(
            parse_chardev("-qmp", "unix:/tmp/q.sock,server=on,wait=off").unwrap(),
            Some(CharDev::Unix {
                path: "/tmp/q.sock".into(),
                server: true,
                wait: false
            })
        );
        assert_eq!(
            parse_chardev("-qmp", "tcp:127.0.0.1:4444,server,nowait").unwrap(),
            Some(CharDev::Tcp {
                host: "127.0.0.1".into(),
                port: 4444,
                server: true,
                wait: false
            })
        );
        assert_eq!(
            parse_chardev("-monitor", "telnet::5555,server").unwrap(),
            Some(CharDev::Tcp {
                host: "".into(),
                port: 5555,
                server: true,
                wait: true
            })
        );
        assert!(parse_chardev("-qmp", "tcp:host:99999")
            .unwrap_err()
            .contains("invalid port"));
    }

    #[test]
    fn named_chardevs() {
        let mut c = Chardevs::default();
        c.add("socket,id=qmp0,path=/tmp/x,server=on,wait=off")
            .unwrap();
        c.add("stdio,id=con,mux=on").unwrap();
        assert!(c
            .add("null,id=qmp0")
            .unwrap_err()
            .contains("Duplicate ID 'qmp0' for chardev"));
        c.mon("chardev=qmp0,mode=control,pretty=on").unwrap();
        c.mon("chardev=con").unwrap();
        c.serial_ref(0, "con", "chardev:con");
        let mut serial = vec![None];
        let mons = c.resolve(&mut serial).unwrap();
        assert_eq!(serial[0], Some(CharDev::Stdio { mux: true }));
        assert_eq!(mons.len(), 1);
        assert_eq!(mons[0].mode, MonitorMode::Control);
        assert!(mons[0].pretty);

        let mut c = Chardevs::default();
        c.add("null,id=a").unwrap();
        c.mon("chardev=a").unwrap();
        c.mon("chardev=a,mode=control").unwrap();
        assert!(c.resolve(&mut []).unwrap_err().contains("is in use"));
        let mut c = Chardevs::default();
        c.mon("chardev=nope").unwrap();
        assert!(c
            .resolve(&mut [])
            .unwrap_err()
            .contains("Chardev 'nope' not found"));
    }
}
