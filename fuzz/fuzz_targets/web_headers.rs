//! Fuzzes the response header parsing of the web protocol nodes
//! (`block::curl`): `Accept-Ranges` and `Content-Range` lines as a
//! hostile server sends them.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| block::curl::fuzz_headers(data));
