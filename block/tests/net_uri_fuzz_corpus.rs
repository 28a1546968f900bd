//! Replays the `net_uri` fuzz corpus (`fuzz/corpus/net_uri`) through the
//! network file name parsers, plus truncations of each input (every one
//! for short inputs, 64 spread over long ones): none may panic.

#[test]
fn net_uri_corpus() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/net_uri");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).expect("corpus directory") {
        let data = std::fs::read(e.unwrap().path()).unwrap();
        let step = (data.len() / 64).max(1);
        for cut in (0..=data.len()).step_by(step).chain([data.len()]) {
            block::neturi::fuzz_uri(&data[..cut]);
        }
        n += 1;
    }
    assert!(n > 0, "empty corpus in {}", dir.display());
}
