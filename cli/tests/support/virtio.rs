//! A virtio-pci driver for qtest tests, in the style of QEMU's
//! libqos: the test maps the function's BARs, negotiates features, lays
//! out split virtqueues in guest RAM (virtio 1.2, 2.7), kicks them and
//! waits for used entries. Device-specific requests live in each test.

use std::time::{Duration, Instant};

use super::qtest::Qtest;

pub const BAR4: u64 = 0xfe00_0000;
pub const BAR1: u64 = 0xfe01_0000;
pub const BAR0: u16 = 0xc000;
pub const NOTIFY: u64 = BAR4 + 0x3000;
pub const DEVCFG: u64 = BAR4 + 0x2000;
/// Where MSI-X messages of vector v land: MSI_BASE + 4 * v.
pub const MSI_BASE: u64 = 0x7000;
/// Guest RAM used by the test driver: rings from RING_BASE, buffers from
/// BUF_BASE.
pub const RING_BASE: u64 = 0x10_0000;
pub const BUF_BASE: u64 = 0x40_0000;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// The PCI slot tests put the device in (`addr=4`).
pub const SLOT: u8 = 4;

pub trait QtestExt {
    fn writew(&mut self, addr: u64, v: u16);
    fn readw(&mut self, addr: u64) -> u16;
    fn writeb(&mut self, addr: u64, v: u8);
    fn readq(&mut self, addr: u64) -> u64;
}

impl QtestExt for Qtest {
    fn writew(&mut self, addr: u64, v: u16) {
        let r = self.cmd(&format!("writew 0x{addr:x} 0x{v:x}"));
        assert_eq!(r, "OK");
    }
    fn readw(&mut self, addr: u64) -> u16 {
        let r = self.cmd(&format!("readw 0x{addr:x}"));
        u64::from_str_radix(r.strip_prefix("OK 0x").unwrap(), 16).unwrap() as u16
    }
    fn writeb(&mut self, addr: u64, v: u8) {
        let r = self.cmd(&format!("writeb 0x{addr:x} 0x{v:x}"));
        assert_eq!(r, "OK");
    }
    fn readq(&mut self, addr: u64) -> u64 {
        let r = self.cmd(&format!("readq 0x{addr:x}"));
        u64::from_str_radix(r.strip_prefix("OK 0x").unwrap(), 16).unwrap()
    }
}

/// A split virtqueue laid out by the test (virtio 1.2, 2.7).
pub struct Vq {
    pub index: u16,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_desc: u16,
    pub avail_idx: u16,
    pub last_used: u16,
}

impl Vq {
    pub fn new(index: u16, size: u16, base: u64) -> Vq {
        let desc = base;
        let avail = desc + 16 * size as u64;
        let used = (avail + 6 + 2 * size as u64 + 4095) & !4095;
        Vq {
            index,
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            last_used: 0,
        }
    }

    // The descriptor's four fields spelled out, as the spec's struct is.
    #[allow(clippy::too_many_arguments)]
    pub fn write_desc(
        &self,
        qt: &mut Qtest,
        table: u64,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let mut d = Vec::with_capacity(16);
        d.extend_from_slice(&addr.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        qt.memwrite(table + 16 * i as u64, &d);
    }

    /// Adds a chain of (addr, len, device-writable) buffers; returns the
    /// head. `indirect` puts the chain in an indirect table at `itable`.
    pub fn add(&mut self, qt: &mut Qtest, bufs: &[(u64, u32, bool)], indirect: Option<u64>) -> u16 {
        let head = self.next_desc;
        match indirect {
            Some(table) => {
                for (i, &(a, l, w)) in bufs.iter().enumerate() {
                    let last = i + 1 == bufs.len();
                    let flags = if w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
                    self.write_desc(qt, table, i as u16, a, l, flags, i as u16 + 1);
                }
                self.write_desc(
                    qt,
                    self.desc,
                    head,
                    table,
                    16 * bufs.len() as u32,
                    F_INDIRECT,
                    0,
                );
                self.next_desc = (self.next_desc + 1) % self.size;
            }
            None => {
                for (i, &(a, l, w)) in bufs.iter().enumerate() {
                    let me = self.next_desc;
                    let next = (me + 1) % self.size;
                    let last = i + 1 == bufs.len();
                    let flags = if w { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
                    self.write_desc(qt, self.desc, me, a, l, flags, next);
                    self.next_desc = next;
                }
            }
        }
        head
    }

    pub fn kick(&mut self, qt: &mut Qtest, head: u16, notify: impl FnOnce(&mut Qtest, u16)) {
        let slot = self.avail + 4 + 2 * (self.avail_idx % self.size) as u64;
        qt.writew(slot, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        qt.writew(self.avail + 2, self.avail_idx);
        notify(qt, self.index);
    }

    /// Waits for the next used entry; returns (id, len).
    pub fn wait_used(&mut self, qt: &mut Qtest) -> (u32, u32) {
        let t = Instant::now();
        loop {
            let idx = qt.readw(self.used + 2);
            if idx != self.last_used {
                let e = self.used + 4 + 8 * (self.last_used % self.size) as u64;
                let id = qt.readl(e);
                let len = qt.readl(e + 4);
                self.last_used = self.last_used.wrapping_add(1);
                return (id, len);
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "queue {}: no used entry",
                self.index
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Sets avail->used_event (EVENT_IDX).
    pub fn set_used_event(&self, qt: &mut Qtest, v: u16) {
        qt.writew(self.avail + 4 + 2 * self.size as u64, v);
    }
}

/// The test's driver for one virtio-pci function at slot 4.
pub struct VirtioPci {
    pub qt: Qtest,
    pub features: u64,
    pub vqs: Vec<Vq>,
    pub msix_cap: u8,
}

impl VirtioPci {
    /// Maps the BARs and finds the MSI-X capability.
    pub fn map(mut qt: Qtest) -> VirtioPci {
        qt.pci_write32(SLOT, 0, 0x10, BAR0 as u32);
        qt.pci_write32(SLOT, 0, 0x14, BAR1 as u32);
        qt.pci_write32(SLOT, 0, 0x20, BAR4 as u32);
        qt.pci_write32(SLOT, 0, 0x24, 0);
        qt.pci_write32(SLOT, 0, 0x04, 0x7);
        let mut msix_cap = 0;
        let mut p = qt.pci_read8(SLOT, 0, 0x34);
        while p != 0 {
            if qt.pci_read8(SLOT, 0, p) == 0x11 {
                msix_cap = p;
            }
            p = qt.pci_read8(SLOT, 0, p + 1);
        }
        VirtioPci {
            qt,
            features: 0,
            vqs: Vec::new(),
            msix_cap,
        }
    }

    pub fn common_w32(&mut self, off: u64, v: u32) {
        self.qt.writel(BAR4 + off, v);
    }
    pub fn common_r32(&mut self, off: u64) -> u32 {
        self.qt.readl(BAR4 + off)
    }
    pub fn status(&mut self) -> u8 {
        self.qt.readb(BAR4 + 0x14)
    }
    pub fn set_status(&mut self, s: u8) {
        self.qt.writeb(BAR4 + 0x14, s);
    }

    pub fn device_features(&mut self) -> u64 {
        self.common_w32(0x00, 0);
        let lo = self.common_r32(0x04) as u64;
        self.common_w32(0x00, 1);
        let hi = self.common_r32(0x04) as u64;
        lo | hi << 32
    }

    /// Modern initialisation (3.1.1) with `want` features; returns whether
    /// FEATURES_OK stuck.
    pub fn negotiate(&mut self, want: u64) -> bool {
        self.set_status(0);
        self.set_status(1);
        self.set_status(3);
        self.common_w32(0x08, 0);
        self.common_w32(0x0c, want as u32);
        self.common_w32(0x08, 1);
        self.common_w32(0x0c, (want >> 32) as u32);
        self.set_status(0xb);
        self.features = want;
        self.status() & 8 != 0
    }

    /// Enables MSI-X with vector v -> MSI_BASE + 4v, data 0x100 + v.
    pub fn enable_msix(&mut self, vectors: u16) {
        for v in 0..vectors as u64 {
            let e = BAR1 + 16 * v;
            self.qt.writel(e, (MSI_BASE + 4 * v) as u32);
            self.qt.writel(e + 4, 0);
            self.qt.writel(e + 8, 0x100 + v as u32);
            self.qt.writel(e + 12, 0);
        }
        let cap = self.msix_cap;
        assert_ne!(cap, 0, "no MSI-X capability");
        let d = self.qt.pci_read32(SLOT, 0, cap);
        self.qt.pci_write32(SLOT, 0, cap, d | 0x8000_0000);
    }

    pub fn setup_queue(&mut self, q: u16, size: u16, vector: u16) {
        let base = RING_BASE + q as u64 * 0x4000;
        let vq = Vq::new(q, size, base);
        self.qt.memwrite(base, &vec![0u8; 0x4000]);
        self.qt.writew(BAR4 + 0x16, q);
        self.qt.writew(BAR4 + 0x18, size);
        self.qt.writew(BAR4 + 0x1a, vector);
        assert_eq!(self.qt.readw(BAR4 + 0x1a), vector, "queue vector refused");
        self.qt.writeq(BAR4 + 0x20, vq.desc);
        self.qt.writel(BAR4 + 0x28, vq.avail as u32);
        self.qt.writel(BAR4 + 0x2c, 0);
        self.qt.writeq(BAR4 + 0x30, vq.used);
        self.qt.writew(BAR4 + 0x1c, 1);
        self.vqs.push(vq);
    }

    pub fn driver_ok(&mut self) {
        self.set_status(0xf);
        assert_eq!(self.status(), 0xf);
    }

    /// Full modern bring-up with MSI-X and `nq` queues of 64 entries.
    pub fn init(qt: Qtest, want: u64, nq: u16) -> VirtioPci {
        let mut b = VirtioPci::map(qt);
        assert!(b.negotiate(want));
        b.enable_msix(nq + 1);
        b.qt.writew(BAR4 + 0x10, 0); // config vector 0
        for q in 0..nq {
            b.setup_queue(q, 64, q + 1);
        }
        b.driver_ok();
        b
    }

    pub fn msi(&mut self, vector: u16) -> u32 {
        self.qt.readl(MSI_BASE + 4 * vector as u64)
    }
    pub fn clear_msi(&mut self, vector: u16) {
        self.qt.writel(MSI_BASE + 4 * vector as u64, 0);
    }
}
