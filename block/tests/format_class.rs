//! The driver class and registry: kinds, probing by score, typed create
//! options and their help, creation through a class, and compressed
//! writes as requests (`IoFlags::COMPRESSED`): stored compressed by qcow2
//! (synchronously and through `submit`), refused by raw.

mod common;

use block::backend::{BackendConfig, BlockBackend, CompletionQueue};
use block::driver::{IoRequest, Perms};
use block::format::{self, CreateOpts, DriverKind, OptValue};
use block::graph::BlockGraph;
use block::iov::IoVecs;
use common::{pattern, TempDir};

#[test]
fn registry_knows_kinds_and_probes_by_score() {
    let g = BlockGraph::new();
    assert_eq!(g.class("file").unwrap().kind(), DriverKind::Protocol);
    assert_eq!(g.class("qcow2").unwrap().kind(), DriverKind::Format);
    assert_eq!(g.class("throttle").unwrap().kind(), DriverKind::Filter);
    assert_eq!(g.class("vmdk").unwrap().kind(), DriverKind::Format);
    assert_eq!(g.class("qed").unwrap().kind(), DriverKind::Format);
    assert_eq!(g.class("vvfat").unwrap().kind(), DriverKind::Protocol);
    assert!(g.class("vxhs").is_none());
    let classes = g.classes();
    let mut head = vec![0u8; 512];
    assert_eq!(format::probe(&classes, &head, "x"), None);
    head[..4].copy_from_slice(b"QFI\xfb");
    head[7] = 3;
    assert_eq!(
        format::probe(&classes, &head, "x").as_deref(),
        Some("qcow2")
    );
    head[..4].copy_from_slice(b"KDMV");
    assert_eq!(format::probe(&classes, &head, "x").as_deref(), Some("vmdk"));
    // A format no driver implements (qcow version 1) is named, not taken
    // for raw.
    head[..4].copy_from_slice(b"QFI\xfb");
    head[7] = 1;
    assert_eq!(format::probe(&classes, &head, "x").as_deref(), Some("qcow"));
    // The kind names the driver in option errors.
    let e = g
        .blockdev_add_str("driver=null-co,node-name=f,bogus=1")
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Block protocol 'null-co' doesn't support the option 'bogus'"
    );
}

#[test]
fn create_options_are_typed_and_listed() {
    let table = format::class("qcow2").unwrap().create_options();
    let o = CreateOpts::parse(
        table,
        &[
            "cluster_size=4k,lazy_refcounts=on".into(),
            "refcount_bits=8".into(),
        ],
    )
    .unwrap();
    assert_eq!(o.num("cluster_size"), Some(4096));
    assert_eq!(o.bool("lazy_refcounts"), Some(true));
    assert_eq!(o.num("refcount_bits"), Some(8));
    let err = |a: &str| {
        CreateOpts::parse(table, &[a.into()])
            .unwrap_err()
            .to_string()
    };
    assert_eq!(err("bogus=1"), "Invalid parameter 'bogus'");
    assert_eq!(
        err("extended_l2=maybe"),
        "Parameter 'extended_l2' expects 'on' or 'off'"
    );
    assert!(err("cluster_size=1Q").starts_with("Parameter 'cluster_size' expects a size"));
    let help = format::options_help(table);
    assert!(help.starts_with("Supported options:\n"), "{help}");
    assert!(
        help.contains("  cluster_size=<size>    - qcow2 cluster size\n"),
        "{help}"
    );
    // Options accepted without help are not listed.
    assert!(!help.contains("nocow"), "{help}");
}

fn create(class: &str, path: &str, size: u64) {
    let c = format::class(class).unwrap();
    let mut o = CreateOpts::default();
    o.set("size", OptValue::Num(size));
    c.create_summary(path, &o).unwrap();
    c.create(path, &o).unwrap();
}

fn backend(g: &BlockGraph, path: &str, fmt: &str) -> std::sync::Arc<BlockBackend> {
    let n = g.open_image(path, Some(fmt), false, &[]).unwrap();
    let cfg = BackendConfig {
        shared: Perms::ALL,
        ..Default::default()
    };
    BlockBackend::new("", n, cfg).unwrap()
}

#[test]
fn compressed_writes_are_requests() {
    let t = TempDir::new("fmtclass");
    let q = t.path("c.qcow2");
    create("qcow2", &q, 1 << 20);
    let g = BlockGraph::new();
    let b = backend(&g, &q, "qcow2");
    let data = pattern(65536, 7);
    b.write_compressed_at(0, &data).unwrap();
    // Asynchronously, through the node's submit.
    let cq = CompletionQueue::new().unwrap();
    b.submit(
        IoRequest::write_compressed(65536, IoVecs::from_vec(data.clone())),
        cq.completion(1),
    );
    let done = cq.wait();
    assert!(done[0].2.is_ok(), "{:?}", done[0].2);
    let mut back = vec![0u8; 65536];
    for off in [0u64, 65536] {
        b.read_at(off, &mut back).unwrap();
        assert!(back == data, "offset {off}");
        let st = b.block_status(off, 65536).unwrap();
        assert!(st.compressed && st.data && st.offset.is_none(), "{st:?}");
    }
    let root = b.root().unwrap();
    let info = root.driver().info().unwrap();
    assert_eq!(info.cluster_size, Some(65536));
    drop(root);
    drop(b);
    g.close_all();

    let r = t.path("r.raw");
    create("raw", &r, 1 << 20);
    let g = BlockGraph::new();
    let b = backend(&g, &r, "raw");
    let e = b.write_compressed_at(0, &data).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Compression is not supported for the 'raw' format"
    );
    let cq = CompletionQueue::new().unwrap();
    b.submit(
        IoRequest::write_compressed(0, IoVecs::from_vec(data.clone())),
        cq.completion(2),
    );
    assert!(cq.wait()[0].2.is_err());
    // Nothing was written.
    b.read_at(0, &mut back).unwrap();
    assert!(back.iter().all(|&x| x == 0));
}
