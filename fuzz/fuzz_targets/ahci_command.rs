//! Fuzzes AHCI's command parsing: a command header and its command table
//! (command FIS, ATAPI command, PRDT) into a typed command.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| devices::harness::ahci_command(data));
