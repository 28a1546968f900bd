//! QEMU's `SNAPSHOT_PARAM`, how `qemu-img convert -l`, `qemu-img measure -l`
//! and `qemu-nbd -l` name an internal snapshot: `snapshot.id=ID`,
//! `snapshot.name=NAME`, both (each must match), or a bare word that is
//! an ID, else a name. Shared by `strata-img` and `strata-nbd`.

use block::keyval::{self, Value};

/// The node options that load the snapshot `text` names read-only (the
/// qcow2 driver's `x-load-snapshot`), or an error for the option `opt`.
pub fn node_options(opt: &str, text: &str) -> Result<Vec<(String, String)>, String> {
    if !text.starts_with("snapshot.") {
        return Ok(vec![("x-load-snapshot".into(), text.into())]);
    }
    let map = keyval::parse(opt, text, None).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for (k, v) in map {
        let Value::Map(sub) = v else {
            return Err(format!("Invalid parameter '{k}'"));
        };
        if k != "snapshot" {
            return Err(format!("Invalid parameter '{k}'"));
        }
        for (k2, v2) in sub {
            match (k2.as_str(), v2) {
                ("id" | "name", Value::Str(v2)) => {
                    out.push((format!("x-load-snapshot.{k2}"), v2));
                }
                _ => return Err(format!("Invalid parameter 'snapshot.{k2}'")),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::node_options;

    #[test]
    fn forms() {
        let o = |t| node_options("-l", t);
        assert_eq!(
            o("s1").unwrap(),
            vec![("x-load-snapshot".into(), "s1".into())]
        );
        assert_eq!(
            o("snapshot.id=2,snapshot.name=a,,b").unwrap(),
            vec![
                ("x-load-snapshot.id".to_string(), "2".to_string()),
                ("x-load-snapshot.name".to_string(), "a,b".to_string())
            ]
        );
        assert_eq!(
            o("snapshot.foo=1").unwrap_err(),
            "Invalid parameter 'snapshot.foo'"
        );
        assert!(o("snapshot.id=1,bar=2").is_err());
    }
}
