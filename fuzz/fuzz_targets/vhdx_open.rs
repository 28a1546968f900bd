//! Fuzzes opening, replaying logs of, reading, writing and checking
//! hostile vhdx images (`formats::vhdx::fuzz_open_read`, on in-memory
//! storage; inputs may be packed, see `formats::vhdx::fuzz::pack`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| formats::vhdx::fuzz_open_read(data));
