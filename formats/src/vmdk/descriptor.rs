//! The text descriptor, after VMware's "Virtual Disk Format 5.0",
//! "The Descriptor File" (header `version`, `CID`, `parentCID`,
//! `createType`, `parentFileNameHint`; "Extent Descriptions"; the disk
//! database `ddb.*`): parsed into [`Descriptor`], and written for new
//! images in the layout qemu-img writes.
//!
//! Hostile text: the descriptor is capped at [`MAX_DESC`] bytes and
//! [`MAX_EXTENTS`] extents; a malformed extent line is refused by
//! quoting it, as QEMU does.

use crate::error::{FResult, FormatError};

/// The largest descriptor read (QEMU reads at most 1 MiB).
pub const MAX_DESC: usize = (1 << 20) - 1;
/// The most extents an image may have (a 2 TiB twoGbMaxExtent disk
/// needs 1024).
pub const MAX_EXTENTS: usize = 4096;

/// One extent line: `ACCESS SECTORS TYPE "FILE" [OFFSET]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtentLine {
    /// `RW` or `RDONLY`.
    pub access: String,
    /// Size in sectors.
    pub sectors: u64,
    /// `FLAT`, `SPARSE`, `ZERO`, `VMFS`, `VMFSSPARSE`.
    pub kind: String,
    /// File name (relative to the descriptor's directory unless
    /// absolute; empty for `ZERO`).
    pub file: String,
    /// Sector offset in the file (`FLAT`).
    pub offset: u64,
}

/// What a descriptor says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// Content ID.
    pub cid: u32,
    /// The parent's content ID (`ffffffff`: none).
    pub parent_cid: u32,
    /// `createType`.
    pub create_type: String,
    /// `parentFileNameHint`.
    pub parent_hint: Option<String>,
    /// The extents, in guest order.
    pub extents: Vec<ExtentLine>,
}

/// The value of `key="value"` or `key=value` on `line`, if it sets `key`.
fn value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = line.strip_prefix(key)?.trim_start();
    let v = rest.strip_prefix('=')?.trim();
    Some(
        v.strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v),
    )
}

fn hex(v: &str) -> Option<u32> {
    // `%x` reads leading hex digits, so trailing junk is ignored.
    let end = v.find(|c: char| !c.is_ascii_hexdigit()).unwrap_or(v.len());
    u32::from_str_radix(&v[..end], 16).ok()
}

impl Descriptor {
    /// Parse the descriptor `text` of image `name` (text past the first
    /// NUL ignored).
    pub fn parse(text: &[u8], name: &str) -> FResult<Descriptor> {
        let text = &text[..text.len().min(MAX_DESC)];
        let text = match text.iter().position(|&b| b == 0) {
            Some(n) => &text[..n],
            None => text,
        };
        let text = String::from_utf8_lossy(text);
        let bad = |m: String| FormatError::Corrupt(format!("{name}: {m}"));
        let mut d = Descriptor {
            parent_cid: u32::MAX,
            ..Default::default()
        };
        let (mut cid, mut ct) = (None, None);
        for raw in text.lines() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(v) = value(line, "CID") {
                cid = Some(hex(v).ok_or_else(|| bad(format!("invalid CID '{v}'")))?);
            } else if let Some(v) = value(line, "parentCID") {
                d.parent_cid = hex(v).ok_or_else(|| bad(format!("invalid parentCID '{v}'")))?;
            } else if let Some(v) = value(line, "createType") {
                ct = Some(v.to_string());
            } else if let Some(v) = value(line, "parentFileNameHint") {
                d.parent_hint = Some(v.to_string());
            } else if let Some(e) = Self::extent(line).transpose() {
                let e = e.map_err(|()| bad(format!("Invalid extent line: {line}")))?;
                if d.extents.len() >= MAX_EXTENTS {
                    return Err(bad(format!("more than {MAX_EXTENTS} extents")));
                }
                d.extents.push(e);
            }
        }
        d.cid = cid.ok_or_else(|| bad("invalid VMDK image descriptor (no CID)".into()))?;
        d.create_type =
            ct.ok_or_else(|| bad("invalid VMDK image descriptor (no createType)".into()))?;
        Ok(d)
    }

    /// An extent line, `Ok(None)` for a line that is not one.
    fn extent(line: &str) -> Result<Option<ExtentLine>, ()> {
        let mut it = line.splitn(3, char::is_whitespace);
        let access = it.next().unwrap_or("");
        if !matches!(access, "RW" | "RDONLY" | "NOACCESS") {
            return Ok(None);
        }
        let sectors: u64 = it.next().and_then(|s| s.parse().ok()).ok_or(())?;
        let rest = it.next().ok_or(())?.trim_start();
        let (kind, rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        let rest = rest.trim();
        let (file, after) = if kind == "ZERO" && rest.is_empty() {
            ("", "")
        } else {
            let r = rest.strip_prefix('"').ok_or(())?;
            let q = r.find('"').ok_or(())?;
            (&r[..q], r[q + 1..].trim())
        };
        let offset = match (kind, after) {
            ("FLAT", a) => a.parse().map_err(|_| ())?,
            (_, "") => 0,
            // VMFS takes no offset; other kinds none either.
            _ => return Err(()),
        };
        if sectors == 0 {
            return Err(());
        }
        Ok(Some(ExtentLine {
            access: access.to_string(),
            sectors,
            kind: kind.to_string(),
            file: file.to_string(),
            offset,
        }))
    }
}

/// What a new descriptor says (qemu-img's template).
#[derive(Clone, Debug)]
pub struct NewDescriptor {
    /// Content ID.
    pub cid: u32,
    /// Parent's content ID (`u32::MAX`: none).
    pub parent_cid: u32,
    /// `createType`.
    pub create_type: String,
    /// The parent's name.
    pub parent_hint: Option<String>,
    /// Extent lines, each ending with a newline.
    pub extents: String,
    /// `ddb.virtualHWVersion`.
    pub hw_version: String,
    /// Cylinders.
    pub cylinders: u64,
    /// Heads (16 for IDE, else 255).
    pub heads: u32,
    /// `ddb.adapterType`.
    pub adapter_type: String,
    /// `ddb.toolsVersion`.
    pub tools_version: String,
}

impl NewDescriptor {
    /// The text.
    pub fn render(&self) -> String {
        let parent = self
            .parent_hint
            .as_ref()
            .map(|p| format!("parentFileNameHint=\"{p}\""))
            .unwrap_or_default();
        format!(
            "# Disk DescriptorFile\nversion=1\nCID={:x}\nparentCID={:x}\ncreateType=\"{}\"\n{}\n# Extent description\n{}\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"{}\"\nddb.geometry.cylinders = \"{}\"\nddb.geometry.heads = \"{}\"\nddb.geometry.sectors = \"63\"\nddb.adapterType = \"{}\"\nddb.toolsVersion = \"{}\"\n",
            self.cid,
            self.parent_cid,
            self.create_type,
            parent,
            self.extents,
            self.hw_version,
            self.cylinders,
            self.heads,
            self.adapter_type,
            self.tools_version
        )
    }
}

/// `text` with its `CID=` line set to `cid` (QEMU's CID update on the
/// first write after open).
pub fn with_cid(text: &str, cid: u32) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for line in text.split_inclusive('\n') {
        if value(line.trim(), "CID").is_some() {
            out.push_str(&format!("CID={cid:x}\n"));
        } else {
            out.push_str(line);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_qemu_descriptor() {
        let n = NewDescriptor {
            cid: 0x1234abcd,
            parent_cid: u32::MAX,
            create_type: "twoGbMaxExtentFlat".into(),
            parent_hint: Some("base.vmdk".into()),
            extents:
                "RW 4194304 FLAT \"a-f001.vmdk\" 0\nRW 100 FLAT \"a-f002.vmdk\" 0\nRW 8 ZERO\n"
                    .into(),
            hw_version: "4".into(),
            cylinders: 10,
            heads: 16,
            adapter_type: "ide".into(),
            tools_version: "2147483647".into(),
        };
        let d = Descriptor::parse(n.render().as_bytes(), "x").unwrap();
        assert_eq!(d.cid, 0x1234abcd);
        assert_eq!(d.parent_cid, u32::MAX);
        assert_eq!(d.create_type, "twoGbMaxExtentFlat");
        assert_eq!(d.parent_hint.as_deref(), Some("base.vmdk"));
        assert_eq!(d.extents.len(), 3);
        assert_eq!(d.extents[1].file, "a-f002.vmdk");
        assert_eq!(d.extents[2].kind, "ZERO");
        let t = with_cid(&n.render(), 7);
        assert_eq!(Descriptor::parse(t.as_bytes(), "x").unwrap().cid, 7);
    }

    #[test]
    fn bad_lines() {
        let base = "CID=1\ncreateType=\"monolithicFlat\"\n";
        for l in [
            "RW 10 FLAT \"x\"",
            "RW 10 SPARSE \"x\" 5",
            "RW 0 FLAT \"x\" 0",
            "RW x FLAT",
        ] {
            let t = format!("{base}{l}\n");
            let e = Descriptor::parse(t.as_bytes(), "img").unwrap_err();
            assert!(e.to_string().contains("img"), "{e}");
        }
        assert!(Descriptor::parse(b"createType=\"x\"\n", "img").is_err());
    }
}
