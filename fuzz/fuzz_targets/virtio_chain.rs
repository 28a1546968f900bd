//! Fuzzes the virtio-blk descriptor-chain parser over guest memory.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::harness::virtio_chain(data));
