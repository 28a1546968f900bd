//! A small client for QEMU's qtest protocol, as `strata -accel qtest` speaks
//! it. The test listens on a Unix socket; strata connects to it.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Qtest {
    child: Child,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// `IRQ raise N` / `IRQ lower N` lines received so far, as (gsi, level).
    pub irqs: VecDeque<(u32, bool)>,
}

impl Qtest {
    /// Starts strata with the qtest accelerator and `extra` arguments.
    pub fn start(extra: &[&str]) -> Qtest {
        Self::start_env(extra, &[])
    }

    /// Like [`Qtest::start`], with extra environment variables for strata.
    #[allow(dead_code)]
    pub fn start_env(extra: &[&str], env: &[(&str, &str)]) -> Qtest {
        Self::start_machine("pc", extra, env)
    }

    /// Like [`Qtest::start_env`] on `machine` (`q35`, say).
    #[allow(dead_code)]
    pub fn start_machine(machine: &str, extra: &[&str], env: &[(&str, &str)]) -> Qtest {
        let dir = super::scratch("qtest");
        let sock = dir.join("qtest.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let mut args = vec![
            "-machine".to_string(),
            format!("{machine},accel=qtest"),
            "-qtest".to_string(),
            format!("unix:{}", sock.display()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(super::strata_bin())
            .args(&args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn strata");
        listener.set_nonblocking(false).unwrap();
        let (stream, _) = listener.accept().expect("strata did not connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Qtest {
            child,
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            irqs: VecDeque::new(),
        }
    }

    /// Waits up to `timeout` for strata to exit; its status if it did.
    #[allow(dead_code)]
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = std::time::Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// How long [`Qtest::cmd`] waits for a reply before failing.
    #[allow(dead_code)]
    pub fn set_reply_timeout(&self, d: Duration) {
        // The reader is a clone of the same socket: the option is shared.
        self.writer.set_read_timeout(Some(d)).unwrap();
    }

    /// The process id of the strata under test.
    #[allow(dead_code)]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A memory figure of the strata under test, in KiB, from
    /// `/proc/PID/status` (`field` is e.g. `VmRSS` or `VmHWM`).
    #[allow(dead_code)]
    pub fn proc_status_kib(&self, field: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/PID/status"))
    }

    /// Sends one command and returns the reply line (without IRQ lines).
    pub fn cmd(&mut self, line: &str) -> String {
        writeln!(self.writer, "{line}").unwrap();
        loop {
            let mut reply = String::new();
            let n = self.reader.read_line(&mut reply).expect("qtest read");
            assert!(n > 0, "strata closed the qtest channel after '{line}'");
            let reply = reply.trim_end().to_string();
            if let Some(rest) = reply.strip_prefix("IRQ ") {
                let (what, n) = rest.split_once(' ').unwrap();
                self.irqs.push_back((n.parse().unwrap(), what == "raise"));
                continue;
            }
            return reply;
        }
    }

    fn ok_value(&mut self, line: &str) -> u64 {
        let r = self.cmd(line);
        let v = r
            .strip_prefix("OK ")
            .unwrap_or_else(|| panic!("'{line}' failed: {r}"));
        u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap()
    }

    fn ok(&mut self, line: &str) {
        let r = self.cmd(line);
        assert_eq!(r, "OK", "'{line}'");
    }

    pub fn outb(&mut self, port: u16, v: u8) {
        self.ok(&format!("outb 0x{port:x} 0x{v:x}"))
    }
    pub fn outw(&mut self, port: u16, v: u16) {
        self.ok(&format!("outw 0x{port:x} 0x{v:x}"))
    }
    pub fn outl(&mut self, port: u16, v: u32) {
        self.ok(&format!("outl 0x{port:x} 0x{v:x}"))
    }
    pub fn inb(&mut self, port: u16) -> u8 {
        self.ok_value(&format!("inb 0x{port:x}")) as u8
    }
    pub fn inw(&mut self, port: u16) -> u16 {
        self.ok_value(&format!("inw 0x{port:x}")) as u16
    }
    pub fn inl(&mut self, port: u16) -> u32 {
        self.ok_value(&format!("inl 0x{port:x}")) as u32
    }
    pub fn readb(&mut self, addr: u64) -> u8 {
        self.ok_value(&format!("readb 0x{addr:x}")) as u8
    }
    pub fn readl(&mut self, addr: u64) -> u32 {
        self.ok_value(&format!("readl 0x{addr:x}")) as u32
    }
    pub fn writel(&mut self, addr: u64, v: u32) {
        self.ok(&format!("writel 0x{addr:x} 0x{v:x}"))
    }
    pub fn writeq(&mut self, addr: u64, v: u64) {
        self.ok(&format!("writeq 0x{addr:x} 0x{v:x}"))
    }

    pub fn memread(&mut self, addr: u64, len: usize) -> Vec<u8> {
        let r = self.cmd(&format!("read 0x{addr:x} {len}"));
        let hex = r
            .strip_prefix("OK 0x")
            .unwrap_or_else(|| panic!("read failed: {r}"));
        (0..len)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect()
    }

    pub fn memwrite(&mut self, addr: u64, data: &[u8]) {
        let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
        self.ok(&format!("write 0x{addr:x} {} 0x{hex}", data.len()))
    }

    pub fn clock_step(&mut self, ns: u64) -> u64 {
        let r = self.cmd(&format!("clock_step {ns}"));
        r.strip_prefix("OK ").unwrap().parse().unwrap()
    }

    /// PCI config read through 0xcf8/0xcfc.
    pub fn pci_read32(&mut self, dev: u8, func: u8, reg: u8) -> u32 {
        self.outl(
            0xcf8,
            0x8000_0000 | (dev as u32) << 11 | (func as u32) << 8 | (reg as u32 & 0xfc),
        );
        self.inl(0xcfc)
    }
    pub fn pci_write32(&mut self, dev: u8, func: u8, reg: u8, v: u32) {
        self.outl(
            0xcf8,
            0x8000_0000 | (dev as u32) << 11 | (func as u32) << 8 | (reg as u32 & 0xfc),
        );
        self.outl(0xcfc, v)
    }
    pub fn pci_read8(&mut self, dev: u8, func: u8, reg: u8) -> u8 {
        self.outl(
            0xcf8,
            0x8000_0000 | (dev as u32) << 11 | (func as u32) << 8 | (reg as u32 & 0xfc),
        );
        self.inb(0xcfc + (reg as u16 & 3))
    }
    pub fn pci_write8(&mut self, dev: u8, func: u8, reg: u8, v: u8) {
        self.outl(
            0xcf8,
            0x8000_0000 | (dev as u32) << 11 | (func as u32) << 8 | (reg as u32 & 0xfc),
        );
        self.outb(0xcfc + (reg as u16 & 3), v)
    }

    /// Reads `len` bytes of fw_cfg item `key` through the I/O ports.
    pub fn fw_cfg_read(&mut self, key: u16, len: usize) -> Vec<u8> {
        self.outw(0x510, key);
        (0..len).map(|_| self.inb(0x511)).collect()
    }

    /// The selector and size of fw_cfg file `name`, from the directory
    /// (key 0x19: big-endian count, then 64-byte entries).
    pub fn fw_cfg_file_entry(&mut self, name: &str) -> Option<(u16, usize)> {
        let count = u32::from_be_bytes(self.fw_cfg_read(0x19, 4).try_into().unwrap()) as usize;
        let dir = self.fw_cfg_read(0x19, 4 + 64 * count);
        fw_cfg_dir_lookup(&dir, name)
    }

    /// An fw_cfg file's contents, found through the directory.
    pub fn fw_cfg_file(&mut self, name: &str) -> Option<Vec<u8>> {
        let (key, size) = self.fw_cfg_file_entry(name)?;
        Some(self.fw_cfg_read(key, size))
    }

    pub fn cmos(&mut self, index: u8) -> u8 {
        self.outb(0x70, index);
        self.inb(0x71)
    }
}

/// Looks `name` up in an fw_cfg directory (the bytes of key 0x19):
/// returns its selector and size.
pub fn fw_cfg_dir_lookup(dir: &[u8], name: &str) -> Option<(u16, usize)> {
    let count = u32::from_be_bytes(dir.get(0..4)?.try_into().unwrap()) as usize;
    (0..count).find_map(|i| {
        let e = dir.get(4 + i * 64..4 + (i + 1) * 64)?;
        let n = &e[8..];
        let end = n.iter().position(|&b| b == 0).unwrap_or(n.len());
        (&n[..end] == name.as_bytes()).then(|| {
            (
                u16::from_be_bytes([e[4], e[5]]),
                u32::from_be_bytes(e[0..4].try_into().unwrap()) as usize,
            )
        })
    })
}

impl Qtest {
    /// Closes the qtest channel and waits up to `limit` for strata to exit
    /// on its own; returns how long it took, or None if it was still
    /// running (the drop then kills it).
    #[allow(dead_code)]
    pub fn close_and_wait_exit(mut self, limit: Duration) -> Option<Duration> {
        let _ = self.writer.shutdown(std::net::Shutdown::Both);
        let t = std::time::Instant::now();
        while t.elapsed() < limit {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Some(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Qtest {
    fn drop(&mut self) {
        let _ = self.writer.shutdown(std::net::Shutdown::Both);
        // strata exits when the channel closes; make sure it does.
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
