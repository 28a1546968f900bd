//! The `rbd:` file name, as QEMU's rbd driver reads it:
//! `rbd:POOL[/NAMESPACE]/IMAGE[@SNAPSHOT][:KEY=VALUE[:KEY=VALUE...]]`,
//! a backslash escaping the next character (so names may hold `:`, `@`
//! or `/`). `id` becomes `user=`, `conf` becomes `conf=`, and every other
//! pair is a Ceph setting, kept in order under QEMU's internal
//! `=keyvalue-pairs` option (a JSON list of keys and values).
//!
//! Compiled whether or not the driver itself is (it needs librbd): the
//! name is understood either way, and a build without librbd then says
//! what to install.

use crate::keyval::{Map, Value};

/// The option of the Ceph settings a file name carries.
pub const KEYVALUE_PAIRS: &str = "=keyvalue-pairs";

/// Split `s` at the first `delim` not escaped by a backslash: the part
/// before it, and the rest after it (if the delimiter was found).
fn next_tok(s: &str, delim: char) -> (&str, Option<&str>) {
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == delim {
            return (&s[..i], Some(&s[i + 1..]));
        }
    }
    (s, None)
}

/// Drop the escaping backslashes (`\\` stands for one backslash).
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The node options of `rbd:...` (`name` is the whole file name).
pub fn parse(name: &str) -> Result<Map, String> {
    let rest = name
        .strip_prefix("rbd:")
        .ok_or_else(|| format!("{name}: not an rbd file name"))?;
    let s = |v: String| Value::Str(v);
    let mut m = Map::new();
    m.insert("driver".into(), s("rbd".into()));
    let (pool, rest) = next_tok(rest, '/');
    let Some(rest) = rest else {
        return Err(format!("{name}: Pool name is required"));
    };
    if pool.is_empty() {
        return Err(format!("{name}: Pool name is required"));
    }
    m.insert("pool".into(), s(unescape(pool)));
    // The image ends at '@' (a snapshot follows) or at ':' (settings).
    let (image_part, snap, pairs) = {
        let (before_colon, after_colon) = next_tok(rest, ':');
        match next_tok(before_colon, '@') {
            (img, Some(snap)) => (img, Some(snap), after_colon),
            (img, None) => (img, None, after_colon),
        }
    };
    let (image, namespace) = match next_tok(image_part, '/') {
        (ns, Some(img)) => (img, Some(ns)),
        (img, None) => (img, None),
    };
    if image.is_empty() {
        return Err(format!("{name}: Image name is required"));
    }
    if let Some(ns) = namespace {
        m.insert("namespace".into(), s(unescape(ns)));
    }
    m.insert("image".into(), s(unescape(image)));
    if let Some(snap) = snap {
        m.insert("snapshot".into(), s(unescape(snap)));
    }
    let mut extra = Vec::new();
    let mut pairs = pairs;
    while let Some(p) = pairs {
        let (pair, next) = next_tok(p, ':');
        pairs = next;
        if pair.is_empty() {
            continue;
        }
        let (k, v) = next_tok(pair, '=');
        let Some(v) = v else {
            return Err(format!(
                "{name}: conf option '{}' has no value",
                unescape(k)
            ));
        };
        let (k, v) = (unescape(k), unescape(v));
        match k.as_str() {
            "id" => {
                m.insert("user".into(), s(v));
            }
            "conf" => {
                m.insert("conf".into(), s(v));
            }
            _ => {
                extra.push(Value::Str(k));
                extra.push(Value::Str(v));
            }
        }
    }
    if !extra.is_empty() {
        let json = serde_json::Value::Array(
            extra
                .into_iter()
                .map(|v| match v {
                    Value::Str(x) => serde_json::Value::String(x),
                    _ => serde_json::Value::Null,
                })
                .collect(),
        );
        m.insert(KEYVALUE_PAIRS.into(), s(json.to_string()));
    }
    Ok(m)
}

/// The Ceph settings of `=keyvalue-pairs` as (key, value) pairs.
pub fn settings(json: &str) -> Result<Vec<(String, String)>, String> {
    let v: Vec<String> =
        serde_json::from_str(json).map_err(|e| format!("{KEYVALUE_PAIRS}: {e}"))?;
    if !v.len().is_multiple_of(2) {
        return Err(format!("{KEYVALUE_PAIRS}: a key without a value"));
    }
    Ok(v.chunks(2).map(|c| (c[0].clone(), c[1].clone())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(m: &Map, k: &str) -> Option<String> {
        match m.get(k) {
            Some(Value::Str(s)) => Some(s.clone()),
            _ => None,
        }
    }

    #[test]
    fn pool_image_snapshot_and_settings() {
        let m = parse("rbd:rbd/disk1@snap:conf=/etc/c.conf:id=admin:rbd_cache=false").unwrap();
        assert_eq!(get(&m, "pool").as_deref(), Some("rbd"));
        assert_eq!(get(&m, "image").as_deref(), Some("disk1"));
        assert_eq!(get(&m, "snapshot").as_deref(), Some("snap"));
        assert_eq!(get(&m, "conf").as_deref(), Some("/etc/c.conf"));
        assert_eq!(get(&m, "user").as_deref(), Some("admin"));
        let pairs = settings(&get(&m, KEYVALUE_PAIRS).unwrap()).unwrap();
        assert_eq!(pairs, vec![("rbd_cache".into(), "false".into())]);
    }

    #[test]
    fn namespaces_and_escapes() {
        let m = parse("rbd:p/ns/img").unwrap();
        assert_eq!(get(&m, "namespace").as_deref(), Some("ns"));
        assert_eq!(get(&m, "image").as_deref(), Some("img"));
        let m = parse(r"rbd:p/we\:ird\@name:mon_host=1.2.3.4\:6789").unwrap();
        assert_eq!(get(&m, "image").as_deref(), Some("we:ird@name"));
        let pairs = settings(&get(&m, KEYVALUE_PAIRS).unwrap()).unwrap();
        assert_eq!(pairs, vec![("mon_host".into(), "1.2.3.4:6789".into())]);
    }

    #[test]
    fn missing_parts_are_named() {
        assert!(parse("rbd:img")
            .unwrap_err()
            .contains("Pool name is required"));
        assert!(parse("rbd:/img")
            .unwrap_err()
            .contains("Pool name is required"));
        assert!(parse("rbd:p/")
            .unwrap_err()
            .contains("Image name is required"));
        assert!(parse("rbd:p/i:conf").unwrap_err().contains("no value"));
        assert!(parse("rbd:p/i\\").is_ok());
    }
}
