//! The floppy controller through the qtest protocol, no KVM: the test
//! plays the guest's floppy driver (command, execution and result phases,
//! ISA DMA channel 2 programmed through the 8237 ports) on real image
//! files and checks result bytes, ST0-ST3, the disk-change line, the
//! interrupt and the bytes in memory and in the image.

mod support;

use std::path::{Path, PathBuf};

use support::qtest::Qtest;

const FDC: u16 = 0x3f0;
const DOR: u16 = FDC + 2;
const MSR: u16 = FDC + 4;
const FIFO: u16 = FDC + 5;
const DIR: u16 = FDC + 7;
const RQM: u8 = 0x80;
const DIO: u8 = 0x40;

const SEEK: u8 = 0x0f;
const SENSE_INT: u8 = 0x08;
const SENSE_DRIVE: u8 = 0x04;
const READ: u8 = 0xe6;
const WRITE: u8 = 0xc5;
const READ_ID: u8 = 0x4a;
const CONFIGURE: u8 = 0x13;
const DUMPREG: u8 = 0x0e;
/// LOCK with its lock bit (bit 7) set; 0x14 unlocks.
const LOCK: u8 = 0x94;
const VERSION: u8 = 0x10;

/// A 1.44 MB image whose sector n holds n as a little-endian u16, then
/// a pattern.
fn make_floppy(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let mut data = Vec::with_capacity(1_474_560);
    for n in 0..2880u32 {
        let mut s = vec![(n % 251) as u8; 512];
        s[..2].copy_from_slice(&(n as u16).to_le_bytes());
        data.extend(s);
    }
    std::fs::write(&p, data).unwrap();
    p
}

struct Fd {
    q: Qtest,
}

impl Fd {
    fn start(extra: &[&str]) -> Fd {
        let mut q = Qtest::start(extra);
        q.cmd("irq_intercept_in ioapic");
        Fd { q }
    }

    fn send(&mut self, bytes: &[u8]) {
        for &b in bytes {
            let msr = self.q.inb(MSR);
            assert_eq!(msr & (RQM | DIO), RQM, "ready for {b:#x}: MSR {msr:#x}");
            self.q.outb(FIFO, b);
        }
    }

    /// Waits for the result phase, then reads `n` bytes.
    fn results(&mut self, n: usize) -> Vec<u8> {
        let start = std::time::Instant::now();
        while self.q.inb(MSR) & (RQM | DIO) != RQM | DIO {
            assert!(start.elapsed().as_secs() < 10, "no result phase");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        (0..n).map(|_| self.q.inb(FIFO)).collect()
    }

    fn irq(&mut self) -> bool {
        // The last level qtest reported for IRQ 6.
        self.q.cmd("clock_step 0");
        let mut up = None;
        for &(n, l) in &self.q.irqs {
            if n == 6 {
                up = Some(l);
            }
        }
        up.unwrap_or(false)
    }

    fn seek(&mut self, cyl: u8) -> Vec<u8> {
        self.send(&[SEEK, 0, cyl]);
        assert!(self.irq());
        self.send(&[SENSE_INT]);
        self.results(2)
    }

    /// Channel 2: `len` bytes at `addr`, `mode` 0x44 (to memory) or 0x48.
    fn dma(&mut self, mode: u8, addr: u32, len: u16) {
        self.q.outb(0x0a, 0x06);
        self.q.outb(0x0c, 0);
        self.q.outb(0x0b, mode | 2);
        self.q.outb(0x04, addr as u8);
        self.q.outb(0x04, (addr >> 8) as u8);
        self.q.outb(0x81, (addr >> 16) as u8);
        self.q.outb(0x05, (len - 1) as u8);
        self.q.outb(0x05, ((len - 1) >> 8) as u8);
        self.q.outb(0x0a, 0x02);
    }
}

fn sector(img: &[u8], lba: usize) -> &[u8] {
    &img[lba * 512..(lba + 1) * 512]
}

/// DMA READ DATA and WRITE DATA through the 8237 (results name the next
/// sector), checked in memory and in the image; READ ID; SENSE DRIVE
/// STATUS; a seek past the last track goes nowhere; the change line
/// clears on a step with the medium in.
#[test]
fn dma_reads_and_writes_read_id_and_seeks() {
    let dir = support::scratch("fdc-qtest-dma");
    let img = make_floppy(&dir, "fd.img");
    let drive = format!("file={},format=raw,if=floppy", img.display());
    let mut f = Fd::start(&["-drive", &drive]);
    assert_eq!(f.q.cmos(0x10), 0x40, "drive A: 1.44 MB");
    assert_eq!(f.q.cmos(0x14) & 0xc1, 0x01, "one diskette drive");
    assert_eq!(f.q.inb(DIR) & 0x80, 0x80, "changed since power-on");
    assert_eq!(f.seek(0), vec![0x20, 0]);
    assert_eq!(f.q.inb(DIR) & 0x80, 0x80, "no step yet");
    assert_eq!(f.seek(2), vec![0x20, 2]);
    assert_eq!(f.q.inb(DIR) & 0x80, 0, "stepped with a medium in");
    // Track 2, head 1, sectors 5-7: LBAs (2*2+1)*18 + 4 = 94..97.
    f.dma(0x44, 0x1_0000, 3 * 512);
    f.send(&[READ, 0x04, 2, 1, 5, 2, 18, 0x1b, 0xff]);
    assert_eq!(f.results(7), vec![0x04, 0, 0, 2, 1, 8, 2]);
    let image = std::fs::read(&img).unwrap();
    let mem = f.q.memread(0x1_0000, 3 * 512);
    for i in 0..3 {
        assert_eq!(
            &mem[i * 512..(i + 1) * 512],
            sector(&image, 94 + i),
            "sector {i}"
        );
    }
    // WRITE DATA from memory to track 3, head 0, sector 1 (LBA 108).
    f.q.memwrite(0x2_0000, &[0x5a; 512]);
    f.dma(0x48, 0x2_0000, 512);
    f.send(&[WRITE, 0x00, 3, 0, 1, 2, 18, 0x1b, 0xff]);
    let r = f.results(7);
    assert_eq!(r[0] & 0xc0, 0, "normal termination: {r:?}");
    assert!(sector(&std::fs::read(&img).unwrap(), 108)
        .iter()
        .all(|&b| b == 0x5a));
    // READ ID on head 1 of the current track.
    f.send(&[READ_ID, 0x04]);
    let r = f.results(7);
    assert_eq!((r[0], r[3], r[4], r[6]), (0x04, 3, 1, 2));
    // SENSE DRIVE STATUS: ready, two-sided, not track 0, writable.
    f.send(&[SENSE_DRIVE, 0x00]);
    assert_eq!(f.results(1), vec![0x28]);
    // A seek past track 79 leaves the head where it was.
    assert_eq!(f.seek(90), vec![0x20, 3]);
}

/// A read-only drive: WRITE DATA ends with NOT WRITABLE (ST1 bit 1) and
/// ST3 shows write protection; the image is untouched.
#[test]
fn writes_to_a_read_only_drive_fail_with_write_protect() {
    let dir = support::scratch("fdc-qtest-ro");
    let img = make_floppy(&dir, "fd.img");
    let before = std::fs::read(&img).unwrap();
    let drive = format!("file={},format=raw,if=floppy,readonly=on", img.display());
    let mut f = Fd::start(&["-drive", &drive]);
    f.send(&[SENSE_DRIVE, 0x00]);
    assert_eq!(f.results(1)[0] & 0x40, 0x40, "ST3 WP");
    f.dma(0x48, 0x2_0000, 512);
    f.send(&[WRITE, 0x00, 0, 0, 1, 2, 18, 0x1b, 0xff]);
    let r = f.results(7);
    assert_eq!((r[0] & 0xc0, r[1]), (0x40, 0x02), "{r:?}");
    assert_eq!(std::fs::read(&img).unwrap(), before);
}

/// CONFIGURE, LOCK and DUMPREG round trips; VERSION; a reset keeps
/// locked parameters and is acknowledged by four SENSE INTERRUPTs.
#[test]
fn configure_lock_dumpreg_and_reset() {
    let mut f = Fd::start(&["-device", "floppy,id=fd0"]);
    f.send(&[VERSION]);
    assert_eq!(f.results(1), vec![0x90]);
    f.send(&[CONFIGURE, 0, 0x57, 0x09]);
    f.send(&[LOCK]);
    assert_eq!(f.results(1), vec![0x10]);
    f.send(&[DUMPREG]);
    let d = f.results(10);
    assert_eq!((d[7] & 0x80, d[8], d[9]), (0x80, 0x57, 0x09));
    // Reset through the DOR: parameters kept while locked.
    f.q.outb(DOR, 0x08);
    f.q.outb(DOR, 0x0c);
    assert!(f.irq());
    for n in 0..4u8 {
        f.send(&[SENSE_INT]);
        assert_eq!(f.results(2)[0], 0xc0 | n);
    }
    f.send(&[DUMPREG]);
    assert_eq!(f.results(10)[8], 0x57);
    // An unknown command: ST0 80h.
    f.send(&[0x1f]);
    assert_eq!(f.results(1), vec![0x80]);
}

/// QMP loads and ejects a medium in an empty drive: the change line rises
/// on each change and the guest reads the new medium.
#[test]
fn media_change_through_qmp() {
    let dir = support::scratch("fdc-qtest-media");
    let img = make_floppy(&dir, "fd.img");
    let sock = dir.join("qmp.sock");
    let qmp = format!("unix:{},server=on,wait=off", sock.display());
    let mut f = Fd::start(&["-device", "floppy,id=fd0", "-qmp", &qmp]);
    let mut m = support::qmp::Qmp::negotiated(&sock);
    m.ok(
        "blockdev-change-medium",
        serde_json::json!({"id": "fd0", "filename": img.display().to_string(), "format": "raw"}),
    );
    assert_eq!(f.q.inb(DIR) & 0x80, 0x80);
    f.seek(0);
    f.seek(1);
    assert_eq!(f.q.inb(DIR) & 0x80, 0);
    f.dma(0x44, 0x1_0000, 512);
    f.send(&[READ, 0x00, 1, 0, 1, 2, 18, 0x1b, 0xff]);
    assert_eq!(f.results(7)[0] & 0xc0, 0);
    let image = std::fs::read(&img).unwrap();
    assert_eq!(f.q.memread(0x1_0000, 512), sector(&image, 36));
    m.ok("eject", serde_json::json!({"id": "fd0"}));
    assert_eq!(f.q.inb(DIR) & 0x80, 0x80, "ejected");
    f.seek(2);
    assert_eq!(f.q.inb(DIR) & 0x80, 0x80, "no medium: the line stays up");
}

/// `-global isa-fdc.driveA=ID` with `fdtypeA=288` puts the drive on unit
/// 0 as a 2.88 MB drive (CMOS type 5), which reads the 1.44 MB diskette.
#[test]
fn global_isa_fdc_drive_a() {
    let dir = support::scratch("fdc-qtest-global");
    let img = make_floppy(&dir, "fd.img");
    let drive = format!("file={},format=raw,if=none,id=fd", img.display());
    let mut f = Fd::start(&[
        "-drive",
        &drive,
        "-global",
        "isa-fdc.driveA=fd",
        "-global",
        "isa-fdc.fdtypeA=288",
    ]);
    assert_eq!(f.q.cmos(0x10), 0x50);
    f.seek(0);
    f.dma(0x44, 0x1_0000, 512);
    f.send(&[READ, 0x00, 0, 0, 2, 2, 18, 0x1b, 0xff]);
    assert_eq!(f.results(7)[0] & 0xc0, 0);
    let image = std::fs::read(&img).unwrap();
    assert_eq!(f.q.memread(0x1_0000, 512), sector(&image, 1));
}

/// FORMAT TRACK by DMA: the 18 sector IDs come from memory, every sector
/// of head 1 of track 4 is filled with the filler byte, nothing else.
#[test]
fn format_track_fills_the_track() {
    let dir = support::scratch("fdc-qtest-format");
    let img = make_floppy(&dir, "fd.img");
    let before = std::fs::read(&img).unwrap();
    let drive = format!("file={},format=raw,if=floppy", img.display());
    let mut f = Fd::start(&["-drive", &drive]);
    f.seek(4);
    let ids: Vec<u8> = (1..=18u8).flat_map(|s| [4, 1, s, 2]).collect();
    f.q.memwrite(0x3_0000, &ids);
    f.dma(0x48, 0x3_0000, ids.len() as u16);
    f.send(&[0x4d, 0x04, 2, 18, 0x54, 0xe5]);
    let r = f.results(7);
    assert_eq!(r[0] & 0xc0, 0, "normal termination: {r:?}");
    let after = std::fs::read(&img).unwrap();
    let track = (4 * 2 + 1) * 18;
    for lba in 0..2880 {
        let want: &[u8] = if (track..track + 18).contains(&lba) {
            &[0xe5; 512]
        } else {
            sector(&before, lba)
        };
        assert_eq!(sector(&after, lba), want, "sector {lba}");
    }
}

/// WRITE DATA without multi-track, as Linux's floppy driver sends it (0x45,
/// one track side per command, ISA DMA mode 0x4a): a transfer that ends at
/// EOT on head 1 answers C+1, H unchanged (1), R 1, per the datasheet's
/// result table. Linux counts the sectors it moved from that address; the
/// controller once answered H=0 there, Linux counted no sectors moved and
/// sent the same write for ever (`rwloop=fd0:...` never finished). READ
/// DATA without MT answers the same way.
#[test]
fn writes_without_multitrack_end_on_the_same_head() {
    let dir = support::scratch("fdc-qtest-write-nomt");
    let img = make_floppy(&dir, "fd.img");
    let drive = format!("file={},format=raw,if=floppy", img.display());
    let mut f = Fd::start(&["-drive", &drive]);
    assert_eq!(f.seek(0), vec![0x20, 0]);
    let data: Vec<u8> = (0..18 * 512).map(|i| (i * 7 % 253) as u8).collect();
    for head in 0..2u8 {
        f.q.memwrite(0x2_0000, &data);
        f.dma(0x48, 0x2_0000, data.len() as u16);
        f.send(&[WRITE & 0x7f, head << 2, 0, head, 1, 2, 18, 0x1b, 0xff]);
        let r = f.results(7);
        assert_eq!(r[0] & 0xc0, 0, "head {head}: normal termination: {r:?}");
        assert_eq!(r[0] & 0x04, head << 2, "head {head}: ST0's head: {r:?}");
        assert_eq!(&r[3..], &[1, head, 1, 2], "head {head}: C, H, R, N: {r:?}");
        let image = std::fs::read(&img).unwrap();
        let track = head as usize * 18;
        assert_eq!(
            &image[track * 512..(track + 18) * 512],
            &data[..],
            "head {head}: the track side in the image"
        );
        // The driver seeks back to the track it wrote.
        assert_eq!(f.seek(0), vec![0x20, 0]);
    }
    f.dma(0x44, 0x1_0000, 18 * 512);
    f.send(&[READ & 0x7f, 0x04, 0, 1, 1, 2, 18, 0x1b, 0xff]);
    let r = f.results(7);
    assert_eq!(&r[3..], &[1, 1, 1, 2], "READ DATA on head 1: {r:?}");
    assert_eq!(f.q.memread(0x1_0000, 18 * 512), data);
}
