//! Fuzzes opening and reading hostile bochs images
//! (`formats::bochs::fuzz_open`): header, tables and data, read through
//! the block layer's mapping.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| formats::bochs::fuzz_open(data));
