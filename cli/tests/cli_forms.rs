//! Command lines pasted from blogs and libvirt: options that have nothing
//! to do with storage are accepted with QEMU's meaning, accepted with one
//! `strata: warning:` line where Strata lacks the hardware, or refused with
//! one line and exit 1 where the value is wrong. Every run uses the qtest
//! accelerator (no KVM needed): with stdin closed, qtest sees EOF and
//! strata exits 0 once the machine is built.

mod support;

use std::time::Duration;

use support::qtest::Qtest;
use support::run_strata;

const QTEST: &[&str] = &["-machine", "pc,accel=qtest", "-qtest", "stdio"];

fn run(args: &[&str]) -> (Option<i32>, String) {
    support::require_bios();
    let mut all: Vec<&str> = QTEST.to_vec();
    all.extend_from_slice(args);
    let (code, _out, err) = run_strata(&all, Duration::from_secs(30));
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{args:?}: {err}"
    );
    (code, err)
}

/// Accepted silently: exit 0, nothing on stderr.
fn accepted(args: &[&str]) {
    let (code, err) = run(args);
    assert_eq!(code, Some(0), "{args:?}: {err}");
    assert_eq!(err, "", "{args:?}");
}

/// Accepted with one warning line containing `want`.
fn warned(args: &[&str], want: &str) {
    let (code, err) = run(args);
    assert_eq!(code, Some(0), "{args:?}: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got {err}");
    assert!(lines[0].starts_with("strata: warning: "), "{args:?}: {err}");
    assert!(
        lines[0].contains(want),
        "{args:?}: '{}' lacks '{want}'",
        lines[0]
    );
}

/// Refused: exit 1, one line containing `want`.
fn refused(args: &[&str], want: &str) {
    let (code, err) = run(args);
    assert_eq!(code, Some(1), "{args:?}: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got {err}");
    assert!(lines[0].starts_with("strata: "), "{args:?}: {err}");
    assert!(!lines[0].starts_with("strata: warning"), "{args:?}: {err}");
    assert!(
        lines[0].contains(want),
        "{args:?}: '{}' lacks '{want}'",
        lines[0]
    );
}

#[test]
fn cpu() {
    accepted(&["-cpu", "host"]);
    accepted(&["-cpu", "max"]);
    accepted(&["-cpu", "qemu64,+ssse3,-vmx,check=off"]);
    accepted(&["-cpu", "kvm64"]);
    accepted(&["-cpu", "Haswell-noTSX-IBRS,+pcid"]);
    warned(&["-cpu", "frobnitz"], "-cpu frobnitz: unknown CPU model");
    refused(&["-cpu", "host,+"], "-cpu host,+: invalid CPU feature '+'");
    refused(&["-cpu", ",+vmx"], "-cpu ,+vmx: missing CPU model");
}

#[test]
fn network() {
    accepted(&["-nic", "none"]);
    accepted(&["-net", "none"]);
    warned(
        &["-nic", "user,model=virtio-net-pci"],
        "Strata has no network device",
    );
    warned(
        &["-net", "nic,model=e1000"],
        "-net nic,model=e1000: Strata has no network device",
    );
    warned(&["-netdev", "user,id=n0"], "Strata has no network device");
    refused(
        &["-nic", "bogus"],
        "-nic bogus: invalid network backend type 'bogus'",
    );
}

#[test]
fn display() {
    accepted(&["-vga", "none"]);
    accepted(&["-display", "none"]);
    for vga in ["std", "cirrus", "virtio", "qxl"] {
        warned(
            &["-vga", vga],
            &format!("-vga {vga}: Strata has no display device"),
        );
    }
    for d in ["curses", "gtk", "sdl", "vnc=:1", "gtk,gl=on"] {
        warned(
            &["-display", d],
            &format!("-display {d}: Strata has no display"),
        );
    }
    refused(&["-vga", "hercules"], "-vga hercules: invalid VGA type");
    refused(
        &["-display", "hologram"],
        "-display hologram: unknown display type",
    );
}

#[test]
fn rtc_options() {
    accepted(&["-rtc", "base=utc,clock=host,driftfix=slew"]);
    accepted(&["-rtc", "base=localtime,clock=vm,driftfix=none"]);
    accepted(&["-rtc", "base=2006-06-17"]);
    accepted(&["-rtc", "clock=rt"]);
    refused(
        &["-rtc", "base=yesterday"],
        "-rtc base=yesterday: invalid base",
    );
    refused(
        &["-rtc", "clock=wall"],
        "-rtc clock=wall: invalid clock 'wall'",
    );
    refused(
        &["-rtc", "driftfix=fast"],
        "-rtc driftfix=fast: invalid driftfix",
    );
    refused(
        &["-rtc", "speed=2"],
        "-rtc speed=2: unknown property 'speed'",
    );
}

fn cmos(q: &mut Qtest, reg: u8) -> u8 {
    q.outb(0x70, reg);
    q.inb(0x71)
}

fn bcd(v: u8) -> u8 {
    (v >> 4) * 10 + (v & 15)
}

#[test]
fn rtc_base_sets_the_clock() {
    support::require_bios();
    // base=DATE: the RTC starts at that date.
    let mut q = Qtest::start(&["-rtc", "base=2006-06-17T16:01:21", "-nodefaults"]);
    // Register B decides BCD vs binary; SeaBIOS is not running under qtest,
    // so the reset value (BCD, 24-hour) holds.
    let (y, m, d, h) = (
        cmos(&mut q, 9),
        cmos(&mut q, 8),
        cmos(&mut q, 7),
        cmos(&mut q, 4),
    );
    assert_eq!((bcd(y), bcd(m), bcd(d), bcd(h)), (6, 6, 17, 16));
    drop(q);

    // base=localtime in a zone 9 hours east of UTC (POSIX TZ, no tzdata needed).
    let utc_hour = || {
        let s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        ((s / 3600) % 24) as u8
    };
    let before = utc_hour();
    let mut q = Qtest::start_env(
        &["-rtc", "base=localtime", "-nodefaults"],
        &[("TZ", "UTC-9")],
    );
    let h = bcd(cmos(&mut q, 4));
    let after = utc_hour();
    assert!(
        h == (before + 9) % 24 || h == (after + 9) % 24,
        "RTC hour {h}, UTC hour {before}..{after}"
    );
}

#[test]
fn uuid() {
    accepted(&["-uuid", "12345678-9abc-def0-1122-334455667788"]);
    refused(&["-uuid", "not-a-uuid"], "-uuid not-a-uuid: not a UUID");
}

#[test]
fn ignored_and_warned_flags() {
    accepted(&[
        "-no-hpet",
        "-no-user-config",
        "-nodefconfig",
        "-no-shutdown",
        "-k",
        "en-us",
        "-d",
        "guest_errors,unimp",
    ]);
    warned(
        &["-no-acpi"],
        "-no-acpi: Strata always provides ACPI tables",
    );
    // `-usb` builds the board's USB controller now: no warning.
    accepted(&["-usb"]);
    accepted(&["-machine", "usb=on"]);
    warned(&["-vnc", ":0"], "-vnc: Strata has no display");
}

#[test]
fn msg_overcommit_sandbox() {
    accepted(&["-msg", "timestamp=on"]);
    accepted(&["-msg", "timestamp=off,guest-name=on"]);
    accepted(&["-overcommit", "mem-lock=off,cpu-pm=off"]);
    accepted(&["-sandbox", "off"]);
    warned(&["-overcommit", "mem-lock=on"], "-overcommit mem-lock=on");
    warned(
        &[
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ],
        "Strata has no seccomp sandbox",
    );
    refused(
        &["-msg", "colour=on"],
        "-msg colour=on: unknown property 'colour'",
    );
    refused(
        &["-sandbox", "on,spawn=maybe"],
        "-sandbox on,spawn=maybe: invalid spawn",
    );
    refused(&["-overcommit", "mem-lock=maybe"], "-overcommit");
}

#[test]
fn firmware_search_path() {
    let dir = support::scratch("fwpath");
    let l = dir.display().to_string();
    std::fs::copy(support::BIOS, dir.join("renamed-bios.bin")).unwrap();
    accepted(&["-L", &l, "-bios", "renamed-bios.bin"]);
    // QEMU's order does not matter: -L may follow -bios.
    accepted(&["-bios", "renamed-bios.bin", "-L", &l]);
    // Relative names are found in the system's firmware directories too.
    accepted(&["-bios", "bios-256k.bin"]);
    refused(
        &["-bios", "renamed-bios.bin"],
        "-bios renamed-bios.bin: no such file",
    );
    refused(
        &["-L", "/nonexistent/fw"],
        "-L /nonexistent/fw: no such directory",
    );
}

#[test]
fn pidfile_and_log_file() {
    support::require_bios();
    let dir = support::scratch("pidfile");
    let pid = dir.join("strata.pid");
    let log = dir.join("strata.log");
    let (p, l) = (pid.display().to_string(), log.display().to_string());
    let q = Qtest::start(&["-pidfile", &p, "-D", &l, "-nodefaults"]);
    let text = std::fs::read_to_string(&pid).expect("pid file while running");
    let n: u32 = text.trim().parse().expect("a pid");
    assert!(std::path::Path::new(&format!("/proc/{n}")).exists());
    assert!(log.exists(), "-D creates the log file");
    drop(q);
    assert!(!pid.exists(), "the pid file is removed at exit");

    refused(
        &["-pidfile", "/nonexistent/dir/pid"],
        "-pidfile /nonexistent/dir/pid",
    );
    refused(&["-D", "/nonexistent/dir/log"], "-D /nonexistent/dir/log");
    // A daemon's stdio is /dev/null: QEMU's refusals, in one line.
    refused(
        &["-daemonize"],
        "-qtest stdio: cannot use stdio with -daemonize",
    );
    // Without qtest's stdio (these are refused before any machine).
    for (args, want) in [
        (
            &["-daemonize", "-serial", "mon:stdio"][..],
            "strata: -serial mon:stdio: cannot use stdio with -daemonize",
        ),
        (
            &[
                "-daemonize",
                "-chardev",
                "stdio,id=c",
                "-serial",
                "chardev:c",
            ],
            "strata: -chardev stdio,id=c: cannot use stdio with -daemonize",
        ),
        (
            &["-daemonize", "-nographic"],
            "strata: -nographic cannot be used with -daemonize",
        ),
    ] {
        let (code, _, err) = run_strata(args, Duration::from_secs(10));
        assert_eq!((code, err.trim()), (Some(1), want), "{args:?}");
    }
}

/// `-daemonize -pidfile`: the command returns 0 once the machine is set
/// up and its QMP socket listens; the daemon named in the pid file answers
/// QMP with no stdio of ours, and `quit` ends it.
#[test]
fn daemonize_detaches_once_ready() {
    use std::os::unix::net::UnixListener;
    use std::process::{Command, Stdio};
    use std::time::Instant;
    support::require_bios();
    let dir = support::scratch("daemonize");
    let (pid, qmp) = (dir.join("strata.pid"), dir.join("qmp.sock"));
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp.display());
    let pid_arg = pid.display().to_string();
    let mut args = vec![
        "-daemonize",
        "-pidfile",
        &pid_arg,
        "-qmp",
        &qmp_arg,
        "-display",
        "none",
    ];
    // KVM when there is one; otherwise qtest, whose socket this test
    // listens on (the daemon connects to it).
    let qtest_sock = dir.join("qtest.sock");
    let qtest_arg = format!("unix:{}", qtest_sock.display());
    let mut qtest_listener = None;
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if kvm {
        args.extend(["-machine", "pc", "-accel", "kvm"]);
    } else {
        qtest_listener = Some(UnixListener::bind(&qtest_sock).unwrap());
        args.extend(["-machine", "pc", "-accel", "qtest", "-qtest", &qtest_arg]);
    }
    let mut parent = Command::new(support::strata_bin())
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _qtest_conn = qtest_listener.map(|l| l.accept().unwrap().0);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = parent.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the -daemonize parent did not return"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // The daemon let go of our pipes before the parent returned: reading
    // them to the end does not wait for the daemon.
    let out = parent.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(out.stdout.is_empty() && err.is_empty(), "{err}");
    // Ready means listening: the socket exists before the parent returns.
    assert!(qmp.exists(), "the QMP socket listens once the parent exits");
    let n: i32 = std::fs::read_to_string(&pid)
        .expect("pid file")
        .trim()
        .parse()
        .expect("a pid");
    let proc_dir = format!("/proc/{n}");
    assert!(std::path::Path::new(&proc_dir).exists(), "daemon {n} runs");
    // Detached: its own session, away from ours.
    let stat = std::fs::read_to_string(format!("{proc_dir}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit(") ").next().unwrap().split(' ').collect();
    let my_sid = std::fs::read_to_string("/proc/self/stat").unwrap();
    let my_sid: Vec<&str> = my_sid.rsplit(") ").next().unwrap().split(' ').collect();
    assert_ne!(fields[3], my_sid[3], "the daemon has its own session");
    assert_eq!(
        std::fs::read_link(format!("{proc_dir}/fd/0")).unwrap(),
        std::path::PathBuf::from("/dev/null")
    );
    let mut q = support::qmp::Qmp::negotiated(&qmp);
    let st = q.ok("query-status", serde_json::json!({}));
    assert!(st.get("status").is_some(), "{st}");
    q.ok("quit", serde_json::json!({}));
    let start = Instant::now();
    while std::path::Path::new(&proc_dir).exists()
        && !std::fs::read_to_string(format!("{proc_dir}/stat"))
            .unwrap_or_default()
            .contains(") Z")
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "quit did not end the daemon"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!pid.exists(), "the daemon removes its pid file at exit");
}

#[test]
fn bare_image_is_hda() {
    let dir = support::scratch("bare");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let p = img.display().to_string();
    // Opened as a disk: the block layer's raw-probing warning names it
    // (a bare name cannot say format=raw).
    let (code, err) = run(&[&p]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("probing guessed raw") && err.contains(&p),
        "{err}"
    );
    // It is the first IDE disk, so it collides with -hda.
    refused(&[&p, "-hda", &p], "-hda");
    refused(&["/nonexistent/disk.img"], "/nonexistent/disk.img");
}

/// The raw-probing warning: once per writable drive whose format was
/// guessed, in QEMU's form; never for read-only drives and CD-ROMs.
#[test]
fn raw_probe_warning_once_per_writable_drive() {
    let dir = support::scratch("probe-warn");
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    std::fs::write(&a, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&b, vec![0u8; 1 << 20]).unwrap();
    let (a, b) = (a.display().to_string(), b.display().to_string());
    let count = |args: &[&str]| -> (usize, String) {
        let (code, err) = run(args);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        (err.matches("probing guessed raw").count(), err)
    };
    let (n, err) = count(&["-hda", &a]);
    assert_eq!(n, 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "WARNING: Image format was not specified for '{a}' and probing guessed raw.\n"
        )),
        "{err}"
    );
    assert_eq!(err.lines().count(), 3, "{err}");
    let rw_b = format!("file={b},if=virtio");
    let (n, err) = count(&["-hda", &a, "-drive", &rw_b]);
    assert_eq!(n, 2, "{err}");
    assert!(err.contains(&a) && err.contains(&b), "{err}");
    let ro_b = format!("file={b},if=virtio,readonly=on");
    for args in [
        &["-cdrom", &a][..],
        &["-drive", &ro_b],
        &["-cdrom", &a, "-drive", &ro_b],
    ] {
        let (n, err) = count(args);
        assert_eq!(n, 0, "{args:?}: {err}");
        assert_eq!(err, "", "{args:?}");
    }
}

#[test]
fn tcg_is_refused() {
    refused(
        &["-accel", "tcg"],
        "-accel tcg: not supported; Strata runs only on KVM",
    );
    let (code, _, err) = run_strata(&["-machine", "pc,accel=tcg"], Duration::from_secs(10));
    assert_eq!(code, Some(1));
    assert_eq!(
        err.trim(),
        "strata: -machine accel=tcg: not supported; Strata runs only on KVM"
    );
}

#[test]
fn version_is_qemu_shaped() {
    let (code, out, err) = run_strata(&["-version"], Duration::from_secs(10));
    assert_eq!(code, Some(0), "{err}");
    let mut lines = out.lines();
    let first = lines.next().unwrap();
    assert!(
        first.starts_with("QEMU emulator version 7.2.0 (Strata "),
        "{first}"
    );
    // libvirt's parse: the version is the first word after the prefix.
    let v = first["QEMU emulator version ".len()..]
        .split(' ')
        .next()
        .unwrap();
    assert_eq!(v.split('.').count(), 3);
    assert!(lines.next().unwrap().starts_with("Copyright"));
    let (code, out2, _) = run_strata(&["--version"], Duration::from_secs(10));
    assert_eq!((code, out2), (Some(0), out));
}
