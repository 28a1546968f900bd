//! Strata's vhost-user-blk-pci front end under KVM: SeaBIOS boots from a
//! disk that a storage daemon serves over vhost-user (guest RAM from
//! `-object memory-backend-memfd,share=on` as `-machine memory-backend=`),
//! with strata-storage-daemon and with Debian's qemu-storage-daemon. The
//! boot sector (support::bootdisk) reads two sectors through INT 13h, so
//! the firmware's virtio driver negotiates, reads the back end's
//! configuration and runs requests through the back end's rings. Then the
//! Linux guest's virtio_blk writes and reads back a pattern through both
//! daemons, and across a restart of strata-storage-daemon, which Strata's
//! front end connects to again.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::bootdisk::disk;
use support::{kernels, kvm_available, require_bios, run_strata, run_until, scratch};

const TIMEOUT: Duration = Duration::from_secs(120);

fn daemon(program: &str, image: &Path, sock: &str) -> Child {
    let _ = std::fs::remove_file(sock);
    let mut c = Command::new(program)
        .args([
            "--blockdev",
            &format!("driver=file,node-name=disk0,filename={}", image.display()),
            "--export",
            &format!(
                "type=vhost-user-blk,id=e0,node-name=disk0,addr.type=unix,addr.path={sock},writable=on"
            ),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !Path::new(sock).exists() {
        assert!(c.try_wait().unwrap().is_none(), "{program} exited");
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{program} never listened"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    c
}

fn boot_through(test: &str, program: &str, numa: bool) {
    if !kvm_available(test) {
        return;
    }
    require_bios();
    let dir = scratch(test);
    let img = disk(&dir, "disk.raw", true);
    let sock = std::env::temp_dir()
        .join(format!("strata-{test}-{}.sock", std::process::id()))
        .display()
        .to_string();
    let mut d = daemon(program, &img, &sock);
    let log = dir.join("serial.log");
    // The shared RAM as -machine memory-backend= or as the NUMA node's
    // memdev (libvirt's way).
    let ram: [&str; 2] = if numa {
        ["-numa", "node,memdev=mem"]
    } else {
        ["-machine", "pc,memory-backend=mem"]
    };
    let out = run_until(
        &[
            "-m",
            "128",
            "-object",
            "memory-backend-memfd,id=mem,size=128M,share=on",
            ram[0],
            ram[1],
            "-nodefaults",
            "-serial",
            &format!("file:{}", log.display()),
            "-chardev",
            &format!("socket,id=vu,path={sock}"),
            "-device",
            "vhost-user-blk-pci,chardev=vu,bootindex=1",
        ],
        &log,
        "VIRTIO-BOOT-OK or -BAD",
        |t| t.contains("BOOT-OK") || t.contains("BOOT-BAD"),
        TIMEOUT,
    );
    let _ = d.kill();
    let _ = d.wait();
    let _ = std::fs::remove_file(&sock);
    assert!(out.contains("BOOT-OK"), "{out}");
    assert!(out.contains("Booting from Hard Disk"), "{out}");
}

#[test]
fn seabios_boots_from_strata_storage_daemon() {
    boot_through(
        "vhost-user-kvm-strata",
        env!("CARGO_BIN_EXE_strata-storage-daemon"),
        true,
    );
}

/// Debian's qemu-storage-daemon (qemu-utils), or None after saying why the
/// test is skipped.
fn qemu_storage_daemon() -> Option<&'static str> {
    const QSD: &str = "/usr/bin/qemu-storage-daemon";
    if Path::new(QSD).exists() {
        return Some(QSD);
    }
    eprintln!("SKIPPED: no qemu-storage-daemon (Debian's qemu-utils)");
    None
}

#[test]
fn seabios_boots_from_qemu_storage_daemon() {
    let Some(qsd) = qemu_storage_daemon() else {
        return;
    };
    boot_through("vhost-user-kvm-qsd", qsd, false);
}

/// Without shared guest memory the device cannot work: one line that says
/// what to add.
#[test]
fn unshared_memory_is_refused() {
    let dir = scratch("vhost-user-kvm-unshared");
    let img = dir.join("d.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let sock = std::env::temp_dir()
        .join(format!("strata-vu-unshared-{}.sock", std::process::id()))
        .display()
        .to_string();
    let mut d = daemon(env!("CARGO_BIN_EXE_strata-storage-daemon"), &img, &sock);
    let (code, _, err) = run_strata(
        &[
            "-accel",
            "qtest",
            "-qtest",
            "stdio",
            "-nodefaults",
            "-chardev",
            &format!("socket,id=vu,path={sock}"),
            "-device",
            "vhost-user-blk-pci,chardev=vu",
        ],
        Duration::from_secs(30),
    );
    let _ = d.kill();
    let _ = d.wait();
    let _ = std::fs::remove_file(&sock);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("vhost-user-blk-pci") && err.contains("memory-backend-memfd"),
        "{err}"
    );
}

/// The Linux guest's virtio_blk through Strata's front end and
/// strata-storage-daemon: interrupts come back through the call eventfds
/// (SeaBIOS polls the used ring; Linux waits for them), and the image
/// holds every byte of the last round.
#[test]
fn linux_rwloop_through_strata_front_end_and_daemon() {
    linux_rwloop(
        "vhost-user-kvm-linux",
        env!("CARGO_BIN_EXE_strata-storage-daemon"),
        2,
        None,
    );
}

/// The same with qemu-storage-daemon (libvhost-user), which makes the
/// call eventfds non-blocking under the front end's feet.
#[test]
fn linux_rwloop_through_strata_front_end_and_qemu_storage_daemon() {
    let Some(qsd) = qemu_storage_daemon() else {
        return;
    };
    linux_rwloop("vhost-user-kvm-linux-qsd", qsd, 2, None);
}

/// Restart: strata-storage-daemon stopped (SIGTERM) after the guest's
/// first round and started again; Strata's front end connects again and
/// the guest's rounds go on, every byte in place.
#[test]
fn linux_rwloop_survives_a_daemon_restart() {
    linux_rwloop(
        "vhost-user-kvm-restart",
        env!("CARGO_BIN_EXE_strata-storage-daemon"),
        4,
        Some("-TERM"),
    );
}

/// The same with the daemon killed (SIGKILL) in the middle of the
/// guest's I/O: the requests it had taken and not answered are taken
/// again from the rings by the new daemon (the rings resume at their used
/// index; the guest's driver has one request in flight at a time, so the
/// answered ones are exactly those below it), and no byte is lost.
#[test]
fn linux_rwloop_survives_a_daemon_sigkill() {
    linux_rwloop(
        "vhost-user-kvm-sigkill",
        env!("CARGO_BIN_EXE_strata-storage-daemon"),
        4,
        Some("-KILL"),
    );
}

fn linux_rwloop(test: &str, program: &str, rounds: u64, restart: Option<&str>) {
    const KIB: u64 = 1024;
    if !kvm_available(test) {
        return;
    }
    let dir = scratch(test);
    let img = dir.join("disk.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let sock = std::env::temp_dir()
        .join(format!("strata-{test}-{}.sock", std::process::id()))
        .display()
        .to_string();
    let mut d = daemon(program, &img, &sock);
    let log = dir.join("serial.log");
    let append = format!("{} rwloop=vda:{KIB}:{rounds}", kernels::LINUX_CMDLINE);
    let mut args = kernels::linux_args("vmlinux", &log, &append);
    // linux_args' own -m gives way to the shared backend's size.
    if let Some(i) = args.iter().position(|a| a == "-m") {
        args.drain(i..i + 2);
    }
    let mut vm = Command::new(support::strata_bin())
        .args(args)
        .args([
            "-m",
            "256",
            "-object",
            "memory-backend-memfd,id=mem,size=256M,share=on",
            "-machine",
            "pc,memory-backend=mem",
            "-chardev",
            &format!("socket,id=vu,path={sock},reconnect=1"),
            "-device",
            "vhost-user-blk-pci,chardev=vu",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn strata");
    let mut restarted = false;
    let out = kernels::wait_guest_done(&mut vm, &log, Duration::from_secs(240), |text| {
        if let (Some(signal), false) = (restart, restarted) {
            if !text.contains("GUEST-RW vda 1 ok") {
                return;
            }
            restarted = true;
            let _ = Command::new("kill")
                .args([signal, &d.id().to_string()])
                .status();
            let _ = d.wait();
            std::thread::sleep(Duration::from_millis(500));
            d = daemon(program, &img, &sock);
        }
    });
    let _ = vm.kill();
    let stderr = vm.wait_with_output().map(|o| o.stderr).unwrap_or_default();
    let _ = Command::new("kill")
        .args(["-TERM", &d.id().to_string()])
        .status();
    let _ = d.wait();
    let _ = std::fs::remove_file(&sock);
    let stderr = String::from_utf8_lossy(&stderr);
    assert!(!out.contains("GUEST-ERR"), "{out}\nstrata: {stderr}");
    assert_eq!(
        kernels::rwloop_rounds(&out, "vda"),
        rounds,
        "{out}\nstrata: {stderr}"
    );
    if restart.is_some() {
        assert!(restarted, "the daemon was never restarted:\n{out}");
        assert!(stderr.contains("is back"), "no reconnection:\n{stderr}");
    }
    kernels::assert_rwloop_image(&img, KIB, rounds);
}
