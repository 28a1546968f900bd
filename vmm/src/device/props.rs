//! Device properties: their types, their parsing, and the resolved set a
//! device is built from.
//!
//! Each device type declares its properties once ([`PropDef`]: name, type,
//! default, help). A `-device` option, a `-global` and a default are all
//! parsed here, by one parser per type on top of `block::keyval`'s integer,
//! size and boolean rules, so every device agrees on `0x10`, `on`/`off` and
//! `64K`. The error texts are QEMU's (`Parameter 'unit' expects uint32`).

use std::collections::BTreeMap;

use block::keyval::{parse_bool_str, parse_int_str, parse_size_str, parse_uint_str};

/// The type of a property, as `-device X,help` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PropType {
    Bool,
    /// `on`, `off` or `auto`.
    OnOffAuto,
    U8,
    U16,
    U32,
    U64,
    I32,
    /// A byte count with QEMU's suffixes (`4K`).
    Size,
    Str,
    /// One of a fixed set of words; `name` is what help prints.
    Enum {
        name: &'static str,
        values: &'static [&'static str],
    },
    /// A PCI address, `SLOT[.FUNCTION]` in hexadecimal (QEMU's
    /// `pci-devfn`).
    PciDevfn,
}

impl PropType {
    /// The name `-device X,help` shows (QEMU's QAPI type names).
    pub fn name(self) -> &'static str {
        match self {
            PropType::Bool => "bool",
            PropType::OnOffAuto => "OnOffAuto",
            PropType::U8 => "uint8",
            PropType::U16 => "uint16",
            PropType::U32 => "uint32",
            PropType::U64 => "uint64",
            PropType::I32 => "int32",
            PropType::Size => "size",
            PropType::Str => "str",
            PropType::Enum { name, .. } => name,
            PropType::PciDevfn => "int32",
        }
    }

    /// Parses `text` as a value of this type; the error is QEMU's.
    pub fn parse(self, key: &str, text: &str) -> Result<PropValue, String> {
        let expects = |what: &str| format!("Parameter '{key}' expects {what}");
        let uint = |max: u64| {
            parse_uint_str(text)
                .filter(|&v| v <= max)
                .map(PropValue::Uint)
                .ok_or_else(|| expects(self.name()))
        };
        match self {
            PropType::Bool => parse_bool_str(text)
                .map(PropValue::Bool)
                .ok_or_else(|| expects("'on' or 'off'")),
            PropType::OnOffAuto => match text {
                "auto" => Ok(PropValue::Auto),
                _ => parse_bool_str(text)
                    .map(PropValue::Bool)
                    .ok_or_else(|| format!("Parameter '{key}' does not accept value '{text}'")),
            },
            PropType::U8 => uint(u8::MAX as u64),
            PropType::U16 => uint(u16::MAX as u64),
            PropType::U32 => uint(u32::MAX as u64),
            PropType::U64 => uint(u64::MAX),
            PropType::I32 => parse_int_str(text)
                .filter(|v| i32::try_from(*v).is_ok())
                .map(PropValue::Int)
                .ok_or_else(|| expects("int32")),
            PropType::Size => parse_size_str(text, 1)
                .map(PropValue::Uint)
                .map_err(|_| expects("a size value")),
            PropType::Str => Ok(PropValue::Str(text.to_string())),
            PropType::Enum { values, .. } => {
                if values.contains(&text) {
                    Ok(PropValue::Str(text.to_string()))
                } else {
                    Err(format!("Parameter '{key}' does not accept value '{text}'"))
                }
            }
            PropType::PciDevfn => parse_devfn(text)
                .map(|(s, f)| PropValue::Devfn(s, f))
                .ok_or_else(|| format!("Property '{key}' doesn't take value '{text}'")),
        }
    }
}

/// `SLOT[.FUNCTION]`, both hexadecimal (an optional `0x`), slot < 32 and
/// function < 8.
fn parse_devfn(text: &str) -> Option<(u8, u8)> {
    let (slot, func) = text.split_once('.').unwrap_or((text, "0"));
    let hex = |x: &str| {
        let x = x
            .strip_prefix("0x")
            .or_else(|| x.strip_prefix("0X"))
            .unwrap_or(x);
        if x.is_empty() || x.len() > 2 {
            return None;
        }
        u8::from_str_radix(x, 16).ok()
    };
    match (hex(slot)?, hex(func)?) {
        (s, f) if s < 32 && f < 8 => Some((s, f)),
        _ => None,
    }
}

/// A parsed property value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PropValue {
    Bool(bool),
    /// `auto` of an [`PropType::OnOffAuto`].
    Auto,
    Uint(u64),
    Int(i64),
    Str(String),
    Devfn(u8, u8),
}

/// What happens to a property QEMU still accepts but Strata (and often
/// QEMU itself) does nothing with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Use {
    /// The device uses it.
    Used,
    /// Accepted and ignored without a word.
    Ignored,
    /// Accepted and ignored; setting it prints this warning (as QEMU does).
    Warn(&'static str),
}

/// One property of a device type.
#[derive(Clone, Copy, Debug)]
pub struct PropDef {
    pub name: &'static str,
    pub ty: PropType,
    /// The default as text (parsed with `ty`), or none.
    pub default: Option<&'static str>,
    pub help: &'static str,
    pub usage: Use,
}

impl PropDef {
    pub const fn new(name: &'static str, ty: PropType, help: &'static str) -> Self {
        PropDef {
            name,
            ty,
            default: None,
            help,
            usage: Use::Used,
        }
    }
    pub const fn default(mut self, text: &'static str) -> Self {
        self.default = Some(text);
        self
    }
    pub const fn ignored(mut self) -> Self {
        self.usage = Use::Ignored;
        self
    }
    pub const fn warn(mut self, msg: &'static str) -> Self {
        self.usage = Use::Warn(msg);
        self
    }

    /// One line of `-device X,help`.
    pub fn help_line(&self) -> String {
        let head = format!("{}=<{}>", self.name, self.ty.name());
        let mut tail = self.help.to_string();
        if let Some(d) = self.default {
            let shown = match self.ty {
                PropType::Str | PropType::Enum { .. } | PropType::OnOffAuto => {
                    format!("\"{d}\"")
                }
                PropType::Bool => d.to_string(),
                _ => d.to_string(),
            };
            if !tail.is_empty() {
                tail.push(' ');
            }
            tail.push_str(&format!("(default: {shown})"));
        }
        if tail.is_empty() {
            format!("  {head}")
        } else {
            format!("  {head:<24} - {tail}")
        }
    }
}

/// The properties of one device instance after `-global` and the type's
/// defaults were applied: what its constructor reads.
#[derive(Clone, Debug, Default)]
pub struct Props {
    values: BTreeMap<&'static str, PropValue>,
}

impl Props {
    /// Defaults, then globals, then the device's own values.
    pub fn resolve(
        defs: &[PropDef],
        globals: impl Iterator<Item = (&'static str, PropValue)>,
        own: &BTreeMap<&'static str, PropValue>,
    ) -> Props {
        let mut values = BTreeMap::new();
        for d in defs {
            if let Some(t) = d.default {
                // Defaults are checked by a unit test over every table.
                if let Ok(v) = d.ty.parse(d.name, t) {
                    values.insert(d.name, v);
                }
            }
        }
        values.extend(globals);
        values.extend(own.iter().map(|(k, v)| (*k, v.clone())));
        Props { values }
    }

    pub fn str(&self, name: &str) -> Option<&str> {
        match self.values.get(name) {
            Some(PropValue::Str(s)) => Some(s),
            _ => None,
        }
    }

    pub fn bool(&self, name: &str) -> bool {
        matches!(self.values.get(name), Some(PropValue::Bool(true)))
    }

    /// `Some(on)` for on/off, `None` for auto (or unset).
    pub fn on_off_auto(&self, name: &str) -> Option<bool> {
        match self.values.get(name) {
            Some(PropValue::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    pub fn uint(&self, name: &str) -> Option<u64> {
        match self.values.get(name) {
            Some(PropValue::Uint(v)) => Some(*v),
            _ => None,
        }
    }

    pub fn int(&self, name: &str) -> Option<i64> {
        match self.values.get(name) {
            Some(PropValue::Int(v)) => Some(*v),
            Some(PropValue::Uint(v)) => i64::try_from(*v).ok(),
            _ => None,
        }
    }

    /// The value as `qom-get` answers it (a PCI address as its devfn
    /// number, `auto` as the string).
    pub fn json(&self, name: &str) -> Option<serde_json::Value> {
        use serde_json::json;
        Some(match self.values.get(name)? {
            PropValue::Bool(b) => json!(b),
            PropValue::Auto => json!("auto"),
            PropValue::Uint(v) => json!(v),
            PropValue::Int(v) => json!(v),
            PropValue::Str(s) => json!(s),
            PropValue::Devfn(s, f) => json!((*s as u32) << 3 | *f as u32),
        })
    }

    pub fn devfn(&self, name: &str) -> Option<(u8, u8)> {
        match self.values.get(name) {
            Some(PropValue::Devfn(s, f)) => Some((*s, *f)),
            _ => None,
        }
    }
}

/// `rerror=`/`werror=` of block devices (QEMU's BlockdevOnError); `auto`
/// keeps what the drive says. Applied when the device claims its drive.
pub const ON_ERROR: PropType = PropType::Enum {
    name: "BlockdevOnError",
    values: &["report", "ignore", "enospc", "stop", "auto"],
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_parses_with_qemus_errors() {
        let p = |t: PropType, s: &str| t.parse("k", s);
        assert_eq!(p(PropType::U32, "0x10"), Ok(PropValue::Uint(16)));
        assert_eq!(p(PropType::U32, "0X10"), Ok(PropValue::Uint(16)));
        assert_eq!(p(PropType::U32, "010"), Ok(PropValue::Uint(8)));
        assert_eq!(
            p(PropType::U32, "4294967296"),
            Err("Parameter 'k' expects uint32".into())
        );
        assert_eq!(
            p(PropType::U8, "256"),
            Err("Parameter 'k' expects uint8".into())
        );
        assert_eq!(
            p(PropType::U16, "x"),
            Err("Parameter 'k' expects uint16".into())
        );
        assert_eq!(p(PropType::I32, "-1"), Ok(PropValue::Int(-1)));
        assert_eq!(
            p(PropType::I32, "2147483648"),
            Err("Parameter 'k' expects int32".into())
        );
        assert_eq!(p(PropType::Bool, "yes"), Ok(PropValue::Bool(true)));
        assert_eq!(
            p(PropType::Bool, "maybe"),
            Err("Parameter 'k' expects 'on' or 'off'".into())
        );
        assert_eq!(p(PropType::OnOffAuto, "auto"), Ok(PropValue::Auto));
        assert_eq!(p(PropType::OnOffAuto, "off"), Ok(PropValue::Bool(false)));
        assert!(p(PropType::OnOffAuto, "x").is_err());
        assert_eq!(p(PropType::Size, "4K"), Ok(PropValue::Uint(4096)));
        assert!(p(PropType::Size, "4Q").is_err());
        let e = PropType::Enum {
            name: "T",
            values: &["a", "b"],
        };
        assert_eq!(p(e, "b"), Ok(PropValue::Str("b".into())));
        assert_eq!(
            p(e, "c"),
            Err("Parameter 'k' does not accept value 'c'".into())
        );
        assert_eq!(p(PropType::PciDevfn, "5"), Ok(PropValue::Devfn(5, 0)));
        assert_eq!(p(PropType::PciDevfn, "0x1f.7"), Ok(PropValue::Devfn(31, 7)));
        assert_eq!(p(PropType::PciDevfn, "1a.2"), Ok(PropValue::Devfn(26, 2)));
        for bad in ["20", "1.8", "", "x", "1.", "100"] {
            assert!(p(PropType::PciDevfn, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn own_values_beat_globals_beat_defaults() {
        const DEFS: &[PropDef] = &[
            PropDef::new("a", PropType::U32, "").default("1"),
            PropDef::new("b", PropType::U32, "").default("2"),
            PropDef::new("c", PropType::U32, "").default("3"),
        ];
        let mut own = BTreeMap::new();
        own.insert("a", PropValue::Uint(10));
        let globals = vec![("a", PropValue::Uint(20)), ("b", PropValue::Uint(30))];
        let p = Props::resolve(DEFS, globals.into_iter(), &own);
        assert_eq!(p.uint("a"), Some(10));
        assert_eq!(p.uint("b"), Some(30));
        assert_eq!(p.uint("c"), Some(3));
    }
}
