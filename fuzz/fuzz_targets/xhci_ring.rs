//! Fuzzes the xHCI: TRBs, ring walks, commands and transfers, all from
//! guest memory the input fills.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::harness::xhci_ring(data));
