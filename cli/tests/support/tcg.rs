//! The project's Linux test guest under QEMU 7.2 with TCG (software
//! emulation): a real Linux driver in front of something Strata does not
//! emulate itself, e.g. a vhost-user backend (QEMU is the frontend then).
//! QEMU comes from bench/qemu-local.sh, which fetches Debian's build into
//! bench/out/qemu without installing it (installing would replace the
//! machine's qemu-utils).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The qemu-system-x86_64 wrapper of bench/qemu-local.sh, fetched once per
/// test process. `None` (after a loud SKIPPED line naming `test`) only when
/// the download failed for lack of network (the script's exit status 75);
/// any other failure fails the test.
pub fn qemu_system(test: &str) -> Option<PathBuf> {
    static QEMU: OnceLock<Option<PathBuf>> = OnceLock::new();
    let q = QEMU.get_or_init(|| {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/qemu-local.sh");
        let out = Command::new("sh")
            .arg(&script)
            .stdin(Stdio::null())
            .output()
            .expect("run bench/qemu-local.sh");
        let stderr = String::from_utf8_lossy(&out.stderr);
        match out.status.code() {
            Some(0) => Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())),
            Some(75) => {
                eprintln!("bench/qemu-local.sh: {stderr}");
                None
            }
            _ => panic!("bench/qemu-local.sh failed ({}):\n{stderr}", out.status),
        }
    });
    if q.is_none() {
        eprintln!(
            "SKIPPED {test}: QEMU 7.2 could not be downloaded (no network); this TCG test did not run"
        );
    }
    q.clone()
}

/// What one boot under TCG left behind.
pub struct TcgBoot {
    /// COM1, as the guest wrote it.
    pub console: String,
    /// QEMU's own standard error (vhost-user and device errors land here).
    pub stderr: String,
    /// Launch to GUEST-DONE or GUEST-ERR (or to QEMU's exit).
    pub elapsed: Duration,
}

/// Boots the Linux test guest (bzImage and images/out/linux-lane.cpio)
/// under `qemu` with TCG and no default devices, with `extra` arguments
/// (memory, devices, memory backends) and `append` after the console on
/// the kernel command line. Waits for GUEST-DONE or GUEST-ERR, then gives
/// the guest a moment to power off (ACPI S5 ends QEMU) and kills QEMU if
/// it has not; kills it and fails after `timeout`. Working files go to
/// `dir` (console.log, qemu.stderr).
/// Memory is QEMU's default (128 MiB) unless `extra` says otherwise: a
/// vhost-user device needs all of it shared with the backend
/// (`-object memory-backend-memfd,share=on` and `-machine memory-backend=`).
pub fn boot(qemu: &Path, dir: &Path, extra: &[String], append: &str, timeout: Duration) -> TcgBoot {
    let log = dir.join("console.log");
    let err = dir.join("qemu.stderr");
    let _ = std::fs::remove_file(&log);
    let kernel = super::kernels::linux("bzImage");
    let initrd = super::image("linux-lane.cpio");
    let mut args: Vec<String> = [
        "-accel",
        "tcg",
        // Debian's QEMU 7.2 looks for the BIOS next to its data files,
        // which qemu-local.sh does not fetch; SeaBIOS is a test dependency.
        "-bios",
        super::BIOS,
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        &format!("file:{}", log.display()),
        "-kernel",
        &kernel,
        "-initrd",
        &initrd.display().to_string(),
        "-append",
        &format!("console=ttyS0 {append}"),
    ]
    .map(String::from)
    .to_vec();
    args.extend_from_slice(extra);
    let mut vm = Command::new(qemu)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("spawn qemu-system-x86_64");
    let read = |p: &Path| {
        std::fs::read(p)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    let start = Instant::now();
    let elapsed = loop {
        let out = read(&log);
        if out.contains("GUEST-DONE") || out.contains("GUEST-ERR") {
            break start.elapsed();
        }
        if vm.try_wait().unwrap().is_some() {
            break start.elapsed();
        }
        if start.elapsed() > timeout {
            let _ = vm.kill();
            let _ = vm.wait();
            panic!(
                "the guest under TCG did not finish within {timeout:?}; console:\n{out}\nQEMU's stderr:\n{}",
                read(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // The guest powers off right after GUEST-DONE; a GUEST-ERR guest goes
    // on to its other items, which the caller does not want to wait for.
    let grace = Instant::now();
    while vm.try_wait().unwrap().is_none() {
        if grace.elapsed() > Duration::from_secs(5) {
            let _ = vm.kill();
            let _ = vm.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    TcgBoot {
        console: read(&log),
        stderr: read(&err),
        elapsed,
    }
}
