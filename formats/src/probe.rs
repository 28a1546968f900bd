//! Image format probing: recognise an image format from its first bytes.
//!
//! Follows the header magics of each format's specification (qcow2
//! `docs/interop/qcow2.txt`, QED, VMDK, VDI, VHDX, VHD "conectix", Parallels,
//! Bochs, cloop, LUKS) as QEMU's `bdrv_probe_all` recognises them. A file
//! that matches none of them is raw, which is exactly why writes that create
//! such a header in sector 0 of a probed raw image must be refused. dmg
//! has no magic at the start of the file: QEMU probes it by the file name
//! alone (`dmg::probe`, which the block layer's probe asks with the name).

/// How many bytes probing looks at (QEMU's `BLOCK_PROBE_BUF_SIZE`).
pub const PROBE_BUF_SIZE: usize = 512;

/// The format whose header `buf` (the start of a file) carries, if any.
/// `None` means "raw". Never panics, whatever the bytes.
pub fn probe(buf: &[u8]) -> Option<&'static str> {
    let at = |off: usize, magic: &[u8]| {
        buf.len() >= off + magic.len() && &buf[off..off + magic.len()] == magic
    };
    if at(0, b"QFI\xfb") {
        let version = buf
            .get(4..8)
            .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
        return match version {
            Some(1) => Some("qcow"),
            Some(2) | Some(3) => Some("qcow2"),
            _ => Some("qcow2"),
        };
    }
    if at(0, b"QED\0") {
        return Some("qed");
    }
    if at(0, b"KDMV") || at(0, b"COWD") || at(0, b"# Disk DescriptorFile") {
        return Some("vmdk");
    }
    if at(0x40, &0xbeda_107fu32.to_le_bytes()) {
        return Some("vdi");
    }
    if at(0, b"vhdxfile") {
        return Some("vhdx");
    }
    if at(0, b"conectix") {
        return Some("vpc");
    }
    if at(0, b"WithoutFreeSpace") || at(0, b"WithouFreSpacExt") {
        return Some("parallels");
    }
    if at(0, b"Bochs Virtual HD Image") {
        return Some("bochs");
    }
    if at(
        0,
        b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n",
    ) {
        return Some("cloop");
    }
    if at(0, b"LUKS\xba\xbe") {
        return Some("luks");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics() {
        let mut q = vec![0u8; 512];
        q[..4].copy_from_slice(b"QFI\xfb");
        q[7] = 3;
        assert_eq!(probe(&q), Some("qcow2"));
        q[7] = 1;
        assert_eq!(probe(&q), Some("qcow"));
        assert_eq!(probe(b"QED\0rest"), Some("qed"));
        assert_eq!(probe(b"KDMV"), Some("vmdk"));
        assert_eq!(probe(b"vhdxfile...."), Some("vhdx"));
        assert_eq!(probe(b"conectix"), Some("vpc"));
        assert_eq!(probe(b"LUKS\xba\xbe\0\x01"), Some("luks"));
        let mut v = vec![0u8; 0x50];
        v[0x40..0x44].copy_from_slice(&0xbeda_107fu32.to_le_bytes());
        assert_eq!(probe(&v), Some("vdi"));
    }

    #[test]
    fn raw_and_garbage() {
        assert_eq!(probe(&[]), None);
        assert_eq!(probe(&[0u8; 512]), None);
        assert_eq!(probe(b"QFI"), None);
        let noise: Vec<u8> = (0..512u32).map(|i| (i * 7 + 3) as u8).collect();
        assert_eq!(probe(&noise), None);
    }
}
