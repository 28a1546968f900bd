//! PIIX3 IDE through the qtest protocol, no KVM: the test plays the guest
//! driver (PIO, BMIDE DMA, ATAPI packets) on real image files and checks
//! bytes, status/error registers, sense data and interrupt lines.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::qtest::Qtest;

const BSY: u8 = 0x80;
const DRDY: u8 = 0x40;
const DSC: u8 = 0x10;
const DRQ: u8 = 0x08;
const ERR: u8 = 0x01;
const ABRT: u8 = 0x04;
const IDNF: u8 = 0x10;

const PRI: u16 = 0x1f0;
const SEC: u16 = 0x170;
const BM: u16 = 0xc000;

fn ctl(base: u16) -> u16 {
    if base == PRI {
        0x3f6
    } else {
        0x376
    }
}

/// The bytes of sector `lba` in the test images: its LBA, then a pattern.
fn pattern(lba: u64) -> Vec<u8> {
    let mut v: Vec<u8> = (0..512)
        .map(|i| (lba as u8).wrapping_mul(31).wrapping_add(i as u8))
        .collect();
    v[..8].copy_from_slice(&lba.to_le_bytes());
    v
}

fn make_disk(dir: &Path, name: &str, sectors: u64) -> PathBuf {
    let p = dir.join(name);
    let mut data = Vec::new();
    for s in 0..sectors {
        data.extend(pattern(s));
    }
    std::fs::write(&p, data).unwrap();
    p
}

/// An "ISO": 2048-byte blocks, each starting with its block number.
fn make_iso(dir: &Path, blocks: u64) -> PathBuf {
    let p = dir.join("cd.iso");
    let mut data = vec![0u8; blocks as usize * 2048];
    for b in 0..blocks as usize {
        data[b * 2048..b * 2048 + 8].copy_from_slice(&(b as u64).to_le_bytes());
        data[b * 2048 + 8] = 0xcd;
    }
    std::fs::write(&p, data).unwrap();
    p
}

fn file_sector(p: &Path, lba: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(p).unwrap();
    f.seek(SeekFrom::Start(lba * 512)).unwrap();
    let mut b = vec![0u8; 512];
    f.read_exact(&mut b).unwrap();
    b
}

fn wait_ready(q: &mut Qtest, base: u16) -> u8 {
    let start = Instant::now();
    loop {
        let s = q.inb(ctl(base));
        if s & BSY == 0 {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "device stayed busy"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn select(q: &mut Qtest, base: u16, dev: u8) {
    q.outb(base + 6, 0xe0 | dev << 4);
}

/// Issues an LBA28 command.
fn cmd28(q: &mut Qtest, base: u16, dev: u8, cmd: u8, lba: u32, count: u8, feature: u8) {
    q.outb(base + 6, 0xe0 | dev << 4 | ((lba >> 24) as u8 & 0xf));
    q.outb(base + 1, feature);
    q.outb(base + 2, count);
    q.outb(base + 3, lba as u8);
    q.outb(base + 4, (lba >> 8) as u8);
    q.outb(base + 5, (lba >> 16) as u8);
    q.outb(base + 7, cmd);
}

/// Issues an LBA48 command (high bytes first, as the HOB registers want).
fn cmd48(q: &mut Qtest, base: u16, dev: u8, cmd: u8, lba: u64, count: u16) {
    q.outb(base + 6, 0x40 | dev << 4);
    q.outb(base + 2, (count >> 8) as u8);
    q.outb(base + 3, (lba >> 24) as u8);
    q.outb(base + 4, (lba >> 32) as u8);
    q.outb(base + 5, (lba >> 40) as u8);
    q.outb(base + 2, count as u8);
    q.outb(base + 3, lba as u8);
    q.outb(base + 4, (lba >> 8) as u8);
    q.outb(base + 5, (lba >> 16) as u8);
    q.outb(base + 7, cmd);
}

fn pio_in(q: &mut Qtest, base: u16, bytes: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(bytes);
    for _ in 0..bytes / 4 {
        v.extend_from_slice(&q.inl(base).to_le_bytes());
    }
    v
}

fn pio_out(q: &mut Qtest, base: u16, data: &[u8]) {
    for c in data.chunks(4) {
        q.outl(base, u32::from_le_bytes(c.try_into().unwrap()));
    }
}

fn identify(q: &mut Qtest, base: u16, dev: u8) -> Vec<u16> {
    cmd28(q, base, dev, 0xec, 0, 0, 0);
    let s = wait_ready(q, base);
    assert_eq!(s, DRDY | DSC | DRQ, "IDENTIFY status");
    let b = pio_in(q, base, 512);
    assert_eq!(q.inb(base + 7), DRDY | DSC);
    b.chunks(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect()
}

fn ata_string(w: &[u16]) -> String {
    let b: Vec<u8> = w.iter().flat_map(|x| x.to_be_bytes()).collect();
    String::from_utf8(b).unwrap().trim_end().to_string()
}

/// Enables the function's I/O and bus mastering with BAR4 at `BM`.
fn enable_bm(q: &mut Qtest) {
    q.pci_write32(1, 1, 0x20, BM as u32);
    q.pci_write32(1, 1, 0x04, 0x05);
}

/// Writes a PRD table at `table`.
fn prd_table(q: &mut Qtest, table: u64, entries: &[(u32, u16, bool)]) {
    let mut t = Vec::new();
    for &(addr, len, eot) in entries {
        t.extend_from_slice(&addr.to_le_bytes());
        t.extend_from_slice(&len.to_le_bytes());
        t.extend_from_slice(&[0, if eot { 0x80 } else { 0 }]);
    }
    q.memwrite(table, &t);
}

/// Starts the primary channel's bus master and waits until it either
/// interrupts or goes inactive. Returns the bus-master status.
fn run_dma(q: &mut Qtest, bm: u16, table: u32, to_memory: bool) -> u8 {
    q.outl(bm + 4, table);
    q.outb(bm + 2, 0x06); // clear interrupt and error
    q.outb(bm, 0x01 | if to_memory { 0x08 } else { 0 });
    let start = Instant::now();
    loop {
        let s = q.inb(bm + 2);
        if s & 0x04 != 0 || s & 0x01 == 0 {
            q.outb(bm, 0); // stop, as drivers do after the interrupt
            return s;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "DMA never ended");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn start(args: &[&str]) -> Qtest {
    support::require_bios();
    Qtest::start(args)
}

fn drive(path: &Path, extra: &str) -> String {
    format!("file={},format=raw{extra}", path.display())
}

#[test]
fn function_present_without_drives() {
    let mut q = start(&[]);
    assert_eq!(q.pci_read32(1, 1, 0x00), 0x7010_8086);
    assert_eq!(q.pci_read32(1, 1, 0x08), 0x0101_8000);
    q.pci_write32(1, 1, 0x20, 0xffff_ffff);
    assert_eq!(
        q.pci_read32(1, 1, 0x20),
        0xffff_fff1,
        "BAR4: 16 bytes of I/O"
    );
    for bar in [0x10, 0x14, 0x18, 0x1c] {
        q.pci_write32(1, 1, bar, 0xffff_ffff);
        assert_eq!(q.pci_read32(1, 1, bar), 0, "only BAR4 exists");
    }
    // An empty channel reads as 0 and does not latch registers.
    q.outb(PRI + 2, 0x55);
    assert_eq!(q.inb(PRI + 2), 0);
    assert_eq!(q.inb(PRI + 7), 0);
    // No disk in CMOS.
    assert_eq!(q.cmos(0x12), 0);
}

#[test]
fn identify_device_and_cmos_geometry() {
    let dir = support::scratch("ide-identify");
    let img = make_disk(&dir, "d.img", 20480); // 10 MiB
    let mut q = start(&[
        "-drive",
        &drive(&img, ",if=none,id=d0"),
        "-device",
        "ide-hd,drive=d0,bus=ide.0,unit=1,serial=STRATA-SN-1,model=Strata Test Disk,wwn=0x5000c50012345678",
    ]);
    select(&mut q, PRI, 0);
    assert_eq!(q.inb(PRI + 7), 0, "no master: reads 0");
    let w = identify(&mut q, PRI, 1);
    assert_eq!(ata_string(&w[27..47]), "Strata Test Disk");
    assert_eq!(ata_string(&w[10..20]), "STRATA-SN-1");
    assert_eq!(ata_string(&w[23..27]), "2.5+");
    assert_eq!(w[60] as u32 | (w[61] as u32) << 16, 20480);
    assert_eq!(w[100] as u64 | (w[101] as u64) << 16, 20480);
    assert_eq!((w[1], w[3], w[6]), (20, 16, 63), "default CHS");
    assert_eq!(w[83] & (1 << 10), 1 << 10, "48-bit supported");
    assert_eq!(
        [w[108], w[109], w[110], w[111]],
        [0x5000, 0xc500, 0x1234, 0x5678]
    );
    assert_eq!(w[255] & 0xff, 0xa5);
    // CMOS: disk 1 (slave of ide0) is type 47 with its geometry.
    assert_eq!(q.cmos(0x12), 0x0f);
    assert_eq!(q.cmos(0x1a), 47);
    assert_eq!(
        (q.cmos(0x24), q.cmos(0x25), q.cmos(0x26), q.cmos(0x2c)),
        (20, 0, 16, 63)
    );
}

#[test]
fn drive_geometry_options_reach_identify_and_cmos() {
    let dir = support::scratch("ide-chs");
    let img = make_disk(&dir, "d.img", 6800);
    let mut q = start(&[
        "-drive",
        &drive(&img, ",if=ide,index=0,cyls=100,heads=4,secs=17,trans=lba"),
    ]);
    let w = identify(&mut q, PRI, 0);
    assert_eq!((w[1], w[3], w[6]), (100, 4, 17));
    assert_eq!((w[54], w[55], w[56]), (100, 4, 17), "current CHS");
    assert_eq!(q.cmos(0x12), 0xf0);
    assert_eq!(
        (q.cmos(0x1b), q.cmos(0x1c), q.cmos(0x1d), q.cmos(0x23)),
        (100, 0, 4, 17)
    );
    assert_eq!(q.cmos(0x39) & 3, 1, "LBA translation for hd0");
    // INITIALIZE DEVICE PARAMETERS changes the CHS translation used by
    // CHS commands: 2 heads x 10 sectors, C1 H0 S1 = LBA 20.
    q.outb(PRI + 6, 0xa1);
    q.outb(PRI + 2, 10);
    q.outb(PRI + 7, 0x91);
    assert_eq!(wait_ready(&mut q, PRI), DRDY | DSC);
    q.outb(PRI + 6, 0xa0);
    q.outb(PRI + 2, 1);
    q.outb(PRI + 3, 1);
    q.outb(PRI + 4, 1);
    q.outb(PRI + 5, 0);
    q.outb(PRI + 7, 0x20);
    assert_eq!(wait_ready(&mut q, PRI), DRDY | DSC | DRQ);
    assert_eq!(pio_in(&mut q, PRI, 512), pattern(20));
}

#[test]
fn pio_single_multiple_and_lba48() {
    let dir = support::scratch("ide-pio");
    let img = make_disk(&dir, "d.img", 4096);
    let big = dir.join("big.img");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(200 << 30)
        .unwrap();
    let mut q = start(&[
        "-drive",
        &drive(&img, ",if=ide,index=0"),
        "-drive",
        &drive(&big, ",if=ide,index=1"),
    ]);
    // READ SECTORS, 3 sectors from LBA 100: one DRQ block each.
    cmd28(&mut q, PRI, 0, 0x20, 100, 3, 0);
    for lba in 100..103 {
        assert_eq!(wait_ready(&mut q, PRI), DRDY | DSC | DRQ);
        assert_eq!(pio_in(&mut q, PRI, 512), pattern(lba), "sector {lba}");
    }
    assert_eq!(q.inb(PRI + 7), DRDY | DSC);
    // WRITE SECTORS, 2 sectors at LBA 7.
    cmd28(&mut q, PRI, 0, 0x30, 7, 2, 0);
    let data: Vec<u8> = (0..1024).map(|i| (i * 7 % 251) as u8).collect();
    for c in data.chunks(512) {
        assert_eq!(wait_ready(&mut q, PRI) & (DRQ | ERR), DRQ);
        pio_out(&mut q, PRI, c);
    }
    assert_eq!(wait_ready(&mut q, PRI), DRDY | DSC);
    assert_eq!(file_sector(&img, 7), data[..512]);
    assert_eq!(file_sector(&img, 8), data[512..]);
    // READ MULTIPLE before SET MULTIPLE aborts; then 4 sectors per block.
    cmd28(&mut q, PRI, 0, 0xc4, 0, 8, 0);
    assert_eq!(wait_ready(&mut q, PRI), DRDY | DSC | ERR);
    assert_eq!(q.inb(PRI + 1), ABRT);
    cmd28(&mut q, PRI, 0, 0xc6, 0, 3, 0); // not a power of two
    assert_eq!(wait_ready(&mut q, PRI) & ERR, ERR);
    cmd28(&mut q, PRI, 0, 0xc6, 0, 4, 0);
    assert_eq!(wait_ready(&mut q, PRI), DRDY | DSC);
    assert_eq!(identify(&mut q, PRI, 0)[59], 0x104);
    cmd28(&mut q, PRI, 0, 0xc4, 200, 8, 0);
    for block in 0..2u64 {
        assert_eq!(wait_ready(&mut q, PRI), DRDY | DSC | DRQ);
        let d = pio_in(&mut q, PRI, 2048);
        for i in 0..4 {
            let lba = 200 + block * 4 + i;
            assert_eq!(d[i as usize * 512..][..512], pattern(lba)[..]);
        }
    }
    assert_eq!(q.inb(PRI + 7), DRDY | DSC);
    // LBA48 on the 200 GiB disk: write then read one sector above 2^28.
    let lba = 0x1000_0005u64;
    cmd48(&mut q, PRI, 1, 0x34, lba, 1);
    assert_eq!(wait_ready(&mut q, PRI) & DRQ, DRQ);
    pio_out(&mut q, PRI, &pattern(lba));
    assert_eq!(wait_ready(&mut q, PRI), DRDY | DSC);
    assert_eq!(file_sector(&big, lba), pattern(lba));
    cmd48(&mut q, PRI, 1, 0x24, lba, 1);
    assert_eq!(wait_ready(&mut q, PRI), DRDY | DSC | DRQ);
    assert_eq!(pio_in(&mut q, PRI, 512), pattern(lba));
    let w = identify(&mut q, PRI, 1);
    assert_eq!(
        w[100] as u64 | (w[101] as u64) << 16 | (w[102] as u64) << 32,
        200 << 21
    );
    assert_eq!(w[60] as u32 | (w[61] as u32) << 16, 0x0fff_ffff);
}

#[test]
fn bad_lba_gives_idnf_and_an_interrupt() {
    let dir = support::scratch("ide-badlba");
    let img = make_disk(&dir, "d.img", 100);
    let mut q = start(&["-drive", &drive(&img, ",if=ide,index=0")]);
    q.cmd("irq_intercept_in ioapic");
    cmd28(&mut q, PRI, 0, 0x20, 99, 2, 0); // 99..101 crosses the end
    assert_eq!(wait_ready(&mut q, PRI), DRDY | DSC | ERR);
    assert_eq!(q.inb(PRI + 1), IDNF);
    assert_eq!(q.irqs.pop_front(), Some((14, true)));
    assert_eq!(q.inb(PRI + 7), DRDY | DSC | ERR);
    assert_eq!(q.irqs.pop_front(), Some((14, false)));
    cmd48(&mut q, PRI, 0, 0x25, 1 << 40, 1); // READ DMA EXT, far away
    assert_eq!(wait_ready(&mut q, PRI) & ERR, ERR);
    assert_eq!(q.inb(PRI + 1), IDNF);
    // CHS sector 0 does not exist.
    q.outb(PRI + 6, 0xa0);
    q.outb(PRI + 2, 1);
    q.outb(PRI + 3, 0);
    q.outb(PRI + 4, 0);
    q.outb(PRI + 5, 0);
    q.outb(PRI + 7, 0x20);
    assert_eq!(q.inb(PRI + 1), IDNF);
    // Unknown opcode and NOP abort.
    cmd28(&mut q, PRI, 0, 0x00, 0, 0, 0);
    assert_eq!(q.inb(PRI + 1), ABRT);
    cmd28(&mut q, PRI, 0, 0xfe, 0, 0, 0);
    assert_eq!((q.inb(PRI + 7), q.inb(PRI + 1)), (DRDY | DSC | ERR, ABRT));
    // CHS addressing of a valid sector: C0 H1 S1 = LBA 63.
    q.outb(PRI + 6, 0xa1);
    q.outb(PRI + 2, 1);
    q.outb(PRI + 3, 1);
    q.outb(PRI + 4, 0);
    q.outb(PRI + 5, 0);
    q.outb(PRI + 7, 0x20);
    assert_eq!(wait_ready(&mut q, PRI), DRDY | DSC | DRQ);
    assert_eq!(pio_in(&mut q, PRI, 512), pattern(63));
}

#[test]
fn irq_raise_and_lower_sequence() {
    let dir = support::scratch("ide-irq");
    let a = make_disk(&dir, "a.img", 64);
    let d = make_disk(&dir, "d.img", 64);
    let mut q = start(&[
        "-drive",
        &drive(&a, ",if=ide,index=0"),
        "-drive",
        &drive(&d, ",if=ide,index=3"),
    ]);
    q.cmd("irq_intercept_in ioapic");
    // Non-data command: interrupt on completion; alternate status leaves
    // it pending, status clears it.
    cmd28(&mut q, PRI, 0, 0x40, 0, 4, 0); // READ VERIFY
    assert_eq!(q.inb(0x3f6), DRDY | DSC);
    assert_eq!(q.irqs.drain(..).collect::<Vec<_>>(), vec![(14, true)]);
    assert_eq!(q.inb(PRI + 7), DRDY | DSC);
    assert_eq!(q.irqs.drain(..).collect::<Vec<_>>(), vec![(14, false)]);
    // nIEN masks INTRQ; clearing it with an interrupt pending asserts it.
    q.outb(0x3f6, 0x02);
    cmd28(&mut q, PRI, 0, 0x40, 0, 1, 0);
    assert!(q.irqs.is_empty(), "nIEN set: {:?}", q.irqs);
    q.outb(0x3f6, 0x00);
    assert_eq!(q.irqs.pop_front(), Some((14, true)));
    q.inb(PRI + 7);
    assert_eq!(q.irqs.pop_front(), Some((14, false)));
    // PIO data-in: an interrupt per DRQ block (once its data is there:
    // the device is busy meanwhile), none after the last data.
    cmd28(&mut q, PRI, 0, 0x20, 0, 2, 0);
    wait_ready(&mut q, PRI);
    assert_eq!(q.irqs.pop_front(), Some((14, true)));
    q.inb(PRI + 7);
    assert_eq!(q.irqs.pop_front(), Some((14, false)));
    pio_in(&mut q, PRI, 512);
    wait_ready(&mut q, PRI);
    assert_eq!(q.irqs.pop_front(), Some((14, true)));
    q.inb(PRI + 7);
    assert_eq!(q.irqs.pop_front(), Some((14, false)));
    pio_in(&mut q, PRI, 512);
    assert!(q.irqs.is_empty());
    // PIO data-out: no interrupt for the first block, one at the end
    // (once written).
    cmd28(&mut q, PRI, 0, 0x30, 0, 1, 0);
    assert!(q.irqs.is_empty());
    pio_out(&mut q, PRI, &pattern(0));
    wait_ready(&mut q, PRI);
    assert_eq!(q.irqs.pop_front(), Some((14, true)));
    q.inb(PRI + 7);
    q.irqs.clear();
    // The secondary channel's slave (hdd) interrupts on IRQ 15.
    cmd28(&mut q, SEC, 1, 0x40, 0, 1, 0);
    assert_eq!(q.irqs.pop_front(), Some((15, true)));
    assert_eq!(q.inb(SEC + 7), DRDY | DSC);
    assert_eq!(q.irqs.pop_front(), Some((15, false)));
}

#[test]
fn srst_shows_signatures() {
    let dir = support::scratch("ide-srst");
    let a = make_disk(&dir, "a.img", 64);
    let iso = make_iso(&dir, 16);
    let iso_s = iso.display().to_string();
    let mut q = start(&["-drive", &drive(&a, ",if=ide,index=3"), "-cdrom", &iso_s]);
    q.outb(0x376, 0x04);
    assert_eq!(q.inb(0x376) & BSY, BSY);
    q.outb(0x376, 0x00);
    // Master: ATAPI, not ready until it gets a command; slave: ATA disk.
    select(&mut q, SEC, 0);
    assert_eq!(
        (
            q.inb(SEC + 2),
            q.inb(SEC + 3),
            q.inb(SEC + 4),
            q.inb(SEC + 5)
        ),
        (1, 1, 0x14, 0xeb)
    );
    assert_eq!(q.inb(SEC + 7), 0);
    select(&mut q, SEC, 1);
    assert_eq!((q.inb(SEC + 4), q.inb(SEC + 5)), (0, 0));
    assert_eq!(q.inb(SEC + 7), DRDY | DSC);
    // IDENTIFY DEVICE to the ATAPI drive aborts and keeps the signature;
    // IDENTIFY PACKET DEVICE answers.
    cmd28(&mut q, SEC, 0, 0xec, 0, 0, 0);
    assert_eq!(
        (q.inb(SEC + 1), q.inb(SEC + 4), q.inb(SEC + 5)),
        (ABRT, 0x14, 0xeb)
    );
    cmd28(&mut q, SEC, 0, 0xa1, 0, 0, 0);
    assert_eq!(wait_ready(&mut q, SEC) & DRQ, DRQ);
    let id = pio_in(&mut q, SEC, 512);
    assert_eq!(u16::from_le_bytes([id[0], id[1]]), 0x85c0);
    assert_eq!(&id[54..66], b"EQUMD DVR-MO");
    // IDENTIFY PACKET DEVICE to the disk aborts.
    cmd28(&mut q, SEC, 1, 0xa1, 0, 0, 0);
    assert_eq!(q.inb(SEC + 1), ABRT);
}

#[test]
fn bmide_dma_read_write_and_prd_tables() {
    let dir = support::scratch("ide-dma");
    let img = make_disk(&dir, "d.img", 2048);
    let mut q = start(&["-m", "64", "-drive", &drive(&img, ",if=ide,index=0")]);
    q.cmd("irq_intercept_in ioapic");
    enable_bm(&mut q);
    // READ DMA of 4 sectors into three buffers.
    q.memwrite(0x20000, &[0xee; 4096]);
    prd_table(
        &mut q,
        0x10000,
        &[
            (0x20000, 512, false),
            (0x21000, 1024, false),
            (0x23000, 512, true),
        ],
    );
    cmd28(&mut q, PRI, 0, 0xc8, 40, 4, 0);
    assert_eq!(q.inb(0x3f6) & DRQ, DRQ, "waiting for the bus master");
    let bs = run_dma(&mut q, BM, 0x10000, true);
    assert_eq!(bs, 0x04, "interrupt, not active, no error");
    assert_eq!(q.inb(PRI + 7), DRDY | DSC);
    assert_eq!(q.memread(0x20000, 512), pattern(40));
    let mid = q.memread(0x21000, 1024);
    assert_eq!(mid[..512], pattern(41)[..]);
    assert_eq!(mid[512..], pattern(42)[..]);
    assert_eq!(q.memread(0x23000, 512), pattern(43));
    assert_eq!(q.memread(0x20200, 4), vec![0xee; 4], "nothing past the PRD");
    let irqs: Vec<_> = q.irqs.drain(..).collect();
    assert_eq!(irqs, vec![(14, true), (14, false)]);

    // WRITE DMA EXT of 3 sectors from two buffers, bus master started
    // before the command.
    let data: Vec<u8> = (0..1536u32).map(|i| (i % 253) as u8 ^ 0x5a).collect();
    q.memwrite(0x30000, &data[..1024]);
    q.memwrite(0x31000, &data[1024..]);
    prd_table(
        &mut q,
        0x10100,
        &[(0x30000, 1024, false), (0x31000, 512, true)],
    );
    q.outl(BM + 4, 0x10100);
    q.outb(BM + 2, 0x06);
    q.outb(BM, 0x01);
    cmd48(&mut q, PRI, 0, 0x35, 1000, 3);
    let start = Instant::now();
    while q.inb(BM + 2) & 0x04 == 0 {
        assert!(start.elapsed() < Duration::from_secs(10));
    }
    q.outb(BM, 0);
    assert_eq!(q.inb(PRI + 7), DRDY | DSC);
    for i in 0..3 {
        assert_eq!(file_sector(&img, 1000 + i), data[i as usize * 512..][..512]);
    }

    // A table longer than the transfer: done, interrupt, still active.
    prd_table(&mut q, 0x10200, &[(0x40000, 0, true)]); // 64 KiB
    cmd28(&mut q, PRI, 0, 0xc8, 0, 1, 0);
    assert_eq!(run_dma(&mut q, BM, 0x10200, true), 0x05);
    assert_eq!(q.inb(PRI + 7), DRDY | DSC);
    assert_eq!(q.memread(0x40000, 512), pattern(0));

    // A short table: the engine stops, no interrupt, what fits is moved.
    q.irqs.clear();
    q.memwrite(0x50000, &[0; 2048]);
    prd_table(&mut q, 0x10300, &[(0x50000, 1024, true)]);
    cmd28(&mut q, PRI, 0, 0xc8, 10, 4, 0);
    assert_eq!(run_dma(&mut q, BM, 0x10300, true), 0x00);
    assert!(q.irqs.is_empty(), "no interrupt: {:?}", q.irqs);
    assert_eq!(q.memread(0x50000, 512), pattern(10));
    assert_eq!(q.memread(0x50200, 512), pattern(11));
    assert_eq!(q.memread(0x50400, 4), vec![0; 4]);

    // A PRD pointing outside RAM: bus-master error, ABRT, interrupt.
    prd_table(&mut q, 0x10400, &[(0xf000_0000, 512, true)]);
    cmd28(&mut q, PRI, 0, 0xc8, 0, 1, 0);
    let bs = run_dma(&mut q, BM, 0x10400, true);
    assert_eq!(bs, 0x06, "error + interrupt");
    assert_eq!((q.inb(PRI + 7), q.inb(PRI + 1)), (DRDY | DSC | ERR, ABRT));
    assert_eq!(q.irqs.pop_front(), Some((14, true)));
    // The table itself outside RAM.
    cmd28(&mut q, PRI, 0, 0xca, 0, 1, 0);
    assert_eq!(run_dma(&mut q, BM, 0xfff0_0000, false), 0x06);
    // An endless table (no EOT; 9000 two-byte entries) ends in an error.
    let mut t = Vec::new();
    for _ in 0..9000 {
        t.extend_from_slice(&0x60000u32.to_le_bytes());
        t.extend_from_slice(&[2, 0, 0, 0]);
    }
    q.memwrite(0x100000, &t);
    cmd48(&mut q, PRI, 0, 0x25, 0, 100);
    assert_eq!(run_dma(&mut q, BM, 0x100000, true), 0x06);
    assert_eq!(q.inb(PRI + 7) & ERR, ERR);
    // The machine is alive and the drive still works.
    cmd28(&mut q, PRI, 0, 0x20, 5, 1, 0);
    assert_eq!(wait_ready(&mut q, PRI), DRDY | DSC | DRQ);
    assert_eq!(pio_in(&mut q, PRI, 512), pattern(5));
    // BM status: error and interrupt are write-1-to-clear, bits 5/6 stick.
    q.outb(BM + 2, 0x66);
    assert_eq!(q.inb(BM + 2) & 0x66, 0x60);
}

#[test]
fn flush_reaches_the_backend() {
    let dir = support::scratch("ide-flush");
    let img = make_disk(&dir, "d.img", 64);
    let good = format!("file={},format=raw,if=ide,index=0", img.display());
    let bad = format!(
        "if=ide,index=1,format=raw,file.driver=blkdebug,file.image.driver=file,file.image.filename={},file.inject-error.0.event=flush_to_disk,file.inject-error.0.once=on",
        make_disk(&dir, "e.img", 64).display()
    );
    let mut q = start(&["-drive", &good, "-drive", &bad]);
    for cmd in [0xe7, 0xea] {
        cmd28(&mut q, PRI, 0, cmd, 0, 0, 0);
        assert_eq!(wait_ready(&mut q, PRI), DRDY | DSC);
        assert_eq!(q.inb(PRI + 7), DRDY | DSC);
    }
    // blkdebug fails the first flush that reaches it: the drive reports it.
    cmd28(&mut q, PRI, 1, 0xe7, 0, 0, 0);
    assert_eq!(wait_ready(&mut q, PRI), DRDY | DSC | ERR);
    assert_eq!(q.inb(PRI + 1), ABRT);
    cmd28(&mut q, PRI, 1, 0xea, 0, 0, 0);
    assert_eq!(
        wait_ready(&mut q, PRI),
        DRDY | DSC,
        "once=on: second flush passes"
    );
}

/// [HMP] `qemu-io DRIVE "break flush_to_os A"` holds the next flush in
/// blkdebug: the drive shows BSY|DRDY until `resume A` (QEMU's ide-test
/// `/ide/flush` drives it this way through human-monitor-command).
#[test]
fn flush_held_by_a_qemu_io_breakpoint() {
    let dir = support::scratch("ide-flush-break");
    let img = make_disk(&dir, "d.img", 64);
    let d = format!("file=blkdebug::{},if=ide,format=raw", img.display());
    let sock = dir.join("qmp.sock");
    let qmp = format!("unix:{},server=on,wait=off", sock.display());
    let mut q = start(&["-drive", &d, "-qmp", &qmp]);
    let mut m = support::qmp::Qmp::negotiated(&sock);
    let hmp = |m: &mut support::qmp::Qmp, line: &str| {
        m.ok(
            "human-monitor-command",
            serde_json::json!({ "command-line": line }),
        )
    };
    assert_eq!(hmp(&mut m, r#"qemu-io ide0-hd0 "break flush_to_os A""#), "");
    cmd28(&mut q, PRI, 0, 0xe7, 0, 0, 0);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(q.inb(PRI + 7) & (BSY | DRDY | DRQ | ERR), BSY | DRDY);
    assert_eq!(hmp(&mut m, r#"qemu-io ide0-hd0 "resume A""#), "");
    assert_eq!(wait_ready(&mut q, PRI), DRDY | DSC);
    assert_eq!(
        hmp(&mut m, r#"qemu-io ide0-hd0 "resume A""#),
        "Could not resume request: No such file or directory\n"
    );
    assert_eq!(
        hmp(&mut m, r#"qemu-io nope "resume A""#),
        "Error: Device 'nope' not found\n"
    );
}

/// A blkdebug rule file with a `[set-state]`: the first flush fails in
/// state 1, `werror=stop` pauses the guest (STOP), and `cont` retries it
/// in state 2, where it succeeds (QEMU's ide-test `/ide/flush/retry_pci`).
#[test]
fn failed_flush_stops_and_cont_retries_it() {
    let dir = support::scratch("ide-flush-retry");
    let img = make_disk(&dir, "d.img", 64);
    let rules = dir.join("rules.conf");
    std::fs::write(
        &rules,
        "[inject-error]\nevent = \"flush_to_disk\"\nerrno = \"5\"\nstate = \"1\"\n\
         immediately = \"off\"\nonce = \"on\"\n[set-state]\nevent = \"flush_to_disk\"\n\
         new_state = \"2\"\n",
    )
    .unwrap();
    let d = format!(
        "file=blkdebug:{}:{},if=ide,format=raw,rerror=stop,werror=stop",
        rules.display(),
        img.display()
    );
    let sock = dir.join("qmp.sock");
    let qmp = format!("unix:{},server=on,wait=off", sock.display());
    let mut q = start(&["-drive", &d, "-qmp", &qmp]);
    let mut m = support::qmp::Qmp::negotiated(&sock);
    cmd28(&mut q, PRI, 0, 0xe7, 0, 0, 0);
    m.event("STOP");
    assert_eq!(q.inb(PRI + 7) & (BSY | DRDY | ERR), BSY | DRDY);
    m.ok("cont", serde_json::json!({}));
    assert_eq!(wait_ready(&mut q, PRI), DRDY | DSC, "the retry succeeds");
}

/// The same policy given on the device (`-device ide-hd,...,werror=stop`,
/// how libvirt writes it with -blockdev) overrides the drive's report:
/// the failed flush stops the guest too.
#[test]
fn device_werror_stop_overrides_the_drive() {
    let dir = support::scratch("ide-dev-werror");
    let img = make_disk(&dir, "d.img", 64);
    let rules = dir.join("rules.conf");
    std::fs::write(
        &rules,
        "[inject-error]\nevent = \"flush_to_disk\"\nerrno = \"5\"\nonce = \"on\"\n\
         immediately = \"off\"\n",
    )
    .unwrap();
    let d = format!(
        "file=blkdebug:{}:{},if=none,id=d0,format=raw",
        rules.display(),
        img.display()
    );
    let sock = dir.join("qmp.sock");
    let qmp = format!("unix:{},server=on,wait=off", sock.display());
    let mut q = start(&[
        "-drive",
        &d,
        "-device",
        "ide-hd,drive=d0,bus=ide.0,unit=0,werror=stop,rerror=stop",
        "-qmp",
        &qmp,
    ]);
    let mut m = support::qmp::Qmp::negotiated(&sock);
    cmd28(&mut q, PRI, 0, 0xe7, 0, 0, 0);
    m.event("STOP");
    m.ok("cont", serde_json::json!({}));
    assert_eq!(wait_ready(&mut q, PRI), DRDY | DSC, "the retry succeeds");
}

#[test]
fn set_features_toggles_the_write_cache() {
    let dir = support::scratch("ide-wce");
    let img = make_disk(&dir, "d.img", 64);
    let mut q = start(&["-drive", &drive(&img, ",if=ide,index=0,cache=writeback")]);
    assert_eq!(identify(&mut q, PRI, 0)[85] & 0x20, 0x20, "WCE on");
    cmd28(&mut q, PRI, 0, 0xef, 0, 0, 0x82);
    assert_eq!(wait_ready(&mut q, PRI), DRDY | DSC);
    assert_eq!(identify(&mut q, PRI, 0)[85] & 0x20, 0, "WCE off");
    // Writes still work (now FUA).
    cmd28(&mut q, PRI, 0, 0x30, 3, 1, 0);
    pio_out(&mut q, PRI, &pattern(9));
    assert_eq!(wait_ready(&mut q, PRI), DRDY | DSC);
    assert_eq!(file_sector(&img, 3), pattern(9));
    cmd28(&mut q, PRI, 0, 0xef, 0, 0, 0x02);
    assert_eq!(identify(&mut q, PRI, 0)[85] & 0x20, 0x20, "WCE on again");
    // cache=writethrough starts with WCE off.
    let img2 = make_disk(&dir, "d2.img", 64);
    let mut q2 = start(&[
        "-drive",
        &drive(&img2, ",if=ide,index=0,cache=writethrough"),
    ]);
    assert_eq!(identify(&mut q2, PRI, 0)[85] & 0x20, 0);
    // Transfer modes: UDMA2 selected shows in word 88; a bad mode aborts.
    cmd28(&mut q, PRI, 0, 0xef, 0, 0x42, 0x03);
    assert_eq!(wait_ready(&mut q, PRI), DRDY | DSC);
    assert_eq!(identify(&mut q, PRI, 0)[88], 0x3f | 0x400);
    cmd28(&mut q, PRI, 0, 0xef, 0, 0x47, 0x03);
    assert_eq!(q.inb(PRI + 1), ABRT);
    cmd28(&mut q, PRI, 0, 0xef, 0, 0, 0x77);
    assert_eq!(q.inb(PRI + 1), ABRT);
}

#[test]
fn power_smart_and_trim() {
    let dir = support::scratch("ide-misc");
    let img = make_disk(&dir, "d.img", 256);
    let mut q = start(&[
        "-m",
        "64",
        "-drive",
        &drive(&img, ",if=ide,index=0,discard=unmap"),
    ]);
    cmd28(&mut q, PRI, 0, 0xe5, 0, 0, 0);
    assert_eq!(q.inb(PRI + 2), 0xff, "active");
    cmd28(&mut q, PRI, 0, 0xe0, 0, 0, 0);
    cmd28(&mut q, PRI, 0, 0xe5, 0, 0, 0);
    assert_eq!(q.inb(PRI + 2), 0x00, "standby");
    cmd28(&mut q, PRI, 0, 0xe1, 0, 0, 0);
    cmd28(&mut q, PRI, 0, 0xe5, 0, 0, 0);
    assert_eq!(q.inb(PRI + 2), 0xff);
    // SMART needs its signature; RETURN STATUS keeps 4Fh/C2h (healthy).
    cmd28(&mut q, PRI, 0, 0xb0, 0, 0, 0xda);
    assert_eq!(q.inb(PRI + 1), ABRT);
    cmd28(&mut q, PRI, 0, 0xb0, 0x00c2_4f00, 0, 0xda);
    assert_eq!(wait_ready(&mut q, PRI), DRDY | DSC);
    assert_eq!((q.inb(PRI + 4), q.inb(PRI + 5)), (0x4f, 0xc2));
    cmd28(&mut q, PRI, 0, 0xb0, 0x00c2_4f00, 0, 0xd0);
    assert_eq!(wait_ready(&mut q, PRI), DRDY | DSC | DRQ);
    let d = pio_in(&mut q, PRI, 512);
    assert_eq!(d.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0, "checksum");
    assert_eq!(d[2], 0x01, "first attribute");
    cmd28(&mut q, PRI, 0, 0xb0, 0x00c2_4f00, 0, 0xd9);
    cmd28(&mut q, PRI, 0, 0xb0, 0x00c2_4f00, 0, 0xd0);
    assert_eq!(q.inb(PRI + 1), ABRT, "SMART disabled");
    // DATA SET MANAGEMENT / TRIM of sectors 16..48 by DMA: discarded ranges
    // of a raw file on tmpfs or ext4 read back as zeroes.
    enable_bm(&mut q);
    let mut entries = vec![0u8; 512];
    entries[..8].copy_from_slice(&(16u64 | 32u64 << 48).to_le_bytes());
    q.memwrite(0x20000, &entries);
    prd_table(&mut q, 0x10000, &[(0x20000, 512, true)]);
    q.outb(PRI + 6, 0x40);
    q.outb(PRI + 2, 0);
    q.outb(PRI + 1, 0);
    q.outb(PRI + 2, 1);
    q.outb(PRI + 1, 1); // TRIM
    q.outb(PRI + 7, 0x06);
    assert_eq!(run_dma(&mut q, BM, 0x10000, false), 0x04);
    assert_eq!(q.inb(PRI + 7), DRDY | DSC);
    assert_eq!(file_sector(&img, 15), pattern(15));
    assert_eq!(file_sector(&img, 20), vec![0; 512]);
    assert_eq!(file_sector(&img, 48), pattern(48));
    let w = identify(&mut q, PRI, 0);
    assert_eq!(w[169] & 1, 1, "TRIM supported");
}

// ---- ATAPI ------------------------------------------------------------

/// Sends a PACKET command by PIO (byte count limit `bcl`) and returns the
/// data read in DRQ chunks, or the error register on CHECK CONDITION.
fn packet(q: &mut Qtest, base: u16, dev: u8, cdb: &[u8], bcl: u16) -> Result<Vec<u8>, u8> {
    select(q, base, dev);
    q.outb(base + 1, 0);
    q.outb(base + 4, bcl as u8);
    q.outb(base + 5, (bcl >> 8) as u8);
    q.outb(base + 7, 0xa0);
    let s = wait_ready(q, base);
    assert_eq!(s & DRQ, DRQ, "ready for the packet");
    assert_eq!(q.inb(base + 2) & 3, 1, "CoD=1, IO=0");
    let mut c = [0u8; 12];
    c[..cdb.len()].copy_from_slice(cdb);
    for w in c.chunks(2) {
        q.outw(base, u16::from_le_bytes([w[0], w[1]]));
    }
    let mut data = Vec::new();
    loop {
        let s = wait_ready(q, base);
        if s & ERR != 0 {
            assert_eq!(q.inb(base + 2) & 3, 3, "CoD=1, IO=1 after the status");
            return Err(q.inb(base + 1));
        }
        if s & DRQ == 0 {
            assert_eq!(q.inb(base + 2) & 3, 3, "completion: CoD=1, IO=1");
            q.inb(base + 7);
            return Ok(data);
        }
        assert_eq!(q.inb(base + 2) & 3, 2, "data: IO=1");
        let n = q.inb(base + 4) as usize | (q.inb(base + 5) as usize) << 8;
        assert!(n <= bcl as usize && n > 0, "chunk {n} within limit {bcl}");
        for _ in 0..n / 2 {
            data.extend_from_slice(&q.inw(base).to_le_bytes());
        }
    }
}

fn sense(q: &mut Qtest, base: u16, dev: u8) -> (u8, u8, u8) {
    let s = packet(q, base, dev, &[0x03, 0, 0, 0, 18], 18).unwrap();
    (s[2] & 0xf, s[12], s[13])
}

#[test]
fn atapi_read_and_toc_on_an_iso() {
    let dir = support::scratch("ide-atapi");
    let iso = make_iso(&dir, 300);
    let iso_s = iso.display().to_string();
    let mut q = start(&["-m", "64", "-cdrom", &iso_s]);
    // INQUIRY: CD/DVD, removable, QEMU's identification strings.
    let inq = packet(&mut q, SEC, 0, &[0x12, 0, 0, 0, 36], 0xfffe).unwrap();
    assert_eq!((inq[0], inq[1]), (5, 0x80));
    assert_eq!(&inq[8..12], b"QEMU");
    assert_eq!(
        packet(&mut q, SEC, 0, &[0x00], 0),
        Ok(vec![]),
        "TEST UNIT READY"
    );
    // READ CAPACITY: last LBA 299, 2048-byte blocks.
    let cap = packet(&mut q, SEC, 0, &[0x25], 8).unwrap();
    assert_eq!(cap, [0, 0, 1, 43, 0, 0, 8, 0]);
    // READ(10) of 3 blocks from LBA 5, 2048 bytes per DRQ chunk.
    let d = packet(&mut q, SEC, 0, &[0x28, 0, 0, 0, 0, 5, 0, 0, 3], 2048).unwrap();
    assert_eq!(d.len(), 3 * 2048);
    for b in 0..3 {
        assert_eq!(
            d[b * 2048..b * 2048 + 9],
            [5 + b as u8, 0, 0, 0, 0, 0, 0, 0, 0xcd]
        );
    }
    // READ(12), odd byte count limit: chunks are cut to even sizes.
    let d = packet(&mut q, SEC, 0, &[0xa8, 0, 0, 0, 1, 0x2b, 0, 0, 0, 1], 1001).unwrap();
    assert_eq!(d.len(), 2048);
    assert_eq!(d[0], 43);
    // READ TOC format 0, LBA: track 1 at 0, lead-out at 300.
    let toc = packet(&mut q, SEC, 0, &[0x43, 0, 0, 0, 0, 0, 0, 0, 100], 100).unwrap();
    assert_eq!(&toc[..4], &[0, 18, 1, 1]);
    assert_eq!(&toc[4..12], &[0, 0x14, 1, 0, 0, 0, 0, 0]);
    assert_eq!(&toc[12..20], &[0, 0x16, 0xaa, 0, 0, 0, 1, 44]);
    // MSF: lead-out 300 + 150 = 00:06:00.
    let toc = packet(&mut q, SEC, 0, &[0x43, 2, 0, 0, 0, 0, 0, 0, 100], 100).unwrap();
    assert_eq!(&toc[16..20], &[0, 0, 6, 0]);
    // Format 1 (sessions) and 2 (raw TOC).
    let s = packet(&mut q, SEC, 0, &[0x43, 0, 1, 0, 0, 0, 0, 0, 12], 12).unwrap();
    assert_eq!(&s[..4], &[0, 10, 1, 1]);
    let raw = packet(&mut q, SEC, 0, &[0x43, 2, 2, 0, 0, 0, 0, 0, 200], 200).unwrap();
    assert_eq!(raw.len(), 48);
    assert_eq!(raw[7], 0xa0);
    // Allocation length cuts the reply.
    let toc = packet(&mut q, SEC, 0, &[0x43, 0, 0, 0, 0, 0, 0, 0, 4], 100).unwrap();
    assert_eq!(toc.len(), 4);
    // Beyond the medium: ILLEGAL REQUEST, LBA out of range.
    assert_eq!(
        packet(&mut q, SEC, 0, &[0x28, 0, 0, 0, 1, 0x2b, 0, 0, 2], 2048),
        Err(0x50)
    );
    assert_eq!(sense(&mut q, SEC, 0), (5, 0x21, 0));
    // An unknown opcode: INVALID COMMAND OPERATION CODE.
    assert_eq!(packet(&mut q, SEC, 0, &[0xff], 2048), Err(0x50));
    assert_eq!(sense(&mut q, SEC, 0), (5, 0x20, 0));
    // GET CONFIGURATION: current profile CD-ROM.
    let cfg = packet(&mut q, SEC, 0, &[0x46, 0, 0, 0, 0, 0, 0, 0, 64], 64).unwrap();
    assert_eq!(u16::from_be_bytes([cfg[6], cfg[7]]), 0x0008);
    // MODE SENSE(10) of the capabilities page.
    let ms = packet(&mut q, SEC, 0, &[0x5a, 0, 0x2a, 0, 0, 0, 0, 0, 64], 64).unwrap();
    assert_eq!(ms[8], 0x2a);

    // READ(10) by DMA.
    enable_bm(&mut q);
    prd_table(
        &mut q,
        0x10000,
        &[(0x20000, 4096, false), (0x22000, 2048, true)],
    );
    select(&mut q, SEC, 0);
    q.outb(SEC + 1, 1); // DMA
    q.outb(SEC + 7, 0xa0);
    assert_eq!(wait_ready(&mut q, SEC) & DRQ, DRQ);
    for w in [0x28u8, 0, 0, 0, 0, 7, 0, 0, 3, 0, 0, 0].chunks(2) {
        q.outw(SEC, u16::from_le_bytes([w[0], w[1]]));
    }
    let bs = run_dma(&mut q, BM + 8, 0x10000, true);
    assert_eq!(bs, 0x04);
    assert_eq!(q.inb(SEC + 7), DRDY | DSC);
    assert_eq!(q.inb(SEC + 2) & 3, 3);
    assert_eq!(q.memread(0x20000, 1)[0], 7);
    assert_eq!(q.memread(0x20800, 1)[0], 8);
    assert_eq!(q.memread(0x22000, 9), vec![9, 0, 0, 0, 0, 0, 0, 0, 0xcd]);
}

#[test]
fn eject_and_medium_change_raise_unit_attention() {
    let dir = support::scratch("ide-eject");
    let iso = make_iso(&dir, 64);
    let iso_s = iso.display().to_string();
    let mut q = start(&["-cdrom", &iso_s, "-drive", "if=ide,index=3,media=cdrom"]);
    assert_eq!(packet(&mut q, SEC, 0, &[0x00], 0), Ok(vec![]));
    // PREVENT MEDIUM REMOVAL blocks the eject.
    packet(&mut q, SEC, 0, &[0x1e, 0, 0, 0, 1], 0).unwrap();
    assert_eq!(packet(&mut q, SEC, 0, &[0x1b, 0, 0, 0, 2], 0), Err(0x50));
    assert_eq!(sense(&mut q, SEC, 0), (5, 0x53, 2));
    packet(&mut q, SEC, 0, &[0x1e, 0, 0, 0, 0], 0).unwrap();
    // Eject: tray open, NOT READY / MEDIUM NOT PRESENT - TRAY OPEN.
    assert_eq!(packet(&mut q, SEC, 0, &[0x1b, 0, 0, 0, 2], 0), Ok(vec![]));
    assert_eq!(packet(&mut q, SEC, 0, &[0x00], 0), Err(0x20));
    assert_eq!(sense(&mut q, SEC, 0), (2, 0x3a, 2));
    let ev = packet(&mut q, SEC, 0, &[0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8], 8).unwrap();
    assert_eq!((ev[4], ev[5]), (3, 1), "media removal, door open");
    let mech = packet(&mut q, SEC, 0, &[0xbd, 0, 0, 0, 0, 0, 0, 0, 0, 8], 8).unwrap();
    assert_eq!(mech[1] & 0x10, 0x10, "tray open");
    // Load by the guest itself: ready at once (it knows the medium moved;
    // QEMU's drives raise no UNIT ATTENTION here either), and GET EVENT
    // STATUS reports the new medium.
    assert_eq!(packet(&mut q, SEC, 0, &[0x1b, 0, 0, 0, 3], 0), Ok(vec![]));
    packet(&mut q, SEC, 0, &[0x12, 0, 0, 0, 36], 36).unwrap();
    let ev = packet(&mut q, SEC, 0, &[0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8], 8).unwrap();
    assert_eq!((ev[4], ev[5]), (2, 2), "new media, present");
    assert_eq!(packet(&mut q, SEC, 0, &[0x00], 0), Ok(vec![]));
    assert_eq!(sense(&mut q, SEC, 0), (0, 0, 0));
    // The failed command's sense stays for REQUEST SENSE (SPC-4 5.12).
    assert_eq!(
        packet(&mut q, SEC, 0, &[0x28, 0, 0, 0, 0, 99, 0, 0, 1], 2048),
        Err(0x50)
    );
    assert_eq!(sense(&mut q, SEC, 0), (5, 0x21, 0));
    packet(&mut q, SEC, 0, &[0x1b, 0, 0, 0, 2], 0).unwrap();
    packet(&mut q, SEC, 0, &[0x1b, 0, 0, 0, 3], 0).unwrap();
    let d = packet(&mut q, SEC, 0, &[0x28, 0, 0, 0, 0, 9, 0, 0, 1], 2048).unwrap();
    assert_eq!(d[0], 9);
    // The empty drive (hdd position): NOT READY, MEDIUM NOT PRESENT.
    assert_eq!(packet(&mut q, SEC, 1, &[0x00], 0), Err(0x20));
    assert_eq!(sense(&mut q, SEC, 1), (2, 0x3a, 1));
    let cfg = packet(&mut q, SEC, 1, &[0x46, 0, 0, 0, 0, 0, 0, 0, 8], 8).unwrap();
    assert_eq!(u16::from_be_bytes([cfg[6], cfg[7]]), 0, "no profile");
}

#[test]
fn boot_order_files_and_cmos() {
    let dir = support::scratch("ide-bootorder");
    let a = make_disk(&dir, "a.img", 64);
    let iso = make_iso(&dir, 16);
    let mut q = start(&[
        "-boot",
        "order=dc",
        "-drive",
        &drive(&a, ",if=none,id=hd"),
        "-device",
        "ide-hd,drive=hd,bus=ide.1,unit=1,bootindex=1",
        "-drive",
        &format!("file={},media=cdrom,if=none,id=cd", iso.display()),
        "-device",
        "ide-cd,drive=cd,bus=ide.0,unit=0,bootindex=2",
    ]);
    assert_eq!(q.cmos(0x3d), 0x23, "CD first, then disk");
    assert_eq!(
        q.fw_cfg_file("bios-geometry"),
        Some(Vec::new()),
        "no lchs given"
    );
    let text = q.fw_cfg_file("bootorder").expect("bootorder file");
    assert_eq!(
        String::from_utf8_lossy(&text),
        "/pci@i0cf8/ide@1,1/drive@1/disk@1\n/pci@i0cf8/ide@1,1/drive@0/disk@0\0"
    );
}

#[test]
fn lchs_reaches_the_bios_geometry_file() {
    let dir = support::scratch("ide-lchs");
    let a = make_disk(&dir, "a.img", 64);
    let mut q = start(&[
        "-drive",
        &drive(&a, ",if=none,id=hd"),
        "-device",
        "ide-hd,drive=hd,bus=ide.0,unit=1,lcyls=100,lheads=16,lsecs=63",
    ]);
    let text = q.fw_cfg_file("bios-geometry").expect("bios-geometry file");
    assert_eq!(
        String::from_utf8_lossy(&text),
        "/pci@i0cf8/ide@1,1/drive@0/disk@1 100 16 63\0"
    );
}

/// PIO transfers do not hold the vCPU: with a disk that takes 300 ms per
/// request, the command and the data-out port write return at once with
/// BSY set; DRQ (reads) or completion (writes) follows once the I/O is
/// done (DESIGN.md: the vCPU thread never waits for the disk).
#[test]
fn pio_waits_for_the_disk_with_bsy_not_the_vcpu() {
    let mut q = start(&[
        "-drive",
        "if=ide,index=0,driver=null-co,size=1M,latency-ns=300000000",
    ]);
    // Opening the drive reads sector 0 (geometry): let that pass first.
    wait_ready(&mut q, PRI);
    let t = Instant::now();
    cmd28(&mut q, PRI, 0, 0x20, 0, 1, 0); // READ SECTORS
    assert_eq!(q.inb(ctl(PRI)) & BSY, BSY, "busy while the disk reads");
    assert!(
        t.elapsed() < Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(wait_ready(&mut q, PRI) & DRQ, DRQ);
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert_eq!(pio_in(&mut q, PRI, 512), vec![0u8; 512]);
    assert_eq!(wait_ready(&mut q, PRI) & (DRQ | ERR), 0);
    // WRITE SECTORS: the last data word starts the write.
    cmd28(&mut q, PRI, 0, 0x30, 0, 1, 0);
    assert_eq!(wait_ready(&mut q, PRI) & DRQ, DRQ);
    let t = Instant::now();
    pio_out(&mut q, PRI, &pattern(0));
    assert_eq!(q.inb(ctl(PRI)) & BSY, BSY, "busy while the disk writes");
    assert!(
        t.elapsed() < Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(wait_ready(&mut q, PRI) & (DRQ | ERR | BSY), 0);
    assert!(t.elapsed() >= Duration::from_millis(300));
}

/// `-global ide-hd.serial=` is the default serial of every ide-hd: it
/// shows up in IDENTIFY, unless the device sets its own (QEMU's ide-test
/// runs with `-global ide-hd.serial=...`).
#[test]
fn global_serial_shows_in_identify() {
    let dir = support::scratch("ide-global");
    let img = make_disk(&dir, "d.img", 2048);
    let img2 = make_disk(&dir, "e.img", 2048);
    let mut q = start(&[
        "-global",
        "ide-hd.serial=GLOBAL-SN",
        "-global",
        "ide-hd.model=Global Model",
        "-drive",
        &drive(&img, ",if=none,id=d0"),
        "-device",
        "ide-hd,drive=d0,bus=ide.0,unit=0",
        "-drive",
        &drive(&img2, ",if=none,id=d1"),
        "-device",
        "ide-hd,drive=d1,bus=ide.0,unit=1,serial=OWN-SN",
    ]);
    let w = identify(&mut q, PRI, 0);
    assert_eq!(ata_string(&w[10..20]), "GLOBAL-SN");
    assert_eq!(ata_string(&w[27..47]), "Global Model");
    let w = identify(&mut q, PRI, 1);
    assert_eq!(ata_string(&w[10..20]), "OWN-SN");
}

/// `ver=` is the firmware revision: IDENTIFY words 23..26 (space-padded)
/// and, on a CD-ROM, IDENTIFY PACKET DEVICE and the INQUIRY revision;
/// `-global ide-hd.ver=` sets it for every ide-hd (QEMU's ide-test checks
/// the firmware revision it passed).
#[test]
fn ver_sets_the_firmware_revision() {
    let dir = support::scratch("ide-ver");
    let img = make_disk(&dir, "d.img", 2048);
    let img2 = make_disk(&dir, "e.img", 2048);
    let iso = make_iso(&dir, 16);
    let mut q = start(&[
        "-global",
        "ide-hd.ver=XYZ",
        "-drive",
        &drive(&img, ",if=none,id=d0"),
        "-device",
        "ide-hd,drive=d0,bus=ide.0,unit=0,ver=ABC",
        "-drive",
        &drive(&img2, ",if=none,id=d1"),
        "-device",
        "ide-hd,drive=d1,bus=ide.0,unit=1",
        "-drive",
        &drive(&iso, ",if=none,id=cd,media=cdrom"),
        "-device",
        "ide-cd,drive=cd,bus=ide.1,unit=0,ver=CD1",
    ]);
    let w = identify(&mut q, PRI, 0);
    assert_eq!(w[23..27], [0x4142, 0x4320, 0x2020, 0x2020], "ABC");
    let w = identify(&mut q, PRI, 1);
    assert_eq!(ata_string(&w[23..27]), "XYZ");
    cmd28(&mut q, SEC, 0, 0xa1, 0, 0, 0);
    assert_eq!(wait_ready(&mut q, SEC) & DRQ, DRQ);
    let id = pio_in(&mut q, SEC, 512);
    assert_eq!(&id[46..54], b"DC 1    ");
    let inq = packet(&mut q, SEC, 0, &[0x12, 0, 0, 0, 36, 0], 36).unwrap();
    assert_eq!(&inq[32..36], b"CD1 ");
}

/// EXECUTE DEVICE DIAGNOSTIC clears DEV: sent to device 1, the device
/// register reads A0h afterwards (QEMU's ide-test `diagnostic`), and
/// device 0 reports the result.
#[test]
fn diagnostic_clears_dev() {
    let dir = support::scratch("ide-diag");
    let a = make_disk(&dir, "a.img", 2048);
    let b = make_disk(&dir, "b.img", 2048);
    let mut q = start(&[
        "-drive",
        &drive(&a, ",if=none,id=hda"),
        "-drive",
        &drive(&b, ",if=none,id=hdb"),
        "-device",
        "ide-hd,drive=hda,bus=ide.0,unit=0",
        "-device",
        "ide-hd,drive=hdb,bus=ide.0,unit=1",
    ]);
    q.outb(PRI + 6, 0x10);
    assert_eq!(q.inb(PRI + 6) & 0x10, 0x10);
    q.outb(PRI + 7, 0x90);
    assert_eq!(q.inb(PRI + 6), 0xa0, "DEV cleared");
    assert_eq!(wait_ready(&mut q, PRI), DRDY | DSC);
    assert_eq!(q.inb(PRI + 1), 0x01, "device 0 passed, device 1 passed");
    // Device 0 is selected: IDENTIFY goes to it (a plain A0h select).
    q.outb(PRI + 7, 0xec);
    assert_eq!(wait_ready(&mut q, PRI) & DRQ, DRQ);
    let w = pio_in(&mut q, PRI, 512);
    assert_eq!(u16::from_le_bytes([w[186], w[187]]) & 0x1f00, 0, "device 0");
}

/// Sends a command the way QEMU's ide-test `send_dma_request` does: device
/// 0 with LBA, bus master stopped and its interrupt cleared, the PRD table,
/// then only the low bytes of the taskfile (no HOB writes) and the command.
fn ide_test_dma_cmd(q: &mut Qtest, cmd: u8, feature: u8, lba: u32, count: u8, table: u32) {
    q.outb(PRI + 6, 0x40);
    q.outb(BM, 0);
    q.outb(BM + 2, 0x04);
    q.outl(BM + 4, table);
    if feature != 0 {
        q.outb(PRI + 1, feature);
    }
    q.outb(PRI + 2, count);
    q.outb(PRI + 3, lba as u8);
    q.outb(PRI + 4, (lba >> 8) as u8);
    q.outb(PRI + 5, (lba >> 16) as u8);
    q.outb(PRI + 7, cmd);
}

/// The last level IRQ 14 was set to since the previous call (the reply
/// to a read flushes the IRQ lines sent before it).
fn irq14(q: &mut Qtest) -> Option<bool> {
    q.inb(BM + 2);
    let level = q
        .irqs
        .iter()
        .rev()
        .find(|&&(g, _)| g == 14)
        .map(|&(_, l)| l);
    q.irqs.clear();
    level
}

/// Waits as ide-test does: until the bus master is inactive or has
/// latched an interrupt. Returns its status.
fn ide_test_dma_wait(q: &mut Qtest) -> u8 {
    let start = Instant::now();
    loop {
        let s = q.inb(BM + 2);
        if s & 0x05 != 0x01 {
            return s;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "DMA never ended");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// DATA SET MANAGEMENT right after power-on with only the low byte of the
/// count written (QEMU's ide-test `bmdma/trim`): the count is 1, not 257
/// (the reset signature's 01h shifted into the HOB byte). A range past the
/// end aborts, with the bus master inactive and its interrupt latched.
#[test]
fn trim_counts_the_low_byte_as_qemu_does() {
    let dir = support::scratch("ide-trim-low");
    let img = make_disk(&dir, "d.img", 256);
    let mut q = start(&["-drive", &drive(&img, ",if=ide,index=0,discard=unmap")]);
    q.cmd("irq_intercept_in ioapic");
    enable_bm(&mut q);
    let mut entries = vec![0u8; 512];
    entries[..8].copy_from_slice(&(2u64 << 48).to_le_bytes());
    entries[8..16].copy_from_slice(&(6u64 | 8u64 << 48).to_le_bytes());
    q.memwrite(0x20000, &entries);
    prd_table(&mut q, 0x10000, &[(0x20000, 512, true)]);
    ide_test_dma_cmd(&mut q, 0x06, 0x01, 0, 1, 0x10000);
    q.outb(BM, 0x01);
    assert_eq!(ide_test_dma_wait(&mut q), 0x04, "interrupt, inactive");
    assert_eq!(irq14(&mut q), Some(true));
    let s = q.inb(PRI + 7);
    assert_eq!(s & (DRDY | BSY | DRQ | ERR), DRDY, "status {s:#x}");
    q.outb(BM, 0);
    assert_eq!(file_sector(&img, 1), vec![0; 512]);
    assert_eq!(file_sector(&img, 2), pattern(2));
    assert_eq!(file_sector(&img, 10), vec![0; 512]);
    // A range past the end of the disk: ABRT.
    entries[..8].copy_from_slice(&(10u64 | 1u64 << 48).to_le_bytes());
    entries[8..16].copy_from_slice(&(255u64 | 2u64 << 48).to_le_bytes());
    q.memwrite(0x20000, &entries);
    ide_test_dma_cmd(&mut q, 0x06, 0x01, 0, 1, 0x10000);
    q.outb(BM, 0x01);
    assert_eq!(ide_test_dma_wait(&mut q), 0x04, "interrupt, inactive");
    assert_eq!(q.inb(PRI + 7) & ERR, ERR);
    assert_eq!(q.inb(PRI + 1) & ABRT, ABRT);
}

/// Stopping the bus master while a transfer's I/O is in flight does not
/// abandon it: as QEMU (ide_cancel_dma_sync), the transfer completes as
/// if it had ended before the stop, whatever the timing. With a disk that
/// takes 300 ms per request, the stop lands while the read is in flight:
/// the engine stays active and the device busy until the data is in
/// memory, then the command completes with its interrupt and "active"
/// clears (ide-test `bmdma/various_prdts` with CMDF_ABORT: a table of the
/// request's size or larger gives "interrupt", a short one gives 0 and no
/// interrupt).
#[test]
fn bm_stop_completes_the_transfer_in_flight() {
    let mut q = start(&[
        "-drive",
        "if=ide,index=0,driver=null-co,size=1M,read-zeroes=on,latency-ns=300000000",
    ]);
    q.cmd("irq_intercept_in ioapic");
    wait_ready(&mut q, PRI); // the geometry read at open
    enable_bm(&mut q);
    // (PRD bytes, expected bus-master status, data reaches memory)
    for (prd, want, irq) in [
        (512u16, 0x04u8, true),
        (1024, 0x04, true),
        (256, 0x00, false),
    ] {
        q.memwrite(0x20000, &[0xffu8; 1024]);
        prd_table(&mut q, 0x10000, &[(0x20000, prd, true)]);
        let t = Instant::now();
        ide_test_dma_cmd(&mut q, 0xc8, 0, 0, 1, 0x10000); // READ DMA
        q.outb(BM, 0x09);
        q.outb(BM, 0x00);
        assert!(
            t.elapsed() < Duration::from_millis(250),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(q.inb(BM + 2) & 0x05, 0x01, "PRD {prd}: still active");
        assert_eq!(
            q.inb(ctl(PRI)) & BSY,
            BSY,
            "PRD {prd}: busy until the I/O ends"
        );
        let s = ide_test_dma_wait(&mut q);
        assert!(t.elapsed() >= Duration::from_millis(300));
        assert_eq!(s, want, "PRD {prd}: bus-master status");
        assert_eq!(irq14(&mut q), irq.then_some(true), "PRD {prd}: IRQ");
        let st = q.inb(PRI + 7);
        assert_eq!(
            st & (DRDY | BSY | DRQ | ERR),
            DRDY,
            "PRD {prd}: status {st:#x}"
        );
        if irq {
            assert_eq!(q.memread(0x20000, 512), vec![0u8; 512], "PRD {prd}: data");
        }
        q.outb(BM + 2, 0x04);
        irq14(&mut q);
    }
    // The bus master has nothing to do with PIO: stopping it while a PIO
    // read is in flight leaves the read alone.
    q.outb(BM, 0x01);
    cmd28(&mut q, PRI, 0, 0x20, 0, 1, 0); // READ SECTORS
    q.outb(BM, 0x00);
    assert_eq!(q.inb(ctl(PRI)) & BSY, BSY);
    assert_eq!(wait_ready(&mut q, PRI) & DRQ, DRQ, "the PIO read completes");
    assert_eq!(pio_in(&mut q, PRI, 512), vec![0u8; 512]);
}

/// Host memory per DMA request stays bounded whatever the guest asks for
/// (the transfer moves in chunks of at most 4 MiB): a 512 MiB ATAPI READ(12)
/// through a full table of 8192 x 64 KiB entries all pointing at one
/// buffer, and a 32 MiB READ DMA EXT through repeated entries, leave
/// strata's peak RSS far below the transfer size, and the last bytes
/// written land in the buffer.
#[test]
fn dma_uses_bounded_host_memory() {
    use std::io::{Seek, SeekFrom, Write};
    const LIMIT_KIB: u64 = 64 << 10;
    let dir = support::scratch("ide-dma-bound");
    // A sparse 512 MiB ISO: blocks with their number at the end only.
    let blocks: u64 = 512 << 20 >> 11;
    let iso = dir.join("big.iso");
    let mut f = std::fs::File::create(&iso).unwrap();
    f.set_len(blocks * 2048).unwrap();
    for b in blocks - 32..blocks {
        f.seek(SeekFrom::Start(b * 2048)).unwrap();
        f.write_all(&b.to_le_bytes()).unwrap();
    }
    // A sparse 64 MiB disk: sectors 65280.. carry their pattern.
    let disk = dir.join("big.img");
    let mut f = std::fs::File::create(&disk).unwrap();
    f.set_len(64 << 20).unwrap();
    f.seek(SeekFrom::Start(65280 * 512)).unwrap();
    for s in 65280..65536 {
        f.write_all(&pattern(s)).unwrap();
    }
    drop(f);
    let iso_s = iso.display().to_string();
    let mut q = start(&[
        "-m",
        "128",
        "-drive",
        &drive(&disk, ",if=ide,index=0"),
        "-cdrom",
        &iso_s,
    ]);
    enable_bm(&mut q);
    wait_ready(&mut q, PRI);
    let before = q.proc_status_kib("VmHWM");

    // ATAPI READ(12) of every block by DMA into one 64 KiB buffer.
    let table: Vec<_> = (0..8192).map(|i| (0x100000u32, 0u16, i == 8191)).collect();
    prd_table(&mut q, 0x10000, &table);
    select(&mut q, SEC, 0);
    q.outb(SEC + 1, 1); // DMA
    q.outb(SEC + 7, 0xa0);
    assert_eq!(wait_ready(&mut q, SEC) & DRQ, DRQ);
    let n = (blocks as u32).to_be_bytes();
    let cdb = [0xa8u8, 0, 0, 0, 0, 0, n[0], n[1], n[2], n[3], 0, 0];
    for w in cdb.chunks(2) {
        q.outw(SEC, u16::from_le_bytes([w[0], w[1]]));
    }
    let t = Instant::now();
    let bs = run_dma(&mut q, BM + 8, 0x10000, true);
    assert_eq!(bs, 0x04, "interrupt, table exhausted, no error");
    assert_eq!(q.inb(SEC + 7), DRDY | DSC, "{:?}", t.elapsed());
    assert_eq!(q.inb(SEC + 2) & 3, 3);
    let buf = q.memread(0x100000, 0x10000);
    for (i, b) in (blocks - 32..blocks).enumerate() {
        assert_eq!(buf[i * 2048..i * 2048 + 8], b.to_le_bytes(), "block {b}");
    }
    let hwm = q.proc_status_kib("VmHWM");
    assert!(
        hwm < LIMIT_KIB,
        "ATAPI DMA in {:?}: peak RSS {hwm} KiB (was {before} KiB)",
        t.elapsed()
    );
    assert!(
        hwm < LIMIT_KIB,
        "ATAPI DMA: peak RSS {hwm} KiB (was {before} KiB)"
    );

    // READ DMA EXT of 65535 sectors through 512 x 64 KiB entries at one
    // buffer: the transfer ends inside the last entry (active stays).
    q.memwrite(0x100000, &[0xee; 0x10000]);
    let table: Vec<_> = (0..512).map(|i| (0x100000u32, 0u16, i == 511)).collect();
    prd_table(&mut q, 0x10000, &table);
    cmd48(&mut q, PRI, 0, 0x25, 0, 65535);
    assert_eq!(q.inb(ctl(PRI)) & DRQ, DRQ, "waiting for the bus master");
    let bs = run_dma(&mut q, BM, 0x10000, true);
    assert_eq!(bs, 0x05, "interrupt, still active, no error");
    assert_eq!(q.inb(PRI + 7), DRDY | DSC);
    let buf = q.memread(0x100000, 0x10000);
    for k in 0..128u64 {
        let s = if k < 127 { 65408 + k } else { 65407 };
        let at = k as usize * 512;
        assert_eq!(buf[at..at + 512], pattern(s)[..], "sector {s}");
    }
    let hwm = q.proc_status_kib("VmHWM");
    assert!(
        hwm < LIMIT_KIB,
        "disk DMA: peak RSS {hwm} KiB (was {before} KiB)"
    );
}

/// A bus-master stop while a transfer of several chunks is in flight: the
/// remaining chunks still run (each its own request, one after the
/// other), then the command completes with its interrupt and "active"
/// clears, as for a transfer of one chunk.
#[test]
fn bm_stop_completes_every_chunk_of_a_long_transfer() {
    let mut q = start(&[
        "-m",
        "128",
        "-drive",
        "if=ide,index=0,driver=null-co,size=64M,read-zeroes=on,latency-ns=200000000",
    ]);
    q.cmd("irq_intercept_in ioapic");
    wait_ready(&mut q, PRI);
    enable_bm(&mut q);
    q.memwrite(0x100000, &[0xff; 0x10000]);
    // 10 MiB: three chunks of at most 4 MiB, 200 ms each.
    let table: Vec<_> = (0..160).map(|i| (0x100000u32, 0u16, i == 159)).collect();
    prd_table(&mut q, 0x10000, &table);
    q.outb(BM + 2, 0x06);
    q.outl(BM + 4, 0x10000);
    let t = Instant::now();
    cmd48(&mut q, PRI, 0, 0x25, 0, 20480);
    q.outb(BM, 0x09);
    q.outb(BM, 0x00);
    assert_eq!(q.inb(BM + 2) & 0x05, 0x01, "still active");
    assert_eq!(q.inb(ctl(PRI)) & BSY, BSY, "busy until the I/O ends");
    let s = ide_test_dma_wait(&mut q);
    assert!(
        t.elapsed() >= Duration::from_millis(600),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(s, 0x04, "interrupt, inactive, no error");
    assert_eq!(irq14(&mut q), Some(true));
    assert_eq!(q.inb(PRI + 7), DRDY | DSC);
    assert_eq!(q.memread(0x100000, 0x10000), vec![0u8; 0x10000]);
}

/// An ISO whose blocks start with `tag` then their block number.
fn make_tagged_iso(dir: &Path, name: &str, blocks: u64, tag: u8) -> PathBuf {
    let p = dir.join(name);
    let mut data = vec![0u8; blocks as usize * 2048];
    for b in 0..blocks as usize {
        data[b * 2048] = tag;
        data[b * 2048 + 1] = b as u8;
    }
    std::fs::write(&p, data).unwrap();
    p
}

/// [QMP] `eject`, `blockdev-change-medium` and the tray commands on an IDE
/// CD-ROM: DEVICE_TRAY_MOVED events, the guest-visible NOT READY and
/// UNIT ATTENTION, the new disc's data, a guest lock honoured unless
/// forced, and the errors.
#[test]
fn qmp_eject_and_change_medium() {
    use serde_json::json;
    let dir = support::scratch("ide-qmp-media");
    let a = make_tagged_iso(&dir, "a.iso", 32, 0xaa);
    let b = make_tagged_iso(&dir, "b.iso", 48, 0xbb);
    let sock = dir.join("qmp.sock");
    let qmp = format!("unix:{},server=on,wait=off", sock.display());
    let cd = format!("file={},if=none,id=cd0,media=cdrom", a.display());
    let mut q = start(&[
        "-drive",
        &cd,
        "-device",
        "ide-cd,drive=cd0,bus=ide.1,unit=0,id=mycd",
        "-drive",
        "if=ide,index=3,media=cdrom,id=empty",
        "-qmp",
        &qmp,
    ]);
    let mut m = support::qmp::Qmp::negotiated(&sock);
    let read0 = |q: &mut Qtest, dev: u8| {
        packet(q, SEC, dev, &[0x28, 0, 0, 0, 0, 1, 0, 0, 1], 2048).map(|d| (d[0], d[1]))
    };
    assert_eq!(read0(&mut q, 0), Ok((0xaa, 1)));
    let blocks = m.ok("query-block", json!({}));
    let cd0 = blocks
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == "cd0")
        .unwrap();
    assert_eq!(cd0["removable"], true);
    assert_eq!(cd0["tray_open"], false);

    // eject: the tray opens, the guest sees no medium.
    m.ok("eject", json!({"device": "cd0"}));
    let e = m.event("DEVICE_TRAY_MOVED");
    assert_eq!(
        e["data"],
        json!({"device": "cd0", "id": "mycd", "tray-open": true})
    );
    assert_eq!(packet(&mut q, SEC, 0, &[0x00], 0), Err(0x20));
    assert_eq!(sense(&mut q, SEC, 0), (2, 0x3a, 2), "no medium, tray open");
    let blocks = m.ok("query-block", json!({}));
    let cd0 = blocks
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == "cd0")
        .unwrap();
    assert!(cd0.get("inserted").is_none(), "{cd0}");

    // change-medium by device id: tray closes over the new disc; the guest
    // sees the drive not ready once (spinning up), then UNIT ATTENTION
    // once, then reads it (QEMU's drives do the same).
    m.ok(
        "blockdev-change-medium",
        json!({"id": "mycd", "filename": b.display().to_string(), "format": "raw"}),
    );
    let e = m.event("DEVICE_TRAY_MOVED");
    assert_eq!(e["data"]["tray-open"], false);
    assert_eq!(packet(&mut q, SEC, 0, &[0x00], 0), Err(0x20));
    assert_eq!(sense(&mut q, SEC, 0), (2, 0x3a, 0), "not ready yet");
    assert_eq!(packet(&mut q, SEC, 0, &[0x00], 0), Err(0x60));
    assert_eq!(
        sense(&mut q, SEC, 0),
        (6, 0x28, 0),
        "medium may have changed"
    );
    assert_eq!(read0(&mut q, 0), Ok((0xbb, 1)));
    let cap = packet(&mut q, SEC, 0, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8).unwrap();
    assert_eq!(u32::from_be_bytes(cap[..4].try_into().unwrap()), 47);

    // The guest locks the drive: eject is refused (the guest is asked),
    // force opens it anyway.
    packet(&mut q, SEC, 0, &[0x1e, 0, 0, 0, 1], 0).unwrap();
    let (_, desc) = m.err("eject", json!({"device": "cd0"}));
    assert_eq!(
        desc,
        "Device 'cd0' is locked and force was not specified, wait for tray to open and try again"
    );
    let ev = packet(&mut q, SEC, 0, &[0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8], 8).unwrap();
    assert_eq!(ev[4] & 0xf, 1, "eject request reported to the guest");
    m.ok("eject", json!({"device": "cd0", "force": true}));
    m.event("DEVICE_TRAY_MOVED");

    // The step-by-step commands into the empty drive: a -blockdev node.
    m.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "disc", "read-only": true,
               "file": {"driver": "file", "filename": a.display().to_string()}}),
    );
    let blocks = m.ok("query-block", json!({}));
    let empty = blocks
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == "empty")
        .unwrap();
    let dev = empty["qdev"].as_str().unwrap().to_string();
    let dev = dev.as_str();
    assert!(dev.starts_with("/machine/peripheral-anon/device["), "{dev}");
    let (_, desc) = m.err(
        "blockdev-insert-medium",
        json!({"id": dev, "node-name": "disc"}),
    );
    assert_eq!(desc, format!("Tray of device '{dev}' is not open"));
    m.ok("blockdev-open-tray", json!({"device": "empty"}));
    m.event("DEVICE_TRAY_MOVED");
    m.ok(
        "blockdev-insert-medium",
        json!({"id": dev, "node-name": "disc"}),
    );
    let (_, desc) = m.err(
        "blockdev-insert-medium",
        json!({"id": dev, "node-name": "disc"}),
    );
    assert_eq!(desc, format!("There already is a medium in device '{dev}'"));
    m.ok("blockdev-close-tray", json!({"device": "empty"}));
    assert_eq!(packet(&mut q, SEC, 1, &[0x00], 0), Err(0x20));
    assert_eq!(packet(&mut q, SEC, 1, &[0x00], 0), Err(0x60));
    assert_eq!(read0(&mut q, 1), Ok((0xaa, 1)));
    m.ok("blockdev-open-tray", json!({"id": dev}));
    m.ok("blockdev-remove-medium", json!({"id": dev}));
    m.ok("blockdev-close-tray", json!({"id": dev}));
    assert_eq!(packet(&mut q, SEC, 1, &[0x00], 0), Err(0x20));

    // Errors.
    let (class, desc) = m.err("eject", json!({"device": "nope"}));
    assert_eq!(
        (class.as_str(), desc.as_str()),
        ("DeviceNotFound", "Device 'nope' not found")
    );
    let (_, desc) = m.err(
        "blockdev-change-medium",
        json!({"device": "cd0", "filename": dir.join("missing.iso").display().to_string()}),
    );
    assert!(desc.starts_with("Could not open"), "{desc}");
    // HMP's eject and change reach the same code.
    let t = m.ok(
        "human-monitor-command",
        json!({"command-line": format!("change cd0 {}", a.display())}),
    );
    assert_eq!(t, "");
    assert_eq!(packet(&mut q, SEC, 0, &[0x00], 0), Err(0x20));
    assert_eq!(packet(&mut q, SEC, 0, &[0x00], 0), Err(0x60));
    assert_eq!(read0(&mut q, 0), Ok((0xaa, 1)));
}

/// [QMP] SIGTERM ends the run the way `quit` does: SHUTDOWN (reason
/// host-signal) on the monitor, exit status 0, and the images flushed and
/// closed. A lazy-refcounts qcow2 written by the guest is clean for
/// `qemu-img check` afterwards (with lazy refcounts only a clean close
/// writes the refcounts and clears the dirty bit).
#[test]
fn sigterm_closes_images_cleanly() {
    let dir = support::scratch("ide-sigterm");
    let img = dir.join("lazy.qcow2");
    let img_s = img.display().to_string();
    let st = std::process::Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            &img_s,
            "16M",
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let sock = dir.join("qmp.sock");
    let qmp = format!("unix:{},server=on,wait=off", sock.display());
    let drive = format!("file={img_s},if=ide,format=qcow2");
    let mut q = start(&["-drive", &drive, "-qmp", &qmp]);
    let mut m = support::qmp::Qmp::negotiated(&sock);
    // Write sectors far apart: several new clusters.
    for lba in [0u32, 300, 9000, 20000] {
        cmd28(&mut q, PRI, 0, 0x30, lba, 1, 0);
        assert_eq!(wait_ready(&mut q, PRI) & DRQ, DRQ);
        pio_out(&mut q, PRI, &pattern(lba as u64));
        assert_eq!(wait_ready(&mut q, PRI) & (ERR | DRQ), 0);
    }
    let st = std::process::Command::new("kill")
        .args(["-TERM", &q.pid().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let e = m.event("SHUTDOWN");
    assert_eq!(e["data"]["reason"], "host-signal");
    let status = q
        .wait_exit(Duration::from_secs(10))
        .expect("strata exits on SIGTERM");
    assert_eq!(status.code(), Some(0));
    let out = std::process::Command::new("qemu-img")
        .args(["check", &img_s])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("No errors were found"), "{text}");
    for lba in [0u64, 300, 9000, 20000] {
        assert_eq!(file_sector_qcow2(&img, lba), pattern(lba));
    }
}

/// Sector `lba` of a qcow2 image, read by qemu-img.
fn file_sector_qcow2(img: &Path, lba: u64) -> Vec<u8> {
    let raw = img.with_extension("converted.raw");
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(img)
        .arg(&raw)
        .status()
        .unwrap();
    assert!(st.success());
    file_sector(&raw, lba)
}

/// [QMP] A failed guest read with the default `report` policy is a
/// BLOCK_IO_ERROR event naming the drive, the operation and the action,
/// and the guest sees the error while it keeps running.
#[test]
fn io_errors_are_block_io_error_events() {
    let dir = support::scratch("ide-ioerror");
    let bad = format!(
        "if=ide,index=0,id=flaky,format=raw,file.driver=blkdebug,file.image.driver=file,file.image.filename={},file.inject-error.0.event=read_aio,file.inject-error.0.sector=5",
        make_disk(&dir, "e.img", 64).display()
    );
    let sock = dir.join("qmp.sock");
    let qmp = format!("unix:{},server=on,wait=off", sock.display());
    let mut q = start(&["-drive", &bad, "-qmp", &qmp]);
    let mut m = support::qmp::Qmp::negotiated(&sock);
    cmd28(&mut q, PRI, 0, 0x20, 5, 1, 0);
    assert_eq!(wait_ready(&mut q, PRI) & ERR, ERR, "the read fails");
    let e = m.event("BLOCK_IO_ERROR");
    assert_eq!(e["data"]["device"], "flaky");
    assert_eq!(e["data"]["operation"], "read");
    assert_eq!(e["data"]["action"], "report");
    assert_eq!(e["data"]["nospace"], false);
    assert_eq!(
        m.ok("query-status", serde_json::json!({}))["status"],
        "running"
    );
}

/// [QMP] A guest write that qcow2's overlap check catches (an L2 entry
/// points at the L1 table) marks the image corrupt: BLOCK_IMAGE_CORRUPTED
/// once, BLOCK_IO_ERROR for the write, and the guest sees the error.
#[test]
fn corruption_is_block_image_corrupted() {
    let dir = support::scratch("ide-corrupt");
    let img = dir.join("c.qcow2");
    let img_s = img.display().to_string();
    let run = |cmd: &str, args: &[&str]| {
        let st = std::process::Command::new(cmd).args(args).status().unwrap();
        assert!(st.success(), "{cmd} {args:?}");
    };
    run("qemu-img", &["create", "-q", "-f", "qcow2", &img_s, "1M"]);
    run("qemu-io", &["-f", "qcow2", "-c", "write 0 64k", &img_s]);
    // Point guest cluster 0's L2 entry at the L1 table's cluster.
    let mut f = std::fs::read(&img).unwrap();
    let be64 = |b: &[u8], o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
    let l1 = be64(&f, 40) as usize;
    let l2 = (be64(&f, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let entry = (1u64 << 63) | (l1 as u64 & !0xffff);
    f[l2..l2 + 8].copy_from_slice(&entry.to_be_bytes());
    std::fs::write(&img, f).unwrap();

    let sock = dir.join("qmp.sock");
    let qmp = format!("unix:{},server=on,wait=off", sock.display());
    let drive = format!("file={img_s},if=ide,format=qcow2,id=c0");
    let mut q = start(&["-drive", &drive, "-qmp", &qmp]);
    let mut m = support::qmp::Qmp::negotiated(&sock);
    for _ in 0..2 {
        cmd28(&mut q, PRI, 0, 0x30, 0, 1, 0);
        assert_eq!(wait_ready(&mut q, PRI) & DRQ, DRQ);
        pio_out(&mut q, PRI, &[0xee; 512]);
        assert_eq!(wait_ready(&mut q, PRI) & ERR, ERR, "the write fails");
    }
    let e = m.event("BLOCK_IMAGE_CORRUPTED");
    assert_eq!(e["data"]["device"], "c0");
    assert_eq!(e["data"]["fatal"], true);
    m.event("BLOCK_IO_ERROR");
    m.ok("query-status", serde_json::json!({}));
    assert!(
        m.events
            .iter()
            .all(|e| e["event"] != "BLOCK_IMAGE_CORRUPTED"),
        "reported once: {:?}",
        m.events
    );
}
