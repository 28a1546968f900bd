//! Fuzzes a migration destination: the input is the stream a hostile
//! source sends to a q35 machine (see `vmm::harness::migration_stream`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::harness::migration_stream(data));
