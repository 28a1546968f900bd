//! Helpers for the `strata-img` tests that compare against qemu-img and
//! build images with qemu-io.

use std::path::PathBuf;
use std::process::{Command, Output};

/// Run strata-img.
pub fn strata(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata-img"))
        .args(args)
        .output()
        .unwrap()
}

/// Run any program.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().unwrap()
}

/// Assert success; the standard output.
pub fn ok(o: &Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: exit {:?}\n{}\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// strata-img, which must succeed.
pub fn s_ok(args: &[&str]) -> String {
    ok(&strata(args), &format!("strata-img {args:?}"))
}

/// qemu-img, which must succeed.
pub fn q_ok(args: &[&str]) -> String {
    ok(&run("qemu-img", args), &format!("qemu-img {args:?}"))
}

/// qemu-io `-c` commands on `file` of format `fmt`, which must succeed.
pub fn io(file: &str, fmt: &str, cmds: &[&str]) {
    let mut a = vec!["-f", fmt];
    for c in cmds {
        a.push("-c");
        a.push(c);
    }
    a.push(file);
    ok(&run("qemu-io", &a), &format!("qemu-io {cmds:?}"));
}

/// A scratch directory, removed on drop.
pub struct Dir(pub PathBuf);

impl Dir {
    /// `$TMPDIR/strata-<prefix>-<tag>-<pid>-<n>`, empty (`n` counts the
    /// directories made by this process, so two tests never share one).
    pub fn new(prefix: &str, tag: &str) -> Dir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d =
            std::env::temp_dir().join(format!("strata-{prefix}-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
    /// A path inside.
    pub fn p(&self, name: &str) -> String {
        self.0.join(name).to_str().unwrap().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
