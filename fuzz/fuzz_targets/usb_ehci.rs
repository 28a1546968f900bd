//! Fuzzes the EHCI: queue heads and qTDs parsed, and the periodic and
//! asynchronous schedules walked over the input as guest RAM.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::harness::usb_ehci(data));
