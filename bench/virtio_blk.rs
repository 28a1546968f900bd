//! Benchmark, part 1 of issue 7: the virtio-blk device path in-process.
//!
//! A driver written here plays the guest over real guest memory (a
//! `GuestMemoryMmap`): it lays out a split virtqueue, keeps `depth` 4 KiB
//! requests (header, data, status: three descriptors) in flight, and after
//! each batch "notifies" by calling the device's queue handler directly,
//! as the iothread does when the ioeventfd fires. The backend is `null-co`,
//! so what is measured is Strata's own cost per request: chain walk and
//! checks, zero-copy iovecs, BlockBackend submission and completion, the
//! status byte, the used ring and the interrupt decision.
//!
//! Reported: requests/s and CPU time per request (process CPU time, which
//! includes the driver's own ring writes) at depths 1, 32 and 128.
//!
//! Run: `bench/virtio_blk.sh` (or `cargo run --release -p devices --example
//! virtio_blk_bench -- [seconds-per-depth] [read|write]`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block::backend::{BackendConfig, BlockBackend};
use block::graph::BlockGraph;
use devices::virtio::block::{BlockWorker, Limits};
use devices::virtio::{Activation, ActiveQueue, VirtioInterrupt};
use devices::GuestMem;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const QSIZE: u16 = 1024;
const DESC: u64 = 0x10_0000;
const AVAIL: u64 = DESC + 16 * QSIZE as u64;
const USED: u64 = 0x20_0000;
const BUFS: u64 = 0x100_0000;
const REQ_STRIDE: u64 = 0x2000;
const DATA_LEN: u32 = 4096;

#[derive(Default)]
struct CountIrq(AtomicU64);
impl VirtioInterrupt for CountIrq {
    fn signal_queue(&self, _: u16) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn signal_config(&self) {}
}

fn cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which we own.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

struct Driver {
    mem: GuestMem,
    avail_idx: u16,
    last_used: u16,
}

impl Driver {
    /// Request slot `i` uses descriptors 3i..3i+2 and its own buffers.
    fn build(&self, i: u16, ty: u32, sector: u64) {
        let base = BUFS + i as u64 * REQ_STRIDE;
        let (hdr, status, data) = (base, base + 16, base + 0x1000);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        let d = 3 * i as u64;
        let dw: u16 = if ty == 0 { 2 } else { 0 };
        for (k, (a, l, f)) in [(hdr, 16u32, 1u16), (data, DATA_LEN, 1 | dw), (status, 1, 2)]
            .into_iter()
            .enumerate()
        {
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&a.to_le_bytes());
            raw[8..12].copy_from_slice(&l.to_le_bytes());
            raw[12..14].copy_from_slice(&f.to_le_bytes());
            raw[14..16].copy_from_slice(&((d + k as u64 + 1) as u16).to_le_bytes());
            self.mem
                .write_slice(&raw, GuestAddress(DESC + 16 * (d + k as u64)))
                .unwrap();
        }
    }

    fn post(&mut self, i: u16) {
        let slot = AVAIL + 4 + 2 * (self.avail_idx % QSIZE) as u64;
        self.mem.write_obj(3 * i, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    fn publish(&self) {
        std::sync::atomic::fence(Ordering::Release);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    /// Collects used entries; returns the request slots that completed.
    fn reap(&mut self, out: &mut Vec<u16>) {
        let idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        while self.last_used != idx {
            let e = USED + 4 + 8 * (self.last_used % QSIZE) as u64;
            let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
            out.push((id / 3) as u16);
            self.last_used = self.last_used.wrapping_add(1);
        }
    }
}

fn run(depth: u16, secs: f64, ty: u32) -> (f64, f64, u64) {
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
    let graph = BlockGraph::new();
    let node = graph
        .blockdev_add_str("driver=null-co,node-name=n0,size=1G")
        .unwrap();
    let backend = BlockBackend::new("bench", node, BackendConfig::default()).unwrap();
    let mut q = Queue::new(QSIZE).unwrap();
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    let irq = Arc::new(CountIrq::default());
    let a = Activation {
        mem: mem.clone(),
        features: 0,
        queues: vec![ActiveQueue {
            index: 0,
            queue: q,
            notify: Arc::new(devices::virtio::Notifier::new().unwrap()),
        }],
        interrupt: irq.clone(),
    };
    let limits = Limits {
        capacity_sectors: backend.len() / 512,
        seg_max: QSIZE as u32 - 2,
        read_only: false,
        indirect: true,
        discard: true,
        write_zeroes: true,
    };
    let mut w = BlockWorker::new(a, backend, limits, None).unwrap();
    let mut drv = Driver {
        mem: mem.clone(),
        avail_idx: 0,
        last_used: 0,
    };
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next_sector = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % ((1 << 30) / 4096)) * 8
    };
    for i in 0..depth {
        drv.build(i, ty, next_sector());
        drv.post(i);
    }
    drv.publish();
    let mut done = Vec::with_capacity(depth as usize);
    let mut n: u64 = 0;
    let (t0, c0) = (Instant::now(), cpu_time());
    let deadline = Duration::from_secs_f64(secs);
    while t0.elapsed() < deadline {
        for _ in 0..64 {
            w.process_queue(0);
            done.clear();
            drv.reap(&mut done);
            n += done.len() as u64;
            for &i in &done {
                let st: u8 = mem
                    .read_obj(GuestAddress(BUFS + i as u64 * REQ_STRIDE + 16))
                    .unwrap();
                assert_eq!(st, 0, "request failed");
                drv.build(i, ty, next_sector());
                drv.post(i);
            }
            drv.publish();
        }
    }
    let (wall, cpu) = (t0.elapsed(), cpu_time() - c0);
    (
        n as f64 / wall.as_secs_f64(),
        cpu.as_nanos() as f64 / n as f64,
        irq.0.load(Ordering::Relaxed),
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs: f64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let ty = match args.get(2).map(String::as_str) {
        Some("write") => 1,
        _ => 0,
    };
    let what = if ty == 0 { "read" } else { "write" };
    println!("virtio-blk device path, null-co, 4 KiB random {what}, {secs} s per depth");
    println!("| depth | requests/s | CPU time per request | interrupts per request |");
    println!("|---|---|---|---|");
    for depth in [1u16, 32, 128] {
        let (rps, ns, irqs) = run(depth, secs, ty);
        let per = irqs as f64 / (rps * secs).max(1.0);
        println!("| {depth} | {rps:.0} | {ns:.0} ns | {per:.3} |");
    }
}
