//! Image locking between `strata-img` and processes that hold an image open:
//! while a running `qemu-nbd` or `strata` (qtest, no KVM needed) uses a
//! qcow2 image, every command that writes it is refused with qemu-img's
//! message and exit 1, leaving the file byte-identical; every command that
//! only reads it is refused unless `-U`/`--force-share`, and works with it;
//! `-U` is refused for commands that write. Once the holder exits everything
//! works again. In the other direction, qemu-img is refused while
//! `strata-img` holds an image (a long `bench`).

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::img::{ok, q_ok, run, Dir};

fn have(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// strata-img run in `dir`, so that file names are as the user wrote them.
fn si(dir: &Dir, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata-img"))
        .args(args)
        .current_dir(&dir.0)
        .output()
        .unwrap()
}

fn qi(dir: &Dir, args: &[&str]) -> Output {
    Command::new("qemu-img")
        .args(args)
        .current_dir(&dir.0)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A process holding an image; killed on drop.
struct Holder {
    child: Child,
    _stdin: Option<ChildStdin>,
}

impl Holder {
    fn stop(mut self) {
        self.kill();
    }
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Wait until the holder has the image's "write" lock byte (101). Probing
/// with qemu-img instead would race with the holder's own lock check.
fn wait_locked(dir: &Dir, file: &str, holder: &mut Holder) {
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(dir.p(file)).unwrap());
    let t0 = Instant::now();
    while !holds_byte(ino, 101) {
        if let Ok(Some(st)) = holder.child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = holder.child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("holder exited early: {st}: {err}");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{file} never got locked"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn hold_with_qemu_nbd(dir: &Dir, file: &str) -> Holder {
    let child = Command::new("qemu-nbd")
        .args(["-k", &dir.p("nbd.sock"), "-f", "qcow2", file])
        .current_dir(&dir.0)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut h = Holder {
        child,
        _stdin: None,
    };
    wait_locked(dir, file, &mut h);
    h
}

fn hold_with_strata(dir: &Dir, file: &str) -> Holder {
    let drive = format!("file={file},if=none,id=d,format=qcow2");
    let mut child = Command::new(support::strata_bin())
        .args([
            "-machine",
            "pc,accel=qtest",
            "-qtest",
            "stdio",
            "-bios",
            support::BIOS,
            "-drive",
            &drive,
        ])
        .current_dir(&dir.0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The machine (and its drives) exist once qtest answers.
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"endianness\n").unwrap();
    stdin.flush().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("OK"), "qtest answered {line:?}");
    let mut h = Holder {
        child,
        _stdin: Some(stdin),
    };
    wait_locked(dir, file, &mut h);
    h
}

/// `top.qcow2` over `base.qcow2`, with data and a snapshot `s0`; plus a raw
/// copy of the same size for `compare`.
fn make_images(dir: &Dir) {
    let (base, top) = (dir.p("base.qcow2"), dir.p("top.qcow2"));
    q_ok(&["create", "-q", "-f", "qcow2", &base, "4M"]);
    q_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        &top,
    ]);
    ok(
        &run("qemu-io", &["-f", "qcow2", "-c", "write -P 7 0 64k", &top]),
        "qemu-io",
    );
    q_ok(&["snapshot", "-c", "s0", &top]);
    q_ok(&["convert", "-O", "raw", &top, &dir.p("copy.raw")]);
}

const IMG: &str = "top.qcow2";

fn write_lock_msg(prefix: &str) -> String {
    format!(
        "strata-img: {prefix}Failed to get \"write\" lock: is another process using the image [{IMG}]?"
    )
}

fn read_lock_msg() -> String {
    format!(
        "strata-img: Could not open '{IMG}': Failed to get shared \"write\" lock: is another process using the image [{IMG}]?"
    )
}

/// Commands that write the image: (arguments, message prefix).
fn writers() -> Vec<(Vec<&'static str>, String)> {
    let open = format!("Could not open '{IMG}': ");
    let create = format!("{IMG}: ");
    vec![
        (vec!["snapshot", "-c", "s1", IMG], open.clone()),
        (vec!["snapshot", "-d", "s0", IMG], open.clone()),
        (vec!["snapshot", "-a", "s0", IMG], open.clone()),
        (vec!["amend", "-o", "lazy_refcounts=on", IMG], open.clone()),
        (vec!["check", "-r", "all", IMG], open.clone()),
        (vec!["check", "-r", "leaks", IMG], open.clone()),
        (vec!["rebase", "-u", "-b", "", IMG], open.clone()),
        (vec!["commit", IMG], open.clone()),
        (vec!["resize", IMG, "8M"], open.clone()),
        (
            vec!["create", "-q", "-f", "qcow2", IMG, "1M"],
            create.clone(),
        ),
        (vec!["create", "-q", "-f", "raw", IMG, "1M"], create.clone()),
        (
            vec!["convert", "-O", "qcow2", "copy.raw", IMG],
            create.clone(),
        ),
    ]
}

/// Commands that only read the image, and the exit code of a refusal.
fn readers() -> Vec<(Vec<&'static str>, i32)> {
    vec![
        (vec!["info", IMG], 1),
        (vec!["info", "--backing-chain", IMG], 1),
        (vec!["map", IMG], 1),
        (vec!["check", IMG], 1),
        (vec!["snapshot", "-l", IMG], 1),
        (vec!["compare", IMG, "copy.raw"], 2),
        (vec!["measure", "-O", "qcow2", IMG], 1),
        (vec!["convert", "-O", "raw", IMG, "out.raw"], 1),
        (vec!["bench", "-q", "-c", "4", IMG], 1),
    ]
}

fn with_u(args: &[&'static str]) -> Vec<&'static str> {
    let mut v = vec![args[0], "-U"];
    v.extend_from_slice(&args[1..]);
    v
}

/// Everything refused (or allowed with -U) while `IMG` is held.
fn check_refusals(dir: &Dir, who: &str) {
    let img = dir.p(IMG);
    let before = std::fs::read(&img).unwrap();
    let base_before = std::fs::read(dir.p("base.qcow2")).unwrap();
    for (args, prefix) in writers() {
        let o = si(dir, &args);
        assert_eq!(o.status.code(), Some(1), "{who}: {args:?} was not refused");
        assert_eq!(
            stderr(&o).trim_end(),
            write_lock_msg(&prefix),
            "{who}: {args:?}"
        );
        assert!(
            std::fs::read(&img).unwrap() == before,
            "{who}: {args:?} changed the image"
        );
        assert!(
            std::fs::read(dir.p("base.qcow2")).unwrap() == base_before,
            "{who}: {args:?} changed the backing file"
        );
    }
    // -U is for readers only.
    for args in [
        vec!["snapshot", "-U", "-c", "s1", IMG],
        vec!["check", "-U", "-r", "all", IMG],
    ] {
        let o = si(dir, &args);
        assert_eq!(o.status.code(), Some(1), "{who}: {args:?}");
        assert_eq!(
            stderr(&o).trim_end(),
            format!(
                "strata-img: Could not open '{IMG}': force-share=on can only be used with read-only images"
            ),
            "{who}: {args:?}"
        );
    }
    for (args, code) in readers() {
        let o = si(dir, &args);
        assert_eq!(
            o.status.code(),
            Some(code),
            "{who}: {args:?} was not refused"
        );
        assert_eq!(stderr(&o).trim_end(), read_lock_msg(), "{who}: {args:?}");
        let u = with_u(&args);
        let o = si(dir, &u);
        assert!(
            o.status.success(),
            "{who}: {u:?}: exit {:?}: {}",
            o.status.code(),
            stderr(&o)
        );
    }
    assert!(
        std::fs::read(&img).unwrap() == before,
        "{who}: image changed"
    );
    // qemu-img agrees with the holder's locks.
    let o = qi(dir, &["snapshot", "-c", "q", IMG]);
    assert_eq!(o.status.code(), Some(1), "{who}: qemu-img snapshot -c");
    assert!(stderr(&o).contains("Failed to get \"write\" lock"), "{who}");
    assert!(qi(dir, &["info", "-U", IMG]).status.success());
}

/// With the holder gone, the same commands work.
fn check_free_again(dir: &Dir, who: &str) {
    for (args, _) in readers() {
        let o = si(dir, &args);
        assert!(
            o.status.code() == Some(0),
            "{who}, released: {args:?}: exit {:?}: {}",
            o.status.code(),
            stderr(&o)
        );
    }
    for args in [
        vec!["snapshot", "-c", "s1", IMG],
        vec!["snapshot", "-d", "s1", IMG],
        vec!["amend", "-o", "lazy_refcounts=on", IMG],
        vec!["check", "-r", "all", IMG],
        vec!["rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", IMG],
    ] {
        let o = si(dir, &args);
        assert!(
            o.status.success(),
            "{who}, released: {args:?}: {}",
            stderr(&o)
        );
    }
    q_ok(&["check", &dir.p(IMG)]);
}

#[test]
fn refused_while_qemu_nbd_holds_the_image() {
    if !have("qemu-nbd") || !have("qemu-img") {
        eprintln!("SKIPPED: qemu-nbd/qemu-img missing (Debian package qemu-utils)");
        return;
    }
    let dir = Dir::new("imglock", "nbd");
    make_images(&dir);
    let h = hold_with_qemu_nbd(&dir, IMG);
    check_refusals(&dir, "qemu-nbd");
    h.stop();
    check_free_again(&dir, "qemu-nbd");
}

#[test]
fn refused_while_strata_holds_the_image() {
    if !have("qemu-img") {
        eprintln!("SKIPPED: qemu-img missing (Debian package qemu-utils)");
        return;
    }
    support::require_bios();
    let dir = Dir::new("imglock", "strata");
    make_images(&dir);
    let h = hold_with_strata(&dir, IMG);
    check_refusals(&dir, "strata");
    h.stop();
    check_free_again(&dir, "strata");
}

/// Whether some process holds an OFD lock on byte `byte` of inode `ino`
/// (QEMU's lock bytes: 100 "consistent read", 101 "write", ...), as
/// /proc/locks shows it.
fn holds_byte(ino: u64, byte: u64) -> bool {
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    let ino = ino.to_string();
    locks.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let range = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
        f.len() >= 8
            && f[1] == "OFDLCK"
            && f[5].rsplit(':').next() == Some(ino.as_str())
            && range(6).is_some_and(|a| a <= byte)
            && range(7).is_some_and(|b| byte <= b)
    })
}

/// A long `strata-img bench` holds the image as qemu-img would: a reader
/// leaves it readable by readers and refuses writers; a writer (`-w`)
/// refuses both. Polled until seen, then the bench is killed.
#[test]
fn qemu_img_refused_while_strata_img_holds_the_image() {
    if !have("qemu-img") {
        eprintln!("SKIPPED: qemu-img missing (Debian package qemu-utils)");
        return;
    }
    let dir = Dir::new("imglock", "bench");
    make_images(&dir);
    let img = dir.p(IMG);
    let before = std::fs::read(&img).unwrap();
    for write in [false, true] {
        let mut args = vec!["bench", "-q", "-c", "100000000", "-d", "1"];
        if write {
            args.push("-w");
        }
        args.push(IMG);
        let child = Command::new(env!("CARGO_BIN_EXE_strata-img"))
            .args(&args)
            .current_dir(&dir.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut h = Holder {
            child,
            _stdin: None,
        };
        // Wait until the bench holds its "consistent read" byte (an OFD
        // lock on byte 100 of the file, as /proc/locks shows it).
        let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&img).unwrap());
        let t0 = Instant::now();
        while !holds_byte(ino, 100) {
            assert!(
                h.child.try_wait().unwrap().is_none(),
                "bench ended before it locked the image"
            );
            assert!(t0.elapsed() < Duration::from_secs(20), "never locked");
            std::thread::sleep(Duration::from_millis(20));
        }
        let o = qi(&dir, &["snapshot", "-c", "q", IMG]);
        assert_eq!(o.status.code(), Some(1), "qemu-img snapshot -c");
        let refusal = stderr(&o);
        assert!(
            refusal.contains("Failed to get \"write\" lock"),
            "write={write}: {refusal}"
        );
        let info = qi(&dir, &["info", IMG]);
        if write {
            assert!(
                stderr(&info).contains("Failed to get shared \"write\" lock"),
                "{}",
                stderr(&info)
            );
            assert!(qi(&dir, &["info", "-U", IMG]).status.success());
        } else {
            assert!(info.status.success(), "{}", stderr(&info));
            assert!(
                std::fs::read(&img).unwrap() == before,
                "a reading bench changed the image"
            );
        }
        assert!(
            h.child.try_wait().unwrap().is_none(),
            "bench ended while being checked"
        );
        h.stop();
        // The locks go with the last reference to the file, which the
        // kernel's io_uring workers of the killed process may hold a
        // moment after it was reaped: wait for /proc/locks to drop them.
        let t0 = Instant::now();
        while (100..=110).any(|b| holds_byte(ino, b)) && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        // A killed writer may leave leaked clusters (exit 3), nothing worse.
        let o = run("qemu-img", &["check", &img]);
        let c = o.status.code();
        assert!(
            c == Some(0) || (write && c == Some(3)),
            "write={write}: qemu-img check exit {c:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            stderr(&o)
        );
    }
}
