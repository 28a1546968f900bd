//! Bad command lines: one clear line on stderr naming the option, a
//! non-zero exit, and never a panic.

mod support;

use std::time::Duration;

use support::run_strata;

fn check(args: &[&str], want: &str) {
    let (code, _out, err) = run_strata(args, Duration::from_secs(30));
    assert_eq!(code, Some(1), "{args:?}: stderr {err}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{args:?}: {err}"
    );
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got {err}");
    assert!(lines[0].starts_with("strata: "), "{args:?}: {err}");
    assert!(
        lines[0].contains(want),
        "{args:?}: '{}' does not mention '{want}'",
        lines[0]
    );
}

#[test]
fn bad_options() {
    check(&["-frobnicate"], "-frobnicate: invalid option");
    check(
        &["-machine", "q35x"],
        "-machine q35x: unsupported machine type",
    );
    check(&["-M", "pc,foo=bar"], "unknown property 'foo'");
    check(
        &["-bios", "/nonexistent/bios.bin"],
        "-bios /nonexistent/bios.bin",
    );
    check(&["-bios", "/"], "-bios /: not a regular file");
    check(&["-m", "0"], "-m 0");
    check(&["-m", "12Q"], "-m 12Q");
    check(&["-m", "64T", "-nodefaults"], "-m");
    check(&["-smp", "0", "-nodefaults"], "-smp 0");
    check(&["-smp", "100000", "-nodefaults"], "-smp");
    check(&["-serial", "bogus:x"], "-serial bogus:x");
    check(&["-accel", "tcg"], "-accel tcg");
    check(&["-m"], "-m: requires an argument");
    check(&["disk.img"], "disk.img");
    check(
        &["-hda", "/nonexistent/disk.img", "-nodefaults"],
        "/nonexistent/disk.img",
    );
    check(
        &["-device", "frob-dev", "-nodefaults"],
        "-device frob-dev: 'frob-dev' is not a valid device model name",
    );
    check(&["-hdc", "a.img", "-cdrom", "b.iso"], "-cdrom b.iso");
    check(
        &["-drive", "file=x.img,if=bogus"],
        "-drive file=x.img,if=bogus",
    );
}

/// A floppy image larger than any diskette the drive takes is refused
/// with one line naming the -drive.
#[test]
fn floppy_image_too_large_for_any_diskette() {
    let dir = support::scratch("cli-errors-fd");
    let img = dir.join("big.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(3 << 20)
        .unwrap();
    let drive = format!("file={},format=raw,if=floppy", img.display());
    check(
        &["-nodefaults", "-drive", &drive],
        "an image of 3145728 bytes is larger than any diskette this drive takes",
    );
}

#[test]
fn bios_that_is_not_a_bios() {
    let dir = support::scratch("badbios");
    let f = dir.join("tiny.bin");
    std::fs::write(&f, b"not a bios").unwrap();
    let p = f.display().to_string();
    if !support::kvm_available("bios_that_is_not_a_bios") {
        return;
    }
    check(&["-bios", &p, "-nodefaults"], &format!("-bios {p}"));
}

#[test]
fn missing_kvm_device_is_one_line() {
    let (code, _, err) = {
        let out = std::process::Command::new(support::strata_bin())
            .args(["-nodefaults"])
            .env("STRATA_KVM_DEVICE", "/nonexistent/kvm")
            .output()
            .unwrap();
        (
            out.status.code(),
            (),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(code, Some(1));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("/nonexistent/kvm") && err.contains("No such file"),
        "{err}"
    );
}

#[test]
fn help_and_version() {
    let (code, out, _) = run_strata(&["-version"], Duration::from_secs(10));
    assert_eq!(code, Some(0));
    assert!(out.starts_with("QEMU emulator version "));
    let (code, out, _) = run_strata(&["-help"], Duration::from_secs(10));
    assert_eq!(code, Some(0));
    assert!(out.contains("-machine") && out.contains("-no-reboot"));
}
