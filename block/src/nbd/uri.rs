//! NBD file names, as QEMU accepts them where a file name is expected:
//! the URI forms of the NBD project's `doc/uri.md` (`nbd://HOST[:PORT]/EXPORT`,
//! `nbd+tcp://`, `nbd+unix:///EXPORT?socket=PATH`) and QEMU's legacy
//! `nbd:HOST:PORT[:exportname=NAME]` and `nbd:unix:PATH[:exportname=NAME]`.

use super::transport::NbdAddr;

/// The default NBD port.
pub const DEFAULT_PORT: u16 = 10809;

/// A parsed NBD file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdTarget {
    /// Server address.
    pub addr: NbdAddr,
    /// Export name.
    pub export: String,
}

/// True if `name` is meant as an NBD file name.
pub fn is_nbd(name: &str) -> bool {
    name.starts_with("nbd:") || name.starts_with("nbd+")
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in '{s}'"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("'{s}' is not UTF-8"))
}

fn port(p: &str, name: &str) -> Result<u16, String> {
    p.parse::<u16>()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| format!("{name}: invalid port '{p}'"))
}

/// Parse an NBD file name (`None` if it is not one).
pub fn parse(name: &str) -> Result<Option<NbdTarget>, String> {
    if let Some(rest) = name
        .strip_prefix("nbd://")
        .or_else(|| name.strip_prefix("nbd+tcp://"))
    {
        let (auth, path) = rest.split_once('/').unwrap_or((rest, ""));
        if path.contains('?') {
            return Err(format!("{name}: a TCP NBD URI takes no query"));
        }
        let (host, p) = if let Some(v6) = auth.strip_prefix('[') {
            let (h, tail) = v6
                .split_once(']')
                .ok_or_else(|| format!("{name}: unterminated '[' in the host"))?;
            match tail.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None if tail.is_empty() => (h, None),
                None => return Err(format!("{name}: bad host")),
            }
        } else {
            match auth.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (auth, None),
            }
        };
        if host.is_empty() {
            return Err(format!("{name}: no host in the NBD URI"));
        }
        let port = match p {
            Some(p) => port(p, name)?,
            None => DEFAULT_PORT,
        };
        return Ok(Some(NbdTarget {
            addr: NbdAddr::Inet {
                host: host.to_string(),
                port,
            },
            export: percent_decode(path)?,
        }));
    }
    if let Some(rest) = name.strip_prefix("nbd+unix://") {
        let rest = rest.strip_prefix('/').ok_or_else(|| {
            format!("{name}: an nbd+unix URI has no host (nbd+unix:///EXPORT?socket=PATH)")
        })?;
        let (path, query) = rest
            .split_once('?')
            .ok_or_else(|| format!("{name}: missing '?socket=PATH'"))?;
        let mut socket = None;
        for kv in query.split('&') {
            match kv.split_once('=') {
                Some(("socket", v)) => socket = Some(percent_decode(v)?),
                _ => return Err(format!("{name}: unknown query parameter '{kv}'")),
            }
        }
        let socket = socket
            .filter(|s| !s.is_empty())
            .ok_or_else(|| format!("{name}: missing '?socket=PATH'"))?;
        return Ok(Some(NbdTarget {
            addr: NbdAddr::Unix(socket),
            export: percent_decode(path)?,
        }));
    }
    let Some(rest) = name.strip_prefix("nbd:") else {
        if name.starts_with("nbd+") {
            return Err(format!(
                "{name}: unknown NBD transport (nbd://, nbd+tcp://, nbd+unix://)"
            ));
        }
        return Ok(None);
    };
    // Legacy syntax: the export name is the last ':'-separated field.
    let (target, export) = match rest.split_once(":exportname=") {
        Some((t, e)) => (t, e.to_string()),
        None => (rest, String::new()),
    };
    if let Some(path) = target.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(format!("{name}: no socket path"));
        }
        return Ok(Some(NbdTarget {
            addr: NbdAddr::Unix(path.to_string()),
            export,
        }));
    }
    let (host, p) = target
        .rsplit_once(':')
        .ok_or_else(|| format!("{name}: expected nbd:HOST:PORT[:exportname=NAME]"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{name}: no host"));
    }
    Ok(Some(NbdTarget {
        addr: NbdAddr::Inet {
            host: host.to_string(),
            port: port(p, name)?,
        },
        export,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inet(h: &str, p: u16, e: &str) -> NbdTarget {
        NbdTarget {
            addr: NbdAddr::Inet {
                host: h.into(),
                port: p,
            },
            export: e.into(),
        }
    }

    #[test]
    fn forms() {
        assert_eq!(parse("disk.img").unwrap(), None);
        assert_eq!(
            parse("nbd://localhost:1234/disk").unwrap(),
            Some(inet("localhost", 1234, "disk"))
        );
        assert_eq!(parse("nbd://h").unwrap(), Some(inet("h", DEFAULT_PORT, "")));
        assert_eq!(
            parse("nbd://[::1]:99/a%20b").unwrap(),
            Some(inet("::1", 99, "a b"))
        );
        assert_eq!(
            parse("nbd+unix:///e?socket=/tmp/s.sock").unwrap(),
            Some(NbdTarget {
                addr: NbdAddr::Unix("/tmp/s.sock".into()),
                export: "e".into()
            })
        );
        assert_eq!(
            parse("nbd:127.0.0.1:10809:exportname=x").unwrap(),
            Some(inet("127.0.0.1", 10809, "x"))
        );
        assert_eq!(
            parse("nbd:unix:/run/s:exportname=y").unwrap(),
            Some(NbdTarget {
                addr: NbdAddr::Unix("/run/s".into()),
                export: "y".into()
            })
        );
        for bad in [
            "nbd://",
            "nbd://h:0/",
            "nbd://h:x/",
            "nbd+unix:///e",
            "nbd+unix://host/e?socket=/s",
            "nbd:h",
            "nbd:unix:",
            "nbd+foo://x",
            "nbd://h/%zz",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
