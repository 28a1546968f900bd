//! The boot order, collected in one place from every device's `bootindex`
//! and turned into the fw_cfg `bootorder` file SeaBIOS reads (one
//! OpenFirmware device path per line, lowest index first; see QEMU's
//! docs/specs/fw_cfg.rst and SeaBIOS's boot.c). Devices only register paths.
//! It also collects the logical CHS geometries users give disks
//! (`lcyls/lheads/lsecs`) into the `bios-geometry` file, which SeaBIOS
//! reads with the same path syntax: `PATH CYLS HEADS SECS` per line.

use std::collections::BTreeMap;

#[derive(Default, Debug)]
pub struct BootOrder {
    entries: BTreeMap<u32, String>,
    strict: bool,
    geometries: Vec<(String, u32, u32, u32)>,
}

impl BootOrder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `path` at `bootindex`. Two devices may not share an index.
    pub fn register(&mut self, bootindex: u32, path: String) -> Result<(), String> {
        if let Some(other) = self.entries.get(&bootindex) {
            return Err(format!(
                "bootindex {bootindex} is used by two devices ({other} and {path})"
            ));
        }
        self.entries.insert(bootindex, path);
        Ok(())
    }

    /// Records the logical CHS geometry the BIOS should use for `path`.
    pub fn register_geometry(&mut self, path: String, cyls: u32, heads: u32, secs: u32) {
        self.geometries.push((path, cyls, heads, secs));
    }

    /// The `bios-geometry` file: one `PATH CYLS HEADS SECS` line per disk,
    /// newline-separated and NUL-terminated; empty when no disk has one.
    pub fn bios_geometry_file(&self) -> Vec<u8> {
        if self.geometries.is_empty() {
            return Vec::new();
        }
        let lines: Vec<String> = self
            .geometries
            .iter()
            .map(|(p, c, h, s)| format!("{p} {c} {h} {s}"))
            .collect();
        let mut out = lines.join("\n").into_bytes();
        out.push(0);
        out
    }

    /// `-boot strict=on`: do not fall back to devices without a bootindex.
    pub fn set_strict(&mut self, strict: bool) {
        self.strict = strict;
    }

    /// The file's bytes: paths separated by newlines, NUL-terminated, with a
    /// final `HALT` line when strict. Empty when no device has a bootindex.
    pub fn fw_cfg_file(&self) -> Vec<u8> {
        let mut lines: Vec<&str> = self.entries.values().map(|s| s.as_str()).collect();
        if lines.is_empty() {
            return Vec::new();
        }
        if self.strict {
            lines.push("HALT");
        }
        let mut out = lines.join("\n").into_bytes();
        out.push(0);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordered_and_strict() {
        let mut b = BootOrder::new();
        assert!(b.fw_cfg_file().is_empty());
        b.register(2, "/pci@i0cf8/*@5".into()).unwrap();
        b.register(1, "/pci@i0cf8/ide@1,1/drive@0/disk@0".into())
            .unwrap();
        assert!(b.register(1, "x".into()).is_err());
        assert_eq!(
            b.fw_cfg_file(),
            b"/pci@i0cf8/ide@1,1/drive@0/disk@0\n/pci@i0cf8/*@5\0".to_vec()
        );
        b.set_strict(true);
        assert!(b.fw_cfg_file().ends_with(b"\nHALT\0"));
        assert!(b.bios_geometry_file().is_empty());
        b.register_geometry("/pci@i0cf8/ide@1,1/drive@0/disk@0".into(), 100, 16, 63);
        b.register_geometry("/pci@i0cf8/*@5".into(), 2000, 255, 63);
        assert_eq!(
            b.bios_geometry_file(),
            b"/pci@i0cf8/ide@1,1/drive@0/disk@0 100 16 63\n/pci@i0cf8/*@5 2000 255 63\0".to_vec()
        );
    }
}
