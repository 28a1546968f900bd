//! Throttling: leaky buckets really limit IOPS and bandwidth, sync and
//! async; groups share limits; `-drive throttling.*` parsing.

use block::backend::{BackendConfig, BlockBackend, CompletionQueue};
use block::drive::parse_drive;
use block::graph::BlockGraph;
use block::throttle::{Limit, ThrottleConfig};
use std::time::{Duration, Instant};

fn null_backend(g: &BlockGraph, name: &str, cfg: BackendConfig) -> std::sync::Arc<BlockBackend> {
    let n = g
        .blockdev_add_str(&format!("driver=null-co,node-name={name},size=64M"))
        .unwrap();
    BlockBackend::new(name, n, cfg).unwrap()
}

fn iops(avg: u64) -> ThrottleConfig {
    ThrottleConfig {
        iops: [
            Limit {
                avg,
                max: 0,
                max_length: 1,
            },
            Limit::default(),
            Limit::default(),
        ],
        ..Default::default()
    }
}

#[test]
fn iops_limit_sync_and_async() {
    let g = BlockGraph::new();
    let blk = null_backend(
        &g,
        "a",
        BackendConfig {
            throttle: iops(200),
            ..Default::default()
        },
    );
    let t = Instant::now();
    let mut b = [0u8; 512];
    for i in 0..100 {
        blk.read_at(i * 512, &mut b).unwrap();
    }
    let e = t.elapsed();
    // 200 IOPS with a 20-op bucket: about (100 - 20) / 200 = 0.4 s.
    assert!(e >= Duration::from_millis(350), "{e:?}");
    assert!(e < Duration::from_secs(2), "{e:?}");

    let q = CompletionQueue::new().unwrap();
    let t = Instant::now();
    for i in 0..100 {
        blk.submit(block::backend::read_request(i * 512, 512), q.completion(i));
    }
    let mut n = 0;
    while n < 100 {
        n += q.wait().len();
    }
    let e = t.elapsed();
    assert!(e >= Duration::from_millis(350), "{e:?}");
    assert!(e < Duration::from_secs(2), "{e:?}");
}

#[test]
fn bps_write_limit_leaves_reads_alone() {
    let g = BlockGraph::new();
    let mut cfg = ThrottleConfig::default();
    cfg.bps[2] = Limit {
        avg: 4 << 20,
        max: 0,
        max_length: 1,
    };
    let blk = null_backend(
        &g,
        "b",
        BackendConfig {
            throttle: cfg,
            ..Default::default()
        },
    );
    let buf = vec![0u8; 64 << 10];
    let t = Instant::now();
    for i in 0..32u64 {
        blk.write_at(i * (64 << 10), &buf).unwrap();
    }
    let e = t.elapsed();
    // 2 MiB at 4 MiB/s minus a 0.4 MiB bucket: about 0.4 s.
    assert!(e >= Duration::from_millis(300), "{e:?}");
    let t = Instant::now();
    let mut r = vec![0u8; 64 << 10];
    for i in 0..32u64 {
        blk.read_at(i * (64 << 10), &mut r).unwrap();
    }
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "reads are not limited"
    );
}

#[test]
fn group_shares_the_budget() {
    let g = BlockGraph::new();
    let cfg = |_: ()| BackendConfig {
        throttle: iops(100),
        throttle_group: Some("shared-test-group".into()),
        ..Default::default()
    };
    let a = null_backend(&g, "ga", cfg(()));
    let b = null_backend(&g, "gb", cfg(()));
    let t = Instant::now();
    let h = {
        let a = a.clone();
        std::thread::spawn(move || {
            let mut x = [0u8; 512];
            for _ in 0..55 {
                a.read_at(0, &mut x).unwrap();
            }
        })
    };
    let mut x = [0u8; 512];
    for _ in 0..55 {
        b.read_at(0, &mut x).unwrap();
    }
    h.join().unwrap();
    // 110 ops through one 100 IOPS budget: about 1 s (each alone: 0.45 s).
    let e = t.elapsed();
    assert!(e >= Duration::from_millis(850), "{e:?}");
}

#[test]
fn drive_throttling_options() {
    let s = parse_drive("file=x.img,if=none,throttling.iops-total=300,throttling.bps-write=1048576,throttling.iops-total-max=600,throttling.iops-total-max-length=5,throttling.group=g1,throttling.iops-size=4096").unwrap();
    let t = s.backend.throttle;
    assert_eq!(
        t.iops[0],
        Limit {
            avg: 300,
            max: 600,
            max_length: 5
        }
    );
    assert_eq!(t.bps[2].avg, 1 << 20);
    assert_eq!(t.iops_size, 4096);
    assert_eq!(s.backend.throttle_group.as_deref(), Some("g1"));
    // Legacy spellings.
    let s = parse_drive("file=x.img,if=none,iops=100,bps_rd=2097152,group=g2").unwrap();
    assert_eq!(s.backend.throttle.iops[0].avg, 100);
    assert_eq!(s.backend.throttle.bps[1].avg, 2 << 20);
    assert_eq!(s.backend.throttle_group.as_deref(), Some("g2"));
    for (d, want) in [
        (
            "file=x,throttling.iops-total-max=5",
            "-drive: iops-total-max requires iops-total",
        ),
        (
            "file=x,throttling.bps-total=5,throttling.bps-read=1",
            "-drive: bps-total and bps-read/bps-write cannot be used at the same time",
        ),
        (
            "file=x,throttling.bogus=1",
            "-drive: invalid parameter 'throttling.bogus'",
        ),
        (
            "file=x,throttling.iops-total=lots",
            "-drive: parameter 'throttling.iops-total' expects a non-negative integer, got 'lots'",
        ),
    ] {
        assert_eq!(parse_drive(d).unwrap_err().to_string(), want, "{d}");
    }
}
