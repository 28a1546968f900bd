//! The throttle and copy-on-read filters, and `-drive copy-on-read=on`.

mod common;

use block::backend::{BackendConfig, BlockBackend};
use block::driver::{BlockDriver, Extent};
use block::error::BlockResult;
use block::graph::{Backing, BlockGraph, OpenCtx};
use block::node::Node;
use block::throttle::{Limit, Throttle, ThrottleConfig};
use common::*;
use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

static OVERLAY_WRITES: AtomicU64 = AtomicU64::new(0);

/// A tiny in-memory overlay format over a backing node (test only): blocks
/// written here are "allocated"; the rest is read from the backing node.
struct MemOverlay {
    backing: Arc<Node>,
    blocks: Mutex<HashMap<u64, Vec<u8>>>,
}

impl MemOverlay {
    fn open(ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        let Backing::Node(backing) = ctx.take_backing()? else {
            return Err(block::error::BlockError::Open(
                "mem-overlay needs a backing node".into(),
            ));
        };
        Ok(Arc::new(MemOverlay {
            backing,
            blocks: Mutex::new(HashMap::new()),
        }))
    }
}

impl BlockDriver for MemOverlay {
    fn driver_name(&self) -> &'static str {
        "mem-overlay"
    }
    fn len(&self) -> u64 {
        self.backing.len()
    }
    fn read_vectored(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> BlockResult<()> {
        let len = iov.iter().map(|s| s.len()).sum::<usize>();
        let mut flat = vec![0u8; len];
        self.backing
            .read_vectored(offset, &mut [IoSliceMut::new(&mut flat)])?;
        let b = self.blocks.lock().unwrap();
        for (i, chunk) in flat.chunks_mut(512).enumerate() {
            if let Some(d) = b.get(&(offset / 512 + i as u64)) {
                chunk.copy_from_slice(&d[..chunk.len()]);
            }
        }
        block::iov::scatter(&flat, iov);
        Ok(())
    }
    fn write_vectored(&self, offset: u64, iov: &[IoSlice<'_>], _fua: bool) -> BlockResult<()> {
        OVERLAY_WRITES.fetch_add(1, Ordering::SeqCst);
        let len = iov.iter().map(|s| s.len()).sum::<usize>();
        let mut flat = vec![0u8; len];
        block::iov::gather(iov, &mut flat);
        let mut b = self.blocks.lock().unwrap();
        for (i, chunk) in flat.chunks(512).enumerate() {
            b.insert(offset / 512 + i as u64, chunk.to_vec());
        }
        Ok(())
    }
    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> BlockResult<Extent> {
        let b = self.blocks.lock().unwrap();
        let first = b.contains_key(&(offset / 512));
        let mut n = 512 - offset % 512;
        while n < len && b.contains_key(&((offset + n) / 512)) == first {
            n += 512;
        }
        Ok(Extent {
            len: n.min(len),
            data: true,
            zero: false,
            offset: None,
            allocated: first,
            compressed: false,
        })
    }
}

#[test]
fn copy_on_read_populates_the_top_layer_once() {
    let dir = TempDir::new("cor");
    let img = dir.file("base.img", 1 << 20);
    std::fs::write(&img, pattern(1 << 20, 5)).unwrap();
    let g = BlockGraph::new();
    g.register_driver("mem-overlay", MemOverlay::open);
    g.blockdev_add_str(&format!(
        "driver=raw,node-name=base,read-only=on,file.driver=file,file.filename={img}"
    ))
    .unwrap();
    let top = g
        .blockdev_add_str("driver=mem-overlay,node-name=top,backing=base")
        .unwrap();
    let cor = g
        .blockdev_add_str("driver=copy-on-read,node-name=cor,file=top")
        .unwrap();
    let blk = BlockBackend::new("d", cor, BackendConfig::default()).unwrap();
    assert!(!top.block_status(8192, 4096).unwrap().allocated);
    let mut buf = vec![0u8; 4096];
    let before = OVERLAY_WRITES.load(Ordering::SeqCst);
    blk.read_at(8192, &mut buf).unwrap();
    assert_eq!(buf, pattern(1 << 20, 5)[8192..12288]);
    assert_eq!(
        OVERLAY_WRITES.load(Ordering::SeqCst),
        before + 1,
        "copied up"
    );
    let st = top.block_status(8192, 4096).unwrap();
    assert!(st.allocated && st.len == 4096, "{st:?}");
    // A second read is served locally: no more writes.
    blk.read_at(8192, &mut buf).unwrap();
    assert_eq!(OVERLAY_WRITES.load(Ordering::SeqCst), before + 1);
    // Partially allocated range: only the missing part is copied.
    let mut big = vec![0u8; 16384];
    blk.read_at(4096, &mut big).unwrap();
    assert_eq!(big, pattern(1 << 20, 5)[4096..20480]);
    assert!(top.block_status(4096, 16384).unwrap().allocated);
    assert!(top.block_status(16384, 4096).unwrap().allocated);
}

#[test]
fn drive_copy_on_read_option() {
    let s = block::drive::parse_drive("file=x.img,if=none,copy-on-read=on").unwrap();
    assert!(s.copy_on_read);
    let e =
        block::drive::parse_drive("file=x.img,if=none,copy-on-read=on,readonly=on").unwrap_err();
    assert_eq!(
        e.to_string(),
        "-drive: Can't use copy-on-read on read-only device"
    );
    // The filter really sits on top.
    let dir = TempDir::new("cor2");
    let img = dir.file("d.img", 65536);
    let g = BlockGraph::new();
    let blk = block::drive::parse_drive(&format!(
        "file={img},format=raw,if=none,id=c,copy-on-read=on"
    ))
    .unwrap()
    .open(&g)
    .unwrap();
    assert_eq!(blk.root().unwrap().driver_name(), "copy-on-read");
    assert_eq!(
        blk.root().unwrap().child("file").unwrap().driver_name(),
        "raw"
    );
    blk.write_at(0, &[7; 512]).unwrap();
    let mut b = [0u8; 512];
    blk.read_at(0, &mut b).unwrap();
    assert_eq!(b, [7; 512]);
}

#[test]
fn throttle_filter_uses_its_group() {
    let mut cfg = ThrottleConfig::default();
    cfg.iops[0] = Limit {
        avg: 100,
        max: 0,
        max_length: 1,
    };
    Throttle::define_group("filter-tg", cfg).unwrap();
    assert!(Throttle::define_group("filter-tg", cfg).is_err());
    let g = BlockGraph::new();
    g.blockdev_add_str("driver=null-co,node-name=nul").unwrap();
    let n = g
        .blockdev_add_str("driver=throttle,node-name=thr,throttle-group=filter-tg,file=nul")
        .unwrap();
    let blk = BlockBackend::new("t", n, BackendConfig::default()).unwrap();
    let t = Instant::now();
    let mut b = [0u8; 512];
    for _ in 0..50 {
        blk.read_at(0, &mut b).unwrap();
    }
    // 50 ops at 100 IOPS with a 10-op bucket: about 0.4 s.
    assert!(
        t.elapsed() >= Duration::from_millis(350),
        "{:?}",
        t.elapsed()
    );
    let e = g
        .blockdev_add_str("driver=throttle,node-name=thr2,throttle-group=nope,file=nul")
        .unwrap_err();
    assert_eq!(e.to_string(), "Throttle group 'nope' does not exist");
}

/// QEMU's protocol-prefixed filenames in `-drive file=`: `null-co://`,
/// `blkdebug::IMAGE` and `blkdebug:RULES:IMAGE` with a rule file.
#[test]
fn drive_filenames_with_a_protocol_prefix() {
    let g = BlockGraph::new();
    let blk = block::drive::parse_drive("file=null-co://,format=raw,if=none,id=n,file.size=1M")
        .unwrap()
        .open(&g)
        .unwrap();
    assert_eq!(blk.len(), 1 << 20);
    assert_eq!(
        blk.root().unwrap().child("file").unwrap().driver_name(),
        "null-co"
    );

    let dir = TempDir::new("blkdebug-name");
    let img = dir.file("d.img", 65536);
    let blk = block::drive::parse_drive(&format!("file=blkdebug::{img},format=raw,if=none,id=b"))
        .unwrap()
        .open(&g)
        .unwrap();
    assert_eq!(
        blk.root().unwrap().child("file").unwrap().driver_name(),
        "blkdebug"
    );
    let mut b = [0u8; 512];
    blk.read_at(0, &mut b).unwrap();

    let rules = dir.path("rules.conf");
    std::fs::write(
        &rules,
        "# fail every read\n[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\n",
    )
    .unwrap();
    let img2 = dir.file("e.img", 65536);
    let blk = block::drive::parse_drive(&format!(
        "file=blkdebug:{rules}:{img2},format=raw,if=none,id=c"
    ))
    .unwrap()
    .open(&g)
    .unwrap();
    assert!(blk.read_at(0, &mut b).is_err(), "the rule file's error");
    blk.write_at(0, &[1; 512]).unwrap();
}

/// `block_set_io_throttle`'s backend side: limits set on an unthrottled
/// backend take effect, and all-zero limits remove them again.
#[test]
fn io_limits_change_at_run_time() {
    let g = BlockGraph::new();
    let n = g.blockdev_add_str("driver=null-co,node-name=nul").unwrap();
    let blk = BlockBackend::new("rt", n, BackendConfig::default()).unwrap();
    let mut b = [0u8; 512];
    let timed = |blk: &BlockBackend, b: &mut [u8]| {
        let t = Instant::now();
        for _ in 0..50 {
            blk.read_at(0, b).unwrap();
        }
        t.elapsed()
    };
    assert!(timed(&blk, &mut b) < Duration::from_millis(100));
    let mut cfg = ThrottleConfig::default();
    cfg.iops[1] = Limit {
        avg: 100,
        max: 0,
        max_length: 1,
    };
    blk.set_io_limits(cfg, None);
    assert_eq!(blk.io_limits(), cfg);
    // 50 reads at 100 IOPS with a 10-op bucket: about 0.4 s.
    let e = timed(&blk, &mut b);
    assert!(e >= Duration::from_millis(350), "{e:?}");
    blk.set_io_limits(ThrottleConfig::default(), None);
    assert!(timed(&blk, &mut b) < Duration::from_millis(100));
}

/// blkdebug's state machine and qemu-io breakpoints, as QEMU's ide-test
/// uses them: an error rule limited to state 1 with a `[set-state]` that
/// leaves it (the request that fails is the only one), and a breakpoint
/// that holds a flush until `resume`.
#[test]
fn blkdebug_states_and_breakpoints() {
    use block::driver::DebugCommand;
    let g = BlockGraph::new();
    let dir = TempDir::new("blkdebug-state");
    let rules = dir.path("rules.conf");
    std::fs::write(
        &rules,
        "[inject-error]\nevent = \"flush_to_disk\"\nerrno = \"5\"\nstate = \"1\"\n\n\
         [inject-error]\nevent = \"read_aio\"\nstate = \"2\"\n\n\
         [set-state]\nevent = \"flush_to_disk\"\nnew_state = \"2\"\n",
    )
    .unwrap();
    let img = dir.file("s.img", 65536);
    let blk = block::drive::parse_drive(&format!(
        "file=blkdebug:{rules}:{img},format=raw,if=none,id=s"
    ))
    .unwrap()
    .open(&g)
    .unwrap();
    let mut b = [0u8; 512];
    blk.read_at(0, &mut b).expect("state 1: reads pass");
    assert!(blk.flush().is_err(), "state 1: the flush fails");
    blk.flush().expect("state 2: flushes pass");
    assert!(blk.read_at(0, &mut b).is_err(), "state 2: reads fail");

    let img2 = dir.file("b.img", 65536);
    let blk = Arc::new(
        block::drive::parse_drive(&format!("file=blkdebug::{img2},format=raw,if=none,id=b"))
            .unwrap()
            .open(&g)
            .unwrap(),
    );
    let root = blk.root().unwrap();
    let brk = DebugCommand::Break {
        event: "flush_to_os".into(),
        tag: "A".into(),
    };
    let resume = DebugCommand::Resume { tag: "A".into() };
    assert_eq!(
        root.debug_command(&resume),
        Err(libc::ENOENT),
        "nothing held"
    );
    root.debug_command(&brk).unwrap();
    let held = blk.clone();
    let t = std::thread::spawn(move || held.flush());
    std::thread::sleep(Duration::from_millis(200));
    assert!(!t.is_finished(), "the flush is held");
    root.debug_command(&resume).unwrap();
    t.join().unwrap().expect("released, it completes");
    blk.flush().expect("a breakpoint fires once");
    root.debug_command(&brk).unwrap();
    root.debug_command(&DebugCommand::RemoveBreak { tag: "A".into() })
        .unwrap();
    blk.flush().expect("a removed breakpoint holds nothing");

    // A node with no blkdebug under it cannot take breakpoints.
    let plain = dir.file("p.img", 65536);
    let blk = block::drive::parse_drive(&format!("file={plain},format=raw,if=none,id=p"))
        .unwrap()
        .open(&g)
        .unwrap();
    assert_eq!(blk.root().unwrap().debug_command(&brk), Err(libc::ENOTSUP));
}

/// QEMU's ahci-test `/ahci/flush/retry` at the block layer: qcow2 over
/// blkdebug with an error on the first `flush_to_disk`. An allocating
/// write into a fresh image (a new L2 table, a new data cluster) must not
/// flush the file: its metadata stays in the qcow2 caches until the guest
/// flushes. The first flush meets the injected error, the second writes
/// the metadata back; the image is then clean for `qemu-img check` and
/// holds the data. Both the synchronous write path and the asynchronous
/// one (`submit`, as the device models use it) are checked; with the
/// write cache off every write is FUA and must flush, hitting the error.
#[test]
fn qcow2_allocating_writes_do_not_flush_the_file() {
    use block::driver::IoRequest;
    use block::iov::IoVecs;
    let dir = TempDir::new("qcow2-flush-retry");
    let rules = dir.path("rules.conf");
    std::fs::write(
        &rules,
        "[inject-error]\nevent = \"flush_to_disk\"\nerrno = \"5\"\nstate = \"1\"\n\
         immediately = \"off\"\nonce = \"on\"\n\n\
         [set-state]\nevent = \"flush_to_disk\"\nnew_state = \"2\"\n",
    )
    .unwrap();
    for (mode, asynch, wce) in [
        ("sync", false, true),
        ("async", true, true),
        ("writethrough", false, false),
    ] {
        let img = dir.path(&format!("{mode}.qcow2"));
        let (c, o) = qemu("qemu-img", &["create", "-q", "-f", "qcow2", &img, "64M"]);
        assert_eq!(c, 0, "{o}");
        let g = BlockGraph::new();
        let blk = Arc::new(
            block::drive::parse_drive(&format!(
                "file=blkdebug:{rules}:{img},format=qcow2,if=none,id={mode},cache=writeback"
            ))
            .unwrap()
            .open(&g)
            .unwrap(),
        );
        blk.set_write_cache(wce);
        let data = vec![0xa5u8; 512];
        let r = if asynch {
            let (tx, rx) = std::sync::mpsc::channel();
            blk.submit(
                IoRequest::write(0, IoVecs::from_vec(data.clone()), false),
                Box::new(move |_, res| tx.send(res).unwrap()),
            );
            rx.recv().unwrap()
        } else {
            blk.write_at(0, &data)
        };
        if !wce {
            // FUA: the write's metadata must be durable, so it flushes
            // (and meets the error); the retry succeeds.
            assert!(r.is_err(), "{mode}: a FUA write must flush");
            blk.write_at(0, &data).expect("writethrough: the retry");
        } else {
            r.unwrap_or_else(|e| panic!("{mode}: the write flushed the file: {e}"));
            let e = blk.flush().expect_err("the first flush meets the error");
            assert!(
                e.to_string().contains("Input/output error") || e.to_string().contains("injected"),
                "{mode}: {e}"
            );
            blk.flush().expect("the retried flush succeeds");
        }
        let (c, o) = qemu("qemu-img", &["check", "-U", &img]);
        assert_eq!(c, 0, "{mode}: after the flush: {o}");
        drop(blk);
        drop(g);
        let (c, o) = qemu("qemu-img", &["check", &img]);
        assert_eq!(c, 0, "{mode}: after close: {o}");
        let (c, o) = qemu("qemu-io", &["-c", "read -P 0xa5 0 512", &img]);
        assert!(c == 0 && !o.contains("fail"), "{mode}: {o}");
    }
}
