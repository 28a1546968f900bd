//! Fuzzes the QMP monitor's input side: framing of a byte stream into
//! JSON texts, QEMU's single-quote extension, envelope checks and typed
//! argument parsing (`vmm::monitor::qmp::fuzz_input`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::monitor::qmp::fuzz_input(data));
