//! A private `tgtd` (Debian's `tgt`, the Linux SCSI target framework) for
//! the iSCSI tests: its own portal on a free loopback port and its own
//! management socket (`-C N`, `/var/run/tgtd/socket.N`), so tests run in
//! parallel beside each other and beside a system tgtd. Needs root;
//! [`Tgt::available`] says whether it can run here.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// The target name every test target gets.
pub const IQN: &str = "iqn.2024-01.org.strata:test";

/// One tgtd with one target (tid 1) and its LUNs.
pub struct Tgt {
    child: Option<Child>,
    pub port: u16,
    ctl: u16,
    luns: Vec<String>,
    chap: Option<(String, String)>,
    thin: bool,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh node name.
pub fn node_name() -> String {
    static N: AtomicU16 = AtomicU16::new(0);
    format!("iscsi{}", N.fetch_add(1, Ordering::Relaxed))
}

static CTL: AtomicU16 = AtomicU16::new(0);

impl Tgt {
    /// Whether tgtd can run here (installed, and we are root).
    pub fn available() -> bool {
        // SAFETY-free check for root: /proc/self/status's Uid line.
        let root = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .map(|l| l.split_whitespace().nth(1) == Some("0"))
            })
            .unwrap_or(false);
        root && Command::new("tgtd")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Start tgtd serving `luns` (backing files, LUN 1, 2, ...) with CHAP
    /// if `chap` is given; `thin`: thin provisioning (UNMAP) on.
    pub fn start(luns: &[&str], chap: Option<(&str, &str)>, thin: bool) -> Tgt {
        if CTL.load(Ordering::Relaxed) == 0 {
            // Per process, so that parallel test binaries differ too
            // (tgtd takes -C values up to 32767).
            CTL.store(
                1000 + (std::process::id() % 1000) as u16 * 30,
                Ordering::Relaxed,
            );
        }
        // A management socket nobody uses.
        let ctl = loop {
            let c = CTL.fetch_add(1, Ordering::Relaxed);
            if !std::path::Path::new(&format!("/var/run/tgtd/socket.{c}")).exists() {
                break c;
            }
        };
        let mut t = Tgt {
            child: None,
            port: free_port(),
            ctl,
            luns: luns.iter().map(|s| s.to_string()).collect(),
            chap: chap.map(|(u, p)| (u.to_string(), p.to_string())),
            thin,
        };
        t.launch();
        t
    }

    fn adm(&self, args: &[&str]) {
        let ctl = self.ctl.to_string();
        let out = Command::new("tgtadm")
            .args(["-C", &ctl, "--lld", "iscsi"])
            .args(args)
            .output()
            .expect("tgtadm");
        assert!(
            out.status.success(),
            "tgtadm {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn launch(&mut self) {
        let ctl = self.ctl.to_string();
        let child = Command::new("tgtd")
            .args(["-f", "-C", &ctl, "--iscsi"])
            .arg(format!("portal=127.0.0.1:{}", self.port))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tgtd");
        self.child = Some(child);
        let t = Instant::now();
        loop {
            let ok = Command::new("tgtadm")
                .args([
                    "-C", &ctl, "--lld", "iscsi", "--op", "show", "--mode", "sys",
                ])
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "tgtd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        self.adm(&["--op", "new", "--mode", "target", "--tid", "1", "-T", IQN]);
        for (i, f) in self.luns.clone().iter().enumerate() {
            let lun = (i + 1).to_string();
            self.adm(&[
                "--op",
                "new",
                "--mode",
                "logicalunit",
                "--tid",
                "1",
                "--lun",
                &lun,
                "-b",
                f,
            ]);
            if self.thin {
                self.adm(&[
                    "--op",
                    "update",
                    "--mode",
                    "logicalunit",
                    "--tid",
                    "1",
                    "--lun",
                    &lun,
                    "--params",
                    "thin_provisioning=1",
                ]);
            }
        }
        if let Some((u, p)) = self.chap.clone() {
            self.adm(&[
                "--op",
                "new",
                "--mode",
                "account",
                "--user",
                &u,
                "--password",
                &p,
            ]);
            self.adm(&[
                "--op", "bind", "--mode", "account", "--tid", "1", "--user", &u,
            ]);
        }
        self.adm(&[
            "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL",
        ]);
    }

    /// Let the target negotiate CRC32C header digests (tgt offers only
    /// None unless told).
    pub fn allow_header_digest(&self) {
        self.adm(&[
            "--op",
            "update",
            "--mode",
            "target",
            "--tid",
            "1",
            "--name",
            "HeaderDigest",
            "--value",
            "CRC32C,None",
        ]);
    }

    /// `iscsi://127.0.0.1:PORT/IQN/lun`.
    pub fn uri(&self, lun: u32) -> String {
        format!("iscsi://127.0.0.1:{}/{IQN}/{lun}", self.port)
    }

    /// `-blockdev` options for `lun` (a new node name each time).
    pub fn blockdev(&self, lun: u32) -> String {
        format!(
            "node-name={},driver=iscsi,transport=tcp,portal=127.0.0.1:{},target={IQN},lun={lun}",
            node_name(),
            self.port
        )
    }

    /// Send tgtd a signal (`STOP`, `CONT`).
    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let ok = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(c.id().to_string())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "kill -{sig}");
        }
    }

    /// Kill tgtd at once (SIGKILL: its connections reset).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again with the same configuration and port.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }
}

impl Drop for Tgt {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(format!("/var/run/tgtd/socket.{}", self.ctl));
        let _ = std::fs::remove_file(format!("/var/run/tgtd/socket.{}.lock", self.ctl));
    }
}
