//! Fuzzes the VDUSE back end's handling of the kernel's control messages
//! (status changes, ring state, IOTLB updates), the ring set-ups it reads
//! and the rings it then runs, through a kernel stand-in.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::harness::vduse(data));
