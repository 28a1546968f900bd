//! The vhost-user-blk data path with a real Linux virtio driver: the
//! project's Linux test guest runs under QEMU 7.2 with TCG (support::tcg),
//! QEMU is the vhost-user frontend, and a storage daemon serves a raw image
//! as a `--export type=vhost-user-blk`. The guest's virtio_blk writes a
//! pattern with O_DIRECT and reads it back (init's `rwloop=`); the host
//! then checks the image itself, word by word and with `strata-img
//! compare` / `qemu-img compare` against a file it wrote.
//!
//! The daemon is a parameter ([`rwloop_through`]): the same case runs
//! against strata-storage-daemon and against Debian's qemu-storage-daemon
//! (the same option grammar).
//!
//! TCG needs neither KVM nor this host's ring-0 emulation: a boot to
//! GUEST-DONE takes about a second here.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::img::{q_ok, s_ok};
use support::{kernels, scratch, tcg};

/// The image: 8 MiB. The guest rewrites the first half `ROUNDS` times;
/// the second half must come through untouched.
const IMAGE_BYTES: u64 = 8 << 20;
const RW_KIB: u64 = 4096;
const ROUNDS: u64 = 3;
/// A boot with the rwloop takes ~1 s here; the margin is for a loaded
/// host (TCG runs on one core, which the other tests' builds share).
const TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn strata_storage_daemon_rwloop() {
    rwloop_through(
        "strata_storage_daemon_rwloop",
        Path::new(env!("CARGO_BIN_EXE_strata-storage-daemon")),
    );
}

#[test]
fn qemu_storage_daemon_rwloop() {
    rwloop_through(
        "qemu_storage_daemon_rwloop",
        Path::new("/usr/bin/qemu-storage-daemon"),
    );
}

/// What the image holds before the guest runs: round 0 of the rwloop
/// pattern, inverted. The guest's rounds start at 1, so no word of it is
/// what the guest would write, in any round.
fn initial(off: u64) -> u64 {
    !kernels::rwloop_pattern(0, off)
}

/// The image after the guest's last round: that round's pattern over the
/// first `RW_KIB` KiB, the initial words after.
fn expected() -> Vec<u8> {
    (0..IMAGE_BYTES / 8)
        .map(|i| i * 8)
        .flat_map(|off| {
            let w = if off < RW_KIB * 1024 {
                kernels::rwloop_pattern(ROUNDS, off)
            } else {
                initial(off)
            };
            w.to_le_bytes()
        })
        .collect()
}

/// A vhost-user-blk export of `image` on the unix socket `sock` by
/// `program` (qemu-storage-daemon's option grammar), with `queues`
/// virtqueues: a file node, a raw node on it, the export.
fn daemon_args(image: &Path, sock: &Path, queues: u32) -> Vec<String> {
    vec![
        "--blockdev".into(),
        format!("driver=file,node-name=file0,filename={}", image.display()),
        "--blockdev".into(),
        "driver=raw,node-name=disk0,file=file0".into(),
        "--export".into(),
        format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on,num-queues={queues}",
            sock.display()
        ),
    ]
}

/// The storage daemon under test, stopped with SIGTERM (a clean close:
/// the image is flushed and unlocked) when dropped.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `program` with `args`; returns once `sock` exists. Not a
    /// probe connection: a vhost-user backend serves one frontend at a
    /// time, and the bind and listen of the export come together.
    fn start(program: &Path, args: &[String], sock: &Path, log: PathBuf) -> Daemon {
        let _ = std::fs::remove_file(sock);
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        let mut d = Daemon { child, log };
        let t = Instant::now();
        while !sock.exists() {
            if let Some(s) = d.child.try_wait().unwrap() {
                panic!(
                    "{} exited ({s}) before listening:\n{}",
                    program.display(),
                    d.output()
                );
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "{} never created {}:\n{}",
                program.display(),
                sock.display(),
                d.output()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        d
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, and the daemon's exit status and output.
    fn stop(mut self) -> (Option<i32>, String) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let t = Instant::now();
        let code = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s.code();
            }
            if t.elapsed() > Duration::from_secs(10) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (code, self.output())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Only when a failing test unwinds past it: stop() waited already.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The whole case against the storage daemon `program`: the guest's rwloop
/// on /dev/vda through the daemon's vhost-user-blk export, then the image
/// checked from the host.
/// The scratch directory, the image (filled with `initial`) and the
/// socket path of test `name`. The socket is in /tmp, not the scratch
/// directory: a unix socket's path has at most 107 bytes, and a CI
/// machine's target directory may be deep.
fn prepare(name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let dir = scratch(name);
    let image = dir.join("disk.raw");
    let sock = std::env::temp_dir().join(format!("strata-{name}-{}.sock", std::process::id()));
    let before: Vec<u8> = (0..IMAGE_BYTES / 8)
        .flat_map(|i| initial(i * 8).to_le_bytes())
        .collect();
    std::fs::write(&image, before).unwrap();
    (dir, image, sock)
}

/// QEMU's side: vhost-user maps all of guest RAM in the back end, so it
/// is a shared file mapping (memfd), not QEMU's anonymous memory; the
/// chardev reconnects (`reconnect=1`) when asked to.
fn qemu_args(sock: &Path, reconnect: bool) -> Vec<String> {
    let reconnect = if reconnect { ",reconnect=1" } else { "" };
    [
        "-object",
        "memory-backend-memfd,id=mem,size=256M,share=on",
        "-machine",
        "pc,memory-backend=mem",
        "-m",
        "256M",
        "-chardev",
        &format!("socket,id=vu,path={}{reconnect}", sock.display()),
        "-device",
        "vhost-user-blk-pci,chardev=vu,num-queues=1",
    ]
    .map(String::from)
    .to_vec()
}

/// The guest finished without an error and its rwloop ran `rounds` rounds.
fn assert_guest_rounds(console: &str, rounds: u64, context: &str) {
    assert!(
        console.contains("GUEST-DONE") && !console.contains("GUEST-ERR"),
        "the guest failed:\n{context}"
    );
    assert_eq!(
        kernels::rwloop_rounds(console, "vda"),
        rounds,
        "rounds:\n{context}"
    );
}

fn rwloop_through(name: &str, program: &Path) {
    let Some(qemu) = tcg::qemu_system(name) else {
        return;
    };
    let (dir, image, sock) = prepare(name);
    let expect = dir.join("expected.raw");
    std::fs::write(&expect, expected()).unwrap();

    let daemon = Daemon::start(
        program,
        &daemon_args(&image, &sock, 1),
        &sock,
        dir.join("daemon.log"),
    );
    let extra = qemu_args(&sock, false);
    // show=: the size the driver read from the backend's config space (a
    // vhost-user GET_CONFIG) and the feature bits it negotiated.
    let append = format!(
        "quiet rwloop=vda:{RW_KIB}:{ROUNDS} show=/sys/block/vda/size \
         show=/sys/bus/virtio/devices/virtio0/features"
    );
    let boot = tcg::boot(&qemu, &dir, &extra, &append, TIMEOUT);
    let (code, daemon_out) = daemon.stop();
    let _ = std::fs::remove_file(&sock);
    let context = format!(
        "console:\n{}\nQEMU's stderr:\n{}\n{}'s output:\n{daemon_out}",
        boot.console,
        boot.stderr,
        program.display()
    );
    eprintln!(
        "{name}: launch to GUEST-DONE {:.1} s under TCG",
        boot.elapsed.as_secs_f64()
    );
    assert_guest_rounds(&boot.console, ROUNDS, &context);
    assert!(
        boot.console.contains(&format!(
            "GUEST-SHOW /sys/block/vda/size {}",
            IMAGE_BYTES / 512
        )),
        "the disk's size as the guest saw it:\n{context}"
    );
    // VIRTIO_F_VERSION_1 (bit 32 of the sysfs string, one character per
    // bit from bit 0): the modern interface, which vhost-user-blk-pci is.
    let features = boot
        .console
        .lines()
        .find_map(|l| l.strip_prefix("GUEST-SHOW /sys/bus/virtio/devices/virtio0/features "))
        .unwrap_or_else(|| panic!("no features line:\n{context}"));
    eprintln!("{name}: virtio features {features}");
    assert_eq!(features.as_bytes().get(32), Some(&b'1'), "{context}");
    assert_eq!(code, Some(0), "the daemon's exit on SIGTERM:\n{context}");

    kernels::assert_rwloop_image(&image, RW_KIB, ROUNDS);
    let (image, expect) = (image.to_str().unwrap(), expect.to_str().unwrap());
    // The acceptance: verified from the host by strata-img, and by
    // qemu-img as the oracle.
    s_ok(&["compare", "-f", "raw", "-F", "raw", expect, image]);
    q_ok(&["compare", "-f", "raw", "-F", "raw", expect, image]);
}

/// Restart: strata-storage-daemon is stopped (SIGTERM) and started again
/// twice while the guest's rwloop runs. QEMU's chardev reconnects
/// (`reconnect=1`), the rings start again where they stopped, and every
/// round the guest writes reads back whole; so does the image.
#[test]
fn strata_storage_daemon_restart_under_io() {
    const NAME: &str = "strata_storage_daemon_restart_under_io";
    const RESTART_ROUNDS: u64 = 12;
    let Some(qemu) = tcg::qemu_system(NAME) else {
        return;
    };
    let program = PathBuf::from(env!("CARGO_BIN_EXE_strata-storage-daemon"));
    let (dir, image, sock) = prepare(NAME);
    let args = daemon_args(&image, &sock, 1);
    let first = Daemon::start(&program, &args, &sock, dir.join("daemon-0.log"));
    // Stops and restarts the daemon when the console shows the guest
    // between two rounds... or in the middle of one: the watcher reads
    // the log every few milliseconds while the guest goes on.
    let watcher = {
        let (dir, sock, program, args) = (dir.clone(), sock.clone(), program.clone(), args.clone());
        std::thread::spawn(move || {
            let mut d = first;
            let mut logs = Vec::new();
            for (i, round) in [3u64, 7].into_iter().enumerate() {
                let mark = format!("GUEST-RW vda {round} ok");
                let t = Instant::now();
                while !std::fs::read_to_string(dir.join("console.log"))
                    .unwrap_or_default()
                    .contains(&mark)
                {
                    if t.elapsed() > TIMEOUT {
                        return (d, logs, format!("never saw {mark}"));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                let (code, out) = d.stop();
                logs.push(format!("daemon {i} exit {code:?}:\n{out}"));
                if code != Some(0) {
                    let next = Daemon::start(&program, &args, &sock, dir.join("daemon-x.log"));
                    return (next, logs, format!("daemon {i} exited with {code:?}"));
                }
                std::thread::sleep(Duration::from_millis(300));
                d = Daemon::start(
                    &program,
                    &args,
                    &sock,
                    dir.join(format!("daemon-{}.log", i + 1)),
                );
            }
            (d, logs, String::new())
        })
    };
    let extra = qemu_args(&sock, true);
    let append = format!("quiet rwloop=vda:{RW_KIB}:{RESTART_ROUNDS}");
    let boot = tcg::boot(&qemu, &dir, &extra, &append, TIMEOUT);
    let (last, logs, problem) = watcher.join().unwrap();
    let (code, out) = last.stop();
    let _ = std::fs::remove_file(&sock);
    let context = format!(
        "console:\n{}\nQEMU's stderr:\n{}\n{}\nlast daemon exit {code:?}:\n{out}",
        boot.console,
        boot.stderr,
        logs.join("\n")
    );
    assert!(problem.is_empty(), "{problem}:\n{context}");
    assert_guest_rounds(&boot.console, RESTART_ROUNDS, &context);
    assert_eq!(code, Some(0), "{context}");
    kernels::assert_rwloop_image(&image, RW_KIB, RESTART_ROUNDS);
}
