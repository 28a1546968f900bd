//! Fuzzes usb-ccid: setup packets and CCID bulk messages, whole and cut
//! into packets, and the interrupt pipe.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::harness::usb_ccid(data));
