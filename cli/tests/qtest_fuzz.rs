//! A qtest-level device fuzzer: seeded, structure-aware operation
//! sequences against IDE (disk and ATAPI CD-ROM), virtio-blk and fw_cfg on
//! a real `strata` process over the qtest socket, checking what a guest
//! must never be able to do to the host:
//!
//! - kill the process (a qtest command goes unanswered: the channel
//!   closes) or hang it (no answer within [`REPLY_TIMEOUT`]);
//! - leave a device busy for ever (IDE BSY, virtio requests never
//!   completed on a queue the device did not mark broken);
//! - make it spin (CPU time while the guest is idle);
//! - grow its memory without bound (VmRSS);
//! - change a read-only image (the CD-ROM and a `readonly=on`
//!   virtio-blk disk are hashed before and after), or write sectors of a
//!   writable image that no command addressed.
//!
//! Runs for `STRATA_QTEST_FUZZ_SECS` seconds (default 20; `make
//! qtest-fuzz` gives it 120) in rounds of one process each. The seed is
//! printed; `STRATA_QTEST_FUZZ_SEED=N` replays a run.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::qtest::Qtest;

/// How long one qtest command may take to answer before the run is
/// called a hang.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a device may take to finish what it was given once the
/// sequence is over.
const SETTLE: Duration = Duration::from_secs(5);
/// Operations per process.
const OPS_PER_ROUND: usize = 150;
/// Allowed VmRSS growth over a round (bounce buffers are at most 4 MiB).
const RSS_GROWTH_KIB: u64 = 128 << 10;

const SECTORS: u64 = 2048; // 1 MiB images
const CD_BLOCKS: u64 = 256;

const PRI: u16 = 0x1f0;
const SEC: u16 = 0x170;
const BM: u16 = 0xc000;
/// The two virtio-blk functions: slot, BAR4 (modern), ring base.
const VB: Virtio = Virtio {
    slot: 4,
    bar4: 0xfe00_0000,
    rings: 0x10_0000,
    bufs: 0x30_0000,
};
const VRO: Virtio = Virtio {
    slot: 5,
    bar4: 0xfe02_0000,
    rings: 0x11_0000,
    bufs: 0x50_0000,
};
const QSIZE: u16 = 64;
/// IDE DMA: PRD table and buffers.
const PRD: u64 = 0x8000;
const IDE_BUF: u64 = 0x20_0000;
/// fw_cfg DMA descriptor.
const FW_DMA: u64 = 0x9000;
/// Where random RAM writes go: away from every structure above.
const SCRATCH: u64 = 0x80_0000;

#[derive(Clone, Copy)]
struct Virtio {
    slot: u8,
    bar4: u64,
    rings: u64,
    bufs: u64,
}

impl Virtio {
    fn avail(&self) -> u64 {
        self.rings + 16 * QSIZE as u64
    }
    fn used(&self) -> u64 {
        (self.avail() + 6 + 2 * QSIZE as u64 + 4095) & !4095
    }
}

/// xorshift64*: small, and the same everywhere, so a seed replays.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len() as u64) as usize]
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn pattern_image(p: &Path, sectors: u64, tag: u8) {
    let mut d = Vec::with_capacity(sectors as usize * 512);
    for s in 0..sectors {
        let mut sec = [tag; 512];
        sec[..8].copy_from_slice(&s.to_le_bytes());
        d.extend_from_slice(&sec);
    }
    std::fs::write(p, d).unwrap();
}

/// Process CPU time (user + system) in clock ticks, from /proc/PID/stat.
fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) in parens.
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

struct Images {
    hd: PathBuf,
    cd: PathBuf,
    vb: PathBuf,
    vro: PathBuf,
}

impl Images {
    fn new() -> Images {
        let dir = support::scratch("qtest-fuzz");
        let im = Images {
            hd: dir.join("hd.raw"),
            cd: dir.join("cd.iso"),
            vb: dir.join("vb.raw"),
            vro: dir.join("vro.raw"),
        };
        im.reset();
        im
    }
    fn reset(&self) {
        pattern_image(&self.hd, SECTORS, 0x11);
        pattern_image(&self.cd, CD_BLOCKS * 4, 0xcd);
        pattern_image(&self.vb, SECTORS, 0x22);
        pattern_image(&self.vro, SECTORS, 0x33);
    }
}

/// One process and what the sequence did to it.
struct Round<'a> {
    q: Qtest,
    r: &'a mut Rng,
    /// Sectors of the writable images some command addressed.
    hd_written: BTreeSet<u64>,
    vb_written: BTreeSet<u64>,
    /// Requests made available per virtio device (index 0: VB, 1: VRO).
    avail_idx: [u16; 2],
    next_desc: [u16; 2],
    indirect: [bool; 2],
    log: Vec<String>,
}

fn ok(r: String, what: &str) {
    assert!(r.starts_with("OK"), "{what}: {r}");
}

impl Round<'_> {
    fn w(&mut self, cmd: &str) {
        let r = self.q.cmd(cmd);
        ok(r, cmd);
    }
    fn r(&mut self, cmd: &str) -> u64 {
        let r = self.q.cmd(cmd);
        let v = r
            .strip_prefix("OK 0x")
            .unwrap_or_else(|| panic!("'{cmd}': {r}"));
        u64::from_str_radix(v, 16).unwrap()
    }

    fn setup(&mut self) {
        // IDE bus mastering at BM.
        self.q.pci_write32(1, 1, 0x20, BM as u32);
        self.q.pci_write32(1, 1, 0x04, 0x5);
        for (i, v) in [VB, VRO].into_iter().enumerate() {
            self.q
                .pci_write32(v.slot, 0, 0x10, 0xc100 + 0x100 * i as u32);
            self.q
                .pci_write32(v.slot, 0, 0x14, v.bar4 as u32 + 0x1_0000);
            self.q.pci_write32(v.slot, 0, 0x20, v.bar4 as u32);
            self.q.pci_write32(v.slot, 0, 0x24, 0);
            self.q.pci_write32(v.slot, 0, 0x04, 0x7);
            self.virtio_init(i);
        }
    }

    /// Modern bring-up of queue 0 with a random subset of the features
    /// worth exercising (INDIRECT, EVENT_IDX, FLUSH, CONFIG_WCE, DISCARD,
    /// WRITE_ZEROES).
    fn virtio_init(&mut self, i: usize) {
        let v = [VB, VRO][i];
        let b = v.bar4;
        self.q.memwrite(v.rings, &vec![0u8; 0x3000]);
        for s in [0u8, 1, 3] {
            self.w(&format!("writeb 0x{:x} 0x{s:x}", b + 0x14));
        }
        let offered = {
            self.w(&format!("writel 0x{b:x} 0x0"));
            self.r(&format!("readl 0x{:x}", b + 4))
        };
        let want = offered as u32 & (self.r.next() as u32 | 0x200) & 0x3000_6a00;
        self.indirect[i] = want & (1 << 28) != 0;
        for (sel, val) in [(0u32, want), (1, 1)] {
            self.w(&format!("writel 0x{:x} 0x{sel:x}", b + 8));
            self.w(&format!("writel 0x{:x} 0x{val:x}", b + 0xc));
        }
        self.w(&format!("writeb 0x{:x} 0xb", b + 0x14));
        self.w(&format!("writew 0x{:x} 0x0", b + 0x16));
        self.w(&format!("writew 0x{:x} 0x{QSIZE:x}", b + 0x18));
        for (off, a) in [(0x20, v.rings), (0x28, v.avail()), (0x30, v.used())] {
            self.w(&format!("writel 0x{:x} 0x{a:x}", b + off));
            self.w(&format!("writel 0x{:x} 0x0", b + off + 4));
        }
        self.w(&format!("writew 0x{:x} 0x1", b + 0x1c));
        self.w(&format!("writeb 0x{:x} 0xf", b + 0x14));
        self.avail_idx[i] = 0;
        self.next_desc[i] = 0;
    }

    fn op(&mut self) {
        match self.r.below(100) {
            0..=24 => self.ide_disk(),
            25..=34 => self.atapi(),
            35..=59 => self.virtio_req(0),
            60..=69 => self.virtio_req(1),
            70..=79 => self.fw_cfg(),
            80..=84 => {
                let ns = self.r.below(1 << 30);
                self.log.push(format!("clock_step {ns}"));
                self.q.clock_step(ns);
            }
            _ => self.poke(),
        }
    }

    /// Random register traffic that cannot make a writable disk write
    /// (those writes would be unaddressed by construction): reads
    /// anywhere, writes to fw_cfg, CMOS, the IDE taskfile (not the command
    /// registers), and the read-only virtio function's BARs.
    fn poke(&mut self) {
        const READ: &[u16] = &[
            0x510,
            0x511,
            0x70,
            0x71,
            0x1f0,
            0x1f1,
            0x1f2,
            0x1f3,
            0x1f4,
            0x1f5,
            0x1f6,
            0x1f7,
            0x3f6,
            0x170,
            0x171,
            0x172,
            0x176,
            0x177,
            0x376,
            BM,
            BM + 2,
            BM + 4,
            BM + 8,
            0xc100,
            0xc10c,
            0xc112,
            0xc113,
            0xc114,
            0xc200,
            0xc20c,
            0xc212,
            0xc213,
            0xc214,
            0xcfc,
        ];
        // Not the command registers, SRST or bus-master start (only the
        // structured operations start I/O, so that writes stay
        // addressed), nor the read-only function's queue addresses (a
        // queue in random RAM could land on the writable one's rings).
        const WRITE: &[u16] = &[
            0x510,
            0x511,
            0x70,
            0x71,
            0x1f1,
            0x1f2,
            0x1f3,
            0x1f4,
            0x1f5,
            0x1f6,
            0x171,
            0x172,
            0x173,
            0x176,
            BM + 2,
            0xc114,
            0xc204,
            0xc20e,
            0xc210,
            0xc212,
            0xc214,
        ];
        let v = self.r.next();
        let cmd = match self.r.below(6) {
            0 => format!(
                "in{} 0x{:x}",
                self.r.pick(&['b', 'w', 'l']),
                self.r.pick(READ)
            ),
            1 => format!(
                "out{} 0x{:x} 0x{:x}",
                self.r.pick(&['b', 'w']),
                self.r.pick(WRITE),
                v & 0xffff
            ),
            2 => format!(
                "read{} 0x{:x}",
                self.r.pick(&['b', 'w', 'l', 'q']),
                [VB, VRO][self.r.below(2) as usize].bar4 + self.r.below(0x4000)
            ),
            3 => {
                let mut off = self.r.below(0x4000);
                if (0x20..0x38).contains(&off) {
                    off -= 0x10;
                }
                format!(
                    "write{} 0x{:x} 0x{:x}",
                    self.r.pick(&['b', 'w', 'l']),
                    VRO.bar4 + off,
                    v as u32
                )
            }
            4 => {
                let len = self.r.below(64) + 1;
                let data = self.r.bytes(len as usize);
                let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
                format!(
                    "write 0x{:x} {len} 0x{hex}",
                    SCRATCH + self.r.below(0x10_0000)
                )
            }
            _ => format!("outl 0xcf8 0x{:x}", 0x8000_0000 | (v as u32 & 0xfffc)),
        };
        self.log.push(cmd.clone());
        let _ = self.q.cmd(&cmd);
    }

    fn wait_ide(&mut self, base: u16) -> u8 {
        let ctl = if base == PRI { 0x3f6 } else { 0x376 };
        let t = Instant::now();
        loop {
            let s = self.q.inb(ctl);
            if s & 0x80 == 0 {
                return s;
            }
            assert!(
                t.elapsed() < SETTLE,
                "IDE channel 0x{base:x} busy for {SETTLE:?} (status 0x{s:02x})"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// One ATA command on the disk: reads, writes (PIO and DMA, 28 and
    /// 48 bit), verify, flush, IDENTIFY, SET FEATURES, TRIM.
    fn ide_disk(&mut self) {
        let b = PRI;
        self.wait_ide(b);
        if self.r.one_in(30) {
            self.srst(b);
            return;
        }
        let lba = if self.r.one_in(8) {
            SECTORS - self.r.below(4)
        } else {
            self.r.below(SECTORS)
        };
        let count = self.r.below(8) + 1;
        let op = self.r.pick(&[
            0x20u8, 0x30, 0xc8, 0xca, 0x24, 0x34, 0x25, 0x35, 0x40, 0xe7, 0xec, 0xef, 0x06, 0xc4,
            0xc5, 0xc6, 0x91,
        ]);
        let ext = matches!(op, 0x24 | 0x34 | 0x25 | 0x35);
        let dma = matches!(op, 0xc8 | 0xca | 0x25 | 0x35 | 0x06);
        let write = matches!(op, 0x30 | 0xca | 0x34 | 0x35 | 0xc5);
        let feature = if op == 0x06 { 1 } else { self.r.next() as u8 };
        let nsect = if op == 0x06 { 1 } else { count as u8 };
        if write && lba + count <= SECTORS {
            self.hd_written.extend(lba..lba + count);
        }
        self.log.push(format!(
            "ide op 0x{op:02x} lba {lba} count {count} feature 0x{feature:02x}"
        ));
        let mut regs = vec![];
        if ext {
            regs.extend([
                (b + 2, 0u8),
                (b + 3, (lba >> 24) as u8),
                (b + 4, (lba >> 32) as u8),
                (b + 5, (lba >> 40) as u8),
            ]);
        }
        regs.extend([
            (b + 6, 0xe0 | if ext { 0 } else { (lba >> 24) as u8 & 0xf }),
            (b + 1, feature),
            (b + 2, nsect),
            (b + 3, lba as u8),
            (b + 4, (lba >> 8) as u8),
            (b + 5, (lba >> 16) as u8),
        ]);
        for (p, v) in regs {
            self.q.outb(p, v);
        }
        if dma {
            self.prd(BM, count * 512, op == 0x06, lba);
            let dir = if write || op == 0x06 { 0 } else { 8 };
            self.q.outb(BM, dir);
            self.q.outb(b + 7, op);
            self.q.outb(BM, dir | 1);
            self.dma_wait(BM, dir, b);
            return;
        }
        self.q.outb(b + 7, op);
        // PIO: move up to `count` sectors, sometimes giving up half-way.
        let words = if self.r.one_in(4) {
            self.r.below(count * 256)
        } else {
            count * 256
        };
        for _ in 0..words {
            let s = self.wait_ide(b);
            if s & 0x08 == 0 {
                break;
            }
            if write {
                self.q.outw(b, self.r.next() as u16);
            } else {
                self.q.inw(b);
            }
        }
    }

    /// A PRD table for `len` bytes, sometimes short, long, or odd; for
    /// TRIM, a payload trimming a few sectors at `lba`.
    fn prd(&mut self, bm: u16, len: u64, trim: bool, lba: u64) {
        let (table, buf) = if bm == BM {
            (PRD, IDE_BUF)
        } else {
            (PRD + 0x100, IDE_BUF + 0x10_0000)
        };
        let len = match self.r.below(6) {
            0 => len / 2,
            1 => len * 2,
            2 => len + 1,
            _ => len,
        };
        if trim {
            let n = self.r.below(8) + 1;
            if lba + n <= SECTORS {
                self.hd_written.extend(lba..lba + n);
            }
            let mut p = vec![0u8; 512];
            p[..8].copy_from_slice(&(lba | n << 48).to_le_bytes());
            self.q.memwrite(buf, &p);
        }
        let parts = self.r.below(3) + 1;
        let mut entries = vec![];
        let mut off = 0;
        for i in 0..parts {
            let chunk = if i + 1 == parts {
                len - off
            } else {
                (len / parts) & !1
            };
            let eot = if i + 1 == parts { 0x8000_0000u32 } else { 0 };
            // Now and then a buffer outside RAM (the BIOS ROM, or
            // nothing at all): the data goes nowhere, the engine goes on.
            let addr = match self.r.below(16) {
                0 => 0xfff0_0000,
                1 => 0x4000_0000,
                _ => buf + off,
            };
            entries.extend((addr as u32).to_le_bytes());
            entries.extend((chunk as u32 & 0xfffe | eot).to_le_bytes());
            off += chunk;
        }
        self.q.memwrite(table, &entries);
        self.q.outl(bm + 4, table as u32);
    }

    /// Starts bus-master engine `bm` in direction `dir`, waits until it
    /// stops or interrupts (a PRD table shorter than the transfer leaves
    /// the device waiting for more, as on hardware), then stops it as a
    /// driver would and waits for the channel at `base`.
    fn dma_wait(&mut self, bm: u16, dir: u8, base: u16) {
        let t = Instant::now();
        while self.q.inb(bm + 2) & 5 == 1 && t.elapsed() < SETTLE {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.q.outb(bm, dir);
        self.wait_ide(base);
        self.q.outb(bm + 2, 6);
    }

    /// A software reset of both devices of a channel.
    fn srst(&mut self, base: u16) {
        let ctl = if base == PRI { 0x3f6 } else { 0x376 };
        self.log.push(format!("srst 0x{base:x}"));
        self.q.outb(ctl, 4);
        self.q.outb(ctl, 0);
        self.wait_ide(base);
    }

    /// One ATAPI packet by PIO on the CD-ROM (secondary master).
    fn atapi(&mut self) {
        let b = SEC;
        self.wait_ide(b);
        let lba = self.r.below(CD_BLOCKS + 4) as u32;
        let n = self.r.below(4) as u8 + 1;
        let alloc = self.r.below(4096) as u16;
        let [a0, a1] = alloc.to_be_bytes();
        let [l0, l1, l2, l3] = lba.to_be_bytes();
        let mut cdb: [u8; 12] = match self.r.below(12) {
            0 => [0x28, 0, l0, l1, l2, l3, 0, 0, n, 0, 0, 0],
            1 => [0xa8, 0, l0, l1, l2, l3, 0, 0, 0, n, 0, 0],
            2 => [0x12, 0, 0, a0, a1, 0, 0, 0, 0, 0, 0, 0],
            3 => [0x00; 12],
            4 => [0x5a, 0, 0x3f, 0, 0, 0, 0, a0, a1, 0, 0, 0],
            5 => [0x43, 2, 0, 0, 0, 0, 0, a0, a1, 0, 0, 0],
            6 => [0x46, 2, 0, 0, 0, 0, 0, a0, a1, 0, 0, 0],
            7 => [0x1b, 0, 0, 0, self.r.below(4) as u8, 0, 0, 0, 0, 0, 0, 0],
            8 => [0x1e, 0, 0, 0, self.r.below(2) as u8, 0, 0, 0, 0, 0, 0, 0],
            9 => [0x03, 0, 0, 0, 18, 0, 0, 0, 0, 0, 0, 0],
            10 => [0x4a, 1, 0, 0, 0x10, 0, 0, a0, a1, 0, 0, 0],
            _ => self.r.bytes(12).try_into().unwrap(),
        };
        if self.r.one_in(8) {
            cdb[self.r.below(12) as usize] = self.r.next() as u8;
        }
        let dma = self.r.one_in(3);
        self.log.push(format!("atapi {cdb:02x?} dma {dma}"));
        if self.r.one_in(30) {
            self.srst(b);
        }
        self.q.outb(b + 6, 0xa0);
        self.q.outb(b + 1, dma as u8);
        self.q.outb(b + 4, 0xfe);
        self.q.outb(b + 5, 0xff);
        self.q.outb(b + 7, 0xa0);
        let s = self.wait_ide(b);
        if s & 0x08 == 0 {
            return;
        }
        if dma {
            let len = self.r.pick(&[alloc as u64, n as u64 * 2048, 2048, 18]);
            self.prd(BM + 8, len, false, 0);
            self.q.outb(BM + 8, 8);
            self.q.outb(BM + 8, 9);
        }
        for w in cdb.chunks(2) {
            self.q.outw(b, u16::from_le_bytes([w[0], w[1]]));
        }
        if dma {
            self.dma_wait(BM + 8, 8, b);
            return;
        }
        // Read what it sends, bounded, sometimes giving up.
        let limit = if self.r.one_in(4) {
            self.r.below(512)
        } else {
            8192
        };
        for _ in 0..limit {
            let s = self.wait_ide(b);
            if s & 0x08 == 0 {
                break;
            }
            self.q.inw(b);
        }
    }

    /// One virtio-blk request on device `i`: a header (type, sector), data
    /// and a status byte over one to four descriptors, sometimes
    /// indirect, sometimes malformed.
    fn virtio_req(&mut self, i: usize) {
        let v = [VB, VRO][i];
        if self.r.one_in(40) {
            self.log.push(format!("virtio {i} re-init"));
            self.virtio_init(i);
            return;
        }
        let odd = self.r.below(32) as u32;
        let ty = self.r.pick(&[0u32, 0, 1, 1, 4, 8, 11, 13, odd]);
        let sector = if self.r.one_in(8) {
            SECTORS - self.r.below(4)
        } else {
            self.r.below(SECTORS)
        };
        let n = self.r.below(8) + 1;
        let mut data_len = n * 512;
        if self.r.one_in(10) {
            data_len = self.r.below(4096) + 1;
        }
        // Slot for this request's buffers: one per ring entry.
        let slot = self.avail_idx[i] % QSIZE;
        let base = v.bufs + slot as u64 * 0x2000;
        let (hdr, data, status, itable) = (base, base + 0x100, base + 0x80, base + 0x1100);
        let mut h = Vec::new();
        h.extend(ty.to_le_bytes());
        h.extend(0u32.to_le_bytes());
        h.extend(sector.to_le_bytes());
        self.q.memwrite(hdr, &h);
        self.q.memwrite(status, &[0xff]);
        let writes = matches!(ty, 1 | 11 | 13);
        if matches!(ty, 11 | 13) {
            // One discard/write-zeroes segment: sector, count, flags.
            let mut seg = Vec::new();
            seg.extend(sector.to_le_bytes());
            seg.extend((n as u32).to_le_bytes());
            seg.extend((self.r.below(2) as u32).to_le_bytes());
            self.q.memwrite(data, &seg);
            data_len = 16;
        } else if ty == 1 {
            let d = self.r.bytes(data_len.min(4096) as usize);
            self.q.memwrite(data, &d);
        }
        if i == 0 && writes && sector + n <= SECTORS {
            self.vb_written.extend(sector..sector + n);
        }
        let data_in = !matches!(ty, 1 | 11 | 13);
        let mut bufs = vec![(hdr, 16u32, false)];
        if ty != 4 {
            bufs.push((data, data_len as u32, data_in));
        }
        bufs.push((status, 1, true));
        match self.r.below(12) {
            0 => bufs[0].1 = self.r.below(16) as u32,
            1 => {
                bufs.pop();
            }
            2 => bufs[0].2 = true,
            3 => {
                let l = bufs.len();
                bufs[l - 1].2 = false
            }
            _ => {}
        }
        self.log.push(format!(
            "virtio {i} type {ty} sector {sector} len {data_len} bufs {bufs:x?}"
        ));
        let indirect = self.indirect[i] && self.r.one_in(3);
        let head = self.next_desc[i];
        let desc = |a: u64, l: u32, wr: bool, next: Option<u16>| {
            let mut d = Vec::new();
            d.extend(a.to_le_bytes());
            d.extend(l.to_le_bytes());
            let flags = (next.is_some() as u16) | (wr as u16) << 1;
            d.extend(flags.to_le_bytes());
            d.extend(next.unwrap_or(0).to_le_bytes());
            d
        };
        if indirect {
            let mut t = Vec::new();
            for (k, &(a, l, wr)) in bufs.iter().enumerate() {
                let next = (k + 1 < bufs.len()).then_some(k as u16 + 1);
                t.extend(desc(a, l, wr, next));
            }
            self.q.memwrite(itable, &t);
            let mut d = desc(itable, t.len() as u32, false, None);
            d[12] = 4; // INDIRECT
            self.q.memwrite(v.rings + 16 * head as u64, &d);
            self.next_desc[i] = (head + 1) % QSIZE;
        } else {
            for (k, &(a, l, wr)) in bufs.iter().enumerate() {
                let idx = (head + k as u16) % QSIZE;
                let next = (k + 1 < bufs.len()).then_some((idx + 1) % QSIZE);
                self.q
                    .memwrite(v.rings + 16 * idx as u64, &desc(a, l, wr, next));
            }
            self.next_desc[i] = (head + bufs.len() as u16) % QSIZE;
        }
        let ai = self.avail_idx[i];
        self.q
            .memwrite(v.avail() + 4 + 2 * (ai % QSIZE) as u64, &head.to_le_bytes());
        self.avail_idx[i] = ai.wrapping_add(1);
        self.q
            .memwrite(v.avail() + 2, &self.avail_idx[i].to_le_bytes());
        self.w(&format!("writew 0x{:x} 0x0", v.bar4 + 0x3000));
    }

    /// fw_cfg: a selector read by I/O, or a DMA request with random
    /// control bits, length and address (sometimes outside RAM).
    fn fw_cfg(&mut self) {
        let key = self
            .r
            .pick(&[0x00u16, 0x01, 0x05, 0x0f, 0x19, 0x20, 0x21, 0x22, 0x8000]);
        let key = if self.r.one_in(4) {
            self.r.next() as u16
        } else {
            key
        };
        if self.r.one_in(2) {
            self.log.push(format!("fw_cfg read 0x{key:x}"));
            self.q.outw(0x510, key);
            for _ in 0..self.r.below(64) {
                self.q.inb(0x511);
            }
            return;
        }
        let control = (key as u32) << 16 | (self.r.below(32) as u32);
        let len = self.r.below(0x1_0000) as u32;
        let addr = if self.r.one_in(6) {
            self.r.next() & 0xffff_ffff_ffff
        } else {
            SCRATCH + self.r.below(0x10_0000)
        };
        self.log.push(format!(
            "fw_cfg dma control 0x{control:x} len {len} addr 0x{addr:x}"
        ));
        let mut d = Vec::new();
        d.extend(control.to_be_bytes());
        d.extend(len.to_be_bytes());
        d.extend(addr.to_be_bytes());
        self.q.memwrite(FW_DMA, &d);
        self.q.outl(0x514, 0);
        self.q.outl(0x518, (FW_DMA as u32).swap_bytes());
    }

    /// After the sequence: nothing left busy, every request on the
    /// writable disk answered (or its queue marked broken).
    fn settle(&mut self) {
        self.q.outb(0x3f6, 0);
        self.q.outb(0x376, 0);
        self.wait_ide(PRI);
        self.wait_ide(SEC);
        self.q.outb(BM, 0);
        self.q.outb(BM + 8, 0);
        let t = Instant::now();
        loop {
            let used = self.r(&format!("readw 0x{:x}", VB.used() + 2)) as u16;
            let status = self.r(&format!("readb 0x{:x}", VB.bar4 + 0x14));
            if used == self.avail_idx[0] || status & 0x40 != 0 || status & 4 == 0 {
                break;
            }
            assert!(
                t.elapsed() < SETTLE,
                "virtio-blk: {} requests made available, {used} used after {SETTLE:?} (status 0x{status:x})",
                self.avail_idx[0]
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Sectors of `path` that differ from the pattern `tag` and are not in
/// `written`.
fn unaddressed_changes(path: &Path, tag: u8, written: &BTreeSet<u64>) -> Vec<u64> {
    let d = std::fs::read(path).unwrap();
    let mut bad = vec![];
    for (s, sec) in d.chunks(512).enumerate() {
        let mut want = [tag; 512];
        want[..8].copy_from_slice(&(s as u64).to_le_bytes());
        if sec != want && !written.contains(&(s as u64)) {
            bad.push(s as u64);
        }
    }
    assert_eq!(
        d.len() as u64,
        SECTORS * 512,
        "{} changed size",
        path.display()
    );
    bad
}

/// What a run did, to show that it reached the devices.
#[derive(Default)]
struct Stats {
    ops: usize,
    /// Sectors the guest changed in the writable images.
    written: usize,
    /// virtio-blk requests the writable disk completed.
    completed: u64,
}

fn changed_sectors(path: &Path, tag: u8) -> usize {
    let d = std::fs::read(path).unwrap();
    d.chunks(512)
        .enumerate()
        .filter(|(s, sec)| {
            sec[8..].iter().any(|&b| b != tag) || sec[..8] != (*s as u64).to_le_bytes()
        })
        .count()
}

fn round(im: &Images, rng: &mut Rng, deadline: Instant, n: u32, st: &mut Stats) {
    im.reset();
    let (cd_hash, vro_hash) = (
        fnv(&std::fs::read(&im.cd).unwrap()),
        fnv(&std::fs::read(&im.vro).unwrap()),
    );
    let hd = format!("file={},format=raw,if=ide,index=0", im.hd.display());
    let cd = format!(
        "file={},format=raw,if=ide,index=2,media=cdrom",
        im.cd.display()
    );
    let vb = format!("file={},format=raw,if=none,id=vb", im.vb.display());
    let vro = format!(
        "file={},format=raw,if=none,id=vro,readonly=on",
        im.vro.display()
    );
    let q = Qtest::start(&[
        "-m",
        "32",
        "-drive",
        &hd,
        "-drive",
        &cd,
        "-drive",
        &vb,
        "-device",
        "virtio-blk-pci,drive=vb,addr=4",
        "-drive",
        &vro,
        "-device",
        "virtio-blk-pci,drive=vro,addr=5",
    ]);
    q.set_reply_timeout(REPLY_TIMEOUT);
    let pid = q.pid();
    let mut rd = Round {
        q,
        r: rng,
        hd_written: BTreeSet::new(),
        vb_written: BTreeSet::new(),
        avail_idx: [0; 2],
        next_desc: [0; 2],
        indirect: [false; 2],
        log: vec![],
    };
    rd.setup();
    let rss0 = rd.q.proc_status_kib("VmRSS");
    let mut ops = 0;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        while ops < OPS_PER_ROUND && Instant::now() < deadline {
            rd.op();
            ops += 1;
        }
        rd.settle();
        st.completed += rd.r(&format!("readw 0x{:x}", VB.used() + 2));
        // Spin: the guest is idle now; the process must be too.
        let t0 = cpu_ticks(pid);
        std::thread::sleep(Duration::from_millis(500));
        let spent = cpu_ticks(pid) - t0;
        assert!(
            spent <= 25,
            "strata used {spent} ticks of CPU in 500 ms with an idle guest"
        );
        let rss = rd.q.proc_status_kib("VmRSS");
        assert!(
            rss <= rss0 + RSS_GROWTH_KIB,
            "VmRSS grew from {rss0} KiB to {rss} KiB"
        );
    }));
    if let Err(e) = result {
        let tail = rd.log.len().saturating_sub(20);
        eprintln!(
            "qtest_fuzz: round {n} failed after {ops} operations; last ones:\n  {}",
            rd.log[tail..].join("\n  ")
        );
        std::panic::resume_unwind(e);
    }
    let Round {
        q,
        hd_written,
        vb_written,
        ..
    } = rd;
    assert!(
        q.close_and_wait_exit(Duration::from_secs(10)).is_some(),
        "strata did not exit after the qtest channel closed"
    );
    assert_eq!(
        fnv(&std::fs::read(&im.cd).unwrap()),
        cd_hash,
        "round {n}: the CD-ROM image changed"
    );
    assert_eq!(
        fnv(&std::fs::read(&im.vro).unwrap()),
        vro_hash,
        "round {n}: the readonly=on image changed"
    );
    for (p, tag, w) in [(&im.hd, 0x11, &hd_written), (&im.vb, 0x22, &vb_written)] {
        let bad = unaddressed_changes(p, tag, w);
        assert!(
            bad.is_empty(),
            "round {n}: {} sectors {bad:?} changed without being addressed",
            p.display()
        );
        st.written += changed_sectors(p, tag);
    }
    st.ops += ops;
}

#[test]
fn qtest_device_fuzz() {
    support::require_bios();
    let secs: u64 = std::env::var("STRATA_QTEST_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("STRATA_QTEST_FUZZ_SEED")
        .ok()
        .and_then(|s| {
            let s = s.trim();
            match s.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16).ok(),
                None => s.parse().ok(),
            }
        })
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("qtest_fuzz: seed {seed:#x} for {secs} s (replay: STRATA_QTEST_FUZZ_SEED={seed:#x})");
    let mut rng = Rng(seed);
    let im = Images::new();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut rounds = 0;
    let mut st = Stats::default();
    while Instant::now() < deadline || rounds == 0 {
        round(&im, &mut rng, deadline, rounds, &mut st);
        rounds += 1;
    }
    println!(
        "qtest_fuzz: seed {seed:#x}: {rounds} processes, {} operations in {:.0?}, \
         {} sectors written, {} virtio-blk requests completed: clean",
        st.ops,
        start.elapsed(),
        st.written,
        st.completed
    );
}
