//! A fuzzing harness for QEMU's option grammar ([`crate::keyval`]), which
//! every option of every binary goes through (`-drive`, `-device`,
//! `-blockdev` in both its dotted and JSON forms, sizes and booleans).
//! The `keyval` cargo fuzz target under `fuzz/` calls [`keyval`], and
//! `block/tests/fuzz_corpus.rs` replays its corpus as a regular test.
//!
//! Properties: no input panics; the flat `key=value` split round-trips
//! (writing the pairs back with `,,` for commas parses to the same pairs);
//! a size that parses prints back as decimal to the same number; typed
//! access never panics on any tree the parser builds.

use crate::keyval::{self, Map, Options, Parser, Value};

/// Writes flat pairs back in the grammar: `,` in a value is doubled.
fn unparse(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", v.replace(',', ",,")))
        .collect::<Vec<_>>()
        .join(",")
}

/// Reads every key of `map` with each typed accessor in turn.
fn take_all(option: &str, map: Map) {
    let keys: Vec<String> = map.keys().cloned().collect();
    let mut o = Options::new(option, map);
    for (i, k) in keys.iter().enumerate() {
        let _ = match i % 7 {
            0 => o.take_str(k).map(drop),
            1 => o.take_bool(k).map(drop),
            2 => o.take_size(k, keyval::MIB).map(drop),
            3 => o.take_u64(k).map(drop),
            4 => o.take_enum(k, &["on", "off", "auto"]).map(drop),
            5 => o.take_object(k).map(|sub| {
                if let Some(sub) = sub {
                    let m = sub.map().clone();
                    take_all(option, m);
                }
            }),
            _ => o.take_child(k).map(drop),
        };
    }
    let _ = o.finish();
}

/// The first byte picks the grammar settings; the rest is the option text.
pub fn keyval(data: &[u8]) {
    let Some((&mode, text)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(text);
    let mut p = Parser::new("-fuzz").bare_flags(mode & 1 != 0);
    if mode & 2 != 0 {
        p = p.implied_key("driver");
    }
    if let Ok(pairs) = p.parse_flat(&text) {
        let again = Parser::new("-fuzz")
            .parse_flat(&unparse(&pairs))
            .expect("unparsed pairs parse");
        assert_eq!(again, pairs, "pairs do not round-trip");
    }
    let tree = if mode & 4 != 0 {
        keyval::parse_json_or_dotted("-fuzz", &text, None)
    } else {
        p.parse(&text)
    };
    if let Ok(map) = tree {
        // Every scalar in the tree through the scalar parsers.
        fn scalars(v: &Value, f: &mut dyn FnMut(&str)) {
            match v {
                Value::Str(s) => f(s),
                Value::Map(m) => m.values().for_each(|v| scalars(v, f)),
                Value::List(l) => l.iter().for_each(|v| scalars(v, f)),
                Value::Null => {}
            }
        }
        for v in map.values() {
            scalars(v, &mut |s| {
                let _ = keyval::parse_bool_str(s);
                let _ = keyval::parse_uint_str(s);
                let _ = keyval::parse_int_str(s);
                for unit in [1, keyval::MIB] {
                    if let Ok(n) = keyval::parse_size_str(s, unit) {
                        assert_eq!(
                            keyval::parse_size_str(&n.to_string(), 1),
                            Ok(n),
                            "size '{s}' does not print back"
                        );
                    }
                }
            });
        }
        take_all("-fuzz", map);
    }
    let _ = keyval::parse_json("-fuzz", &text);
}
