//! The `iscsi` protocol driver: a native iSCSI initiator (RFC 7143) for
//! one LUN of a target. RFC 7143 §3 (the session model) and §4.3 (SCSI
//! commands over iSCSI); SCSI commands per SBC-4/SPC-5: TEST UNIT READY,
//! INQUIRY (standard data, VPD pages 0x00, 0xB0 "Block Limits" and 0xB2
//! "Logical Block Provisioning"), READ CAPACITY(16) with a READ
//! CAPACITY(10) fallback, MODE SENSE(6) for write protection, READ(16),
//! WRITE(16) with FUA, SYNCHRONIZE CACHE(10), UNMAP and WRITE SAME(16).
//!
//! The wire format is in [`pdu`], the login in [`login`], the command
//! window, reader/writer threads and reconnection in [`session`], file
//! names in [`uri`]. Options follow QEMU's `BlockdevOptionsIscsi`.
//!
//! Requests aligned to the LUN's block size go straight to the session
//! (asynchronously: many in flight on the one connection); unaligned ones
//! are read-modify-written on the worker pool, as a protocol below a
//! format must accept any byte range.

pub mod login;
pub mod pdu;
pub mod session;
pub mod uri;

use crate::driver::{BlockDriver, Completion, IoOp, IoRequest, Limits};
use crate::error::{BlockError, BlockResult};
use crate::graph::OpenCtx;
use crate::iov::IoVecs;
use session::{Command, Dir, Session, SessionConfig};
use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// QEMU's default initiator name (`iscsi.c`'s `get_initiator_name`).
pub const DEFAULT_INITIATOR: &str = "iqn.2008-11.org.linux-kvm";

/// The largest request sent as one command (bytes); bigger ones are split.
const MAX_XFER: u64 = 8 << 20;

/// An `iscsi` node.
pub struct IscsiNode {
    s: Arc<Session>,
    block: u64,
    blocks: u64,
    /// UNMAP works (VPD 0xB2 LBPU).
    lbpu: bool,
    /// WRITE SAME with UNMAP deallocates (LBPWS), and unmapped blocks
    /// read as zeroes (LBPRZ).
    ws_unmap: bool,
    max_xfer: u64,
    max_unmap: u64,
    max_ws: u64,
    /// WRITE SAME(16) was refused once: write zeroes by writing.
    ws_broken: AtomicBool,
    /// Serialises read-modify-write of partial blocks.
    rmw: Mutex<()>,
    name: String,
}

impl std::fmt::Debug for IscsiNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IscsiNode({})", self.name)
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map(|x| u32::from_be_bytes([x[0], x[1], x[2], x[3]]))
        .unwrap_or(0)
}

fn be64(b: &[u8], at: usize) -> u64 {
    ((be32(b, at) as u64) << 32) | be32(b, at + 4) as u64
}

/// A READ(16) or WRITE(16) CDB (SBC-4 §5.16, §5.40).
fn rw16(op: u8, fua: bool, lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = op;
    if fua {
        c[1] = 0x08;
    }
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

const READ_16: u8 = 0x88;
const WRITE_16: u8 = 0x8a;
const SYNC_CACHE_10: u8 = 0x35;

/// A random ISID of the "random" type (RFC 7143 §11.12.5: T=0b10), so
/// that two initiators with the default name still get two sessions; a
/// reconnection keeps it, which reinstates the session (§6.3.5).
fn random_isid() -> [u8; 6] {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    let r = h.finish().to_be_bytes();
    [0x80, r[0], r[1], r[2], r[3], r[4]]
}

impl IscsiNode {
    fn run(&self, cdb: &[u8], dir: Dir, buf: Vec<u8>) -> BlockResult<Vec<u8>> {
        let b = self.s.run(Command::new(cdb, dir, IoVecs::from_vec(buf)))?;
        Ok(b.into_vec().unwrap_or_default())
    }

    fn inquiry_vpd(&self, page: u8) -> BlockResult<Vec<u8>> {
        self.run(&[0x12, 0x01, page, 0x01, 0x00, 0], Dir::Read, vec![0; 256])
    }

    /// Open from `-blockdev driver=iscsi` options.
    pub fn open(ctx: &mut OpenCtx<'_>) -> BlockResult<Arc<dyn BlockDriver>> {
        let cfg = parse_options(ctx)?;
        let name = format!(
            "iscsi://{}/{}/{}",
            if cfg.host.contains(':') {
                format!("[{}]:{}", cfg.host, cfg.port)
            } else {
                format!("{}:{}", cfg.host, cfg.port)
            },
            cfg.login.target,
            cfg.lun
        );
        let lun = cfg.lun;
        let s = Session::open(cfg)?;
        let mut n = IscsiNode {
            s,
            block: 512,
            blocks: 0,
            lbpu: false,
            ws_unmap: false,
            max_xfer: MAX_XFER,
            max_unmap: 0,
            max_ws: 0,
            ws_broken: AtomicBool::new(false),
            rmw: Mutex::new(()),
            name,
        };
        let wp = n.probe(lun).map_err(|e| match e {
            BlockError::Io { .. } => BlockError::Open(format!("{}: {e}", n.name)),
            e => e,
        })?;
        n.s.enable_retry();
        if wp && !ctx.common.read_only {
            if ctx.common.auto_read_only {
                ctx.common.read_only = true;
            } else {
                return Err(BlockError::Open(format!(
                    "{}: the LUN is write-protected",
                    n.name
                )));
            }
        }
        Ok(Arc::new(n))
    }

    /// Ask the LUN what it is; true if it is write-protected.
    fn probe(&mut self, lun: u16) -> BlockResult<bool> {
        // TEST UNIT READY: UNIT ATTENTIONs (power on, reset) are retried
        // by the session.
        self.run(&[0; 6], Dir::None, Vec::new())?;
        let inq = self.run(&[0x12, 0, 0, 0, 96, 0], Dir::Read, vec![0; 96])?;
        let ty = inq.first().copied().unwrap_or(0x7f);
        if ty >> 5 != 0 || ty & 0x1f != 0 {
            return Err(BlockError::Open(format!(
                "{}: LUN {lun} is not a disk (peripheral type {:#04x})",
                self.name,
                ty & 0x1f
            )));
        }
        // READ CAPACITY(16) (SBC-4 §5.20), else (10).
        let mut c16 = [0u8; 16];
        c16[0] = 0x9e;
        c16[1] = 0x10;
        c16[13] = 32;
        let mut lbpme = false;
        let mut lbprz = false;
        match self.run(&c16, Dir::Read, vec![0; 32]) {
            Ok(r) => {
                self.blocks = be64(&r, 0).wrapping_add(1);
                self.block = be32(&r, 8) as u64;
                lbpme = r.get(14).is_some_and(|b| b & 0x80 != 0);
                lbprz = r.get(14).is_some_and(|b| b & 0x40 != 0);
            }
            Err(_) => {
                let r = self.run(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], Dir::Read, vec![0; 8])?;
                self.blocks = be32(&r, 0) as u64 + 1;
                self.block = be32(&r, 4) as u64;
            }
        }
        if !(512..=65536).contains(&self.block) || !self.block.is_power_of_two() {
            return Err(BlockError::Open(format!(
                "{}: unsupported block size {}",
                self.name, self.block
            )));
        }
        if self.blocks.checked_mul(self.block).is_none() {
            return Err(BlockError::Open(format!(
                "{}: capacity too large",
                self.name
            )));
        }
        // Supported VPD pages; Block Limits and provisioning.
        let pages = self.inquiry_vpd(0x00).unwrap_or_default();
        let n = (be32(
            &[
                0,
                0,
                *pages.get(2).unwrap_or(&0),
                *pages.get(3).unwrap_or(&0),
            ],
            0,
        ) as usize)
            .min(pages.len().saturating_sub(4));
        let has = |p: u8| pages.get(4..4 + n).is_some_and(|l| l.contains(&p));
        if has(0xb0) {
            if let Ok(b0) = self.inquiry_vpd(0xb0) {
                let mx = be32(&b0, 8) as u64;
                if mx > 0 {
                    self.max_xfer = (mx * self.block).clamp(self.block, MAX_XFER);
                }
                self.max_unmap = be32(&b0, 20) as u64;
                self.max_ws = be64(&b0, 36);
            }
        }
        if lbpme && has(0xb2) {
            if let Ok(b2) = self.inquiry_vpd(0xb2) {
                let f = b2.get(5).copied().unwrap_or(0);
                self.lbpu = f & 0x80 != 0;
                self.ws_unmap = f & 0x40 != 0 && lbprz;
            }
        }
        // MODE SENSE(6), all pages: the WP bit of the header.
        let wp = self
            .run(&[0x1a, 0x08, 0x3f, 0, 252, 0], Dir::Read, vec![0; 252])
            .map(|m| m.get(2).is_some_and(|b| b & 0x80 != 0))
            .unwrap_or(false);
        Ok(wp)
    }

    fn aligned(&self, offset: u64, len: u64) -> bool {
        offset.is_multiple_of(self.block) && len.is_multiple_of(self.block)
    }

    /// Read whole blocks at an aligned offset.
    fn read_blocks(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        let mut pos = 0usize;
        while pos < buf.len() {
            let n = (buf.len() - pos).min(self.max_xfer as usize);
            let cdb = rw16(
                READ_16,
                false,
                (offset + pos as u64) / self.block,
                (n as u64 / self.block) as u32,
            );
            let r = self.run(&cdb, Dir::Read, vec![0; n])?;
            buf[pos..pos + n].copy_from_slice(&r);
            pos += n;
        }
        Ok(())
    }

    fn write_blocks(&self, offset: u64, buf: &[u8], fua: bool) -> BlockResult<()> {
        let mut pos = 0usize;
        while pos < buf.len() {
            let n = (buf.len() - pos).min(self.max_xfer as usize);
            let cdb = rw16(
                WRITE_16,
                fua,
                (offset + pos as u64) / self.block,
                (n as u64 / self.block) as u32,
            );
            self.run(&cdb, Dir::Write, buf[pos..pos + n].to_vec())?;
            pos += n;
        }
        Ok(())
    }

    /// The blocks covering `[offset, offset+len)`.
    fn cover(&self, offset: u64, len: u64) -> (u64, u64) {
        let a = offset / self.block * self.block;
        let e = (offset + len).div_ceil(self.block) * self.block;
        (a, e - a)
    }

    fn write_zeroes_same(&self, offset: u64, len: u64, unmap: bool) -> BlockResult<()> {
        let max = if self.max_ws > 0 {
            self.max_ws.min(u32::MAX as u64)
        } else {
            // No limit given: keep each command to a size that cannot
            // run into a target's command timeout.
            (1u64 << 30) / self.block
        };
        let mut lba = offset / self.block;
        let mut left = len / self.block;
        while left > 0 {
            let n = left.min(max);
            let mut c = [0u8; 16];
            c[0] = 0x93;
            if unmap {
                c[1] = 0x08;
            }
            c[2..10].copy_from_slice(&lba.to_be_bytes());
            c[10..14].copy_from_slice(&(n as u32).to_be_bytes());
            self.run(&c, Dir::Write, vec![0; self.block as usize])?;
            lba += n;
            left -= n;
        }
        Ok(())
    }
}

impl Drop for IscsiNode {
    fn drop(&mut self) {
        self.s.close();
    }
}

impl BlockDriver for IscsiNode {
    /// A protocol on shared storage: no format metadata.
    fn migration_blocker(&self, _node: &str) -> Option<String> {
        None
    }
    fn driver_name(&self) -> &'static str {
        "iscsi"
    }
    fn len(&self) -> u64 {
        self.blocks * self.block
    }
    fn limits(&self) -> Limits {
        Limits {
            request_alignment: self.block,
            mem_alignment: 1,
        }
    }
    fn read_vectored(&self, offset: u64, iov: &mut [IoSliceMut<'_>]) -> BlockResult<()> {
        let len = crate::iov::total_len_mut(iov) as u64;
        crate::driver::check_range(&self.name, offset, len, self.len())?;
        let (a, n) = self.cover(offset, len);
        let mut buf = vec![0u8; n as usize];
        self.read_blocks(a, &mut buf)?;
        let at = (offset - a) as usize;
        crate::iov::scatter(&buf[at..at + len as usize], iov);
        Ok(())
    }
    fn write_vectored(&self, offset: u64, iov: &[IoSlice<'_>], fua: bool) -> BlockResult<()> {
        let len = crate::iov::total_len(iov) as u64;
        crate::driver::check_range(&self.name, offset, len, self.len())?;
        if self.aligned(offset, len) {
            let mut buf = vec![0u8; len as usize];
            crate::iov::gather(iov, &mut buf);
            return self.write_blocks(offset, &buf, fua);
        }
        let _g = self.rmw.lock().unwrap_or_else(|e| e.into_inner());
        let (a, n) = self.cover(offset, len);
        let mut buf = vec![0u8; n as usize];
        self.read_blocks(a, &mut buf)?;
        let at = (offset - a) as usize;
        crate::iov::gather(iov, &mut buf[at..at + len as usize]);
        self.write_blocks(a, &buf, fua)
    }
    fn flush(&self) -> BlockResult<()> {
        self.run(
            &[SYNC_CACHE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            Dir::None,
            Vec::new(),
        )
        .map(|_| ())
    }
    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        crate::driver::check_range(&self.name, offset, len, self.len())?;
        if !self.lbpu {
            return Ok(());
        }
        // Advisory: only the whole blocks inside the range.
        let first = offset.div_ceil(self.block);
        let end = (offset + len) / self.block;
        let max = if self.max_unmap > 0 {
            self.max_unmap
        } else {
            u32::MAX as u64
        };
        let mut lba = first;
        while lba < end {
            let n = (end - lba).min(max);
            // SBC-4 §5.30: an 8-byte header and one 16-byte descriptor.
            let mut p = vec![0u8; 24];
            p[0..2].copy_from_slice(&22u16.to_be_bytes());
            p[2..4].copy_from_slice(&16u16.to_be_bytes());
            p[8..16].copy_from_slice(&lba.to_be_bytes());
            p[16..20].copy_from_slice(&(n as u32).to_be_bytes());
            self.run(&[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], Dir::Write, p)?;
            lba += n;
        }
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, fua: bool) -> BlockResult<()> {
        crate::driver::check_range(&self.name, offset, len, self.len())?;
        if self.aligned(offset, len) && !fua && !self.ws_broken.load(Ordering::Relaxed) {
            match self.write_zeroes_same(offset, len, may_unmap && self.ws_unmap) {
                Ok(()) => return Ok(()),
                Err(e) if matches!(e.errno(), libc::EINVAL | libc::ENOTSUP) => {
                    // WRITE SAME is optional (SBC-4): fall back for good.
                    self.ws_broken.store(true, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
        crate::driver::write_zeroes_by_writing(self, offset, len, fua)
    }
    fn submit(self: Arc<Self>, req: IoRequest, done: Completion) {
        let len = req.byte_len();
        let direct = match req.op {
            IoOp::Read | IoOp::Write => {
                len > 0 && len <= self.max_xfer && self.aligned(req.offset, len)
            }
            IoOp::Flush => true,
            _ => false,
        };
        if !direct {
            return crate::driver::run_on_pool(self, req, done);
        }
        if let Err(e) = crate::driver::check_range(&self.name, req.offset, len, self.len()) {
            return done(req, Err(e));
        }
        let mut req = req;
        let iov = std::mem::replace(&mut req.iov, IoVecs::empty());
        let lba = req.offset / self.block;
        let blocks = (len / self.block) as u32;
        let cmd = match req.op {
            IoOp::Read => Command::new(&rw16(READ_16, false, lba, blocks), Dir::Read, iov),
            IoOp::Write => Command::new(&rw16(WRITE_16, req.fua, lba, blocks), Dir::Write, iov),
            _ => Command::new(&[SYNC_CACHE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], Dir::None, iov),
        };
        self.s.submit(
            cmd,
            Box::new(move |iov, r| {
                req.iov = iov;
                done(req, r)
            }),
            false,
        );
    }
    fn filename(&self) -> Option<String> {
        Some(self.name.clone())
    }
}

/// "Create" an image on the LUN of `filename` (an `iscsi://` URI):
/// the LUN must hold `size` bytes (QEMU's `iscsi_co_create_opts`).
pub fn create(filename: &str, size: u64) -> BlockResult<()> {
    let g = crate::graph::BlockGraph::new();
    let m = crate::filename::parse(filename)?
        .ok_or_else(|| BlockError::Open(format!("{filename}: not an iSCSI URI")))?;
    let n = g
        .open_options(crate::keyval::Options::new("file", m), None, false)
        .map_err(|e| BlockError::Open(format!("{filename}: Could not create image: {e}")))?;
    if n.len() < size {
        return Err(BlockError::Open(format!(
            "{filename}: Could not create image: the LUN holds {} bytes, less than the {size} asked for",
            n.len()
        )));
    }
    Ok(())
}

/// `-blockdev driver=iscsi` options (QEMU's `BlockdevOptionsIscsi`:
/// `transport`, `portal`, `target`, `lun`, `user`, `password-secret`,
/// `initiator-name`, `header-digest`, `timeout`; `password` is what an
/// `iscsi://` file name's password becomes, as in QEMU).
fn parse_options(ctx: &mut OpenCtx<'_>) -> BlockResult<SessionConfig> {
    let transport = ctx.opts.take_enum("transport", &["tcp", "iser"])?;
    match transport.as_deref() {
        Some("tcp") => {}
        Some(_) => {
            return Err(BlockError::Open(
                "iscsi: transport=iser is not supported (use transport=tcp)".into(),
            ))
        }
        None => {
            return Err(BlockError::Open(
                "iscsi: the option 'transport' is required".into(),
            ))
        }
    }
    let portal = ctx
        .opts
        .take_str("portal")?
        .ok_or_else(|| BlockError::Open("iscsi: the option 'portal' is required".into()))?;
    let (host, port) =
        uri::split_portal(&portal).map_err(|e| BlockError::Open(format!("iscsi: {e}")))?;
    let target = ctx
        .opts
        .take_str("target")?
        .filter(|t| !t.is_empty())
        .ok_or_else(|| BlockError::Open("iscsi: the option 'target' is required".into()))?;
    let lun = match ctx.opts.take_u64("lun")? {
        None => 0,
        Some(l) if l < 16384 => l as u16,
        Some(l) => {
            return Err(BlockError::Open(format!(
                "iscsi: lun={l}: LUNs go up to 16383"
            )))
        }
    };
    let user = ctx.opts.take_str("user")?.filter(|u| !u.is_empty());
    let password = ctx.opts.take_str("password")?;
    let secret = ctx.opts.take_str("password-secret")?;
    let password: Option<Vec<u8>> = match (password, secret) {
        (Some(_), Some(_)) => {
            return Err(BlockError::Open(
                "iscsi: 'password' and 'password-secret' are mutually exclusive".into(),
            ))
        }
        (Some(p), None) => Some(p.into_bytes()),
        (None, Some(id)) => Some(
            crate::objects::secret(&id)
                .map_err(|e| BlockError::Open(format!("iscsi: password-secret={id}: {e}")))?
                .to_vec(),
        ),
        (None, None) => None,
    };
    if user.is_some() && password.is_none() {
        return Err(BlockError::Open(
            "iscsi: CHAP username specified but no password was given (password-secret=)".into(),
        ));
    }
    let initiator = ctx
        .opts
        .take_str("initiator-name")?
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_INITIATOR.to_string());
    let hd = ctx
        .opts
        .take_enum(
            "header-digest",
            &["crc32c", "none", "crc32c-none", "none-crc32c"],
        )?
        .unwrap_or_else(|| "none-crc32c".into());
    let header_digest = match hd.as_str() {
        "crc32c" => "CRC32C",
        "none" => "None",
        "crc32c-none" => "CRC32C,None",
        _ => "None,CRC32C",
    }
    .to_string();
    let timeout = ctx.opts.take_u64("timeout")?.unwrap_or(0);
    // Not QEMU's (it pings every 5 s): for tests of a silent target.
    let nop_interval =
        Duration::from_millis(ctx.opts.take_u64("x-nop-interval-ms")?.unwrap_or(5000));
    ctx.describe("portal", portal.clone());
    ctx.describe("target", target.clone());
    ctx.describe("lun", lun.to_string());
    Ok(SessionConfig {
        login: login::LoginConfig {
            initiator,
            target,
            user,
            password: password.unwrap_or_default(),
            header_digest,
            isid: random_isid(),
        },
        host,
        port,
        lun,
        timeout: (timeout > 0).then(|| Duration::from_secs(timeout)),
        connect_timeout: Duration::from_secs(10),
        nop_interval,
    })
}
