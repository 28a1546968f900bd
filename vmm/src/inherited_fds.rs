//! File descriptors the process inherited from whoever started it, for
//! QEMU's `SocketAddress` of `type: fd` (qapi/sockets.json: `str` names a
//! descriptor by number). libqtest's vhost-user-blk test, for one, hands
//! the storage daemon a listening socket as `addr.type=fd,addr.str=N`.
//!
//! Only a descriptor that was open when the process started can be
//! claimed, and only once: a number given on the command line or over QMP
//! can then never take over a descriptor Strata opened itself (its event
//! loops, images or sockets), which would be closed twice.

use std::collections::BTreeSet;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::Mutex;

static INHERITED: Mutex<BTreeSet<RawFd>> = Mutex::new(BTreeSet::new());

fn set() -> std::sync::MutexGuard<'static, BTreeSet<RawFd>> {
    INHERITED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Notes the descriptors above stderr that are open now. The binaries
/// call this first thing in `main`, before they open anything.
pub fn record() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let seen: Vec<RawFd> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    // The directory's own descriptor was among them; it is closed now.
    let open = seen
        .into_iter()
        .filter(|fd| std::fs::read_link(format!("/proc/self/fd/{fd}")).is_ok());
    set().extend(open);
}

/// Claims inherited descriptor `s` (a decimal number) as a listening
/// unix socket. `what` names the option in errors.
pub fn unix_listener(s: &str, what: &str) -> Result<UnixListener, String> {
    let fd: RawFd = s
        .parse()
        .map_err(|_| format!("{what}: '{s}' is not a file descriptor number"))?;
    if !set().remove(&fd) {
        return Err(format!(
            "{what}: file descriptor {fd} was not inherited by this process (or is already in use)"
        ));
    }
    // SAFETY: `fd` was open when the process started, before Strata opened
    // anything, so no object of the process owns it; it has just left the
    // set, so it is claimed here exactly once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let listening = nix::sys::socket::getsockopt(&owned, nix::sys::socket::sockopt::AcceptConn)
        .map_err(|e| format!("{what}: file descriptor {fd} is not a socket: {e}"))?;
    let listener = UnixListener::from(owned);
    if listener.local_addr().is_err() {
        return Err(format!("{what}: file descriptor {fd} is not a unix socket"));
    }
    if !listening {
        return Err(format!(
            "{what}: socket on file descriptor {fd} is not listening"
        ));
    }
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_recorded_descriptors_are_claimed_once() {
        let dir = std::env::temp_dir().join(format!("strata-inherit-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let l = UnixListener::bind(&dir).unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(l);
        // Not recorded: refused, and left open.
        let e = unix_listener(&fd.to_string(), "addr.str").unwrap_err();
        assert!(e.contains("not inherited"), "{e}");
        assert!(std::fs::read_link(format!("/proc/self/fd/{fd}")).is_ok());
        set().insert(fd);
        let l = unix_listener(&fd.to_string(), "addr.str").unwrap();
        assert!(unix_listener(&fd.to_string(), "addr.str").is_err());
        assert!(unix_listener("x", "addr.str").unwrap_err().contains("'x'"));
        drop(l);
        let _ = std::fs::remove_file(&dir);
    }
}
