//! Replays the `nbd_proto` fuzz corpus (`fuzz/corpus/nbd_proto`) through
//! the NBD message parsers, plus every truncation of each input: none may
//! panic.

#[test]
fn nbd_proto_corpus() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/nbd_proto");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).expect("corpus directory") {
        let data = std::fs::read(e.unwrap().path()).unwrap();
        for cut in 0..=data.len() {
            block::nbd::proto::fuzz_parsers(&data[..cut]);
        }
        n += 1;
    }
    assert!(n > 0, "empty corpus in {}", dir.display());
}
