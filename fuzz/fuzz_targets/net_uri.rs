//! Fuzzes the network storage file names (`ssh://`, `nfs://`): the URI
//! splitter (`block::neturi`) and each driver's option parsing, which
//! must refuse or accept without panicking.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| block::neturi::fuzz_uri(data));
