//! virtio-blk-pci through the qtest protocol, in the style of QEMU's
//! tests/qtest/virtio-blk-test.c: the test is the guest driver. It programs
//! the PCI function, negotiates features, lays out split virtqueues in
//! guest RAM, submits requests, and checks status bytes, data, used rings
//! and interrupts (MSI-X messages land in RAM; INTx through the PIIX3 PIRQ
//! router and the ISR).

mod support;

use std::time::{Duration, Instant};

use support::qtest::Qtest;

use support::virtio::*;

const VERSION_1: u64 = 1 << 32;
const INDIRECT: u64 = 1 << 28;
const EVENT_IDX: u64 = 1 << 29;
const BLK_FLUSH: u64 = 1 << 9;
const BLK_CONFIG_WCE: u64 = 1 << 11;
const BLK_MQ: u64 = 1 << 12;
const BLK_DISCARD: u64 = 1 << 13;
const BLK_WRITE_ZEROES: u64 = 1 << 14;
const BLK_SEG_MAX: u64 = 1 << 2;
const BLK_BLK_SIZE: u64 = 1 << 6;
const BLK_SIZE_MAX: u64 = 1 << 1;
const BLK_TOPOLOGY: u64 = 1 << 10;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const DISK_SECTORS: u64 = 8192; // 4 MiB

/// A raw image whose sector n is filled with the byte (n % 251) ^ 0x5a.
fn pattern_disk(name: &str) -> std::path::PathBuf {
    let dir = support::scratch(name);
    let p = dir.join("disk.raw");
    let mut data = Vec::with_capacity((DISK_SECTORS * 512) as usize);
    for n in 0..DISK_SECTORS {
        data.extend(std::iter::repeat_n(pattern(n), 512));
    }
    std::fs::write(&p, data).unwrap();
    p
}

fn pattern(sector: u64) -> u8 {
    (sector % 251) as u8 ^ 0x5a
}

fn start(disk: &std::path::Path, dev_opts: &str, extra: &[&str]) -> Qtest {
    let drive = format!("file={},if=none,id=d0,format=raw", disk.display());
    let dev = format!("virtio-blk-pci,drive=d0,addr=4{dev_opts}");
    let mut args = vec!["-drive", &drive, "-device", &dev];
    args.extend_from_slice(extra);
    Qtest::start(&args)
}

type Blk = VirtioPci;

/// virtio-blk requests through the test's driver.
trait BlkRequest {
    fn request(
        &mut self,
        q: u16,
        ty: u32,
        sector: u64,
        out: &[u8],
        in_len: u32,
        indirect: bool,
    ) -> (u8, u32, Vec<u8>);
}

impl BlkRequest for VirtioPci {
    /// Submits a request on queue q: header, optional out data, optional
    /// in buffer, status. Returns (status, used len, in data).
    fn request(
        &mut self,
        q: u16,
        ty: u32,
        sector: u64,
        out: &[u8],
        in_len: u32,
        indirect: bool,
    ) -> (u8, u32, Vec<u8>) {
        let base = BUF_BASE + q as u64 * 0x10_0000;
        let (hdr, data, st, itable) = (base, base + 0x1000, base + 0x800, base + 0xc00);
        let mut h = Vec::new();
        h.extend_from_slice(&ty.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&sector.to_le_bytes());
        self.qt.memwrite(hdr, &h);
        self.qt.writeb(st, 0xff);
        let mut bufs = vec![(hdr, 16u32, false)];
        if !out.is_empty() {
            self.qt.memwrite(data, out);
            bufs.push((data, out.len() as u32, false));
        }
        if in_len > 0 {
            self.qt.memwrite(data, &vec![0xee; in_len as usize]);
            bufs.push((data, in_len, true));
        }
        bufs.push((st, 1, true));
        let (qi, vq) = (q as usize, &mut self.vqs[q as usize]);
        let head = vq.add(&mut self.qt, &bufs, indirect.then_some(itable));
        vq.kick(&mut self.qt, head, |qt, q| {
            qt.writew(NOTIFY + 4 * q as u64, q)
        });
        let (id, len) = self.vqs[qi].wait_used(&mut self.qt);
        assert_eq!(id, head as u32, "used id is the chain head");
        let s = self.qt.readb(st);
        let d = if in_len > 0 {
            self.qt.memread(data, in_len as usize)
        } else {
            Vec::new()
        };
        (s, len, d)
    }
}

fn segment(sector: u64, n: u32, flags: u32) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&sector.to_le_bytes());
    s.extend_from_slice(&n.to_le_bytes());
    s.extend_from_slice(&flags.to_le_bytes());
    s
}

#[test]
fn pci_identity_capabilities_and_feature_negotiation() {
    let disk = pattern_disk("vblk-ident");
    // Transitional by default on `pc`, as QEMU's.
    let mut qt = start(&disk, ",serial=abc", &[]);
    assert_eq!(qt.pci_read32(SLOT, 0, 0), 0x1001_1af4);
    assert_eq!(qt.pci_read32(SLOT, 0, 8) & 0xff, 0, "revision 0");
    assert_eq!(
        qt.pci_read32(SLOT, 0, 0x2c),
        0x0002_1af4,
        "subsystem = type"
    );
    assert_eq!(qt.pci_read32(SLOT, 0, 0x3c) >> 8 & 0xff, 1, "INTA");
    drop(qt);

    let mut qt = start(&disk, ",disable-legacy=on,num-queues=2", &[]);
    assert_eq!(qt.pci_read32(SLOT, 0, 0), 0x1042_1af4);
    assert_eq!(qt.pci_read32(SLOT, 0, 8) & 0xff, 1, "revision 1");
    assert_ne!(qt.pci_read32(SLOT, 0, 4) >> 16 & 0x10, 0, "capability list");
    // No legacy I/O BAR.
    qt.pci_write32(SLOT, 0, 0x10, 0xffff_ffff);
    assert_eq!(qt.pci_read32(SLOT, 0, 0x10), 0);
    // Vendor capabilities: common, notify, ISR, device, PCI cfg, all in BAR 4.
    let mut types = Vec::new();
    let mut p = qt.pci_read8(SLOT, 0, 0x34);
    while p != 0 {
        if qt.pci_read8(SLOT, 0, p) == 0x09 {
            let ty = qt.pci_read8(SLOT, 0, p + 3);
            types.push(ty);
            if ty != 5 {
                assert_eq!(qt.pci_read8(SLOT, 0, p + 4), 4, "cfg type {ty} in BAR 4");
            }
            if ty == 2 {
                assert_eq!(qt.pci_read32(SLOT, 0, p + 16), 4, "notify multiplier");
            }
        }
        p = qt.pci_read8(SLOT, 0, p + 1);
    }
    types.sort();
    assert_eq!(types, vec![1, 2, 3, 4, 5]);

    let mut b = Blk::map(qt);
    let f = b.device_features();
    for (bit, name) in [
        (VERSION_1, "VERSION_1"),
        (INDIRECT, "INDIRECT_DESC"),
        (EVENT_IDX, "EVENT_IDX"),
        (BLK_FLUSH, "FLUSH"),
        (BLK_CONFIG_WCE, "CONFIG_WCE"),
        (BLK_MQ, "MQ"),
        (BLK_DISCARD, "DISCARD"),
        (BLK_WRITE_ZEROES, "WRITE_ZEROES"),
        (BLK_SEG_MAX, "SEG_MAX"),
        (BLK_SIZE_MAX, "SIZE_MAX"),
        (BLK_BLK_SIZE, "BLK_SIZE"),
        (BLK_TOPOLOGY, "TOPOLOGY"),
    ] {
        assert_ne!(f & bit, 0, "{name} offered");
    }
    assert_eq!(f & (1 << 5), 0, "not read-only");
    // A feature that was not offered makes FEATURES_OK fail; so does a
    // modern driver without VERSION_1.
    assert!(!b.negotiate(VERSION_1 | 1 << 7));
    assert!(!b.negotiate(BLK_FLUSH));
    assert!(b.negotiate(VERSION_1 | BLK_FLUSH | BLK_MQ));
    // Device configuration: capacity, seg_max, blk_size, num_queues.
    assert_eq!(b.qt.readq(DEVCFG), DISK_SECTORS);
    assert_eq!(b.qt.readl(DEVCFG + 12), 254);
    assert_eq!(b.qt.readl(DEVCFG + 20), 512);
    assert_eq!(b.qt.readw(DEVCFG + 34), 2);
    // Queue sizes: max 256 by default, non-powers of two refused.
    b.qt.writew(BAR4 + 0x16, 1);
    assert_eq!(b.qt.readw(BAR4 + 0x18), 256);
    b.qt.writew(BAR4 + 0x18, 100);
    assert_eq!(b.qt.readw(BAR4 + 0x18), 256);
    b.qt.writew(BAR4 + 0x16, 2);
    assert_eq!(b.qt.readw(BAR4 + 0x18), 0, "no queue 2");
    // Reset clears the status.
    b.set_status(0);
    assert_eq!(b.status(), 0);
}

#[test]
fn if_virtio_drive_creates_the_device() {
    let disk = pattern_disk("vblk-ifvirtio");
    let drive = format!("file={},if=virtio,format=raw", disk.display());
    let mut qt = Qtest::start(&["-drive", &drive]);
    // First free slot after the PIIX3 at 00:01.
    assert_eq!(qt.pci_read32(2, 0, 0), 0x1001_1af4);
}

#[test]
fn read_write_flush_get_id_modern_msix() {
    let disk = pattern_disk("vblk-rw");
    let qt = start(&disk, ",serial=STRATA-SN-1", &[]);
    let mut b = Blk::init(qt, VERSION_1 | BLK_FLUSH, 1);
    b.clear_msi(1);
    let (s, len, d) = b.request(0, T_IN, 10, &[], 1024, false);
    assert_eq!(s, S_OK);
    assert_eq!(len, 1025, "data + status written");
    assert!(d[..512].iter().all(|&x| x == pattern(10)));
    assert!(d[512..].iter().all(|&x| x == pattern(11)));
    assert_eq!(b.msi(1), 0x101, "queue 0's MSI-X vector 1 fired");

    let data: Vec<u8> = (0..1536).map(|i| (i * 7 % 256) as u8).collect();
    let (s, len, _) = b.request(0, T_OUT, 100, &data, 0, false);
    assert_eq!((s, len), (S_OK, 1));
    let (s, _, _) = b.request(0, T_FLUSH, 0, &[], 0, false);
    assert_eq!(s, S_OK);
    let file = std::fs::read(&disk).unwrap();
    assert_eq!(
        &file[100 * 512..103 * 512],
        &data[..],
        "written to the image"
    );
    let (s, _, d) = b.request(0, T_IN, 100, &[], 1536, false);
    assert_eq!(s, S_OK);
    assert_eq!(d, data);

    let (s, len, d) = b.request(0, T_GET_ID, 0, &[], 20, false);
    assert_eq!(s, S_OK);
    assert_eq!(len, 21);
    assert_eq!(&d[..11], b"STRATA-SN-1");
    assert!(d[11..].iter().all(|&x| x == 0));

    // Beyond the end of the disk: IOERR. Not a multiple of 512: IOERR.
    let (s, _, _) = b.request(0, T_IN, DISK_SECTORS - 1, &[], 1024, false);
    assert_eq!(s, S_IOERR);
    let (s, _, _) = b.request(0, T_IN, u64::MAX / 256, &[], 512, false);
    assert_eq!(s, S_IOERR, "sector * 512 overflows");
    let (s, _, _) = b.request(0, T_IN, 0, &[], 100, false);
    assert_eq!(s, S_IOERR);
    // Unknown type: UNSUPP.
    let (s, _, _) = b.request(0, 99, 0, &[], 0, false);
    assert_eq!(s, S_UNSUPP);
    // Not negotiated: discard is UNSUPP.
    let (s, _, _) = b.request(0, T_DISCARD, 0, &segment(0, 8, 0), 0, false);
    assert_eq!(s, S_UNSUPP);
}

#[test]
fn discard_and_write_zeroes() {
    let disk = pattern_disk("vblk-discard");
    let drive_extra = format!(
        "file={},if=none,id=d0,format=raw,discard=unmap",
        disk.display()
    );
    let mut qt = Qtest::start(&[
        "-drive",
        &drive_extra,
        "-device",
        "virtio-blk-pci,drive=d0,addr=4",
    ]);
    let _ = &mut qt;
    let mut b = Blk::init(
        qt,
        VERSION_1 | BLK_FLUSH | BLK_DISCARD | BLK_WRITE_ZEROES,
        1,
    );
    assert_eq!(b.qt.readl(DEVCFG + 40), 1, "max_discard_seg");
    assert_eq!(b.qt.readb(DEVCFG + 56), 1, "write_zeroes_may_unmap");
    let (s, _, _) = b.request(0, T_WRITE_ZEROES, 16, &segment(16, 8, 0), 0, false);
    assert_eq!(s, S_OK);
    let (s, _, _) = b.request(0, T_WRITE_ZEROES, 0, &segment(40, 8, 1), 0, false);
    assert_eq!(s, S_OK, "write-zeroes with unmap");
    let (s, _, d) = b.request(0, T_IN, 15, &[], 512 * 10, false);
    assert_eq!(s, S_OK);
    assert!(d[..512].iter().all(|&x| x == pattern(15)));
    assert!(
        d[512..512 * 9].iter().all(|&x| x == 0),
        "sectors 16..24 zeroed"
    );
    assert!(d[512 * 9..].iter().all(|&x| x == pattern(24)));
    let file = std::fs::read(&disk).unwrap();
    assert!(file[40 * 512..48 * 512].iter().all(|&x| x == 0));
    let (s, _, _) = b.request(0, T_DISCARD, 0, &segment(64, 64, 0), 0, false);
    assert_eq!(s, S_OK);
    // UNMAP on a discard and unknown flags are UNSUPP; past the end IOERR.
    let (s, _, _) = b.request(0, T_DISCARD, 0, &segment(64, 8, 1), 0, false);
    assert_eq!(s, S_UNSUPP);
    let (s, _, _) = b.request(0, T_WRITE_ZEROES, 0, &segment(64, 8, 4), 0, false);
    assert_eq!(s, S_UNSUPP);
    let (s, _, _) = b.request(
        0,
        T_WRITE_ZEROES,
        0,
        &segment(DISK_SECTORS - 4, 8, 0),
        0,
        false,
    );
    assert_eq!(s, S_IOERR);
    // Two segments are more than max_discard_seg: UNSUPP, as QEMU
    // answers (its vhost-user-blk-test checks it).
    let mut two = segment(0, 8, 0);
    two.extend(segment(8, 8, 0));
    let (s, _, _) = b.request(0, T_DISCARD, 0, &two, 0, false);
    assert_eq!(s, S_UNSUPP);
}

#[test]
fn indirect_descriptors_and_event_idx() {
    let disk = pattern_disk("vblk-indirect");
    let qt = start(&disk, "", &[]);
    let mut b = Blk::init(qt, VERSION_1 | BLK_FLUSH | INDIRECT | EVENT_IDX, 1);
    let data = vec![0xa5u8; 4096];
    let (s, _, _) = b.request(0, T_OUT, 200, &data, 0, true);
    assert_eq!(s, S_OK);
    let (s, len, d) = b.request(0, T_IN, 200, &[], 4096, true);
    assert_eq!((s, len), (S_OK, 4097));
    assert_eq!(d, data);
    // The indirect chain used one ring descriptor per request.
    assert_eq!(b.vqs[0].next_desc, 2);

    // EVENT_IDX: with used_event far ahead, completions raise no MSI.
    let used_now = b.vqs[0].last_used;
    b.vqs[0].set_used_event(&mut b.qt, used_now.wrapping_add(5));
    b.clear_msi(1);
    let (s, _, _) = b.request(0, T_IN, 1, &[], 512, true);
    assert_eq!(s, S_OK);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(b.msi(1), 0, "interrupt suppressed by used_event");
    // used_event = the index of the next entry: that completion interrupts.
    let next = b.vqs[0].last_used;
    b.vqs[0].set_used_event(&mut b.qt, next);
    let (s, _, _) = b.request(0, T_IN, 2, &[], 512, false);
    assert_eq!(s, S_OK);
    let t = Instant::now();
    while b.msi(1) == 0 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(b.msi(1), 0x101);
    // The device publishes avail_event (used ring's tail) = next avail idx.
    let ae = b.qt.readw(b.vqs[0].used + 4 + 8 * 64);
    assert_eq!(ae, b.vqs[0].avail_idx);
}

#[test]
fn indirect_without_negotiation_is_an_error() {
    let disk = pattern_disk("vblk-noind");
    let qt = start(&disk, "", &[]);
    let mut b = Blk::init(qt, VERSION_1 | BLK_FLUSH, 1);
    let (s, len, _) = b.request(0, T_IN, 0, &[], 512, true);
    // The status cannot be located inside a refused indirect table.
    assert_eq!((s, len), (0xff, 0));
    let (s, _, d) = b.request(0, T_IN, 3, &[], 512, false);
    assert_eq!(s, S_OK, "device still works");
    assert_eq!(d[0], pattern(3));
}

#[test]
fn multiqueue_each_queue_with_its_vector() {
    let disk = pattern_disk("vblk-mq");
    let qt = start(
        &disk,
        ",num-queues=4,iothread=io0",
        &["-object", "iothread,id=io0"],
    );
    let mut b = Blk::init(qt, VERSION_1 | BLK_FLUSH | BLK_MQ, 4);
    assert_eq!(b.qt.readw(BAR4 + 0x12), 4);
    for q in 0..4u16 {
        for v in 1..=4 {
            b.clear_msi(v);
        }
        let sector = 500 + q as u64;
        let (s, _, d) = b.request(q, T_IN, sector, &[], 512, false);
        assert_eq!(s, S_OK);
        assert_eq!(d[0], pattern(sector));
        for v in 1..=4u16 {
            let want = if v == q + 1 { 0x100 + v as u32 } else { 0 };
            assert_eq!(b.msi(v), want, "queue {q}: vector {v}");
        }
    }
    // Several requests in flight on several queues at once, one kick each.
    for q in 0..4u16 {
        let base = BUF_BASE + 0x80_0000 + q as u64 * 0x10000;
        let mut heads = Vec::new();
        for i in 0..8u64 {
            let (hdr, st, data) = (
                base + i * 0x1000,
                base + i * 0x1000 + 0x20,
                base + i * 0x1000 + 0x200,
            );
            let mut h = T_IN.to_le_bytes().to_vec();
            h.extend_from_slice(&0u32.to_le_bytes());
            h.extend_from_slice(&(1000 + i).to_le_bytes());
            b.qt.memwrite(hdr, &h);
            b.qt.writeb(st, 0xff);
            let vq = &mut b.vqs[q as usize];
            let head = vq.add(
                &mut b.qt,
                &[(hdr, 16, false), (data, 512, true), (st, 1, true)],
                None,
            );
            let slot = vq.avail + 4 + 2 * (vq.avail_idx % vq.size) as u64;
            b.qt.writew(slot, head);
            vq.avail_idx += 1;
            heads.push(head as u32);
        }
        let vq = &mut b.vqs[q as usize];
        b.qt.writew(vq.avail + 2, vq.avail_idx);
        b.qt.writew(NOTIFY + 4 * q as u64, q);
        let mut got: Vec<u32> = (0..8)
            .map(|_| b.vqs[q as usize].wait_used(&mut b.qt).0)
            .collect();
        got.sort();
        heads.sort();
        assert_eq!(got, heads);
        for i in 0..8u64 {
            assert_eq!(b.qt.readb(base + i * 0x1000 + 0x20), S_OK);
            assert_eq!(b.qt.readb(base + i * 0x1000 + 0x200), pattern(1000 + i));
        }
    }
}

#[test]
fn config_wce_toggle_reaches_the_backend() {
    let disk = pattern_disk("vblk-wce");
    let qt = start(&disk, "", &[]);
    let mut b = Blk::init(qt, VERSION_1 | BLK_FLUSH | BLK_CONFIG_WCE, 1);
    assert_eq!(b.qt.readb(DEVCFG + 32), 1, "writeback by default");
    b.qt.writeb(DEVCFG + 32, 0);
    assert_eq!(b.qt.readb(DEVCFG + 32), 0, "backend now writethrough");
    let (s, _, _) = b.request(0, T_OUT, 5, &[1u8; 512], 0, false);
    assert_eq!(s, S_OK);
    // Writethrough: the data is in the file without a flush.
    assert!(std::fs::read(&disk).unwrap()[5 * 512..6 * 512]
        .iter()
        .all(|&x| x == 1));
    b.qt.writeb(DEVCFG + 32, 1);
    assert_eq!(b.qt.readb(DEVCFG + 32), 1);

    // Without CONFIG_WCE the field is read-only; without FLUSH the cache
    // is off, since the driver could never flush it.
    let mut b2 = Blk::map(b.qt);
    b2.set_status(0);
    assert!(b2.negotiate(VERSION_1));
    b2.setup_queue(0, 64, 0xffff);
    b2.driver_ok();
    assert_eq!(b2.qt.readb(DEVCFG + 32), 0);
    b2.qt.writeb(DEVCFG + 32, 1);
    assert_eq!(b2.qt.readb(DEVCFG + 32), 0);
}

#[test]
fn write_cache_property_and_read_only() {
    let disk = pattern_disk("vblk-ro");
    let drive = format!(
        "file={},if=none,id=d0,format=raw,readonly=on",
        disk.display()
    );
    let qt = Qtest::start(&[
        "-drive",
        &drive,
        "-device",
        "virtio-blk-pci,drive=d0,addr=4,write-cache=off",
    ]);
    let mut b = Blk::map(qt);
    let f = b.device_features();
    assert_ne!(f & 1 << 5, 0, "RO offered");
    assert_eq!(f & BLK_DISCARD, 0);
    assert!(b.negotiate(VERSION_1 | BLK_FLUSH | 1 << 5));
    b.enable_msix(2);
    b.setup_queue(0, 64, 1);
    b.driver_ok();
    assert_eq!(b.qt.readb(DEVCFG + 32), 0, "write-cache=off");
    let (s, _, _) = b.request(0, T_OUT, 0, &[0u8; 512], 0, false);
    assert_eq!(s, S_IOERR);
    let (s, _, d) = b.request(0, T_IN, 7, &[], 512, false);
    assert_eq!(s, S_OK);
    assert_eq!(d[0], pattern(7));
}

/// Hand-made chains: each gets an error status and a used entry, and the
/// device keeps working.
#[test]
fn malformed_chains_get_an_error_and_the_device_survives() {
    let disk = pattern_disk("vblk-bad");
    let qt = start(&disk, "", &[]);
    let mut b = Blk::init(qt, VERSION_1 | BLK_FLUSH, 1);
    let hdr = BUF_BASE;
    let data = BUF_BASE + 0x1000;
    let st = BUF_BASE + 0x800;
    let mut h = T_IN.to_le_bytes().to_vec();
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&0u64.to_le_bytes());
    b.qt.memwrite(hdr, &h);

    let submit = |b: &mut Blk, descs: &[(u64, u32, u16, u16)]| -> (u8, u32) {
        b.qt.writeb(st, 0xff);
        let vq = &mut b.vqs[0];
        for (i, &(a, l, f, n)) in descs.iter().enumerate() {
            vq.write_desc(&mut b.qt, vq.desc, i as u16 + 10, a, l, f, n + 10);
        }
        vq.kick(&mut b.qt, 10, |qt, q| qt.writew(NOTIFY + 4 * q as u64, q));
        let (id, len) = b.vqs[0].wait_used(&mut b.qt);
        assert_eq!(id, 10);
        (b.qt.readb(st), len)
    };
    // A loop: the status descriptor points back at the header.
    let r = submit(
        &mut b,
        &[
            (hdr, 16, F_NEXT, 1),
            (data, 512, F_NEXT | F_WRITE, 2),
            (st, 1, F_NEXT | F_WRITE, 0),
        ],
    );
    assert_eq!(r, (S_IOERR, 1), "loop");
    // Data outside guest RAM (128 MiB): IOERR.
    let r = submit(
        &mut b,
        &[
            (hdr, 16, F_NEXT, 1),
            (0x7fff_0000_0000, 512, F_NEXT | F_WRITE, 2),
            (st, 1, F_WRITE, 0),
        ],
    );
    assert_eq!(r, (S_IOERR, 1), "out of RAM");
    let r = submit(
        &mut b,
        &[
            (hdr, 16, F_NEXT, 1),
            (0x800_0000 - 256, 512, F_NEXT | F_WRITE, 2),
            (st, 1, F_WRITE, 0),
        ],
    );
    assert_eq!(r, (S_IOERR, 1), "straddles the end of RAM");
    // Wrong direction: a read whose data buffer is device-readable.
    let r = submit(
        &mut b,
        &[
            (hdr, 16, F_NEXT, 1),
            (data, 512, F_NEXT, 2),
            (st, 1, F_WRITE, 0),
        ],
    );
    assert_eq!(r, (S_IOERR, 1), "wrong direction");
    // Header too short.
    let r = submit(&mut b, &[(hdr, 8, F_NEXT, 1), (st, 1, F_WRITE, 0)]);
    assert_eq!(r, (S_IOERR, 1), "short header");
    // A readable descriptor after a writable one.
    let r = submit(
        &mut b,
        &[
            (hdr, 16, F_NEXT, 1),
            (data, 512, F_NEXT | F_WRITE, 2),
            (data, 512, F_NEXT, 3),
            (st, 1, F_WRITE, 0),
        ],
    );
    assert_eq!(r, (S_IOERR, 1), "readable after writable");
    // A next index beyond the queue.
    b.qt.writeb(st, 0xff);
    {
        let vq = &mut b.vqs[0];
        vq.write_desc(&mut b.qt, vq.desc, 10, hdr, 16, F_NEXT, 999);
        vq.kick(&mut b.qt, 10, |qt, q| qt.writew(NOTIFY + 4 * q as u64, q));
    }
    let (id, len) = b.vqs[0].wait_used(&mut b.qt);
    assert_eq!((id, len), (10, 0), "no status can be found: used len 0");
    // No status byte at all (last descriptor readable).
    let r = submit(&mut b, &[(hdr, 16, 0, 0)]);
    assert_eq!(r, (0xff, 0));

    // The device still works, and has no leftovers.
    b.vqs[0].next_desc = 20;
    let (s, _, d) = b.request(0, T_IN, 42, &[], 512, false);
    assert_eq!(s, S_OK);
    assert_eq!(d[0], pattern(42));
}

#[test]
fn legacy_interface_with_intx_through_pirq() {
    let disk = pattern_disk("vblk-legacy");
    let mut qt = start(&disk, ",disable-modern=on,vectors=0", &[]);
    assert_eq!(qt.pci_read32(SLOT, 0, 0), 0x1001_1af4);
    // Slot 4 INTA drives PIRQD ((4 - 1) + (1 - 1) = 3); route it to 11.
    qt.pci_write8(1, 0, 0x63, 11);
    assert_eq!(qt.cmd("irq_intercept_in ioapic"), "OK");
    qt.pci_write32(SLOT, 0, 0x10, BAR0 as u32 | 1);
    qt.pci_write32(SLOT, 0, 0x04, 0x5);
    let io = |r: u16| BAR0 + r;
    qt.outb(io(0x12), 0);
    qt.outb(io(0x12), 3);
    let hf = qt.inl(io(0x00));
    assert_ne!(hf & BLK_FLUSH as u32, 0);
    qt.outl(io(0x04), BLK_FLUSH as u32);
    qt.outw(io(0x0e), 0);
    let n = qt.inw(io(0x0c));
    assert_eq!(n, 256);
    // Legacy layout: contiguous, used ring 4 KiB aligned.
    let mut vq = Vq::new(0, n, RING_BASE);
    qt.memwrite(RING_BASE, &vec![0u8; 0x3000]);
    qt.outl(io(0x08), (RING_BASE >> 12) as u32);
    qt.outb(io(0x12), 7);
    // Device config at 0x14 without MSI-X: capacity.
    assert_eq!(qt.inl(io(0x14)) as u64, DISK_SECTORS);

    let (hdr, data, st) = (BUF_BASE, BUF_BASE + 0x1000, BUF_BASE + 0x800);
    let mut h = T_IN.to_le_bytes().to_vec();
    h.extend_from_slice(&[0; 4]);
    h.extend_from_slice(&77u64.to_le_bytes());
    qt.memwrite(hdr, &h);
    qt.writeb(st, 0xff);
    let head = vq.add(
        &mut qt,
        &[(hdr, 16, false), (data, 512, true), (st, 1, true)],
        None,
    );
    qt.irqs.clear();
    vq.kick(&mut qt, head, |qt, q| qt.outw(io(0x10), q));
    let (id, len) = vq.wait_used(&mut qt);
    assert_eq!((id, len), (head as u32, 513));
    assert_eq!(qt.readb(st), S_OK);
    assert_eq!(qt.readb(data), pattern(77));
    // Let the raise arrive on the channel, then read the ISR.
    let t = Instant::now();
    while !qt.irqs.contains(&(11, true)) && t.elapsed() < Duration::from_secs(5) {
        let _ = qt.inb(io(0x12));
    }
    assert!(
        qt.irqs.contains(&(11, true)),
        "INTx on IRQ 11: {:?}",
        qt.irqs
    );
    assert_eq!(qt.inb(io(0x13)), 1, "ISR: queue interrupt");
    assert_eq!(qt.inb(io(0x13)), 0, "ISR cleared by reading");
    let _ = qt.inb(io(0x12));
    assert_eq!(qt.irqs.back(), Some(&(11, false)), "INTx lowered");
}

/// [QMP] `block_resize` on a device without MSI-X: INTx and ISR 0x3, the
/// configuration bit with the queue bit as QEMU sets them (libqos's
/// virtio-blk `resize` case waits for the queue bit).
#[test]
fn block_resize_without_msix_sets_both_isr_bits() {
    let disk = pattern_disk("vblk-resize-intx");
    let sock = support::scratch("vblk-resize-intx-qmp").join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", sock.display());
    let mut qt = start(&disk, ",disable-modern=on,vectors=0", &["-qmp", &qmp_arg]);
    let mut q = support::qmp::Qmp::negotiated(&sock);
    qt.pci_write8(1, 0, 0x63, 11);
    assert_eq!(qt.cmd("irq_intercept_in ioapic"), "OK");
    qt.pci_write32(SLOT, 0, 0x10, BAR0 as u32 | 1);
    qt.pci_write32(SLOT, 0, 0x04, 0x5);
    let io = |r: u16| BAR0 + r;
    qt.outb(io(0x12), 0);
    qt.outb(io(0x12), 7);
    assert_eq!(qt.inb(io(0x13)), 0, "no interrupt yet");
    q.ok(
        "block_resize",
        serde_json::json!({"device": "d0", "size": DISK_SECTORS * 2 * 512}),
    );
    let t = Instant::now();
    while !qt.irqs.contains(&(11, true)) && t.elapsed() < Duration::from_secs(5) {
        let _ = qt.inb(io(0x12));
    }
    assert!(qt.irqs.contains(&(11, true)), "INTx: {:?}", qt.irqs);
    assert_eq!(qt.inb(io(0x13)), 3, "ISR: configuration and queue bits");
    assert_eq!(qt.inl(io(0x14)) as u64, DISK_SECTORS * 2);
}

#[test]
fn reset_while_running_then_reinitialise() {
    let disk = pattern_disk("vblk-reset");
    let qt = start(&disk, "", &[]);
    let mut b = Blk::init(qt, VERSION_1 | BLK_FLUSH, 1);
    let (s, _, _) = b.request(0, T_IN, 1, &[], 512, false);
    assert_eq!(s, S_OK);
    b.set_status(0);
    assert_eq!(b.status(), 0);
    b.qt.writew(BAR4 + 0x16, 0);
    assert_eq!(b.qt.readw(BAR4 + 0x1c), 0, "queue disabled by reset");
    b.vqs.clear();
    assert!(b.negotiate(VERSION_1 | BLK_FLUSH));
    b.setup_queue(0, 64, 1);
    b.driver_ok();
    let (s, _, d) = b.request(0, T_IN, 9, &[], 512, false);
    assert_eq!(s, S_OK);
    assert_eq!(d[0], pattern(9));
}

#[test]
fn bad_properties_are_refused() {
    let disk = pattern_disk("vblk-props");
    for (opts, want) in [
        (",queue-size=100", "queue-size"),
        (",iothread=nope", "iothread 'nope'"),
        (",frob=1", "Property 'virtio-blk-pci.frob' not found"),
        (",disable-legacy=on,disable-modern=on", "no interface"),
    ] {
        let drive = format!("file={},if=none,id=d0,format=raw", disk.display());
        let dev = format!("virtio-blk-pci,drive=d0{opts}");
        let (code, _out, err) = support::run_strata(
            &[
                "-machine",
                "pc,accel=qtest",
                "-qtest",
                "stdio",
                "-drive",
                &drive,
                "-device",
                &dev,
            ],
            Duration::from_secs(10),
        );
        assert_ne!(code, Some(0), "{opts}");
        assert!(err.contains(want), "{opts}: {err}");
    }
}

/// `-global` sets the default of every virtio-blk-pci; a property on the
/// device itself still wins.
#[test]
fn global_num_queues_reaches_config_space() {
    let disk = pattern_disk("vblk-global");
    for (global, dev_opts, want) in [
        ("virtio-blk-pci.num-queues=2", ",disable-legacy=on", 2),
        (
            "driver=virtio-blk-pci,property=num-queues,value=3",
            ",disable-legacy=on",
            3,
        ),
        (
            "virtio-blk-pci.num-queues=2",
            ",disable-legacy=on,num-queues=4",
            4,
        ),
    ] {
        let qt = start(&disk, dev_opts, &["-global", global]);
        let mut b = Blk::map(qt);
        assert!(b.negotiate(VERSION_1 | BLK_MQ));
        assert_eq!(b.qt.readw(DEVCFG + 34), want, "{global} {dev_opts}");
    }
}

/// What libvirt writes for a virtio disk: `scsi=off` (accepted with a
/// warning), `bus=pci.0`, a hex `addr`, `write-cache`.
#[test]
fn libvirt_device_line_is_accepted() {
    let disk = pattern_disk("vblk-libvirt");
    let drive = format!("file={},if=none,id=d,format=raw", disk.display());
    let mut qt = Qtest::start(&[
        "-drive",
        &drive,
        "-device",
        "virtio-blk-pci,scsi=off,bus=pci.0,addr=0x5,drive=d,id=v,bootindex=1,write-cache=off",
    ]);
    assert_eq!(qt.pci_read32(5, 0, 0), 0x1001_1af4);
}

/// The log line the queue worker writes when it stops a broken queue.
const STOP_MSG: &str = "stopped until the device is reset";

/// Sets queue q's avail->idx to `idx` behind the driver's back and kicks.
fn bogus_avail_idx(b: &mut Blk, q: u16, idx: u16) {
    let avail = b.vqs[q as usize].avail;
    b.qt.writew(avail + 2, idx);
    b.qt.writew(NOTIFY + 4 * q as u64, q);
}

/// Reads the capacity from device config space; asserts the device answers.
fn config_capacity(b: &mut Blk) -> u64 {
    let lo = b.qt.readl(DEVCFG) as u64;
    let hi = b.qt.readl(DEVCFG + 4) as u64;
    lo | hi << 32
}

/// [HARDEN] RING_EVENT_IDX with avail->idx more than the queue size ahead:
/// the worker stops the queue (once, logged) instead of spinning, the
/// device still answers, a reset returns and re-initialisation works, and
/// strata exits promptly when the qtest channel closes.
#[test]
fn event_idx_avail_idx_far_ahead_stops_the_queue() {
    let disk = pattern_disk("vblk-spin");
    let log = support::scratch("vblk-spin-log").join("strata.log");
    let log_arg = log.display().to_string();
    let qt = start(&disk, "", &["-D", &log_arg]);
    let mut b = Blk::init(qt, VERSION_1 | EVENT_IDX, 1);
    let (s, _, _) = b.request(0, T_IN, 1, &[], 512, false);
    assert_eq!(s, S_OK);
    let bogus = b.vqs[0].avail_idx.wrapping_add(64 + 5);
    bogus_avail_idx(&mut b, 0, bogus);
    b.qt.writew(NOTIFY, 0);

    // (a) the device still answers, within a bounded time.
    let t = Instant::now();
    for _ in 0..20 {
        assert_eq!(config_capacity(&mut b), DISK_SECTORS);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(t.elapsed() < Duration::from_secs(5), "config reads slow");

    // (b) a reset returns, and the device serves a fresh ring.
    let t = Instant::now();
    b.set_status(0);
    assert_eq!(b.status(), 0);
    assert!(t.elapsed() < Duration::from_secs(5), "reset took too long");
    b.vqs.clear();
    assert!(b.negotiate(VERSION_1 | EVENT_IDX));
    b.setup_queue(0, 64, 1);
    b.driver_ok();
    let (s, _, d) = b.request(0, T_IN, 7, &[], 512, false);
    assert_eq!(s, S_OK);
    assert_eq!(d[0], pattern(7));

    // (c) strata exits promptly when the channel closes.
    let took = b.qt.close_and_wait_exit(Duration::from_secs(5));
    assert!(took.is_some(), "strata still running 5 s after the close");

    // (d) the stop message, exactly once (the queue was stopped, and the
    // later kick did not log again).
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let n = text.matches(STOP_MSG).count();
    assert_eq!(n, 1, "stop message logged {n} times:\n{text}");
}

/// [HARDEN] The variant: reset, then DRIVER_OK again over the old
/// ring whose avail->idx is far ahead (queue registers re-programmed as a
/// driver would, ring memory left as it was).
#[test]
fn reset_then_driver_ok_over_a_far_ahead_ring() {
    let disk = pattern_disk("vblk-spin2");
    let log = support::scratch("vblk-spin2-log").join("strata.log");
    let log_arg = log.display().to_string();
    let qt = start(&disk, "", &["-D", &log_arg]);
    let mut b = Blk::init(qt, VERSION_1 | EVENT_IDX, 1);
    let bogus = 64 + 5;
    bogus_avail_idx(&mut b, 0, bogus);
    assert_eq!(config_capacity(&mut b), DISK_SECTORS);

    let t = Instant::now();
    b.set_status(0);
    assert_eq!(b.status(), 0);
    // Re-program the queue at the same place without clearing the ring.
    assert!(b.negotiate(VERSION_1 | EVENT_IDX));
    let vq = &b.vqs[0];
    let (desc, avail, used) = (vq.desc, vq.avail, vq.used);
    b.qt.writew(BAR4 + 0x16, 0);
    b.qt.writew(BAR4 + 0x18, 64);
    b.qt.writew(BAR4 + 0x1a, 1);
    b.qt.writeq(BAR4 + 0x20, desc);
    b.qt.writel(BAR4 + 0x28, avail as u32);
    b.qt.writel(BAR4 + 0x2c, 0);
    b.qt.writeq(BAR4 + 0x30, used);
    b.qt.writew(BAR4 + 0x1c, 1);
    b.set_status(0xf);
    b.qt.writew(NOTIFY, 0);
    for _ in 0..20 {
        assert_eq!(config_capacity(&mut b), DISK_SECTORS);
        std::thread::sleep(Duration::from_millis(5));
    }
    b.set_status(0);
    assert_eq!(b.status(), 0);
    assert!(t.elapsed() < Duration::from_secs(5), "device stuck");

    // A proper init on a fresh ring works.
    b.vqs.clear();
    assert!(b.negotiate(VERSION_1 | EVENT_IDX));
    b.setup_queue(0, 64, 1);
    b.driver_ok();
    let (s, _, d) = b.request(0, T_IN, 3, &[], 512, false);
    assert_eq!(s, S_OK);
    assert_eq!(d[0], pattern(3));

    let took = b.qt.close_and_wait_exit(Duration::from_secs(5));
    assert!(took.is_some(), "strata still running 5 s after the close");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let n = text.matches(STOP_MSG).count();
    // Once per activation over the broken ring: before and after the reset.
    assert!(n <= 2, "stop message logged {n} times:\n{text}");
}

/// [HARDEN] Virtio 1.2 section 3.1.1: on the modern interface DRIVER_OK
/// without FEATURES_OK does not activate the device as a legacy one; the
/// queue serves nothing, and a later proper initialisation works.
#[test]
fn modern_driver_ok_without_features_ok_does_not_activate() {
    let disk = pattern_disk("vblk-nofeat");
    let qt = start(&disk, "", &[]);
    let mut b = Blk::map(qt);
    b.enable_msix(2);
    b.qt.writew(BAR4 + 0x10, 0);
    b.set_status(0);
    b.set_status(1);
    b.set_status(3);
    b.setup_queue(0, 64, 1);
    b.set_status(1 | 2 | 4);
    assert_eq!(b.status() & 8, 0, "no FEATURES_OK");

    // Post a read; no used entry may appear.
    let (hdr, st) = (BUF_BASE, BUF_BASE + 0x800);
    let mut h = Vec::new();
    h.extend_from_slice(&T_IN.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&0u64.to_le_bytes());
    b.qt.memwrite(hdr, &h);
    b.qt.writeb(st, 0xff);
    let bufs = [
        (hdr, 16, false),
        (BUF_BASE + 0x1000, 512, true),
        (st, 1, true),
    ];
    let vq = &mut b.vqs[0];
    let head = vq.add(&mut b.qt, &bufs, None);
    vq.kick(&mut b.qt, head, |qt, q| qt.writew(NOTIFY + 4 * q as u64, q));
    b.qt.clock_step(10_000_000);
    std::thread::sleep(Duration::from_millis(200));
    let used = b.vqs[0].used;
    assert_eq!(b.qt.readw(used + 2), 0, "a used entry appeared");
    assert_eq!(b.qt.readb(st), 0xff, "the request ran");

    // A proper initialisation afterwards works.
    b.vqs.clear();
    assert!(b.negotiate(VERSION_1));
    b.setup_queue(0, 64, 1);
    b.driver_ok();
    let (s, _, d) = b.request(0, T_IN, 5, &[], 512, false);
    assert_eq!(s, S_OK);
    assert_eq!(d[0], pattern(5));
}

/// [QMP] `block_resize` under a running driver: the configuration-change
/// interrupt fires on the config vector, `config_generation` moves, the
/// new capacity is in config space, and requests past the old end work.
#[test]
fn block_resize_signals_a_config_change() {
    let disk = pattern_disk("vblk-resize");
    let sock = support::scratch("vblk-resize-qmp").join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", sock.display());
    let qt = start(&disk, "", &["-qmp", &qmp_arg]);
    let mut q = support::qmp::Qmp::negotiated(&sock);
    let mut b = Blk::init(qt, VERSION_1 | BLK_FLUSH, 1);
    assert_eq!(config_capacity(&mut b), DISK_SECTORS);
    let gen = b.qt.readb(BAR4 + 0x15);
    b.clear_msi(0);
    let (s, _, _) = b.request(0, T_IN, DISK_SECTORS, &[], 512, false);
    assert_eq!(s, S_IOERR, "past the end before the resize");

    let new_size = DISK_SECTORS * 2 * 512;
    q.ok(
        "block_resize",
        serde_json::json!({"device": "d0", "size": new_size}),
    );
    assert_eq!(b.msi(0), 0x100, "the config vector fired");
    assert_ne!(b.qt.readb(BAR4 + 0x15), gen, "config_generation moved");
    assert_eq!(config_capacity(&mut b), DISK_SECTORS * 2);
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), new_size);
    let (s, _, d) = b.request(0, T_IN, DISK_SECTORS + 3, &[], 512, false);
    assert_eq!(s, S_OK, "the grown part is readable");
    assert!(d.iter().all(|&x| x == 0));
    let blocks = q.ok("query-block", serde_json::json!({}));
    assert_eq!(blocks[0]["inserted"]["image"]["virtual-size"], new_size);

    // By node name, and the errors.
    let node = blocks[0]["inserted"]["node-name"]
        .as_str()
        .unwrap()
        .to_string();
    b.clear_msi(0);
    q.ok(
        "block_resize",
        serde_json::json!({"node-name": node, "size": new_size + (1 << 20)}),
    );
    assert_eq!(b.msi(0), 0x100);
    assert_eq!(config_capacity(&mut b), DISK_SECTORS * 2 + 2048);
    let (_, desc) = q.err(
        "block_resize",
        serde_json::json!({"device": "nope", "size": 512}),
    );
    assert_eq!(desc, "Cannot find device=nope nor node-name=");
    let (_, desc) = q.err(
        "block_resize",
        serde_json::json!({"device": "d0", "size": -1}),
    );
    assert_eq!(desc, "Parameter 'size' expects a >0 size");
}

/// [QMP] PCI hotplug on `pc`: `blockdev-add` of a qcow2 node and
/// `device_add` of a virtio-blk-pci on it appear in config space with the
/// ACPI hotplug GPE and PCIU bit; the device does I/O; `device_del` asks
/// the guest (PCID), the guest's `_EJ0` write ejects it, DEVICE_DELETED
/// follows, and the node can then be deleted.
#[test]
fn device_add_and_del_with_acpi_hotplug() {
    use serde_json::json;
    let dir = support::scratch("vblk-hotplug");
    let img = dir.join("hot.qcow2");
    let img_s = img.display().to_string();
    let run = |cmd: &str, args: &[&str]| {
        let st = std::process::Command::new(cmd).args(args).status().unwrap();
        assert!(st.success(), "{cmd} {args:?}");
    };
    run("qemu-img", &["create", "-q", "-f", "qcow2", &img_s, "16M"]);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x5a 0 64k", &img_s],
    );
    let sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", sock.display());
    let mut qt = Qtest::start(&["-qmp", &qmp_arg]);
    let mut q = support::qmp::Qmp::negotiated(&sock);
    q.ok(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": "n0",
               "file": {"driver": "file", "filename": img_s}}),
    );
    // Errors first: nothing changes.
    assert_eq!(
        q.err("device_add", json!({"driver": "ide-hd", "drive": "n0"}))
            .1,
        "Bus 'ide.0' does not support hotplugging"
    );
    assert_eq!(
        q.err(
            "device_add",
            json!({"driver": "virtio-blk-pci", "drive": "n0", "bogus": 1})
        )
        .1,
        "Property 'virtio-blk-pci.bogus' not found"
    );
    assert_eq!(
        q.err(
            "device_add",
            json!({"driver": "virtio-blk-pci", "drive": "nope"})
        )
        .1,
        "Property 'drive' can't find value 'nope'"
    );
    assert_eq!(qt.pci_read32(SLOT, 0, 0), 0xffff_ffff, "slot still empty");

    // ACPI mode with the hotplug GPE enabled, as the guest's OSPM sets it.
    qt.outb(0xb2, 0xf1);
    qt.outw(0xafe2, 2);
    q.ok(
        "device_add",
        json!({"driver": "virtio-blk-pci", "drive": "n0", "id": "hot", "addr": "0x4"}),
    );
    assert_eq!(
        qt.pci_read32(SLOT, 0, 0) & 0xffff,
        0x1af4,
        "virtio vendor at slot 4"
    );
    let tree = q.ok(
        "human-monitor-command",
        json!({"command-line": "info qtree"}),
    );
    assert_eq!(
        tree,
        "bus: pci.0\n  dev: virtio-blk-pci, id \"hot\"\n    drive = \"n0\"\n    addr = 04.0\n"
    );
    assert_eq!(qt.inw(0xafe0) & 2, 2, "PCI hotplug GPE raised");
    assert_eq!(qt.inl(0xae00), 1 << SLOT, "PCIU names the slot");
    qt.outw(0xafe0, 2);
    assert_eq!(
        q.err(
            "device_add",
            json!({"driver": "virtio-blk-pci", "drive": "n0", "id": "hot"})
        )
        .1,
        "Duplicate ID 'hot' for device"
    );

    // The new disk works.
    let mut b = Blk::init(qt, VERSION_1 | BLK_FLUSH, 1);
    let (s, _, d) = b.request(0, T_IN, 0, &[], 4096, false);
    assert_eq!(s, S_OK);
    assert!(d.iter().all(|&x| x == 0x5a));
    // In use: the node cannot go.
    assert!(q
        .err("blockdev-del", json!({"node-name": "n0"}))
        .1
        .contains("in use"));

    // device_del: the guest is asked, and nothing is gone until it ejects.
    assert_eq!(
        q.err("device_del", json!({"id": "nope"})).0,
        "DeviceNotFound"
    );
    q.ok("device_del", json!({"id": "hot"}));
    assert_eq!(b.qt.inw(0xafe0) & 2, 2);
    assert_eq!(b.qt.inl(0xae04), 1 << SLOT, "PCID names the slot");
    assert!(q.events.iter().all(|e| e["event"] != "DEVICE_DELETED"));
    assert_eq!(b.qt.pci_read32(SLOT, 0, 0) & 0xffff, 0x1af4);
    // The guest's _EJ0.
    b.qt.outl(0xae08, 1 << SLOT);
    let e = q.event("DEVICE_DELETED");
    assert_eq!(
        e["data"],
        json!({"device": "hot", "path": "/machine/peripheral/hot"})
    );
    assert_eq!(b.qt.pci_read32(SLOT, 0, 0), 0xffff_ffff, "slot empty again");
    assert_eq!(b.qt.inl(0xae04), 0);
    q.ok("blockdev-del", json!({"node-name": "n0"}));
    run("qemu-img", &["check", "-q", &img_s]);
}

/// A hot-plugged device survives a machine reset, as QEMU's do.
#[test]
fn hotplugged_device_survives_reset() {
    use serde_json::json;
    let disk = pattern_disk("vblk-hotplug-reset");
    let sock = support::scratch("vblk-hotplug-reset-qmp").join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", sock.display());
    let drive = format!("file={},if=none,id=d0,format=raw", disk.display());
    let mut qt = Qtest::start(&["-drive", &drive, "-qmp", &qmp_arg]);
    let mut q = support::qmp::Qmp::negotiated(&sock);
    q.ok(
        "device_add",
        json!({"driver": "virtio-blk-pci", "drive": "d0", "id": "v", "addr": "4"}),
    );
    q.ok("system_reset", json!({}));
    q.event("RESET");
    assert_eq!(qt.pci_read32(SLOT, 0, 0) & 0xffff, 0x1af4);
    let mut b = Blk::init(qt, VERSION_1, 1);
    let (s, _, d) = b.request(0, T_IN, 7, &[], 512, false);
    assert_eq!(s, S_OK);
    assert!(d.iter().all(|&x| x == pattern(7)));
}

/// [JOBS] A mirror while the device writes: virtio-blk requests keep
/// arriving through the copy, the ready phase and the pivot (requests that
/// come while the device's backend is drained wait, then go to the new
/// root). Afterwards the target holds everything the device wrote, and the
/// device goes on writing into it.
#[test]
fn mirror_while_the_device_writes() {
    use serde_json::json;
    let disk = pattern_disk("vblk-mirror");
    let dir = support::scratch("vblk-mirror-qmp");
    let sock = dir.join("qmp.sock");
    let target = dir.join("target.raw");
    let qmp_arg = format!("unix:{},server=on,wait=off", sock.display());
    let qt = start(&disk, "", &["-qmp", &qmp_arg]);
    let mut q = support::qmp::Qmp::negotiated(&sock);
    let mut b = Blk::init(qt, VERSION_1 | BLK_FLUSH, 1);
    let mut model = std::fs::read(&disk).unwrap();
    let write = |b: &mut Blk, model: &mut Vec<u8>, round: u64| {
        let sector = (round * 37) % (DISK_SECTORS - 8);
        let data = vec![(round % 253) as u8 + 1; 8 * 512];
        let (s, _, _) = b.request(0, T_OUT, sector, &data, 0, false);
        assert_eq!(s, S_OK);
        let at = (sector * 512) as usize;
        model[at..at + data.len()].copy_from_slice(&data);
    };
    q.ok(
        "drive-mirror",
        json!({"device": "d0", "job-id": "m", "target": target, "sync": "full",
               "format": "raw", "speed": 4194304}),
    );
    let mut round = 0;
    let mut completed = false;
    loop {
        write(&mut b, &mut model, round);
        round += 1;
        let jobs = q.ok("query-block-jobs", json!({}));
        let Some(j) = jobs.as_array().unwrap().first() else {
            break;
        };
        if j["ready"] == true && !completed {
            q.ok("block-job-complete", json!({"device": "m"}));
            completed = true;
        }
        // At 4 MiB/s the mirror copies a 64 KiB granule in 16 ms; a test
        // loop that writes faster (a quick host) dirties granules as fast
        // as they are copied and the job never gets ready. After a while
        // of writes through the copy, the limit goes, so it converges.
        if round == 200 {
            q.ok("block-job-set-speed", json!({"device": "m", "speed": 0}));
        }
        assert!(round < 100_000, "the mirror never finished: {j}");
    }
    let e = q.event("BLOCK_JOB_COMPLETED");
    assert!(e["data"].get("error").is_none(), "{e}");
    for _ in 0..20 {
        write(&mut b, &mut model, round);
        round += 1;
    }
    let (s, _, _) = b.request(0, T_FLUSH, 0, &[], 0, false);
    assert_eq!(s, S_OK);
    let got = std::fs::read(&target).unwrap();
    assert!(
        got == model,
        "the target differs from what the device wrote"
    );
    // The source stopped at the pivot.
    assert_ne!(std::fs::read(&disk).unwrap(), model);
}

/// [JOBS] An external snapshot, an active commit with pivot and a
/// point-in-time backup, each while the qtest-driven device keeps
/// writing. The final image, and the backup against the disk as it was
/// when the backup started, are judged by `qemu-img check` and compare.
#[test]
fn snapshot_commit_and_backup_while_the_device_writes() {
    use serde_json::json;
    let dir = support::scratch("vblk-jobs");
    let base = dir.join("base.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg((DISK_SECTORS * 512).to_string())
        .status()
        .unwrap();
    assert!(st.success());
    let sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", sock.display());
    let drive = format!("file={},if=none,id=d0,format=qcow2", base.display());
    let qt = Qtest::start(&[
        "-drive",
        &drive,
        "-device",
        "virtio-blk-pci,drive=d0,addr=4",
        "-qmp",
        &qmp_arg,
    ]);
    let mut q = support::qmp::Qmp::negotiated(&sock);
    let mut b = Blk::init(qt, VERSION_1 | BLK_FLUSH, 1);
    let mut model = vec![0u8; (DISK_SECTORS * 512) as usize];
    let write = |b: &mut Blk, model: &mut Vec<u8>, round: u64| {
        let sector = (round * 53) % (DISK_SECTORS - 16);
        let data = vec![(round % 251) as u8 + 1; 16 * 512];
        let (s, _, _) = b.request(0, T_OUT, sector, &data, 0, false);
        assert_eq!(s, S_OK);
        let at = (sector * 512) as usize;
        model[at..at + data.len()].copy_from_slice(&data);
    };
    let mut round = 0;
    // Runs `f` between writes until the job `id` has gone; returns the
    // number of writes made meanwhile.
    let mut until_gone = |b: &mut Blk, q: &mut support::qmp::Qmp, model: &mut Vec<u8>, id: &str| {
        let (mut n, mut completed) = (0, false);
        loop {
            write(b, model, round);
            round += 1;
            n += 1;
            let jobs = q.ok("query-block-jobs", json!({}));
            let Some(j) = jobs.as_array().unwrap().iter().find(|j| j["device"] == id) else {
                break;
            };
            if j["ready"] == true && !completed {
                q.ok("block-job-complete", json!({"device": id}));
                completed = true;
            }
            // A throttled job copies slower than a busy device dirties
            // (on a loaded machine it may never catch up, in QEMU too): as
            // a management tool would, lift the limit after a while.
            if n == 2_000 {
                q.ok("block-job-set-speed", json!({"device": id, "speed": 0}));
            }
            assert!(n < 100_000, "job {id} never finished: {j}");
        }
        let e = q.event("BLOCK_JOB_COMPLETED");
        assert!(e["data"].get("error").is_none(), "{e}");
        n
    };
    for r in 0..30 {
        write(&mut b, &mut model, 1000 + r);
    }
    let overlay = dir.join("overlay.qcow2");
    q.ok(
        "blockdev-snapshot-sync",
        json!({"device": "d0", "snapshot-file": overlay, "format": "qcow2"}),
    );
    for r in 0..30 {
        write(&mut b, &mut model, 2000 + r);
    }
    q.ok(
        "block-commit",
        json!({"device": "d0", "job-id": "c", "speed": 2097152}),
    );
    assert!(until_gone(&mut b, &mut q, &mut model, "c") > 1);
    // The device now writes into the base again.
    let backup = dir.join("backup.qcow2");
    let at_backup = model.clone();
    q.ok(
        "drive-backup",
        json!({"device": "d0", "job-id": "bk", "target": backup, "sync": "full",
               "format": "qcow2", "speed": 2097152}),
    );
    assert!(until_gone(&mut b, &mut q, &mut model, "bk") > 1);
    let (s, _, _) = b.request(0, T_FLUSH, 0, &[], 0, false);
    assert_eq!(s, S_OK);
    q.ok("quit", json!({}));
    assert!(b.qt.wait_exit(Duration::from_secs(30)).is_some());
    let judge = |image: &std::path::Path, want: &[u8], name: &str| {
        let o = std::process::Command::new("qemu-img")
            .arg("check")
            .arg(image)
            .output()
            .unwrap();
        assert!(o.status.success(), "qemu-img check {}", image.display());
        let m = dir.join(name);
        std::fs::write(&m, want).unwrap();
        let o = std::process::Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "qcow2"])
            .arg(&m)
            .arg(image)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{}: {}",
            image.display(),
            String::from_utf8_lossy(&o.stdout)
        );
    };
    judge(&base, &model, "model.raw");
    judge(&backup, &at_backup, "at-backup.raw");
}
