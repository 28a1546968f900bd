//! The chip driven as SeaBIOS and Linux drive it: SCRIPTS programs in
//! guest memory (or the on-chip RAM), started through DSP, with a disk on
//! a temporary raw image behind target 0.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block::backend::{BackendConfig, BlockBackend};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::regs::{dstat, istat0, off, sist0, sist1};
use super::*;
use crate::pci::PciFunction;
use crate::scsi::cdb::op;
use crate::scsi::testutil::{cdb10, TempImage};
use crate::scsi::{Disk, DiskOptions};

const MIB: u64 = 1 << 20;
const SCRIPT: u32 = 0x1000;
const MSGOUT: u32 = 0x2000;
const CDB: u32 = 0x2100;
const STATUS: u32 = 0x2200;
const MSGIN_TMP: u32 = 0x2210;
const MSGIN: u32 = 0x2220;
const TABLE: u32 = 0x3000;
const DATA: u32 = 0x10000;
const MMIO: u32 = 0xfe00_0000;
const RAM: u32 = 0xfe00_2000;

#[derive(Default)]
struct Line(AtomicBool);
impl IrqLine for Line {
    fn set_level(&self, level: bool) {
        self.0.store(level, Ordering::SeqCst);
    }
}

struct Rig {
    mem: Arc<GuestMem>,
    lsi: Lsi53c895a,
    line: Arc<Line>,
    backend: Arc<BlockBackend>,
    /// Where [`Rig::command`]'s script stores the status byte.
    status_at: u32,
    _img: TempImage,
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u8)
                .wrapping_mul(7)
                .wrapping_add(seed ^ (i >> 9) as u8)
        })
        .collect()
}

fn rig() -> Rig {
    let mem =
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 * MIB as usize)]).unwrap());
    let img = TempImage::new(4 * MIB);
    let backend = img.backend(BackendConfig::default());
    backend.write_at(0, &pattern(4 * MIB as usize, 3)).unwrap();
    let line = Arc::new(Line::default());
    let mut lsi = Lsi53c895a::new(mem.clone(), line.clone());
    let disk: Arc<dyn Lun> = Arc::new(Disk::new(backend.clone(), DiskOptions::default()).unwrap());
    lsi.attach(0, 0, disk).unwrap();
    lsi.config_write(0x10, &0xc000u32.to_le_bytes());
    lsi.config_write(0x14, &MMIO.to_le_bytes());
    lsi.config_write(0x18, &RAM.to_le_bytes());
    lsi.config_write(0x04, &7u16.to_le_bytes());
    Rig {
        mem,
        lsi,
        line,
        backend,
        status_at: STATUS,
        _img: img,
    }
}

impl Rig {
    fn rd(&mut self, o: u8) -> u8 {
        let mut b = [0u8];
        self.lsi.region_read(BAR_IO, o as u64, &mut b);
        b[0]
    }
    fn wr(&mut self, o: u8, v: u8) {
        self.lsi.region_write(BAR_IO, o as u64, &[v]);
    }
    fn rd32(&mut self, o: u8) -> u32 {
        let mut b = [0u8; 4];
        self.lsi.region_read(BAR_MMIO, o as u64, &mut b);
        u32::from_le_bytes(b)
    }
    fn put(&self, addr: u32, data: &[u8]) {
        self.mem
            .write_slice(data, GuestAddress(addr as u64))
            .unwrap();
    }
    fn get(&self, addr: u32, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem
            .read_slice(&mut v, GuestAddress(addr as u64))
            .unwrap();
        v
    }
    fn put_words(&self, addr: u32, words: &[u32]) {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        self.put(addr, &bytes);
    }
    /// Starts the SCRIPTS at `dsp` as SeaBIOS does: DSP byte by byte.
    fn start(&mut self, dsp: u32) {
        for (i, b) in dsp.to_le_bytes().into_iter().enumerate() {
            self.wr(off::DSP + i as u8, b);
        }
    }
    /// Polls like SeaBIOS: until DSTAT SIR or a SCSI interrupt; returns
    /// (DSTAT, SIST0, SIST1).
    fn wait(&mut self) -> (u8, u8, u8) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let istat = self.rd(off::ISTAT0);
            if istat & (istat0::DIP | istat0::SIP) != 0 {
                let d = self.rd(off::DSTAT);
                let s0 = self.rd(off::SIST0);
                let s1 = self.rd(off::SIST1);
                return (d, s0, s1);
            }
            assert!(Instant::now() < deadline, "the SCRIPTS never stopped");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// SeaBIOS's lsi_scsi_cmd script (src/hw/lsi-scsi.c): select, IDENTIFY,
    /// a 16-byte command, the disconnect path, the data, status, message
    /// in and INT. Returns (DSTAT, SIST0, SIST1, status, message).
    fn seabios(
        &mut self,
        target: u8,
        lun: u8,
        cdb: &[u8],
        read: bool,
        len: u32,
        buf: u32,
    ) -> (u8, u8, u8, u8, u8) {
        let mut c = [0u8; 16];
        c[..cdb.len()].copy_from_slice(cdb);
        self.put(CDB, &c);
        self.put(MSGOUT, &[0x80 | lun, 0x08]);
        self.put(STATUS, &[0xff]);
        self.put(MSGIN, &[0xff]);
        let dma = if read { 0x0100_0000 } else { 0 } | len;
        self.put_words(
            SCRIPT,
            &[
                0x4000_0000 | (target as u32) << 16,
                0,
                0x0600_0001,
                MSGOUT,
                0x0200_0010,
                CDB,
                0x8782_0000,
                0x18,
                0x0700_0002,
                MSGIN_TMP,
                0x5000_0000,
                0,
                0x0700_0002,
                MSGIN_TMP,
                dma,
                buf,
                0x0300_0001,
                STATUS,
                0x0700_0001,
                MSGIN,
                0x9808_0000,
                0,
            ],
        );
        self.start(SCRIPT);
        let (d, s0, s1) = self.wait();
        (d, s0, s1, self.get(STATUS, 1)[0], self.get(MSGIN, 1)[0])
    }

    /// A driver-style script that follows the target's phases: IDENTIFY
    /// with ATN, the command, then DATA IN or DATA OUT of `len` bytes at
    /// `buf` if the target goes there, status, message in, INT 0x600d.
    /// Returns (DSTAT, SIST0, SIST1, status).
    fn command(&mut self, target: u8, cdb: &[u8], len: u32, buf: u32) -> (u8, u8, u8, u8) {
        self.put(CDB, cdb);
        self.put(MSGOUT, &[0xc0]);
        self.put(STATUS, &[0xff]);
        let s = SCRIPT;
        self.put_words(
            s,
            &[
                /* 0x00 */ 0x4100_0000 | (target as u32) << 16,
                0,
                /* 0x08 */ 0x0e00_0001,
                MSGOUT,
                /* 0x10 */ 0x0a00_0000 | cdb.len() as u32,
                CDB,
                // JUMP data_in IF DATA_IN; JUMP data_out IF DATA_OUT
                /* 0x18 */
                0x818a_0000,
                0x20,
                /* 0x20 */ 0x808a_0000,
                0x28,
                /* 0x28 */ 0x0b00_0001,
                self.status_at,
                /* 0x30 */ 0x0f00_0001,
                MSGIN,
                /* 0x38 */ 0x9808_0000,
                0x600d,
                /* 0x40 data_in */ 0x0900_0000 | len,
                buf,
                /* 0x48 */ 0x8008_0000,
                s + 0x28,
                /* 0x50 data_out */ 0x0800_0000 | len,
                buf,
                /* 0x58 */ 0x8008_0000,
                s + 0x28,
            ],
        );
        self.start(s);
        let (d, s0, s1) = self.wait();
        (d, s0, s1, self.get(STATUS, 1)[0])
    }

    /// REQUEST SENSE through the chip: (key, asc, ascq).
    fn sense(&mut self) -> (u8, u8, u8) {
        let (d, s0, s1, st) = self.command(0, &[op::REQUEST_SENSE, 0, 0, 0, 18, 0], 18, DATA);
        assert_eq!((d & !dstat::DFE, s0, s1, st), (dstat::SIR, 0, 0, 0));
        let s = self.get(DATA, 18);
        (s[2] & 0xf, s[12], s[13])
    }
}

#[test]
fn pci_identity_and_reset_values() {
    let mut r = rig();
    assert_eq!(r.lsi.config().u16(0), 0x1000);
    assert_eq!(r.lsi.config().u16(2), 0x0012);
    assert_eq!(r.lsi.config().u32(8) >> 8, 0x01_00_00);
    assert_eq!(r.lsi.config().u8(0x3d), 1);
    assert_eq!(r.rd(off::SCID), 7);
    assert_eq!(r.rd(off::DCMD), 0x40);
    assert_eq!(r.rd(off::ISTAT0), 0);
    // A dword register through the memory BAR, byte by byte underneath.
    r.lsi.region_write(
        BAR_MMIO,
        off::SCRATCHA as u64,
        &0x1234_5678u32.to_le_bytes(),
    );
    assert_eq!(r.rd32(off::SCRATCHA), 0x1234_5678);
    assert_eq!(r.rd(off::SCRATCHA + 3), 0x12);
    // Registers repeat every 256 bytes of the 1 KiB window.
    let mut b = [0u8; 4];
    r.lsi
        .region_read(BAR_MMIO, 0x300 + off::SCRATCHA as u64, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x1234_5678);
    // SCRIPTS RAM in BAR2.
    r.lsi.region_write(BAR_RAM, 0x1ffc, &[1, 2, 3, 4]);
    r.lsi.region_read(BAR_RAM, 0x1ffc, &mut b);
    assert_eq!(b, [1, 2, 3, 4]);
    // ISTAT0 SRST: registers back to their defaults, RAM kept.
    r.wr(off::SCID, 3);
    r.wr(off::ISTAT0, istat0::SRST);
    assert_eq!(r.rd(off::SCID), 7);
    assert_eq!(r.rd32(off::SCRATCHA), 0);
    r.lsi.region_read(BAR_RAM, 0x1ffc, &mut b);
    assert_eq!(b, [1, 2, 3, 4]);
    // Scratch registers C..J and the 64-bit-era registers store values.
    r.lsi.region_write(BAR_MMIO, 0x7c, &[9, 8, 7, 6]);
    assert_eq!(r.rd32(0x7c), 0x0607_0809);
    r.lsi
        .region_write(BAR_MMIO, off::CSBC as u64, &[1, 0, 0, 0]);
    assert_eq!(r.rd32(off::CSBC), 1);
    // Attaching at the HBA's own id or past the LUNs IDENTIFY reaches.
    let d: Arc<dyn Lun> = Arc::new(Disk::new(r.backend.clone(), DiskOptions::default()).unwrap());
    // Id 7 is on the bus as QEMU allows; the chip never selects itself.
    assert!(r.lsi.attach(7, 0, d.clone()).is_ok());
    assert!(r.lsi.bus().has_target(7));
    assert!(r.lsi.attach(1, 8, d.clone()).is_err());
    assert!(r.lsi.attach(0, 0, d).is_err());
}

#[test]
fn seabios_script_inquiry_read_write() {
    let mut r = rig();
    r.wr(off::DIEN, dstat::SIR);
    // INQUIRY.
    let (d, s0, s1, st, msg) = r.seabios(0, 0, &[op::INQUIRY, 0, 0, 0, 36, 0], true, 36, DATA);
    assert_eq!((d, s0, s1, st, msg), (dstat::SIR | dstat::DFE, 0, 0, 0, 0));
    let inq = r.get(DATA, 36);
    assert_eq!(inq[0], 0, "direct access device");
    assert_eq!(&inq[8..12], b"QEMU");
    assert_eq!(r.rd32(off::DSPS), 0, "the INT's vector");
    // The line followed DSTAT SIR (enabled in DIEN) and fell when read.
    assert!(!r.line.0.load(Ordering::SeqCst));
    assert_eq!(
        r.rd(off::ISTAT0) & istat0::CON,
        0,
        "bus free after COMMAND COMPLETE"
    );

    // TEST UNIT READY: the power-on UNIT ATTENTION. SeaBIOS's zero-length
    // data move is a zero dword the chip skips.
    let (d, s0, s1, st, msg) = r.seabios(0, 0, &[op::TEST_UNIT_READY], false, 0, 0);
    assert_eq!((d & !dstat::DFE, s0, s1, st, msg), (dstat::SIR, 0, 0, 2, 0));
    let (d, s0, s1, st, _) = r.seabios(0, 0, &[op::TEST_UNIT_READY], false, 0, 0);
    assert_eq!((d & !dstat::DFE, s0, s1, st), (dstat::SIR, 0, 0, 0));

    // READ(10) of 8 blocks at LBA 5 matches the image.
    let (d, s0, s1, st, msg) = r.seabios(0, 0, &cdb10(op::READ_10, 0, 5, 8), true, 4096, DATA);
    assert_eq!((d & !dstat::DFE, s0, s1, st, msg), (dstat::SIR, 0, 0, 0, 0));
    let mut want = vec![0u8; 4096];
    r.backend.read_at(5 * 512, &mut want).unwrap();
    assert_eq!(r.get(DATA, 4096), want);

    // WRITE(10) of 3 blocks at LBA 100 reaches the image.
    let data = pattern(1536, 0x55);
    r.put(DATA, &data);
    let (d, s0, s1, st, msg) = r.seabios(0, 0, &cdb10(op::WRITE_10, 0, 100, 3), false, 1536, DATA);
    assert_eq!((d & !dstat::DFE, s0, s1, st, msg), (dstat::SIR, 0, 0, 0, 0));
    let mut back = vec![0u8; 1536];
    r.backend.read_at(100 * 512, &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(r.rd(off::SBCL), 0, "bus free");
}

#[test]
fn selection_timeout_on_an_absent_target() {
    let mut r = rig();
    r.wr(off::SIEN1, sist1::STO);
    let (d, s0, s1, _, _) = r.seabios(4, 0, &[op::INQUIRY, 0, 0, 0, 36, 0], true, 36, DATA);
    assert_eq!((d & !dstat::DFE, s0, s1), (0, 0, sist1::STO));
    // The processor halted at the block move after SELECT.
    assert_eq!(r.rd(off::ISTAT1) & regs::istat1::SRUN, 0);
    assert_eq!(r.rd32(off::DSP), SCRIPT + 16);
    assert_eq!(r.rd(off::ISTAT0) & (istat0::SIP | istat0::CON), 0);
    // Its own id times out too.
    let (_, _, s1, _, _) = r.seabios(7, 0, &[op::INQUIRY, 0, 0, 0, 36, 0], true, 36, DATA);
    assert_eq!(s1, sist1::STO);
}

#[test]
fn check_condition_and_request_sense() {
    let mut r = rig();
    // The power-on UNIT ATTENTION first.
    let (d, _, _, st) = r.command(0, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], 0, 0);
    assert_eq!((d & !dstat::DFE, st), (dstat::SIR, 2));
    assert_eq!(r.sense(), (6, 0x29, 0));
    // A READ past the end: no data phase, CHECK CONDITION.
    let (d, s0, _, st) = r.command(0, &cdb10(op::READ_10, 0, 1 << 20, 1), 512, DATA);
    assert_eq!((d & !dstat::DFE, s0, st), (dstat::SIR, 0, 2));
    assert_eq!(r.sense(), (5, 0x21, 0));
    // INQUIRY with allocation length 0: no data phase, GOOD.
    let (d, s0, _, st) = r.command(0, &[op::INQUIRY, 0, 0, 0, 0, 0], 36, DATA);
    assert_eq!((d & !dstat::DFE, s0, st), (dstat::SIR, 0, 0));
    // A malformed CDB (reserved opcode): ILLEGAL REQUEST.
    let (_, _, _, st) = r.command(0, &[0xff; 16], 0, 0);
    assert_eq!(st, 2);
    assert_eq!(r.sense(), (5, 0x20, 0));
    // A CDB shorter than its opcode's length: INVALID FIELD.
    let (_, _, _, st) = r.command(0, &[op::READ_10, 0, 0], 0, 0);
    assert_eq!(st, 2);
    assert_eq!(r.sense(), (5, 0x24, 0));
    // An absent LUN answers INQUIRY with qualifier 011b.
    r.put(MSGOUT, &[0xc3]);
    let (d, _, _, st) = {
        r.put(CDB, &[op::INQUIRY, 0, 0, 0, 36, 0]);
        // Reuse the phase-following script with IDENTIFY for LUN 3.
        let s = SCRIPT;
        r.put_words(
            s,
            &[
                0x4100_0000,
                0,
                0x0e00_0001,
                MSGOUT,
                0x0a00_0006,
                CDB,
                0x0900_0024,
                DATA,
                0x0b00_0001,
                STATUS,
                0x0f00_0001,
                MSGIN,
                0x9808_0000,
                0,
            ],
        );
        r.start(s);
        let (d, s0, s1) = r.wait();
        (d, s0, s1, r.get(STATUS, 1)[0])
    };
    assert_eq!((d & !dstat::DFE, st), (dstat::SIR, 0));
    assert_eq!(r.get(DATA, 1)[0], 0x7f);
}

#[test]
fn short_data_phase_is_a_phase_mismatch() {
    let mut r = rig();
    r.wr(off::SIEN0, sist0::MA);
    // INQUIRY with 36 bytes of data into a 255-byte move.
    let (d, s0, _, _) = r.command(0, &[op::INQUIRY, 0, 0, 0, 36, 0], 255, DATA);
    assert_eq!((d & !dstat::DFE, s0), (0, sist0::MA));
    assert!(r.line.0.load(Ordering::SeqCst) || r.rd(off::ISTAT0) & istat0::SIP == 0);
    // DBC holds what was not moved, DNAD where it stopped; the target is
    // in STATUS now; DFIFO mirrors DBC so the FIFO looks empty.
    assert_eq!(r.rd32(off::DBC) & 0xff_ffff, 255 - 36);
    assert_eq!(r.rd32(off::DNAD), DATA + 36);
    assert_eq!(r.rd(off::SSTAT1) & 7, 3);
    assert_eq!(r.rd(off::DFIFO), (255 - 36) as u8);
    assert_eq!(r.get(DATA + 8, 4), b"QEMU");
    // The driver resumes at the status phase.
    r.start(SCRIPT + 0x28);
    let (d, s0, _) = r.wait();
    assert_eq!((d & !dstat::DFE, s0), (dstat::SIR, 0));
    assert_eq!(r.get(STATUS, 1)[0], 0);
}

#[test]
fn bad_dma_addresses_are_bus_faults() {
    let mut r = rig();
    r.wr(off::DIEN, dstat::BF);
    // SCRIPTS outside RAM.
    r.start(0x8000_0000);
    let (d, _, _) = r.wait();
    assert_eq!(d & dstat::BF, dstat::BF);
    assert!(!r.line.0.load(Ordering::SeqCst), "DSTAT read cleared it");
    // A data buffer outside RAM: the read's piece fails in the runner.
    r.command(0, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], 0, 0);
    let (d, s0, _, _) = r.command(0, &cdb10(op::READ_10, 0, 0, 1), 512, 0x4000_0000);
    assert_eq!((d & dstat::BF, s0), (dstat::BF, 0));
    // The command is still in its data phase: a bus reset clears it.
    assert_eq!(r.rd(off::SSTAT1) & 7, 1);
    r.wr(off::SIEN0, sist0::RST);
    r.wr(off::SCNTL1, regs::scntl1::RST);
    r.wr(off::SCNTL1, 0);
    assert_eq!(r.rd(off::SIST0), sist0::RST);
    assert_eq!(r.rd(off::ISTAT0) & istat0::CON, 0);
    // The disk reports the reset as UNIT ATTENTION.
    let (_, _, _, st) = r.command(0, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], 0, 0);
    assert_eq!(st, 2);
    assert_eq!(r.sense(), (6, 0x29, 0));
    // Status byte to a bad address.
    r.status_at = 0xffff_fff0;
    let (d, _, _, _) = r.command(0, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], 0, 0);
    assert_eq!(d & dstat::BF, dstat::BF);
    r.status_at = STATUS;
    // Without bus mastering nothing is fetched.
    r.wr(off::ISTAT0, istat0::SRST);
    r.lsi.config_write(0x04, &3u16.to_le_bytes());
    r.start(SCRIPT);
    let (d, _, _) = r.wait();
    assert_eq!(d & dstat::BF, dstat::BF);
}

#[test]
fn runaway_scripts_end_bounded() {
    let mut r = rig();
    // JUMP to itself.
    r.put_words(SCRIPT, &[0x8008_0000, SCRIPT]);
    r.start(SCRIPT);
    let (_, s0, _) = r.wait();
    assert_eq!(s0, sist0::UDC);
    assert_eq!(r.rd(off::ISTAT1) & regs::istat1::SRUN, 0);
    // Zero dwords are no-ops: a page of them then JUMP back.
    r.put_words(0x8000, &[0; 64]);
    r.put_words(0x8100, &[0x8008_0000, 0x8000]);
    r.start(0x8000);
    let (_, s0, _) = r.wait();
    assert_eq!(s0, sist0::UDC);
    // Memory moves of 16 MiB - 1 copying in circles exhaust it sooner.
    r.put_words(SCRIPT, &[0xc0ff_ffff, 0, 0x1000, 0x8008_0000, SCRIPT]);
    let t = Instant::now();
    r.start(SCRIPT);
    let (d, s0, _) = r.wait();
    assert!(d & dstat::BF != 0 || s0 == sist0::UDC, "{d:#x} {s0:#x}");
    assert!(t.elapsed() < Duration::from_secs(5));
    // A program that writes DSP through the register window (QEMU's DMA
    // reentrancy reproducer): no recursion, ABRT ends it.
    let script = [0xc000_0024u32, RAM + 0x114, MMIO + 0x14];
    for (i, w) in script.iter().enumerate() {
        r.lsi.region_write(BAR_RAM, 4 * i as u64, &w.to_le_bytes());
    }
    r.lsi.region_write(BAR_RAM, 0x114, &0x80u32.to_le_bytes());
    r.lsi.region_write(BAR_RAM, 0x12c, &RAM.to_le_bytes());
    r.start(RAM);
    let (d, _, _) = r.wait();
    assert_eq!(d & dstat::ABRT, dstat::ABRT);
}

#[test]
fn wait_reselect_ends_with_sigp() {
    let mut r = rig();
    r.put_words(
        SCRIPT,
        &[0x5000_0000, SCRIPT + 0x10, 0x9808_0000, 1, 0x9808_0000, 2],
    );
    r.start(SCRIPT);
    assert_eq!(r.rd(off::ISTAT1) & regs::istat1::SRUN, regs::istat1::SRUN);
    assert_eq!(r.rd(off::ISTAT0) & (istat0::DIP | istat0::SIP), 0);
    r.wr(off::ISTAT0, istat0::SIGP);
    let (d, _, _) = r.wait();
    assert_eq!(d & dstat::SIR, dstat::SIR);
    assert_eq!(r.rd32(off::DSPS), 2);
    // CTEST2 shows SIGP once and clears it.
    assert_ne!(r.rd(off::CTEST2) & regs::ctest2::SIGP, 0);
    assert_eq!(r.rd(off::CTEST2) & regs::ctest2::SIGP, 0);
    // ABRT stops a waiting program; a new one starts from DSP.
    r.start(SCRIPT);
    r.wr(off::ISTAT0, istat0::ABRT);
    let (d, _, _) = r.wait();
    assert_eq!(d & dstat::ABRT, dstat::ABRT);
    r.wr(off::ISTAT0, 0);
    r.start(SCRIPT + 8);
    r.wait();
    assert_eq!(r.rd32(off::DSPS), 1);
    // With SIGP already set, WAIT RESELECT jumps at once.
    r.wr(off::ISTAT0, istat0::SIGP);
    r.start(SCRIPT);
    r.wait();
    assert_eq!(r.rd32(off::DSPS), 2);
}

#[test]
fn linux_style_table_indirect_load_store_and_ram() {
    let mut r = rig();
    r.command(0, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], 0, 0);
    r.sense();
    // The DSA points at a CCB-like table: select entry (id 0), the
    // IDENTIFY + SIMPLE TAG + SDTR message, the CDB, two data segments.
    let ccb = TABLE;
    let cdb = cdb10(op::READ_10, 0, 8, 3);
    r.put(
        ccb + 0x100,
        &[0xc0, 0x20, 0x05, 0x01, 0x03, 0x01, 0x0c, 0x10],
    );
    r.put(ccb + 0x110, &cdb[..10]);
    let words = [
        /* 0x00 select: SCNTL3, id 0, SXFER */ 0x0300_0000u32,
        0,
        /* 0x08 msgout */ 8,
        ccb + 0x100,
        /* 0x10 cmd */ 10,
        ccb + 0x110,
        /* 0x18 data 1 */ 1000,
        DATA,
        /* 0x20 data 2 */ 536,
        DATA + 0x1000,
        /* 0x28 status */ 1,
        ccb + 0x120,
        /* 0x30 msgin */ 1,
        ccb + 0x124,
    ];
    r.put_words(ccb, &words);
    // The program, loaded into the on-chip RAM as sym53c8xx does.
    let prog: Vec<u32> = vec![
        /* 0x00 */ 0x4300_0000,
        0x0, // SELECT ATN FROM 0 (table), alt 0
        /* 0x08 */ 0x1e00_0000,
        0x08, // MOVE FROM 8, WHEN MSG OUT
        /* 0x10 */ 0x1a00_0000,
        0x10, // MOVE FROM 16, WHEN CMD
        /* 0x18 */ 0x1900_0000,
        0x18, // MOVE FROM 24, WHEN DATA IN
        /* 0x20 */ 0x1900_0000,
        0x20, // MOVE FROM 32, WHEN DATA IN
        /* 0x28 */ 0x1b00_0000,
        0x28, // MOVE FROM 40, WHEN STATUS
        /* 0x30 */ 0x1f00_0000,
        0x30, // MOVE FROM 48, WHEN MSG IN
        /* 0x38 */ 0x6000_0040,
        0, // CLEAR ACK
        /* 0x40 */ 0x4800_0000,
        0, // WAIT DISCONNECT
        // STORE the status byte's dword into SCRATCHA via LOAD, add 5.
        /* 0x48 */
        0xf134_0004,
        0x120, // LOAD SCRATCHA, 4, DSA REL 0x120
        /* 0x50 */ 0x7e34_0500,
        0, // MOVE SCRATCHA0 + 5 TO SCRATCHA0
        /* 0x58 */ 0xf034_0004,
        0x130, // STORE SCRATCHA, 4, DSA REL 0x130
        // MOVE SCRATCHA0 TO SFBR; JUMP +8 IF 0x05 (skip the INT 0xbad)
        /* 0x60 */
        0x7234_0000,
        0,
        /* 0x68 */ 0x808c_0005,
        0x08,
        /* 0x70 */ 0x9808_0000,
        0xbad,
        // CALL a subroutine in RAM that copies 16 bytes (memory move).
        /* 0x78 */
        0x8888_0000,
        0x10,
        /* 0x80 */ 0x9808_0000,
        0x600d,
        /* 0x88 */ 0x9808_0000,
        0xbad2,
        /* 0x90 */ 0xc000_0010,
        ccb + 0x110,
        ccb + 0x140,
        /* 0x9c */ 0x9008_0000,
        0, // RETURN
    ];
    for (i, w) in prog.iter().enumerate() {
        r.lsi.region_write(BAR_RAM, 4 * i as u64, &w.to_le_bytes());
    }
    r.lsi
        .region_write(BAR_MMIO, off::DSA as u64, &ccb.to_le_bytes());
    r.wr(off::DIEN, 0xff);
    r.start(RAM);
    let (d, s0, s1) = r.wait();
    assert_eq!((d & !dstat::DFE, s0, s1), (dstat::SIR, 0, 0));
    assert_eq!(r.rd32(off::DSPS), 0x600d);
    let mut want = vec![0u8; 1536];
    r.backend.read_at(8 * 512, &mut want).unwrap();
    assert_eq!(r.get(DATA, 1000), want[..1000]);
    assert_eq!(r.get(DATA + 0x1000, 536), want[1000..]);
    assert_eq!(r.get(ccb + 0x120, 1), [0], "GOOD");
    assert_eq!(r.get(ccb + 0x124, 1), [0], "COMMAND COMPLETE");
    assert_eq!(r.get(ccb + 0x130, 1), [5]);
    assert_eq!(r.get(ccb + 0x140, 10), cdb[..10]);
    assert_eq!(r.rd(off::SIDL), 0, "the last message byte");
    assert_eq!(
        r.rd32(off::TEMP),
        RAM + 0x80,
        "CALL saved the return address"
    );
}

#[test]
fn message_reject_and_abort() {
    let mut r = rig();
    // An unknown message after IDENTIFY: MESSAGE REJECT, then COMMAND.
    r.put(MSGOUT, &[0x80, 0x55]);
    r.put_words(
        SCRIPT,
        &[
            0x4100_0000,
            0,
            0x0e00_0002,
            MSGOUT,
            0x0f00_0001,
            MSGIN,
            0x808a_0000 | 2 << 24,
            0x8,
            0x9808_0000,
            0xbad,
            0x9808_0000,
            0x600d,
        ],
    );
    r.start(SCRIPT);
    let (d, s0, _) = r.wait();
    assert_eq!((d & !dstat::DFE, s0), (dstat::SIR, 0));
    assert_eq!(r.rd32(off::DSPS), 0x600d, "COMMAND phase after the reject");
    assert_eq!(r.get(MSGIN, 1), [0x07]);
    // ABORT frees the bus.
    r.wr(off::ISTAT0, istat0::SRST);
    r.put(MSGOUT, &[0x80, 0x06]);
    r.put_words(SCRIPT + 0x10, &[0x9808_0000, 0x600d]);
    r.start(SCRIPT);
    r.wait();
    assert_eq!(r.rd(off::ISTAT0) & istat0::CON, 0);
    assert_eq!(r.rd(off::SSTAT2) & regs::sstat2::LDSC, regs::sstat2::LDSC);
}

#[test]
fn a_target_unplugged_while_selected_disconnects() {
    let mut r = rig();
    r.put(MSGOUT, &[0x80]);
    r.put(CDB, &[op::INQUIRY, 0, 0, 0, 36, 0]);
    r.put_words(
        SCRIPT,
        &[
            0x4100_0000,
            0,
            0x0e00_0001,
            MSGOUT,
            0x9808_0000,
            1,
            0x0a00_0006,
            CDB,
            0x9808_0000,
            2,
        ],
    );
    r.wr(off::SIEN0, sist0::UDC);
    r.start(SCRIPT);
    let (d, _, _) = r.wait();
    assert_eq!(d & dstat::SIR, dstat::SIR);
    assert_eq!(r.rd(off::SSTAT1) & 7, 2, "COMMAND phase");
    assert!(r.lsi.bus().detach(0, 0).is_some());
    r.start(SCRIPT + 0x18);
    let (_, s0, _) = r.wait();
    assert_eq!(s0, sist0::UDC);
    assert_eq!(r.rd(off::ISTAT0) & istat0::CON, 0);
}

#[test]
fn interrupt_on_the_fly_and_single_step() {
    let mut r = rig();
    r.put_words(SCRIPT, &[0x9818_0000, 0, 0x9808_0000, 3]);
    r.start(SCRIPT);
    let (d, _, _) = r.wait();
    assert_eq!(d & dstat::SIR, dstat::SIR);
    assert_ne!(r.rd(off::ISTAT0) & istat0::INTF, 0);
    assert!(r.line.0.load(Ordering::SeqCst), "INTF raises the line");
    r.wr(off::ISTAT0, istat0::INTF);
    assert!(!r.line.0.load(Ordering::SeqCst));
    // Single step: one instruction, then DSTAT SSI.
    r.wr(off::DCNTL, regs::dcntl::SSM);
    r.put_words(SCRIPT, &[0x7834_0100, 0, 0x9808_0000, 3]);
    r.start(SCRIPT);
    let (d, _, _) = r.wait();
    assert_eq!(d & dstat::SSI, dstat::SSI);
    assert_eq!(r.rd32(off::DSP), SCRIPT + 8);
    assert_eq!(r.rd(off::SCRATCHA), 1);
    // DCNTL IRQD keeps the pin low.
    r.wr(off::DCNTL, regs::dcntl::IRQD);
    r.wr(off::DIEN, 0xff);
    r.start(SCRIPT + 8);
    r.wait();
    assert!(!r.line.0.load(Ordering::SeqCst));
}

#[test]
fn parameter_lists_and_write_same_gather_data_out() {
    let mut r = rig();
    r.command(0, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], 0, 0);
    r.sense();
    assert!(r.backend.write_cache_enabled());
    // MODE SELECT(10): header and caching page with WCE off, sent in two
    // DATA OUT moves of 8 and 20 bytes.
    let mut list = vec![0u8; 8];
    list.extend_from_slice(&[0x08, 0x12]);
    list.extend_from_slice(&[0; 18]);
    r.put(DATA, &list);
    let mut c = [0u8; 10];
    c[0] = op::MODE_SELECT_10;
    c[1] = 0x10;
    c[7..9].copy_from_slice(&28u16.to_be_bytes());
    r.put(CDB, &c);
    r.put(MSGOUT, &[0x80]);
    r.put_words(
        SCRIPT,
        &[
            0x4100_0000,
            0,
            0x0e00_0001,
            MSGOUT,
            0x0a00_000a,
            CDB,
            0x0800_0008,
            DATA,
            0x0800_0014,
            DATA + 8,
            0x0b00_0001,
            STATUS,
            0x0f00_0001,
            MSGIN,
            0x9808_0000,
            0,
        ],
    );
    r.start(SCRIPT);
    let (d, s0, _) = r.wait();
    assert_eq!((d & !dstat::DFE, s0), (dstat::SIR, 0));
    assert_eq!(r.get(STATUS, 1), [0]);
    assert!(!r.backend.write_cache_enabled(), "WCE reached the backend");
    // WRITE SAME(10): one block of data-out repeated over 4 blocks.
    let block = pattern(512, 0x77);
    r.put(DATA, &block);
    let (d, _, _, st) = r.command(0, &cdb10(op::WRITE_SAME_10, 0, 40, 4), 512, DATA);
    assert_eq!((d & !dstat::DFE, st), (dstat::SIR, 0));
    let mut back = vec![0u8; 2048];
    r.backend.read_at(40 * 512, &mut back).unwrap();
    assert!(back.chunks(512).all(|c| c == block.as_slice()));
    // SYNCHRONIZE CACHE: no data, a flush the SCRIPTS wait for.
    let flushes = r.backend.stats().flush.ops;
    let (_, _, _, st) = r.command(0, &cdb10(op::SYNCHRONIZE_CACHE_10, 0, 0, 0), 0, 0);
    assert_eq!(st, 0);
    assert_eq!(r.backend.stats().flush.ops, flushes + 1);
}

#[test]
fn asynchronous_completions_continue_the_scripts() {
    // null-aio completes on worker threads: the SCRIPTS wait, and the
    // completion thread runs them on.
    let mut r = rig();
    let b =
        crate::scsi::testutil::backend("driver=null-aio,size=16777216", BackendConfig::default());
    let d: Arc<dyn Lun> = Arc::new(Disk::new(b, DiskOptions::default()).unwrap());
    r.lsi.attach(3, 0, d).unwrap();
    r.wr(off::DIEN, dstat::SIR);
    r.command(3, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], 0, 0);
    for i in 0..20u32 {
        r.put(DATA, &[0xee; 64]);
        let (d, s0, s1, st) = r.command(3, &cdb10(op::READ_10, 0, i * 64, 64), 32768, DATA);
        assert_eq!((d & !dstat::DFE, s0, s1, st), (dstat::SIR, 0, 0, 0));
        assert_eq!(r.get(DATA, 64), [0; 64]);
    }
    assert!(
        r.rd32(off::CSBC) as u64 >= 20 * 32768,
        "CSBC counts the bytes moved"
    );
}

#[test]
fn corpus_seeds_do_what_they_say() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/lsi");
    let seed = |name: &str| std::fs::read(dir.join(name)).unwrap();
    let run = |name: &str| {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let mut lsi = super::fuzz::chip(mem.clone()).unwrap();
        super::fuzz::run_on(&mut lsi, &mem, &seed(name));
        let mut v = vec![0u8; 0x20000];
        mem.read_slice(&mut v, GuestAddress(0)).unwrap();
        v
    };
    // SeaBIOS's script: status GOOD, COMMAND COMPLETE, the INQUIRY data.
    let m = run("seabios_inquiry");
    assert_eq!((m[0x2200], m[0x2220]), (0, 0));
    assert_eq!(&m[0x10008..0x1000c], b"QEMU");
    let m = run("seabios_cdrom_and_lun1");
    assert_eq!(m[0x2200], 0, "READ CAPACITY on id 2 LUN 1");
    assert_eq!(&m[0x10000..0x10008], &[0, 0, 0x07, 0xff, 0, 0, 2, 0]);
    let m = run("seabios_absent_target");
    assert_eq!(m[0x2200], 0, "never reached the status phase");
}

/// Mutations of the corpus seeds (byte flips, splices, truncations) through
/// the fuzz harness: a cheap stand-in for `cargo fuzz` in `cargo test`.
/// `LSI_MUTATIONS` sets how many (default 300).
#[test]
fn mutated_seeds_never_panic_or_hang() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/lsi");
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    seeds.sort();
    let n: usize = std::env::var("LSI_MUTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    for i in 0..n {
        let mut v = seeds[i % seeds.len()].clone();
        for _ in 0..1 + next() % 8 {
            if v.is_empty() {
                break;
            }
            let at = (next() % v.len() as u64) as usize;
            match next() % 4 {
                0 => v[at] = next() as u8,
                1 => v[at] ^= 1 << (next() % 8),
                2 => {
                    let other = &seeds[(next() % seeds.len() as u64) as usize];
                    let from = (next() % other.len().max(1) as u64) as usize;
                    let tail = other[from.min(other.len())..].to_vec();
                    v.truncate(at);
                    v.extend(tail);
                }
                _ => v.truncate(at + 1),
            }
        }
        let t = Instant::now();
        super::fuzz::run(&v);
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "input {i} took {:?}",
            t.elapsed()
        );
    }
}

#[test]
fn fuzz_seeds_run() {
    // The harness on a few hand-made inputs (the corpus replays more).
    super::fuzz::run(&[5, 0, 0, 0xff, 0xff, 7]);
    super::fuzz::run(&[2, 0x2c, 0, 0, 0, 0]);
    super::fuzz::run(&[]);
}
