//! Fuzzes the UHCI: link pointers, queue heads and TDs parsed, and the
//! frame list walked over the input as guest RAM.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::harness::usb_uhci(data));
