//! Fuzzes opening, reading and writing hostile qcow (version 1) images
//! (`formats::qcow::fuzz_open`): header, L1/L2 tables, compressed
//! clusters, AES sectors, allocation.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| formats::qcow::fuzz_open(data));
