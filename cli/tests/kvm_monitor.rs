//! The monitor (Ctrl-A c on a `mon:stdio` console) and `rerror=stop`: a
//! read error injected by blkdebug pauses the guest, `info status` says
//! so, and `cont` retries the parked request so that the boot completes.
//! Also `-S`: the guest waits for `cont` before its first instruction.

mod support;

use std::io::{Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{image, kvm_available, require_bios, strata_bin};

const TIMEOUT: Duration = Duration::from_secs(120);

struct Vm {
    child: Child,
    stdin: ChildStdin,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
}

fn collect(mut r: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    });
    buf
}

impl Vm {
    fn start(args: &[&str]) -> Vm {
        let mut child = Command::new(strata_bin())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let out = collect(child.stdout.take().unwrap());
        let err = collect(child.stderr.take().unwrap());
        Vm {
            child,
            stdin,
            out,
            err,
        }
    }

    /// Waits until `what` appears on stdout (or stderr with `on_err`).
    fn wait_for(&self, what: &str, on_err: bool) {
        let start = Instant::now();
        loop {
            let text = if on_err { &self.err } else { &self.out }
                .lock()
                .unwrap()
                .clone();
            if text.contains(what) {
                return;
            }
            assert!(
                start.elapsed() < TIMEOUT,
                "'{what}' not seen; stdout:\n{}\nstderr:\n{}",
                self.out.lock().unwrap(),
                self.err.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn type_text(&mut self, s: &str) {
        self.stdin.write_all(s.as_bytes()).unwrap();
        self.stdin.flush().unwrap();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn rerror_stop_pauses_and_cont_retries() {
    if !kvm_available("rerror_stop_pauses_and_cont_retries") {
        return;
    }
    require_bios();
    let disk = image("ide-disk.img");
    let drive = format!(
        "if=none,id=d0,format=raw,rerror=stop,file.driver=blkdebug,file.image.driver=file,\
         file.image.filename={},file.inject-error.0.event=read_aio,file.inject-error.0.once=on",
        disk.display()
    );
    let mut vm = Vm::start(&[
        "-nodefaults",
        "-serial",
        "mon:stdio",
        "-drive",
        &drive,
        "-device",
        "virtio-blk-pci,drive=d0,bootindex=1",
    ]);
    // SeaBIOS's first read of the disk fails once: the guest stops.
    vm.wait_for("guest stopped by its error policy", true);
    assert!(vm.err.lock().unwrap().contains("drive d0"));
    vm.type_text("\x01c");
    vm.wait_for("(strata) ", false);
    vm.type_text("info status\r");
    vm.wait_for("VM status: paused (io-error)", false);
    assert!(
        !vm.out.lock().unwrap().contains("BOOT-OK"),
        "the guest ran on while stopped"
    );
    vm.type_text("info block\r");
    vm.wait_for("d0 (", false);
    // The retry succeeds (the error was injected once) and the boot goes on.
    vm.type_text("cont\r");
    vm.wait_for("BOOT-OK", false);
    vm.type_text("info status\r");
    vm.wait_for("VM status: running", false);
    vm.type_text("quit\r");
    let start = Instant::now();
    while vm.child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < TIMEOUT, "quit did not end strata");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn dash_s_waits_for_cont() {
    if !kvm_available("dash_s_waits_for_cont") {
        return;
    }
    require_bios();
    let mut vm = Vm::start(&["-nodefaults", "-serial", "mon:stdio", "-S"]);
    vm.type_text("\x01c");
    vm.type_text("info status\r");
    vm.wait_for("VM status: paused (prelaunch)", false);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !vm.out.lock().unwrap().contains("SeaBIOS"),
        "the guest started before cont"
    );
    vm.type_text("c\r");
    vm.wait_for("SeaBIOS (version", false);
}

/// On a terminal, the monitor's `quit` (Ctrl-A c on `mon:stdio`) ends
/// strata at once: restoring the terminal must not wait for the input
/// thread's next key press.
#[test]
fn quit_on_a_terminal_exits_at_once() {
    use std::os::fd::{FromRawFd, OwnedFd};
    if !kvm_available("quit_on_a_terminal_exits_at_once") {
        return;
    }
    require_bios();
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty fills the two ints; the optional name, termios and
    // window size arguments may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: openpty succeeded; each descriptor is owned once, here.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let slave = std::fs::File::from(slave);
    let mut child = Command::new(strata_bin())
        .args(["-nodefaults", "-serial", "mon:stdio", "-display", "none"])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    drop(slave);
    let mut term = std::fs::File::from(master);
    let out = Arc::new(Mutex::new(String::new()));
    {
        let (mut r, out) = (term.try_clone().unwrap(), out.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
    }
    let wait_for = |what: &str| {
        let start = Instant::now();
        while !out.lock().unwrap().contains(what) {
            assert!(
                start.elapsed() < TIMEOUT,
                "'{what}' did not appear: {}",
                out.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    term.write_all(b"\x01c").unwrap();
    wait_for("(strata) ");
    term.write_all(b"info version\r").unwrap();
    wait_for("7.2.0 (Strata");
    term.write_all(b"quit\r").unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "quit did not end strata without another key press"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}
