//! AHCI through the qtest protocol, no KVM: the test plays the guest's
//! AHCI driver (HBA reset, port start, command list, command tables with
//! PRDTs, NCQ, ATAPI packets) against q35's built-in controller and
//! `-device ahci` on `pc`, on real image files, and checks the bytes, the
//! received FISes, PxIS/PxTFD/PxCI/PxSACT, the interrupt line and MSI.
//! What QEMU's own ahci-test (the peer suite) does not cover, and the
//! guest mistakes that must end in AHCI error bits.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::qtest::Qtest;

// Host registers (AHCI 1.3.1 3.1) and port registers (3.3).
const GHC: u64 = 0x04;
const HOST_IS: u64 = 0x08;
const PI: u64 = 0x0c;
const GHC_HR: u32 = 1 << 0;
const GHC_IE: u32 = 1 << 1;
const PX_CLB: u64 = 0x00;
const PX_FB: u64 = 0x08;
const PX_IS: u64 = 0x10;
const PX_IE: u64 = 0x14;
const PX_CMD: u64 = 0x18;
const PX_TFD: u64 = 0x20;
const PX_SIG: u64 = 0x24;
const PX_SSTS: u64 = 0x28;
const PX_SERR: u64 = 0x30;
const PX_SACT: u64 = 0x34;
const PX_CI: u64 = 0x38;
const CMD_ST: u32 = 1 << 0;
const CMD_FRE: u32 = 1 << 4;
const IS_DHRS: u32 = 1 << 0;
const IS_PSS: u32 = 1 << 1;
const IS_SDBS: u32 = 1 << 3;
const IS_IFS: u32 = 1 << 27;
const IS_TFES: u32 = 1 << 30;

const IDENTIFY: u8 = 0xec;
const READ_DMA_EXT: u8 = 0x25;
const WRITE_DMA_EXT: u8 = 0x35;
const READ_FPDMA_QUEUED: u8 = 0x60;
const WRITE_FPDMA_QUEUED: u8 = 0x61;
const FLUSH_CACHE_EXT: u8 = 0xea;
const PACKET: u8 = 0xa0;

/// Where the test maps ABAR, and its guest memory layout.
const ABAR: u64 = 0xfe00_0000;
const CLB: u64 = 0x10_0000;
const FB: u64 = 0x10_8000;
const TABLES: u64 = 0x11_0000;
const DATA: u64 = 0x40_0000;

const SECTORS: u64 = 2048;

/// The bytes of sector `lba` in the test images: its LBA, then a pattern.
fn pattern(lba: u64) -> Vec<u8> {
    let mut v: Vec<u8> = (0..512)
        .map(|i| (lba as u8).wrapping_mul(37).wrapping_add(i as u8))
        .collect();
    v[..8].copy_from_slice(&lba.to_le_bytes());
    v
}

fn make_disk(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let data: Vec<u8> = (0..SECTORS).flat_map(pattern).collect();
    std::fs::write(&p, data).unwrap();
    p
}

/// One PRD: guest address and length.
type Prd = (u64, u32);

/// The guest side of one HBA.
struct Hba {
    q: Qtest,
}

impl Hba {
    /// q35 with `extra`, ABAR mapped and bus mastering on for 00:1f.2.
    fn q35(extra: &[&str]) -> Hba {
        let mut args = vec!["-m", "128"];
        args.extend_from_slice(extra);
        Self::enable(Qtest::start_machine("q35", &args, &[]), 0x1f, 2)
    }

    fn enable(mut q: Qtest, slot: u8, func: u8) -> Hba {
        assert_eq!(q.pci_read32(slot, func, 0), 0x2922_8086);
        q.pci_write32(slot, func, 0x24, ABAR as u32);
        q.pci_write32(slot, func, 0x04, 0x06); // memory space, bus master
        Hba { q }
    }

    fn rd(&mut self, off: u64) -> u32 {
        self.q.readl(ABAR + off)
    }
    fn wr(&mut self, off: u64, v: u32) {
        self.q.writel(ABAR + off, v)
    }
    fn prd(&mut self, port: u64, reg: u64) -> u32 {
        self.rd(0x100 + port * 0x80 + reg)
    }
    fn pwr(&mut self, port: u64, reg: u64, v: u32) {
        self.wr(0x100 + port * 0x80 + reg, v)
    }

    /// Command list and FIS area for `port`, FIS receive and the engine
    /// on, errors and interrupts cleared.
    fn start_port(&mut self, port: u64) {
        self.pwr(port, PX_CLB, (CLB + port * 0x400) as u32);
        self.pwr(port, PX_FB, (FB + port * 0x100) as u32);
        self.pwr(port, PX_CMD, CMD_FRE);
        self.pwr(port, PX_CMD, CMD_FRE | CMD_ST);
        self.pwr(port, PX_SERR, u32::MAX);
        self.pwr(port, PX_IS, u32::MAX);
    }

    fn table(port: u64, slot: u64) -> u64 {
        TABLES + (port * 32 + slot) * 0x400
    }

    /// Writes slot `slot` of `port`: header, Register H2D FIS, ATAPI
    /// packet and PRDT.
    #[allow(clippy::too_many_arguments)]
    fn build(
        &mut self,
        port: u64,
        slot: u64,
        fis: [u8; 20],
        packet: Option<[u8; 12]>,
        write: bool,
        prdt: &[Prd],
    ) {
        let ct = Self::table(port, slot);
        let dw0 =
            5u32 | (packet.is_some() as u32) << 5 | (write as u32) << 6 | (prdt.len() as u32) << 16;
        let mut h = [0u8; 32];
        h[0..4].copy_from_slice(&dw0.to_le_bytes());
        h[8..16].copy_from_slice(&ct.to_le_bytes());
        self.q.memwrite(CLB + port * 0x400 + slot * 32, &h);
        let mut t = vec![0u8; 0x80 + 16 * prdt.len()];
        t[..20].copy_from_slice(&fis);
        if let Some(p) = packet {
            t[0x40..0x4c].copy_from_slice(&p);
        }
        for (i, &(addr, len)) in prdt.iter().enumerate() {
            let e = &mut t[0x80 + 16 * i..0x90 + 16 * i];
            e[0..8].copy_from_slice(&addr.to_le_bytes());
            e[12..16].copy_from_slice(&(len - 1).to_le_bytes());
        }
        self.q.memwrite(ct, &t);
    }

    /// Waits until `mask` of PxCI and PxSACT is clear, or PxIS.TFES/IFS.
    fn wait(&mut self, port: u64, mask: u32) -> u32 {
        let start = Instant::now();
        loop {
            let busy = (self.prd(port, PX_CI) | self.prd(port, PX_SACT)) & mask;
            let is = self.prd(port, PX_IS);
            if busy == 0 || is & (IS_TFES | IS_IFS) != 0 {
                return is;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "slots {busy:#x} still busy"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Issues slot `slot` and waits for it; PxIS after it.
    fn run(&mut self, port: u64, slot: u64) -> u32 {
        self.pwr(port, PX_CI, 1 << slot);
        self.wait(port, 1 << slot)
    }

    /// PRDBC of a slot (its header's DW1).
    fn prdbc(&mut self, port: u64, slot: u64) -> u32 {
        self.q.readl(CLB + port * 0x400 + slot * 32 + 4)
    }
}

/// A Register H2D FIS (command bit set) for `cmd` at `lba`, `count`.
fn h2d(cmd: u8, lba: u64, count: u16) -> [u8; 20] {
    let mut f = [0u8; 20];
    f[0] = 0x27;
    f[1] = 0x80;
    f[2] = cmd;
    let l = lba.to_le_bytes();
    f[4..7].copy_from_slice(&l[..3]);
    f[7] = 0x40;
    f[8..11].copy_from_slice(&l[3..6]);
    f[12..14].copy_from_slice(&count.to_le_bytes());
    f
}

/// READ/WRITE FPDMA QUEUED: count in FEATURES, the tag in COUNT 7:3.
fn fpdma(write: bool, tag: u8, lba: u64, count: u16) -> [u8; 20] {
    let cmd = if write {
        WRITE_FPDMA_QUEUED
    } else {
        READ_FPDMA_QUEUED
    };
    let mut f = h2d(cmd, lba, 0);
    f[3] = count as u8;
    f[11] = (count >> 8) as u8;
    f[12] = tag << 3;
    f
}

fn disk_q35(name: &str) -> (Hba, PathBuf) {
    let dir = support::scratch(name);
    let disk = make_disk(&dir, "disk.img");
    let drive = format!("file={},format=raw,if=none,id=d0", disk.display());
    let h = Hba::q35(&["-drive", &drive, "-device", "ide-hd,drive=d0,bus=ide.0"]);
    (h, disk)
}

/// GHC.HR resets the HBA; once FIS receive runs, the device's signature
/// FIS lands in the receive area and sets PxSIG, PxTFD and PxIS.DHRS.
#[test]
fn hba_reset_and_port_start() {
    let (mut h, _) = disk_q35("ahci-qtest-reset");
    assert_eq!(h.rd(PI), 0x3f);
    h.wr(GHC, GHC_HR);
    assert_eq!(h.rd(GHC) & GHC_HR, 0, "HR reads back 0 once done");
    assert_eq!(h.prd(0, PX_SSTS), 0x113, "device present, link up");
    assert_eq!(h.prd(1, PX_SSTS), 0, "port 1 is empty");
    assert_eq!(h.prd(0, PX_TFD), 0x7f, "no FIS received yet");
    assert_eq!(h.prd(0, PX_SIG), u32::MAX);
    h.pwr(0, PX_CLB, CLB as u32);
    h.pwr(0, PX_FB, FB as u32);
    h.pwr(0, PX_CMD, CMD_FRE);
    assert_eq!(h.prd(0, PX_SIG), 0x101, "ATA signature");
    assert_eq!(h.prd(0, PX_TFD) & 0xff, 0x50);
    assert_ne!(h.prd(0, PX_IS) & IS_DHRS, 0);
    let d2h = h.q.memread(FB + 0x40, 20);
    assert_eq!((d2h[0], d2h[2], d2h[12]), (0x34, 0x50, 1));
    h.pwr(0, PX_CMD, CMD_FRE | CMD_ST);
    assert_eq!(
        h.prd(0, PX_CMD) & (1 << 15 | 1 << 14),
        1 << 15 | 1 << 14,
        "CR and FR"
    );
}

/// IDENTIFY DEVICE by PIO through a command slot: the data in the PRDT,
/// a PIO Setup FIS, PRDBC, and NCQ advertised (words 75-76).
#[test]
fn identify_through_a_command_slot() {
    let (mut h, _) = disk_q35("ahci-qtest-identify");
    h.start_port(0);
    h.build(0, 3, h2d(IDENTIFY, 0, 0), None, false, &[(DATA, 512)]);
    let is = h.run(0, 3);
    assert_eq!(is & (IS_DHRS | IS_PSS), IS_DHRS | IS_PSS);
    assert_eq!(h.prdbc(0, 3), 512);
    let id = h.q.memread(DATA, 512);
    let w = |i: usize| u16::from_le_bytes([id[2 * i], id[2 * i + 1]]);
    assert_eq!(w(60) as u64 | (w(61) as u64) << 16, SECTORS);
    assert_eq!(w(75), 31, "queue depth 32");
    assert_ne!(w(76) & 1 << 8, 0, "NCQ");
    let ps = h.q.memread(FB + 0x20, 20);
    assert_eq!((ps[0], u16::from_le_bytes([ps[16], ps[17]])), (0x5f, 512));
}

/// READ and WRITE DMA EXT with PRDTs of many scattered entries of odd
/// sizes: the bytes land where the entries say, and in the image.
#[test]
fn dma_read_and_write_with_multi_entry_prdts() {
    let (mut h, disk) = disk_q35("ahci-qtest-dma");
    h.start_port(0);
    // 16 sectors at LBA 100 through 7 entries, each in its own page.
    let sizes = [512u32, 1024, 2048, 512, 1536, 1024, 1536];
    let prdt: Vec<Prd> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| (DATA + i as u64 * 0x10000 + 0x40, n))
        .collect();
    h.build(0, 0, h2d(READ_DMA_EXT, 100, 16), None, false, &prdt);
    assert_eq!(h.run(0, 0) & (IS_DHRS | IS_TFES), IS_DHRS);
    assert_eq!(h.prdbc(0, 0), 16 * 512);
    let want: Vec<u8> = (100..116).flat_map(pattern).collect();
    let mut got = Vec::new();
    for &(addr, n) in &prdt {
        got.extend(h.q.memread(addr, n as usize));
    }
    assert_eq!(got, want);
    // Write them back at LBA 500 through the same entries.
    h.build(0, 1, h2d(WRITE_DMA_EXT, 500, 16), None, true, &prdt);
    assert_eq!(h.run(0, 1) & (IS_DHRS | IS_TFES), IS_DHRS);
    let img = std::fs::read(&disk).unwrap();
    assert_eq!(&img[500 * 512..516 * 512], &want[..]);
}

/// Eight queued commands at once: all are accepted together (PxCI clears,
/// PxSACT holds them), each completes by a Set Device Bits FIS, in
/// whatever order the block layer finishes them, with SDBS and no DHRS.
#[test]
fn ncq_commands_queue_together_and_complete() {
    let (mut h, disk) = disk_q35("ahci-qtest-ncq");
    h.start_port(0);
    // Even tags read 8 sectors, odd tags write the next 8 from a buffer.
    let mut want_img = std::fs::read(&disk).unwrap();
    for tag in 0..8u64 {
        let buf = DATA + tag * 0x10000;
        let lba = 64 * tag;
        if tag % 2 == 1 {
            let data: Vec<u8> = (0..8 * 512).map(|i| (i as u8) ^ (tag as u8 * 17)).collect();
            h.q.memwrite(buf, &data);
            want_img[lba as usize * 512..(lba as usize + 8) * 512].copy_from_slice(&data);
        }
        h.build(
            0,
            tag,
            fpdma(tag % 2 == 1, tag as u8, lba, 8),
            None,
            tag % 2 == 1,
            &[(buf, 4096)],
        );
    }
    h.pwr(0, PX_SACT, 0xff);
    h.pwr(0, PX_CI, 0xff);
    assert_eq!(h.prd(0, PX_CI), 0, "every queued command accepted at once");
    let is = h.wait(0, 0xff);
    assert_eq!(is & (IS_SDBS | IS_DHRS | IS_TFES), IS_SDBS);
    assert_eq!(h.prd(0, PX_TFD) & 0xff, 0x50);
    let sdb = h.q.memread(FB + 0x58, 8);
    assert_eq!(sdb[0], 0xa1);
    assert_ne!(u32::from_le_bytes(sdb[4..8].try_into().unwrap()), 0);
    for tag in (0..8u64).step_by(2) {
        let want: Vec<u8> = (64 * tag..64 * tag + 8).flat_map(pattern).collect();
        assert_eq!(h.q.memread(DATA + tag * 0x10000, 4096), want, "tag {tag}");
    }
    assert_eq!(std::fs::read(&disk).unwrap(), want_img);
}

/// FLUSH CACHE EXT completes with a D2H FIS.
#[test]
fn flush_completes() {
    let (mut h, _) = disk_q35("ahci-qtest-flush");
    h.start_port(0);
    h.build(0, 5, h2d(FLUSH_CACHE_EXT, 0, 0), None, false, &[]);
    assert_eq!(h.run(0, 5) & (IS_DHRS | IS_TFES), IS_DHRS);
    assert_eq!(h.prd(0, PX_TFD) & 0xff, 0x50);
}

/// ATAPI READ(10) of a CD on port 2 (`-cdrom`), by DMA and by PIO.
#[test]
fn atapi_read10_by_dma_and_pio() {
    let dir = support::scratch("ahci-qtest-atapi");
    let iso = dir.join("cd.iso");
    let cd: Vec<u8> = (0..64u32 * 2048).map(|i| (i / 7) as u8).collect();
    std::fs::write(&iso, &cd).unwrap();
    let mut h = Hba::q35(&["-cdrom", &iso.display().to_string()]);
    h.start_port(2);
    assert_eq!(h.prd(2, PX_SIG), 0xeb14_0101, "ATAPI signature");
    let read10 = |lba: u32, n: u16| {
        let mut p = [0u8; 12];
        p[0] = 0x28;
        p[2..6].copy_from_slice(&lba.to_be_bytes());
        p[7..9].copy_from_slice(&n.to_be_bytes());
        p
    };
    // The first command after power-on reports the UNIT ATTENTION; run a
    // TEST UNIT READY to consume it.
    h.build(2, 0, h2d(PACKET, 0, 0), Some([0; 12]), false, &[]);
    h.run(2, 0);
    h.pwr(2, PX_CMD, CMD_FRE);
    h.pwr(2, PX_IS, u32::MAX);
    h.pwr(2, PX_CMD, CMD_FRE | CMD_ST);
    // DMA: FEATURES bit 0.
    let mut fis = h2d(PACKET, 0, 0);
    fis[3] = 1;
    h.build(2, 1, fis, Some(read10(3, 2)), false, &[(DATA, 4096)]);
    assert_eq!(h.run(2, 1) & (IS_DHRS | IS_TFES), IS_DHRS);
    assert_eq!(h.prdbc(2, 1), 4096);
    assert_eq!(h.q.memread(DATA, 4096), &cd[3 * 2048..5 * 2048]);
    // PIO with a byte count limit of 2048 (cylinder registers).
    let mut fis = h2d(PACKET, 0, 0);
    fis[5] = 0x00;
    fis[6] = 0x08;
    h.build(
        2,
        2,
        fis,
        Some(read10(10, 3)),
        false,
        &[(DATA + 0x10000, 6144)],
    );
    assert_eq!(h.run(2, 2) & (IS_DHRS | IS_PSS | IS_TFES), IS_DHRS | IS_PSS);
    assert_eq!(h.q.memread(DATA + 0x10000, 6144), &cd[10 * 2048..13 * 2048]);
    // An LBA past the end: CHECK CONDITION, ILLEGAL REQUEST in PxTFD.ERR.
    h.build(2, 3, fis, Some(read10(64, 1)), false, &[(DATA, 2048)]);
    assert_ne!(h.run(2, 3) & IS_TFES, 0);
    assert_eq!(h.prd(2, PX_TFD) >> 12 & 0xf, 5);
}

/// Guest mistakes end in AHCI error bits: a bad LBA (TFES, ERR with
/// IDNF), a PRDT entry past RAM (TFES, ABRT), a command table outside RAM
/// (IFS), a command to a port with no drive (TFES); slots issued while the
/// port is stopped are ignored. The list stops at the failed slot.
#[test]
fn error_cases() {
    let (mut h, disk) = disk_q35("ahci-qtest-errors");
    let before = std::fs::read(&disk).unwrap();
    h.start_port(0);
    h.build(
        0,
        0,
        h2d(READ_DMA_EXT, SECTORS - 4, 8),
        None,
        false,
        &[(DATA, 4096)],
    );
    let is = h.run(0, 0);
    assert_ne!(is & IS_TFES, 0);
    assert_eq!(h.prd(0, PX_TFD), 0x10 << 8 | 0x41, "IDNF, DRDY|ERR");
    assert_eq!(h.prd(0, PX_CI), 1, "the failed slot stays issued");
    // Recovery: stop, clear, restart.
    h.pwr(0, PX_CMD, CMD_FRE);
    h.start_port(0);
    // A PRD pointing past the end of RAM (128 MiB).
    h.build(
        0,
        1,
        h2d(WRITE_DMA_EXT, 0, 8),
        None,
        true,
        &[(1 << 40, 4096)],
    );
    assert_ne!(h.run(0, 1) & IS_TFES, 0);
    assert_eq!(h.prd(0, PX_TFD) >> 8 & 0xff, 0x04, "ABRT");
    h.pwr(0, PX_CMD, CMD_FRE);
    h.start_port(0);
    // A command table outside RAM.
    let mut hdr = [0u8; 32];
    hdr[0..4].copy_from_slice(&(5u32 | 1 << 16).to_le_bytes());
    hdr[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    h.q.memwrite(CLB + 2 * 32, &hdr);
    assert_ne!(h.run(0, 2) & IS_IFS, 0);
    h.pwr(0, PX_CMD, CMD_FRE);
    h.start_port(0);
    // Slots issued to a stopped port: nothing happens.
    h.build(0, 4, h2d(WRITE_DMA_EXT, 0, 8), None, true, &[(DATA, 4096)]);
    h.pwr(0, PX_CMD, CMD_FRE);
    h.pwr(0, PX_CI, 1 << 4);
    assert_eq!(h.prd(0, PX_CI), 0);
    assert_eq!(h.prd(0, PX_IS) & (IS_DHRS | IS_TFES), 0);
    // Port 1 has no drive.
    h.start_port(1);
    h.build(1, 0, h2d(IDENTIFY, 0, 0), None, false, &[(DATA, 512)]);
    assert_ne!(h.run(1, 0) & IS_TFES, 0);
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        before,
        "no write reached the image"
    );
}

/// PxIS bits feed host IS and INTx (q35: PIRQA on GSI 16) while GHC.IE
/// is set; with MSI enabled the message goes out instead and INTx stays
/// low. (The qtest machine delivers an MSI as the memory write it is.)
#[test]
fn interrupt_status_bits_intx_and_msi() {
    let (mut h, _) = disk_q35("ahci-qtest-irq");
    h.q.cmd("irq_intercept_in ioapic");
    h.start_port(0);
    h.pwr(0, PX_IE, IS_DHRS);
    h.wr(GHC, GHC_IE);
    h.build(0, 0, h2d(FLUSH_CACHE_EXT, 0, 0), None, false, &[]);
    h.run(0, 0);
    assert_eq!(h.rd(HOST_IS), 1);
    h.q.cmd("clock_step 0");
    assert_eq!(h.q.irqs.pop_front(), Some((16, true)));
    // Host IS alone cannot clear it while the port still asks.
    h.wr(HOST_IS, 1);
    assert_eq!(h.rd(HOST_IS), 1);
    h.pwr(0, PX_IS, IS_DHRS);
    h.wr(HOST_IS, 1);
    assert_eq!(h.rd(HOST_IS), 0);
    h.q.cmd("clock_step 0");
    assert_eq!(h.q.irqs.pop_front(), Some((16, false)));
    // MSI: the capability at 0x80, message to RAM.
    assert_eq!(h.q.pci_read8(0x1f, 2, 0x34), 0x80);
    assert_eq!(h.q.pci_read8(0x1f, 2, 0x80), 0x05);
    let mailbox = 0x20_0000u64;
    h.q.pci_write32(0x1f, 2, 0x84, mailbox as u32);
    h.q.pci_write32(0x1f, 2, 0x88, 0);
    h.q.pci_write32(0x1f, 2, 0x8c, 0x4321);
    let ctrl = h.q.pci_read32(0x1f, 2, 0x80);
    h.q.pci_write32(0x1f, 2, 0x80, ctrl | 1 << 16);
    h.build(0, 1, h2d(FLUSH_CACHE_EXT, 0, 0), None, false, &[]);
    h.run(0, 1);
    assert_eq!(h.q.readl(mailbox), 0x4321);
    h.q.cmd("clock_step 0");
    assert!(
        h.q.irqs.is_empty(),
        "INTx stays low under MSI: {:?}",
        h.q.irqs
    );
}

/// `-device ahci` on `pc`: the port given by `bus=ID.N` holds the drive.
#[test]
fn device_ahci_on_pc_puts_the_drive_on_its_port() {
    let dir = support::scratch("ahci-qtest-pc");
    let disk = make_disk(&dir, "disk.img");
    let drive = format!("file={},format=raw,if=none,id=d0", disk.display());
    let q = Qtest::start(&[
        "-device",
        "ahci,id=sata,addr=05.0",
        "-drive",
        &drive,
        "-device",
        "ide-hd,drive=d0,bus=sata.3",
    ]);
    let mut h = Hba::enable(q, 5, 0);
    for port in 0..6 {
        let ssts = h.prd(port, PX_SSTS);
        assert_eq!(ssts, if port == 3 { 0x113 } else { 0 }, "port {port}");
    }
    h.start_port(3);
    h.build(3, 0, h2d(READ_DMA_EXT, 7, 1), None, false, &[(DATA, 512)]);
    assert_eq!(h.run(3, 0) & (IS_DHRS | IS_TFES), IS_DHRS);
    assert_eq!(h.q.memread(DATA, 512), pattern(7));
}
