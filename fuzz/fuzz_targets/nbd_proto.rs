//! Fuzzes the NBD message parsers shared by Strata's client and server
//! (`block::nbd::proto`): greeting, option requests and replies, request
//! headers against an export, reply headers and structured chunks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| block::nbd::proto::fuzz_parsers(data));
