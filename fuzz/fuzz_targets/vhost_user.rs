//! Fuzzes the vhost-user back end's handling of a hostile front end's
//! requests (memory tables, ring set-up, starting and stopping rings,
//! configuration) and the rings it then runs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::harness::vhost_user(data));
