//! Replays the `iscsi_pdu` fuzz corpus (`fuzz/corpus/iscsi_pdu`) through
//! the iSCSI message parsers, plus every truncation of each input: none may
//! panic.

#[test]
fn iscsi_pdu_corpus() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/iscsi_pdu");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).expect("corpus directory") {
        let data = std::fs::read(e.unwrap().path()).unwrap();
        for cut in 0..=data.len() {
            block::iscsi::pdu::fuzz_parsers(&data[..cut]);
        }
        n += 1;
    }
    assert!(n > 0, "empty corpus in {}", dir.display());
}
