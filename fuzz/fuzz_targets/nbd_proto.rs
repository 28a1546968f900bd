//! Fuzzes the NBD message parsers shared by Strata's client and server
//! (`block::nbd::proto`): greeting, option requests and replies, request
//! headers against an export (compact and extended), reply headers and
//! chunks (structured and extended, `BLOCK_STATUS_EXT`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| block::nbd::proto::fuzz_parsers(data));
