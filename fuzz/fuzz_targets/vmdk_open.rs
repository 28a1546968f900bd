//! Fuzzes opening, reading, writing and checking hostile vmdk images
//! (`formats::vmdk::fuzz_open_read`, on in-memory storage).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| formats::vmdk::fuzz_open_read(data));
