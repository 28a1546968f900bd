//! Fuzzes opening and reading hostile cloop images
//! (`formats::cloop::fuzz_open`): header, tables and data, read through
//! the block layer's mapping.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| formats::cloop::fuzz_open(data));
