//! virtio-scsi-pci through the qtest protocol, in the style of
//! virtio_blk_qtest.rs: the test is the guest driver. It brings the
//! function up with support::virtio's driver, lays out requests in guest
//! RAM as virtio 1.2 section 5.6.6 has them, and checks what the shared
//! SCSI target (devices::scsi) answers: data against the image files,
//! status, fixed-format sense, residuals and response codes, the control
//! and event queues, and chains a driver could get wrong.
//!
//! The machine (see [`launch`]): on one HBA at `addr=4`, a `scsi-hd` at
//! target 1 LUN 0 (4 MiB raw image, sector n filled with [`pattern`]), a
//! `scsi-cd` with a 64-block image at target 1 LUN 3 and an empty
//! `scsi-cd` at target 2 LUN 0.

mod support;

use std::fmt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use serde_json::json;
use support::qmp::Qmp;
use support::qtest::Qtest;
use support::virtio::*;

const VERSION_1: u64 = 1 << 32;
const INDIRECT: u64 = 1 << 28;
const EVENT_IDX: u64 = 1 << 29;
const SCSI_INOUT: u64 = 1 << 0;
const SCSI_HOTPLUG: u64 = 1 << 1;
const SCSI_CHANGE: u64 = 1 << 2;

/// Queue indexes (5.6.2): control, event, then the request queues.
const CTRLQ: u16 = 0;
const EVENTQ: u16 = 1;
const REQQ: u16 = 2;

/// Response codes (5.6.6.1.1).
const S_OK: u8 = 0;
const S_OVERRUN: u8 = 1;
const S_BAD_TARGET: u8 = 3;
const S_FAILURE: u8 = 9;
const S_FUNCTION_REJECTED: u8 = 11;
const S_INCORRECT_LUN: u8 = 12;

/// SAM-5 status bytes.
const GOOD: u8 = 0;
const CHECK: u8 = 2;

/// (sense key, ASC, ASCQ) of the conditions checked.
type Sense = (u8, u8, u8);
const NO_SENSE: Sense = (0, 0, 0);
const UA_RESET: Sense = (6, 0x29, 0);
const UA_MEDIUM_CHANGED: Sense = (6, 0x28, 0);
const INVALID_OPCODE: Sense = (5, 0x20, 0);
const LBA_OUT_OF_RANGE: Sense = (5, 0x21, 0);
const INVALID_FIELD: Sense = (5, 0x24, 0);
const LUN_NOT_SUPPORTED: Sense = (5, 0x25, 0);
const INVALID_PARAM: Sense = (5, 0x26, 0);
const PARAM_LIST_LENGTH: Sense = (5, 0x1a, 0);
const SAVING_NOT_SUPPORTED: Sense = (5, 0x39, 0);
const REMOVAL_PREVENTED: Sense = (5, 0x53, 2);
const NO_MEDIUM: Sense = (2, 0x3a, 0);
const NO_MEDIUM_TRAY_CLOSED: Sense = (2, 0x3a, 1);
const NO_MEDIUM_TRAY_OPEN: Sense = (2, 0x3a, 2);
const MISCOMPARE: Sense = (0xe, 0x1d, 0);
const READ_ERROR: Sense = (3, 0x11, 0);
const IO_PROCESS_TERMINATED: Sense = (0xb, 0x00, 0x06);

/// SCSI operation codes used here.
mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const VERIFY_10: u8 = 0x2f;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const READ_TOC: u8 = 0x43;
    pub const GET_CONFIGURATION: u8 = 0x46;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8a;
    pub const VERIFY_16: u8 = 0x8f;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
}

/// Where the test driver keeps its requests in guest RAM.
const REQ: u64 = BUF_BASE;
const RESP: u64 = BUF_BASE + 0x100;
const CTRL_REQ: u64 = BUF_BASE + 0x200;
const CTRL_RESP: u64 = BUF_BASE + 0x300;
const EVENTS: u64 = BUF_BASE + 0x400;
const DATA_OUT: u64 = 0x50_0000;
const DATA_IN: u64 = 0x80_0000;
/// virtio_scsi_cmd_req with the default 32-byte CDB, and
/// virtio_scsi_cmd_resp with the default 96 bytes of sense.
const REQ_LEN: u32 = 19 + 32;
const RESP_LEN: u32 = 12 + 96;

const BLOCKS: u64 = 8192; // the disk: 4 MiB of 512-byte blocks
const CD_BLOCKS: u64 = 64; // the CD: 128 KiB of 2048-byte blocks
const SERIAL: &str = "SER-0001";
const WWN: u64 = 0x5000_c500_15ea_71ad;

/// The disk's initial contents: sector n filled with this byte.
fn pattern(sector: u64) -> u8 {
    (sector % 251) as u8 ^ 0x5a
}

/// An image of `blocks` blocks of `bs` bytes, block n filled with `f(n)`.
fn image(path: &Path, blocks: u64, bs: usize, f: impl Fn(u64) -> u8) {
    let mut v = Vec::with_capacity(blocks as usize * bs);
    for n in 0..blocks {
        v.extend(std::iter::repeat_n(f(n), bs));
    }
    std::fs::write(path, v).unwrap();
}

/// `n` blocks of 512 bytes at `lba` of a file, as it is now.
fn file_blocks(path: &Path, lba: u64, n: u64) -> Vec<u8> {
    std::fs::read(path).unwrap()[(lba * 512) as usize..((lba + n) * 512) as usize].to_vec()
}

/// Distinct data for writes: not a per-sector fill, so that misplaced
/// bytes inside a block show.
fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

struct Files {
    dir: PathBuf,
    disk: PathBuf,
    cd: PathBuf,
    qmp: PathBuf,
}

/// Starts the machine described in the module doc. `drive_opts` are
/// added to the disk's -drive (a blkdebug `file.` chain, `discard=`).
fn launch(name: &str, drive_opts: &str, disk_file: bool) -> (Qtest, Files) {
    let dir = support::scratch(name);
    let disk = dir.join("disk.raw");
    image(&disk, BLOCKS, 512, pattern);
    let cd = dir.join("cd.iso");
    image(&cd, CD_BLOCKS, 2048, |n| 0xc0 ^ n as u8);
    let qmp = dir.join("qmp.sock");
    let d0 = if disk_file {
        format!(
            "file={},if=none,id=d0,format=raw{drive_opts}",
            disk.display()
        )
    } else {
        format!("if=none,id=d0,format=raw{drive_opts}")
    };
    let c0 = format!(
        "file={},if=none,id=c0,format=raw,media=cdrom,readonly=on",
        cd.display()
    );
    let hd = format!(
        "scsi-hd,drive=d0,bus=hba.0,scsi-id=1,lun=0,serial={SERIAL},wwn=0x{WWN:x},rotation_rate=1"
    );
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp.display());
    let qt = Qtest::start(&[
        "-drive",
        &d0,
        "-drive",
        &c0,
        "-drive",
        "if=none,id=e0,media=cdrom",
        "-device",
        "virtio-scsi-pci,id=hba,addr=4",
        "-device",
        &hd,
        "-device",
        "scsi-cd,drive=c0,bus=hba.0,scsi-id=1,lun=3,id=cd",
        "-device",
        "scsi-cd,drive=e0,bus=hba.0,scsi-id=2,lun=0,id=empty",
        "-qmp",
        &qmp_arg,
    ]);
    (qt, Files { dir, disk, cd, qmp })
}

/// The 8-byte LUN field (5.6.6.1): 1, the target, the LUN in the flat
/// space form Linux uses.
fn lun_field(target: u8, lun: u16) -> [u8; 8] {
    [1, target, 0x40 | (lun >> 8) as u8, lun as u8, 0, 0, 0, 0]
}

/// What came back for one command.
struct Resp {
    used: u32,
    sense_len: u32,
    resid: u32,
    status: u8,
    response: u8,
    sense: Vec<u8>,
    data: Vec<u8>,
}

impl fmt::Debug for Resp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.sense_len.min(18) as usize;
        write!(
            f,
            "used {} response {} status {} resid {} sense {:02x?} data[..{}]",
            self.used,
            self.response,
            self.status,
            self.resid,
            &self.sense[..n],
            self.data.len()
        )
    }
}

impl Resp {
    /// (key, ASC, ASCQ) of fixed-format sense data.
    fn key(&self) -> Sense {
        (self.sense[2] & 0xf, self.sense[12], self.sense[13])
    }

    #[track_caller]
    fn good(&self) -> &Self {
        assert_eq!((self.response, self.status), (S_OK, GOOD), "{self:?}");
        assert_eq!(self.sense_len, 0, "{self:?}");
        self
    }

    /// CHECK CONDITION with fixed-format, current sense (SPC-4 4.5.3).
    #[track_caller]
    fn check(&self, want: Sense) -> &Self {
        assert_eq!((self.response, self.status), (S_OK, CHECK), "{self:?}");
        assert_eq!(self.sense_len, 18, "{self:?}");
        assert_eq!(self.sense[0], 0x70, "fixed format, current: {self:?}");
        assert_eq!(self.sense[7], 10, "additional sense length: {self:?}");
        assert_eq!(self.key(), want, "{self:?}");
        self
    }
}

/// The test's virtio-scsi driver.
struct Hba {
    v: VirtioPci,
    tag: u64,
}

impl Hba {
    /// Modern bring-up with MSI-X: control, event and one request queue.
    fn new(qt: Qtest) -> Hba {
        Hba {
            v: VirtioPci::init(qt, VERSION_1 | SCSI_HOTPLUG | SCSI_CHANGE, 3),
            tag: 1,
        }
    }

    fn qt(&mut self) -> &mut Qtest {
        &mut self.v.qt
    }

    /// Adds a chain to queue `q`, kicks it and waits for its used entry;
    /// returns the used length.
    fn submit(&mut self, q: u16, bufs: &[(u64, u32, bool)]) -> u32 {
        let vq = &mut self.v.vqs[q as usize];
        let head = vq.add(&mut self.v.qt, bufs, None);
        vq.kick(&mut self.v.qt, head, |qt, q| {
            qt.writew(NOTIFY + 4 * q as u64, q)
        });
        let (id, len) = self.v.vqs[q as usize].wait_used(&mut self.v.qt);
        assert_eq!(id, head as u32, "used id is the chain head");
        len
    }

    /// One command to `target`/`lun` with `out` as data-out and a data-in
    /// buffer of `in_len` bytes.
    fn cmd(&mut self, target: u8, lun: u16, cdb: &[u8], out: &[u8], in_len: u32) -> Resp {
        self.cmd_at(lun_field(target, lun), cdb, out, in_len)
    }

    fn cmd_at(&mut self, lun: [u8; 8], cdb: &[u8], out: &[u8], in_len: u32) -> Resp {
        let mut req = lun.to_vec();
        req.extend_from_slice(&self.tag.to_le_bytes());
        self.tag += 1;
        req.extend_from_slice(&[0, 0, 0]); // SIMPLE, priority, CRN
        let mut c = [0u8; 32];
        c[..cdb.len()].copy_from_slice(cdb);
        req.extend_from_slice(&c);
        self.qt().memwrite(REQ, &req);
        self.qt().memwrite(RESP, &[0xee; RESP_LEN as usize]);
        let mut bufs = vec![(REQ, REQ_LEN, false)];
        if !out.is_empty() {
            self.qt().memwrite(DATA_OUT, out);
            bufs.push((DATA_OUT, out.len() as u32, false));
        }
        bufs.push((RESP, RESP_LEN, true));
        if in_len > 0 {
            self.qt().memwrite(DATA_IN, &vec![0xee; in_len as usize]);
            bufs.push((DATA_IN, in_len, true));
        }
        let used = self.submit(REQQ, &bufs);
        self.response(used, in_len)
    }

    fn response(&mut self, used: u32, in_len: u32) -> Resp {
        let r = self.qt().memread(RESP, RESP_LEN as usize);
        let le32 = |o: usize| u32::from_le_bytes(r[o..o + 4].try_into().unwrap());
        let data = if in_len > 0 {
            self.qt().memread(DATA_IN, in_len as usize)
        } else {
            Vec::new()
        };
        Resp {
            used,
            sense_len: le32(0),
            resid: le32(4),
            status: r[10],
            response: r[11],
            sense: r[12..].to_vec(),
            data,
        }
    }

    /// A task management function (5.6.6.2.1): (used length, response).
    fn tmf(&mut self, subtype: u32, target: u8, lun: u16, tag: u64) -> (u32, u8) {
        let mut req = 0u32.to_le_bytes().to_vec();
        req.extend_from_slice(&subtype.to_le_bytes());
        req.extend_from_slice(&lun_field(target, lun));
        req.extend_from_slice(&tag.to_le_bytes());
        self.qt().memwrite(CTRL_REQ, &req);
        self.qt().writeb(CTRL_RESP, 0xee);
        let used = self.submit(CTRLQ, &[(CTRL_REQ, 24, false), (CTRL_RESP, 1, true)]);
        let r = self.qt().readb(CTRL_RESP);
        (used, r)
    }

    /// An asynchronous notification query or subscription (5.6.6.2.2):
    /// (used length, event_actual, response).
    fn an(&mut self, ty: u32, target: u8, requested: u32) -> (u32, u32, u8) {
        let mut req = ty.to_le_bytes().to_vec();
        req.extend_from_slice(&lun_field(target, 0));
        req.extend_from_slice(&requested.to_le_bytes());
        self.qt().memwrite(CTRL_REQ, &req);
        self.qt().memwrite(CTRL_RESP, &[0xee; 5]);
        let used = self.submit(CTRLQ, &[(CTRL_REQ, 16, false), (CTRL_RESP, 5, true)]);
        let r = self.qt().memread(CTRL_RESP, 5);
        (used, u32::from_le_bytes(r[..4].try_into().unwrap()), r[4])
    }

    /// Clears the power-on UNIT ATTENTION of a unit.
    #[track_caller]
    fn clear_ua(&mut self, target: u8, lun: u16) {
        self.cmd(target, lun, &[op::TEST_UNIT_READY], &[], 0)
            .check(UA_RESET);
        self.cmd(target, lun, &[op::TEST_UNIT_READY], &[], 0).good();
    }

    /// REQUEST SENSE: the sense data it returns.
    #[track_caller]
    fn request_sense(&mut self, target: u8, lun: u16) -> Sense {
        let r = self.cmd(target, lun, &[op::REQUEST_SENSE, 0, 0, 0, 18, 0], &[], 18);
        r.good();
        assert_eq!(r.data[0], 0x70);
        (r.data[2] & 0xf, r.data[12], r.data[13])
    }
}

fn cdb6(opcode: u8, lba: u32, n: u8) -> Vec<u8> {
    vec![
        opcode,
        (lba >> 16) as u8 & 0x1f,
        (lba >> 8) as u8,
        lba as u8,
        n,
        0,
    ]
}
fn cdb10(opcode: u8, lba: u32, n: u16) -> Vec<u8> {
    let mut c = vec![opcode, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.push(0);
    c.extend_from_slice(&n.to_be_bytes());
    c.push(0);
    c
}
fn cdb12(opcode: u8, lba: u32, n: u32) -> Vec<u8> {
    let mut c = vec![opcode, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&n.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}
fn cdb16(opcode: u8, lba: u64, n: u32) -> Vec<u8> {
    let mut c = vec![opcode, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&n.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}
fn inquiry(evpd: bool, page: u8, alloc: u16) -> Vec<u8> {
    let a = alloc.to_be_bytes();
    vec![op::INQUIRY, evpd as u8, page, a[0], a[1], 0]
}
/// An UNMAP parameter list (SBC-3 5.28.2) of (LBA, blocks) descriptors.
fn unmap_list(ranges: &[(u64, u32)]) -> Vec<u8> {
    let bd = (16 * ranges.len()) as u16;
    let mut v = (bd + 6).to_be_bytes().to_vec();
    v.extend_from_slice(&bd.to_be_bytes());
    v.extend_from_slice(&[0; 4]);
    for &(lba, n) in ranges {
        v.extend_from_slice(&lba.to_be_bytes());
        v.extend_from_slice(&n.to_be_bytes());
        v.extend_from_slice(&[0; 4]);
    }
    v
}
fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

/// `query-block`'s entry for drive `id`.
fn query_block(q: &mut Qmp, id: &str) -> serde_json::Value {
    let blocks = q.ok("query-block", json!({}));
    blocks
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == id)
        .unwrap_or_else(|| panic!("no {id} in {blocks}"))
        .clone()
}

#[test]
fn pci_identity_features_and_configuration() {
    let (mut qt, _f) = launch("vscsi-ident", "", true);
    // Transitional on `pc` by default, as QEMU's: 1af4:1004, subsystem 8.
    assert_eq!(qt.pci_read32(SLOT, 0, 0), 0x1004_1af4);
    assert_eq!(qt.pci_read32(SLOT, 0, 0x2c), 0x0008_1af4);
    assert_eq!(qt.pci_read32(SLOT, 0, 8) >> 8, 0x01_0000, "SCSI controller");
    let mut v = VirtioPci::map(qt);
    let f = v.device_features();
    for (bit, name) in [
        (VERSION_1, "VERSION_1"),
        (INDIRECT, "INDIRECT_DESC"),
        (EVENT_IDX, "EVENT_IDX"),
        (SCSI_HOTPLUG, "HOTPLUG"),
        (SCSI_CHANGE, "CHANGE"),
    ] {
        assert_ne!(f & bit, 0, "{name} offered");
    }
    assert_eq!(f & SCSI_INOUT, 0, "no bidirectional commands");
    let mut h = Hba::new(v.qt);
    // virtio_scsi_config (5.6.4): one request queue (one vCPU), queue size
    // 256 - 2 segments, QEMU's limits, 96 bytes of sense, 32-byte CDBs,
    // targets 0-255 and LUNs up to 16383.
    let want: [(u64, u32); 9] = [
        (0, 1),
        (4, 254),
        (8, 0xffff),
        (12, 128),
        (16, 16),
        (20, 96),
        (24, 32),
        (32, 16383),
        (28, 255 << 16),
    ];
    for (off, val) in want {
        assert_eq!(h.qt().readl(DEVCFG + off), val, "config at {off}");
    }
}

#[test]
fn inquiry_standard_data_and_vpd_pages() {
    let (qt, _f) = launch("vscsi-inquiry", "", true);
    let mut h = Hba::new(qt);
    // INQUIRY is answered while the power-on UNIT ATTENTION is pending.
    let r = h.cmd(1, 0, &inquiry(false, 0, 96), &[], 96);
    r.good();
    let d = &r.data;
    assert_eq!(
        &d[..8],
        &[0, 0, 5, 0x12, 31, 0, 0, 0x12],
        "{:02x?}",
        &d[..8]
    );
    assert_eq!(&d[8..36], b"QEMU    QEMU HARDDISK   2.5+");
    assert_eq!((r.resid, r.used), (96 - 36, RESP_LEN + 36), "residual");
    assert!(d[36..].iter().all(|&b| b == 0xee), "nothing past the data");
    // Cut to the allocation length.
    let r = h.cmd(1, 0, &inquiry(false, 0, 5), &[], 96);
    assert_eq!((r.good().resid, r.data[4], r.data[5]), (91, 31, 0xee));

    let vpd = |h: &mut Hba, page: u8| {
        let r = h.cmd(1, 0, &inquiry(true, page, 255), &[], 255);
        r.good();
        assert_eq!(&r.data[..2], &[0, page]);
        let n = be16(&r.data[2..]) as usize + 4;
        assert_eq!(r.resid as usize, 255 - n);
        r.data[..n].to_vec()
    };
    assert_eq!(vpd(&mut h, 0x00)[4..], [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
    assert_eq!(&vpd(&mut h, 0x80)[4..], SERIAL.as_bytes());
    // Device identification: the serial as a vendor-specific ASCII
    // designator, then the WWN as an NAA designator.
    let mut want = vec![0x02, 0x00, 0x00, SERIAL.len() as u8];
    want.extend_from_slice(SERIAL.as_bytes());
    want.extend_from_slice(&[0x01, 0x03, 0x00, 8]);
    want.extend_from_slice(&WWN.to_be_bytes());
    assert_eq!(vpd(&mut h, 0x83)[4..], want);
    // Block limits: WSNZ, unmap and write-same limits of 1 GiB.
    let b0 = vpd(&mut h, 0xb0);
    assert_eq!(b0.len(), 64);
    assert_eq!(b0[4] & 1, 1, "WSNZ");
    assert_eq!(be32(&b0[20..]), (1 << 30) / 512, "max unmap LBA count");
    assert_eq!(be32(&b0[24..]), 255, "max unmap descriptors");
    assert_eq!(
        u64::from_be_bytes(b0[36..44].try_into().unwrap()),
        (1 << 30) / 512
    );
    // Block device characteristics: rotation_rate=1 (solid state).
    let b1 = vpd(&mut h, 0xb1);
    assert_eq!((b1.len(), be16(&b1[4..])), (64, 1));
    // Logical block provisioning: LBPU, LBPWS, LBPWS10; thin.
    assert_eq!(vpd(&mut h, 0xb2), vec![0, 0xb2, 0, 4, 0, 0xe0, 0x02, 0]);
    // A page the disk does not have, and a page code without EVPD.
    h.cmd(1, 0, &inquiry(true, 0x99, 255), &[], 255)
        .check(INVALID_FIELD);
    // (After the UNIT ATTENTION: a CDB that does not parse is no INQUIRY
    // to the unit, so the pending condition would be reported instead.)
    h.clear_ua(1, 0);
    let r = h.cmd(1, 0, &inquiry(false, 0x80, 255), &[], 255);
    assert_eq!(r.check(INVALID_FIELD).resid, 255, "no data moved");
}

#[test]
fn unit_attention_request_sense_report_luns_and_absent_units() {
    let (qt, _f) = launch("vscsi-luns", "", true);
    let mut h = Hba::new(qt);
    // Power on: UNIT ATTENTION once, then ready.
    h.clear_ua(1, 0);
    let r = h.cmd(1, 0, &[op::REQUEST_SENSE, 0, 0, 0, 96, 0], &[], 96);
    r.good();
    assert_eq!(&r.data[..8], &[0x70, 0, 0, 0, 0, 0, 0, 10]);
    assert_eq!(r.resid, 96 - 18);
    // REQUEST SENSE with DESC=1 (descriptor format) is refused.
    h.cmd(1, 0, &[op::REQUEST_SENSE, 1, 0, 0, 96, 0], &[], 96)
        .check(INVALID_FIELD);
    assert_eq!(h.request_sense(1, 0), INVALID_FIELD, "the kept sense");
    assert_eq!(h.request_sense(1, 0), NO_SENSE, "consumed");

    // REPORT LUNS: target 1 has LUNs 0 and 3.
    let report = |h: &mut Hba, lun: [u8; 8], alloc: u32, buf: u32| {
        let mut c = vec![op::REPORT_LUNS, 0, 0, 0, 0, 0];
        c.extend_from_slice(&alloc.to_be_bytes());
        c.extend_from_slice(&[0, 0]);
        h.cmd_at(lun, &c, &[], buf)
    };
    let r = report(&mut h, lun_field(1, 0), 64, 64);
    r.good();
    assert_eq!(
        r.data[..24],
        [0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(r.resid, 40);
    // The peripheral addressing form of the LUN field reaches the same
    // unit (a present LUN answers REPORT LUNS too).
    let r = report(&mut h, [1, 1, 0, 3, 0, 0, 0, 0], 64, 64);
    assert_eq!(r.good().data[..4], [0, 0, 0, 16]);
    report(&mut h, lun_field(1, 0), 8, 64).check(INVALID_FIELD);
    let r = report(&mut h, lun_field(2, 0), 16, 16);
    assert_eq!(
        r.good().data,
        vec![0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );

    // LUN 5 of target 1 is absent: INQUIRY says so (qualifier 011b),
    // REQUEST SENSE returns LOGICAL UNIT NOT SUPPORTED as data, everything
    // else is CHECK CONDITION with it.
    let r = h.cmd(1, 5, &inquiry(false, 0, 36), &[], 36);
    assert_eq!(r.good().data[0], 0x7f);
    assert_eq!(h.request_sense(1, 5), LUN_NOT_SUPPORTED);
    for c in [vec![op::TEST_UNIT_READY], cdb10(op::READ_10, 0, 1)] {
        let r = h.cmd(1, 5, &c, &[], 512);
        assert_eq!(r.check(LUN_NOT_SUPPORTED).resid, 512);
    }
    // An absent target: BAD_TARGET, no SCSI status; and a LUN field that
    // names no target of this bus (byte 0 not 1) is one too.
    for lun in [lun_field(9, 0), [0, 1, 0x40, 0, 0, 0, 0, 0]] {
        let r = h.cmd_at(lun, &[op::TEST_UNIT_READY], &[], 0);
        assert_eq!((r.response, r.status), (S_BAD_TARGET, GOOD), "{r:?}");
        assert_eq!((r.used, r.sense_len), (RESP_LEN, 0));
    }
    // The unit is unaffected.
    h.cmd(1, 0, &[op::TEST_UNIT_READY], &[], 0).good();
}

#[test]
fn read_capacity_and_reads_and_writes_of_every_size() {
    let (qt, f) = launch("vscsi-rw", "", true);
    let mut h = Hba::new(qt);
    h.clear_ua(1, 0);
    let r = h.cmd(1, 0, &cdb10(op::READ_CAPACITY_10, 0, 0), &[], 8);
    assert_eq!(r.good().data, [0, 0, 0x1f, 0xff, 0, 0, 2, 0]);
    let mut c = cdb16(op::SERVICE_ACTION_IN_16, 0, 32);
    c[1] = 0x10; // READ CAPACITY(16)
    let r = h.cmd(1, 0, &c, &[], 64);
    r.good();
    assert_eq!(
        u64::from_be_bytes(r.data[..8].try_into().unwrap()),
        BLOCKS - 1
    );
    assert_eq!(be32(&r.data[8..]), 512);
    assert_eq!((r.data[13], r.data[14]), (0, 0x80), "LBPME");
    assert_eq!(r.resid, 32);

    // Reads of each CDB size match the image.
    let cases: [(Vec<u8>, u64, u64); 5] = [
        (cdb6(op::READ_6, 3, 2), 3, 2),
        // READ(6) with length 0 moves 256 blocks.
        (cdb6(op::READ_6, 10, 0), 10, 256),
        (cdb10(op::READ_10, 1000, 7), 1000, 7),
        (cdb12(op::READ_12, 4000, 17), 4000, 17),
        (cdb16(op::READ_16, BLOCKS - 5, 5), BLOCKS - 5, 5),
    ];
    for (c, lba, n) in cases {
        let r = h.cmd(1, 0, &c, &[], (n * 512) as u32);
        r.good();
        assert_eq!(r.resid, 0);
        assert_eq!(r.used, RESP_LEN + (n * 512) as u32);
        assert!(r.data == file_blocks(&f.disk, lba, n), "READ {c:02x?}");
    }
    // More than the runner's 1 MiB chunk.
    let n = 2100u64;
    let r = h.cmd(
        1,
        0,
        &cdb10(op::READ_10, 17, n as u16),
        &[],
        (n * 512) as u32,
    );
    r.good();
    assert!(
        r.data == file_blocks(&f.disk, 17, n),
        "READ(10) of 2100 blocks"
    );

    // Writes of each CDB size reach the file, and read back.
    let writes: [(Vec<u8>, u64, u64); 5] = [
        (cdb6(op::WRITE_6, 20, 2), 20, 2),
        (cdb10(op::WRITE_10, 300, 3), 300, 3),
        (cdb12(op::WRITE_12, 4100, 1), 4100, 1),
        (cdb16(op::WRITE_16, BLOCKS - 1, 1), BLOCKS - 1, 1),
        // FUA.
        (
            {
                let mut c = cdb10(op::WRITE_10, 5000, 4);
                c[1] = 0x08;
                c
            },
            5000,
            4,
        ),
    ];
    for (i, (c, lba, n)) in writes.into_iter().enumerate() {
        let d = data((n * 512) as usize, i as u8 * 31 + 1);
        let r = h.cmd(1, 0, &c, &d, 0);
        assert_eq!((r.good().resid, r.used), (0, RESP_LEN));
        assert!(file_blocks(&f.disk, lba, n) == d, "WRITE {c:02x?}");
        assert_eq!(
            file_blocks(&f.disk, lba - 1, 1)[0],
            pattern(lba - 1),
            "neighbour"
        );
        let r = h.cmd(
            1,
            0,
            &cdb16(op::READ_16, lba, n as u32),
            &[],
            (n * 512) as u32,
        );
        assert!(r.good().data == d, "read back {c:02x?}");
    }
    // A zero-length transfer moves nothing and is GOOD.
    h.cmd(1, 0, &cdb10(op::READ_10, 0, 0), &[], 0).good();

    // A buffer larger than the data: the residual.
    let r = h.cmd(1, 0, &cdb10(op::READ_10, 40, 2), &[], 4096);
    assert_eq!((r.good().resid, r.used), (3072, RESP_LEN + 1024));
    assert!(r.data[..1024] == file_blocks(&f.disk, 40, 2));
    assert!(r.data[1024..].iter().all(|&b| b == 0xee));
    let d = data(1024, 0x77);
    let r = h.cmd(1, 0, &cdb10(op::WRITE_10, 60, 1), &d, 0);
    assert_eq!(r.good().resid, 512);
    assert!(file_blocks(&f.disk, 60, 1) == d[..512]);
    // A buffer smaller than the data: OVERRUN. Data-in fills the buffer;
    // data-out is not executed at all (the unit says INVALID FIELD).
    let r = h.cmd(1, 0, &cdb10(op::READ_10, 80, 4), &[], 1024);
    assert_eq!(
        (r.response, r.status, r.resid),
        (S_OVERRUN, GOOD, 0),
        "{r:?}"
    );
    assert!(r.data == file_blocks(&f.disk, 80, 2));
    let r = h.cmd(1, 0, &cdb10(op::READ_10, 80, 1), &[], 0);
    assert_eq!(
        (r.response, r.status),
        (S_OVERRUN, GOOD),
        "no buffer: {r:?}"
    );
    let before = file_blocks(&f.disk, 90, 4);
    let r = h.cmd(1, 0, &cdb10(op::WRITE_10, 90, 4), &data(1024, 9), 0);
    assert_eq!((r.response, r.status), (S_OVERRUN, CHECK), "{r:?}");
    assert_eq!(r.key(), INVALID_FIELD);
    assert!(file_blocks(&f.disk, 90, 4) == before, "not executed");
}

#[test]
fn errors_are_check_conditions_with_sense_and_residuals() {
    let (qt, f) = launch("vscsi-errors", "", true);
    let mut h = Hba::new(qt);
    h.clear_ua(1, 0);
    let last = BLOCKS as u32 - 1;
    // LOGICAL BLOCK ADDRESS OUT OF RANGE, for a range that ends past the
    // medium, one that starts past it, and one that overflows 64 bits.
    for c in [
        cdb10(op::READ_10, last, 2),
        cdb12(op::READ_12, last + 1, 1),
        cdb16(op::READ_16, u64::MAX, 2),
        cdb6(op::READ_6, 0x1f_ffff, 1),
    ] {
        let r = h.cmd(1, 0, &c, &[], 1024);
        assert_eq!(r.check(LBA_OUT_OF_RANGE).resid, 1024, "{c:02x?}");
        assert_eq!(r.used, RESP_LEN);
    }
    let before = std::fs::read(&f.disk).unwrap();
    for c in [
        cdb10(op::WRITE_10, last, 2),
        cdb16(op::WRITE_16, BLOCKS, 1),
        cdb10(op::VERIFY_10, last, 2),
        cdb10(op::SYNCHRONIZE_CACHE_10, BLOCKS as u32, 1),
        cdb10(op::WRITE_SAME_10, last, 2),
    ] {
        h.cmd(1, 0, &c, &[0x11; 1024], 0).check(LBA_OUT_OF_RANGE);
    }
    assert!(std::fs::read(&f.disk).unwrap() == before, "nothing written");
    // The unit keeps the sense for REQUEST SENSE.
    assert_eq!(h.request_sense(1, 0), LBA_OUT_OF_RANGE);

    // INVALID COMMAND OPERATION CODE: an opcode nobody knows, one the
    // disk does not implement (READ TOC is MMC).
    for c in [
        vec![0xff; 16],
        vec![0x37, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        vec![op::READ_TOC, 0, 0, 0, 0, 0, 0, 0, 12, 0],
    ] {
        h.cmd(1, 0, &c, &[], 64).check(INVALID_OPCODE);
    }
    // INVALID FIELD IN CDB.
    let mut rdprotect = cdb10(op::READ_10, 0, 1);
    rdprotect[1] = 0x20;
    let mut vrprotect = cdb10(op::VERIFY_10, 0, 1);
    vrprotect[1] = 0x06; // BYTCHK 11b
    let mut cap16_sa = cdb16(op::SERVICE_ACTION_IN_16, 0, 32);
    cap16_sa[1] = 0x11;
    let mut unmap_anchor = cdb10(op::UNMAP, 0, 24);
    unmap_anchor[1] = 1;
    for c in [
        rdprotect,
        vrprotect,
        cap16_sa,
        unmap_anchor,
        cdb10(op::WRITE_SAME_10, 0, 0), // WSNZ: zero blocks
        vec![op::MODE_SENSE_6, 0, 0x05, 0, 255, 0], // no such page
        vec![op::MODE_SENSE_6, 0, 0x08, 0x01, 255, 0], // no subpages
        vec![op::MODE_SELECT_6, 0x00, 0, 0, 24, 0], // PF=0
        vec![op::MODE_SELECT_6, 0x11, 0, 0, 24, 0], // SP=1
    ] {
        h.cmd(1, 0, &c, &[], 512).check(INVALID_FIELD);
    }
    // Page control "saved": SAVING PARAMETERS NOT SUPPORTED.
    h.cmd(1, 0, &[op::MODE_SENSE_6, 0, 0xc8, 0, 255, 0], &[], 255)
        .check(SAVING_NOT_SUPPORTED);
    // UNMAP with a parameter list too short for its header.
    h.cmd(1, 0, &cdb10(op::UNMAP, 0, 4), &[0; 4], 0)
        .check(PARAM_LIST_LENGTH);
    // A READ after all that still works.
    let r = h.cmd(1, 0, &cdb10(op::READ_10, 7, 1), &[], 512);
    assert!(r.good().data == file_blocks(&f.disk, 7, 1));
}

#[test]
fn verify_write_same_unmap_and_synchronize_cache() {
    let (qt, f) = launch("vscsi-ws", "", true);
    let mut h = Hba::new(qt);
    h.clear_ua(1, 0);
    // VERIFY without BYTCHK: nothing to compare, GOOD.
    h.cmd(1, 0, &cdb10(op::VERIFY_10, 0, 8), &[], 0).good();
    // BYTCHK=01b: the data-out is compared with the medium.
    let mut c = cdb10(op::VERIFY_10, 7, 2);
    c[1] = 0x02;
    h.cmd(1, 0, &c, &file_blocks(&f.disk, 7, 2), 0).good();
    let mut c = cdb16(op::VERIFY_16, 100, 3);
    c[1] = 0x02;
    let mut d = file_blocks(&f.disk, 100, 3);
    h.cmd(1, 0, &c, &d, 0).good();
    d[700] ^= 1;
    h.cmd(1, 0, &c, &d, 0).check(MISCOMPARE);

    // WRITE SAME(10): one block repeated.
    let block = data(512, 0x3c);
    h.cmd(1, 0, &cdb10(op::WRITE_SAME_10, 500, 4), &block, 0)
        .good();
    assert!(file_blocks(&f.disk, 500, 4) == block.repeat(4));
    assert_eq!(file_blocks(&f.disk, 504, 1)[0], pattern(504));
    // WRITE SAME(16) with a zero block and UNMAP: zeroes.
    let mut c = cdb16(op::WRITE_SAME_16, 600, 8);
    c[1] = 0x08;
    h.cmd(1, 0, &c, &[0; 512], 0).good();
    assert!(file_blocks(&f.disk, 600, 8).iter().all(|&b| b == 0));
    // WRITE SAME(16) with NDOB: zeroes, no data-out.
    let mut c = cdb16(op::WRITE_SAME_16, 700, 2);
    c[1] = 0x01;
    h.cmd(1, 0, &c, &[], 0).good();
    assert!(file_blocks(&f.disk, 700, 2).iter().all(|&b| b == 0));
    assert_eq!(file_blocks(&f.disk, 702, 1)[0], pattern(702));

    // UNMAP on a drive with the default discard=ignore: GOOD, and the
    // data stays (as QEMU, which drops discards the drive ignores).
    let list = unmap_list(&[(1000, 8), (2000, 1)]);
    h.cmd(1, 0, &cdb10(op::UNMAP, 0, list.len() as u16), &list, 0)
        .good();
    assert_eq!(file_blocks(&f.disk, 1000, 1)[0], pattern(1000));
    // A descriptor past the end.
    let list = unmap_list(&[(BLOCKS - 1, 2)]);
    h.cmd(1, 0, &cdb10(op::UNMAP, 0, list.len() as u16), &list, 0)
        .check(LBA_OUT_OF_RANGE);

    // SYNCHRONIZE CACHE(10) and (16); zero blocks means "to the end".
    h.cmd(1, 0, &cdb10(op::SYNCHRONIZE_CACHE_10, 0, 0), &[], 0)
        .good();
    h.cmd(1, 0, &cdb16(op::SYNCHRONIZE_CACHE_16, 100, 10), &[], 0)
        .good();
}

/// UNMAP and WRITE SAME with UNMAP on a `discard=unmap` drive punch holes
/// in the image file: the range reads as zeroes and SEEK_HOLE finds it.
#[test]
fn unmap_reaches_discard_in_the_image_file() {
    let (qt, f) = launch("vscsi-discard", ",discard=unmap", true);
    let mut h = Hba::new(qt);
    h.clear_ua(1, 0);
    // Two 64 KiB-aligned ranges: 1 MiB + 128 KiB and 2 MiB + 64 KiB.
    let list = unmap_list(&[(2048, 256), (4096, 128)]);
    h.cmd(1, 0, &cdb10(op::UNMAP, 0, list.len() as u16), &list, 0)
        .good();
    let mut c = cdb16(op::WRITE_SAME_16, 6144, 128);
    c[1] = 0x08;
    h.cmd(1, 0, &c, &[0; 512], 0).good();
    for (lba, n) in [(2048u64, 256u64), (4096, 128), (6144, 128)] {
        assert!(
            file_blocks(&f.disk, lba, n).iter().all(|&b| b == 0),
            "{lba}"
        );
        assert_eq!(file_blocks(&f.disk, lba - 1, 1)[0], pattern(lba - 1));
        assert_eq!(file_blocks(&f.disk, lba + n, 1)[0], pattern(lba + n));
        let r = h.cmd(1, 0, &cdb10(op::READ_10, lba as u32, 8), &[], 4096);
        assert!(r.good().data.iter().all(|&b| b == 0));
    }
    let file = std::fs::File::open(&f.disk).unwrap();
    let seek = |off: u64, whence: i32| {
        // SAFETY: lseek on a descriptor this function owns (through
        // `file`), with no memory passed.
        unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, whence) }
    };
    for (lba, n) in [(2048u64, 256u64), (4096, 128), (6144, 128)] {
        let (start, end) = (lba * 512, (lba + n) * 512);
        assert_eq!(
            seek(start - 512, libc::SEEK_HOLE),
            start as i64,
            "hole at {start}"
        );
        assert_eq!(
            seek(start, libc::SEEK_DATA),
            end as i64,
            "data after {start}"
        );
    }
    assert_eq!(seek(0, libc::SEEK_HOLE), 2048 * 512, "no hole before");
}

#[test]
fn mode_sense_pages_and_mode_select_switching_wce() {
    let (qt, f) = launch("vscsi-mode", "", true);
    let mut q = Qmp::negotiated(&f.qmp);
    let mut h = Hba::new(qt);
    h.clear_ua(1, 0);
    let writeback = |q: &mut Qmp| query_block(q, "d0")["inserted"]["cache"]["writeback"].clone();
    assert_eq!(writeback(&mut q), true, "writeback by default");

    // MODE SENSE(6), caching page: header, block descriptor, page.
    let r = h.cmd(1, 0, &[op::MODE_SENSE_6, 0, 0x08, 0, 255, 0], &[], 255);
    let d = &r.good().data;
    assert_eq!(
        d[..4],
        [31, 0, 0x10, 8],
        "length, medium, DPOFUA, bd length"
    );
    assert_eq!(d[4..12], [0, 0, 0x20, 0, 0, 0, 2, 0], "8192 blocks of 512");
    assert_eq!(d[12..15], [0x08, 0x12, 0x04], "caching page, WCE");
    assert_eq!(r.resid, 255 - 32);
    // MODE SENSE(10), all pages, no block descriptors: error recovery,
    // rigid disk geometry, caching, control, in that order.
    let r = h.cmd(
        1,
        0,
        &[op::MODE_SENSE_10, 0x08, 0x3f, 0, 0, 0, 0, 1, 0, 0],
        &[],
        256,
    );
    let d = &r.good().data;
    assert_eq!(d[..8], [0, 74, 0, 0x10, 0, 0, 0, 0]);
    let pages = &d[8..76];
    assert_eq!(pages[..3], [0x01, 10, 0x80], "error recovery, AWRE");
    let g = &pages[12..36];
    assert_eq!(g[..2], [0x04, 22], "rigid disk geometry");
    assert_eq!(g[2..6], [0, 0, 8, 16], "8 cylinders of 16 heads");
    assert_eq!(be16(&g[20..]), 5400, "rpm");
    assert_eq!(pages[36..39], [0x08, 0x12, 0x04], "caching");
    assert_eq!(pages[56..60], [0x0a, 10, 0, 0x10], "control");
    // LLBAA: a 16-byte block descriptor.
    let r = h.cmd(
        1,
        0,
        &[op::MODE_SENSE_10, 0x10, 0x08, 0, 0, 0, 0, 0, 255, 0],
        &[],
        255,
    );
    let d = &r.good().data;
    assert_eq!(d[4..8], [1, 0, 0, 16]);
    assert_eq!(u64::from_be_bytes(d[8..16].try_into().unwrap()), BLOCKS);
    assert_eq!(be32(&d[20..]), 512);
    // Changeable values: WCE only. Default values: WCE as at start.
    let r = h.cmd(1, 0, &[op::MODE_SENSE_6, 0x08, 0x48, 0, 255, 0], &[], 255);
    let d = &r.good().data;
    assert_eq!(d[4..7], [0x08, 0x12, 0x04]);
    assert!(d[7..24].iter().all(|&b| b == 0));

    // MODE SELECT(6) turning WCE off: the backend's write cache is off.
    let mut page = vec![0u8; 20];
    page[0] = 0x08;
    page[1] = 0x12;
    let mut list = vec![0, 0, 0, 0];
    list.extend_from_slice(&page);
    h.cmd(1, 0, &[op::MODE_SELECT_6, 0x10, 0, 0, 24, 0], &list, 0)
        .good();
    assert_eq!(writeback(&mut q), false, "MODE SELECT reached the backend");
    let r = h.cmd(1, 0, &[op::MODE_SENSE_6, 0x08, 0x08, 0, 255, 0], &[], 255);
    assert_eq!(r.good().data[6], 0, "WCE reads back off");
    let r = h.cmd(1, 0, &[op::MODE_SENSE_6, 0x08, 0x88, 0, 255, 0], &[], 255);
    assert_eq!(r.good().data[6], 0x04, "the default is still on");
    // Writes go through with the cache off.
    let d = data(512, 0x42);
    h.cmd(1, 0, &cdb10(op::WRITE_10, 9, 1), &d, 0).good();
    assert!(file_blocks(&f.disk, 9, 1) == d);

    // MODE SELECT(10) with a block descriptor, turning it back on.
    let mut list = vec![0, 0, 0, 0, 0, 0, 0, 8];
    list.extend_from_slice(&[0, 0, 0x20, 0, 0, 0, 2, 0]);
    page[2] = 0x04;
    list.extend_from_slice(&page);
    let n = list.len() as u8;
    h.cmd(
        1,
        0,
        &[op::MODE_SELECT_10, 0x10, 0, 0, 0, 0, 0, 0, n, 0],
        &list,
        0,
    )
    .good();
    assert_eq!(writeback(&mut q), true);

    // A page that changes more than WCE is refused as a whole: WCE stays.
    let mut list = vec![0, 0, 0, 0];
    let mut bad = page.clone();
    bad[2] = 0;
    bad[3] = 0xff;
    list.extend_from_slice(&bad);
    h.cmd(1, 0, &[op::MODE_SELECT_6, 0x10, 0, 0, 24, 0], &list, 0)
        .check(INVALID_PARAM);
    assert_eq!(writeback(&mut q), true, "nothing applied");
    // A page cut short, and a page the disk does not have.
    h.cmd(
        1,
        0,
        &[op::MODE_SELECT_6, 0x10, 0, 0, 14, 0],
        &list[..14],
        0,
    )
    .check(PARAM_LIST_LENGTH);
    let list = [0, 0, 0, 0, 0x05, 2, 0, 0];
    h.cmd(1, 0, &[op::MODE_SELECT_6, 0x10, 0, 0, 8, 0], &list, 0)
        .check(INVALID_PARAM);
    // Parameter list length 0: nothing to do.
    h.cmd(1, 0, &[op::MODE_SELECT_6, 0x10, 0, 0, 0, 0], &[], 0)
        .good();
}

#[test]
fn start_stop_unit_and_prevent_allow_medium_removal() {
    let (qt, _f) = launch("vscsi-startstop", "", true);
    let mut h = Hba::new(qt);
    h.clear_ua(1, 0);
    h.clear_ua(1, 3);
    // The disk: START STOP UNIT and PREVENT ALLOW are accepted.
    for c in [
        [op::START_STOP_UNIT, 0, 0, 0, 0, 0],
        [op::START_STOP_UNIT, 0, 0, 0, 1, 0],
        [op::PREVENT_ALLOW, 0, 0, 0, 1, 0],
        [op::PREVENT_ALLOW, 0, 0, 0, 0, 0],
    ] {
        h.cmd(1, 0, &c, &[], 0).good();
    }
    // The CD-ROM: a locked tray cannot be opened; unlocked, it opens
    // (no medium, tray open) and closes again.
    h.cmd(1, 3, &[op::PREVENT_ALLOW, 0, 0, 0, 1, 0], &[], 0)
        .good();
    h.cmd(1, 3, &[op::START_STOP_UNIT, 0, 0, 0, 2, 0], &[], 0)
        .check(REMOVAL_PREVENTED);
    h.cmd(1, 3, &[op::PREVENT_ALLOW, 0, 0, 0, 0, 0], &[], 0)
        .good();
    h.cmd(1, 3, &[op::START_STOP_UNIT, 0, 0, 0, 2, 0], &[], 0)
        .good();
    h.cmd(1, 3, &[op::TEST_UNIT_READY], &[], 0)
        .check(NO_MEDIUM_TRAY_OPEN);
    h.cmd(1, 3, &[op::START_STOP_UNIT, 0, 0, 0, 3, 0], &[], 0)
        .good();
    h.cmd(1, 3, &[op::TEST_UNIT_READY], &[], 0).good();
    // A power condition is not supported.
    h.cmd(1, 3, &[op::START_STOP_UNIT, 0, 0, 0, 0x10, 0], &[], 0)
        .check(INVALID_FIELD);
}

#[test]
fn scsi_cd_on_the_same_hba() {
    let (qt, f) = launch("vscsi-cd", "", true);
    let mut h = Hba::new(qt);
    let r = h.cmd(1, 3, &inquiry(false, 0, 36), &[], 36);
    let d = &r.good().data;
    assert_eq!(d[..5], [0x05, 0x80, 0x05, 0x02, 31], "CD/DVD, removable");
    assert_eq!(&d[8..28], b"QEMU    QEMU DVD-ROM");
    // A SCSI CD-ROM reports its power-on once, as a disk does.
    h.cmd(1, 3, &[op::TEST_UNIT_READY], &[], 0).check(UA_RESET);
    h.cmd(1, 3, &[op::TEST_UNIT_READY], &[], 0).good();
    let r = h.cmd(1, 3, &cdb10(op::READ_CAPACITY_10, 0, 0), &[], 8);
    assert_eq!(r.good().data, [0, 0, 0, 63, 0, 0, 8, 0]);
    // READ(10) of 2048-byte blocks.
    let r = h.cmd(1, 3, &cdb10(op::READ_10, 5, 3), &[], 3 * 2048);
    r.good();
    let iso = std::fs::read(&f.cd).unwrap();
    assert!(r.data == iso[5 * 2048..8 * 2048]);
    h.cmd(1, 3, &cdb10(op::READ_10, 63, 2), &[], 4096)
        .check(LBA_OUT_OF_RANGE);
    // READ TOC, format 0: track 1 at LBA 0, the lead-out at 64.
    let r = h.cmd(1, 3, &[op::READ_TOC, 0, 0, 0, 0, 0, 0, 0, 100, 0], &[], 100);
    assert_eq!(
        r.good().data[..20],
        [0, 18, 1, 1, 0, 0x14, 1, 0, 0, 0, 0, 0, 0, 0x16, 0xaa, 0, 0, 0, 0, 64]
    );
    assert_eq!(r.resid, 80);
    // GET CONFIGURATION: the current profile is CD-ROM; the core
    // feature says SCSI.
    let r = h.cmd(
        1,
        3,
        &[op::GET_CONFIGURATION, 0, 0, 0, 0, 0, 0, 0, 8, 0],
        &[],
        8,
    );
    assert_eq!(be16(&r.good().data[6..]), 0x0008, "CD-ROM profile");
    let r = h.cmd(
        1,
        3,
        &[op::GET_CONFIGURATION, 2, 0, 1, 0, 0, 0, 0, 64, 0],
        &[],
        64,
    );
    let d = &r.good().data;
    assert_eq!(be32(d), 16, "header and the core feature");
    assert_eq!(d[8..16], [0, 1, 0x07, 8, 0, 0, 0, 1]);
    // A write to the disc: DATA PROTECT, WRITE PROTECTED (as QEMU's
    // scsi-cd, and virtio-scsi-test's write-to-cdrom case, have it).
    h.cmd(1, 3, &cdb10(op::WRITE_10, 0, 1), &[0; 2048], 0)
        .check((7, 0x27, 0));
    // MODE SENSE(10) of the capabilities page.
    let r = h.cmd(
        1,
        3,
        &[op::MODE_SENSE_10, 0, 0x2a, 0, 0, 0, 0, 0, 64, 0],
        &[],
        64,
    );
    assert_eq!(r.good().data[8..10], [0x2a, 20]);
}

#[test]
fn empty_cd_and_medium_change_through_qmp() {
    let (qt, f) = launch("vscsi-medium", "", true);
    let mut q = Qmp::negotiated(&f.qmp);
    let mut h = Hba::new(qt);
    // The empty drive: MEDIUM NOT PRESENT for what needs a medium, and as
    // REQUEST SENSE data; INQUIRY answers.
    let r = h.cmd(2, 0, &inquiry(false, 0, 36), &[], 36);
    assert_eq!(r.good().data[0], 5);
    // Its power-on UNIT ATTENTION first.
    h.cmd(2, 0, &[op::TEST_UNIT_READY], &[], 0).check(UA_RESET);
    h.cmd(2, 0, &[op::TEST_UNIT_READY], &[], 0)
        .check(NO_MEDIUM_TRAY_CLOSED);
    h.cmd(2, 0, &cdb10(op::READ_10, 0, 1), &[], 2048)
        .check(NO_MEDIUM_TRAY_CLOSED);
    h.cmd(2, 0, &cdb10(op::READ_CAPACITY_10, 0, 0), &[], 8)
        .check(NO_MEDIUM_TRAY_CLOSED);
    assert_eq!(h.request_sense(2, 0), NO_MEDIUM_TRAY_CLOSED);

    // A medium goes in: NOT READY once (the drive spins up), then UNIT
    // ATTENTION once, then the new disc reads.
    let disc = f.dir.join("new.iso");
    image(&disc, 32, 2048, |n| 0x30 + n as u8);
    q.ok(
        "blockdev-change-medium",
        json!({"id": "empty", "filename": disc.display().to_string(), "format": "raw"}),
    );
    h.cmd(2, 0, &[op::TEST_UNIT_READY], &[], 0).check(NO_MEDIUM);
    h.cmd(2, 0, &[op::TEST_UNIT_READY], &[], 0)
        .check(UA_MEDIUM_CHANGED);
    h.cmd(2, 0, &[op::TEST_UNIT_READY], &[], 0).good();
    let r = h.cmd(2, 0, &cdb10(op::READ_10, 2, 1), &[], 2048);
    assert!(r.good().data.iter().all(|&b| b == 0x32));
    let r = h.cmd(2, 0, &cdb10(op::READ_CAPACITY_10, 0, 0), &[], 8);
    assert_eq!(be32(&r.good().data), 31);

    // eject: the tray opens; the guest sees it.
    q.ok("eject", json!({"id": "empty"}));
    h.cmd(2, 0, &[op::TEST_UNIT_READY], &[], 0)
        .check(NO_MEDIUM_TRAY_OPEN);
    // The other units on the HBA never noticed (only their own
    // power-on UNIT ATTENTION is pending).
    h.clear_ua(1, 3);
}

#[test]
fn task_management_resets_and_asynchronous_notification() {
    let (qt, _f) = launch("vscsi-tmf", "", true);
    let mut h = Hba::new(qt);
    h.clear_ua(1, 0);
    // LOGICAL UNIT RESET: FUNCTION COMPLETE (0), then UNIT ATTENTION.
    assert_eq!(h.tmf(5, 1, 0, 0), (1, S_OK));
    h.cmd(1, 0, &[op::TEST_UNIT_READY], &[], 0).check(UA_RESET);
    h.cmd(1, 0, &[op::TEST_UNIT_READY], &[], 0).good();
    // The reset also makes REQUEST SENSE report (and consume) it.
    assert_eq!(h.tmf(5, 1, 0, 0), (1, S_OK));
    assert_eq!(h.request_sense(1, 0), UA_RESET);
    h.cmd(1, 0, &[op::TEST_UNIT_READY], &[], 0).good();
    // I_T NEXUS RESET reaches every LUN of the target.
    assert_eq!(h.tmf(4, 1, 0, 0), (1, S_OK));
    h.cmd(1, 0, &[op::TEST_UNIT_READY], &[], 0).check(UA_RESET);
    // No task is running: ABORT TASK completes, QUERY TASK and QUERY
    // TASK SET find nothing (FUNCTION COMPLETE), ABORT/CLEAR TASK SET
    // complete.
    for sub in [0, 1, 3, 6, 7] {
        assert_eq!(h.tmf(sub, 1, 0, 42), (1, S_OK), "subtype {sub}");
    }
    // CLEAR ACA (no ACA is ever established) and unknown functions are
    // rejected.
    assert_eq!(h.tmf(2, 1, 0, 0), (1, S_FUNCTION_REJECTED));
    assert_eq!(h.tmf(99, 1, 0, 0), (1, S_FUNCTION_REJECTED));
    // An absent target, an absent LUN of a present one.
    assert_eq!(h.tmf(5, 9, 0, 0), (1, S_BAD_TARGET));
    assert_eq!(h.tmf(5, 1, 6, 0), (1, S_INCORRECT_LUN));

    // Asynchronous notification: none is offered, so a query reports no
    // event and a subscription subscribes to nothing (event_actual 0).
    assert_eq!(h.an(1, 1, 1 << 4), (5, 0, S_OK));
    assert_eq!(h.an(2, 1, 1 << 4 | 1 << 6), (5, 0, S_OK));
    // An unknown control request type, and a TMF cut short.
    h.qt().memwrite(CTRL_REQ, &7u32.to_le_bytes());
    let used = h.submit(CTRLQ, &[(CTRL_REQ, 4, false), (CTRL_RESP, 1, true)]);
    assert_eq!((used, h.qt().readb(CTRL_RESP)), (1, S_FAILURE));
    h.qt().memwrite(CTRL_REQ, &[0, 0, 0, 0, 5, 0, 0, 0]);
    let used = h.submit(CTRLQ, &[(CTRL_REQ, 8, false), (CTRL_RESP, 1, true)]);
    assert_eq!((used, h.qt().readb(CTRL_RESP)), (1, S_FAILURE));
    // The request queue still works.
    h.cmd(1, 0, &[op::TEST_UNIT_READY], &[], 0).good();
}

#[test]
fn event_queue_buffers_are_held() {
    let (qt, _f) = launch("vscsi-events", "", true);
    let mut h = Hba::new(qt);
    // Four event buffers (virtio_scsi_event is 16 bytes).
    for i in 0..4u64 {
        let vq = &mut h.v.vqs[EVENTQ as usize];
        let head = vq.add(&mut h.v.qt, &[(EVENTS + 16 * i, 16, true)], None);
        vq.kick(&mut h.v.qt, head, |qt, q| {
            qt.writew(NOTIFY + 4 * q as u64, q)
        });
    }
    // Commands complete meanwhile; the event buffers are not used (no
    // event happened), and the device does not spin on them.
    for _ in 0..3 {
        h.cmd(1, 0, &inquiry(false, 0, 36), &[], 36).good();
    }
    let used = h.v.vqs[EVENTQ as usize].used;
    assert_eq!(h.qt().readw(used + 2), 0, "no event buffer completed");
}

#[test]
fn malformed_chains_get_answers_and_the_device_survives() {
    let (qt, f) = launch("vscsi-malformed", "", true);
    let mut h = Hba::new(qt);
    h.clear_ua(1, 0);
    let mut req = lun_field(1, 0).to_vec();
    req.extend_from_slice(&[0; 8 + 3]);
    req.extend_from_slice(&[op::TEST_UNIT_READY; 32]);
    h.qt().memwrite(REQ, &req);
    // A request header shorter than lun, tag, attributes and CDB:
    // response FAILURE in the response header.
    h.qt().memwrite(RESP, &[0xee; RESP_LEN as usize]);
    let used = h.submit(REQQ, &[(REQ, 20, false), (RESP, RESP_LEN, true)]);
    let r = h.response(used, 0);
    assert_eq!(
        (r.used, r.response, r.status),
        (RESP_LEN, S_FAILURE, GOOD),
        "{r:?}"
    );
    // No room for the response header: used length 0, nothing written.
    h.qt().memwrite(RESP, &[0xee; RESP_LEN as usize]);
    let used = h.submit(REQQ, &[(REQ, REQ_LEN, false), (RESP, 8, true)]);
    assert_eq!(used, 0);
    assert!(h.qt().memread(RESP, 8).iter().all(|&b| b == 0xee));
    // No writable descriptor at all.
    let used = h.submit(REQQ, &[(REQ, REQ_LEN, false)]);
    assert_eq!(used, 0);
    // Data-out and data-in together need VIRTIO_SCSI_F_INOUT: FAILURE.
    h.qt().memwrite(RESP, &[0xee; RESP_LEN as usize]);
    let used = h.submit(
        REQQ,
        &[
            (REQ, REQ_LEN, false),
            (DATA_OUT, 512, false),
            (RESP, RESP_LEN, true),
            (DATA_IN, 512, true),
        ],
    );
    assert_eq!(h.response(used, 0).response, S_FAILURE);
    // A next index beyond the queue: used length 0.
    {
        let vq = &mut h.v.vqs[REQQ as usize];
        let i = vq.next_desc;
        vq.write_desc(&mut h.v.qt, vq.desc, i, REQ, REQ_LEN, F_NEXT, 999);
        vq.next_desc = (i + 1) % vq.size;
        vq.kick(&mut h.v.qt, i, |qt, q| qt.writew(NOTIFY + 4 * q as u64, q));
        let (id, len) = h.v.vqs[REQQ as usize].wait_used(&mut h.v.qt);
        assert_eq!((id, len), (i as u32, 0));
    }
    // A data-in buffer outside guest RAM (128 MiB): the chain walk
    // refuses it, so nothing can be answered: used length 0.
    let used = h.submit(
        REQQ,
        &[
            (REQ, REQ_LEN, false),
            (RESP, RESP_LEN, true),
            (0x7fff_0000_0000, 512, true),
        ],
    );
    assert_eq!(used, 0);
    // The device keeps working.
    let r = h.cmd(1, 0, &cdb10(op::READ_10, 33, 2), &[], 1024);
    assert!(r.good().data == file_blocks(&f.disk, 33, 2));
}

/// Backend errors injected by blkdebug, with the default `rerror=report`
/// and `werror=enospc`: CHECK CONDITION with the sense QEMU's
/// `scsi_sense_from_errno` chooses (ENODATA, the kernel's medium error, is
/// MEDIUM ERROR / UNRECOVERED READ ERROR; EIO is ABORTED COMMAND / I/O
/// PROCESS TERMINATED), a BLOCK_IO_ERROR event, and the VM keeps running.
#[test]
fn backend_errors_are_check_conditions() {
    let dir = support::scratch("vscsi-eio-img");
    let img = dir.join("e.raw");
    image(&img, BLOCKS, 512, pattern);
    let opts = format!(
        ",file.driver=blkdebug,file.image.driver=file,file.image.filename={},\
         file.inject-error.0.event=read_aio,file.inject-error.0.sector=100,file.inject-error.0.errno=61,\
         file.inject-error.1.event=read_aio,file.inject-error.1.sector=200,\
         file.inject-error.2.event=write_aio,file.inject-error.2.sector=300",
        img.display()
    );
    let (qt, f) = launch("vscsi-eio", &opts, false);
    let mut q = Qmp::negotiated(&f.qmp);
    let mut h = Hba::new(qt);
    h.clear_ua(1, 0);
    let r = h.cmd(1, 0, &cdb10(op::READ_10, 100, 1), &[], 512);
    r.check(READ_ERROR);
    assert_eq!(h.request_sense(1, 0), READ_ERROR, "kept for REQUEST SENSE");
    let e = q.event("BLOCK_IO_ERROR");
    assert_eq!(
        (
            e["data"]["device"].clone(),
            e["data"]["operation"].clone(),
            e["data"]["action"].clone()
        ),
        (json!("d0"), json!("read"), json!("report"))
    );
    h.cmd(1, 0, &cdb10(op::READ_10, 200, 1), &[], 512)
        .check(IO_PROCESS_TERMINATED);
    h.cmd(1, 0, &cdb10(op::WRITE_10, 300, 1), &[0x55; 512], 0)
        .check(IO_PROCESS_TERMINATED);
    assert_eq!(q.ok("query-status", json!({}))["status"], "running");
    // Other blocks are fine.
    let r = h.cmd(1, 0, &cdb10(op::READ_10, 101, 1), &[], 512);
    assert!(r.good().data == file_blocks(&img, 101, 1));
}
