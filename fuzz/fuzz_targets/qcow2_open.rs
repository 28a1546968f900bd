//! Fuzzes opening, reading, writing, snapshotting and checking qcow2
//! images (`formats::qcow2::fuzz_open_read`, on in-memory storage).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| formats::qcow2::fuzz_open_read(data));
