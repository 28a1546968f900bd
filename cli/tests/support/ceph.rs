//! A throwaway single-node Ceph cluster for the rbd tests
//! (tests/servers/ceph-cluster.sh: one monitor, one OSD on memstore, on
//! loopback, pool `rbd` made), stopped on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Ceph {
    dir: PathBuf,
    /// Its ceph.conf.
    pub conf: String,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/servers/ceph-cluster.sh")
}

impl Ceph {
    /// Start a cluster whose files live in `dir`.
    pub fn start(dir: &Path) -> Ceph {
        Self::start_with(dir, "none")
    }

    /// Start a cluster whose clients authenticate with cephx.
    pub fn start_cephx(dir: &Path) -> Ceph {
        Self::start_with(dir, "cephx")
    }

    /// client.admin's key (base64), of a cephx cluster.
    pub fn admin_key(&self) -> String {
        std::fs::read_to_string(self.dir.join("admin.key"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// The monitor's v1 (msgr1) port.
    pub fn mon_port(&self) -> String {
        let conf = std::fs::read_to_string(&self.conf).unwrap();
        let at = conf.find("v1:127.0.0.1:").expect("v1 address in ceph.conf") + 13;
        conf[at..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect()
    }

    fn start_with(dir: &Path, auth: &str) -> Ceph {
        // Made first, so that a failed start is stopped too (on drop).
        let mut c = Ceph {
            dir: dir.to_path_buf(),
            conf: String::new(),
        };
        let out = Command::new(script())
            .arg("start")
            .arg(dir)
            .env("AUTH", auth)
            .output()
            .expect("run tests/servers/ceph-cluster.sh (Debian's ceph-mon, ceph-osd: make deps)");
        assert!(
            out.status.success(),
            "the Ceph cluster did not start: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        c.conf = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_string();
        c
    }

    /// `rbd:rbd/IMAGE:conf=...`.
    pub fn name(&self, image: &str) -> String {
        format!("rbd:rbd/{image}:conf={}", self.conf)
    }

    /// Run the `rbd` tool against the cluster; its standard output.
    pub fn rbd(&self, args: &[&str]) -> String {
        let o = Command::new("timeout")
            .args(["120", "rbd", "-c", &self.conf])
            .args(args)
            .output()
            .expect("run rbd (Debian's ceph-common)");
        assert!(
            o.status.success(),
            "rbd {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `rbd export` of `image` into `path`.
    pub fn export(&self, image: &str, path: &str) {
        let _ = std::fs::remove_file(path);
        self.rbd(&["export", &format!("rbd/{image}"), path]);
    }
}

impl Drop for Ceph {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("stop").arg(&self.dir).status();
    }
}
