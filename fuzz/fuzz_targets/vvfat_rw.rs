//! Fuzzes what vvfat parses and acts on from the guest: its FAT and
//! directories, and their write-back into a scratch directory
//! (`block::vvfat::fuzz`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| block::vvfat::fuzz::vvfat_rw(data));
