//! Character devices (QEMU's chardevs) for the serial ports and debugcon:
//! stdio (with the `mon:` Ctrl-A multiplexer), files, Unix and TCP sockets
//! and null; and the socket endpoints the monitors share ([`Listener`],
//! [`connect`], [`Stream`]).
//!
//! Chardevs are opened once per process and outlive machine resets; each
//! machine gets fresh writers, and the input threads are pointed at the new
//! UART after every rebuild.

use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::bus::lock;
use devices::legacy::serial::Uart;
use vmm_sys_util::terminal::Terminal;

use crate::config::CharDev;
use crate::{EventSender, VmEvent, VmmError};

const CTRL_A: u8 = 0x01;
const CTRL_C: u8 = 0x03;

const MUX_HELP: &str = "\r\nC-a h    print this help\r\n\
C-a x    exit Strata\r\n\
C-a c    switch between the serial console and the monitor\r\n\
C-a C-a  send C-a to the guest\r\n";

type Slot<T> = Arc<Mutex<Option<T>>>;

/// A writer shared by every machine generation of one chardev.
#[derive(Clone)]
struct SharedOut(Slot<Box<dyn Write + Send>>);

impl Write for SharedOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match lock(&self.0).as_mut() {
            // Flushed at once: console output (a prompt, a guest's partial
            // line) must appear without waiting for a newline.
            Some(w) => w.write(buf).and_then(|n| w.flush().map(|_| n)),
            None => Ok(buf.len()), // not connected yet: output is dropped
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match lock(&self.0).as_mut() {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }
}

pub struct Chardev {
    out: SharedOut,
    /// The UART that received bytes go to, if this chardev is a serial port.
    target: Slot<Arc<Mutex<Uart>>>,
}

impl Chardev {
    pub fn writer(&self) -> Box<dyn Write + Send> {
        Box::new(self.out.clone())
    }

    pub fn attach(&self, uart: Option<Arc<Mutex<Uart>>>) {
        *lock(&self.target) = uart;
    }
}

/// Puts the terminal back the way it was when dropped: the settings saved
/// before raw mode, restored on the descriptor directly. (Going through
/// `Stdin::lock` would wait for the input thread's pending read, that is
/// for one more key press, before the process could exit.)
pub struct TerminalGuard(Option<nix::sys::termios::Termios>);

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            use std::os::fd::AsFd;
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin().as_fd(),
                nix::sys::termios::SetArg::TCSANOW,
                t,
            );
        }
    }
}

/// Opens a chardev. `what` names the option for error messages.
pub fn open(
    dev: &CharDev,
    what: &str,
    events: &EventSender,
) -> Result<(Chardev, Option<TerminalGuard>), VmmError> {
    let out: Slot<Box<dyn Write + Send>> = Arc::new(Mutex::new(None));
    let target: Slot<Arc<Mutex<Uart>>> = Arc::new(Mutex::new(None));
    let mut guard = None;
    let err = |e: std::io::Error, p: &std::path::Path| {
        VmmError::Config(format!("{what} {}: {e}", p.display()))
    };
    match dev {
        CharDev::Null => *lock(&out) = Some(Box::new(std::io::sink())),
        CharDev::Stdio { mux } => {
            *lock(&out) = Some(Box::new(std::io::stdout()));
            let stdin = std::io::stdin();
            let saved = if stdin.is_terminal() {
                use std::os::fd::AsFd;
                nix::sys::termios::tcgetattr(stdin.as_fd()).ok()
            } else {
                None
            };
            let tty = saved.is_some() && stdin.lock().set_raw_mode().is_ok();
            guard = Some(TerminalGuard(saved.filter(|_| tty)));
            let (t, ev, mux) = (target.clone(), events.clone(), *mux);
            let o = SharedOut(out.clone());
            std::thread::Builder::new()
                .name("stdin".into())
                .spawn(move || input_loop(std::io::stdin(), t, ev, mux, tty, o))
                .map_err(|e| VmmError::Config(format!("{what}: {e}")))?;
        }
        CharDev::File(p) => *lock(&out) = Some(Box::new(File::create(p).map_err(|e| err(e, p))?)),
        CharDev::Pty => {
            // QEMU prints where the pty is: scripts and users look for it.
            let s = Stream::pty(what.trim_start_matches('-'))
                .map_err(|e| VmmError::Config(format!("{what} pty: {e}")))?;
            connect_stream(s, out.clone(), target.clone(), events.clone());
        }
        CharDev::Unix { server, wait, .. } | CharDev::Tcp { server, wait, .. } => {
            let name = describe(dev);
            let err = |e: std::io::Error| VmmError::Config(format!("{what} {name}: {e}"));
            if *server {
                let l = Listener::bind(dev).map_err(err)?;
                let (o, t, ev) = (out.clone(), target.clone(), events.clone());
                let accept = move || {
                    if let Ok(s) = l.accept() {
                        connect_stream(s, o, t, ev);
                    }
                };
                if *wait {
                    eprintln!("strata: {what}: waiting for a connection on {name}");
                    accept();
                } else {
                    std::thread::spawn(accept);
                }
            } else {
                let s = connect(dev).map_err(err)?;
                connect_stream(s, out.clone(), target.clone(), events.clone());
            }
        }
    }
    Ok((
        Chardev {
            out: SharedOut(out),
            target,
        },
        guard,
    ))
}

fn connect_stream(
    s: Stream,
    out: Slot<Box<dyn Write + Send>>,
    target: Slot<Arc<Mutex<Uart>>>,
    ev: EventSender,
) {
    let Stream { read, write, .. } = s;
    let o = SharedOut(out.clone());
    std::thread::spawn(move || input_loop(read, target, ev, false, false, o));
    *lock(&out) = Some(write);
}

/// The name of the last pseudo-terminal opened (`query-chardev`).
pub fn pty_names() -> &'static Mutex<Option<String>> {
    static NAME: std::sync::OnceLock<Mutex<Option<String>>> = std::sync::OnceLock::new();
    NAME.get_or_init(|| Mutex::new(None))
}

/// Output to a pseudo-terminal that nobody may be reading: bytes that do
/// not fit are dropped, as QEMU's pty chardev drops them, rather than
/// blocking the guest's serial port.
pub(crate) struct PtyOut(File);

impl Write for PtyOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let mut fds = [PollFd::new(self.0.as_fd(), PollFlags::POLLOUT)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(n) if n > 0 => self.0.write(buf),
            _ => Ok(buf.len()),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Opens a pseudo-terminal pair: its master for reading and writing, and
/// the slave's name. The slave is opened here once and kept, so that the
/// master's reads wait for input instead of failing while no one is
/// attached.
pub(crate) fn open_pty() -> Result<(File, PtyOut, String), String> {
    use nix::fcntl::OFlag;
    use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
    let e = |e: nix::Error| e.to_string();
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY).map_err(e)?;
    grantpt(&master).map_err(e)?;
    unlockpt(&master).map_err(e)?;
    let name = ptsname_r(&master).map_err(e)?;
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&name)
        .map_err(|e| format!("{name}: {e}"))?;
    // Raw mode on the slave: the guest's bytes pass unchanged.
    if let Ok(mut t) = nix::sys::termios::tcgetattr(&slave) {
        nix::sys::termios::cfmakeraw(&mut t);
        let _ = nix::sys::termios::tcsetattr(&slave, nix::sys::termios::SetArg::TCSANOW, &t);
    }
    std::mem::forget(slave);
    let file = File::from(std::os::fd::OwnedFd::from(master));
    let w = file.try_clone().map_err(|e| e.to_string())?;
    Ok((file, PtyOut(w), name))
}

/// A connected socket (or stdio), split into its two directions.
pub struct Stream {
    pub read: Box<dyn Read + Send>,
    pub write: Box<dyn Write + Send>,
    /// Ends both directions (wakes a thread blocked reading it).
    pub shutdown: Box<dyn Fn() + Send + Sync>,
}

impl Stream {
    fn unix(s: UnixStream) -> std::io::Result<Stream> {
        let (r, w) = (s.try_clone()?, s.try_clone()?);
        Ok(Stream {
            read: Box::new(r),
            write: Box::new(w),
            shutdown: Box::new(move || {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }),
        })
    }

    fn tcp(s: TcpStream) -> std::io::Result<Stream> {
        let _ = s.set_nodelay(true);
        let (r, w) = (s.try_clone()?, s.try_clone()?);
        Ok(Stream {
            read: Box::new(r),
            write: Box::new(w),
            shutdown: Box::new(move || {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }),
        })
    }

    /// A new pseudo-terminal (its name is printed, labelled `label`).
    pub fn pty(label: &str) -> Result<Stream, String> {
        let (read, write, name) = open_pty()?;
        eprintln!("char device redirected to {name} (label {label})");
        *lock(pty_names()) = Some(name);
        Ok(Stream {
            read: Box::new(read),
            write: Box::new(write),
            shutdown: Box::new(|| {}),
        })
    }

    /// The process's standard input and output.
    pub fn stdio() -> Stream {
        Stream {
            read: Box::new(std::io::stdin()),
            write: Box::new(std::io::stdout()),
            shutdown: Box::new(|| {}),
        }
    }
}

/// A listening socket of a `server=on` chardev.
pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    /// Listens where a server chardev says. A Unix socket's stale file is
    /// replaced, as QEMU does.
    pub fn bind(dev: &CharDev) -> std::io::Result<Listener> {
        match dev {
            CharDev::Unix { path, .. } => {
                let _ = std::fs::remove_file(path);
                Ok(Listener::Unix(UnixListener::bind(path)?))
            }
            CharDev::Tcp { host, port, .. } => {
                // QEMU: an empty host listens on every address.
                let host = if host.is_empty() { "0.0.0.0" } else { host };
                Ok(Listener::Tcp(TcpListener::bind((host, *port))?))
            }
            _ => Err(std::io::Error::other("not a socket")),
        }
    }

    pub fn accept(&self) -> std::io::Result<Stream> {
        match self {
            Listener::Unix(l) => Stream::unix(l.accept()?.0),
            Listener::Tcp(l) => Stream::tcp(l.accept()?.0),
        }
    }
}

/// Connects to a client chardev's socket.
pub fn connect(dev: &CharDev) -> std::io::Result<Stream> {
    match dev {
        CharDev::Unix { path, .. } => Stream::unix(UnixStream::connect(path)?),
        CharDev::Tcp { host, port, .. } => {
            let host = if host.is_empty() { "localhost" } else { host };
            Stream::tcp(TcpStream::connect((host, *port))?)
        }
        _ => Err(std::io::Error::other("not a socket")),
    }
}

/// A chardev as the user would write it, for messages.
pub fn describe(dev: &CharDev) -> String {
    match dev {
        CharDev::Null => "null".into(),
        CharDev::Stdio { mux: false } => "stdio".into(),
        CharDev::Stdio { mux: true } => "mon:stdio".into(),
        CharDev::File(p) => format!("file:{}", p.display()),
        CharDev::Pty => match lock(pty_names()).as_ref() {
            Some(n) => format!("pty:{n}"),
            None => "pty".into(),
        },
        CharDev::Unix { path, .. } => format!("unix:{}", path.display()),
        CharDev::Tcp { host, port, .. } => format!("tcp:{host}:{port}"),
    }
}

/// Feeds received bytes to the attached UART, interpreting Ctrl-A escapes
/// when `mux` is set (Ctrl-C ends the process on a plain stdio terminal).
fn input_loop(
    mut input: impl Read,
    target: Slot<Arc<Mutex<Uart>>>,
    ev: EventSender,
    mux: bool,
    tty: bool,
    mut echo: SharedOut,
) {
    let mut buf = [0u8; 256];
    let mut escape = false;
    // In monitor mode (Ctrl-A c) keystrokes build a command line for the
    // monitor instead of reaching the guest.
    let mut monitor = false;
    let mut line = Vec::new();
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut pass = Vec::with_capacity(n);
        for &b in &buf[..n] {
            if mux && escape {
                escape = false;
                match b {
                    b'x' => {
                        let _ = echo.write_all(b"\r\nStrata: Terminated\r\n");
                        ev.send(VmEvent::Quit);
                        return;
                    }
                    b'h' | b'?' => {
                        let _ = echo.write_all(MUX_HELP.as_bytes());
                    }
                    b'c' => {
                        monitor = !monitor;
                        line.clear();
                        let _ = if monitor {
                            echo.write_all(
                                format!(
                                    "\r\n{}\r\n{}",
                                    crate::monitor::BANNER,
                                    crate::monitor::PROMPT
                                )
                                .as_bytes(),
                            )
                        } else {
                            echo.write_all(b"\r\n")
                        };
                    }
                    CTRL_A => pass.push(CTRL_A),
                    _ => {}
                }
            } else if mux && b == CTRL_A {
                escape = true;
            } else if monitor {
                match b {
                    b'\r' | b'\n' => {
                        let _ = echo.write_all(b"\r\n");
                        let cmd = String::from_utf8_lossy(&line).trim().to_string();
                        line.clear();
                        // The main loop answers and prints the next prompt.
                        ev.send(VmEvent::Monitor(crate::monitor::Request::Hmp {
                            line: cmd,
                            out: None,
                            done: None,
                        }));
                    }
                    0x7f | 0x08 if line.pop().is_some() => {
                        let _ = echo.write_all(b"\x08 \x08");
                    }
                    0x20..=0x7e if line.len() < 1024 => {
                        line.push(b);
                        let _ = echo.write_all(&[b]);
                    }
                    _ => {}
                }
            } else if !mux && tty && b == CTRL_C {
                ev.send(VmEvent::Quit);
                return;
            } else {
                pass.push(b);
            }
        }
        deliver(&target, &pass);
    }
}

fn deliver(target: &Slot<Arc<Mutex<Uart>>>, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let uart = lock(target).clone();
        let Some(uart) = uart else { return };
        let n = lock(&uart).receive(bytes);
        bytes = &bytes[n..];
        if n == 0 {
            // The guest has not drained the FIFO yet.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
