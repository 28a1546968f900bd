//! A direct-access block device (SBC-3), with the semantics of QEMU's
//! scsi-hd, shared by every SCSI transport.
//!
//! Commands and the sections they follow:
//! - SPC-4: INQUIRY (6.4; standard data 6.4.2, VPD pages 7.8: supported
//!   pages 7.8.13, unit serial number 7.8.15, device identification
//!   7.8.6), TEST UNIT READY (6.33), REQUEST SENSE (6.27), MODE SENSE(6)/
//!   (10) and MODE SELECT(6)/(10) (6.9-6.12; parameter lists 7.5: header
//!   7.5.4, block descriptors 7.5.5, control page 7.5.8); sense handling
//!   (5.12) and UNIT ATTENTION (5.14). REPORT LUNS is answered by the
//!   target ([`super::target`]).
//! - SBC-3: READ CAPACITY(10)/(16) (5.15/5.16), READ(6)/(10)/(12)/(16)
//!   (5.7-5.10), WRITE(6)/(10)/(12)/(16) (5.32-5.35), VERIFY(10)/(16)
//!   (5.27/5.29), WRITE SAME(10)/(16) (5.41/5.42), UNMAP (5.28, parameter
//!   list 5.28.2), SYNCHRONIZE CACHE(10)/(16) (5.22/5.23), START STOP UNIT
//!   (5.25), PREVENT ALLOW MEDIUM REMOVAL (5.5); VPD pages block limits
//!   (6.5.3), block device characteristics (6.5.2), logical block
//!   provisioning (6.5.4); mode pages read-write error recovery (6.4.9) and
//!   caching (6.4.5), plus the rigid disk geometry page of SBC-2 that
//!   guests still read.
//!
//! The disk's write cache is the backend's: the caching page's WCE bit
//! reads [`BlockBackend::write_cache_enabled`] and MODE SELECT flips it
//! with [`BlockBackend::set_write_cache`]. Every LBA range is checked with
//! checked arithmetic against the capacity, which is read from the backend
//! on each command (it follows a resize). A read-only backend refuses
//! writes with DATA PROTECT, WRITE PROTECTED.

use std::sync::{Arc, Mutex, MutexGuard};

use block::backend::BlockBackend;

use super::cdb::{Command, PageControl};
use super::lun::{data_in, pad, IoFailure, Lun, Plan, SenseKeeper};
#[cfg(test)]
use super::request::{Status, VecPath};
use super::sense::Sense;

/// The most UNMAP block descriptors one command may carry (block limits
/// VPD page).
pub const MAX_UNMAP_DESCRIPTORS: u32 = 255;
/// The most bytes one UNMAP block descriptor may cover (QEMU's default
/// `max_unmap_size`).
pub const MAX_UNMAP_BYTES: u64 = 1 << 30;
/// The most bytes one WRITE SAME may cover.
pub const MAX_WRITE_SAME_BYTES: u64 = 1 << 30;

/// Mode pages this disk has, in MODE SENSE "all pages" order.
const MODE_PAGES: [u8; 4] = [0x01, 0x04, 0x08, 0x0a];
const PAGE_CACHING: u8 = 0x08;
/// WCE in byte 2 of the caching page.
const CACHING_WCE: u8 = 0x04;

/// How a disk describes itself (the scsi-hd properties).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskOptions {
    /// Unit serial number (VPD page 80h, at most 36 characters); without
    /// one the page is absent, as on QEMU.
    pub serial: Option<String>,
    /// T10 vendor identification (8 characters at most).
    pub vendor: String,
    /// Product identification (16 characters at most).
    pub product: String,
    /// Product revision level (4 characters at most).
    pub version: String,
    /// World wide name: an NAA designator in VPD page 83h.
    pub wwn: Option<u64>,
    /// 512 or 4096.
    pub logical_block_size: u32,
    /// A power of two, at least the logical block size.
    pub physical_block_size: u32,
    /// RMB in INQUIRY.
    pub removable: bool,
    /// Medium rotation rate in VPD page B1h (0: not reported, 1: solid
    /// state, else revolutions per minute).
    pub rotation_rate: u16,
    /// CmdQue in INQUIRY: set by transports that queue commands
    /// (virtio-scsi, LSI, UAS), clear for USB BOT.
    pub command_queuing: bool,
}

impl Default for DiskOptions {
    fn default() -> Self {
        DiskOptions {
            serial: None,
            vendor: "QEMU".into(),
            product: "QEMU HARDDISK".into(),
            version: "2.5+".into(),
            wwn: None,
            logical_block_size: 512,
            physical_block_size: 512,
            removable: false,
            rotation_rate: 0,
            command_queuing: false,
        }
    }
}

impl DiskOptions {
    fn check(&self) -> Result<(), String> {
        let ascii = |name: &str, s: &str, max: usize| {
            if s.len() > max || !s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                Err(format!(
                    "{name} '{s}' must be at most {max} printable ASCII characters"
                ))
            } else {
                Ok(())
            }
        };
        ascii("vendor", &self.vendor, 8)?;
        ascii("product", &self.product, 16)?;
        ascii("version", &self.version, 4)?;
        if let Some(s) = &self.serial {
            ascii("serial", s, 36)?;
        }
        let (l, p) = (self.logical_block_size, self.physical_block_size);
        if l != 512 && l != 4096 {
            return Err(format!("logical_block_size={l} must be 512 or 4096"));
        }
        if !p.is_power_of_two() || p < l || p > 1 << 15 {
            return Err(format!(
                "physical_block_size={p} must be a power of two between logical_block_size and 32768"
            ));
        }
        Ok(())
    }
}

struct State {
    sense: SenseKeeper,
    /// PREVENT ALLOW MEDIUM REMOVAL (only recorded).
    locked: bool,
}

/// A direct-access logical unit over a [`BlockBackend`].
pub struct Disk {
    backend: Arc<BlockBackend>,
    opts: DiskOptions,
    /// log2(physical / logical block size).
    phys_exp: u8,
    /// The write cache state at creation: the default value of WCE.
    default_wce: bool,
    state: Mutex<State>,
}

impl Disk {
    /// A disk on `backend`. It starts with a POWER ON UNIT ATTENTION, as
    /// after any reset.
    pub fn new(backend: Arc<BlockBackend>, opts: DiskOptions) -> Result<Disk, String> {
        opts.check()?;
        let mut sense = SenseKeeper::default();
        sense.set_unit_attention(Sense::POWER_ON_RESET);
        Ok(Disk {
            phys_exp: (opts.physical_block_size / opts.logical_block_size).trailing_zeros() as u8,
            default_wce: backend.write_cache_enabled(),
            backend,
            opts,
            state: Mutex::new(State {
                sense,
                locked: false,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn options(&self) -> &DiskOptions {
        &self.opts
    }

    /// The logical block size in bytes.
    pub fn block_size(&self) -> u64 {
        self.opts.logical_block_size as u64
    }

    /// The capacity in logical blocks.
    pub fn capacity(&self) -> u64 {
        self.backend.len() / self.block_size()
    }

    /// True after PREVENT ALLOW MEDIUM REMOVAL with PREVENT set.
    pub fn locked(&self) -> bool {
        self.lock().locked
    }

    /// The byte range of `blocks` blocks at `lba`, if it lies on the medium
    /// (LOGICAL BLOCK ADDRESS OUT OF RANGE otherwise, overflow included).
    fn range(&self, lba: u64, blocks: u64) -> Result<(u64, u64), Sense> {
        let end = lba.checked_add(blocks).ok_or(Sense::LBA_OUT_OF_RANGE)?;
        if end > self.capacity() {
            return Err(Sense::LBA_OUT_OF_RANGE);
        }
        // lba <= capacity <= len / block size: no overflow.
        Ok((lba * self.block_size(), blocks * self.block_size()))
    }

    fn writable(&self) -> Result<(), Sense> {
        if self.backend.is_read_only() {
            Err(Sense::WRITE_PROTECTED)
        } else {
            Ok(())
        }
    }

    /// Commands a disk implements (REPORT LUNS is the target's).
    fn implements(cmd: &Command) -> bool {
        !matches!(
            cmd,
            Command::ReportLuns { .. }
                | Command::ReadToc { .. }
                | Command::GetConfiguration { .. }
                | Command::GetEventStatus { .. }
                | Command::ReadDiscInfo { .. }
                | Command::MechanismStatus { .. }
                | Command::SetCdSpeed
                | Command::ReadCd { .. }
        )
    }

    fn run(&self, st: &mut State, cmd: Command) -> Result<Plan, Sense> {
        Ok(match cmd {
            Command::TestUnitReady | Command::StartStopUnit { .. } => Plan::Good,
            Command::RequestSense { alloc } => {
                data_in(st.sense.request_sense(None).fixed().to_vec(), alloc as u32)
            }
            Command::Inquiry { vpd_page, alloc } => {
                let v = match vpd_page {
                    None => self.inquiry(),
                    Some(page) => self.vpd(page).ok_or(Sense::INVALID_FIELD)?,
                };
                data_in(v, alloc as u32)
            }
            Command::ModeSense {
                page,
                subpage,
                pc,
                alloc,
                six,
                dbd,
                llbaa,
            } => {
                if pc == PageControl::Saved {
                    return Err(Sense::SAVING_NOT_SUPPORTED);
                }
                if subpage != 0 && subpage != 0xff {
                    return Err(Sense::INVALID_FIELD);
                }
                let pages = if page == 0x3f {
                    MODE_PAGES
                        .iter()
                        .flat_map(|&p| self.mode_page(p, pc).unwrap_or_default())
                        .collect()
                } else {
                    self.mode_page(page, pc).ok_or(Sense::INVALID_FIELD)?
                };
                data_in(self.mode_data(pages, six, dbd, llbaa), alloc as u32)
            }
            Command::ModeSelect { param_len, .. } => {
                if param_len == 0 {
                    Plan::Good
                } else {
                    Plan::DataOut {
                        len: param_len as u32,
                        cmd,
                    }
                }
            }
            Command::PreventAllow { prevent } => {
                st.locked = prevent;
                Plan::Good
            }
            Command::ReadCapacity10 => {
                super::lun::read_capacity_10(self.capacity(), self.opts.logical_block_size)
            }
            Command::ReadCapacity16 { alloc } => data_in(self.read_capacity_16(), alloc),
            Command::Read { lba, blocks, .. } => {
                let (offset, len) = self.range(lba, blocks as u64)?;
                if len == 0 {
                    Plan::Good
                } else {
                    Plan::Read { offset, len }
                }
            }
            Command::Write { lba, blocks, fua } => {
                self.writable()?;
                let (offset, len) = self.range(lba, blocks as u64)?;
                if len == 0 {
                    Plan::Good
                } else {
                    Plan::Write { offset, len, fua }
                }
            }
            Command::Verify {
                lba,
                blocks,
                bytchk,
            } => {
                // Without BYTCHK the medium is as good as the host's: there
                // is nothing more to verify.
                let (offset, len) = self.range(lba, blocks as u64)?;
                if len == 0 || !bytchk {
                    Plan::Good
                } else {
                    Plan::Compare { offset, len }
                }
            }
            Command::WriteSame {
                lba,
                blocks,
                unmap,
                ndob,
            } => {
                self.writable()?;
                // WSNZ is set in the block limits page: zero blocks is an
                // error rather than "to the end of the medium".
                if blocks == 0 || blocks as u64 * self.block_size() > MAX_WRITE_SAME_BYTES {
                    return Err(Sense::INVALID_FIELD);
                }
                let (offset, len) = self.range(lba, blocks as u64)?;
                if ndob {
                    Plan::WriteZeroes { offset, len, unmap }
                } else {
                    Plan::WriteSame {
                        offset,
                        len,
                        block: self.opts.logical_block_size,
                        unmap,
                    }
                }
            }
            Command::Unmap { param_len } => {
                self.writable()?;
                match param_len {
                    0 => Plan::Good,
                    1..=7 => return Err(Sense::PARAM_LIST_LENGTH),
                    _ => Plan::DataOut {
                        len: param_len as u32,
                        cmd,
                    },
                }
            }
            Command::SynchronizeCache { lba, blocks } => {
                // Zero blocks: from `lba` to the end of the medium.
                self.range(lba, blocks as u64)?;
                Plan::Flush
            }
            Command::Seek { lba } => {
                self.range(lba as u64, 1)?;
                Plan::Good
            }
            Command::ReportLuns { .. }
            | Command::ReadToc { .. }
            | Command::GetConfiguration { .. }
            | Command::GetEventStatus { .. }
            | Command::ReadDiscInfo { .. }
            | Command::MechanismStatus { .. }
            | Command::SetCdSpeed
            | Command::ReadCd { .. } => return Err(Sense::INVALID_OPCODE),
        })
    }

    /// Standard INQUIRY data (SPC-4 6.4.2): peripheral device type 00h,
    /// SPC-3, response data format 2 with HiSup.
    fn inquiry(&self) -> Vec<u8> {
        let mut v = vec![0u8; 36];
        v[1] = if self.opts.removable { 0x80 } else { 0 };
        v[2] = 0x05;
        v[3] = 0x12;
        v[4] = 31; // additional length
        v[7] = 0x10 | if self.opts.command_queuing { 0x02 } else { 0 };
        pad(&mut v[8..16], &self.opts.vendor);
        pad(&mut v[16..32], &self.opts.product);
        pad(&mut v[32..36], &self.opts.version);
        v
    }

    /// The device identification string: the serial, else the backend's
    /// name (as QEMU's scsi-hd uses the drive id).
    fn device_id(&self) -> Option<&str> {
        self.opts
            .serial
            .as_deref()
            .or(Some(self.backend.id()))
            .filter(|s| !s.is_empty())
    }

    /// A VPD page, or `None` for one this disk does not have.
    fn vpd(&self, page: u8) -> Option<Vec<u8>> {
        let bs = self.block_size();
        // Byte offsets below are those of the whole page, header included.
        let mut v = vec![0x00, page, 0, 0];
        match page {
            0x00 => {
                v.push(0x00);
                if self.opts.serial.is_some() {
                    v.push(0x80);
                }
                v.extend_from_slice(&[0x83, 0xb0, 0xb1, 0xb2]);
            }
            0x80 => v.extend_from_slice(self.opts.serial.as_ref()?.as_bytes()),
            0x83 => {
                if let Some(id) = self.device_id() {
                    // Vendor-specific designator, ASCII, logical unit.
                    let id = &id.as_bytes()[..id.len().min(255 - 8)];
                    v.extend_from_slice(&[0x02, 0x00, 0x00, id.len() as u8]);
                    v.extend_from_slice(id);
                }
                if let Some(wwn) = self.opts.wwn {
                    // NAA designator, binary, logical unit.
                    v.extend_from_slice(&[0x01, 0x03, 0x00, 8]);
                    v.extend_from_slice(&wwn.to_be_bytes());
                }
            }
            0xb0 => {
                v.resize(64, 0);
                let ratio = 1u32 << self.phys_exp;
                v[4] = 0x01; // WSNZ
                v[6..8].copy_from_slice(&(ratio as u16).to_be_bytes()); // optimal granularity
                                                                        // Bytes 8..11, maximum transfer length: 0, no limit (the
                                                                        // runner moves any length in bounded chunks).
                v[20..24].copy_from_slice(&((MAX_UNMAP_BYTES / bs) as u32).to_be_bytes());
                v[24..28].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
                v[28..32].copy_from_slice(&ratio.to_be_bytes()); // optimal unmap granularity
                v[36..44].copy_from_slice(&(MAX_WRITE_SAME_BYTES / bs).to_be_bytes());
            }
            0xb1 => {
                v.resize(64, 0);
                v[4..6].copy_from_slice(&self.opts.rotation_rate.to_be_bytes());
            }
            0xb2 => {
                // Threshold exponent 0; LBPU, LBPWS, LBPWS10; thin
                // provisioned.
                v.extend_from_slice(&[0, 0xe0, 0x02, 0]);
            }
            _ => return None,
        }
        let len = (v.len() - 4) as u16;
        v[2..4].copy_from_slice(&len.to_be_bytes());
        Some(v)
    }

    /// READ CAPACITY(16) parameter data (SBC-3 5.16.2).
    fn read_capacity_16(&self) -> Vec<u8> {
        let mut v = vec![0u8; 32];
        v[0..8].copy_from_slice(&self.capacity().saturating_sub(1).to_be_bytes());
        v[8..12].copy_from_slice(&self.opts.logical_block_size.to_be_bytes());
        v[13] = self.phys_exp;
        v[14] = 0x80; // LBPME: UNMAP and WRITE SAME with UNMAP are honoured
        v
    }

    /// One mode page (code without the PS bit), as `pc` asks.
    fn mode_page(&self, code: u8, pc: PageControl) -> Option<Vec<u8>> {
        let changeable = pc == PageControl::Changeable;
        let mut p = match code {
            0x01 => {
                let mut p = vec![0u8; 12];
                p[2] = 0x80; // AWRE
                p
            }
            0x04 => {
                // Rigid disk geometry: 16 heads, 63 sectors per track.
                let cyls = (self.capacity() / (16 * 63)).min(0xff_ffff) as u32;
                let c = cyls.to_be_bytes();
                let mut p = vec![0u8; 24];
                p[2..5].copy_from_slice(&c[1..]);
                p[5] = 16;
                p[6..9].copy_from_slice(&c[1..]); // write precompensation
                p[9..12].copy_from_slice(&c[1..]); // reduced write current
                p[12..14].copy_from_slice(&200u16.to_be_bytes()); // step rate
                p[14..17].copy_from_slice(&c[1..]); // landing zone
                p[20..22].copy_from_slice(&5400u16.to_be_bytes()); // rpm
                p
            }
            PAGE_CACHING => {
                let mut p = vec![0u8; 20];
                let wce = match pc {
                    PageControl::Default => self.default_wce,
                    _ => self.backend.write_cache_enabled(),
                };
                p[2] = if wce { CACHING_WCE } else { 0 };
                p
            }
            0x0a => {
                let mut p = vec![0u8; 12];
                p[3] = 0x10; // queue algorithm modifier 1: reordering allowed
                p
            }
            _ => return None,
        };
        p[0] = code;
        p[1] = (p.len() - 2) as u8;
        if changeable {
            p[2..].fill(0);
            if code == PAGE_CACHING {
                p[2] = CACHING_WCE;
            }
        }
        Some(p)
    }

    /// Mode parameter header (SPC-4 7.5.4), block descriptor (7.5.5, the
    /// SBC-3 direct-access form) and pages.
    fn mode_data(&self, pages: Vec<u8>, six: bool, dbd: bool, llbaa: bool) -> Vec<u8> {
        // WP when read-only; DPOFUA: DPO and FUA are accepted.
        let dev = if self.backend.is_read_only() { 0x80 } else { 0 } | 0x10;
        let blocks = self.capacity();
        let bd = if dbd {
            Vec::new()
        } else if llbaa {
            let mut d = vec![0u8; 16];
            d[0..8].copy_from_slice(&blocks.to_be_bytes());
            d[12..16].copy_from_slice(&self.opts.logical_block_size.to_be_bytes());
            d
        } else {
            let mut d = vec![0u8; 8];
            d[0..4].copy_from_slice(&(blocks.min(u32::MAX as u64) as u32).to_be_bytes());
            d[4..8].copy_from_slice(&self.opts.logical_block_size.to_be_bytes());
            d[4] = 0;
            d
        };
        let mut v = if six {
            let total = 4 + bd.len() + pages.len();
            vec![(total - 1).min(255) as u8, 0, dev, bd.len() as u8]
        } else {
            let total = 8 + bd.len() + pages.len();
            let mut h = ((total - 2) as u16).to_be_bytes().to_vec();
            h.extend_from_slice(&[0, dev, (llbaa && !dbd) as u8, 0]);
            h.extend_from_slice(&(bd.len() as u16).to_be_bytes());
            h
        };
        v.extend(bd);
        v.extend(pages);
        v
    }
}

/// Parameter lists (data-out) of MODE SELECT and UNMAP.
impl Disk {
    /// UNMAP parameter list (SBC-3 5.28.2): an 8-byte header, then 16-byte
    /// block descriptors (LBA, number of blocks).
    fn unmap(&self, data: &[u8]) -> Result<Plan, Sense> {
        self.writable()?;
        if data.len() < 8 {
            return Err(Sense::PARAM_LIST_LENGTH);
        }
        let be16 = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]) as usize;
        let (data_len, bd_len) = (be16(&data[0..]), be16(&data[2..]));
        if data.len() < data_len + 2 || data.len() < bd_len + 8 || bd_len % 16 != 0 {
            return Err(Sense::PARAM_LIST_LENGTH);
        }
        if bd_len / 16 > MAX_UNMAP_DESCRIPTORS as usize {
            return Err(Sense::INVALID_PARAM);
        }
        let mut ranges = Vec::new();
        for d in data[8..8 + bd_len].chunks_exact(16) {
            let lba = u64::from_be_bytes(d[0..8].try_into().unwrap_or_default());
            let blocks = u32::from_be_bytes(d[8..12].try_into().unwrap_or_default()) as u64;
            if blocks * self.block_size() > MAX_UNMAP_BYTES {
                return Err(Sense::INVALID_PARAM);
            }
            let (offset, len) = self.range(lba, blocks)?;
            if len > 0 {
                ranges.push((offset, len));
            }
        }
        Ok(if ranges.is_empty() {
            Plan::Good
        } else {
            Plan::Discard(ranges)
        })
    }

    /// MODE SELECT parameter list (SPC-4 7.5): a header, block descriptors
    /// (their contents are ignored: the block size cannot change), pages.
    /// Every page is checked before any is applied, so that an error
    /// changes nothing; only WCE may differ from the current values.
    fn mode_select(&self, six: bool, data: &[u8]) -> Result<Plan, Sense> {
        let (hdr, bd_len, long) = if six {
            if data.len() < 4 {
                return Err(Sense::PARAM_LIST_LENGTH);
            }
            (4, data[3] as usize, false)
        } else {
            if data.len() < 8 {
                return Err(Sense::PARAM_LIST_LENGTH);
            }
            let bd = u16::from_be_bytes([data[6], data[7]]) as usize;
            (8, bd, data[4] & 1 != 0)
        };
        let one = if long { 16 } else { 8 };
        if bd_len != 0 && bd_len != one {
            return Err(Sense::INVALID_PARAM);
        }
        let pages = data.get(hdr + bd_len..).ok_or(Sense::PARAM_LIST_LENGTH)?;
        for apply in [false, true] {
            let mut rest = pages;
            while !rest.is_empty() {
                if rest.len() < 2 {
                    return Err(Sense::PARAM_LIST_LENGTH);
                }
                // The PS bit is reserved in MODE SELECT; SPF (subpage
                // format) names a subpage, and this disk has none.
                if rest[0] & 0x40 != 0 {
                    return Err(Sense::INVALID_PARAM);
                }
                let code = rest[0] & 0x3f;
                let len = rest[1] as usize + 2;
                let page = rest.get(..len).ok_or(Sense::PARAM_LIST_LENGTH)?;
                let (Some(cur), Some(mask)) = (
                    self.mode_page(code, PageControl::Current),
                    self.mode_page(code, PageControl::Changeable),
                ) else {
                    return Err(Sense::INVALID_PARAM);
                };
                if cur.len() != len || (2..len).any(|i| (page[i] ^ cur[i]) & !mask[i] != 0) {
                    return Err(Sense::INVALID_PARAM);
                }
                if apply && code == PAGE_CACHING {
                    self.backend.set_write_cache(page[2] & CACHING_WCE != 0);
                }
                rest = &rest[len..];
            }
        }
        Ok(Plan::Good)
    }
}

impl Lun for Disk {
    fn execute(&self, cdb: &[u8]) -> Plan {
        let mut st = self.lock();
        let parsed = Command::parse(cdb).and_then(|c| {
            if Self::implements(&c) {
                Ok(c)
            } else {
                Err(Sense::INVALID_OPCODE)
            }
        });
        let plan = match st.sense.admit(parsed) {
            Err(s) => Plan::Check(s),
            Ok(cmd) if cmd.needs_medium() && !self.backend.is_inserted() => {
                Plan::Check(Sense::NO_MEDIUM)
            }
            Ok(cmd) => self.run(&mut st, cmd).unwrap_or_else(Plan::Check),
        };
        st.sense.conclude(plan)
    }

    fn data_out(&self, cmd: &Command, data: &[u8]) -> Plan {
        let plan = match cmd {
            Command::ModeSelect { six, .. } => self.mode_select(*six, data),
            Command::Unmap { .. } => self.unmap(data),
            _ => Err(Sense::INVALID_OPCODE),
        };
        self.lock().sense.conclude(plan.unwrap_or_else(Plan::Check))
    }

    /// The sense for a failed request, as QEMU's `scsi_sense_from_errno`
    /// chooses it.
    fn io_failed(&self, failure: IoFailure) -> Sense {
        let s = match failure {
            IoFailure::Read { errno }
            | IoFailure::Write { errno }
            | IoFailure::Flush { errno }
            | IoFailure::Unmap { errno } => match errno {
                libc::ENOMEDIUM => Sense::NO_MEDIUM,
                // Linux's own medium and target errors (a host disk's
                // unrecovered read, a passthrough target's failure): QEMU
                // maps them as the kernel's SCSI layer produced them, so
                // the guest sees MEDIUM ERROR rather than a retryable
                // ABORTED COMMAND.
                libc::ENODATA => Sense::READ_ERROR,
                libc::EREMOTEIO => Sense::TARGET_FAILURE,
                libc::ENOSPC => Sense::SPACE_ALLOC_FAILED,
                libc::ENOMEM => Sense::TARGET_FAILURE,
                libc::EINVAL => Sense::INVALID_FIELD,
                libc::EROFS => Sense::WRITE_PROTECTED,
                _ => Sense::IO_ERROR,
            },
            IoFailure::Miscompare => Sense::MISCOMPARE,
            IoFailure::Overrun => Sense::INVALID_FIELD,
        };
        self.lock().sense.failed(s)
    }

    /// A reset leaves a POWER ON, RESET, OR BUS DEVICE RESET OCCURRED
    /// UNIT ATTENTION (as QEMU's scsi-disk does).
    fn reset(&self) {
        let mut st = self.lock();
        st.sense.clear();
        st.sense.set_unit_attention(Sense::POWER_ON_RESET);
    }

    fn backend(&self) -> Option<Arc<BlockBackend>> {
        Some(self.backend.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::super::cdb::op;
    use super::super::testutil::*;
    use super::*;
    use block::backend::BackendConfig;

    const MIB: u64 = 1 << 20;

    /// A disk on `backend` with its power-on UNIT ATTENTION consumed.
    fn disk_on(backend: Arc<BlockBackend>, opts: DiskOptions) -> Arc<dyn Lun> {
        let d: Arc<dyn Lun> = Arc::new(Disk::new(backend, opts).unwrap());
        assert_eq!(
            d.execute(&cdb(&[op::TEST_UNIT_READY])),
            Plan::Check(Sense::POWER_ON_RESET)
        );
        assert_eq!(d.execute(&cdb(&[op::TEST_UNIT_READY])), Plan::Good);
        d
    }

    /// A 1 MiB null disk (2048 blocks of 512 bytes).
    fn disk() -> Arc<dyn Lun> {
        disk_on(null(MIB), DiskOptions::default())
    }

    fn data_of(p: Plan) -> Vec<u8> {
        match p {
            Plan::DataIn(v) => v,
            p => panic!("expected data, got {p:?}"),
        }
    }

    fn check(d: &Arc<dyn Lun>, c: &[u8], s: Sense) {
        assert_eq!(d.execute(c), Plan::Check(s), "cdb {c:02x?}");
        assert_eq!(request_sense(d), s, "sense kept for cdb {c:02x?}");
    }

    #[test]
    fn bad_opcode() {
        let d = disk();
        check(&d, &cdb(&[0xff]), Sense::INVALID_OPCODE);
        check(&d, &cdb(&[0x02]), Sense::INVALID_OPCODE);
        // Commands the parser knows but a disk does not have.
        check(&d, &cdb(&[op::READ_TOC]), Sense::INVALID_OPCODE);
        check(&d, &cdb(&[op::GET_EVENT_STATUS, 1]), Sense::INVALID_OPCODE);
        check(&d, &[], Sense::INVALID_OPCODE);
    }

    #[test]
    fn bad_field_in_cdb() {
        let d = disk();
        for c in [
            // A CDB shorter than its group's length.
            vec![op::READ_10, 0, 0],
            cdb10(op::READ_10, 0x20, 0, 1).to_vec(), // RDPROTECT
            cdb10(op::WRITE_10, 0x40, 0, 1).to_vec(), // WRPROTECT
            cdb16(op::READ_16, 0xe0, 0, 1).to_vec(),
            cdb10(op::VERIFY_10, 0x04, 0, 1).to_vec(), // BYTCHK=10b
            cdb16(op::VERIFY_16, 0x06, 0, 1).to_vec(), // BYTCHK=11b
            cdb10(op::WRITE_SAME_10, 0x10, 0, 1).to_vec(), // ANCHOR
            cdb10(op::WRITE_SAME_10, 0x02, 0, 1).to_vec(), // LBDATA
            cdb(&[op::UNMAP, 1]).to_vec(),             // ANCHOR
            cdb(&[op::REQUEST_SENSE, 1, 0, 0, 18]).to_vec(), // DESC
            cdb(&[op::INQUIRY, 0, 0x80, 0, 36]).to_vec(), // page without EVPD
            cdb(&[op::INQUIRY, 1, 0x99, 0, 36]).to_vec(), // unknown VPD page
            cdb(&[op::MODE_SELECT_6, 0x11, 0, 0, 24]).to_vec(), // SP
            cdb(&[op::MODE_SELECT_10, 0x00, 0, 0, 0, 0, 0, 0, 24]).to_vec(), // PF=0
            cdb(&[op::MODE_SENSE_6, 0, 0x08, 0x01, 255]).to_vec(), // subpage
            cdb(&[op::MODE_SENSE_6, 0, 0x1c, 0, 255]).to_vec(), // unknown page
            cdb(&[op::SERVICE_ACTION_IN_16, 0x11]).to_vec(), // not READ CAPACITY
            cdb(&[op::SERVICE_ACTION_IN_16, 0x10, 0, 0, 0, 0, 0, 0, 0, 1]).to_vec(), // LBA without PMI
            cdb(&[op::READ_CAPACITY_10, 0, 0, 0, 0, 1]).to_vec(),
        ] {
            check(&d, &c, Sense::INVALID_FIELD);
        }
        check(
            &d,
            &cdb(&[op::MODE_SENSE_10, 0, 0xc8, 0, 0, 0, 0, 0, 255]),
            Sense::SAVING_NOT_SUPPORTED,
        );
    }

    #[test]
    fn lba_out_of_range() {
        let d = disk(); // 2048 blocks
        check(&d, &cdb10(op::READ_10, 0, 2048, 1), Sense::LBA_OUT_OF_RANGE);
        check(
            &d,
            &cdb10(op::WRITE_10, 0, 2047, 2),
            Sense::LBA_OUT_OF_RANGE,
        );
        check(
            &d,
            &cdb16(op::VERIFY_16, 0, 2049, 0),
            Sense::LBA_OUT_OF_RANGE,
        );
        check(
            &d,
            &cdb16(op::WRITE_SAME_16, 0, 2040, 9),
            Sense::LBA_OUT_OF_RANGE,
        );
        check(
            &d,
            &cdb10(op::SYNCHRONIZE_CACHE_10, 0, 2049, 0),
            Sense::LBA_OUT_OF_RANGE,
        );
        check(
            &d,
            &cdb(&[op::READ_6, 0x1f, 0xff, 0xff, 1]),
            Sense::LBA_OUT_OF_RANGE,
        );
        check(&d, &cdb10(op::SEEK_10, 0, 2048, 0), Sense::LBA_OUT_OF_RANGE);
        assert_eq!(
            d.execute(&cdb10(op::READ_10, 0, 2047, 1)),
            Plan::Read {
                offset: 2047 * 512,
                len: 512
            }
        );
    }

    #[test]
    fn lba_plus_length_overflow() {
        let d = disk();
        check(
            &d,
            &cdb16(op::READ_16, 0, u64::MAX - 1, 4),
            Sense::LBA_OUT_OF_RANGE,
        );
        check(
            &d,
            &cdb16(op::WRITE_16, 0, u64::MAX, u32::MAX),
            Sense::LBA_OUT_OF_RANGE,
        );
        check(
            &d,
            &cdb16(op::SYNCHRONIZE_CACHE_16, 0, u64::MAX, 1),
            Sense::LBA_OUT_OF_RANGE,
        );
        // A 4096-byte block disk: LBA * block size would overflow.
        let opts = DiskOptions {
            logical_block_size: 4096,
            physical_block_size: 4096,
            ..Default::default()
        };
        let d = disk_on(null(MIB), opts);
        check(
            &d,
            &cdb16(op::READ_16, 0, u64::MAX / 4096 + 1, 1),
            Sense::LBA_OUT_OF_RANGE,
        );
    }

    #[test]
    fn transfer_length_zero() {
        let d = disk();
        // READ(6)/WRITE(6): zero means 256 blocks.
        assert_eq!(
            d.execute(&cdb(&[op::READ_6, 0, 0, 8, 0])),
            Plan::Read {
                offset: 8 * 512,
                len: 256 * 512
            }
        );
        assert_eq!(
            d.execute(&cdb(&[op::WRITE_6, 0, 0, 0, 0])),
            Plan::Write {
                offset: 0,
                len: 256 * 512,
                fua: false
            }
        );
        // READ(10)/WRITE(16)/VERIFY: no blocks, no data, no error, even at
        // the capacity...
        assert_eq!(d.execute(&cdb10(op::READ_10, 0, 2048, 0)), Plan::Good);
        assert_eq!(d.execute(&cdb16(op::WRITE_16, 0, 5, 0)), Plan::Good);
        assert_eq!(d.execute(&cdb10(op::VERIFY_10, 2, 5, 0)), Plan::Good);
        // ...but not beyond.
        check(&d, &cdb10(op::READ_10, 0, 2049, 0), Sense::LBA_OUT_OF_RANGE);
        // WRITE SAME: WSNZ, zero blocks is an error.
        check(&d, &cdb10(op::WRITE_SAME_10, 0, 0, 0), Sense::INVALID_FIELD);
        // UNMAP and MODE SELECT: an empty parameter list is no error.
        assert_eq!(d.execute(&cdb(&[op::UNMAP])), Plan::Good);
        assert_eq!(d.execute(&cdb(&[op::MODE_SELECT_6, 0x10])), Plan::Good);
        // SYNCHRONIZE CACHE: zero blocks is "to the end".
        assert_eq!(
            d.execute(&cdb10(op::SYNCHRONIZE_CACHE_10, 0, 100, 0)),
            Plan::Flush
        );
    }

    #[test]
    fn allocation_length_cuts() {
        let d = disk();
        let len = |c: &[u8]| data_of(d.execute(c)).len();
        assert_eq!(len(&cdb(&[op::INQUIRY, 0, 0, 0, 36])), 36);
        assert_eq!(len(&cdb(&[op::INQUIRY, 0, 0, 0, 200])), 36);
        assert_eq!(len(&cdb(&[op::INQUIRY, 0, 0, 0, 5])), 5);
        assert_eq!(len(&cdb(&[op::INQUIRY, 0, 0, 0, 0])), 0);
        assert_eq!(len(&cdb(&[op::INQUIRY, 1, 0xb0, 0, 6])), 6);
        assert_eq!(len(&cdb(&[op::REQUEST_SENSE, 0, 0, 0, 8])), 8);
        assert_eq!(len(&cdb(&[op::MODE_SENSE_6, 0, 0x3f, 0, 4])), 4);
        assert_eq!(
            len(&cdb(&[op::MODE_SENSE_10, 0, 0x3f, 0, 0, 0, 0, 0, 9])),
            9
        );
        let mut rc16 = cdb(&[op::SERVICE_ACTION_IN_16, 0x10]);
        rc16[13] = 12;
        assert_eq!(len(&rc16), 12);
        rc16[13] = 0;
        rc16[10] = 1; // 16 MiB: the whole 32 bytes
        assert_eq!(len(&rc16), 32);
    }

    #[test]
    fn unit_attention_after_power_on_and_reset() {
        let d: Arc<dyn Lun> = Arc::new(Disk::new(null(MIB), DiskOptions::default()).unwrap());
        // INQUIRY is exempt and does not consume it.
        assert!(matches!(
            d.execute(&cdb(&[op::INQUIRY, 0, 0, 0, 36])),
            Plan::DataIn(_)
        ));
        // Even an invalid command reports it first.
        assert_eq!(d.execute(&cdb(&[0xff])), Plan::Check(Sense::POWER_ON_RESET));
        assert_eq!(d.execute(&cdb(&[op::TEST_UNIT_READY])), Plan::Good);
        d.reset();
        assert_eq!(request_sense(&d), Sense::POWER_ON_RESET);
        assert_eq!(d.execute(&cdb(&[op::TEST_UNIT_READY])), Plan::Good);
    }

    #[test]
    fn request_sense_reports_the_last_error_once() {
        let d = disk();
        assert_eq!(request_sense(&d), Sense::NONE);
        d.execute(&cdb10(op::READ_10, 0, 4000, 1));
        // A successful command clears it.
        d.execute(&cdb(&[op::TEST_UNIT_READY]));
        assert_eq!(request_sense(&d), Sense::NONE);
        d.execute(&cdb10(op::READ_10, 0, 4000, 1));
        assert_eq!(request_sense(&d), Sense::LBA_OUT_OF_RANGE);
        assert_eq!(request_sense(&d), Sense::NONE);
    }

    #[test]
    fn inquiry_standard_data() {
        let opts = DiskOptions {
            vendor: "ACME".into(),
            product: "Brick".into(),
            version: "1.0".into(),
            removable: true,
            command_queuing: true,
            ..Default::default()
        };
        let d = disk_on(null(MIB), opts);
        let v = data_of(d.execute(&cdb(&[op::INQUIRY, 0, 0, 0, 96])));
        assert_eq!(&v[..8], &[0, 0x80, 5, 0x12, 31, 0, 0, 0x12]);
        assert_eq!(&v[8..36], b"ACME    Brick           1.0 ");
        let d = disk();
        let v = data_of(d.execute(&cdb(&[op::INQUIRY, 0, 0, 0, 96])));
        assert_eq!((v[0], v[1], v[7]), (0, 0, 0x10));
        assert_eq!(&v[8..36], b"QEMU    QEMU HARDDISK   2.5+");
    }

    #[test]
    fn vpd_pages() {
        let vpd =
            |d: &Arc<dyn Lun>, page: u8| data_of(d.execute(&cdb(&[op::INQUIRY, 1, page, 1, 0])));
        let d = disk();
        assert_eq!(vpd(&d, 0), vec![0, 0, 0, 5, 0, 0x83, 0xb0, 0xb1, 0xb2]);
        check(
            &d,
            &cdb(&[op::INQUIRY, 1, 0x80, 1, 0]),
            Sense::INVALID_FIELD,
        );
        // Without a serial the identification is the backend's name.
        assert_eq!(vpd(&d, 0x83), b"\x00\x83\x00\x09\x02\x00\x00\x05scsi0");
        let opts = DiskOptions {
            serial: Some("SN42".into()),
            wwn: Some(0x5000_c500_1234_5678),
            logical_block_size: 512,
            physical_block_size: 4096,
            rotation_rate: 1,
            ..Default::default()
        };
        let d = disk_on(null(MIB), opts);
        assert_eq!(
            vpd(&d, 0),
            vec![0, 0, 0, 6, 0, 0x80, 0x83, 0xb0, 0xb1, 0xb2]
        );
        assert_eq!(vpd(&d, 0x80), b"\x00\x80\x00\x04SN42".to_vec());
        let id = vpd(&d, 0x83);
        assert_eq!(&id[..12], b"\x00\x83\x00\x14\x02\x00\x00\x04SN42");
        assert_eq!(&id[12..16], &[0x01, 0x03, 0x00, 8]);
        assert_eq!(&id[16..24], &0x5000_c500_1234_5678u64.to_be_bytes());
        let bl = vpd(&d, 0xb0);
        assert_eq!(bl.len(), 64);
        assert_eq!(&bl[..4], &[0, 0xb0, 0, 0x3c]);
        assert_eq!(bl[4], 1, "WSNZ");
        assert_eq!(u16::from_be_bytes([bl[6], bl[7]]), 8, "granularity");
        let be32 = |at: usize| u32::from_be_bytes(bl[at..at + 4].try_into().unwrap());
        assert_eq!(be32(8), 0, "no transfer limit");
        assert_eq!(be32(20) as u64, MAX_UNMAP_BYTES / 512);
        assert_eq!(be32(24), MAX_UNMAP_DESCRIPTORS);
        assert_eq!(be32(28), 8);
        assert_eq!(
            u64::from_be_bytes(bl[36..44].try_into().unwrap()),
            MAX_WRITE_SAME_BYTES / 512
        );
        let bc = vpd(&d, 0xb1);
        assert_eq!((bc.len(), bc[4], bc[5]), (64, 0, 1), "non-rotating");
        assert_eq!(vpd(&d, 0xb2), vec![0, 0xb2, 0, 4, 0, 0xe0, 2, 0]);
    }

    #[test]
    fn read_capacity() {
        let d = disk();
        assert_eq!(
            d.execute(&cdb(&[op::READ_CAPACITY_10])),
            Plan::DataIn(vec![0, 0, 0x07, 0xff, 0, 0, 2, 0])
        );
        let rc16 = cdb(&[
            op::SERVICE_ACTION_IN_16,
            0x10,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            32,
        ]);
        let v = data_of(d.execute(&rc16));
        assert_eq!(
            &v[..16],
            &[0, 0, 0, 0, 0, 0, 0x07, 0xff, 0, 0, 2, 0, 0, 0, 0x80, 0]
        );
        // 4 KiB physical blocks under 512-byte logical ones: exponent 3;
        // beyond 2^32 blocks READ CAPACITY(10) reports FFFFFFFFh.
        let opts = DiskOptions {
            physical_block_size: 4096,
            ..Default::default()
        };
        let d = disk_on(null(1 << 42), opts);
        assert_eq!(
            d.execute(&cdb(&[op::READ_CAPACITY_10])),
            Plan::DataIn(vec![0xff, 0xff, 0xff, 0xff, 0, 0, 2, 0])
        );
        let v = data_of(d.execute(&rc16));
        assert_eq!(
            u64::from_be_bytes(v[..8].try_into().unwrap()),
            (1 << 33) - 1
        );
        assert_eq!(v[13], 3);
        // 4 KiB logical blocks.
        let opts = DiskOptions {
            logical_block_size: 4096,
            physical_block_size: 4096,
            ..Default::default()
        };
        let d = disk_on(null(MIB), opts);
        assert_eq!(
            d.execute(&cdb(&[op::READ_CAPACITY_10])),
            Plan::DataIn(vec![0, 0, 0, 0xff, 0, 0, 0x10, 0])
        );
        assert_eq!(
            d.execute(&cdb10(op::READ_10, 0, 3, 2)),
            Plan::Read {
                offset: 3 * 4096,
                len: 2 * 4096
            }
        );
    }

    #[test]
    fn reads_writes_and_verify_plan_byte_ranges() {
        let d = disk();
        let mut r12 = cdb(&[op::READ_12, 0, 0, 0, 0, 10]);
        r12[9] = 4;
        assert_eq!(
            d.execute(&r12),
            Plan::Read {
                offset: 5120,
                len: 2048
            }
        );
        assert_eq!(
            d.execute(&cdb16(op::READ_16, 0x08, 1, 1)),
            Plan::Read {
                offset: 512,
                len: 512
            }
        );
        assert_eq!(
            d.execute(&cdb10(op::WRITE_10, 0x08, 2, 3)),
            Plan::Write {
                offset: 1024,
                len: 1536,
                fua: true
            }
        );
        let mut w12 = cdb(&[op::WRITE_12, 0, 0, 0, 0, 1]);
        w12[9] = 1;
        assert_eq!(
            d.execute(&w12),
            Plan::Write {
                offset: 512,
                len: 512,
                fua: false
            }
        );
        assert_eq!(d.execute(&cdb10(op::VERIFY_10, 0, 0, 8)), Plan::Good);
        assert_eq!(
            d.execute(&cdb16(op::VERIFY_16, 0x02, 4, 2)),
            Plan::Compare {
                offset: 2048,
                len: 1024
            }
        );
    }

    #[test]
    fn write_same_plans() {
        let d = disk();
        assert_eq!(
            d.execute(&cdb10(op::WRITE_SAME_10, 0x08, 4, 2)),
            Plan::WriteSame {
                offset: 2048,
                len: 1024,
                block: 512,
                unmap: true
            }
        );
        assert_eq!(
            d.execute(&cdb16(op::WRITE_SAME_16, 0x01, 4, 2)),
            Plan::WriteZeroes {
                offset: 2048,
                len: 1024,
                unmap: false
            }
        );
        let big = disk_on(null(4 << 30), DiskOptions::default());
        let blocks = (MAX_WRITE_SAME_BYTES / 512) as u32;
        assert!(matches!(
            big.execute(&cdb16(op::WRITE_SAME_16, 0, 0, blocks)),
            Plan::WriteSame { .. }
        ));
        check(
            &big,
            &cdb16(op::WRITE_SAME_16, 0, 0, blocks + 1),
            Sense::INVALID_FIELD,
        );
    }

    #[test]
    fn write_protected_when_read_only() {
        let ro = BackendConfig {
            read_only: true,
            ..Default::default()
        };
        let d = disk_on(
            backend("driver=null-co,read-zeroes=on,size=1048576", ro),
            DiskOptions::default(),
        );
        check(&d, &cdb10(op::WRITE_10, 0, 0, 1), Sense::WRITE_PROTECTED);
        check(&d, &cdb(&[op::WRITE_6, 0, 0, 0, 1]), Sense::WRITE_PROTECTED);
        check(
            &d,
            &cdb10(op::WRITE_SAME_10, 0, 0, 1),
            Sense::WRITE_PROTECTED,
        );
        check(
            &d,
            &cdb(&[op::UNMAP, 0, 0, 0, 0, 0, 0, 0, 24]),
            Sense::WRITE_PROTECTED,
        );
        // Write protection comes before the range check, as on QEMU.
        check(&d, &cdb10(op::WRITE_10, 0, 9999, 1), Sense::WRITE_PROTECTED);
        assert!(matches!(
            d.execute(&cdb10(op::READ_10, 0, 0, 1)),
            Plan::Read { .. }
        ));
        let v = data_of(d.execute(&cdb(&[op::MODE_SENSE_6, 0x08, 0x3f, 0, 255])));
        assert_eq!(v[2], 0x90, "WP and DPOFUA");
        assert_eq!(v[3], 0, "DBD");
    }

    #[test]
    fn mode_sense_pages() {
        let d = disk();
        let ms6 = |flags: u8, pc_page: u8| {
            data_of(d.execute(&cdb(&[op::MODE_SENSE_6, flags, pc_page, 0, 255])))
        };
        // All pages, with an 8-byte block descriptor.
        let v = ms6(0, 0x3f);
        assert_eq!(v.len(), 4 + 8 + 12 + 24 + 20 + 12);
        assert_eq!(&v[..4], &[v.len() as u8 - 1, 0, 0x10, 8]);
        assert_eq!(&v[4..12], &[0, 0, 0x08, 0, 0, 0, 2, 0]);
        let pages: Vec<u8> = {
            let mut at = 12;
            let mut codes = Vec::new();
            while at < v.len() {
                codes.push(v[at]);
                at += v[at + 1] as usize + 2;
            }
            codes
        };
        assert_eq!(pages, MODE_PAGES);
        // The caching page: WCE follows the backend; only WCE changes.
        let v = ms6(0x08, 0x08);
        assert_eq!(&v[4..8], &[0x08, 0x12, 0x04, 0]);
        let v = ms6(0x08, 0x48);
        assert_eq!(&v[4..8], &[0x08, 0x12, 0x04, 0]);
        assert!(v[7..].iter().all(|&b| b == 0));
        let v = ms6(0x08, 0x44);
        assert_eq!(&v[4..6], &[0x04, 0x16]);
        assert!(v[6..].iter().all(|&b| b == 0), "nothing changeable");
        // Rigid disk geometry: 2048 / (16 * 63) = 2 cylinders, 16 heads.
        let v = ms6(0x08, 0x04);
        assert_eq!(&v[4..10], &[0x04, 0x16, 0, 0, 2, 16]);
        // MODE SENSE(10) with LLBAA: a 16-byte descriptor.
        let v = data_of(d.execute(&cdb(&[op::MODE_SENSE_10, 0x10, 0x0a, 0, 0, 0, 0, 1, 0])));
        assert_eq!(&v[..8], &[0, 6 + 16 + 12, 0, 0x10, 1, 0, 0, 16]);
        assert_eq!(&v[8..24], &[0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 2, 0]);
        assert_eq!(&v[24..28], &[0x0a, 0x0a, 0, 0x10]);
        // Subpage FFh of a page without subpages is the page.
        let v = data_of(d.execute(&cdb(&[op::MODE_SENSE_6, 0x08, 0x01, 0xff, 255])));
        assert_eq!(&v[4..7], &[0x01, 0x0a, 0x80]);
    }

    /// MODE SELECT(10) with a header, no block descriptor and `pages`.
    fn mode_select_10(d: &Arc<dyn Lun>, pages: &[u8]) -> Status {
        let mut list = vec![0u8; 8];
        list.extend_from_slice(pages);
        let mut c = cdb(&[op::MODE_SELECT_10, 0x10]);
        c[7..9].copy_from_slice(&(list.len() as u16).to_be_bytes());
        exec(d, &c, VecPath { buf: list }).0.status
    }

    fn caching_page(wce: bool) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x08;
        p[1] = 0x12;
        p[2] = if wce { 0x04 } else { 0 };
        p
    }

    #[test]
    fn mode_select_wce_flips_the_backend_write_cache() {
        let b = null(MIB);
        let d = disk_on(b.clone(), DiskOptions::default());
        assert!(b.write_cache_enabled());
        assert_eq!(mode_select_10(&d, &caching_page(false)), Status::Good);
        assert!(!b.write_cache_enabled());
        let v = data_of(d.execute(&cdb(&[op::MODE_SENSE_6, 0x08, 0x08, 0, 255])));
        assert_eq!(v[6], 0, "WCE off");
        // The default value is what the disk started with.
        let v = data_of(d.execute(&cdb(&[op::MODE_SENSE_6, 0x08, 0x88, 0, 255])));
        assert_eq!(v[6], 0x04);
        // MODE SELECT(6), with a short block descriptor whose contents are
        // ignored, and the PS bit set as MODE SENSE reported it.
        let mut list = vec![0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 2, 0];
        let mut page = caching_page(true);
        page[0] |= 0x80;
        list.extend(page);
        let c = cdb(&[op::MODE_SELECT_6, 0x10, 0, 0, list.len() as u8]);
        let (o, _) = exec(&d, &c, VecPath { buf: list });
        assert_eq!(o.status, Status::Good);
        assert_eq!(o.transferred, 32);
        assert!(b.write_cache_enabled());
        // Unchanged pages may be sent back as they are.
        let all = data_of(d.execute(&cdb(&[op::MODE_SENSE_10, 0x08, 0x3f, 0, 0, 0, 0, 1, 0])));
        assert_eq!(mode_select_10(&d, &all[8..]), Status::Good);
    }

    #[test]
    fn mode_select_rejects_bad_lists_and_changes_nothing() {
        let b = null(MIB);
        let d = disk_on(b.clone(), DiskOptions::default());
        let bad = |pages: &[u8], s: Sense| {
            assert_eq!(
                mode_select_10(&d, pages),
                Status::CheckCondition(s),
                "pages {pages:02x?}"
            );
            assert_eq!(request_sense(&d), s);
            assert!(b.write_cache_enabled(), "nothing applied");
        };
        // A valid WCE change followed by a change of an unchangeable field.
        let mut pages = caching_page(false);
        let mut ctl = vec![0x0a, 0x0a, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0];
        ctl[2] = 0x04; // D_SENSE
        pages.extend(&ctl);
        bad(&pages, Sense::INVALID_PARAM);
        // Unknown page, wrong page length, subpage format.
        bad(
            &[0x1c, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            Sense::INVALID_PARAM,
        );
        let mut short = caching_page(false);
        short[1] = 0x0a;
        short.truncate(12);
        bad(&short, Sense::INVALID_PARAM);
        let mut spf = caching_page(false);
        spf[0] |= 0x40;
        bad(&spf, Sense::INVALID_PARAM);
        // A page cut by the end of the list; a lone byte.
        bad(&caching_page(false)[..10], Sense::PARAM_LIST_LENGTH);
        bad(&[0x08], Sense::PARAM_LIST_LENGTH);
        // A header shorter than its format, a bad block descriptor length.
        let c = cdb(&[op::MODE_SELECT_10, 0x10, 0, 0, 0, 0, 0, 0, 6]);
        let (o, _) = exec(&d, &c, VecPath::new(6));
        assert_eq!(o.status, Status::CheckCondition(Sense::PARAM_LIST_LENGTH));
        let list = vec![0, 0, 0, 4, 0, 0, 0, 0];
        let c = cdb(&[op::MODE_SELECT_6, 0x10, 0, 0, 8]);
        let (o, _) = exec(&d, &c, VecPath { buf: list });
        assert_eq!(o.status, Status::CheckCondition(Sense::INVALID_PARAM));
        // A block descriptor length beyond the list.
        let list = vec![0, 0, 0, 8, 0, 0];
        let c = cdb(&[op::MODE_SELECT_6, 0x10, 0, 0, 6]);
        let (o, _) = exec(&d, &c, VecPath { buf: list });
        assert_eq!(o.status, Status::CheckCondition(Sense::PARAM_LIST_LENGTH));
    }

    /// An UNMAP parameter list of `(lba, blocks)` descriptors.
    fn unmap_list(descs: &[(u64, u32)]) -> Vec<u8> {
        let mut v = vec![0u8; 8];
        v[0..2].copy_from_slice(&((6 + 16 * descs.len()) as u16).to_be_bytes());
        v[2..4].copy_from_slice(&((16 * descs.len()) as u16).to_be_bytes());
        for &(lba, n) in descs {
            v.extend_from_slice(&lba.to_be_bytes());
            v.extend_from_slice(&n.to_be_bytes());
            v.extend_from_slice(&[0; 4]);
        }
        v
    }

    fn unmap_cmd(len: u16) -> Command {
        Command::Unmap { param_len: len }
    }

    #[test]
    fn unmap_parameter_list() {
        let d = disk();
        let mut c = cdb(&[op::UNMAP]);
        c[7..9].copy_from_slice(&40u16.to_be_bytes());
        assert_eq!(
            d.execute(&c),
            Plan::DataOut {
                len: 40,
                cmd: unmap_cmd(40)
            }
        );
        let list = unmap_list(&[(8, 8), (100, 0), (2047, 1)]);
        assert_eq!(
            d.data_out(&unmap_cmd(list.len() as u16), &list),
            Plan::Discard(vec![(4096, 4096), (2047 * 512, 512)])
        );
        // Only empty descriptors: nothing to do.
        let list = unmap_list(&[(3, 0)]);
        assert_eq!(d.data_out(&unmap_cmd(24), &list), Plan::Good);
        // A parameter list length of 1..7 in the CDB.
        c[7..9].copy_from_slice(&7u16.to_be_bytes());
        check(&d, &c, Sense::PARAM_LIST_LENGTH);
    }

    #[test]
    fn unmap_rejects_malformed_lists() {
        let d = disk();
        let bad = |list: &[u8], s: Sense| {
            assert_eq!(
                d.data_out(&unmap_cmd(list.len() as u16), list),
                Plan::Check(s),
                "list {list:02x?}"
            );
            assert_eq!(request_sense(&d), s);
        };
        // Shorter than the header.
        bad(&[0, 6, 0, 0], Sense::PARAM_LIST_LENGTH);
        // UNMAP DATA LENGTH beyond the data.
        let mut l = unmap_list(&[(0, 1)]);
        l[1] += 1;
        bad(&l, Sense::PARAM_LIST_LENGTH);
        // Block descriptor data length beyond the data, or not a multiple
        // of 16.
        let mut l = unmap_list(&[(0, 1)]);
        l[3] = 32;
        bad(&l, Sense::PARAM_LIST_LENGTH);
        let mut l = unmap_list(&[(0, 1)]);
        l[3] = 15;
        bad(&l, Sense::PARAM_LIST_LENGTH);
        // Too many descriptors.
        let many: Vec<(u64, u32)> = (0..=MAX_UNMAP_DESCRIPTORS as u64).map(|i| (i, 1)).collect();
        bad(&unmap_list(&many), Sense::INVALID_PARAM);
        // Out of range, overflowing, or too big a descriptor.
        bad(&unmap_list(&[(0, 1), (2048, 1)]), Sense::LBA_OUT_OF_RANGE);
        bad(&unmap_list(&[(u64::MAX, 2)]), Sense::LBA_OUT_OF_RANGE);
        let big = disk_on(null(4 << 30), DiskOptions::default());
        let n = (MAX_UNMAP_BYTES / 512) as u32;
        let l = unmap_list(&[(0, n + 1)]);
        assert_eq!(
            big.data_out(&unmap_cmd(l.len() as u16), &l),
            Plan::Check(Sense::INVALID_PARAM)
        );
        assert!(matches!(
            big.data_out(&unmap_cmd(24), &unmap_list(&[(0, n)])),
            Plan::Discard(_)
        ));
    }

    #[test]
    fn sync_cache_start_stop_and_prevent() {
        let b = null(MIB);
        let disk = Arc::new(Disk::new(b, DiskOptions::default()).unwrap());
        let d: Arc<dyn Lun> = disk.clone();
        d.execute(&cdb(&[op::TEST_UNIT_READY]));
        assert_eq!(
            d.execute(&cdb16(op::SYNCHRONIZE_CACHE_16, 2, 0, 2048)),
            Plan::Flush
        );
        // Power conditions are accepted (and ignored), as on QEMU.
        assert_eq!(
            d.execute(&cdb(&[op::START_STOP_UNIT, 0, 0, 0, 0x30])),
            Plan::Good
        );
        assert_eq!(
            d.execute(&cdb(&[op::START_STOP_UNIT, 0, 0, 0, 0x02])),
            Plan::Good
        );
        assert_eq!(
            d.execute(&cdb(&[op::PREVENT_ALLOW, 0, 0, 0, 1])),
            Plan::Good
        );
        assert!(disk.locked());
        d.execute(&cdb(&[op::PREVENT_ALLOW, 0, 0, 0, 0]));
        assert!(!disk.locked());
        assert_eq!(d.execute(&cdb(&[op::TEST_UNIT_READY])), Plan::Good);
    }

    #[test]
    fn io_failures_become_sense() {
        let d = disk();
        assert_eq!(
            d.io_failed(IoFailure::Write {
                errno: libc::ENOSPC
            }),
            Sense::SPACE_ALLOC_FAILED
        );
        assert_eq!(request_sense(&d), Sense::SPACE_ALLOC_FAILED);
        assert_eq!(
            d.io_failed(IoFailure::Read { errno: libc::EIO }),
            Sense::IO_ERROR
        );
        assert_eq!(d.io_failed(IoFailure::Miscompare), Sense::MISCOMPARE);
        assert_eq!(d.io_failed(IoFailure::Overrun), Sense::INVALID_FIELD);
        assert_eq!(
            d.io_failed(IoFailure::Flush {
                errno: libc::ENOMEDIUM
            }),
            Sense::NO_MEDIUM
        );
        assert_eq!(request_sense(&d), Sense::NO_MEDIUM);
    }

    #[test]
    fn options_are_checked() {
        let bad = |o: DiskOptions| assert!(Disk::new(null(MIB), o).is_err());
        bad(DiskOptions {
            logical_block_size: 1024,
            physical_block_size: 1024,
            ..Default::default()
        });
        bad(DiskOptions {
            logical_block_size: 4096,
            physical_block_size: 512,
            ..Default::default()
        });
        bad(DiskOptions {
            physical_block_size: 3000,
            ..Default::default()
        });
        bad(DiskOptions {
            vendor: "TOO LONG VENDOR".into(),
            ..Default::default()
        });
        bad(DiskOptions {
            serial: Some("\u{e9}".into()),
            ..Default::default()
        });
    }
}
