//! Fuzzes opening, reading, writing and (vdi) checking hostile vpc
//! images (`formats::vpc::fuzz_open_read`, on in-memory storage).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| formats::vpc::fuzz_open_read(data));
