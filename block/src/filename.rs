//! Filenames with a protocol prefix, as QEMU parses them where a plain
//! file name is expected (`-drive file=`, `-hda`): `null-co://`,
//! `null-aio://`, `blkdebug:CONFIG:IMAGE`, `blkdebug::IMAGE`, the URLs of
//! the web protocols (`http://`, `https://`, `ftp://`, `ftps://`, the
//! whole name becoming `url=`), `rbd:POOL/IMAGE...` ([`crate::rbd_name`])
//! and the NBD
//! forms (`nbd://`, `nbd+unix://`, `nbd:HOST:PORT`, `nbd:unix:PATH`, see
//! [`crate::nbd::uri`]), `ssh://` ([`crate::ssh`]), `nfs://` ([`crate::nfs`]),
//! `iscsi://` ([`crate::iscsi::uri`]) and vvfat's
//! `fat:[floppy:][rw:][12|16|32:]DIR` ([`crate::vvfat::options`]). (`json:`
//! is handled by the `-drive` desugaring itself.) Each becomes the option
//! tree of the protocol node it names.
//!
//! A blkdebug CONFIG file is QEMU's blkdebug rule file: `[inject-error]`
//! sections of `key = "value"` lines (`event`, `errno`, `sector`, `once`,
//! `immediately`, `iotype`, `state`) and `[set-state]` sections (`event`,
//! `state`, `new_state`), `#` comments; they become the node's
//! `inject-error` and `set-state` lists. Other sections are refused.

use crate::error::{BlockError, BlockResult};
use crate::keyval::{Map, Value};

fn s(v: &str) -> Value {
    Value::Str(v.to_string())
}

/// The node options `name` stands for, if it has a protocol prefix.
pub fn parse(name: &str) -> BlockResult<Option<Map>> {
    let mut m = Map::new();
    if let Some(rest) = name.strip_prefix("null-co://") {
        m.insert("driver".into(), s("null-co"));
        no_path(name, rest)?;
        return Ok(Some(m));
    }
    if let Some(rest) = name.strip_prefix("null-aio://") {
        m.insert("driver".into(), s("null-aio"));
        no_path(name, rest)?;
        return Ok(Some(m));
    }
    if let Some(proto) = crate::curl::Proto::of_url(name) {
        m.insert("driver".into(), s(proto.name()));
        m.insert("url".into(), s(name));
        return Ok(Some(m));
    }
    if name.starts_with("rbd:") {
        if cfg!(not(have_rbd)) {
            return Err(BlockError::Open(format!(
                "{name}: this Strata was built without the rbd driver (install Debian's librbd-dev and librados-dev, then rebuild)"
            )));
        }
        return crate::rbd_name::parse(name)
            .map(Some)
            .map_err(BlockError::Open);
    }
    if crate::nbd::uri::is_nbd(name) {
        let t = crate::nbd::uri::parse(name)
            .map_err(BlockError::Open)?
            .ok_or_else(|| BlockError::Open(format!("{name}: not an NBD file name")))?;
        return Ok(Some(nbd_options(&t)));
    }
    if name.starts_with("ssh://") {
        return crate::ssh::uri_options(name)
            .map(Some)
            .map_err(BlockError::Open);
    }
    if name.starts_with("nfs://") {
        return crate::nfs::uri_options(name)
            .map(Some)
            .map_err(BlockError::Open);
    }
    if crate::iscsi::uri::is_iscsi(name) {
        return crate::iscsi::uri::parse(name)
            .map(|u| Some(iscsi_options(&u)))
            .map_err(BlockError::Open);
    }
    if name.starts_with("fat:") {
        return crate::vvfat::options::parse_filename(name)
            .map(Some)
            .map_err(BlockError::Open);
    }
    let Some(rest) = name.strip_prefix("blkdebug:") else {
        return Ok(None);
    };
    let (config, image) = rest.split_once(':').ok_or_else(|| {
        BlockError::Open(format!(
            "{name}: expected blkdebug:CONFIG:IMAGE (CONFIG may be empty)"
        ))
    })?;
    if image.is_empty() {
        return Err(BlockError::Open(format!("{name}: no image file name")));
    }
    m.insert("driver".into(), s("blkdebug"));
    let mut img = Map::new();
    // The image may itself carry a prefix (`blkdebug::null-co://`).
    match parse(image)? {
        Some(inner) => img = inner,
        None => {
            img.insert("driver".into(), s("file"));
            img.insert("filename".into(), s(image));
        }
    }
    m.insert("image".into(), Value::Map(img));
    if !config.is_empty() {
        let text = std::fs::read_to_string(config)
            .map_err(|e| BlockError::Open(format!("{name}: cannot read '{config}': {e}")))?;
        let (rules, states) =
            parse_rules(&text).map_err(|e| BlockError::Open(format!("{config}: {e}")))?;
        if !rules.is_empty() {
            m.insert("inject-error".into(), Value::List(rules));
        }
        if !states.is_empty() {
            m.insert("set-state".into(), Value::List(states));
        }
    }
    Ok(Some(m))
}

/// The `driver=nbd` options of an NBD file name.
fn nbd_options(t: &crate::nbd::uri::NbdTarget) -> Map {
    use crate::nbd::transport::NbdAddr;
    let mut server = Map::new();
    match &t.addr {
        NbdAddr::Inet { host, port } => {
            server.insert("type".into(), s("inet"));
            server.insert("host".into(), s(host));
            server.insert("port".into(), s(&port.to_string()));
        }
        NbdAddr::Unix(p) => {
            server.insert("type".into(), s("unix"));
            server.insert("path".into(), s(p));
        }
    }
    let mut m = Map::new();
    m.insert("driver".into(), s("nbd"));
    m.insert("server".into(), Value::Map(server));
    m.insert("export".into(), s(&t.export));
    m
}

/// The `driver=iscsi` options of an `iscsi://` URI (QEMU's
/// `iscsi_parse_filename`).
fn iscsi_options(u: &crate::iscsi::uri::IscsiUri) -> Map {
    let mut m = Map::new();
    m.insert("driver".into(), s("iscsi"));
    m.insert("transport".into(), s("tcp"));
    m.insert("portal".into(), s(&u.portal));
    m.insert("target".into(), s(&u.target));
    m.insert("lun".into(), s(&u.lun.to_string()));
    if let Some(user) = &u.user {
        m.insert("user".into(), s(user));
    }
    if let Some(p) = &u.password {
        m.insert("password".into(), s(p));
    }
    m
}

fn no_path(name: &str, rest: &str) -> BlockResult<()> {
    if rest.is_empty() {
        Ok(())
    } else {
        Err(BlockError::Open(format!(
            "{name}: the null driver takes no path after '//'"
        )))
    }
}

/// The `[inject-error]` and `[set-state]` rules of a blkdebug rule file.
fn parse_rules(text: &str) -> Result<(Vec<Value>, Vec<Value>), String> {
    let (mut rules, mut states) = (Vec::new(), Vec::new());
    // The section being read: its keys, and whether it is a set-state.
    let mut cur: Option<(Map, bool)> = None;
    let mut close = |cur: Option<(Map, bool)>| match cur {
        Some((m, false)) => rules.push(Value::Map(m)),
        Some((m, true)) => states.push(Value::Map(m)),
        None => {}
    };
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            close(cur.take());
            match section.trim() {
                "inject-error" => cur = Some((Map::new(), false)),
                "set-state" => cur = Some((Map::new(), true)),
                other => {
                    return Err(format!(
                        "line {}: section [{other}] is not supported",
                        n + 1
                    ))
                }
            }
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("line {}: expected key = \"value\"", n + 1))?;
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|x| x.strip_suffix('"'))
            .unwrap_or(v);
        let (rule, _) = cur
            .as_mut()
            .ok_or_else(|| format!("line {}: a key outside a section", n + 1))?;
        rule.insert(k.trim().to_string(), s(v));
    }
    close(cur);
    Ok((rules, states))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert_eq!(parse("disk.img").unwrap(), None);
        let m = parse("null-co://").unwrap().unwrap();
        assert_eq!(m["driver"], s("null-co"));
        let m = parse("null-aio://").unwrap().unwrap();
        assert_eq!(m["driver"], s("null-aio"));
        assert!(parse("null-co://x").is_err());
        let m = parse("blkdebug::disk.img").unwrap().unwrap();
        assert_eq!(m["driver"], s("blkdebug"));
        let Value::Map(img) = &m["image"] else {
            panic!()
        };
        assert_eq!(img["filename"], s("disk.img"));
        let m = parse("blkdebug::null-co://").unwrap().unwrap();
        let Value::Map(img) = &m["image"] else {
            panic!()
        };
        assert_eq!(img["driver"], s("null-co"));
        assert!(parse("blkdebug:nocolon").is_err());
        assert!(parse("blkdebug::").is_err());
        assert!(parse("blkdebug:/nonexistent.conf:x.img").is_err());
        let m = parse("nbd+unix:///e?socket=/s").unwrap().unwrap();
        assert_eq!(m["driver"], s("nbd"));
        assert_eq!(m["export"], s("e"));
        let Value::Map(srv) = &m["server"] else {
            panic!()
        };
        assert_eq!(srv["path"], s("/s"));
        assert!(parse("nbd:nohost").is_err());
    }

    #[test]
    fn rule_files() {
        let r = parse_rules(
            "# comment\n[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\n\n[inject-error]\nevent = \"write_aio\"\nonce = \"on\"\n",
        )
        .unwrap();
        assert_eq!((r.0.len(), r.1.len()), (2, 0));
        let Value::Map(first) = &r.0[0] else { panic!() };
        assert_eq!(first["event"], s("read_aio"));
        assert_eq!(first["errno"], s("5"));
        // ide-test's retry script: an error in state 1, which moves to 2.
        let (rules, states) = parse_rules(
            "[inject-error]\nevent = \"flush_to_disk\"\nstate = \"1\"\n[set-state]\nevent = \"flush_to_disk\"\nnew_state = \"2\"\n",
        )
        .unwrap();
        assert_eq!((rules.len(), states.len()), (1, 1));
        let Value::Map(st) = &states[0] else { panic!() };
        assert_eq!(st["new_state"], s("2"));
        assert!(parse_rules("[align]\nvalue = \"1\"\n").is_err());
        assert!(parse_rules("event = \"x\"\n").is_err());
        assert!(parse_rules("[inject-error]\nnonsense\n").is_err());
    }
}
