//! Live migration, Strata to Strata (QEMU's `migrate` and `-incoming`
//! for a machine whose every part can move): stop-and-copy over a unix or
//! TCP socket, in Strata's own stream format ([`stream`]).
//!
//! What moves: guest RAM and ROM, the state of every device the machine
//! registered ([`VmState`], from `devices::migration`), the run state and
//! the clock. Images stay where they are: the source drains and writes
//! back its block nodes and lets go of their locks before sending, the
//! destination opens them inactive and activates them once the stream is
//! loaded (`block::graph`). What cannot move blocks a migration, each
//! blocker named (a device without state, a format that cannot re-read
//! its metadata, a KVM guest: vCPU, LAPIC, IOAPIC, PIT and kvmclock
//! state are not saved yet, so only `-accel qtest` machines migrate).

pub mod run;
pub mod stream;

/// Why a KVM guest cannot migrate yet.
pub const KVM_BLOCKER: &str = "Strata cannot migrate KVM guests yet: vCPU registers, LAPIC, IOAPIC, PIT and kvmclock state are not saved (only -accel qtest machines migrate)";

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::Arc;

use devices::migration::Migratable;
use devices::GuestMem;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use stream::{Record, RAM_CHUNK};

const PAGE: usize = 4096;

/// The machine's migratable parts: device sections by stable id, and why
/// the machine cannot migrate, if it cannot.
#[derive(Default)]
pub struct VmState {
    sections: Vec<(String, Arc<dyn Migratable>)>,
    blockers: Vec<String>,
    /// A stream was loaded and the devices have not resumed since: their
    /// halted I/O is issued again once, at the next run.
    loaded: std::sync::atomic::AtomicBool,
}

impl VmState {
    /// Register a device under `id` (unique on the machine).
    pub fn register(&mut self, id: impl Into<String>, dev: Arc<dyn Migratable>) {
        self.sections.push((id.into(), dev));
    }

    /// Record a reason the machine cannot migrate.
    pub fn block(&mut self, reason: impl Into<String>) {
        self.blockers.push(reason.into());
    }

    /// Why the machine cannot migrate (empty: it can).
    pub fn blockers(&self) -> &[String] {
        &self.blockers
    }

    /// The registered ids, in order.
    pub fn ids(&self) -> Vec<&str> {
        self.sections.iter().map(|(i, _)| i.as_str()).collect()
    }

    /// Every section's record.
    pub fn save_all(&self) -> Result<Vec<Record>, String> {
        self.sections
            .iter()
            .map(|(id, d)| {
                Ok(Record::Device {
                    id: id.clone(),
                    version: d.version(),
                    state: d.save().map_err(|e| format!("saving '{id}': {e}"))?,
                })
            })
            .collect()
    }

    /// Load what the stream brought: every registered section exactly
    /// once, nothing unknown; then every device's post-load step.
    pub fn load_all(&self, sections: &[(String, u32, Vec<u8>)]) -> Result<(), String> {
        let mut seen = vec![false; self.sections.len()];
        for (id, version, state) in sections {
            let i = self
                .sections
                .iter()
                .position(|(s, _)| s == id)
                .ok_or_else(|| format!("Unknown savevm section '{id}'"))?;
            if std::mem::replace(&mut seen[i], true) {
                return Err(format!("section '{id}' came twice"));
            }
            self.sections[i]
                .1
                .load(*version, state)
                .map_err(|e| format!("loading '{id}': {e}"))?;
        }
        if let Some(i) = seen.iter().position(|s| !s) {
            return Err(format!(
                "the stream has no state for '{}'",
                self.sections[i].0
            ));
        }
        for (_, d) in &self.sections {
            d.post_load();
        }
        self.loaded
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// The VM runs on this side after a load: devices re-issue the I/O
    /// the source had halted. Only the first run after a load: on a VM
    /// that was never migrated, `cont` retries parked requests through
    /// the block backends instead, and issuing them here too would
    /// issue them twice.
    pub fn resume_all(&self) {
        if !self.loaded.swap(false, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        for (_, d) in &self.sections {
            d.resume();
        }
    }
}

/// `-device` types whose state travels in another section: a disk on an
/// AHCI port is part of the AHCI controller's.
const MIGRATES_WITH_ITS_BUS: &[&str] = &["ide-hd"];

/// The devices of `-device`, `-drive` and `device_add` that block a
/// migration (QEMU's "non-migratable device" blockers).
pub fn device_blockers(devs: &[crate::device::Realized]) -> Vec<String> {
    devs.iter()
        .filter(|d| !MIGRATES_WITH_ITS_BUS.contains(&d.ty.name))
        .map(|d| match &d.id {
            Some(id) => format!(
                "State blocked by non-migratable device '{}' (id '{id}')",
                d.ty.name
            ),
            None => format!("State blocked by non-migratable device '{}'", d.ty.name),
        })
        .collect()
}

/// Where a migration goes (`unix:PATH`, `tcp:HOST:PORT`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Uri {
    Unix(String),
    Tcp(String),
}

impl Uri {
    /// QEMU's URI syntax, for the transports Strata has.
    pub fn parse(s: &str) -> Result<Uri, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(format!("invalid migration URI '{s}': no socket path"));
            }
            return Ok(Uri::Unix(p.to_string()));
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            if !a.contains(':') {
                return Err(format!("invalid migration URI '{s}': use tcp:HOST:PORT"));
            }
            return Ok(Uri::Tcp(a.to_string()));
        }
        let proto = s.split(':').next().unwrap_or(s);
        Err(format!("unknown migration protocol: {proto}"))
    }
}

/// A connection either way.
pub trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

/// How long the source waits for a destination that neither reads nor
/// answers: the migration runs on the main loop, which must not hang.
pub const PEER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Connect to a destination.
pub fn connect(uri: &Uri) -> Result<Box<dyn Conn>, String> {
    let t = Some(PEER_TIMEOUT);
    match uri {
        Uri::Unix(p) => std::os::unix::net::UnixStream::connect(p)
            .and_then(|s| {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)?;
                Ok(Box::new(s) as Box<dyn Conn>)
            })
            .map_err(|e| format!("Failed to connect to '{p}': {e}")),
        Uri::Tcp(a) => std::net::TcpStream::connect(a.as_str())
            .and_then(|s| {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)?;
                Ok(Box::new(s) as Box<dyn Conn>)
            })
            .map_err(|e| format!("Failed to connect to '{a}': {e}")),
    }
}

/// A bound `-incoming` socket.
pub enum Listener {
    Unix(std::os::unix::net::UnixListener),
    Tcp(std::net::TcpListener),
}

impl Listener {
    /// Bind `uri`. A unix path that exists as a file is replaced, as
    /// QEMU does (libqos hands it a fresh temporary file).
    pub fn bind(uri: &Uri) -> Result<Listener, String> {
        match uri {
            Uri::Unix(p) => {
                let _ = std::fs::remove_file(p);
                std::os::unix::net::UnixListener::bind(p)
                    .map(Listener::Unix)
                    .map_err(|e| format!("-incoming unix:{p}: {e}"))
            }
            Uri::Tcp(a) => std::net::TcpListener::bind(a.as_str())
                .map(Listener::Tcp)
                .map_err(|e| format!("-incoming tcp:{a}: {e}")),
        }
    }

    /// Wait for the source.
    pub fn accept(&self) -> Result<Box<dyn Conn>, String> {
        match self {
            Listener::Unix(l) => l
                .accept()
                .map(|(s, _)| Box::new(s) as Box<dyn Conn>)
                .map_err(|e| e.to_string()),
            Listener::Tcp(l) => l
                .accept()
                .map(|(s, _)| Box::new(s) as Box<dyn Conn>)
                .map_err(|e| e.to_string()),
        }
    }
}

/// The RAM layout a stream's configuration records, for the destination
/// to compare with its own.
pub fn ram_layout(ram: &GuestMem) -> serde_json::Value {
    serde_json::Value::Array(
        ram.iter()
            .map(|r| serde_json::json!({"gpa": r.start_addr().0, "len": r.len()}))
            .collect(),
    )
}

/// What was sent, for `query-migrate`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sent {
    pub bytes: u64,
    pub normal_pages: u64,
    pub zero_pages: u64,
}

/// The last migration, as `query-migrate` shows it.
#[derive(Clone, Debug, Default)]
pub struct Info {
    /// QAPI `MigrationStatus` (`None`: there was none).
    pub status: Option<&'static str>,
    pub total_ms: u64,
    /// How long the guest was stopped for it.
    pub downtime_ms: u64,
    pub sent: Sent,
    /// Guest RAM bytes.
    pub ram_total: u64,
    pub error: Option<String>,
    /// Why the machine cannot migrate (listed while it cannot).
    pub blocked: Vec<String>,
}

impl Info {
    /// QMP's `MigrationInfo`.
    pub fn to_json(&self) -> serde_json::Value {
        let Some(status) = self.status else {
            if self.blocked.is_empty() {
                return serde_json::json!({});
            }
            return serde_json::json!({"blocked-reasons": self.blocked});
        };
        let mut v = serde_json::json!({"status": status});
        if matches!(status, "completed" | "failed" | "cancelled") {
            let secs = (self.total_ms.max(1)) as f64 / 1000.0;
            v["total-time"] = self.total_ms.into();
            v["downtime"] = self.downtime_ms.into();
            v["setup-time"] = 0.into();
            v["ram"] = serde_json::json!({
                "transferred": self.sent.bytes,
                "total": self.ram_total,
                "remaining": 0,
                "duplicate": self.sent.zero_pages,
                "normal": self.sent.normal_pages,
                "normal-bytes": self.sent.normal_pages * PAGE as u64,
                "page-size": PAGE,
                "mbps": (self.sent.bytes as f64 * 8.0 / 1e6) / secs,
                "dirty-sync-count": 1,
            });
        }
        if let Some(e) = &self.error {
            v["error-desc"] = e.clone().into();
        }
        v
    }
}

/// Send RAM: runs of zero pages as one record each, data in chunks.
fn send_ram(w: &mut dyn Write, ram: &GuestMem, sent: &mut Sent) -> std::io::Result<u64> {
    let mut records = 0u64;
    let mut buf = vec![0u8; RAM_CHUNK];
    for (i, r) in ram.iter().enumerate() {
        let base = r.start_addr();
        let len = r.len();
        let mut off = 0u64;
        // A zero run waiting to be sent: (start, len).
        let mut zero: Option<(u64, u64)> = None;
        while off < len {
            let n = (len - off).min(RAM_CHUNK as u64) as usize;
            ram.read_slice(&mut buf[..n], GuestAddress(base.0 + off))
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let mut p = 0usize;
            while p < n {
                // A run of pages of one kind.
                let is_zero = |q: usize| buf[q..(q + PAGE).min(n)].iter().all(|&b| b == 0);
                let z = is_zero(p);
                let mut q = p;
                while q < n && is_zero(q) == z {
                    q += PAGE;
                }
                let q = q.min(n);
                let at = off + p as u64;
                if z {
                    sent.zero_pages += ((q - p) / PAGE) as u64;
                    zero = match zero {
                        Some((s, l)) if s + l == at => Some((s, l + (q - p) as u64)),
                        other => {
                            if let Some((s, l)) = other {
                                stream::write_record(
                                    w,
                                    &Record::RamZero {
                                        region: i as u32,
                                        offset: s,
                                        len: l,
                                    },
                                )?;
                                records += 1;
                            }
                            Some((at, (q - p) as u64))
                        }
                    };
                } else {
                    if let Some((s, l)) = zero.take() {
                        stream::write_record(
                            w,
                            &Record::RamZero {
                                region: i as u32,
                                offset: s,
                                len: l,
                            },
                        )?;
                        records += 1;
                    }
                    stream::write_record(
                        w,
                        &Record::RamPages {
                            region: i as u32,
                            offset: at,
                            data: buf[p..q].to_vec(),
                        },
                    )?;
                    records += 1;
                    sent.normal_pages += ((q - p) / PAGE) as u64;
                    sent.bytes += (q - p) as u64;
                }
                p = q;
            }
            off += n as u64;
        }
        if let Some((s, l)) = zero {
            stream::write_record(
                w,
                &Record::RamZero {
                    region: i as u32,
                    offset: s,
                    len: l,
                },
            )?;
            records += 1;
        }
    }
    Ok(records)
}

/// Send the whole stream: configuration, RAM, ROM, device sections, end.
/// Then wait for the destination's answer.
pub fn send(
    conn: &mut dyn Conn,
    config: serde_json::Value,
    ram: &GuestMem,
    rom: &GuestMem,
    sections: Vec<Record>,
) -> Result<Sent, String> {
    let mut sent = Sent::default();
    if let Err(e) = write_stream(conn, config, ram, rom, sections, &mut sent) {
        // The destination may have refused and said why before closing.
        return Err(match read_answer(conn) {
            Err(why) if why.starts_with("the destination failed") => why,
            _ => e,
        });
    }
    read_answer(conn).map(|()| sent)
}

/// The whole stream as bytes (for seeds and tests).
pub fn encode(
    config: serde_json::Value,
    ram: &GuestMem,
    rom: &GuestMem,
    sections: Vec<Record>,
) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    write_stream(&mut out, config, ram, rom, sections, &mut Sent::default())?;
    Ok(out)
}

fn write_stream(
    conn: &mut dyn Write,
    config: serde_json::Value,
    ram: &GuestMem,
    rom: &GuestMem,
    sections: Vec<Record>,
    sent: &mut Sent,
) -> Result<(), String> {
    let io = |e: std::io::Error| format!("sending the migration stream: {e}");
    let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut *conn);
    stream::write_header(&mut w).map_err(io)?;
    stream::write_record(&mut w, &Record::Config(config)).map_err(io)?;
    let ram_records = send_ram(&mut w, ram, sent).map_err(io)?;
    let mut image = Vec::new();
    for r in rom.iter() {
        let mut b = vec![0u8; r.len() as usize];
        rom.read_slice(&mut b, r.start_addr())
            .map_err(|e| format!("reading the ROM: {e}"))?;
        image.extend_from_slice(&b);
    }
    stream::write_record(&mut w, &Record::Rom(image)).map_err(io)?;
    let devices = sections.len() as u64;
    for s in &sections {
        stream::write_record(&mut w, s).map_err(io)?;
    }
    stream::write_record(
        &mut w,
        &Record::End {
            ram_records,
            devices,
        },
    )
    .map_err(io)?;
    w.flush().map_err(io)
}

/// The destination's answer: `Ok` once it has loaded everything.
fn read_answer(conn: &mut dyn Conn) -> Result<(), String> {
    let mut line = String::new();
    BufReader::new((&mut *conn).take(64 << 10))
        .read_line(&mut line)
        .map_err(|e| format!("waiting for the destination: {e}"))?;
    let v: serde_json::Value = serde_json::from_str(line.trim())
        .map_err(|_| "the destination closed the connection without loading".to_string())?;
    if v["ok"] == serde_json::Value::Bool(true) {
        Ok(())
    } else {
        Err(format!(
            "the destination failed to load the migration: {}",
            v["error"].as_str().unwrap_or("no reason given")
        ))
    }
}

/// What a destination received, before the main loop loads it.
pub struct Received {
    pub config: serde_json::Value,
    pub sections: Vec<(String, u32, Vec<u8>)>,
}

fn check_layout(config: &serde_json::Value, ram: &GuestMem) -> Result<(), String> {
    let theirs = &config["ram"];
    let ours = ram_layout(ram);
    if *theirs != ours {
        return Err(format!(
            "RAM layout mismatch: the source has {theirs}, this machine {ours} (start both with the same -m and -machine)"
        ));
    }
    Ok(())
}

/// Receive a stream into `ram` and `rom` (RAM as it comes; device
/// sections are collected for the main loop). Every offset is checked
/// against the regions before anything is written.
pub fn receive(conn: &mut dyn Read, ram: &GuestMem, rom: &GuestMem) -> Result<Received, String> {
    let mut r = BufReader::with_capacity(1 << 20, conn);
    stream::read_header(&mut r)?;
    let config = match stream::read_record(&mut r)? {
        Record::Config(c) => c,
        _ => return Err("the stream does not start with its configuration".into()),
    };
    check_layout(&config, ram)?;
    let regions: Vec<(u64, u64)> = ram.iter().map(|g| (g.start_addr().0, g.len())).collect();
    let place = |region: u32, offset: u64, len: u64| -> Result<u64, String> {
        let (base, size) = *regions
            .get(region as usize)
            .ok_or_else(|| format!("RAM region {region} does not exist"))?;
        match offset.checked_add(len) {
            Some(e) if e <= size => Ok(base + offset),
            _ => Err(format!(
                "RAM record at {offset:#x}+{len:#x} is outside region {region}"
            )),
        }
    };
    let (mut ram_records, mut sections) = (0u64, Vec::new());
    let zero = vec![0u8; RAM_CHUNK];
    let mut buf = vec![0u8; RAM_CHUNK];
    loop {
        match stream::read_record(&mut r)? {
            Record::RamPages {
                region,
                offset,
                data,
            } => {
                let gpa = place(region, offset, data.len() as u64)?;
                ram.write_slice(&data, GuestAddress(gpa))
                    .map_err(|e| format!("writing RAM: {e}"))?;
                ram_records += 1;
            }
            Record::RamZero {
                region,
                offset,
                len,
            } => {
                let gpa = place(region, offset, len)?;
                // Pages this side never touched are zero already: read
                // before writing, so that they stay unbacked.
                let mut done = 0u64;
                while done < len {
                    let n = (len - done).min(RAM_CHUNK as u64) as usize;
                    let at = GuestAddress(gpa + done);
                    ram.read_slice(&mut buf[..n], at)
                        .map_err(|e| format!("reading RAM: {e}"))?;
                    if buf[..n].iter().any(|&b| b != 0) {
                        ram.write_slice(&zero[..n], at)
                            .map_err(|e| format!("writing RAM: {e}"))?;
                    }
                    done += n as u64;
                }
                ram_records += 1;
            }
            Record::Rom(image) => {
                let total: u64 = rom.iter().map(|g| g.len()).sum();
                if image.len() as u64 != total {
                    return Err(format!(
                        "ROM size mismatch: {} != {total} (start both with the same -bios)",
                        image.len()
                    ));
                }
                let mut at = 0usize;
                for g in rom.iter() {
                    let n = g.len() as usize;
                    rom.write_slice(&image[at..at + n], g.start_addr())
                        .map_err(|e| format!("writing the ROM: {e}"))?;
                    at += n;
                }
            }
            Record::Device { id, version, state } => sections.push((id, version, state)),
            Record::End {
                ram_records: want_ram,
                devices,
            } => {
                if want_ram != ram_records || devices != sections.len() as u64 {
                    return Err(format!(
                        "the stream ended with {ram_records} RAM records and {} sections where the source sent {want_ram} and {devices}",
                        sections.len()
                    ));
                }
                return Ok(Received { config, sections });
            }
            Record::Config(_) => return Err("a second configuration record".into()),
        }
    }
}

/// Read and drop what the peer still sends, until it closes or 10
/// seconds pass (a destination that refused the stream lets the source
/// finish writing, so that it reads the answer).
pub fn drain(conn: &mut dyn Conn) {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut buf = vec![0u8; 1 << 16];
    while std::time::Instant::now() < end {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

/// The destination's answer line.
pub fn answer(conn: &mut dyn Write, result: &Result<(), String>) {
    let v = match result {
        Ok(()) => serde_json::json!({"ok": true}),
        Err(e) => serde_json::json!({"error": e}),
    };
    let _ = writeln!(conn, "{v}");
    let _ = conn.flush();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn mem(ranges: &[(u64, usize)]) -> GuestMem {
        let r: Vec<(GuestAddress, usize)> =
            ranges.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
        GuestMem::from_ranges(&r).unwrap()
    }

    #[derive(Default)]
    struct Dev(u32);
    impl devices::migration::DeviceState for Dev {
        const VERSION: u32 = 1;
        type State = u32;
        fn save_state(&self) -> u32 {
            self.0
        }
        fn load_state(&mut self, s: u32, _v: u32) -> Result<(), String> {
            self.0 = s;
            Ok(())
        }
    }

    #[test]
    fn a_machine_image_moves_through_a_socket_pair() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let src_ram = mem(&[(0, 4 << 20), (1 << 32, 2 << 20)]);
        src_ram
            .write_slice(&[7u8; 10000], GuestAddress(12288))
            .unwrap();
        src_ram
            .write_slice(&[9u8; 3], GuestAddress((1 << 32) + 5))
            .unwrap();
        let src_rom = mem(&[(0xfffc_0000, 256 << 10)]);
        src_rom
            .write_slice(&[0xea; 16], GuestAddress(0xffff_fff0))
            .unwrap();
        let dev = Arc::new(Mutex::new(Dev(42)));
        let mut vs = VmState::default();
        vs.register("dev", dev.clone());
        let dst_ram = mem(&[(0, 4 << 20), (1 << 32, 2 << 20)]);
        // Something the destination had that the source has not.
        dst_ram
            .write_slice(&[1u8; 8], GuestAddress(3 << 20))
            .unwrap();
        let dst_rom = mem(&[(0xfffc_0000, 256 << 10)]);
        let (dr, drom) = (dst_ram.clone(), dst_rom.clone());
        let t = std::thread::spawn(move || {
            let mut b = b;
            let got = receive(&mut b, &dr, &drom);
            let res = got.as_ref().map(|_| ()).map_err(|e| e.clone());
            answer(&mut b, &res);
            got
        });
        let mut a = a;
        let cfg = serde_json::json!({"ram": ram_layout(&src_ram)});
        let sent = send(&mut a, cfg, &src_ram, &src_rom, vs.save_all().unwrap()).unwrap();
        assert!(sent.normal_pages >= 3 && sent.zero_pages > 1000);
        let got = t.join().unwrap().unwrap();
        let mut x = vec![0u8; 10000];
        dst_ram.read_slice(&mut x, GuestAddress(12288)).unwrap();
        assert!(x.iter().all(|&v| v == 7));
        let mut y = [0u8; 8];
        dst_ram.read_slice(&mut y, GuestAddress(3 << 20)).unwrap();
        assert_eq!(y, [0; 8], "zero runs clear what the destination had");
        dst_ram
            .read_slice(&mut y[..3], GuestAddress((1 << 32) + 5))
            .unwrap();
        assert_eq!(&y[..3], &[9, 9, 9]);
        let mut v = [0u8; 16];
        dst_rom
            .read_slice(&mut v, GuestAddress(0xffff_fff0))
            .unwrap();
        assert_eq!(v, [0xea; 16]);
        let dev2 = Arc::new(Mutex::new(Dev(0)));
        let mut vs2 = VmState::default();
        vs2.register("dev", dev2.clone());
        vs2.load_all(&got.sections).unwrap();
        assert_eq!(dev2.lock().unwrap().0, 42);
        // Unknown, missing and doubled sections are refused.
        let mut vs3 = VmState::default();
        vs3.register("other", Arc::new(Mutex::new(Dev(0))));
        assert!(vs3.load_all(&got.sections).is_err());
        assert!(vs3.load_all(&[]).is_err());
        let twice = vec![got.sections[0].clone(), got.sections[0].clone()];
        assert!(vs2.load_all(&twice).is_err());
    }

    #[derive(Default)]
    struct Resumes(u32);
    impl devices::migration::DeviceState for Resumes {
        const VERSION: u32 = 1;
        type State = ();
        fn save_state(&self) {}
        fn load_state(&mut self, _s: (), _v: u32) -> Result<(), String> {
            Ok(())
        }
        fn resume(&mut self) {
            self.0 += 1;
        }
    }

    #[test]
    fn devices_resume_once_after_a_load_only() {
        let d = Arc::new(Mutex::new(Resumes::default()));
        let mut vs = VmState::default();
        vs.register("d", d.clone());
        // A `cont` on a VM that was never migrated: nothing re-issued.
        vs.resume_all();
        assert_eq!(d.lock().unwrap().0, 0);
        let s = vs.save_all().unwrap();
        let secs: Vec<(String, u32, Vec<u8>)> = s
            .into_iter()
            .map(|r| match r {
                Record::Device { id, version, state } => (id, version, state),
                _ => unreachable!(),
            })
            .collect();
        vs.load_all(&secs).unwrap();
        vs.resume_all();
        vs.resume_all();
        assert_eq!(d.lock().unwrap().0, 1);
    }

    #[test]
    fn a_different_layout_is_refused_and_uris_parse() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let src = mem(&[(0, 1 << 20)]);
        let dst = mem(&[(0, 2 << 20)]);
        let rom = mem(&[(0xffff_0000, 64 << 10)]);
        let r2 = rom.clone();
        let t = std::thread::spawn(move || {
            let mut b = b;
            let got = receive(&mut b, &dst, &r2).map(|_| ());
            answer(&mut b, &got);
            got
        });
        let mut a = a;
        let e = send(
            &mut a,
            serde_json::json!({"ram": ram_layout(&src)}),
            &src,
            &rom,
            Vec::new(),
        );
        // The destination refused at the configuration: the source sees
        // an error (a broken pipe or the answer).
        assert!(e.is_err());
        assert!(t
            .join()
            .unwrap()
            .unwrap_err()
            .contains("RAM layout mismatch"));
        assert_eq!(
            Uri::parse("unix:/tmp/x").unwrap(),
            Uri::Unix("/tmp/x".into())
        );
        assert_eq!(
            Uri::parse("tcp:127.0.0.1:4444").unwrap(),
            Uri::Tcp("127.0.0.1:4444".into())
        );
        assert!(Uri::parse("exec:cat")
            .unwrap_err()
            .contains("unknown migration protocol: exec"));
        assert!(Uri::parse("unix:").is_err());
    }
}
