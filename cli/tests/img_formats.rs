//! strata-img without format knowledge: `-o help` comes from a format's
//! option table, and commands a format's driver does not implement
//! (amend, snapshots, backing files, compression) are refused as
//! qemu-img refuses them, with its exit codes and messages.

use std::process::Output;

mod support;

use support::img::{q_ok, run, s_ok, strata, Dir};

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The message after the program name, without qemu-img's raw-probing
/// warning.
fn message(o: &Output) -> String {
    err(o)
        .lines()
        .filter(|l| l.starts_with("qemu-img: ") || l.starts_with("strata-img: "))
        .map(|l| l.split_once(": ").map_or(l, |(_, m)| m).to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn option_help_lists_what_qemu_img_lists() {
    let d = Dir::new("imgfmt", "help");
    let f = d.p("x");
    for fmt in ["qcow2", "raw"] {
        let ours = s_ok(&["create", "-f", fmt, "-o", "help", &f]);
        let theirs = q_ok(&["create", "-f", fmt, "-o", "help", &f]);
        assert!(ours.starts_with("Supported options:\n"), "{ours}");
        // qemu-img adds its protocol's options (nocow, extent_size_hint),
        // which Strata's `file` does not take.
        for line in ours.lines() {
            assert!(
                theirs.lines().any(|t| t == line),
                "{fmt}: {line:?}\n{theirs}"
            );
        }
    }
    assert!(!std::path::Path::new(&f).exists(), "help created a file");
}

#[test]
fn unimplemented_operations_are_refused_like_qemu_img() {
    let d = Dir::new("imgfmt", "refuse");
    let r = d.p("r.raw");
    q_ok(&["create", "-q", "-f", "raw", &r, "1M"]);
    let y = d.p("y.raw");
    for args in [
        vec!["amend", "-f", "raw", "-o", "size=2M", &r],
        vec!["snapshot", "-c", "s", &r],
        vec!["snapshot", "-a", "s", &r],
        vec!["snapshot", "-d", "s", &r],
        vec!["snapshot", "-l", &r],
        vec!["convert", "-c", "-O", "raw", &r, &y],
        vec!["create", "-f", "raw", "-b", &r, &y, "1M"],
        vec!["check", "-f", "raw", &r],
    ] {
        let (s, q) = (strata(&args), run("qemu-img", &args));
        assert_eq!(s.status.code(), q.status.code(), "{args:?}: {}", err(&s));
        assert_eq!(message(&s), message(&q), "{args:?}");
    }
    // Nothing changed the image.
    assert_eq!(std::fs::read(&r).unwrap(), vec![0u8; 1 << 20]);
}
