//! Crash consistency: a `strata-img bench -w` writer on a qcow2 image,
//! with flushes honoured (cache=writethrough, or writeback with periodic
//! flushes), is killed with SIGKILL mid-stream. `strata-img check` and
//! `qemu-img check` must then find no corruption (leaks are allowed: exit
//! code 0 or 3). With lazy_refcounts the image is left dirty, with
//! refcounts that may lag behind the L2 tables (all either check reports
//! is refcounts); the next read-write open repairs it and clears the bit.
//! Differentially, `qemu-img check -r all` and `strata-img check -r all`
//! repair copies of the killed lazy image: both come out clean, with the
//! same guest contents.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn strata_bin() -> &'static str {
    env!("CARGO_BIN_EXE_strata-img")
}

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().unwrap()
}

fn dirty(img: &str) -> bool {
    let b = std::fs::read(img).unwrap();
    b[79] & 1 != 0
}

/// A check that waits out the killed writer's image lock: an exiting
/// process's last `fput` may be deferred to a kernel workqueue
/// (`delayed_fput`), so its OFD lock can outlive `wait()` by a moment.
fn check(tool: &str, img: &str) -> Output {
    let mut tries = 0;
    loop {
        let out = run(tool, &["check", img]);
        let locked = String::from_utf8_lossy(&out.stderr).contains("lock");
        if !locked || tries == 20 {
            return out;
        }
        tries += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Only refcounts are wrong (what lazy refcounts allow in a dirty image):
/// every error either check reports names a refcount.
fn only_refcounts_lag(img: &str, what: &str) {
    for (tool, out) in [
        ("qemu-img", check("qemu-img", img)),
        ("strata-img", check(strata_bin(), img)),
    ] {
        let code = out.status.code();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            matches!(code, Some(0) | Some(2) | Some(3)),
            "{what}: {tool} check exit {code:?}:\n{text}"
        );
        for l in text.lines().filter(|l| l.starts_with("ERROR")) {
            assert!(l.contains("refcount="), "{what}: {tool}: {l}");
        }
    }
}

/// Repair copies of the killed dirty image with QEMU and with Strata:
/// both clean afterwards, and equal.
fn repairs_agree(img: &str, what: &str) {
    let q = format!("{img}.qemu");
    let s = format!("{img}.strata");
    std::fs::copy(img, &q).unwrap();
    std::fs::copy(img, &s).unwrap();
    let qr = run("qemu-img", &["check", "-q", "-r", "all", &q]);
    let sr = run(strata_bin(), &["check", "-q", "-r", "all", &s]);
    for (who, r) in [("qemu-img", &qr), ("strata-img", &sr)] {
        assert!(
            matches!(r.status.code(), Some(0) | Some(3)),
            "{what}: {who} check -r all: {}{}",
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr)
        );
    }
    for f in [&q, &s] {
        assert!(!dirty(f), "{what}: {f} is still dirty after the repair");
        for tool in ["qemu-img", strata_bin()] {
            let c = run(tool, &["check", f]);
            assert_eq!(
                c.status.code(),
                Some(0),
                "{what}: {tool} check {f} after the repair:\n{}{}",
                String::from_utf8_lossy(&c.stdout),
                String::from_utf8_lossy(&c.stderr)
            );
        }
    }
    let c = run(
        "qemu-img",
        &["compare", "-q", "-f", "qcow2", "-F", "qcow2", &q, &s],
    );
    assert_eq!(
        c.status.code(),
        Some(0),
        "{what}: the repaired copies differ"
    );
    let _ = std::fs::remove_file(&q);
    let _ = std::fs::remove_file(&s);
}

fn no_corruption(img: &str, what: &str) {
    for (tool, out) in [
        ("qemu-img", check("qemu-img", img)),
        ("strata-img", check(strata_bin(), img)),
    ] {
        let code = out.status.code();
        assert!(
            matches!(code, Some(0) | Some(3)),
            "{what}: {tool} check exit {code:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn sigkill_mid_write_leaves_no_corruption() {
    let d = std::env::temp_dir().join(format!("strata-img-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let img = d.join("c.qcow2");
    let img = img.to_str().unwrap();
    let rounds: u64 = std::env::var("STRATA_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let cases: &[(&str, &str, &[&str])] = &[
        ("compat=1.1", "writethrough", &[]),
        ("cluster_size=4096", "writeback", &["--flush-interval", "8"]),
        ("lazy_refcounts=on", "writethrough", &[]),
        ("cluster_size=16384,extended_l2=on", "writethrough", &[]),
        (
            "compat=0.10,cluster_size=512",
            "writeback",
            &["--flush-interval", "16"],
        ),
    ];
    for r in 0..rounds {
        for (i, (o, cache, extra)) in cases.iter().enumerate() {
            let what = format!("{o} cache={cache} round {r}");
            let _ = std::fs::remove_file(img);
            let c = run(
                "qemu-img",
                &["create", "-q", "-f", "qcow2", "-o", o, img, "256M"],
            );
            assert!(c.status.success(), "{what}");
            // Odd sizes and steps: partial clusters, COW, new L2 tables.
            let mut args = vec![
                "bench",
                "-w",
                "-q",
                "-f",
                "qcow2",
                "-t",
                cache,
                "-c",
                "100000000",
                "-d",
                "8",
                "-s",
                "6144",
                "-S",
                "1052672",
                "--pattern",
                "165",
            ];
            args.extend_from_slice(extra);
            args.push(img);
            let mut child = Command::new(strata_bin())
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(300 + 137 * ((r * 5 + i as u64) % 5)));
            if let Ok(Some(st)) = child.try_wait() {
                let out = child.wait_with_output().unwrap();
                panic!(
                    "{what}: the writer ended early ({st}): {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            let lazy = o.contains("lazy_refcounts=on");
            if lazy {
                assert!(
                    dirty(img),
                    "{what}: a killed lazy-refcounts writer leaves the dirty bit"
                );
                only_refcounts_lag(img, &what);
                repairs_agree(img, &what);
            } else {
                no_corruption(img, &what);
            }
            // The next read-write open repairs a dirty image; afterwards
            // the image is clean (not even leaks) and not dirty.
            let w = run(
                strata_bin(),
                &[
                    "bench", "-w", "-q", "-f", "qcow2", "-c", "1", "-d", "1", img,
                ],
            );
            assert!(
                w.status.success(),
                "{what}: {}",
                String::from_utf8_lossy(&w.stderr)
            );
            assert!(!dirty(img), "{what}: dirty after a clean close");
            if lazy {
                let c = run("qemu-img", &["check", img]);
                assert_eq!(
                    c.status.code(),
                    Some(0),
                    "{what}: after the repairing open:\n{}",
                    String::from_utf8_lossy(&c.stdout)
                );
            }
            no_corruption(img, &what);
        }
    }
    let _ = std::fs::remove_dir_all(&d);
}
