//! Fuzzes opening, checking, reading and writing hostile QED images
//! (`formats::qed::fuzz_open`): header, L1/L2 tables, need-check repair,
//! allocation.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| formats::qed::fuzz_open(data));
