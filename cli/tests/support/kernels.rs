//! The project's test kernels (images/build.sh), built once per test run,
//! and its Linux test guest (images/linux-kernel).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The directory holding testkernel.bzImage, testkernel-pvh.elf and
/// testkernel-mb.elf.
pub fn dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let images = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../images");
        let out = Command::new("sh")
            .arg(images.join("build.sh"))
            .output()
            .expect("run images/build.sh");
        assert!(
            out.status.success(),
            "images/build.sh failed (needs gcc and binutils):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        images.join("out")
    })
    .clone()
}

pub fn path(name: &str) -> String {
    dir().join(name).display().to_string()
}

/// FNV-1a 32, as the test kernel computes it.
pub fn fnv(data: &[u8]) -> u32 {
    data.iter()
        .fold(2166136261u32, |h, &b| (h ^ b as u32).wrapping_mul(16777619))
}

/// The Linux test guest's kernel command line. `clearcpuid=` must come
/// from the boot loader (the kernel parses it before its built-in line):
/// this host's KVM shows the guest CPUID features whose instructions crash
/// it in ring 0. The rest trims boot time where ring 0 is slow.
pub const LINUX_CMDLINE: &str = "console=ttyS0 lpj=1000000 tsc=reliable no_timer_check \
clearcpuid=xsave,smap,fsgsbase,rdrand,rdseed,popcnt,invpcid,pcid,rdpid,erms,fsrm \
rodata=off";

/// A file of the project's Linux test guest kernel (`vmlinux`, `bzImage`),
/// built from Debian's linux-source-6.1 by images/linux-kernel/build.sh
/// and cached outside the checkout. `make guest` (part of `make test`)
/// builds it first; here an up-to-date cache answers at once, and a
/// missing one is built (several minutes).
pub fn linux(file: &str) -> String {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../images/linux-kernel/build.sh");
        let out = Command::new(&script)
            .stderr(Stdio::inherit())
            .output()
            .expect("run images/linux-kernel/build.sh");
        assert!(out.status.success(), "images/linux-kernel/build.sh failed");
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    });
    let p = dir.join(file);
    assert!(p.exists(), "{} was not built", p.display());
    p.display().to_string()
}

/// strata's arguments for booting the Linux test guest: `kernel`
/// (`vmlinux` or `bzImage`) with the project's initramfs and `append`,
/// 64 MiB, no default devices, COM1 into the file `serial_log`.
pub fn linux_args(kernel: &str, serial_log: &std::path::Path, append: &str) -> Vec<String> {
    let initrd = super::image("linux-lane.cpio").display().to_string();
    [
        "-m",
        "64",
        "-nodefaults",
        "-serial",
        &format!("file:{}", serial_log.display()),
        "-kernel",
        &linux(kernel),
        "-initrd",
        &initrd,
        "-append",
        append,
    ]
    .map(String::from)
    .to_vec()
}

/// The pattern of images/linux-init/init.c's `rwloop=`, for the 8-byte
/// word at byte `off` in round `round`.
pub fn rwloop_pattern(round: u64, off: u64) -> u64 {
    let mut x = (round << 40) ^ off ^ 0x9e37_79b9_7f4a_7c15;
    x ^= x >> 31;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^ (x >> 29)
}

/// Asserts that the first `kib` KiB of the image at `path` hold round
/// `round` of the `rwloop=` pattern, every word of it.
#[allow(dead_code)]
pub fn assert_rwloop_image(path: &std::path::Path, kib: u64, round: u64) {
    let data = std::fs::read(path).unwrap();
    for (i, w) in data[..(kib * 1024) as usize].chunks(8).enumerate() {
        let got = u64::from_le_bytes(w.try_into().unwrap());
        assert_eq!(
            got,
            rwloop_pattern(round, i as u64 * 8),
            "word {i} of the image"
        );
    }
}

/// FNV-1a 64, as images/linux-init/init.c computes it (`check=`).
#[allow(dead_code)]
pub fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The highest `rwloop=` round the guest reported done on `dev`.
pub fn rwloop_rounds(serial: &str, dev: &str) -> u64 {
    let prefix = format!("GUEST-RW {dev} ");
    serial
        .lines()
        .filter_map(|l| l.trim().strip_prefix(prefix.as_str()))
        .filter_map(|l| l.strip_suffix(" ok"))
        .filter_map(|n| n.parse().ok())
        .max()
        .unwrap_or(0)
}

/// Waits until the guest's serial log (`log`) shows GUEST-DONE or
/// GUEST-ERR and returns it; `each` sees the log on every look (to act on
/// the guest's progress). Fails if `vm` exits first or `timeout` passes
/// (the VM is killed then).
pub fn wait_guest_done(
    vm: &mut std::process::Child,
    log: &std::path::Path,
    timeout: std::time::Duration,
    mut each: impl FnMut(&str),
) -> String {
    let start = std::time::Instant::now();
    loop {
        let out = std::fs::read_to_string(log).unwrap_or_default();
        if out.contains("GUEST-DONE") || out.contains("GUEST-ERR") {
            return out;
        }
        each(&out);
        if let Some(s) = vm.try_wait().unwrap() {
            panic!("strata exited ({s}) before GUEST-DONE:\n{out}");
        }
        if start.elapsed() > timeout {
            let _ = vm.kill();
            panic!("GUEST-DONE did not come within {timeout:?}:\n{out}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
