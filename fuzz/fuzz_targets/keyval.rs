//! Fuzzes QEMU's option grammar (`block::keyval`): dotted and JSON forms,
//! implied keys, flags, sizes and typed access.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| block::harness::keyval(data));
