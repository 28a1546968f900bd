//! File names: the 8.3 short name each host file gets, the long name
//! (VFAT LFN) entries that carry its real name, and the way back from
//! what the guest wrote to a host name.
//!
//! Spec: fatgen103, "FAT Long Directory Entries" (the LFN entry layout:
//! 13 UTF-16 units in three runs, the order byte with 0x40 on the last
//! one, stored first; NUL-terminated and 0xFFFF-padded; "Checksum
//! generation" over the 11 short-name bytes; "The Basis-Name Generation
//! Algorithm" and "The Numeric-Tail Generation Algorithm") and "FAT 32
//! Byte Directory Entry Structure" (which bytes a short name may hold).
//!
//! Short names follow QEMU's `create_short_filename`: upper-cased, only
//! the characters QEMU keeps, 8 of the base and 3 of the extension after
//! the last dot; a lossy conversion (dropped characters, a leading dot,
//! several dots) gets a `~N` tail from 1, a clash with a name already in
//! the directory the next free N. Every host name also gets LFN entries,
//! as in QEMU, so that the guest sees it exactly (and writes it back
//! exactly).

use super::dirent::{attr, ENTRY, KANJI_E5};

/// The characters QEMU keeps in a short name (besides digits and
/// upper-case letters).
const SHORT_PUNCT: &[u8] = b"$%'-_@~`!(){}^#&";

/// The most LFN entries of one name.
pub const MAX_LFN_ENTRIES: usize = 20;
/// The longest long name, in UTF-16 units.
pub const MAX_NAME_UNITS: usize = 255;

/// `c` as a short-name byte, or `None` where QEMU drops it.
fn short_char(c: char) -> Option<u8> {
    let mut up = c.to_uppercase();
    let u = match (up.next(), up.next()) {
        (Some(u), None) => u,
        _ => return None,
    };
    if u.is_ascii_digit()
        || u.is_ascii_uppercase()
        || (u.is_ascii() && SHORT_PUNCT.contains(&(u as u8)))
    {
        Some(u as u8)
    } else {
        None
    }
}

/// The short name of `name` in a directory where `taken` says which
/// 11-byte names are already used; `None` when a million tails are
/// taken.
pub fn short_name(name: &str, taken: impl Fn(&[u8; 11]) -> bool) -> Option<[u8; 11]> {
    let mut s = [b' '; 11];
    let mut j = 0;
    let mut lossy = false;
    let mut last_dot = None;
    for (i, c) in name.char_indices() {
        if c == '.' {
            if j == 0 {
                // A leading dot (or one after only dropped characters).
                lossy = true;
            } else {
                if last_dot.is_some() {
                    lossy = true;
                }
                last_dot = Some(i);
            }
        } else if last_dot.is_none() {
            match short_char(c) {
                Some(v) if j < 8 => {
                    s[j] = v;
                    j += 1;
                }
                _ => lossy = true,
            }
        }
    }
    if let Some(dot) = last_dot {
        let mut k = 0;
        for c in name[dot + 1..].chars() {
            match short_char(c) {
                Some(v) if k < 3 => {
                    s[8 + k] = v;
                    k += 1;
                }
                _ => lossy = true,
            }
        }
    }
    let base_len = s[..8].iter().position(|&b| b == b' ').unwrap_or(8);
    for i in u32::from(lossy)..999_999 {
        let mut cand = s;
        if i > 0 {
            let tail = format!("~{i}");
            let at = base_len.min(8 - tail.len());
            cand[at..at + tail.len()].copy_from_slice(tail.as_bytes());
        }
        if !taken(&cand) {
            return Some(cand);
        }
    }
    None
}

/// The checksum of a short name that its LFN entries carry.
pub fn lfn_checksum(short: &[u8; 11]) -> u8 {
    short
        .iter()
        .fold(0u8, |sum, &b| sum.rotate_right(1).wrapping_add(b))
}

/// Where the 13 UTF-16 units of an LFN entry lie (byte offsets).
const LFN_UNITS: [usize; 13] = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];

/// The LFN entries of `name` for a short name with checksum `sum`, in
/// directory order (the last part first); `None` if the name is empty or
/// longer than 255 UTF-16 units.
pub fn lfn_entries(name: &str, sum: u8) -> Option<Vec<[u8; ENTRY]>> {
    let units: Vec<u16> = name.encode_utf16().collect();
    if units.is_empty() || units.len() > MAX_NAME_UNITS {
        return None;
    }
    let n = units.len().div_ceil(13);
    let mut out = Vec::with_capacity(n);
    for part in (1..=n).rev() {
        let mut e = [0u8; ENTRY];
        e[0] = part as u8 | if part == n { 0x40 } else { 0 };
        e[11] = attr::LONG_NAME;
        e[13] = sum;
        for (k, &off) in LFN_UNITS.iter().enumerate() {
            let i = (part - 1) * 13 + k;
            let u = match i.cmp(&units.len()) {
                std::cmp::Ordering::Less => units[i],
                std::cmp::Ordering::Equal => 0,
                std::cmp::Ordering::Greater => 0xffff,
            };
            e[off..off + 2].copy_from_slice(&u.to_le_bytes());
        }
        out.push(e);
    }
    Some(out)
}

/// Collects LFN entries as a directory is read, for the short entry that
/// follows them (fatgen103: an LFN set whose order or checksum does not
/// hold is an orphan and is ignored).
#[derive(Debug, Default)]
pub struct LfnReader {
    units: Vec<u16>,
    /// The order number the next entry must have (0: none expected).
    next: u8,
    sum: u8,
    active: bool,
}

impl LfnReader {
    /// Forget any partial name (a deleted entry, a label, a short entry).
    pub fn reset(&mut self) {
        self.active = false;
        self.units.clear();
    }

    /// Take one LFN entry.
    pub fn push(&mut self, e: &[u8; ENTRY]) {
        let ord = e[0] & 0x3f;
        // Type and first-cluster fields must be zero in an LFN entry.
        if e[12] != 0 || e[26] != 0 || e[27] != 0 {
            self.reset();
            return;
        }
        if e[0] & 0x40 != 0 {
            if ord == 0 || usize::from(ord) > MAX_LFN_ENTRIES {
                self.reset();
                return;
            }
            self.units.clear();
            self.units.resize(usize::from(ord) * 13, 0xffff);
            self.sum = e[13];
            self.next = ord;
            self.active = true;
        } else if !self.active || ord != self.next || ord == 0 || e[13] != self.sum {
            self.reset();
            return;
        }
        let base = (usize::from(ord) - 1) * 13;
        for (k, &off) in LFN_UNITS.iter().enumerate() {
            self.units[base + k] = u16::from_le_bytes([e[off], e[off + 1]]);
        }
        self.next = ord - 1;
    }

    /// The long name belonging to `short`, if a whole, valid one was
    /// read for it; the reader is reset either way.
    pub fn finish(&mut self, short: &[u8; 11]) -> Option<String> {
        let ok = self.active && self.next == 0 && self.sum == lfn_checksum(short);
        let name = if ok {
            let end = self
                .units
                .iter()
                .position(|&u| u == 0 || u == 0xffff)
                .unwrap_or(self.units.len());
            char::decode_utf16(self.units[..end].iter().copied())
                .collect::<Result<String, _>>()
                .ok()
                .filter(|n| valid_host_name(n))
        } else {
            None
        };
        self.reset();
        name
    }
}

/// Whether `n` can name a file inside a host directory: not empty, not
/// `.` or `..`, no `/` or NUL, at most 255 bytes (NAME_MAX).
pub fn valid_host_name(n: &str) -> bool {
    !n.is_empty() && n != "." && n != ".." && n.len() <= 255 && !n.contains(['/', '\0'])
}

/// Lower-case base name (DIR_NTRes bit 3).
pub const NT_LOWER_BASE: u8 = 0x08;
/// Lower-case extension (DIR_NTRes bit 4).
pub const NT_LOWER_EXT: u8 = 0x10;

/// The host name of a short entry without a long name, as FAT readers
/// show it (Linux's default `shortname=mixed`, Windows, mtools): as
/// stored, with the NT case bits `nt_case` lower-casing the base or the
/// extension. (QEMU lower-cases every such name instead, so a guest
/// writing `README` back would rename the host's `README`.) Bytes that
/// are not plain ASCII name characters (code page letters, the
/// characters FAT forbids) become `_`, so that whatever a guest writes
/// names a file inside the directory. `None` if that leaves no valid
/// name.
pub fn short_to_host(short: &[u8; 11], nt_case: u8) -> Option<String> {
    let map = |i: usize, b: u8, lower: bool| -> char {
        let b = if i == 0 && b == KANJI_E5 { 0xe5 } else { b };
        match b {
            b'A'..=b'Z' if lower => b.to_ascii_lowercase() as char,
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b' ' => b as char,
            _ if SHORT_PUNCT.contains(&b) => b as char,
            _ => '_',
        }
    };
    let trim = |s: &[u8]| s.len() - s.iter().rev().take_while(|&&b| b == b' ').count();
    let base: String = short[..trim(&short[..8])]
        .iter()
        .enumerate()
        .map(|(i, &b)| map(i, b, nt_case & NT_LOWER_BASE != 0))
        .collect();
    let ext: String = short[8..8 + trim(&short[8..])]
        .iter()
        .map(|&b| map(1, b, nt_case & NT_LOWER_EXT != 0))
        .collect();
    let n = if ext.is_empty() {
        base
    } else {
        format!("{base}.{ext}")
    };
    valid_host_name(&n).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sn(name: &str) -> String {
        String::from_utf8(short_name(name, |_| false).unwrap().to_vec()).unwrap()
    }

    #[test]
    fn short_names_as_qemu_makes_them() {
        assert_eq!(sn("hello.txt"), "HELLO   TXT");
        assert_eq!(sn("README"), "README     ");
        assert_eq!(sn("A long file name.txt"), "ALONGF~1TXT");
        assert_eq!(sn("verylongname.c"), "VERYLO~1C  ");
        assert_eq!(sn(".bashrc"), "BASHRC~1   ");
        assert_eq!(sn("a.b.c"), "A~1     C  ");
        assert_eq!(sn("archive.tar.gz"), "ARCHIV~1GZ ");
        assert_eq!(sn("x.html"), "X~1     HTM");
        assert_eq!(sn("été.txt"), "T~1     TXT");
        assert_eq!(sn("a+b"), "AB~1       ");
        assert_eq!(sn("..."), "~1         ");
        // Clashes take the next tail; a name that fits exactly gets one
        // only when taken.
        let taken =
            |n: &[u8; 11]| n == b"ALONGF~1TXT" || n == b"ALONGF~2TXT" || n == b"FOO        ";
        let s = short_name("A long file name.txt", taken).unwrap();
        assert_eq!(&s, b"ALONGF~3TXT");
        assert_eq!(&short_name("foo", taken).unwrap(), b"FOO~1      ");
        // Ten and more: the tail moves left.
        let s = short_name("abcdefghij", |n| n[6] == b'~').unwrap();
        assert_eq!(&s, b"ABCDE~10   ");
        assert_eq!(short_name("x", |_| true), None);
    }

    #[test]
    fn lfn_checksum_is_fatgen103s() {
        // The rotate-right-and-add sum: what qemu-img's vvfat image holds
        // for these names.
        assert_eq!(lfn_checksum(b"HELLO   TXT"), 0xf1);
        assert_eq!(lfn_checksum(b"ALONGF~1TXT"), 0x02);
    }

    #[test]
    fn lfn_round_trip() {
        for name in [
            "a",
            "hello.txt",
            "exactly13char",
            "A long file name.txt",
            "ünïcödé 𝄞 name",
            &"x".repeat(255),
        ] {
            let short = short_name(name, |_| false).unwrap();
            let sum = lfn_checksum(&short);
            let ents = lfn_entries(name, sum).unwrap();
            let units = name.encode_utf16().count();
            assert_eq!(ents.len(), units.div_ceil(13));
            assert_eq!(ents[0][0] & 0x40, 0x40);
            let mut r = LfnReader::default();
            for e in &ents {
                assert_eq!(e[11], attr::LONG_NAME);
                r.push(e);
            }
            assert_eq!(r.finish(&short).as_deref(), Some(name));
            // A wrong checksum, a missing part, a bad order: orphans.
            for e in &ents {
                r.push(e);
            }
            assert_eq!(r.finish(b"OTHER   TXT"), None);
            if ents.len() > 1 {
                for e in &ents[1..] {
                    r.push(e);
                }
                assert_eq!(r.finish(&short), None);
                r.push(&ents[0]);
                r.push(&ents[0]);
                assert_eq!(r.finish(&short), None);
            }
        }
        // 13 units exactly: no terminator, no padding; 14: both.
        let e = lfn_entries("exactly13char", 0).unwrap();
        assert_eq!(&e[0][28..32], &[b'a', 0, b'r', 0]);
        let e = lfn_entries("a", 0).unwrap();
        assert_eq!(&e[0][1..7], &[b'a', 0, 0, 0, 0xff, 0xff]);
        assert!(lfn_entries("", 0).is_none());
        assert!(lfn_entries(&"x".repeat(256), 0).is_none());
    }

    #[test]
    fn hostile_lfns_fall_back() {
        let short = *b"EVIL    TXT";
        let sum = lfn_checksum(&short);
        for bad in ["..", ".", "a/b", "/"] {
            let mut r = LfnReader::default();
            for e in lfn_entries(bad, sum).unwrap() {
                r.push(&e);
            }
            assert_eq!(r.finish(&short), None, "{bad:?}");
        }
        // A NUL ends the name (fatgen103), whatever follows.
        let mut r = LfnReader::default();
        for e in lfn_entries("a\0b", sum).unwrap() {
            r.push(&e);
        }
        assert_eq!(r.finish(&short).as_deref(), Some("a"));
        // A lone surrogate.
        let mut e = lfn_entries("ab", sum).unwrap()[0];
        e[1..3].copy_from_slice(&0xd800u16.to_le_bytes());
        let mut r = LfnReader::default();
        r.push(&e);
        assert_eq!(r.finish(&short), None);
        // Nonzero type or cluster fields.
        let mut e = lfn_entries("ab", sum).unwrap()[0];
        e[26] = 1;
        r.push(&e);
        assert_eq!(r.finish(&short), None);
        // An order number of 0 or above 20.
        let mut e = lfn_entries("ab", sum).unwrap()[0];
        e[0] = 0x40;
        r.push(&e);
        assert_eq!(r.finish(&short), None);
        e[0] = 0x40 | 21;
        r.push(&e);
        assert_eq!(r.finish(&short), None);
    }

    #[test]
    fn short_names_back_to_host() {
        let h = |n: &[u8; 11], c| short_to_host(n, c);
        assert_eq!(h(b"HELLO   TXT", 0).as_deref(), Some("HELLO.TXT"));
        assert_eq!(h(b"HELLO   TXT", 0x18).as_deref(), Some("hello.txt"));
        assert_eq!(h(b"HELLO   TXT", 0x08).as_deref(), Some("hello.TXT"));
        assert_eq!(h(b"HELLO   TXT", 0x10).as_deref(), Some("HELLO.txt"));
        assert_eq!(h(b"README     ", 0).as_deref(), Some("README"));
        assert_eq!(h(b"A/B\\C*  ..:", 0x18).as_deref(), Some("a_b_c_.___"));
        assert_eq!(h(b"\x05BC     \x80  ", 0).as_deref(), Some("_BC._"));
        assert_eq!(h(b"        TXT", 0).as_deref(), Some(".TXT"));
        assert_eq!(h(b"           ", 0), None);
        assert!(valid_host_name("a b"));
        assert!(!valid_host_name(&"x".repeat(256)));
    }
}
