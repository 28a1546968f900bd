//! Helpers for the tests that run NBD servers (strata-nbd, qemu-nbd) as
//! processes.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Whether every tool in `tools` runs (`TOOL --version`, or `openssl
/// version`); prints a SKIPPED line naming `what` when one does not.
pub fn have_tools(tools: &[&str], what: &str) -> bool {
    let ok = tools.iter().all(|t| {
        let arg = if *t == "openssl" {
            "version"
        } else {
            "--version"
        };
        Command::new(t)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !ok {
        eprintln!("SKIPPED: {what} missing");
    }
    ok
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `child` (named `name` in failures) accepts connections on
/// the unix socket `unix` or on 127.0.0.1:`port`. The probe is a client:
/// without `-t` it may be the server's only one.
pub fn wait_listening(name: &str, unix: Option<&str>, port: Option<u16>, child: &mut Child) {
    let t = Instant::now();
    loop {
        let ok = match (unix, port) {
            (Some(p), _) => std::os::unix::net::UnixStream::connect(p).is_ok(),
            (_, Some(port)) => std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
            _ => unreachable!(),
        };
        if ok {
            return;
        }
        if let Some(s) = child.try_wait().unwrap() {
            panic!("{name} exited early: {s}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{name} never listened"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
