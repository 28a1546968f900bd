//! Bad IDE command lines: each is refused before the guest starts, with
//! one line on stderr naming the problem (qtest accelerator, no KVM).

mod support;

use std::time::Duration;

use support::run_strata;

fn check(extra: &[&str], want: &str) {
    let mut args = vec!["-machine", "pc,accel=qtest", "-qtest", "stdio"];
    args.extend_from_slice(extra);
    let (code, _out, err) = run_strata(&args, Duration::from_secs(30));
    assert_eq!(code, Some(1), "{extra:?}: stderr {err}");
    assert!(!err.contains("panicked"), "{extra:?}: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{extra:?}: expected one line, got {err}");
    assert!(lines[0].starts_with("strata: "), "{extra:?}: {err}");
    assert!(
        lines[0].contains(want),
        "{extra:?}: '{}' does not mention '{want}'",
        lines[0]
    );
}

#[test]
fn bad_ide_command_lines() {
    let dir = support::scratch("ide-errors");
    let a = dir.join("a.img");
    let b = dir.join("b.img");
    std::fs::write(&a, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&b, vec![0u8; 1 << 20]).unwrap();
    let (a, b) = (a.display().to_string(), b.display().to_string());
    let none = |f: &str, id: &str| format!("file={f},format=raw,if=none,id={id}");
    check(&["-hda", "/nonexistent/disk.img"], "/nonexistent/disk.img");
    check(&["-cdrom", &b, "-hdc", &a], "-hdc");
    check(&["-hdc", &a, "-cdrom", &b], "-cdrom");
    check(
        &["-drive", &format!("file={a},format=raw,if=ide,index=4")],
        "machine type does not support if=ide,bus=2",
    );
    check(
        &["-drive", &format!("file={a},format=raw,if=ide,unit=2")],
        "unit 2",
    );
    check(
        &[
            "-drive",
            &none(&a, "x"),
            "-drive",
            &none(&b, "y"),
            "-device",
            "ide-hd,drive=x,bus=ide.1,unit=0",
            "-device",
            "ide-hd,drive=y,bus=ide.1,unit=0",
        ],
        "IDE unit 0 is in use",
    );
    check(
        &[
            "-drive",
            &format!("file={a},format=raw,index=0"),
            "-drive",
            &none(&b, "y"),
            "-device",
            "ide-cd,drive=y,bus=ide.0,unit=0",
        ],
        "IDE unit 0 is in use",
    );
    check(&["-device", "ide-hd,bus=ide.0"], "drive property not set");
    // QEMU refuses a read-only drive behind ide-hd (ide-cd is read-only
    // anyway).
    check(
        &["-drive", &format!("file={a},format=raw,if=ide,readonly=on")],
        "Block node is read-only",
    );
    check(
        &[
            "-drive",
            &none(&a, "x").replace("if=none", "if=none,readonly=on"),
            "-device",
            "ide-hd,drive=x",
        ],
        "-device ide-hd,drive=x: Block node is read-only",
    );
    check(
        &[
            "-drive",
            &none(&a, "x"),
            "-device",
            "ide-hd,drive=x,bus=ide.3",
        ],
        "Bus 'ide.3' not found",
    );
    check(
        &["-drive", &none(&a, "x"), "-device", "ide-hd,drive=x,unit=5"],
        "unit 5",
    );
    check(
        &["-drive", &none(&a, "x"), "-device", "ide-hd,drive=x,frob=1"],
        "Property 'ide-hd.frob' not found",
    );
    check(
        &[
            "-drive",
            &none(&a, "x"),
            "-device",
            "ide-hd,drive=x,logical_block_size=4096",
        ],
        "logical_block_size=4096",
    );
    check(
        &[
            "-drive",
            &none(&a, "x"),
            "-drive",
            &none(&b, "y"),
            "-device",
            "ide-hd,drive=x,bootindex=1",
            "-device",
            "ide-hd,drive=y,bootindex=1",
        ],
        "bootindex 1",
    );
    check(
        &["-drive", "if=none,id=e", "-device", "ide-hd,drive=e"],
        "drive is empty",
    );
    check(
        &[
            "-drive",
            &none(&a, "x"),
            "-device",
            "ide-hd,drive=x,cyls=10,heads=20,secs=63",
        ],
        "heads=20",
    );
    // Five IDE devices do not fit on two channels.
    let mut args = vec![];
    let ids: Vec<String> = (0..5)
        .map(|i| format!("if=none,id=c{i},media=cdrom"))
        .collect();
    let devs: Vec<String> = (0..5).map(|i| format!("ide-cd,drive=c{i}")).collect();
    for i in 0..5 {
        args.push("-drive");
        args.push(&ids[i]);
        args.push("-device");
        args.push(&devs[i]);
    }
    check(&args, "No 'IDE' bus found for device 'ide-cd'");
}
