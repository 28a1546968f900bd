//! The driver's options (QEMU's `BlockdevOptionsVVFAT`: `dir`,
//! `fat-type`, `floppy`, `label`, `rw`) and the `fat:` file name that
//! stands for them (QEMU's `vvfat_parse_filename`):
//! `fat:[floppy:][rw:][12:|16:|32:]DIR`, the flags in any order, DIR
//! being what follows the last colon (or the last two, for a DOS drive
//! letter: `fat:rw:c:/dir`). QEMU ignores words it does not know there;
//! Strata refuses them, naming the word.

use super::geometry::FatType;
use crate::error::{BlockError, BlockResult};
use crate::graph::OpenCtx;
use crate::keyval::{Map, Value};

/// The options of one vvfat node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The host directory, as given.
    pub dir: String,
    /// `fat-type` (0 or absent: the default).
    pub fat_type: Option<FatType>,
    /// The number as given (0 when absent), for the node's file name.
    pub fat_type_given: u64,
    /// A floppy rather than a hard disk.
    pub floppy: bool,
    /// The volume label as given, if any.
    pub label: Option<String>,
    /// Write the guest's changes back to the directory.
    pub rw: bool,
}

impl Config {
    /// The 11 label bytes (QEMU's default "QEMU VVFAT"), space padded.
    pub fn label_bytes(&self) -> [u8; 11] {
        let mut l = [b' '; 11];
        let s = self.label.as_deref().unwrap_or("QEMU VVFAT").as_bytes();
        l[..s.len().min(11)].copy_from_slice(&s[..s.len().min(11)]);
        l
    }

    /// QEMU's name for the node: its options as `json:{...}` (what
    /// qemu-img info prints for the file child).
    pub fn json_name(&self) -> String {
        let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
        let mut s = format!(
            "json:{{\"fat-type\": {}, \"dir\": {}, \"driver\": \"vvfat\", \"floppy\": {}, \"rw\": {}",
            self.fat_type_given,
            q(&self.dir),
            self.floppy,
            self.rw
        );
        if let Some(l) = &self.label {
            s.push_str(&format!(", \"label\": {}", q(l)));
        }
        s.push('}');
        s
    }

    /// Take the options from an open context.
    pub fn from_ctx(ctx: &mut OpenCtx<'_>) -> BlockResult<Config> {
        let dir = ctx
            .opts
            .take_str("dir")?
            .ok_or_else(|| BlockError::Open("vvfat block driver requires a 'dir' option".into()))?;
        let given = ctx.opts.take_u64("fat-type")?.unwrap_or(0);
        let fat_type = match given {
            0 => None,
            n => Some(FatType::from_bits(n).ok_or_else(|| {
                BlockError::Open(format!(
                    "{dir}: fat-type={n}: valid FAT types are only 12, 16 and 32"
                ))
            })?),
        };
        let floppy = ctx.opts.take_bool("floppy")?.unwrap_or(false);
        let label = ctx.opts.take_str("label")?;
        if let Some(l) = &label {
            if l.len() > 11 {
                return Err(BlockError::Open(format!(
                    "{dir}: label '{l}': vvfat label cannot be longer than 11 bytes"
                )));
            }
        }
        let rw = ctx.opts.take_bool("rw")?.unwrap_or(false);
        Ok(Config {
            dir,
            fat_type,
            fat_type_given: given,
            floppy,
            label,
            rw,
        })
    }
}

/// The node options of a `fat:` file name.
pub fn parse_filename(name: &str) -> Result<Map, String> {
    let rest = name
        .strip_prefix("fat:")
        .ok_or_else(|| format!("{name}: a vvfat file name starts with 'fat:'"))?;
    let (flags, dir) = split_dir(rest);
    if dir.is_empty() {
        return Err(format!("{name}: no directory after 'fat:'"));
    }
    let (mut fat_type, mut floppy, mut rw) = (0, false, false);
    for w in flags.split(':').filter(|w| !w.is_empty()) {
        match w {
            "floppy" => floppy = true,
            "rw" => rw = true,
            "12" => fat_type = 12,
            "16" => fat_type = 16,
            "32" => fat_type = 32,
            _ => {
                return Err(format!(
                    "{name}: unknown vvfat flag '{w}' (expected floppy, rw, 12, 16 or 32)"
                ))
            }
        }
    }
    let s = |v: &str| Value::Str(v.to_string());
    let b = |v: bool| s(if v { "on" } else { "off" });
    let mut m = Map::new();
    m.insert("driver".into(), s("vvfat"));
    m.insert("dir".into(), s(dir));
    m.insert("fat-type".into(), s(&fat_type.to_string()));
    m.insert("floppy".into(), b(floppy));
    m.insert("rw".into(), b(rw));
    Ok(m)
}

/// (flags, directory) of what follows `fat:`.
fn split_dir(rest: &str) -> (&str, &str) {
    let Some(i) = rest.rfind(':') else {
        return ("", rest);
    };
    // A DOS drive letter: `...:c:dir` keeps `c:dir` as the directory.
    let b = rest.as_bytes();
    if i >= 2 && b[i - 2] == b':' && b[i - 1].is_ascii_alphabetic() {
        return (&rest[..i - 2], &rest[i - 1..]);
    }
    if i == 1 && b[0].is_ascii_alphabetic() {
        return ("", rest);
    }
    (&rest[..i], &rest[i + 1..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(m: &Map, k: &str) -> String {
        m[k].as_str().unwrap().to_string()
    }

    #[test]
    fn fat_file_names() {
        let m = parse_filename("fat:/some/dir").unwrap();
        assert_eq!(get(&m, "driver"), "vvfat");
        assert_eq!(get(&m, "dir"), "/some/dir");
        assert_eq!(get(&m, "fat-type"), "0");
        assert_eq!(
            (get(&m, "floppy"), get(&m, "rw")),
            ("off".into(), "off".into())
        );
        for name in [
            "fat:rw:floppy:16:/d",
            "fat:16:rw:floppy:/d",
            "fat:floppy:16:rw:/d",
        ] {
            let m = parse_filename(name).unwrap();
            assert_eq!(get(&m, "dir"), "/d", "{name}");
            assert_eq!(get(&m, "fat-type"), "16");
            assert_eq!(
                (get(&m, "floppy"), get(&m, "rw")),
                ("on".into(), "on".into())
            );
        }
        let m = parse_filename("fat:rw:c:/dir").unwrap();
        assert_eq!(
            (get(&m, "dir"), get(&m, "rw")),
            ("c:/dir".into(), "on".into())
        );
        let m = parse_filename("fat:d").unwrap();
        assert_eq!(get(&m, "dir"), "d");
        let m = parse_filename("fat::d").unwrap();
        assert_eq!(get(&m, "dir"), "d");
        assert!(parse_filename("fat:").is_err());
        assert!(parse_filename("fat:rw:").is_err());
        let e = parse_filename("fat:bogus:/d").unwrap_err();
        assert!(e.contains("'bogus'"), "{e}");
    }

    #[test]
    fn labels_and_names() {
        let mut c = Config {
            dir: "d\"x".into(),
            fat_type: None,
            fat_type_given: 0,
            floppy: false,
            label: None,
            rw: true,
        };
        assert_eq!(&c.label_bytes(), b"QEMU VVFAT ");
        assert_eq!(
            c.json_name(),
            r#"json:{"fat-type": 0, "dir": "d\"x", "driver": "vvfat", "floppy": false, "rw": true}"#
        );
        c.label = Some("MYDISK".into());
        assert_eq!(&c.label_bytes(), b"MYDISK     ");
        assert!(c.json_name().ends_with(r#", "label": "MYDISK"}"#));
    }
}
