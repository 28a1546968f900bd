//! Fuzzes usb-uas: COMMAND and TASK MANAGEMENT IUs and the transfers of
//! the four pipes, at high speed and with SuperSpeed streams.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::harness::usb_uas(data));
