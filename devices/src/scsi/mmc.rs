//! A CD/DVD-ROM logical unit (MMC-5), shared by every transport that
//! carries CDBs: ATAPI now, and the LSI HBA, virtio-scsi and USB storage
//! later.
//!
//! The unit owns the medium state machine (MMC-5 4.1.6 and 4.2.7): a medium
//! can be present or not, the tray open or closed, and removal may be
//! prevented. Loading a medium leaves a UNIT ATTENTION (28h/00h, "medium may
//! have changed") that the next command other than INQUIRY, REQUEST SENSE,
//! GET CONFIGURATION or GET EVENT STATUS NOTIFICATION reports, and a "new
//! media" event for GET EVENT STATUS NOTIFICATION. Blocks are 2048 bytes.
//!
//! [`Lun::execute`] parses the CDB ([`Command::parse`]), applies the
//! UNIT ATTENTION and medium checks, and answers with a [`Plan`]. Reads are
//! not performed here: the plan names the byte range, so that the transport
//! can move it synchronously (PIO) or asynchronously (DMA) and report a
//! failure back through [`Lun::io_failed`] (or [`CdRom::read_failed`]).

use std::sync::{Arc, Mutex, MutexGuard};

use block::backend::BlockBackend;

use super::cdb::{op, Command, PageControl};
use super::lun::{data_in, pad, IoFailure, Lun, Plan, SenseKeeper};
use super::sense::Sense;

/// MMC logical block size.
pub const BLOCK: u64 = 2048;
/// The largest medium reported as a CD (80 minutes); bigger is a DVD.
const CD_MAX_BLOCKS: u64 = 80 * 60 * 75;
/// MSF addresses start 2 seconds (150 frames) into the disc.
const MSF_OFFSET: u32 = 150;

/// MMC profiles (MMC-5 table 87).
const PROFILE_CDROM: u16 = 0x0008;
const PROFILE_DVDROM: u16 = 0x0010;

/// How INQUIRY describes the transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// ATAPI: INQUIRY version 0, ATAPI transport version 2 (as ATAPI
    /// drives and QEMU's ide-cd report).
    Atapi,
    /// A SCSI bus: SPC-3.
    Scsi,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum MediaEvent {
    #[default]
    None,
    EjectRequest,
    NewMedia,
    MediaRemoval,
}

/// Told of every tray movement (`true`: it opened), by the guest or the
/// host: QMP's DEVICE_TRAY_MOVED.
pub use crate::media::TrayListener;

/// The drive's changing state, behind the unit's lock.
/// Where a drive is after the host loaded a medium.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Settling {
    Ready,
    NotReady,
    Attention,
}

struct State {
    /// The drive's backend; the medium is its inserted node (a backend
    /// without one is an empty drive).
    medium: Option<Arc<BlockBackend>>,
    revision: String,
    listener: Option<TrayListener>,
    tray_open: bool,
    locked: bool,
    sense: SenseKeeper,
    event: MediaEvent,
    product: String,
    /// The host changed the medium: the next command that needs it sees
    /// the drive not ready yet, the one after that MEDIUM MAY HAVE
    /// CHANGED (a drive spinning up; guests that never poll GET EVENT
    /// STATUS NOTIFICATION notice the change through these two, as with
    /// QEMU's drives). REQUEST SENSE between them reports the first.
    settling: Settling,
}

impl State {
    /// The medium, when one is loaded and the tray is closed.
    fn medium(&self) -> Option<&Arc<BlockBackend>> {
        self.loaded().filter(|_| !self.tray_open)
    }

    /// The backend, when it holds a medium (whatever the tray).
    fn loaded(&self) -> Option<&Arc<BlockBackend>> {
        self.medium.as_ref().filter(|m| m.is_inserted())
    }

    fn move_tray(&mut self, open: bool) {
        if self.tray_open != open {
            self.tray_open = open;
            if let Some(l) = &self.listener {
                l(open);
            }
        }
    }

    fn blocks(&self) -> u64 {
        self.medium().map_or(0, |m| m.len() / BLOCK)
    }

    /// The tray closed on a medium. Loaded by the host, it is a medium
    /// change the guest learns of (NOT READY once, then UNIT ATTENTION);
    /// loaded by the guest's own START STOP UNIT, the guest knows.
    fn medium_loaded(&mut self, by_host: bool) {
        if self.loaded().is_some() {
            if by_host {
                self.settling = Settling::NotReady;
            }
            self.event = MediaEvent::NewMedia;
        }
    }

    fn not_ready(&self) -> Option<Sense> {
        if self.tray_open {
            Some(Sense::NO_MEDIUM_TRAY_OPEN)
        } else if self.loaded().is_none() {
            Some(Sense::NO_MEDIUM_TRAY_CLOSED)
        } else {
            None
        }
    }
}

pub struct CdRom {
    transport: Transport,
    vendor: String,
    state: Mutex<State>,
}

impl CdRom {
    pub fn new(transport: Transport, medium: Option<Arc<BlockBackend>>) -> Self {
        let mut sense = SenseKeeper::default();
        // A SCSI logical unit reports its power-on (SAM-5 6.3.1); an ATAPI
        // drive's reset is the transport's, with no UNIT ATTENTION.
        if transport == Transport::Scsi {
            sense.set_unit_attention(Sense::POWER_ON_RESET);
        }
        CdRom {
            transport,
            vendor: "QEMU".into(),
            state: Mutex::new(State {
                medium,
                revision: "2.5+".into(),
                listener: None,
                tray_open: false,
                locked: false,
                sense,
                event: MediaEvent::None,
                product: "QEMU DVD-ROM".into(),
                settling: Settling::Ready,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the INQUIRY product identification (from `model=`).
    pub fn set_product(&self, product: &str) {
        self.lock().product = product.to_string();
    }

    /// Sets the INQUIRY product revision level (from `ver=`).
    pub fn set_revision(&self, revision: &str) {
        self.lock().revision = revision.to_string();
    }

    /// The INQUIRY product revision level.
    pub fn revision(&self) -> String {
        self.lock().revision.clone()
    }

    /// Registers who hears of tray movements.
    pub fn set_tray_listener(&self, l: TrayListener) {
        self.lock().listener = Some(l);
    }

    /// The drive's backend (with or without a medium in it).
    pub fn backend(&self) -> Option<Arc<BlockBackend>> {
        self.lock().medium.clone()
    }

    /// The medium, when one is loaded and the tray is closed.
    pub fn medium(&self) -> Option<Arc<BlockBackend>> {
        self.lock().medium().cloned()
    }

    pub fn tray_open(&self) -> bool {
        self.lock().tray_open
    }

    pub fn locked(&self) -> bool {
        self.lock().locked
    }

    /// Number of 2048-byte blocks on the medium (0 without one).
    pub fn blocks(&self) -> u64 {
        self.lock().blocks()
    }

    /// The host opens the tray (QMP `blockdev-open-tray`, `eject`). A
    /// drive the guest locked only reports an eject request (the guest is
    /// expected to unlock and eject) and `false` is returned, unless
    /// `force` overrides the lock.
    pub fn host_open_tray(&self, force: bool) -> bool {
        let mut st = self.lock();
        if st.tray_open {
            return true;
        }
        if st.locked && !force {
            st.event = MediaEvent::EjectRequest;
            return false;
        }
        st.locked = false;
        st.move_tray(true);
        st.event = MediaEvent::MediaRemoval;
        true
    }

    /// The host closes the tray (QMP `blockdev-close-tray`): a medium in
    /// it is loaded: NOT READY once, then UNIT ATTENTION, and a new-media
    /// event.
    pub fn host_close_tray(&self) {
        let mut st = self.lock();
        if st.tray_open {
            st.move_tray(false);
            st.medium_loaded(true);
        }
    }

    /// The transport could not read the data of a [`Plan::Read`].
    pub fn read_failed(&self) -> Sense {
        self.io_failed(IoFailure::Read { errno: libc::EIO })
    }

    /// Whether an MMC drive takes a parsed command: INVALID COMMAND
    /// OPERATION CODE for commands it does not implement (READ(6) and
    /// READ(16) are SBC commands that SCSI CD-ROMs accept but ATAPI drives
    /// do not), INVALID FIELD for power conditions.
    fn accepts(&self, cmd: &Command, opcode: u8) -> Result<(), Sense> {
        // On a SCSI bus the unit knows writes (SBC's opcodes), and a
        // read-only disc refuses them as write protected, as QEMU's
        // scsi-cd does; an ATAPI drive does not know them at all.
        if self.transport == Transport::Scsi
            && matches!(cmd, Command::Write { .. } | Command::WriteSame { .. })
        {
            return Err(Sense::WRITE_PROTECTED);
        }
        let ok = match cmd {
            Command::Read { .. } => {
                self.transport == Transport::Scsi || matches!(opcode, op::READ_10 | op::READ_12)
            }
            Command::ModeSelect { .. }
            | Command::ReadCapacity16 { .. }
            | Command::Write { .. }
            | Command::Verify { .. }
            | Command::WriteSame { .. }
            | Command::Unmap { .. }
            | Command::SynchronizeCache { .. }
            | Command::ReportLuns { .. } => false,
            Command::StartStopUnit {
                power_condition, ..
            } if *power_condition != 0 => return Err(Sense::INVALID_FIELD),
            _ => true,
        };
        if ok {
            Ok(())
        } else {
            Err(Sense::INVALID_OPCODE)
        }
    }

    fn run(&self, st: &mut State, cmd: Command) -> Plan {
        let data = |v: Vec<u8>, alloc: u16| data_in(v, alloc as u32);
        match cmd {
            Command::TestUnitReady | Command::SetCdSpeed => Plan::Good,
            Command::Seek { lba } => {
                if lba as u64 >= st.blocks() {
                    return Plan::Check(Sense::LBA_OUT_OF_RANGE);
                }
                Plan::Good
            }
            Command::RequestSense { alloc } => {
                // A pending UNIT ATTENTION is reported (and consumed) here;
                // otherwise the last error, or NOT READY while there is no
                // medium, as drives do.
                let idle = st.not_ready();
                data(st.sense.request_sense(idle).fixed().to_vec(), alloc)
            }
            Command::Inquiry { vpd_page, alloc } => match vpd_page {
                None => data(self.inquiry(st), alloc),
                // Supported VPD pages: only the list itself.
                Some(0) => data(vec![5, 0, 0, 1, 0], alloc),
                Some(_) => Plan::Check(Sense::INVALID_FIELD),
            },
            Command::ModeSense {
                page,
                subpage,
                pc,
                alloc,
                six,
                ..
            } => {
                if pc == PageControl::Saved {
                    return Plan::Check(Sense::SAVING_NOT_SUPPORTED);
                }
                if subpage != 0 && subpage != 0xff {
                    return Plan::Check(Sense::INVALID_FIELD);
                }
                match self.mode_pages(st, page, pc) {
                    Some(pages) => data(self.mode_header(st, pages, six), alloc),
                    None => Plan::Check(Sense::INVALID_FIELD),
                }
            }
            Command::StartStopUnit {
                start, load_eject, ..
            } => {
                if !load_eject {
                    return Plan::Good;
                }
                if start {
                    if st.tray_open {
                        st.move_tray(false);
                        st.medium_loaded(false);
                    }
                } else {
                    if st.locked {
                        return Plan::Check(Sense::REMOVAL_PREVENTED);
                    }
                    if !st.tray_open {
                        st.move_tray(true);
                        st.event = MediaEvent::MediaRemoval;
                    }
                }
                Plan::Good
            }
            Command::PreventAllow { prevent } => {
                st.locked = prevent;
                Plan::Good
            }
            Command::ReadCapacity10 => super::lun::read_capacity_10(st.blocks(), BLOCK as u32),
            Command::ReadCd {
                lba,
                blocks,
                user_data,
            } => {
                let blocks = if user_data { blocks } else { 0 };
                self.run(
                    st,
                    Command::Read {
                        lba: lba as u64,
                        blocks,
                        fua: false,
                    },
                )
            }
            Command::Read { lba, blocks, .. } => {
                if lba
                    .checked_add(blocks as u64)
                    .is_none_or(|end| end > st.blocks())
                {
                    return Plan::Check(Sense::LBA_OUT_OF_RANGE);
                }
                if blocks == 0 {
                    return Plan::Good;
                }
                Plan::Read {
                    offset: lba * BLOCK,
                    len: blocks as u64 * BLOCK,
                }
            }
            Command::ReadToc {
                msf,
                format,
                track,
                alloc,
            } => match self.read_toc(st, msf, format, track) {
                Some(v) => data(v, alloc),
                None => Plan::Check(Sense::INVALID_FIELD),
            },
            Command::GetConfiguration { rt, start, alloc } => {
                data(self.get_configuration(st, rt, start), alloc)
            }
            Command::GetEventStatus { class_mask, alloc } => {
                data(self.event_status(st, class_mask), alloc)
            }
            Command::ReadDiscInfo { alloc } => data(self.disc_info(), alloc),
            Command::MechanismStatus { alloc } => {
                let mut v = vec![0u8; 8];
                if st.tray_open {
                    v[1] = 0x10; // door open
                }
                data(v, alloc)
            }
            // Not implemented by this unit (refused by `accepts`).
            Command::ModeSelect { .. }
            | Command::ReadCapacity16 { .. }
            | Command::Write { .. }
            | Command::Verify { .. }
            | Command::WriteSame { .. }
            | Command::Unmap { .. }
            | Command::SynchronizeCache { .. }
            | Command::ReportLuns { .. } => Plan::Check(Sense::INVALID_OPCODE),
        }
    }

    /// Standard INQUIRY data (SPC-4 6.4.2): peripheral device type 05h
    /// (CD/DVD), removable medium.
    fn inquiry(&self, st: &State) -> Vec<u8> {
        let mut v = vec![0u8; 36];
        v[0] = 0x05;
        v[1] = 0x80;
        match self.transport {
            Transport::Atapi => {
                v[2] = 0x00;
                v[3] = 0x21;
            }
            Transport::Scsi => {
                v[2] = 0x05;
                v[3] = 0x02;
            }
        }
        v[4] = 31; // additional length
        pad(&mut v[8..16], &self.vendor);
        pad(&mut v[16..32], &st.product);
        pad(&mut v[32..36], &st.revision);
        v
    }

    /// Mode parameter header (SPC-4 7.5.4) without block descriptors.
    fn mode_header(&self, st: &State, pages: Vec<u8>, six: bool) -> Vec<u8> {
        let medium_type = if st.medium().is_none() { 0x70 } else { 0x01 };
        let mut v = if six {
            vec![(pages.len() + 3).min(255) as u8, medium_type, 0, 0]
        } else {
            let len = (pages.len() + 6) as u16;
            let mut h = len.to_be_bytes().to_vec();
            h.extend_from_slice(&[medium_type, 0, 0, 0, 0, 0]);
            h
        };
        v.extend(pages);
        v
    }

    /// Mode pages: 01h read/write error recovery (MMC-5 7.3), 2Ah
    /// capabilities and mechanical status (MMC-3 6.3.11), 3Fh all.
    fn mode_pages(&self, st: &State, page: u8, pc: PageControl) -> Option<Vec<u8>> {
        let changeable = pc == PageControl::Changeable;
        let err_recovery = || {
            let mut p = vec![0x01, 0x06, 0, 5, 0, 0, 0, 0];
            if changeable {
                p[2..].fill(0);
            }
            p
        };
        let caps = || {
            let mut p = vec![0u8; 22];
            p[0] = 0x2a;
            p[1] = 20;
            if !changeable {
                p[2] = 0x3b; // reads CD-R/RW, DVD-ROM/R/RAM
                p[4] = 0x71; // audio play, multisession, mode 2 form 1/2
                p[5] = 0x7f; // CD-DA, accurate stream, R-W, C2, ISRC, UPC
                             // Lock supported, locked state, tray loader, eject supported.
                p[6] = 0x29 | if st.locked { 0x02 } else { 0 };
                p[7] = 0x03; // separate channel volume and mute
                p[8..10].copy_from_slice(&706u16.to_be_bytes()); // 4x, in kB/s
                p[10..12].copy_from_slice(&2u16.to_be_bytes()); // volume levels
                p[12..14].copy_from_slice(&512u16.to_be_bytes()); // buffer, kB
                p[14..16].copy_from_slice(&706u16.to_be_bytes());
            }
            p
        };
        match page {
            0x01 => Some(err_recovery()),
            0x2a => Some(caps()),
            0x3f => {
                let mut v = err_recovery();
                v.extend(caps());
                Some(v)
            }
            _ => None,
        }
    }

    fn lba_or_msf(&self, lba: u32, msf: bool) -> [u8; 4] {
        if msf {
            let f = lba + MSF_OFFSET;
            [0, (f / 75 / 60) as u8, (f / 75 % 60) as u8, (f % 75) as u8]
        } else {
            lba.to_be_bytes()
        }
    }

    /// READ TOC/PMA/ATIP formats 0 (TOC), 1 (session information) and
    /// 2 (raw TOC) for a single-session disc with one data track.
    fn read_toc(&self, st: &State, msf: bool, format: u8, track: u8) -> Option<Vec<u8>> {
        let leadout = st.blocks().min(u32::MAX as u64 - 150) as u32;
        let mut v = vec![0u8, 0, 1, 1];
        match format {
            0 => {
                if track > 1 && track != 0xaa {
                    return None;
                }
                if track <= 1 {
                    v.extend_from_slice(&[0, 0x14, 1, 0]);
                    v.extend_from_slice(&self.lba_or_msf(0, msf));
                }
                v.extend_from_slice(&[0, 0x16, 0xaa, 0]);
                v.extend_from_slice(&self.lba_or_msf(leadout, msf));
            }
            1 => {
                v.extend_from_slice(&[0, 0x14, 1, 0]);
                v.extend_from_slice(&self.lba_or_msf(0, msf));
            }
            _ => {
                // Raw TOC: session 1, points A0 (first track), A1 (last
                // track), A2 (lead-out) and track 1, addresses in MSF.
                v[3] = 1; // first and last session
                let lo = self.lba_or_msf(leadout, true);
                for (point, pmsf) in [
                    (0xa0u8, [1u8, 0, 0]),
                    (0xa1, [1, 0, 0]),
                    (0xa2, [lo[1], lo[2], lo[3]]),
                    (0x01, [0, 2, 0]),
                ] {
                    v.extend_from_slice(&[1, 0x14, 0, point, 0, 0, 0, 0]);
                    v.extend_from_slice(&pmsf);
                }
            }
        }
        let len = (v.len() - 2) as u16;
        v[..2].copy_from_slice(&len.to_be_bytes());
        Some(v)
    }

    fn current_profile(&self, st: &State) -> u16 {
        match st.blocks() {
            0 => 0,
            b if b > CD_MAX_BLOCKS => PROFILE_DVDROM,
            _ => PROFILE_CDROM,
        }
    }

    /// GET CONFIGURATION (MMC-5 5.2 features): profile list, core,
    /// morphing, removable medium, random readable, CD read, DVD read.
    fn get_configuration(&self, st: &State, rt: u8, start: u16) -> Vec<u8> {
        let cur = self.current_profile(st);
        let feature = |code: u16, version: u8, current: bool, data: &[u8]| {
            let mut f = code.to_be_bytes().to_vec();
            f.push(version << 2 | 0x02 | current as u8); // persistent bit set
            f.push(data.len() as u8);
            f.extend_from_slice(data);
            (code, current, f)
        };
        let mut profiles = Vec::new();
        for p in [PROFILE_DVDROM, PROFILE_CDROM] {
            profiles.extend_from_slice(&p.to_be_bytes());
            profiles.extend_from_slice(&[(p == cur) as u8, 0]);
        }
        let has = cur != 0;
        let lock = if st.locked { 1 } else { 0 };
        let features = [
            feature(0x0000, 0, true, &profiles),
            // Core: physical interface ATAPI (2) or SCSI (1), INQ2 | DBE.
            feature(
                0x0001,
                1,
                true,
                &[
                    0,
                    0,
                    0,
                    if self.transport == Transport::Atapi {
                        2
                    } else {
                        1
                    },
                    0x03,
                    0,
                    0,
                    0,
                ],
            ),
            feature(0x0002, 1, true, &[0x02, 0, 0, 0]),
            // Removable medium: tray loader, eject, lock, lock state.
            feature(0x0003, 0, true, &[0x29 | lock << 1, 0, 0, 0]),
            feature(0x0010, 0, has, &[0, 0, 0x08, 0, 0, 0x10, 0, 0]),
            feature(0x001e, 2, cur == PROFILE_CDROM, &[0, 0, 0, 0]),
            feature(0x001f, 0, cur == PROFILE_DVDROM, &[]),
        ];
        let mut v = vec![0u8; 8];
        v[6..8].copy_from_slice(&cur.to_be_bytes());
        for (code, current, bytes) in features {
            let wanted = match rt {
                0 => code >= start,
                1 => code >= start && current,
                _ => code == start,
            };
            if wanted {
                v.extend(bytes);
            }
        }
        let len = (v.len() - 4) as u32;
        v[..4].copy_from_slice(&len.to_be_bytes());
        v
    }

    /// GET EVENT STATUS NOTIFICATION, polled, media class (MMC-5 6.7.2.5).
    /// Reporting an event consumes it.
    fn event_status(&self, st: &mut State, class_mask: u8) -> Vec<u8> {
        const MEDIA_CLASS: u8 = 1 << 4;
        if class_mask & MEDIA_CLASS == 0 {
            // No requested class is supported: NEA set, no event data.
            return vec![0, 2, 0x80, MEDIA_CLASS];
        }
        let code = match std::mem::take(&mut st.event) {
            MediaEvent::None => 0,
            MediaEvent::EjectRequest => 1,
            MediaEvent::NewMedia => 2,
            MediaEvent::MediaRemoval => 3,
        };
        let status = (st.medium().is_some() as u8) << 1 | st.tray_open as u8;
        vec![0, 6, 0x04, MEDIA_CLASS, code, status, 0, 0]
    }

    /// READ DISC INFORMATION (MMC-5 6.22.3.1): a finalized disc with one
    /// complete session of one track.
    fn disc_info(&self) -> Vec<u8> {
        let mut v = vec![0u8; 34];
        v[1] = 32;
        v[2] = 0x0e; // last session complete, disc complete
        v[3] = 1; // first track
        v[4] = 1; // sessions (LSB)
        v[5] = 1; // first track in last session
        v[6] = 1; // last track in last session
        v[7] = 0x20; // unrestricted use
        v[8] = 0x00; // CD-DA or CD-ROM
                     // Last possible lead-out start: unknown.
        v[20..24].fill(0xff);
        v
    }
}

impl Lun for CdRom {
    fn execute(&self, cdb: &[u8]) -> Plan {
        let mut st = self.lock();
        let parsed = Command::parse(cdb).and_then(|c| self.accepts(&c, cdb[0]).map(|()| c));
        if st.settling != Settling::Ready
            && parsed.as_ref().is_ok_and(|c| c.needs_medium())
            && st.medium().is_some()
        {
            let s = match st.settling {
                Settling::NotReady => Sense::NO_MEDIUM,
                _ => Sense::MEDIUM_CHANGED,
            };
            st.settling = match st.settling {
                Settling::NotReady => Settling::Attention,
                _ => Settling::Ready,
            };
            return st.sense.conclude(Plan::Check(s));
        }
        let plan = match st.sense.admit(parsed) {
            Err(s) => Plan::Check(s),
            Ok(cmd) => match st.not_ready().filter(|_| cmd.needs_medium()) {
                Some(s) => Plan::Check(s),
                None => self.run(&mut st, cmd),
            },
        };
        st.sense.conclude(plan)
    }

    fn data_out(&self, _cmd: &Command, _data: &[u8]) -> Plan {
        // No command of this unit asks for a parameter list.
        self.lock()
            .sense
            .conclude(Plan::Check(Sense::INVALID_OPCODE))
    }

    fn io_failed(&self, failure: IoFailure) -> Sense {
        let s = match failure {
            IoFailure::Read { .. } => Sense::READ_ERROR,
            IoFailure::Overrun => Sense::INVALID_FIELD,
            _ => Sense::IO_ERROR,
        };
        self.lock().sense.failed(s)
    }

    /// A device reset (ATAPI DEVICE RESET, bus reset): removal prevention
    /// is kept (MMC-5 says a reset does not unlock), sense is cleared.
    fn reset(&self) {
        let mut st = self.lock();
        st.sense.clear();
        if self.transport == Transport::Scsi {
            st.sense.set_unit_attention(Sense::POWER_ON_RESET);
        }
    }

    fn backend(&self) -> Option<Arc<BlockBackend>> {
        self.medium()
    }
}

impl crate::media::Removable for CdRom {
    fn backend(&self) -> Option<Arc<BlockBackend>> {
        CdRom::backend(self)
    }
    fn has_tray(&self) -> bool {
        true
    }
    fn tray_open(&self) -> bool {
        CdRom::tray_open(self)
    }
    fn locked(&self) -> bool {
        CdRom::locked(self)
    }
    fn host_open_tray(&self, force: bool) -> bool {
        CdRom::host_open_tray(self, force)
    }
    fn host_close_tray(&self) {
        CdRom::host_close_tray(self)
    }
    fn set_tray_listener(&self, l: TrayListener) {
        CdRom::set_tray_listener(self, l)
    }
}

#[cfg(test)]
mod tests {
    use super::super::cdb::op;
    use super::*;
    use block::backend::BackendConfig;
    use block::graph::BlockGraph;

    fn medium(blocks: u64) -> Arc<BlockBackend> {
        let g = BlockGraph::new();
        let node = g
            .blockdev_add_str(&format!(
                "driver=null-co,node-name=n,read-zeroes=on,size={}",
                blocks * BLOCK
            ))
            .unwrap();
        BlockBackend::new("cd", node, BackendConfig::default()).unwrap()
    }

    fn cdb(bytes: &[u8]) -> [u8; 12] {
        let mut c = [0u8; 12];
        c[..bytes.len()].copy_from_slice(bytes);
        c
    }

    /// The guest's own eject and load: NOT READY while open, ready at
    /// once after its load (it knows the medium moved); a host medium
    /// change: NOT READY once, then UNIT ATTENTION, then ready.
    #[test]
    fn tray_cycles_by_guest_and_host() {
        let cd = CdRom::new(Transport::Atapi, Some(medium(100)));
        assert_eq!(cd.execute(&cdb(&[op::TEST_UNIT_READY])), Plan::Good);
        // Eject: START STOP UNIT, LoEj=1, Start=0.
        assert_eq!(
            cd.execute(&cdb(&[op::START_STOP_UNIT, 0, 0, 0, 2])),
            Plan::Good
        );
        assert_eq!(
            cd.execute(&cdb(&[op::TEST_UNIT_READY])),
            Plan::Check(Sense::NO_MEDIUM_TRAY_OPEN)
        );
        // Load: LoEj=1, Start=1.
        cd.execute(&cdb(&[op::START_STOP_UNIT, 0, 0, 0, 3]));
        assert_eq!(cd.execute(&cdb(&[op::TEST_UNIT_READY])), Plan::Good);
        // The host opens and closes the tray.
        assert!(cd.host_open_tray(false));
        cd.host_close_tray();
        // INQUIRY needs no medium and does not consume the UNIT ATTENTION...
        assert!(matches!(
            cd.execute(&cdb(&[op::INQUIRY, 0, 0, 0, 36])),
            Plan::DataIn(_)
        ));
        assert_eq!(
            cd.execute(&cdb(&[op::TEST_UNIT_READY])),
            Plan::Check(Sense::NO_MEDIUM)
        );
        assert_eq!(
            cd.execute(&cdb(&[op::TEST_UNIT_READY])),
            Plan::Check(Sense::MEDIUM_CHANGED)
        );
        assert_eq!(cd.execute(&cdb(&[op::TEST_UNIT_READY])), Plan::Good);
    }

    #[test]
    fn lock_prevents_eject_and_reads_are_ranges() {
        let cd = CdRom::new(Transport::Atapi, Some(medium(10)));
        cd.execute(&cdb(&[op::PREVENT_ALLOW, 0, 0, 0, 1]));
        assert_eq!(
            cd.execute(&cdb(&[op::START_STOP_UNIT, 0, 0, 0, 2])),
            Plan::Check(Sense::REMOVAL_PREVENTED)
        );
        let r = cd.execute(&cdb(&[op::REQUEST_SENSE, 0, 0, 0, 18]));
        let Plan::DataIn(d) = r else { panic!() };
        assert_eq!((d[2], d[12], d[13]), (5, 0x53, 2));
        assert_eq!(
            cd.execute(&cdb(&[op::READ_10, 0, 0, 0, 0, 9, 0, 0, 1])),
            Plan::Read {
                offset: 9 * 2048,
                len: 2048
            }
        );
        assert_eq!(
            cd.execute(&cdb(&[op::READ_10, 0, 0, 0, 0, 9, 0, 0, 2])),
            Plan::Check(Sense::LBA_OUT_OF_RANGE)
        );
    }

    /// READ CD of user data reads like READ(10); with no fields asked
    /// for (or no blocks) it moves nothing; other fields are refused.
    #[test]
    fn read_cd_user_data_only() {
        let cd = CdRom::new(Transport::Atapi, Some(medium(10)));
        let read_cd = |lba: u8, n: u8, fields: u8| {
            cd.execute(&cdb(&[op::READ_CD, 0, 0, 0, 0, lba, 0, 0, n, fields]))
        };
        assert_eq!(
            read_cd(3, 2, 0x10),
            Plan::Read {
                offset: 3 * 2048,
                len: 2 * 2048
            }
        );
        assert_eq!(read_cd(3, 2, 0x00), Plan::Good);
        assert_eq!(read_cd(0, 0, 0x10), Plan::Good);
        assert_eq!(read_cd(9, 2, 0x10), Plan::Check(Sense::LBA_OUT_OF_RANGE));
        assert_eq!(read_cd(0, 1, 0xf8), Plan::Check(Sense::INVALID_FIELD));
    }

    #[test]
    fn empty_drive_and_host_medium_change() {
        let b = medium(400_000);
        let disc = b.eject().unwrap();
        let cd = CdRom::new(Transport::Atapi, Some(b.clone()));
        let moves = Arc::new(Mutex::new(Vec::new()));
        let m = moves.clone();
        cd.set_tray_listener(Box::new(move |open| m.lock().unwrap().push(open)));
        assert_eq!(
            cd.execute(&cdb(&[op::TEST_UNIT_READY])),
            Plan::Check(Sense::NO_MEDIUM_TRAY_CLOSED)
        );
        let Plan::DataIn(ev) = cd.execute(&cdb(&[op::GET_EVENT_STATUS, 1, 0, 0, 0x10, 0, 0, 0, 8]))
        else {
            panic!()
        };
        assert_eq!((ev[4], ev[5]), (0, 0));
        // Locked by the guest: the host's open only asks.
        assert_eq!(
            cd.execute(&cdb(&[op::PREVENT_ALLOW, 0, 0, 0, 1, 0])),
            Plan::Good
        );
        assert!(!cd.host_open_tray(false));
        assert!(!cd.tray_open());
        assert!(cd.host_open_tray(true), "force overrides the lock");
        b.insert(disc).unwrap();
        cd.host_close_tray();
        assert_eq!(*moves.lock().unwrap(), vec![true, false]);
        let Plan::DataIn(ev) = cd.execute(&cdb(&[op::GET_EVENT_STATUS, 1, 0, 0, 0x10, 0, 0, 0, 8]))
        else {
            panic!()
        };
        assert_eq!((ev[4], ev[5]), (2, 2), "new media, present");
        let Plan::DataIn(cfg) = cd.execute(&cdb(&[op::GET_CONFIGURATION, 0, 0, 0, 0, 0, 0, 1, 0]))
        else {
            panic!()
        };
        assert_eq!(u16::from_be_bytes([cfg[6], cfg[7]]), PROFILE_DVDROM);
        assert_eq!(
            cd.execute(&cdb(&[op::READ_CAPACITY_10])),
            Plan::Check(Sense::NO_MEDIUM),
            "spinning up"
        );
        assert_eq!(
            cd.execute(&cdb(&[op::READ_CAPACITY_10])),
            Plan::Check(Sense::MEDIUM_CHANGED)
        );
        assert_eq!(
            cd.execute(&cdb(&[op::READ_CAPACITY_10])),
            Plan::DataIn(vec![0, 6, 0x1a, 0x7f, 0, 0, 8, 0])
        );
    }

    #[test]
    fn toc_formats() {
        let cd = CdRom::new(Transport::Atapi, Some(medium(1000)));
        let Plan::DataIn(t) = cd.execute(&cdb(&[op::READ_TOC, 0, 0, 0, 0, 0, 0, 0, 100])) else {
            panic!()
        };
        assert_eq!(t.len(), 20);
        assert_eq!(&t[..4], &[0, 18, 1, 1]);
        assert_eq!(&t[12..20], &[0, 0x16, 0xaa, 0, 0, 0, 0x03, 0xe8]);
        let Plan::DataIn(t) = cd.execute(&cdb(&[op::READ_TOC, 2, 0, 0, 0, 0, 0, 0, 100])) else {
            panic!()
        };
        // Lead-out 1000 + 150 frames = 00:15:25.
        assert_eq!(&t[16..20], &[0, 0, 15, 25]);
        let Plan::DataIn(t) = cd.execute(&cdb(&[op::READ_TOC, 0, 1, 0, 0, 0, 0, 0, 100])) else {
            panic!()
        };
        assert_eq!(&t[..4], &[0, 10, 1, 1]);
        let Plan::DataIn(t) = cd.execute(&cdb(&[op::READ_TOC, 0, 2, 0, 0, 0, 0, 0, 200])) else {
            panic!()
        };
        assert_eq!(t.len(), 4 + 4 * 11);
        assert_eq!(
            cd.execute(&cdb(&[op::READ_TOC, 0, 5])),
            Plan::Check(Sense::INVALID_FIELD)
        );
    }

    #[test]
    fn atapi_refuses_sbc_only_commands() {
        let cd = CdRom::new(Transport::Atapi, Some(medium(10)));
        cd.execute(&cdb(&[op::TEST_UNIT_READY]));
        let mut r16 = [0u8; 16];
        r16[0] = op::READ_16;
        r16[13] = 1;
        assert_eq!(cd.execute(&r16), Plan::Check(Sense::INVALID_OPCODE));
        assert_eq!(
            cd.execute(&cdb(&[op::READ_6, 0, 0, 0, 1])),
            Plan::Check(Sense::INVALID_OPCODE)
        );
        assert_eq!(
            cd.execute(&cdb(&[op::WRITE_10, 0, 0, 0, 0, 0, 0, 0, 1])),
            Plan::Check(Sense::INVALID_OPCODE)
        );
        assert_eq!(
            cd.execute(&cdb(&[op::START_STOP_UNIT, 0, 0, 0, 0x20])),
            Plan::Check(Sense::INVALID_FIELD)
        );
        // A SCSI CD-ROM reads with READ(6).
        let cd = CdRom::new(Transport::Scsi, Some(medium(10)));
        cd.execute(&cdb(&[op::TEST_UNIT_READY]));
        assert_eq!(
            cd.execute(&cdb(&[op::READ_6, 0, 0, 3, 1])),
            Plan::Read {
                offset: 3 * 2048,
                len: 2048
            }
        );
    }
}
