//! The guest's writes, kept apart from the synthesized image: a sparse,
//! unlinked temporary file (sector N at byte N * 512, so runs of sectors
//! move in one call) and one bit per sector saying which sectors it
//! holds. This is what QEMU keeps in its qcow write target; memory stays
//! at the bitmap (128 KiB for the 504 MiB disk) however much the guest
//! writes, and the file never grows past the disk's size.

use super::SECTOR;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

/// Sectors the guest wrote.
#[derive(Debug)]
pub struct Overlay {
    file: File,
    bits: Vec<u64>,
    sectors: u64,
}

impl Overlay {
    /// An empty overlay for a disk of `sectors` sectors, its file in
    /// `$TMPDIR`, else /var/tmp (as QEMU's write target: /tmp may be a
    /// tmpfs, and the overlay can grow to the disk's size), unlinked at
    /// once.
    pub fn new(sectors: u64) -> io::Result<Overlay> {
        Ok(Overlay {
            file: temp_file()?,
            bits: vec![0; sectors.div_ceil(64) as usize],
            sectors,
        })
    }

    /// Whether sector `s` was written.
    pub fn contains(&self, s: u64) -> bool {
        s < self.sectors && self.bits[(s / 64) as usize] & (1 << (s % 64)) != 0
    }

    /// How many sectors from `s` (at most `max`) share sector `s`'s
    /// presence.
    pub fn run(&self, s: u64, max: u64) -> u64 {
        let want = self.contains(s);
        let mut n = 1;
        while n < max && self.contains(s + n) == want {
            n += 1;
        }
        n
    }

    /// Read sectors from `s` (all present) into `buf`.
    pub fn read(&self, s: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, s * SECTOR)
    }

    /// Store `data` (whole sectors) at sector `s`.
    pub fn write(&mut self, s: u64, data: &[u8]) -> io::Result<()> {
        let n = data.len() as u64 / SECTOR;
        if s + n > self.sectors {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.file.write_all_at(data, s * SECTOR)?;
        for k in s..s + n {
            self.bits[(k / 64) as usize] |= 1 << (k % 64);
        }
        Ok(())
    }

    /// Forget sectors `s..s + n` (their bytes are now elsewhere).
    pub fn forget(&mut self, s: u64, n: u64) {
        for k in s..(s + n).min(self.sectors) {
            self.bits[(k / 64) as usize] &= !(1 << (k % 64));
        }
    }

    /// Whether any of sectors `s..s + n` was written.
    pub fn any(&self, s: u64, n: u64) -> bool {
        (s..s + n).any(|k| self.contains(k))
    }

    /// Whether all of sectors `s..s + n` were written.
    pub fn all(&self, s: u64, n: u64) -> bool {
        (s..s + n).all(|k| self.contains(k))
    }
}

/// An unlinked file in `$TMPDIR` or /var/tmp: O_TMPFILE where the file
/// system has it, else a new file removed at once.
fn temp_file() -> io::Result<File> {
    let dir = std::env::var_os("TMPDIR")
        .filter(|d| !d.is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/var/tmp".into());
    let r = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o600)
        .open(&dir);
    if let Ok(f) = r {
        return Ok(f);
    }
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    loop {
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = dir.join(format!(".strata-vvfat-{}-{n}", std::process::id()));
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
        {
            Ok(f) => {
                let _ = std::fs::remove_file(&p);
                return Ok(f);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sectors_come_back() {
        let mut o = Overlay::new(1000).unwrap();
        assert!(!o.contains(5));
        o.write(5, &[7u8; 1024]).unwrap();
        assert!(o.contains(5) && o.contains(6) && !o.contains(7));
        assert_eq!(o.run(5, 10), 2);
        assert_eq!(o.run(7, 10), 10);
        let mut b = [0u8; 1024];
        o.read(5, &mut b).unwrap();
        assert_eq!(b, [7u8; 1024]);
        assert!(o.any(0, 6) && !o.all(0, 6) && o.all(5, 2));
        o.forget(5, 1);
        assert!(!o.contains(5) && o.contains(6));
        assert!(o.write(999, &[0u8; 1024]).is_err());
        assert!(!o.contains(5000));
    }
}
