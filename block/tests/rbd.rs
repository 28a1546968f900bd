//! The `rbd` node's data path against a real Ceph cluster on loopback
//! (tests/servers/ceph-cluster.sh): writes, reads, write-zeroes, discard
//! and flush through a `BlockBackend`, 32 asynchronous requests in flight
//! at once completed by librbd's callbacks, and every byte checked with
//! Ceph's own `rbd export`. Needs Debian's ceph-mon, ceph-osd, ceph-common
//! and librbd-dev (`make deps`).
#![cfg(have_rbd)]

use block::backend::BlockBackend;
use block::driver::IoRequest;
use block::graph::BlockGraph;
use block::iov::IoVecs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::sync::Arc;

struct Cluster {
    dir: PathBuf,
    conf: String,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/servers/ceph-cluster.sh")
}

impl Cluster {
    fn start(tag: &str) -> Cluster {
        let dir = std::env::temp_dir().join(format!("strata-rbd-{tag}-{}", std::process::id()));
        let mut c = Cluster {
            dir: dir.clone(),
            conf: String::new(),
        };
        let out = Command::new(script())
            .arg("start")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "the Ceph cluster did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        c.conf = String::from_utf8_lossy(&out.stdout)
            .trim()
            .lines()
            .last()
            .unwrap()
            .to_string();
        c
    }
    fn rbd(&self, args: &[&str]) {
        let st = Command::new("rbd")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "rbd {args:?}");
    }
    fn export(&self, image: &str) -> Vec<u8> {
        let p = self.dir.join(format!("{image}.export"));
        let _ = std::fs::remove_file(&p);
        self.rbd(&["export", &format!("rbd/{image}"), p.to_str().unwrap()]);
        std::fs::read(p).unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("stop").arg(&self.dir).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const MIB: u64 = 1 << 20;

#[test]
fn rbd_node_reads_writes_zeroes_discards_and_queues_requests() {
    let c = Cluster::start("data");
    c.rbd(&["create", "--size", "16M", "rbd/d"]);
    let g = BlockGraph::new();
    let node = g
        .blockdev_add_str(&format!(
            "driver=rbd,node-name=r,pool=rbd,image=d,conf={}",
            c.conf
        ))
        .unwrap();
    let blk = Arc::new(BlockBackend::new("b", node, Default::default()).unwrap());
    assert_eq!(blk.len(), 16 * MIB);
    let mut want = vec![0u8; 16 * MIB as usize];

    // Synchronous writes, unaligned and across objects (4 MiB each).
    let a: Vec<u8> = (0..3 * MIB as usize + 777)
        .map(|i| (i % 251) as u8)
        .collect();
    blk.write_at(MIB + 3, &a).unwrap();
    want[MIB as usize + 3..][..a.len()].copy_from_slice(&a);
    let mut back = vec![0u8; a.len()];
    blk.read_at(MIB + 3, &mut back).unwrap();
    assert!(back == a);

    // 32 writes in flight at once, completed by librbd's callbacks.
    let (tx, rx) = mpsc::channel();
    for i in 0..32u64 {
        let buf = vec![0x80 | i as u8; 64 * 1024];
        let off = 8 * MIB + i * 96 * 1024;
        want[off as usize..][..buf.len()].copy_from_slice(&buf);
        let tx = tx.clone();
        blk.submit(
            IoRequest::write(off, IoVecs::from_vec(buf), i % 4 == 0),
            Box::new(move |_req, res| tx.send(res).unwrap()),
        );
    }
    for _ in 0..32 {
        rx.recv().unwrap().unwrap();
    }
    // And 32 reads of them.
    let (tx, rx) = mpsc::channel();
    for i in 0..32u64 {
        let off = 8 * MIB + i * 96 * 1024;
        let tx = tx.clone();
        blk.submit(
            IoRequest::read(off, IoVecs::from_vec(vec![0; 64 * 1024])),
            Box::new(move |req, res| {
                tx.send(res.map(|()| (i, req.iov.into_vec().unwrap())))
                    .unwrap()
            }),
        );
    }
    for _ in 0..32 {
        let (i, data) = rx.recv().unwrap().unwrap();
        assert!(data.iter().all(|&b| b == 0x80 | i as u8), "read {i}");
    }

    // Write-zeroes and discard read back as zeroes.
    blk.write_zeroes(2 * MIB, MIB, false).unwrap();
    want[2 * MIB as usize..3 * MIB as usize].fill(0);
    blk.discard(12 * MIB, 4 * MIB).unwrap();
    // Discard is advisory; a whole object's discard frees it (zeroes).
    want[12 * MIB as usize..].fill(0);
    blk.flush().unwrap();
    drop(blk);
    drop(g);

    let got = c.export("d");
    assert_eq!(got.len(), want.len());
    for (i, (a, b)) in got.chunks(4096).zip(want.chunks(4096)).enumerate() {
        assert!(a == b, "4 KiB block {i} differs");
    }
}
