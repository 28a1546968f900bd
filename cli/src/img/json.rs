//! A small JSON value with ordered keys and QEMU's pretty-printing layout
//! (`qobject_to_json_pretty`: four-space indent, empty containers printed
//! as an opening bracket, a newline and the closing bracket at the same
//! indent), so `strata-img ... --output=json` looks like `qemu-img`'s.

/// A JSON value with ordered object keys.
#[derive(Clone, Debug, PartialEq)]
pub enum J {
    Obj(Vec<(String, J)>),
    Arr(Vec<J>),
    Str(String),
    Int(i128),
    Bool(bool),
}

impl J {
    pub fn obj(items: Vec<(&str, J)>) -> J {
        J::Obj(items.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    }
    pub fn s(v: &str) -> J {
        J::Str(v.to_string())
    }
    pub fn u(v: u64) -> J {
        J::Int(v as i128)
    }
}

fn esc(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Pretty-print the way QEMU does.
pub fn pretty(v: &J) -> String {
    let mut out = String::new();
    pp(v, 0, &mut out);
    out
}

fn pp(v: &J, level: usize, out: &mut String) {
    let ind = |l: usize| "    ".repeat(l);
    match v {
        J::Obj(items) => {
            out.push('{');
            for (i, (k, val)) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push('\n');
                out.push_str(&ind(level + 1));
                out.push_str(&esc(k));
                out.push_str(": ");
                pp(val, level + 1, out);
            }
            out.push('\n');
            out.push_str(&ind(level));
            out.push('}');
        }
        J::Arr(items) => {
            out.push('[');
            for (i, val) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push('\n');
                out.push_str(&ind(level + 1));
                pp(val, level + 1, out);
            }
            out.push('\n');
            out.push_str(&ind(level));
            out.push(']');
        }
        _ => out.push_str(&compact(v)),
    }
}

/// Compact one-line form with `, ` and `: ` separators (as in `map`).
pub fn compact(v: &J) -> String {
    match v {
        J::Obj(items) => {
            let inner: Vec<String> = items
                .iter()
                .map(|(k, v)| format!("{}: {}", esc(k), compact(v)))
                .collect();
            format!("{{ {}}}", inner.join(", "))
        }
        J::Arr(items) => {
            let inner: Vec<String> = items.iter().map(compact).collect();
            format!("[{}]", inner.join(", "))
        }
        J::Str(s) => esc(s),
        J::Int(i) => i.to_string(),
        J::Bool(b) => b.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let v = J::obj(vec![
            ("a", J::Arr(vec![])),
            ("b", J::obj(vec![("c", J::obj(vec![]))])),
        ]);
        assert_eq!(
            pretty(&v),
            "{\n    \"a\": [\n    ],\n    \"b\": {\n        \"c\": {\n        }\n    }\n}"
        );
    }
}
