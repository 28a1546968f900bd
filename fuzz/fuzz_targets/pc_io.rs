//! Fuzzes the pc machine's port I/O, fw_cfg DMA and MMIO decode.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm::harness::pc_io(data));
