//! On-disk image formats, pure logic over an abstract child
//! ([`storage::Storage`]).
//!
//! Each format lives in its own module. Probing lives in [`probe`].
#![forbid(unsafe_code)]

pub mod bochs;
pub mod check;
pub mod cloop;
pub mod dmg;
pub mod error;
pub mod luks;
pub mod mapping;
pub mod parallels;
pub mod probe;
pub mod qcow;
pub mod qcow2;
pub mod qed;
pub mod storage;
pub mod vdi;
pub mod vhdx;
pub mod vmdk;
pub mod vpc;

/// The 16 bytes of an id as QEMU prints a UUID (big-endian groups,
/// lower-case).
pub fn uuid_string(b: &[u8; 16]) -> String {
    let h: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}
