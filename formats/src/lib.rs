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
