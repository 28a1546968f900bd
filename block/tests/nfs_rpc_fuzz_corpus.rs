//! Replays the `nfs_rpc` fuzz corpus (`fuzz/corpus/nfs_rpc`) through the
//! NFS reply decoders, plus every truncation of each input: none may
//! panic.

#[test]
fn nfs_rpc_corpus() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/nfs_rpc");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).expect("corpus directory") {
        let data = std::fs::read(e.unwrap().path()).unwrap();
        for cut in 0..=data.len() {
            block::nfs::rpc::fuzz_replies(&data[..cut]);
        }
        n += 1;
    }
    assert!(n > 0, "empty corpus in {}", dir.display());
}
