//! Fuzzes opening hostile LUKS images (`formats::luks::fuzz_open`): the
//! header, the key slots (PBKDF2 bounded low, the anti-forensic merge,
//! the master key digest) and sector decryption.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| formats::luks::fuzz_open(data));
