//! Fuzzes the NFS driver's reply decoders (`block::nfs::rpc`): ONC RPC
//! reply headers and the MNT, GETATTR, LOOKUP, READ, WRITE, CREATE, FSINFO
//! and COMMIT results (the first byte picks the decoder).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| block::nfs::rpc::fuzz_replies(data));
