//! Fuzzes usb-storage: setup packets, CBWs and bulk packets, whole and
//! through the control pipe a packet-level host controller uses.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::harness::usb_bot(data));
