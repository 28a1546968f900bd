//! A floppy drive and its diskette: the head position, the disk-change
//! line, and the medium's format, which follows whatever the backend
//! holds (QMP may change it at any time: a floppy drive has no tray, and
//! the drive notices a new medium by its node, as the change line does).

use std::sync::{Arc, Mutex};

use block::backend::BlockBackend;
use block::node::Node;

use super::geometry::{self, DriveType, Format};
use crate::bus::lock;
use crate::media::{Removable, TrayListener};

pub struct Drive {
    pub kind: DriveType,
    backend: Option<Arc<BlockBackend>>,
    /// The node the drive last saw in the backend (its address), to
    /// notice a medium change.
    seen: usize,
    format: Option<Format>,
    pub track: u8,
    pub head: u8,
    pub sect: u8,
    /// The disk-change line (DIR bit 7): set at power-on and whenever the
    /// medium changes or is missing, cleared by a step with a medium in.
    pub changed: bool,
}

/// Where a seek or an implied seek ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seek {
    /// At the address; `moved`: to another track.
    Done { moved: bool },
    /// No medium (the head moved anyway).
    NoMedium,
    /// Past the medium's last track or head.
    BadTrack,
    /// Past the track's last sector.
    BadSector,
}

fn node_id(n: &Option<Arc<Node>>) -> usize {
    n.as_ref().map_or(0, |n| Arc::as_ptr(n) as usize)
}

impl Drive {
    /// A drive of type `kind` on `backend`; an inserted medium whose size
    /// fits no format is refused.
    pub fn new(kind: DriveType, backend: Option<Arc<BlockBackend>>) -> Result<Drive, String> {
        let mut d = Drive {
            kind,
            backend,
            seen: usize::MAX,
            format: None,
            track: 0,
            head: 0,
            sect: 1,
            changed: true,
        };
        d.refresh();
        if let Some(b) = d.medium() {
            if d.format.is_none() {
                return Err(format!(
                    "drive '{}': an image of {} bytes is larger than any diskette this drive takes",
                    b.id(),
                    b.len()
                ));
            }
        }
        Ok(d)
    }

    /// Notices a medium change: the change line goes up and the format
    /// is taken from the new medium.
    pub fn refresh(&mut self) {
        let root = self.backend.as_ref().and_then(|b| b.root());
        let id = node_id(&root);
        if id == self.seen {
            return;
        }
        self.seen = id;
        self.changed = true;
        self.format = self
            .medium()
            .and_then(|b| geometry::pick(self.kind, b.len()));
    }

    /// The medium, when one is in and the drive can read it.
    pub fn medium(&self) -> Option<&Arc<BlockBackend>> {
        self.backend.as_ref().filter(|b| b.is_inserted())
    }

    pub fn format(&self) -> Option<Format> {
        self.format.filter(|_| self.medium().is_some())
    }

    pub fn read_only(&self) -> bool {
        self.medium().is_none_or(|b| b.is_read_only())
    }

    /// The drive type CMOS reports: an Auto drive's is its medium's, 1.44
    /// MB without one.
    pub fn cmos_code(&self) -> u8 {
        match (self.kind, self.format) {
            (DriveType::Auto, Some(f)) => f.drive.cmos_code(),
            (k, _) => k.cmos_code(),
        }
    }

    pub fn heads(&self) -> u8 {
        self.format().map_or(2, |f| f.heads)
    }

    /// Sectors per track (0xff without a medium, where any address goes).
    pub fn last_sect(&self) -> u8 {
        self.format().map_or(0xff, |f| f.sectors)
    }

    pub fn tracks(&self) -> u8 {
        self.format().map_or(0xff, |f| f.tracks)
    }

    /// The 512-byte sector index of an address on the medium.
    pub fn lba(&self, head: u8, track: u8, sect: u8) -> u64 {
        let f = self.format().unwrap_or(geometry::FORMATS[0]);
        ((track as u64 * f.heads as u64 + head as u64) * f.sectors as u64) + sect as u64 - 1
    }

    /// Moves the head to `track` (and selects `head` and `sect`): what a
    /// SEEK, or a data command's implied seek, does. Stepping to another
    /// track with a medium in clears the change line.
    pub fn seek(&mut self, head: u8, track: u8, sect: u8) -> Seek {
        self.refresh();
        if track >= self.tracks() || head >= self.heads() {
            return Seek::BadTrack;
        }
        if sect == 0 || sect > self.last_sect() {
            return Seek::BadSector;
        }
        let moved = track != self.track;
        self.head = head;
        self.track = track;
        self.sect = sect;
        if self.medium().is_none() {
            return Seek::NoMedium;
        }
        if moved {
            self.changed = false;
        }
        Seek::Done { moved }
    }

    /// SEEK, RECALIBRATE and RELATIVE SEEK: step pulses to `track`,
    /// keeping the selected head and sector where they remain valid.
    pub fn seek_track(&mut self, track: u8) -> Seek {
        self.refresh();
        let head = self.head.min(self.heads() - 1);
        let sect = self.sect.clamp(1, self.last_sect());
        self.seek(head, track, sect)
    }

    /// The change line as DIR shows it: always set without a medium.
    pub fn change_line(&mut self) -> bool {
        self.refresh();
        self.changed || self.medium().is_none()
    }
}

/// A drive as the monitor sees it (no tray: the medium may change any
/// time; the drive notices on its next access).
pub struct FloppyMedium(pub Arc<Mutex<Drive>>);

impl Removable for FloppyMedium {
    fn backend(&self) -> Option<Arc<BlockBackend>> {
        lock(&self.0).backend.clone()
    }
    fn has_tray(&self) -> bool {
        false
    }
    fn tray_open(&self) -> bool {
        true
    }
    fn locked(&self) -> bool {
        false
    }
    fn host_open_tray(&self, _force: bool) -> bool {
        true
    }
    fn host_close_tray(&self) {
        lock(&self.0).refresh();
    }
    fn set_tray_listener(&self, _l: TrayListener) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use block::backend::BackendConfig;
    use block::graph::BlockGraph;

    fn medium(size: u64) -> Arc<BlockBackend> {
        let g = BlockGraph::new();
        let n = g
            .blockdev_add_str(&format!(
                "driver=null-co,node-name=f,size={size},read-zeroes=on"
            ))
            .unwrap();
        BlockBackend::new("fd", n, BackendConfig::default()).unwrap()
    }

    #[test]
    fn change_line_and_seeks() {
        let b = medium(1_474_560);
        let mut d = Drive::new(DriveType::Auto, Some(b.clone())).unwrap();
        assert_eq!((d.tracks(), d.last_sect(), d.heads()), (80, 18, 2));
        assert!(d.change_line(), "set at power-on");
        assert_eq!(d.seek(0, 0, 1), Seek::Done { moved: false });
        assert!(d.change_line(), "no step, still set");
        assert_eq!(d.seek(0, 1, 1), Seek::Done { moved: true });
        assert!(!d.change_line());
        assert_eq!(d.seek(0, 80, 1), Seek::BadTrack);
        assert_eq!(d.seek(0, 1, 19), Seek::BadSector);
        assert_eq!(d.lba(1, 2, 3), (2 * 2 + 1) * 18 + 2);
        // Ejected: the line goes up, and stays up whatever the head does.
        let node = b.eject().unwrap();
        assert!(d.change_line());
        assert_eq!(d.seek(0, 5, 1), Seek::NoMedium);
        assert!(d.change_line());
        b.insert(node).unwrap();
        assert_eq!(d.seek(0, 5, 1), Seek::Done { moved: false });
        assert!(d.change_line());
        assert_eq!(d.seek(0, 6, 1), Seek::Done { moved: true });
        assert!(!d.change_line());
        // An image larger than any diskette is refused.
        assert!(Drive::new(DriveType::Auto, Some(medium(3_000_000))).is_err());
    }
}
