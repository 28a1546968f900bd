//! [NBD]'s "beyond QEMU" promise, proven under KVM: the project's Linux
//! test guest writes and reads back a virtio-blk disk served by
//! `strata-nbd` in a loop, the server is killed (SIGKILL, no goodbye) and
//! restarted twice during the loop, and the guest sees no I/O error and
//! reads back every byte it wrote. Strata's NBD client holds the guest's
//! requests while it reconnects (`reconnect-delay`), and retries those
//! that were in flight.
//!
//! The guest's /init (images/linux-init) does the loop (`rwloop=`): each
//! round writes a pattern that depends on the round and the offset, reads
//! it all back, compares, and prints `GUEST-RW vda N ok`.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{kernels, kvm_available, scratch};

const DISK: u64 = 8 << 20;
/// KiB written and read back per round.
const ROUND_KIB: u64 = 1024;
const ROUNDS: u64 = 10;
const TIMEOUT: Duration = Duration::from_secs(300);

fn serve(img: &Path, sock: &Path) -> Child {
    let _ = std::fs::remove_file(sock);
    let child = Command::new(env!("CARGO_BIN_EXE_strata-nbd"))
        .args(["-f", "raw", "-t", "-e", "0", "-k"])
        .arg(sock)
        .arg(img)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn strata-nbd");
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "strata-nbd never listened"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

fn rounds_done(out: &str) -> u64 {
    kernels::rwloop_rounds(out, "vda")
}

#[test]
fn guest_io_survives_two_server_restarts() {
    if !kvm_available("guest_io_survives_two_server_restarts") {
        return;
    }
    let dir = scratch("nbd-guest");
    let img = dir.join("disk.raw");
    std::fs::File::create(&img).unwrap().set_len(DISK).unwrap();
    let sock = dir.join("nbd.sock");
    let log = dir.join("serial.log");
    let mut server = serve(&img, &sock);

    let append = format!(
        "{} quiet acpi=off rwloop=vda:{ROUND_KIB}:{ROUNDS}",
        kernels::LINUX_CMDLINE
    );
    // The client waits up to 30 s for the server to come back before a
    // request fails.
    let drive = format!(
        "file=nbd+unix:///?socket={},file.reconnect-delay=30,format=raw,if=virtio,cache=none",
        sock.display()
    );
    let mut vm = Command::new(support::strata_bin())
        .args(kernels::linux_args("vmlinux", &log, &append))
        .args(["-drive", &drive])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn strata");

    // Kill the server after these rounds, and restart it a second later.
    let mut kills = vec![2u64, 5];
    let mut killed_at = Vec::new();
    let out = kernels::wait_guest_done(&mut vm, &log, TIMEOUT, |out| {
        let done = rounds_done(out);
        if let Some(&k) = kills.first() {
            if done >= k {
                kills.remove(0);
                let _ = server.kill();
                let _ = server.wait();
                std::thread::sleep(Duration::from_secs(1));
                killed_at.push(rounds_done(
                    &std::fs::read_to_string(&log).unwrap_or_default(),
                ));
                server = serve(&img, &sock);
            }
        }
    });
    let _ = vm.kill();
    let stderr = vm.wait_with_output().map(|o| o.stderr).unwrap_or_default();
    let _ = server.kill();
    let _ = server.wait();

    assert!(
        !out.contains("GUEST-ERR"),
        "the guest saw an I/O error:\n{out}\nstrata's stderr:\n{}",
        String::from_utf8_lossy(&stderr)
    );
    assert_eq!(rounds_done(&out), ROUNDS, "{out}");
    // Both restarts happened while the loop still had rounds to go.
    assert_eq!(killed_at.len(), 2, "{out}");
    assert!(
        killed_at.iter().all(|&r| r < ROUNDS),
        "{killed_at:?}\n{out}"
    );
    // The server's image holds the last round, every byte of it.
    let data = std::fs::read(&img).unwrap();
    for (i, w) in data[..(ROUND_KIB * 1024) as usize].chunks(8).enumerate() {
        let got = u64::from_le_bytes(w.try_into().unwrap());
        assert_eq!(
            got,
            kernels::rwloop_pattern(ROUNDS, i as u64 * 8),
            "word {i} of the image"
        );
    }
}
