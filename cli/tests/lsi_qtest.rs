//! The LSI 53C895A through the qtest protocol: the test programs the PCI
//! function, loads SCRIPTS programs into guest RAM (or the chip's SCRIPTS
//! RAM) as SeaBIOS's and Linux's drivers do, starts them by writing DSP
//! and polls ISTAT0/DSTAT/SIST0/SIST1 through the I/O BAR, with a
//! `scsi-hd` at SCSI id 0 behind the chip.
//!
//! The SeaBIOS program is the one of coreboot/seabios src/hw/lsi-scsi.c
//! (`lsi_scsi_cmd`), as devices/src/lsi/tests.rs encodes it: select,
//! IDENTIFY, the CDB, the disconnect path, data, status, message in, INT.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::qtest::Qtest;

/// Where the test puts the function and its BARs.
const SLOT: u8 = 5;
const IO: u16 = 0xc100;
const MMIO: u64 = 0xfe10_0000;
const RAM: u64 = 0xfe10_2000;

/// Registers (the manual's chapter 4, "SCSI Registers").
const SBCL: u16 = 0x0b;
const DSTAT: u16 = 0x0c;
const SSTAT1: u16 = 0x0e;
const ISTAT0: u16 = 0x14;
const ISTAT1: u16 = 0x15;
const DSP: u16 = 0x2c;
const DSPS: u16 = 0x30;
const SCRATCHA: u16 = 0x34;
const DIEN: u16 = 0x39;
const SIEN1: u16 = 0x41;
const SIST0: u16 = 0x42;
const SIST1: u16 = 0x43;
const SCID: u16 = 0x04;

const DSTAT_DFE: u8 = 0x80;
const DSTAT_SIR: u8 = 0x04;
const ISTAT0_DIP: u8 = 0x01;
const ISTAT0_SIP: u8 = 0x02;
const ISTAT0_CON: u8 = 0x08;
const ISTAT0_SRST: u8 = 0x40;
const ISTAT1_SRUN: u8 = 0x02;
const SIST1_STO: u8 = 0x04;
const SIST0_MA: u8 = 0x80;

/// Guest RAM used by the programs.
const SCRIPT: u32 = 0x1000;
const MSGOUT: u32 = 0x2000;
const CDB: u32 = 0x2100;
const STATUS: u32 = 0x2200;
const MSGIN_TMP: u32 = 0x2210;
const MSGIN: u32 = 0x2220;
const DATA: u32 = 0x10000;

/// The PIIX3 IRQ the test routes the function's INTA# to.
const IRQ: u32 = 11;

const BLOCKS: u64 = 8192;

fn pattern(sector: u64) -> u8 {
    (sector % 251) as u8 ^ 0xa5
}

fn file_blocks(path: &Path, lba: u64, n: u64) -> Vec<u8> {
    std::fs::read(path).unwrap()[(lba * 512) as usize..((lba + n) * 512) as usize].to_vec()
}

fn cdb10(op: u8, lba: u32, n: u16) -> Vec<u8> {
    let mut c = vec![op, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.push(0);
    c.extend_from_slice(&n.to_be_bytes());
    c.push(0);
    c
}

const INQUIRY: [u8; 6] = [0x12, 0, 0, 0, 36, 0];
const TEST_UNIT_READY: [u8; 6] = [0; 6];
const READ_10: u8 = 0x28;
const WRITE_10: u8 = 0x2a;

struct Lsi {
    qt: Qtest,
    disk: PathBuf,
}

/// (DSTAT, SIST0, SIST1) when the program stopped.
type Stop = (u8, u8, u8);

impl Lsi {
    /// The machine with the HBA at `addr=5` and its BARs mapped, I/O,
    /// memory and bus mastering enabled.
    fn start(name: &str) -> Lsi {
        let dir = support::scratch(name);
        let disk = dir.join("disk.raw");
        let mut v = Vec::with_capacity((BLOCKS * 512) as usize);
        for n in 0..BLOCKS {
            v.extend(std::iter::repeat_n(pattern(n), 512));
        }
        std::fs::write(&disk, v).unwrap();
        let drive = format!("file={},if=none,id=d0,format=raw", disk.display());
        let mut qt = Qtest::start(&[
            "-drive",
            &drive,
            "-device",
            "lsi53c895a,id=s,addr=5",
            "-device",
            "scsi-hd,drive=d0,bus=s.0,scsi-id=0",
        ]);
        qt.pci_write32(SLOT, 0, 0x10, IO as u32);
        qt.pci_write32(SLOT, 0, 0x14, MMIO as u32);
        qt.pci_write32(SLOT, 0, 0x18, RAM as u32);
        qt.pci_write32(SLOT, 0, 0x04, 0x7);
        Lsi { qt, disk }
    }

    fn rd(&mut self, reg: u16) -> u8 {
        self.qt.inb(IO + reg)
    }
    fn wr(&mut self, reg: u16, v: u8) {
        self.qt.outb(IO + reg, v)
    }
    fn put_words(&mut self, addr: u64, words: &[u32]) {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        self.qt.memwrite(addr, &bytes);
    }
    fn get(&mut self, addr: u32, len: usize) -> Vec<u8> {
        self.qt.memread(addr as u64, len)
    }

    /// Starts the SCRIPTS at `dsp` as SeaBIOS does: DSP byte by byte, the
    /// last byte starting the processor.
    fn go(&mut self, dsp: u32) {
        for (i, b) in dsp.to_le_bytes().into_iter().enumerate() {
            self.wr(DSP + i as u16, b);
        }
    }

    /// Polls ISTAT0 until a DMA or SCSI interrupt is pending, then reads
    /// (and so clears) DSTAT, SIST0 and SIST1.
    fn wait(&mut self) -> Stop {
        let t = Instant::now();
        loop {
            if self.rd(ISTAT0) & (ISTAT0_DIP | ISTAT0_SIP) != 0 {
                return (self.rd(DSTAT), self.rd(SIST0), self.rd(SIST1));
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the SCRIPTS never stopped"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// SeaBIOS's `lsi_scsi_cmd` program for `cdb` to `target`/`lun`, with
    /// a data move of `len` bytes at `buf` (in or out). Returns where it
    /// stopped, the status byte and the message byte.
    fn seabios(
        &mut self,
        target: u8,
        lun: u8,
        cdb: &[u8],
        read: bool,
        len: u32,
        buf: u32,
    ) -> (Stop, u8, u8) {
        let mut c = [0u8; 16];
        c[..cdb.len()].copy_from_slice(cdb);
        self.qt.memwrite(CDB as u64, &c);
        self.qt.memwrite(MSGOUT as u64, &[0x80 | lun, 0x08]);
        self.qt.memwrite(STATUS as u64, &[0xff]);
        self.qt.memwrite(MSGIN as u64, &[0xff]);
        let dma = if read { 0x0100_0000 } else { 0 } | len;
        self.put_words(
            SCRIPT as u64,
            &[
                // select target, send scsi command
                0x4000_0000 | (target as u32) << 16,
                0,
                0x0600_0001, // msgout
                MSGOUT,
                0x0200_0010, // scsi command
                CDB,
                // handle disconnect
                0x8782_0000, // phase == msgin ?
                0x18,
                0x0700_0002, // msgin
                MSGIN_TMP,
                0x5000_0000, // re-select
                0,
                0x0700_0002, // msgin
                MSGIN_TMP,
                // dma data, get status, raise irq
                dma,
                buf,
                0x0300_0001, // status
                STATUS,
                0x0700_0001, // msgin
                MSGIN,
                0x9808_0000, // dma irq
                0,
            ],
        );
        self.go(SCRIPT);
        let stop = self.wait();
        (stop, self.get(STATUS, 1)[0], self.get(MSGIN, 1)[0])
    }

    /// A driver-style program that follows the target's phases, loaded
    /// into the chip's SCRIPTS RAM (as Linux's sym53c8xx does): SELECT
    /// with ATN, IDENTIFY, the CDB, DATA IN or DATA OUT of `len` bytes at
    /// `buf` if the target goes there, STATUS, MESSAGE IN, CLEAR ACK,
    /// WAIT DISCONNECT, INT 0x600d. Returns where it stopped and the status.
    fn command(&mut self, target: u8, cdb: &[u8], len: u32, buf: u32) -> (Stop, u8) {
        self.command_with(&[0xc0], target, cdb, len, buf)
    }

    /// [`Lsi::command`] with `msgout` as the MESSAGE OUT bytes.
    fn command_with(
        &mut self,
        msgout: &[u8],
        target: u8,
        cdb: &[u8],
        len: u32,
        buf: u32,
    ) -> (Stop, u8) {
        self.qt.memwrite(CDB as u64, cdb);
        self.qt.memwrite(MSGOUT as u64, msgout);
        self.qt.memwrite(STATUS as u64, &[0xff]);
        self.qt.memwrite(MSGIN as u64, &[0xff]);
        let s = RAM as u32;
        self.put_words(
            RAM,
            &[
                /* 0x00 */ 0x4100_0000 | (target as u32) << 16,
                0,
                /* 0x08 */ 0x0e00_0000 | msgout.len() as u32,
                MSGOUT,
                /* 0x10 */ 0x0a00_0000 | cdb.len() as u32,
                CDB,
                // JUMP REL(data_in) IF DATA_IN; JUMP REL(data_out) IF DATA_OUT
                /* 0x18 */
                0x818a_0000,
                0x30,
                /* 0x20 */ 0x808a_0000,
                0x38,
                /* 0x28 */ 0x0b00_0001,
                STATUS,
                /* 0x30 */ 0x0f00_0001,
                MSGIN,
                /* 0x38 */ 0x6000_0040, // CLEAR ACK
                0,
                /* 0x40 */ 0x4800_0000, // WAIT DISCONNECT
                0,
                /* 0x48 */ 0x9808_0000,
                0x600d,
                /* 0x50 data_in */ 0x0900_0000 | len,
                buf,
                /* 0x58 */ 0x8008_0000,
                s + 0x28,
                /* 0x60 data_out */ 0x0800_0000 | len,
                buf,
                /* 0x68 */ 0x8008_0000,
                s + 0x28,
            ],
        );
        self.go(s);
        let stop = self.wait();
        (stop, self.get(STATUS, 1)[0])
    }

    /// REQUEST SENSE through the phase-following program: (key, ASC, ASCQ).
    fn sense(&mut self) -> (u8, u8, u8) {
        let (stop, st) = self.command(0, &[0x03, 0, 0, 0, 18, 0], 18, DATA);
        assert_eq!(
            (stop.0 & !DSTAT_DFE, stop.1, stop.2, st),
            (DSTAT_SIR, 0, 0, 0)
        );
        let s = self.get(DATA, 18);
        assert_eq!(s[0], 0x70, "fixed format");
        (s[2] & 0xf, s[12], s[13])
    }

    /// Bus free: not connected, no signal on the bus.
    #[track_caller]
    fn assert_bus_free(&mut self) {
        assert_eq!(self.rd(ISTAT0) & ISTAT0_CON, 0, "disconnected");
        assert_eq!(self.rd(SBCL), 0, "no bus signals");
    }
}

#[test]
fn pci_function_bars_and_registers() {
    let mut l = Lsi::start("lsi-pci");
    let qt = &mut l.qt;
    assert_eq!(qt.pci_read32(SLOT, 0, 0), 0x0012_1000);
    assert_eq!(qt.pci_read32(SLOT, 0, 8) >> 8, 0x01_0000, "SCSI controller");
    assert_eq!(
        qt.pci_read32(SLOT, 0, 0x2c),
        0x1000_1af4,
        "QEMU's subsystem"
    );
    assert_eq!(qt.pci_read8(SLOT, 0, 0x3d), 1, "INTA#");
    // BAR sizes: 256 bytes of I/O, 1 KiB of registers, 8 KiB of SCRIPTS
    // RAM.
    for (bar, mask) in [
        (0x10, 0xffff_ff01u32),
        (0x14, 0xffff_fc00),
        (0x18, 0xffff_e000),
    ] {
        let old = qt.pci_read32(SLOT, 0, bar);
        qt.pci_write32(SLOT, 0, bar, 0xffff_ffff);
        assert_eq!(qt.pci_read32(SLOT, 0, bar), mask, "BAR at {bar:#x}");
        qt.pci_write32(SLOT, 0, bar, old);
    }
    // Reset values; the same registers through the memory BAR.
    assert_eq!(l.rd(SCID) & 0xf, 7, "the chip's own id");
    assert_eq!(l.rd(ISTAT0), 0);
    l.qt.writel(MMIO + SCRATCHA as u64, 0x1234_5678);
    assert_eq!(l.qt.inl(IO + SCRATCHA), 0x1234_5678);
    // SCRIPTS RAM keeps what is written; a soft reset (ISTAT0 SRST)
    // restores the registers and keeps it.
    l.qt.writel(RAM + 0x1ffc, 0xdead_beef);
    l.wr(ISTAT0, ISTAT0_SRST);
    l.wr(ISTAT0, 0);
    assert_eq!(l.qt.inl(IO + SCRATCHA), 0);
    assert_eq!(l.qt.readl(RAM + 0x1ffc), 0xdead_beef);
}

#[test]
fn seabios_program_inquiry_read_write_and_check_condition() {
    let mut l = Lsi::start("lsi-seabios");
    // SeaBIOS resets the chip first.
    l.wr(ISTAT0, ISTAT0_SRST);
    l.wr(ISTAT0, 0);
    // INQUIRY: select, IDENTIFY, CDB, DATA IN, GOOD, COMMAND COMPLETE.
    let (stop, st, msg) = l.seabios(0, 0, &INQUIRY, true, 36, DATA);
    assert_eq!((stop.0 & !DSTAT_DFE, stop.1, stop.2), (DSTAT_SIR, 0, 0));
    assert_eq!((st, msg), (0, 0), "GOOD, COMMAND COMPLETE");
    let inq = l.get(DATA, 36);
    assert_eq!(inq[0], 0, "direct access");
    assert_eq!(&inq[8..32], b"QEMU    QEMU HARDDISK   ");
    assert_eq!(l.qt.inl(IO + DSPS), 0, "the INT's vector");
    assert_eq!(l.rd(ISTAT1) & ISTAT1_SRUN, 0, "halted");
    l.assert_bus_free();

    // TEST UNIT READY (no data: the zero dword is skipped): the power-on
    // UNIT ATTENTION as CHECK CONDITION, then GOOD.
    let (stop, st, msg) = l.seabios(0, 0, &TEST_UNIT_READY, false, 0, 0);
    assert_eq!((stop.0 & !DSTAT_DFE, st, msg), (DSTAT_SIR, 2, 0));
    assert_eq!(l.sense(), (6, 0x29, 0));
    let (_, st, _) = l.seabios(0, 0, &TEST_UNIT_READY, false, 0, 0);
    assert_eq!(st, 0);

    // READ(10) of 8 blocks at LBA 5: the image's bytes.
    let (stop, st, msg) = l.seabios(0, 0, &cdb10(READ_10, 5, 8), true, 4096, DATA);
    assert_eq!((stop.0 & !DSTAT_DFE, st, msg), (DSTAT_SIR, 0, 0));
    assert!(l.get(DATA, 4096) == file_blocks(&l.disk, 5, 8));
    // WRITE(10) of 3 blocks at LBA 100: into the file.
    let data: Vec<u8> = (0..1536u32).map(|i| (i * 7 + i / 512) as u8).collect();
    l.qt.memwrite(DATA as u64, &data);
    let (stop, st, msg) = l.seabios(0, 0, &cdb10(WRITE_10, 100, 3), false, 1536, DATA);
    assert_eq!((stop.0 & !DSTAT_DFE, st, msg), (DSTAT_SIR, 0, 0));
    assert!(file_blocks(&l.disk, 100, 3) == data);
    assert_eq!(file_blocks(&l.disk, 103, 1)[0], pattern(103));
    l.assert_bus_free();

    // A READ past the end: the target skips the data phase and goes to
    // STATUS, so SeaBIOS's DATA IN move is a phase mismatch (SIST0 MA;
    // SeaBIOS gives up there). A driver resumes at the status move and
    // gets CHECK CONDITION, then the sense through REQUEST SENSE.
    let (stop, st, _) = l.seabios(0, 0, &cdb10(READ_10, BLOCKS as u32, 1), true, 512, DATA);
    assert_eq!((stop.0 & !DSTAT_DFE, stop.1, stop.2), (0, SIST0_MA, 0));
    assert_eq!(st, 0xff, "no status yet");
    assert_eq!(l.rd(SSTAT1) & 7, 3, "the target is in STATUS");
    assert_eq!(l.rd(ISTAT0) & ISTAT0_CON, ISTAT0_CON, "still connected");
    l.go(SCRIPT + 0x40);
    let stop = l.wait();
    assert_eq!(stop.0 & !DSTAT_DFE, DSTAT_SIR);
    assert_eq!(l.get(STATUS, 1)[0], 2, "CHECK CONDITION");
    assert_eq!(l.get(MSGIN, 1)[0], 0, "COMMAND COMPLETE");
    l.assert_bus_free();
    assert_eq!(l.sense(), (5, 0x21, 0), "LBA out of range");
    // An opcode nobody knows.
    let (_, st, _) = l.seabios(0, 0, &[0xff; 10], false, 0, 0);
    assert_eq!(st, 2);
    assert_eq!(l.sense(), (5, 0x20, 0));
}

#[test]
fn phase_following_program_in_scripts_ram() {
    let mut l = Lsi::start("lsi-phases");
    let (_, st) = l.command(0, &TEST_UNIT_READY, 0, 0);
    assert_eq!(st, 2, "power-on UNIT ATTENTION");
    assert_eq!(l.sense(), (6, 0x29, 0));
    // WRITE(10): the target goes to DATA OUT; the data reaches the file.
    let data: Vec<u8> = (0..2048u32).map(|i| (i * 3 + 1) as u8).collect();
    l.qt.memwrite(DATA as u64, &data);
    let (stop, st) = l.command(0, &cdb10(WRITE_10, 4000, 4), 2048, DATA);
    assert_eq!(
        (stop.0 & !DSTAT_DFE, stop.1, stop.2, st),
        (DSTAT_SIR, 0, 0, 0)
    );
    assert_eq!(l.qt.inl(IO + DSPS), 0x600d, "the INT's vector");
    assert!(file_blocks(&l.disk, 4000, 4) == data);
    // WAIT DISCONNECT came after COMMAND COMPLETE: the bus is free.
    l.assert_bus_free();
    assert_eq!(l.rd(SSTAT1) & 7, 0);
    // READ(10) goes to DATA IN; it reads back what was written.
    l.qt.memwrite(DATA as u64, &[0; 2048]);
    let (stop, st) = l.command(0, &cdb10(READ_10, 4000, 4), 2048, DATA);
    assert_eq!((stop.0 & !DSTAT_DFE, st), (DSTAT_SIR, 0));
    assert!(l.get(DATA, 2048) == data);
    // A CDB that fails goes straight to STATUS.
    let (stop, st) = l.command(0, &cdb10(WRITE_10, BLOCKS as u32 - 1, 2), 1024, DATA);
    assert_eq!((stop.0 & !DSTAT_DFE, st), (DSTAT_SIR, 2));
    assert_eq!(l.sense(), (5, 0x21, 0));
    l.assert_bus_free();
}

/// SELECT of an id with no target: SIST1 STO, the program halts, and
/// with STO enabled in SIEN1 the interrupt line is raised until SIST1 is
/// read.
#[test]
fn selection_timeout_on_an_absent_id() {
    let mut l = Lsi::start("lsi-sto");
    // Slot 5 INTA# drives PIRQA ((5 - 1) + (1 - 1) = 0 mod 4); route it.
    l.qt.pci_write8(1, 0, 0x60, IRQ as u8);
    assert_eq!(l.qt.cmd("irq_intercept_in ioapic"), "OK");
    l.wr(SIEN1, SIST1_STO);
    l.qt.irqs.clear();
    let t = Instant::now();
    let (stop, _, _) = l.seabios(4, 0, &INQUIRY, true, 36, DATA);
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!((stop.0 & !DSTAT_DFE, stop.1, stop.2), (0, 0, SIST1_STO));
    assert_eq!(l.rd(ISTAT1) & ISTAT1_SRUN, 0, "halted");
    assert_eq!(
        l.qt.inl(IO + DSP),
        SCRIPT + 16,
        "at the block move after SELECT"
    );
    assert!(l.qt.irqs.contains(&(IRQ, true)), "raised: {:?}", l.qt.irqs);
    assert_eq!(l.qt.irqs.back(), Some(&(IRQ, false)), "lowered by the read");
    assert_eq!(l.rd(ISTAT0) & (ISTAT0_SIP | ISTAT0_CON), 0);
    l.assert_bus_free();
    // The target that is there still answers.
    let (_, st, _) = l.seabios(0, 0, &INQUIRY, true, 36, DATA);
    assert_eq!(st, 0);
}

/// The SCRIPTS INT instruction raises INTA# through the PIIX3 PIRQ router
/// when DIEN enables SIR, and reading DSTAT lowers it; without SIR in
/// DIEN the line stays low (SeaBIOS polls).
#[test]
fn int_instruction_raises_intx_through_pirq() {
    let mut l = Lsi::start("lsi-intx");
    l.qt.pci_write8(1, 0, 0x60, IRQ as u8);
    assert_eq!(l.qt.cmd("irq_intercept_in ioapic"), "OK");
    // Polled: no line.
    l.qt.irqs.clear();
    let (stop, st, _) = l.seabios(0, 0, &INQUIRY, true, 36, DATA);
    assert_eq!((stop.0 & !DSTAT_DFE, st), (DSTAT_SIR, 0));
    assert!(!l.qt.irqs.contains(&(IRQ, true)), "{:?}", l.qt.irqs);
    // Interrupt-driven: the line rises with DSTAT SIR and stays up until
    // DSTAT is read.
    l.wr(DIEN, DSTAT_SIR);
    l.qt.irqs.clear();
    l.put_words(SCRIPT as u64, &[0x9808_0000, 0x1234]);
    l.go(SCRIPT);
    let t = Instant::now();
    while !l.qt.irqs.contains(&(IRQ, true)) && t.elapsed() < Duration::from_secs(5) {
        let _ = l.rd(ISTAT1);
    }
    assert!(
        l.qt.irqs.contains(&(IRQ, true)),
        "INTx on IRQ {IRQ}: {:?}",
        l.qt.irqs
    );
    assert_eq!(l.rd(ISTAT0) & ISTAT0_DIP, ISTAT0_DIP);
    assert_eq!(l.qt.irqs.back(), Some(&(IRQ, true)), "still up");
    assert_eq!(l.qt.inl(IO + DSPS), 0x1234);
    assert_eq!(l.rd(DSTAT) & !DSTAT_DFE, DSTAT_SIR);
    assert_eq!(
        l.qt.irqs.back(),
        Some(&(IRQ, false)),
        "lowered by reading DSTAT"
    );
    assert_eq!(l.rd(ISTAT0) & ISTAT0_DIP, 0);
    // Whole commands, interrupt-driven: TEST UNIT READY reports the
    // power-on UNIT ATTENTION, then a READ(10) moves the image's data.
    l.qt.irqs.clear();
    let (stop, st, msg) = l.seabios(0, 0, &TEST_UNIT_READY, false, 0, 0);
    assert_eq!((stop.0 & !DSTAT_DFE, st, msg), (DSTAT_SIR, 2, 0));
    assert!(l.qt.irqs.contains(&(IRQ, true)));
    assert_eq!(l.qt.irqs.back(), Some(&(IRQ, false)));
    l.qt.irqs.clear();
    let (stop, st, _) = l.seabios(0, 0, &cdb10(READ_10, 77, 1), true, 512, DATA);
    assert_eq!((stop.0 & !DSTAT_DFE, st), (DSTAT_SIR, 0));
    assert!(l.qt.irqs.contains(&(IRQ, true)));
    assert!(l.get(DATA, 512) == file_blocks(&l.disk, 77, 1));
}

/// MESSAGE OUT as Linux's driver sends it: IDENTIFY with a LUN, a SIMPLE
/// QUEUE TAG and an extended SDTR message in one move; the target goes on
/// to COMMAND (the negotiation is ignored: the bus stays asynchronous).
/// IDENTIFY naming an absent LUN reaches the target's absent-LUN answers;
/// BUS DEVICE RESET frees the bus and resets the target's units.
#[test]
fn identify_tags_extended_messages_and_bus_device_reset() {
    let mut l = Lsi::start("lsi-messages");
    let sdtr = [0xc0, 0x20, 5, 0x01, 0x03, 0x01, 0x0c, 0x08];
    let (stop, st) = l.command_with(&sdtr, 0, &INQUIRY, 36, DATA);
    assert_eq!(
        (stop.0 & !DSTAT_DFE, stop.1, stop.2, st),
        (DSTAT_SIR, 0, 0, 0)
    );
    assert_eq!(l.get(DATA, 36)[0], 0, "LUN 0: the disk");
    // IDENTIFY for LUN 3: nobody there (qualifier 011b).
    let (stop, st) = l.command_with(&[0xc3], 0, &INQUIRY, 36, DATA);
    assert_eq!((stop.0 & !DSTAT_DFE, st), (DSTAT_SIR, 0));
    assert_eq!(l.get(DATA, 1)[0], 0x7f);
    let (_, st) = l.command_with(&[0xc3], 0, &TEST_UNIT_READY, 0, 0);
    assert_eq!(st, 2);
    // Clear the disk's power-on UNIT ATTENTION.
    let (_, st) = l.command(0, &TEST_UNIT_READY, 0, 0);
    assert_eq!(st, 2);
    let (_, st) = l.command(0, &TEST_UNIT_READY, 0, 0);
    assert_eq!(st, 0);
    // BUS DEVICE RESET: SELECT, the message, WAIT DISCONNECT, INT.
    l.qt.memwrite(MSGOUT as u64, &[0x0c]);
    l.put_words(
        SCRIPT as u64,
        &[
            0x4100_0000,
            0,
            0x0e00_0001,
            MSGOUT,
            0x4800_0000,
            0,
            0x9808_0000,
            0xbd,
        ],
    );
    l.go(SCRIPT);
    let stop = l.wait();
    assert_eq!((stop.0 & !DSTAT_DFE, stop.1, stop.2), (DSTAT_SIR, 0, 0));
    assert_eq!(l.qt.inl(IO + DSPS), 0xbd);
    l.assert_bus_free();
    let (_, st) = l.command(0, &TEST_UNIT_READY, 0, 0);
    assert_eq!(st, 2, "the reset is a UNIT ATTENTION");
    assert_eq!(l.sense(), (6, 0x29, 0));
}
