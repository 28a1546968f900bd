//! Fuzzes the iSCSI initiator's parsers (`block::iscsi`): Basic Header
//! Segments from a target (lengths bounded before anything is read),
//! sense data, Reject payloads, login text keys, the operational
//! negotiation and the CHAP answer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| block::iscsi::pdu::fuzz_parsers(data));
