//! Shared helpers for the `strata` integration tests.
#![allow(dead_code)]

pub mod bootdisk;
pub mod ceph;
pub mod img;
pub mod kernels;
pub mod nbd;
pub mod qmp;
pub mod qtest;
pub mod tcg;
pub mod virtio;
pub mod web;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn strata_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_strata"))
}

pub const BIOS: &str = "/usr/share/seabios/bios-256k.bin";

/// Whether KVM can be used here. When it cannot, the caller prints a loud
/// SKIPPED line and returns: a KVM test never passes silently.
pub fn kvm_available(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        eprintln!(
            "SKIPPED {test}: /dev/kvm is missing or not accessible; this KVM test did not run"
        );
    }
    ok
}

pub fn require_bios() {
    assert!(
        Path::new(BIOS).exists(),
        "{BIOS} is missing: install the Debian package seabios (make test does)"
    );
}

/// A fresh scratch directory under the target dir.
pub fn scratch(name: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs strata with `args`, returning its output; kills it after `timeout`.
pub fn run_strata(args: &[&str], timeout: Duration) -> (Option<i32>, String, String) {
    let mut child = Command::new(strata_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn strata");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let Output { stdout, stderr, .. } = child.wait_with_output().unwrap();
    (
        status,
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// Runs strata with `args` and SeaBIOS's debug log (isa-debugcon on port
/// 0x402) in a file, until `marker` appears in that log; returns the log.
pub fn until_seabios_log(name: &str, args: &[&str], marker: &str, timeout: Duration) -> String {
    let log = scratch(name).join("debug.log");
    let dbg = format!("file:{}", log.display());
    let mut all = vec!["-debugcon", &dbg, "-global", "isa-debugcon.iobase=0x402"];
    all.extend_from_slice(args);
    run_until_marker(&all, &log, marker, timeout)
}

/// `text` without ANSI/VT100 control sequences (`ESC [ ... final`, `ESC
/// x`): what a terminal shows, in the order it was written. GRUB moves the
/// cursor inside words it redraws ("W", then `ESC[04;02H`, then "elcome").
#[allow(dead_code)]
pub fn plain_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut it = text.chars().peekable();
    while let Some(c) = it.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        // `ESC x` drops x; `ESC [` also drops the parameters and
        // intermediates up to the final byte.
        if it.next() == Some('[') {
            for x in it.by_ref() {
                if ('@'..='~').contains(&x) {
                    break;
                }
            }
        }
    }
    out
}

/// Runs strata until `marker` appears in the file `watch` (or `timeout`),
/// then kills it. Returns the file's contents.
pub fn run_until_marker(args: &[&str], watch: &Path, marker: &str, timeout: Duration) -> String {
    run_until(args, watch, marker, |t| t.contains(marker), timeout)
}

/// Runs strata until `done` holds for the contents of `watch`, then kills
/// it; `what` describes the condition in failure messages.
pub fn run_until(
    args: &[&str],
    watch: &Path,
    what: &str,
    done: impl Fn(&str) -> bool,
    timeout: Duration,
) -> String {
    run_until_env(args, &[], watch, what, done, timeout)
}

/// [`run_until`] with variables added to strata's environment.
pub fn run_until_env(
    args: &[&str],
    env: &[(&str, &str)],
    watch: &Path,
    what: &str,
    done: impl Fn(&str) -> bool,
    timeout: Duration,
) -> String {
    let marker = what;
    let mut child = Command::new(strata_bin())
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn strata");
    let start = Instant::now();
    loop {
        let text = std::fs::read(watch)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if done(&text) || start.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            if !done(&text) {
                panic!(
                    "'{marker}' did not appear within {timeout:?}; output so far:\n{text}\nstderr:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            return text;
        }
        if let Ok(Some(s)) = child.try_wait() {
            let out = child.wait_with_output().unwrap();
            let text = std::fs::read(watch)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            if done(&text) {
                return text;
            }
            panic!(
                "strata exited ({s}) before '{marker}'; output:\n{text}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Held by each firmware boot of a test process ([`boot_until`]).
pub static BOOTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Boots strata with `-nodefaults -m 256`, COM1 into `dir/serial.log`,
/// and `args`, until one of `markers` shows on COM1 (terminal controls
/// dropped); returns that text. One boot at a time per test process: the
/// machine has two cores and a firmware boot keeps one busy.
pub fn boot_until(dir: &Path, args: &[&str], markers: &[&str], timeout: Duration) -> String {
    boot_until_env(dir, args, &[], markers, timeout)
}

/// [`boot_until`] with variables added to strata's environment.
pub fn boot_until_env(
    dir: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    markers: &[&str],
    timeout: Duration,
) -> String {
    let _one = BOOTS.lock().unwrap_or_else(|e| e.into_inner());
    let log = dir.join("serial.log");
    let _ = std::fs::remove_file(&log);
    let serial = format!("file:{}", log.display());
    let mut all = vec!["-nodefaults", "-m", "256", "-serial", &serial];
    all.extend_from_slice(args);
    let out = run_until_env(
        &all,
        env,
        &log,
        &markers.join(" or "),
        |t| {
            let t = plain_text(t);
            markers.iter().any(|m| t.contains(m))
        },
        timeout,
    );
    plain_text(&out)
}

/// Builds the project's test media (images/build.sh, cached) and returns
/// the path of `name` under images/out/.
pub fn image(name: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let st = Command::new(root.join("images/build.sh"))
        .status()
        .expect("run images/build.sh");
    assert!(st.success(), "images/build.sh failed");
    let p = root.join("images/out").join(name);
    assert!(p.exists(), "{} was not built", p.display());
    p
}
