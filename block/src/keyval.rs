//! QEMU's `key=value` option grammar, shared by every option in the project.
//!
//! Follows QEMU's `util/keyval.c` grammar (and the legacy QemuOpts habits that
//! `-drive`/`-device` users rely on), as documented in QEMU's
//! `docs/devel/qapi-code-gen` and the `qemu(1)` man page:
//!
//! * `key=value` pairs separated by `,`; a `,,` inside a value is a literal `,`.
//! * An optional *implied key*: when the first element has no `=`, it is the
//!   value of a named key (`-m 512` is `size=512`, `-smp 4,cores=2` is
//!   `cpus=4,cores=2`, `-machine pc,accel=kvm` is `type=pc,accel=kvm`).
//! * Dotted keys build nested objects: `file.driver=file,file.filename=x`
//!   yields `{ "file": { "driver": "file", "filename": "x" } }`. Objects whose
//!   keys are exactly `0..n` become lists, as QEMU's `keyval_listify` does.
//! * In QemuOpts mode ([`Parser::bare_flags`]) a bare `key` means `key=on`.
//! * The JSON form (`-blockdev '{"driver":"raw",...}'`) converts into the
//!   same tree ([`parse_json`]): scalars become strings (`true` -> `"on"`,
//!   numbers -> decimal text), `null` stays [`Value::Null`], so the JSON and
//!   dotted forms of one `-blockdev` produce equal trees.
//!
//! Typed access goes through [`Options`], which consumes keys as they are
//! read so that [`Options::finish`] can reject unknown ones. Helpers
//! [`parse_bool`] and [`parse_size`] implement QEMU's `on/off` and size-suffix
//! rules (`qemu_strtosz`). Every error is a [`KeyvalError`] whose `Display` is
//! one line naming the option and the key.

use std::collections::BTreeMap;
use thiserror::Error;

/// A parsed option tree: keys to values.
pub type Map = BTreeMap<String, Value>;

/// One value of an option tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// A scalar, always kept as text (typed when read).
    Str(String),
    /// JSON `null` (in dotted form: an empty value where a reference-or-null
    /// is expected is read as null by [`Options::take_child`]).
    Null,
    /// A nested object.
    Map(Map),
    /// A list (`a.0=x,a.1=y` or a JSON array).
    List(Vec<Value>),
}

impl Value {
    /// The scalar text, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    fn kind(&self) -> &'static str {
        match self {
            Value::Str(_) => "a scalar",
            Value::Null => "null",
            Value::Map(_) => "an object",
            Value::List(_) => "a list",
        }
    }
}

/// Errors of the option grammar and of typed option access.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyvalError {
    /// A key fragment is empty or has characters outside `[A-Za-z0-9_-]`.
    #[error("{option}: invalid parameter name '{key}'")]
    InvalidKey { option: String, key: String },
    /// `key` without `=` where no implied key or flag is allowed.
    #[error("{option}: expected '=' after parameter '{key}'")]
    MissingEquals { option: String, key: String },
    /// `a=1,a.b=2`: a key is used both as a scalar and as an object.
    #[error("{option}: parameters '{key}' and '{key}.*' conflict")]
    Conflict { option: String, key: String },
    /// A value does not have the expected type or syntax.
    #[error("{option}: parameter '{key}' expects {expected}, got '{value}'")]
    InvalidValue {
        option: String,
        key: String,
        expected: String,
        value: String,
    },
    /// A mandatory key is absent.
    #[error("{option}: parameter '{key}' is missing")]
    Missing { option: String, key: String },
    /// A key nobody consumed.
    #[error("{option}: invalid parameter '{key}'")]
    Unknown { option: String, key: String },
    /// The JSON form did not parse, or is not an object.
    #[error("{option}: invalid JSON: {msg}")]
    Json { option: String, msg: String },
}

/// Error from [`parse_size_str`], without option context.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SizeError {
    #[error("not a size")]
    Invalid,
    #[error("size too large")]
    Overflow,
}

/// Grammar settings for one option.
#[derive(Clone, Debug)]
pub struct Parser<'a> {
    option: &'a str,
    implied_key: Option<&'a str>,
    bare_flags: bool,
}

impl<'a> Parser<'a> {
    /// A parser for option `option` (used in error messages, e.g. `-drive`).
    pub fn new(option: &'a str) -> Self {
        Parser {
            option,
            implied_key: None,
            bare_flags: false,
        }
    }
    /// The first element, if it has no `=`, is the value of `key`.
    pub fn implied_key(mut self, key: &'a str) -> Self {
        self.implied_key = Some(key);
        self
    }
    /// QemuOpts style: a bare `key` (not first, or without implied key)
    /// means `key=on`.
    pub fn bare_flags(mut self, on: bool) -> Self {
        self.bare_flags = on;
        self
    }

    /// Parse `input` into a tree.
    pub fn parse(&self, input: &str) -> Result<Map, KeyvalError> {
        let pairs = self.parse_flat(input)?;
        self.build(pairs)
    }

    /// Build a tree from flat `(dotted key, value)` pairs, in order.
    pub fn build(&self, pairs: Vec<(String, String)>) -> Result<Map, KeyvalError> {
        let mut root = Map::new();
        for (key, value) in pairs {
            self.insert(&mut root, &key, value)?;
        }
        listify(self.option, &mut root, "")?;
        Ok(root)
    }

    /// Split `input` into `(key, value)` pairs without building the tree
    /// (QemuOpts' flat view, where `file=x` and `file.locking=off` coexist).
    pub fn parse_flat(&self, input: &str) -> Result<Vec<(String, String)>, KeyvalError> {
        let mut pairs = Vec::new();
        let mut rest = input;
        let mut first = true;
        while !rest.is_empty() {
            // Key: up to '=' or ','.
            let key_end = rest.find(['=', ',']).unwrap_or(rest.len());
            let has_eq = rest[key_end..].starts_with('=');
            let (key, value);
            if !has_eq {
                if first && self.implied_key.is_some() {
                    let (v, r) = scan_value(rest);
                    key = self.implied_key.unwrap_or_default().to_string();
                    value = v;
                    rest = r;
                } else if self.bare_flags && key_end > 0 {
                    key = rest[..key_end].to_string();
                    value = "on".to_string();
                    rest = rest[key_end..].strip_prefix(',').unwrap_or("");
                } else {
                    return Err(KeyvalError::MissingEquals {
                        option: self.option.into(),
                        key: rest[..key_end].into(),
                    });
                }
            } else {
                key = rest[..key_end].to_string();
                let (v, r) = scan_value(&rest[key_end + 1..]);
                value = v;
                rest = r;
            }
            first = false;
            pairs.push((key, value));
        }
        Ok(pairs)
    }

    fn insert(&self, root: &mut Map, key: &str, value: String) -> Result<(), KeyvalError> {
        let frags: Vec<&str> = key.split('.').collect();
        for f in &frags {
            if f.is_empty()
                || !f
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(KeyvalError::InvalidKey {
                    option: self.option.into(),
                    key: key.into(),
                });
            }
        }
        let mut cur = root;
        for (i, f) in frags[..frags.len() - 1].iter().enumerate() {
            let entry = cur
                .entry((*f).to_string())
                .or_insert_with(|| Value::Map(Map::new()));
            match entry {
                Value::Map(m) => cur = m,
                _ => {
                    return Err(KeyvalError::Conflict {
                        option: self.option.into(),
                        key: frags[..=i].join("."),
                    })
                }
            }
        }
        let last = frags[frags.len() - 1];
        if let Some(Value::Map(_)) = cur.get(last) {
            return Err(KeyvalError::Conflict {
                option: self.option.into(),
                key: key.into(),
            });
        }
        cur.insert(last.to_string(), Value::Str(value));
        Ok(())
    }
}

/// Scan a value up to a single `,`; `,,` is a literal comma.
fn scan_value(s: &str) -> (String, &str) {
    let mut out = String::new();
    let mut rest = s;
    loop {
        match rest.find(',') {
            None => {
                out.push_str(rest);
                return (out, "");
            }
            Some(i) => {
                out.push_str(&rest[..i]);
                if rest[i + 1..].starts_with(',') {
                    out.push(',');
                    rest = &rest[i + 2..];
                } else {
                    return (out, &rest[i + 1..]);
                }
            }
        }
    }
}

/// Turn objects whose keys are all decimal indices into lists
/// (QEMU's `keyval_listify`): the indices must be exactly `0..n`.
fn listify(option: &str, map: &mut Map, prefix: &str) -> Result<(), KeyvalError> {
    for (k, v) in map.iter_mut() {
        if let Value::Map(m) = v {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            listify(option, m, &path)?;
            let numeric = m
                .keys()
                .filter(|k| k.bytes().all(|b| b.is_ascii_digit()))
                .count();
            if numeric == 0 {
                continue;
            }
            if numeric != m.len() {
                return Err(KeyvalError::Conflict {
                    option: option.into(),
                    key: path,
                });
            }
            let mut items: Vec<(usize, Value)> = Vec::with_capacity(m.len());
            for (ik, iv) in std::mem::take(m) {
                let idx = ik.parse::<usize>().map_err(|_| KeyvalError::InvalidKey {
                    option: option.into(),
                    key: format!("{path}.{ik}"),
                })?;
                items.push((idx, iv));
            }
            items.sort_by_key(|(i, _)| *i);
            for (pos, (idx, _)) in items.iter().enumerate() {
                if *idx != pos {
                    return Err(KeyvalError::Missing {
                        option: option.into(),
                        key: format!("{path}.{pos}"),
                    });
                }
            }
            *v = Value::List(items.into_iter().map(|(_, v)| v).collect());
        }
    }
    Ok(())
}

/// Parse `input` with implied key `implied_key` (convenience for
/// `Parser::new(option).implied_key(..).parse(input)`).
pub fn parse(option: &str, input: &str, implied_key: Option<&str>) -> Result<Map, KeyvalError> {
    let mut p = Parser::new(option);
    if let Some(k) = implied_key {
        p = p.implied_key(k);
    }
    p.parse(input)
}

/// Convert the JSON form of an option (`{"driver":"raw",...}`) into a tree
/// equal to the one the dotted form builds.
pub fn parse_json(option: &str, input: &str) -> Result<Map, KeyvalError> {
    let v: serde_json::Value = serde_json::from_str(input).map_err(|e| KeyvalError::Json {
        option: option.into(),
        msg: e.to_string(),
    })?;
    match json_to_value(v) {
        Value::Map(m) => Ok(m),
        other => Err(KeyvalError::Json {
            option: option.into(),
            msg: format!("expected an object, got {}", other.kind()),
        }),
    }
}

/// The tree of a `json:{...}` file name. QEMU flattens it and crumples
/// it back, so dotted keys (`"file.filename": ...`,
/// `"encrypt.key-secret": ...`) mean the nested objects, merged with
/// nested ones spelled out; unlike `-blockdev`'s strict JSON.
pub fn parse_json_filename(option: &str, input: &str) -> Result<Map, KeyvalError> {
    crumple(option, parse_json(option, input)?)
}

fn crumple(option: &str, m: Map) -> Result<Map, KeyvalError> {
    let mut out = Map::new();
    for (k, v) in m {
        let v = match v {
            Value::Map(inner) => Value::Map(crumple(option, inner)?),
            v => v,
        };
        let mut parts: Vec<&str> = k.split('.').collect();
        let last = parts.pop().unwrap_or_default();
        let mut at = &mut out;
        for (i, p) in parts.iter().enumerate() {
            let slot = at
                .entry(p.to_string())
                .or_insert_with(|| Value::Map(Map::new()));
            at = match slot {
                Value::Map(next) => next,
                _ => {
                    return Err(KeyvalError::Conflict {
                        option: option.into(),
                        key: parts[..=i].join("."),
                    })
                }
            };
        }
        match (at.get_mut(last), v) {
            (Some(Value::Map(d)), Value::Map(s)) => merge(d, s),
            (Some(_), _) => {
                return Err(KeyvalError::Conflict {
                    option: option.into(),
                    key: k.clone(),
                })
            }
            (None, v) => {
                at.insert(last.to_string(), v);
            }
        }
    }
    Ok(out)
}

fn json_to_value(v: serde_json::Value) -> Value {
    use serde_json::Value as J;
    match v {
        J::Null => Value::Null,
        J::Bool(b) => Value::Str(if b { "on" } else { "off" }.into()),
        J::Number(n) => Value::Str(n.to_string()),
        J::String(s) => Value::Str(s),
        J::Array(a) => Value::List(a.into_iter().map(json_to_value).collect()),
        J::Object(o) => Value::Map(o.into_iter().map(|(k, v)| (k, json_to_value(v))).collect()),
    }
}

/// Parse an option that, like `-blockdev`, accepts either the JSON form
/// (input starting with `{`) or the dotted key=value form.
pub fn parse_json_or_dotted(
    option: &str,
    input: &str,
    implied_key: Option<&str>,
) -> Result<Map, KeyvalError> {
    if input.trim_start().starts_with('{') {
        parse_json(option, input)
    } else {
        parse(option, input, implied_key)
    }
}

/// QEMU's boolean spellings: `on/yes/true/y` and `off/no/false/n`.
pub fn parse_bool_str(s: &str) -> Option<bool> {
    match s {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// QEMU's integer spelling for properties and numeric options
/// (`qemu_strtou64` with base 0): `0x`/`0X` hexadecimal, a leading `0`
/// octal, otherwise decimal; no sign, no suffix, no surrounding blanks.
/// The one integer parser of the project: device properties, `-global`,
/// `-smp` and `-drive` all read integers through it, so they agree.
pub fn parse_uint_str(s: &str) -> Option<u64> {
    let (digits, radix) = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (h, 16)
    } else if s.len() > 1 && s.starts_with('0') {
        (&s[1..], 8)
    } else {
        (s, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

/// [`parse_uint_str`] for signed values: an optional `-` in front.
pub fn parse_int_str(s: &str) -> Option<i64> {
    match s.strip_prefix('-') {
        Some(rest) => {
            let v = parse_uint_str(rest)?;
            0i64.checked_sub_unsigned(v)
        }
        None => i64::try_from(parse_uint_str(s)?).ok(),
    }
}

/// Parse a boolean for `option`/`key`, with a one-line error.
pub fn parse_bool(option: &str, key: &str, value: &str) -> Result<bool, KeyvalError> {
    parse_bool_str(value).ok_or_else(|| KeyvalError::InvalidValue {
        option: option.into(),
        key: key.into(),
        expected: "'on' or 'off'".into(),
        value: value.into(),
    })
}

/// Byte multipliers.
pub const KIB: u64 = 1 << 10;
/// Mebibyte.
pub const MIB: u64 = 1 << 20;
/// Gibibyte.
pub const GIB: u64 = 1 << 30;

/// Parse a size as `qemu_strtosz` does: a decimal (optionally fractional) or
/// `0x` hexadecimal number and an optional case-insensitive suffix
/// `B K M G T P E` (powers of 1024). A bare number is multiplied by
/// `default_unit` (1 for bytes, [`MIB`] for `-m`). Fractions of a byte are
/// refused, as are results that do not fit in a `u64`.
pub fn parse_size_str(s: &str, default_unit: u64) -> Result<u64, SizeError> {
    let s = s.trim();
    let (num_part, suffix) =
        if let Some(body) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            // Hex digits include B and E, so only K M G T P can follow a hex number.
            let end = body
                .char_indices()
                .find(|(_, c)| !c.is_ascii_hexdigit())
                .map(|(i, _)| i)
                .unwrap_or(body.len());
            (&s[..2 + end], &body[end..])
        } else {
            let end = s
                .char_indices()
                .find(|(_, c)| c.is_ascii_alphabetic())
                .map(|(i, _)| i)
                .unwrap_or(s.len());
            (&s[..end], &s[end..])
        };
    let mul = match suffix {
        "" => default_unit,
        "b" | "B" => 1,
        "k" | "K" => 1 << 10,
        "m" | "M" => 1 << 20,
        "g" | "G" => 1 << 30,
        "t" | "T" => 1 << 40,
        "p" | "P" => 1 << 50,
        "e" | "E" => 1 << 60,
        _ => return Err(SizeError::Invalid),
    };
    if num_part.is_empty() {
        return Err(SizeError::Invalid);
    }
    if let Some(hex) = num_part
        .strip_prefix("0x")
        .or_else(|| num_part.strip_prefix("0X"))
    {
        if hex.is_empty() {
            return Err(SizeError::Invalid);
        }
        let v = u64::from_str_radix(hex, 16).map_err(|_| SizeError::Overflow)?;
        return v.checked_mul(mul).ok_or(SizeError::Overflow);
    }
    let (int_s, frac_s) = match num_part.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num_part, ""),
    };
    if int_s.is_empty() || !int_s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SizeError::Invalid);
    }
    if !frac_s.bytes().all(|b| b.is_ascii_digit()) || (num_part.contains('.') && frac_s.is_empty())
    {
        return Err(SizeError::Invalid);
    }
    let int: u64 = int_s.parse().map_err(|_| SizeError::Overflow)?;
    let mut total = int.checked_mul(mul).ok_or(SizeError::Overflow)?;
    if frac_s.bytes().any(|b| b != b'0') {
        if mul == 1 {
            return Err(SizeError::Invalid);
        }
        // fraction * mul, computed exactly on up to 18 digits, rounded down.
        let digits = &frac_s[..frac_s.len().min(18)];
        let f: u128 = digits.parse().map_err(|_| SizeError::Invalid)?;
        let scale = 10u128.pow(digits.len() as u32);
        let add = (f * mul as u128) / scale;
        total = total.checked_add(add as u64).ok_or(SizeError::Overflow)?;
    }
    Ok(total)
}

/// Parse a size for `option`/`key`, with a one-line error.
pub fn parse_size(
    option: &str,
    key: &str,
    value: &str,
    default_unit: u64,
) -> Result<u64, KeyvalError> {
    parse_size_str(value, default_unit).map_err(|e| KeyvalError::InvalidValue {
        option: option.into(),
        key: key.into(),
        expected: match e {
            SizeError::Invalid => "a size (e.g. 512, 64K, 1.5G)".into(),
            SizeError::Overflow => "a size that fits in 64 bits".into(),
        },
        value: value.into(),
    })
}

/// A child given either by reference (a node-name string), inline (an
/// object), or explicitly absent (`null`, or an empty string in dotted form).
#[derive(Debug)]
pub enum ChildRef {
    /// `file=node-name`
    Reference(String),
    /// `file.driver=...` or `"file": {...}`
    Inline(Options),
    /// `backing: null` / `backing=`
    Null,
}

/// Typed, consuming access to an option tree, for one option or sub-object.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Options {
    option: String,
    prefix: String,
    map: Map,
}

impl Options {
    /// Wrap a parsed tree for `option`.
    pub fn new(option: &str, map: Map) -> Self {
        Options {
            option: option.into(),
            prefix: String::new(),
            map,
        }
    }
    /// The option name used in errors.
    pub fn option(&self) -> &str {
        &self.option
    }
    /// The dotted path of this sub-object inside the option ("" at the top).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    /// The dotted path of `key` inside the option.
    pub fn path(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.into()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }
    /// The remaining (unconsumed) tree.
    pub fn map(&self) -> &Map {
        &self.map
    }
    /// The remaining (unconsumed) tree, by value.
    pub fn into_map(self) -> Map {
        self.map
    }
    /// True if `key` is present and not yet consumed.
    pub fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }
    /// Build an error for `key` with the expected form.
    pub fn invalid(&self, key: &str, expected: &str, value: &str) -> KeyvalError {
        KeyvalError::InvalidValue {
            option: self.option.clone(),
            key: self.path(key),
            expected: expected.into(),
            value: value.into(),
        }
    }
    /// Take a scalar string.
    pub fn take_str(&mut self, key: &str) -> Result<Option<String>, KeyvalError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Str(s)) => Ok(Some(s)),
            Some(other) => Err(self.invalid(key, "a scalar", other.kind())),
        }
    }
    /// Take a mandatory scalar string.
    pub fn require_str(&mut self, key: &str) -> Result<String, KeyvalError> {
        self.take_str(key)?.ok_or_else(|| KeyvalError::Missing {
            option: self.option.clone(),
            key: self.path(key),
        })
    }
    /// Take a boolean (`on/off/yes/no/true/false`).
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>, KeyvalError> {
        match self.take_str(key)? {
            None => Ok(None),
            Some(s) => parse_bool(&self.option, &self.path(key), &s).map(Some),
        }
    }
    /// Take a size with suffixes; a bare number is multiplied by `default_unit`.
    pub fn take_size(&mut self, key: &str, default_unit: u64) -> Result<Option<u64>, KeyvalError> {
        match self.take_str(key)? {
            None => Ok(None),
            Some(s) => parse_size(&self.option, &self.path(key), &s, default_unit).map(Some),
        }
    }
    /// Take a plain unsigned integer (no suffix; [`parse_uint_str`]).
    pub fn take_u64(&mut self, key: &str) -> Result<Option<u64>, KeyvalError> {
        match self.take_str(key)? {
            None => Ok(None),
            Some(s) => parse_uint_str(&s)
                .map(Some)
                .ok_or_else(|| self.invalid(key, "a non-negative integer", &s)),
        }
    }
    /// Take one of a fixed set of words.
    pub fn take_enum(
        &mut self,
        key: &str,
        allowed: &[&str],
    ) -> Result<Option<String>, KeyvalError> {
        match self.take_str(key)? {
            None => Ok(None),
            Some(s) if allowed.contains(&s.as_str()) => Ok(Some(s)),
            Some(s) => Err(self.invalid(key, &format!("one of {}", allowed.join(", ")), &s)),
        }
    }
    /// Take a sub-object as its own [`Options`] (absent key: `None`).
    pub fn take_object(&mut self, key: &str) -> Result<Option<Options>, KeyvalError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Map(m)) => Ok(Some(self.sub(key, m))),
            Some(other) => Err(self.invalid(key, "an object", other.kind())),
        }
    }
    /// Take a raw value.
    pub fn take_value(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key)
    }
    /// Take a child: reference, inline definition, or null.
    pub fn take_child(&mut self, key: &str) -> Result<Option<ChildRef>, KeyvalError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Null) => Ok(Some(ChildRef::Null)),
            Some(Value::Str(s)) if s.is_empty() => Ok(Some(ChildRef::Null)),
            Some(Value::Str(s)) => Ok(Some(ChildRef::Reference(s))),
            Some(Value::Map(m)) => Ok(Some(ChildRef::Inline(self.sub(key, m)))),
            Some(Value::List(_)) => Err(self.invalid(key, "a node-name or an object", "a list")),
        }
    }
    fn sub(&self, key: &str, map: Map) -> Options {
        Options {
            option: self.option.clone(),
            prefix: self.path(key),
            map,
        }
    }
    /// Fail on the first key nobody consumed.
    pub fn finish(self) -> Result<(), KeyvalError> {
        let Some((k, v)) = self.map.iter().next() else {
            return Ok(());
        };
        let mut key = self.path(k);
        let mut cur = v;
        while let Value::Map(m) = cur {
            match m.iter().next() {
                Some((sub, next)) => {
                    key = format!("{key}.{sub}");
                    cur = next;
                }
                None => break,
            }
        }
        Err(KeyvalError::Unknown {
            option: self.option.clone(),
            key,
        })
    }
}

/// Merge `src` into `dst`: nested objects key by key, anything else
/// replaced.
pub fn merge(dst: &mut Map, src: Map) {
    for (k, v) in src {
        match (dst.get_mut(&k), v) {
            (Some(Value::Map(d)), Value::Map(s)) => merge(d, s),
            (_, v) => {
                dst.insert(k, v);
            }
        }
    }
}

/// Set dotted `(key, value)` pairs (values as they are, no `,,`
/// escaping) in `map`, keeping what its objects already hold
/// (`cache.direct` next to a `cache.no-flush`).
pub fn merge_pairs(
    map: &mut Map,
    option: &str,
    pairs: &[(String, String)],
) -> Result<(), KeyvalError> {
    let more = Parser::new(option).build(pairs.to_vec())?;
    merge(map, more);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Value {
        Value::Str(v.into())
    }

    #[test]
    fn integers_as_qemu_spells_them() {
        assert_eq!(parse_uint_str("0"), Some(0));
        assert_eq!(parse_uint_str("42"), Some(42));
        assert_eq!(parse_uint_str("0x1f"), Some(31));
        assert_eq!(parse_uint_str("0X1F"), Some(31));
        assert_eq!(parse_uint_str("010"), Some(8));
        assert_eq!(parse_uint_str("18446744073709551615"), Some(u64::MAX));
        for bad in [
            "",
            "0x",
            "08",
            "1k",
            " 1",
            "-1",
            "+1",
            "1.5",
            "18446744073709551616",
        ] {
            assert_eq!(parse_uint_str(bad), None, "{bad}");
        }
        assert_eq!(parse_int_str("-1"), Some(-1));
        assert_eq!(parse_int_str("-0x10"), Some(-16));
        assert_eq!(parse_int_str("-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_int_str("9223372036854775808"), None);
        assert_eq!(parse_int_str("--1"), None);
    }

    #[test]
    fn plain_pairs() {
        let m = parse("-x", "a=b,c=d", None).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m["a"], s("b"));
        assert_eq!(m["c"], s("d"));
    }

    #[test]
    fn comma_escape() {
        let m = parse("-drive", "file=a,,b,,,,c,if=none", None).unwrap();
        assert_eq!(m["file"], s("a,b,,c"));
        assert_eq!(m["if"], s("none"));
        let m = parse("-drive", "file=x,,", None).unwrap();
        assert_eq!(m["file"], s("x,"));
    }

    #[test]
    fn empty_and_trailing_comma() {
        assert!(parse("-x", "", None).unwrap().is_empty());
        assert_eq!(parse("-x", "a=1,", None).unwrap()["a"], s("1"));
        assert_eq!(parse("-x", "a=", None).unwrap()["a"], s(""));
    }

    #[test]
    fn implied_key() {
        let m = parse("-m", "512", Some("size")).unwrap();
        assert_eq!(m["size"], s("512"));
        let m = parse("-smp", "4,cores=2", Some("cpus")).unwrap();
        assert_eq!(m["cpus"], s("4"));
        assert_eq!(m["cores"], s("2"));
        let m = parse("-machine", "pc,accel=kvm", Some("type")).unwrap();
        assert_eq!(m["type"], s("pc"));
        assert_eq!(m["accel"], s("kvm"));
        // Implied value may contain escaped commas.
        let m = parse("-serial", "file:a,,b", Some("chardev")).unwrap();
        assert_eq!(m["chardev"], s("file:a,b"));
        // Only the first element may be implied.
        let e = parse("-smp", "cores=2,4", Some("cpus")).unwrap_err();
        assert_eq!(e.to_string(), "-smp: expected '=' after parameter '4'");
        // An explicit first key is fine too.
        let m = parse("-machine", "type=q35", Some("type")).unwrap();
        assert_eq!(m["type"], s("q35"));
    }

    #[test]
    fn missing_equals_without_implied() {
        let e = parse("-blockdev", "driver", None).unwrap_err();
        assert!(matches!(e, KeyvalError::MissingEquals { .. }));
        assert_eq!(
            e.to_string(),
            "-blockdev: expected '=' after parameter 'driver'"
        );
    }

    #[test]
    fn bare_flags() {
        let p = Parser::new("-drive").bare_flags(true);
        let m = p.parse("file=x,snapshot,readonly=off").unwrap();
        assert_eq!(m["snapshot"], s("on"));
        assert_eq!(m["readonly"], s("off"));
        let p = Parser::new("-device")
            .implied_key("driver")
            .bare_flags(true);
        let m = p.parse("ide-hd,drive=d0,bootindex=1").unwrap();
        assert_eq!(m["driver"], s("ide-hd"));
    }

    #[test]
    fn dotted_keys_nest() {
        let m = parse(
            "-blockdev",
            "driver=raw,node-name=n0,file.driver=file,file.filename=disk.img,file.aio=io_uring",
            None,
        )
        .unwrap();
        let mut file = Map::new();
        file.insert("driver".into(), s("file"));
        file.insert("filename".into(), s("disk.img"));
        file.insert("aio".into(), s("io_uring"));
        assert_eq!(m["file"], Value::Map(file));
        assert_eq!(m["driver"], s("raw"));
    }

    #[test]
    fn deep_nesting_and_lists() {
        let m = parse("-x", "a.b.c=1,a.b.d=2,l.0=x,l.1=y,o.l.0.k=v", None).unwrap();
        match &m["a"] {
            Value::Map(a) => match &a["b"] {
                Value::Map(b) => {
                    assert_eq!(b["c"], s("1"));
                    assert_eq!(b["d"], s("2"));
                }
                v => panic!("{v:?}"),
            },
            v => panic!("{v:?}"),
        }
        assert_eq!(m["l"], Value::List(vec![s("x"), s("y")]));
        let e = parse("-x", "l.0=x,l.2=y", None).unwrap_err();
        assert_eq!(e.to_string(), "-x: parameter 'l.1' is missing");
        let e = parse("-x", "l.0=x,l.a=y", None).unwrap_err();
        assert!(matches!(e, KeyvalError::Conflict { .. }));
    }

    #[test]
    fn conflicts_and_bad_keys() {
        let e = parse("-blockdev", "file=x,file.driver=file", None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "-blockdev: parameters 'file' and 'file.*' conflict"
        );
        let e = parse("-blockdev", "file.driver=file,file=x", None).unwrap_err();
        assert!(matches!(e, KeyvalError::Conflict { .. }));
        for bad in ["=x", "a..b=1", "a.=1", "a b=1", ",a=1", "é=1"] {
            let e = parse("-x", bad, None).unwrap_err();
            assert!(
                matches!(
                    e,
                    KeyvalError::InvalidKey { .. } | KeyvalError::MissingEquals { .. }
                ),
                "{bad}: {e:?}"
            );
        }
    }

    #[test]
    fn last_value_wins() {
        assert_eq!(parse("-x", "a=1,a=2", None).unwrap()["a"], s("2"));
    }

    #[test]
    fn json_equals_dotted() {
        let j = parse_json(
            "-blockdev",
            r#"{"driver":"raw","node-name":"n0","file":{"driver":"file","filename":"disk.img","aio":"io_uring"},"read-only":true,"offset":4096}"#,
        )
        .unwrap();
        let d = parse(
            "-blockdev",
            "driver=raw,node-name=n0,file.driver=file,file.filename=disk.img,file.aio=io_uring,read-only=on,offset=4096",
            None,
        )
        .unwrap();
        assert_eq!(j, d);
        let j = parse_json_or_dotted("-blockdev", r#" {"backing": null, "l": [1, "a"]}"#, None)
            .unwrap();
        assert_eq!(j["backing"], Value::Null);
        assert_eq!(j["l"], Value::List(vec![s("1"), s("a")]));
        assert!(parse_json_or_dotted("-blockdev", "driver=null-co", None).is_ok());
    }

    #[test]
    fn json_filenames_crumple_dotted_keys() {
        let a = parse_json_filename(
            "j",
            r#"{"driver":"qcow2","encrypt.key-secret":"s","file":{"driver":"file"},"file.filename":"x"}"#,
        )
        .unwrap();
        let b = parse(
            "j",
            "driver=qcow2,encrypt.key-secret=s,file.driver=file,file.filename=x",
            None,
        )
        .unwrap();
        assert_eq!(a, b);
        assert!(parse_json_filename("j", r#"{"file":"x","file.filename":"y"}"#).is_err());
    }

    #[test]
    fn json_errors() {
        let e = parse_json("-blockdev", "{\"driver\":").unwrap_err();
        assert!(e.to_string().starts_with("-blockdev: invalid JSON:"), "{e}");
        assert!(!e.to_string().contains('\n'));
        let e = parse_json("-blockdev", "[1]").unwrap_err();
        assert_eq!(
            e.to_string(),
            "-blockdev: invalid JSON: expected an object, got a list"
        );
    }

    #[test]
    fn bools() {
        for t in ["on", "yes", "true", "y"] {
            assert_eq!(parse_bool_str(t), Some(true));
        }
        for f in ["off", "no", "false", "n"] {
            assert_eq!(parse_bool_str(f), Some(false));
        }
        assert_eq!(parse_bool_str("maybe"), None);
        let e = parse_bool("-drive", "readonly", "maybe").unwrap_err();
        assert_eq!(
            e.to_string(),
            "-drive: parameter 'readonly' expects 'on' or 'off', got 'maybe'"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size_str("512", 1), Ok(512));
        assert_eq!(parse_size_str("512", MIB), Ok(512 * MIB));
        assert_eq!(parse_size_str("4k", 1), Ok(4096));
        assert_eq!(parse_size_str("4K", 1), Ok(4096));
        assert_eq!(parse_size_str("1M", 1), Ok(MIB));
        assert_eq!(parse_size_str("2G", MIB), Ok(2 * GIB));
        assert_eq!(parse_size_str("1T", 1), Ok(1 << 40));
        assert_eq!(parse_size_str("1P", 1), Ok(1 << 50));
        assert_eq!(parse_size_str("1E", 1), Ok(1 << 60));
        assert_eq!(parse_size_str("100B", MIB), Ok(100));
        assert_eq!(parse_size_str("1.5G", 1), Ok(3 * GIB / 2));
        assert_eq!(parse_size_str("0.5k", 1), Ok(512));
        assert_eq!(parse_size_str("0x1000", 1), Ok(4096));
        assert_eq!(parse_size_str("0x10k", 1), Ok(16 * 1024));
        assert_eq!(parse_size_str("1.0", 1), Ok(1));
        assert_eq!(parse_size_str("1.5", 1), Err(SizeError::Invalid));
        assert_eq!(parse_size_str("1.5B", 1), Err(SizeError::Invalid));
        assert_eq!(parse_size_str("16E", 1), Err(SizeError::Overflow));
        assert_eq!(
            parse_size_str("99999999999999999999", 1),
            Err(SizeError::Overflow)
        );
        for bad in [
            "", "k", "1x", "1KB", "-1", "1.k", ".5k", "0x", "1 k2", "1.2.3k",
        ] {
            assert_eq!(parse_size_str(bad, 1), Err(SizeError::Invalid), "{bad}");
        }
        let e = parse_size("-m", "size", "12Q", MIB).unwrap_err();
        assert_eq!(
            e.to_string(),
            "-m: parameter 'size' expects a size (e.g. 512, 64K, 1.5G), got '12Q'"
        );
    }

    #[test]
    fn options_typed_access() {
        let m = parse(
            "-blockdev",
            "driver=raw,offset=1M,read-only=on,file.driver=file,file.filename=x,backing=,bogus.k=1",
            None,
        )
        .unwrap();
        let mut o = Options::new("-blockdev", m);
        assert_eq!(o.require_str("driver").unwrap(), "raw");
        assert_eq!(o.take_size("offset", 1).unwrap(), Some(MIB));
        assert_eq!(o.take_bool("read-only").unwrap(), Some(true));
        assert!(matches!(
            o.take_child("backing").unwrap(),
            Some(ChildRef::Null)
        ));
        let Some(ChildRef::Inline(mut f)) = o.take_child("file").unwrap() else {
            panic!()
        };
        assert_eq!(
            f.take_enum("driver", &["file", "host_device"])
                .unwrap()
                .as_deref(),
            Some("file")
        );
        let e = f.take_u64("filename").unwrap_err();
        assert_eq!(
            e.to_string(),
            "-blockdev: parameter 'file.filename' expects a non-negative integer, got 'x'"
        );
        f.finish().unwrap();
        let e = o.require_str("size").unwrap_err();
        assert_eq!(e.to_string(), "-blockdev: parameter 'size' is missing");
        let e = o.finish().unwrap_err();
        assert_eq!(e.to_string(), "-blockdev: invalid parameter 'bogus.k'");
    }

    #[test]
    fn child_reference() {
        let mut o = Options::new(
            "-blockdev",
            parse("-blockdev", "driver=raw,file=n1", None).unwrap(),
        );
        assert!(matches!(o.take_child("file").unwrap(), Some(ChildRef::Reference(r)) if r == "n1"));
    }
}
