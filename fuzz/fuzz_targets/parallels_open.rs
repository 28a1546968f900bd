//! Fuzzes opening and reading hostile parallels images
//! (`formats::parallels::fuzz_open`): header, tables and data, read through
//! the block layer's mapping.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| formats::parallels::fuzz_open(data));
