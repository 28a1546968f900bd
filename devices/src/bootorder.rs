//! The boot order, collected in one place from every device's `bootindex`
//! and turned into the fw_cfg `bootorder` file SeaBIOS reads (one
//! OpenFirmware device path per line, lowest index first; see QEMU's
//! docs/specs/fw_cfg.rst and SeaBIOS's boot.c). Devices only register paths.

use std::collections::BTreeMap;

#[derive(Default, Debug)]
pub struct BootOrder {
    entries: BTreeMap<u32, String>,
    strict: bool,
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
    }
}
