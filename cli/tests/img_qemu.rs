//! strata-img against real qemu-img: same output, same exit codes, images
//! that qemu-img agrees with.

mod support;

use std::process::{Command, Output};
use support::img::Dir;

fn strata(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_strata-img"))
        .args(args)
        .output()
        .unwrap()
}
fn qemu(args: &[&str]) -> Option<Output> {
    Command::new("qemu-img").args(args).output().ok()
}
fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A sparse file with data at the given (offset, len) places.
fn sparse(path: &str, size: u64, data: &[(u64, u64)]) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (i, (off, len)) in data.iter().enumerate() {
        f.seek(SeekFrom::Start(*off)).unwrap();
        let buf: Vec<u8> = (0..*len)
            .map(|j| {
                (j as u8)
                    .wrapping_mul(7)
                    .wrapping_add((i as u8).wrapping_add(1))
            })
            .collect();
        f.write_all(&buf).unwrap();
    }
    f.sync_all().unwrap();
}

type Layout = (u64, Vec<(u64, u64)>);

fn layouts() -> Vec<Layout> {
    vec![
        (10 << 20, vec![]),
        (10 << 20, vec![(128 << 10, 192 << 10), (8 << 20, 1 << 20)]),
        (4 << 20, vec![(0, 4096), ((4 << 20) - 4096, 4096)]),
        (3 * 512 + 100, vec![(0, 1000)]),
        (0, vec![]),
        (
            64 << 20,
            vec![(1 << 20, 1 << 20), (2 << 20, 1 << 20), (40 << 20, 65536)],
        ),
    ]
}

#[test]
fn info_json_matches_qemu_field_for_field() {
    if qemu(&["--version"]).is_none() {
        return;
    }
    let d = Dir::new("img", "qemu");
    for (i, (size, data)) in layouts().into_iter().enumerate() {
        let f = d.p(&format!("i{i}.img"));
        sparse(&f, size, &data);
        for fmt in [None, Some("raw")] {
            let mut a = vec!["info", "--output=json"];
            if let Some(x) = fmt {
                a.extend(["-f", x]);
            }
            a.push(&f);
            let s = strata(&a);
            let q = qemu(&a).unwrap();
            assert!(s.status.success(), "{}", err(&s));
            let sj: serde_json::Value = serde_json::from_str(&out(&s)).unwrap();
            let qj: serde_json::Value = serde_json::from_str(&out(&q)).unwrap();
            assert_eq!(sj, qj, "layout {i}");
            assert_eq!(out(&s), out(&q), "byte-identical text, layout {i}");
            let h = ["info", f.as_str()];
            assert_eq!(
                out(&strata(&h)),
                out(&qemu(&h).unwrap()),
                "human info, layout {i}"
            );
        }
    }
}

#[test]
fn map_matches_qemu_on_sparse_files() {
    if qemu(&["--version"]).is_none() {
        return;
    }
    let d = Dir::new("img", "qemu");
    for (i, (size, data)) in layouts().into_iter().enumerate() {
        let f = d.p(&format!("m{i}.img"));
        sparse(&f, size, &data);
        for output in ["--output=json", "--output=human"] {
            let a = ["map", "-f", "raw", output, &f];
            let s = strata(&a);
            let q = qemu(&a).unwrap();
            assert!(s.status.success(), "{}", err(&s));
            assert_eq!(out(&s), out(&q), "layout {i} {output}");
        }
        let a = [
            "map",
            "-f",
            "raw",
            "--output=json",
            "-s",
            "1M",
            "-l",
            "2M",
            &f,
        ];
        if size >= 3 << 20 {
            assert_eq!(
                out(&strata(&a)),
                out(&qemu(&a).unwrap()),
                "layout {i} window"
            );
        }
    }
}

#[test]
fn create_matches_qemu() {
    let d = Dir::new("img", "qemu");
    let a = d.p("a.img");
    let s = strata(&["create", "-f", "raw", &a, "1G"]);
    assert!(s.status.success());
    assert_eq!(
        out(&s),
        format!("Formatting '{a}', fmt=raw size=1073741824\n")
    );
    assert_eq!(std::fs::metadata(&a).unwrap().len(), 1 << 30);
    let s = strata(&[
        "create",
        "-f",
        "raw",
        "-o",
        "preallocation=falloc",
        &a,
        "1M",
    ]);
    assert!(s.status.success(), "{}", err(&s));
    if let Some(q) = qemu(&["info", "--output=json", &a]) {
        let j: serde_json::Value = serde_json::from_str(&out(&q)).unwrap();
        assert_eq!(j["virtual-size"], 1 << 20);
        assert!(
            j["actual-size"].as_u64().unwrap() >= 1 << 20,
            "falloc allocates"
        );
    }
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["create", "-f", "raw", &a, "1Q"],
            "strata-img: Invalid image size specified: '1Q'.\n".to_string(),
        ),
        (
            vec!["create", "-f", "raw", &a],
            format!("strata-img: {a}: Image creation needs a size parameter\n"),
        ),
        (
            vec!["create", "-f", "bogus", &a, "1M"],
            "strata-img: Unknown file format 'bogus'\n".to_string(),
        ),
    ];
    for (args, msg) in cases {
        let s = strata(&args);
        assert_eq!(s.status.code(), Some(1));
        assert_eq!(err(&s), msg);
    }
}

#[test]
fn compare_matches_qemu() {
    let d = Dir::new("img", "qemu");
    let a = d.p("a.img");
    let b = d.p("b.img");
    sparse(&a, 4 << 20, &[(1 << 20, 65536)]);
    std::fs::copy(&a, &b).unwrap();
    let check = |extra: &[&str]| {
        let mut args = vec!["compare"];
        args.extend_from_slice(extra);
        args.push(&a);
        args.push(&b);
        let s = strata(&args);
        if let Some(q) = qemu(&args) {
            assert_eq!(out(&s), out(&q), "{args:?}");
            assert_eq!(s.status.code(), q.status.code(), "{args:?}");
        }
        s.status.code()
    };
    assert_eq!(check(&[]), Some(0));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&b).unwrap();
        f.write_all_at(b"x", 700_000).unwrap();
    }
    assert_eq!(check(&[]), Some(1));
    std::fs::copy(&a, &b).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&b)
        .unwrap()
        .set_len(6 << 20)
        .unwrap();
    assert_eq!(check(&[]), Some(0));
    assert_eq!(check(&["-s"]), Some(1));
    assert_eq!(check(&["-q"]), Some(0));
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&b).unwrap();
        f.write_all_at(b"y", (5 << 20) + 3).unwrap();
    }
    assert_eq!(check(&[]), Some(1));
    let s = strata(&["compare", &a, "/nonexistent.img"]);
    assert_eq!(s.status.code(), Some(2));
    assert_eq!(err(&s).lines().count(), 1);
}

#[test]
fn convert_is_sparse_and_identical() {
    let d = Dir::new("img", "qemu");
    let src = d.p("src.img");
    sparse(
        &src,
        32 << 20,
        &[(0, 4096), (3 << 20, 1 << 20), (20 << 20, 300_000)],
    );
    // A data region full of zeroes becomes a hole with -S.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
        f.write_all_at(&vec![0u8; 1 << 20], 10 << 20).unwrap();
    }
    let variants: Vec<Vec<&str>> = vec![
        vec![],
        vec!["-p"],
        vec!["-m", "1"],
        vec!["-m", "16", "-W"],
        vec!["-S", "64k"],
        vec!["-t", "none", "-T", "none"],
        vec!["-t", "writethrough"],
    ];
    for (i, extra) in variants.into_iter().enumerate() {
        let dst = d.p(&format!("dst{i}.img"));
        let mut args = vec!["convert", "-f", "raw", "-O", "raw"];
        args.extend(extra.iter().copied());
        args.push(&src);
        args.push(&dst);
        let s = strata(&args);
        assert!(s.status.success(), "{extra:?}: {}", err(&s));
        assert!(
            std::fs::read(&src).unwrap() == std::fs::read(&dst).unwrap(),
            "{extra:?}: target differs"
        );
        if extra == ["-p"] {
            assert!(out(&s).contains("(100.00/100%)"), "{}", out(&s));
        }
        if let Some(q) = qemu(&["compare", "-f", "raw", "-F", "raw", &src, &dst]) {
            assert!(q.status.success(), "{}", out(&q));
            // Same sparseness as qemu-img convert produces.
            let qdst = d.p(&format!("q{i}.img"));
            let mut qa = vec!["convert", "-f", "raw", "-O", "raw"];
            qa.extend(extra.iter().copied().filter(|x| *x != "-p"));
            qa.push(&src);
            qa.push(&qdst);
            assert!(qemu(&qa).unwrap().status.success());
            let ms = qemu(&["map", "-f", "raw", "--output=json", &dst]).unwrap();
            let mq = qemu(&["map", "-f", "raw", "--output=json", &qdst]).unwrap();
            assert_eq!(out(&ms), out(&mq), "{extra:?}");
        }
    }
    // -S 0: fully allocated.
    let full = d.p("full.img");
    assert!(strata(&["convert", "-S", "0", "-O", "raw", &src, &full])
        .status
        .success());
    let m = out(&strata(&["map", "--output=json", &full]));
    assert!(!m.contains("\"data\": false"), "{m}");
    // -n onto an existing dirty target: holes must be zeroed...
    let tgt = d.p("tgt.img");
    std::fs::write(&tgt, vec![0xffu8; 32 << 20]).unwrap();
    assert!(strata(&["convert", "-n", "-O", "raw", &src, &tgt])
        .status
        .success());
    assert!(std::fs::read(&src).unwrap() == std::fs::read(&tgt).unwrap());
    // ...unless --target-is-zero says they already are.
    std::fs::write(&tgt, vec![0u8; 32 << 20]).unwrap();
    assert!(
        strata(&["convert", "-n", "--target-is-zero", "-O", "raw", &src, &tgt])
            .status
            .success()
    );
    assert!(std::fs::read(&src).unwrap() == std::fs::read(&tgt).unwrap());
    let s = strata(&["convert", "--target-is-zero", "-O", "raw", &src, &tgt]);
    assert_eq!(s.status.code(), Some(1));
    assert_eq!(
        err(&s),
        "strata-img: --target-is-zero requires use of -n flag\n"
    );
    // Several sources are concatenated.
    let cat = d.p("cat.img");
    assert!(strata(&["convert", "-O", "raw", &src, &src, &cat])
        .status
        .success());
    let mut both = std::fs::read(&src).unwrap();
    both.extend(std::fs::read(&src).unwrap());
    assert!(both == std::fs::read(&cat).unwrap());
}

#[test]
fn dd_matches_qemu() {
    let d = Dir::new("img", "qemu");
    let src = d.p("s.img");
    sparse(&src, 1 << 20, &[(0, 1 << 20)]);
    let variants: Vec<Vec<&str>> = vec![
        vec!["bs=64k", "count=3"],
        vec!["bs=4k", "skip=5"],
        vec!["bs=512", "count=7", "skip=3"],
        vec![],
    ];
    for ops in variants {
        let a = d.p("a.img");
        let b = d.p("b.img");
        let mut sa: Vec<String> = vec![
            "dd".into(),
            "-f".into(),
            "raw".into(),
            "-O".into(),
            "raw".into(),
        ];
        sa.extend(ops.iter().map(|s| s.to_string()));
        let mut qa = sa.clone();
        sa.push(format!("if={src}"));
        sa.push(format!("of={a}"));
        qa.push(format!("if={src}"));
        qa.push(format!("of={b}"));
        let sa: Vec<&str> = sa.iter().map(|s| s.as_str()).collect();
        let s = strata(&sa);
        assert!(s.status.success(), "{}", err(&s));
        if let Some(q) = qemu(&qa.iter().map(|s| s.as_str()).collect::<Vec<_>>()) {
            assert!(q.status.success());
            assert!(
                std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap(),
                "{ops:?}: output differs from qemu-img dd"
            );
        }
    }
    let s = strata(&["dd", "bs=4k"]);
    assert_eq!(s.status.code(), Some(1));
}

#[test]
fn bench_flags_and_output() {
    let d = Dir::new("img", "qemu");
    let f = d.p("b.img");
    sparse(&f, 16 << 20, &[]);
    let variants: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["-c", "2000", "-d", "32", "-t", "none", "-i", "io_uring"],
            "io_uring",
        ),
        (
            vec!["-c", "2000", "-d", "32", "-t", "none", "-i", "threads"],
            "threads",
        ),
        (
            vec!["-c", "500", "-d", "4", "-s", "1M", "-S", "1M"],
            "default",
        ),
        (
            vec![
                "-c",
                "300",
                "-w",
                "-d",
                "8",
                "-o",
                "4M",
                "--pattern",
                "171",
                "--flush-interval",
                "50",
            ],
            "w",
        ),
        (
            vec![
                "-c",
                "300",
                "-w",
                "-d",
                "8",
                "--flush-interval",
                "10",
                "--no-drain",
                "-t",
                "writethrough",
            ],
            "w2",
        ),
    ];
    for (flags, engine) in variants {
        let mut a = vec!["bench", "-f", "raw"];
        a.extend(flags.iter().copied());
        a.push(&f);
        let s = strata(&a);
        assert!(s.status.success(), "{engine}: {}", err(&s));
        let so = out(&s);
        if let Some(q) = qemu(&a) {
            let qo = out(&q);
            let sl: Vec<&str> = so
                .lines()
                .filter(|l| !l.starts_with("Run completed"))
                .collect();
            let ql: Vec<&str> = qo
                .lines()
                .filter(|l| !l.starts_with("Run completed"))
                .collect();
            assert_eq!(sl, ql, "{engine}");
        }
        assert!(
            so.lines().last().unwrap().starts_with("Run completed in "),
            "{so}"
        );
    }
    let data = std::fs::read(&f).unwrap();
    assert_eq!(data[4 << 20], 171, "the write pattern landed where -o said");
    assert_eq!(data[(4 << 20) - 1], 0);
    let s = strata(&["bench", "--flush-interval", "5", &f]);
    assert_eq!(s.status.code(), Some(1));
    assert_eq!(
        err(&s),
        "strata-img: --flush-interval is only available in write tests\n"
    );
}

#[test]
fn bad_input_one_line_exit_1_no_panic() {
    let d = Dir::new("img", "qemu");
    let f = d.p("x.img");
    sparse(&f, 1 << 20, &[]);
    let dir = d.0.to_str().unwrap().to_string();
    let bogus_opts = format!("driver=raw,file.driver=file,file.filename={f},file.bogus=1");
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["info", "/nonexistent.img"],
            "strata-img: Could not open '/nonexistent.img': Could not open '/nonexistent.img': No such file or directory\n".into(),
        ),
        (
            vec!["info", &dir],
            format!("strata-img: Could not open '{dir}': 'file' driver requires '{dir}' to be a regular file\n"),
        ),
        (
            vec!["info", "-f", "bogus", &f],
            format!("strata-img: Could not open '{f}': Unknown driver 'bogus'\n"),
        ),
        (
            vec!["info", "--output=xml", &f],
            "strata-img: --output expects 'human' or 'json' not 'xml'\n".into(),
        ),
        (
            vec!["info", "--image-opts", "driver=file,filename=/nonexistent,bogus=1"],
            String::new(),
        ),
        (
            vec!["map", "--image-opts", &bogus_opts],
            format!("strata-img: Could not open '{bogus_opts}': Block protocol 'file' doesn't support the option 'bogus'\n"),
        ),
        (
            vec!["bench", "-t", "sometimes", &f],
            "strata-img: Invalid cache mode\n".into(),
        ),
        (
            vec!["bench", "-s", "4Q", &f],
            "strata-img: Invalid buffer size specified: '4Q'.\n".into(),
        ),
        (
            vec!["bench", "-i", "native", &f],
            format!("strata-img: Could not open '{f}': aio=native was specified, but it requires cache.direct=on, which was not specified.\n"),
        ),
        (
            vec!["convert", "-m", "17", &f, &f],
            "strata-img: Invalid number of coroutines specified. Must be between 1 and 16.\n".into(),
        ),
        (vec!["frobnicate"], "strata-img: Command not found: frobnicate\n".into()),
        (vec![], "strata-img: Not enough arguments\n".into()),
        (vec!["info"], "strata-img: missing argument: <FILENAME>\n".into()),
        (vec!["info", "--bogus", &f], String::new()),
    ];
    for (args, want) in cases {
        let s = strata(&args);
        let e = err(&s);
        assert_eq!(s.status.code(), Some(1), "{args:?}: {e}");
        assert_eq!(e.lines().count(), 1, "{args:?}: {e}");
        assert!(!e.contains("panicked"), "{e}");
        assert!(e.starts_with("strata-img: "), "{e}");
        if !want.is_empty() {
            assert_eq!(e, want, "{args:?}");
        }
    }
}

#[test]
fn force_share_and_locks_across_processes() {
    let d = Dir::new("img", "qemu");
    let f = d.p("l.img");
    sparse(&f, 64 << 20, &[]);
    // A long writer in another process (strata-img bench -w)...
    let mut child = Command::new(env!("CARGO_BIN_EXE_strata-img"))
        .args(["bench", "-w", "-c", "100000000", "-d", "1", "-f", "raw", &f])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    // ...does not stop readers, as with qemu-img (tools share the image).
    let s = strata(&["info", "-f", "raw", &f]);
    let s2 = strata(&["info", "-U", "-f", "raw", &f]);
    let q = qemu(&["info", "-f", "raw", &f]);
    let _ = child.kill();
    let _ = child.wait();
    assert!(s.status.success(), "{}", err(&s));
    assert!(s2.status.success(), "{}", err(&s2));
    if let Some(q) = q {
        assert!(q.status.success());
    }
    // -U with a writer is refused with one line.
    let s = strata(&["bench", "-w", "-U", "-c", "1", &f]);
    assert_eq!(s.status.code(), Some(1));
    assert_eq!(
        err(&s),
        "strata-img: --force-share/-U can only be used with read-only images\n"
    );
}

#[test]
fn resize_and_check_like_qemu() {
    let d = Dir::new("img", "qemu");
    let s_img = d.p("s.img");
    let q_img = d.p("q.img");
    sparse(&s_img, 4 << 20, &[(0, 4096)]);
    sparse(&q_img, 4 << 20, &[(0, 4096)]);
    let steps: Vec<Vec<&str>> = vec![
        vec!["resize", "-f", "raw", "IMG", "+1M"],
        vec!["resize", "-f", "raw", "IMG", "3M"],
        vec!["resize", "-f", "raw", "--shrink", "IMG", "3M"],
        vec!["resize", "-f", "raw", "IMG", "--", "-1M"],
        vec!["resize", "-f", "raw", "--shrink", "IMG", "--", "-1M"],
        vec!["resize", "-f", "raw", "--preallocation=falloc", "IMG", "8M"],
        vec!["resize", "-f", "raw", "IMG", "1Q"],
    ];
    for step in steps {
        let sa: Vec<&str> = step
            .iter()
            .map(|a| if *a == "IMG" { s_img.as_str() } else { a })
            .collect();
        let qa: Vec<&str> = step
            .iter()
            .map(|a| if *a == "IMG" { q_img.as_str() } else { a })
            .collect();
        let s = strata(&sa);
        assert!(
            err(&s).lines().filter(|l| !l.contains("warning")).count() <= 1,
            "{}",
            err(&s)
        );
        if let Some(q) = qemu(&qa) {
            assert_eq!(s.status.code(), q.status.code(), "{step:?}: {}", err(&s));
            assert_eq!(out(&s), out(&q), "{step:?}");
            assert_eq!(
                std::fs::metadata(&s_img).unwrap().len(),
                std::fs::metadata(&q_img).unwrap().len(),
                "{step:?}"
            );
        }
    }
    assert_eq!(std::fs::metadata(&s_img).unwrap().len(), 8 << 20);
    // check: raw has nothing to check (exit 63), missing file exit 1.
    let s = strata(&["check", "-f", "raw", &s_img]);
    assert_eq!(s.status.code(), Some(63));
    assert_eq!(
        err(&s),
        "strata-img: This image format does not support checks\n"
    );
    if let Some(q) = qemu(&["check", "-f", "raw", &q_img]) {
        assert_eq!(q.status.code(), Some(63));
    }
    assert_eq!(
        strata(&["check", "/nonexistent.img"]).status.code(),
        Some(1)
    );
}

#[test]
fn closed_stdout_does_not_panic() {
    use std::io::Read;
    let d = Dir::new("img", "qemu");
    let f = d.p("p.img");
    let layout: Vec<(u64, u64)> = (0..2000).map(|i| (i * 8192, 512)).collect();
    sparse(&f, 2000 * 8192, &layout);
    let mut child = Command::new(env!("CARGO_BIN_EXE_strata-img"))
        .args(["map", "-f", "raw", "--output=json", &f])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Read one byte, then close the pipe.
    let mut one = [0u8; 1];
    child.stdout.as_mut().unwrap().read_exact(&mut one).unwrap();
    drop(child.stdout.take());
    let mut e = String::new();
    child.stderr.take().unwrap().read_to_string(&mut e).unwrap();
    let _ = child.wait().unwrap();
    assert!(!e.contains("panicked"), "{e}");
}
