//! `-daemonize`: QEMU's meaning. The process forks before the machine is
//! set up; the original process waits on a pipe and exits 0 only when the
//! daemon reports that the machine, its chardevs and its monitors are
//! ready (listening sockets answer from then on), or 1 when the daemon
//! failed first (its error line reaches the user on the inherited stderr).
//! The daemon leaves the terminal's session, forks once more so that it can
//! never get a controlling terminal back, and once ready moves to `/` and
//! points its standard streams at /dev/null (stderr stays when `-D` sends
//! the log to a file, as QEMU keeps it then).
//!
//! The fork happens in `main` before anything starts a thread (`vmm::run`
//! starts the first ones), so the child is a complete copy of a
//! single-threaded process.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The daemon's end of the pipe to the waiting parent.
pub struct Daemon {
    pipe: File,
}

fn last_error(what: &str) -> String {
    format!("-daemonize: {what}: {}", std::io::Error::last_os_error())
}

/// Forks. Returns only in the daemon; the original process exits with the
/// status the daemon reports.
pub fn detach() -> Result<Daemon, String> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(last_error("pipe"));
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by
    // nothing else in this process.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the process has one thread here (nothing has started one
    // yet, see the module doc), so the child inherits no lock held by
    // another thread.
    match unsafe { libc::fork() } {
        -1 => return Err(last_error("fork")),
        0 => {}
        _ => {
            drop(wr);
            let mut status = [1u8];
            let mut rd = File::from(rd);
            // EOF (the daemon died or failed before it was ready) leaves
            // the status at 1.
            let n = loop {
                match rd.read(&mut status) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    r => break r.unwrap_or(0),
                }
            };
            std::process::exit(if n == 1 && status[0] == 0 { 0 } else { 1 });
        }
    }
    drop(rd);
    // SAFETY: setsid takes no arguments; in the forked child it cannot
    // fail (the child is not a process group leader).
    unsafe { libc::setsid() };
    // SAFETY: still single-threaded, as above.
    match unsafe { libc::fork() } {
        -1 => return Err(last_error("fork")),
        0 => {}
        // The session leader goes: its child can never acquire a
        // controlling terminal by opening one.
        _ => std::process::exit(0),
    }
    // SAFETY: umask and signal with SIG_IGN only change process-wide
    // settings; no handler code is installed.
    unsafe {
        libc::umask(0o027);
        // Terminal job-control signals must not stop a daemon.
        libc::signal(libc::SIGTSTP, libc::SIG_IGN);
        libc::signal(libc::SIGTTOU, libc::SIG_IGN);
        libc::signal(libc::SIGTTIN, libc::SIG_IGN);
    }
    Ok(Daemon {
        pipe: File::from(wr),
    })
}

impl Daemon {
    /// The machine is set up: detach from the caller's directory and
    /// streams, then let the waiting parent exit 0. `keep_stderr` keeps
    /// stderr (when the log goes to a `-D` file).
    pub fn ready(mut self, keep_stderr: bool) {
        if let Err(e) = std::env::set_current_dir("/") {
            log::warn!("-daemonize: cannot change to /: {e}");
        }
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null");
        let _ = std::io::stdout().flush();
        if let Ok(null) = null {
            let streams: &[i32] = if keep_stderr { &[0, 1] } else { &[0, 1, 2] };
            for &fd in streams {
                // SAFETY: both descriptors are open; dup2 replaces the
                // standard stream atomically and Rust's handles to it stay
                // valid.
                unsafe { libc::dup2(null.as_raw_fd(), fd) };
            }
        }
        // Last: once the parent exits, its caller must find the streams it
        // passed released (a caller reading them to EOF stops waiting).
        let _ = self.pipe.write_all(&[0]);
    }
}

/// Runs `body` between QEMU's `-pidfile` and `-daemonize`: the process
/// detaches first (before `body` starts any thread), writes its pid file,
/// and removes it when `body` returns. `body` gets the callback to call
/// once ready (the waiting parent exits then). `pidfile_opt` is the
/// option as the binary spells it, for errors; `keep_stderr` as in
/// [`Daemon::ready`].
pub fn around(
    process: &crate::system_args::Process,
    pidfile_opt: &str,
    keep_stderr: bool,
    body: impl FnOnce(Box<dyn FnOnce()>) -> Result<i32, String>,
) -> Result<i32, String> {
    // The daemon moves to / once ready: keep the pid file's name valid
    // for its removal at exit.
    let pidfile = match &process.pidfile {
        Some(p) if process.daemonize => Some(
            std::path::absolute(p).map_err(|e| format!("{pidfile_opt} {}: {e}", p.display()))?,
        ),
        p => p.clone(),
    };
    let daemon = if process.daemonize {
        Some(detach()?)
    } else {
        None
    };
    if let Some(p) = &pidfile {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .map_err(|e| format!("{pidfile_opt} {}: {e}", p.display()))?;
    }
    let r = body(Box::new(move || {
        if let Some(d) = daemon {
            d.ready(keep_stderr);
        }
    }));
    if let Some(p) = &pidfile {
        let _ = std::fs::remove_file(p);
    }
    r
}
