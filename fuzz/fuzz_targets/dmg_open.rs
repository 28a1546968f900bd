//! Fuzzes opening and reading hostile dmg images
//! (`formats::dmg::fuzz_open`): trailer, block tables (XML property
//! list or resource fork) and chunks, read through the block layer's
//! mapping.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| formats::dmg::fuzz_open(data));
