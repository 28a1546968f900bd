//! Node graph: JSON vs dotted -blockdev, references, backing null, node-name
//! rules, probing and the sector-0 guard, raw offset/size, null drivers,
//! bad input, image locking (also against real qemu-img).

mod common;

use block::backend::{BackendConfig, BlockBackend};
use block::error::BlockError;
use block::graph::BlockGraph;
use block::keyval::{self, Options};
use common::*;

#[test]
fn json_and_dotted_blockdev_build_equal_graphs() {
    let dir = TempDir::new("eq");
    let img = dir.file("disk.img", 1 << 20);
    let g1 = BlockGraph::new();
    let n1 = g1
        .blockdev_add_str(&format!(
            "driver=raw,node-name=n0,file.driver=file,file.filename={img},file.aio=io_uring,read-only=on,offset=4096"
        ))
        .unwrap();
    let g2 = BlockGraph::new();
    let n2 = g2
        .blockdev_add_str(&format!(
            r#"{{"driver":"raw","node-name":"n0","file":{{"driver":"file","filename":"{img}","aio":"io_uring"}},"read-only":true,"offset":4096}}"#
        ))
        .unwrap();
    let d1 = g1.describe(&n1);
    assert_eq!(d1, g2.describe(&n2));
    assert_eq!(d1.driver, "raw");
    assert_eq!(d1.children[0].0, "file");
    assert_eq!(d1.children[0].1.options["filename"], img);
    assert!(
        d1.children[0].1.common.read_only,
        "read-only inherited by inline child"
    );
    assert_eq!(n1.len(), (1 << 20) - 4096);
}

#[test]
fn children_by_reference_and_auto_names() {
    let dir = TempDir::new("ref");
    let img = dir.file("disk.img", 65536);
    let g = BlockGraph::new();
    let f = g
        .blockdev_add_str(&format!("driver=file,node-name=f0,filename={img}"))
        .unwrap();
    let r = g
        .blockdev_add_str("driver=raw,node-name=r0,file=f0")
        .unwrap();
    assert!(std::sync::Arc::ptr_eq(&r.child("file").unwrap(), &f));
    // Inline children get generated names.
    let r2 = g
        .blockdev_add_str(&format!(
            "driver=raw,node-name=r1,file.driver=file,file.filename={img},file.locking=off"
        ))
        .unwrap();
    let child = r2.child("file").unwrap();
    assert!(child.is_auto_named());
    assert!(child.name().starts_with('#'));
    assert!(g.get(child.name()).is_some());
    // Errors.
    let e = g
        .blockdev_add_str("driver=raw,node-name=r2,file=nope")
        .unwrap_err();
    assert_eq!(e.to_string(), "Cannot find device='' nor node-name='nope'");
    let e = g
        .blockdev_add_str("driver=null-co,node-name=r0")
        .unwrap_err();
    assert_eq!(e.to_string(), "Duplicate nodes with node-name='r0'");
    let e = g
        .blockdev_add_str("driver=null-co,node-name=1bad")
        .unwrap_err();
    assert_eq!(e.to_string(), "Invalid node-name: '1bad'");
    let e = g.blockdev_add_str("driver=null-co").unwrap_err();
    assert_eq!(e.to_string(), "-blockdev: parameter 'node-name' is missing");
}

#[test]
fn backing_option_plumbing() {
    // A test driver that records what it was told about its backing file.
    fn open_test(
        ctx: &mut block::graph::OpenCtx<'_>,
    ) -> block::error::BlockResult<std::sync::Arc<dyn block::driver::BlockDriver>> {
        let b = ctx.take_backing()?;
        let tag = match b {
            block::graph::Backing::Default => "default".to_string(),
            block::graph::Backing::None => "none".to_string(),
            block::graph::Backing::Node(n) => format!("node:{}", n.name()),
        };
        ctx.describe("backing", tag);
        Ok(std::sync::Arc::new(block::null::NullNode::new(
            false, 4096, true, 0,
        )))
    }
    let g = BlockGraph::new();
    g.register_driver("test-fmt", open_test);
    g.blockdev_add_str("driver=null-co,node-name=base").unwrap();
    let a = g.blockdev_add_str("driver=test-fmt,node-name=a").unwrap();
    let b = g
        .blockdev_add_str(r#"{"driver":"test-fmt","node-name":"b","backing":null}"#)
        .unwrap();
    let c = g
        .blockdev_add_str("driver=test-fmt,node-name=c,backing=base")
        .unwrap();
    let d = g
        .blockdev_add_str("driver=test-fmt,node-name=d,backing=")
        .unwrap();
    assert_eq!(g.describe(&a).options["backing"], "default");
    assert_eq!(g.describe(&b).options["backing"], "none");
    assert_eq!(g.describe(&c).options["backing"], "node:base");
    assert_eq!(g.describe(&d).options["backing"], "none");
    assert_eq!(c.child("backing").unwrap().name(), "base");
    // The backing child is never written through the chain: a writer on c
    // may attach, and base keeps refusing other writers while it is in use.
    let _w = BlockBackend::new("w", c.clone(), BackendConfig::default()).unwrap();
    // raw does not take a backing option.
    let e = g
        .blockdev_add_str("driver=raw,node-name=e,file=base,backing=base")
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "Block format 'raw' doesn't support the option 'backing'"
    );
}

#[test]
fn permissions_between_users() {
    let g = BlockGraph::new();
    let n = g.blockdev_add_str("driver=null-co,node-name=n").unwrap();
    let w = BlockBackend::new("w", n.clone(), BackendConfig::default()).unwrap();
    // A second writer conflicts: the first does not share 'write'.
    let e = BlockBackend::new("w2", n.clone(), BackendConfig::default()).unwrap_err();
    assert!(e.to_string().contains("'write'"), "{e}");
    // A reader that does not share write also conflicts with the writer.
    let ro = BackendConfig {
        read_only: true,
        ..Default::default()
    };
    assert!(BlockBackend::new("r", n.clone(), ro.clone()).is_err());
    drop(w);
    // Released: now a reader and then... the writer is refused by the reader.
    let r = BlockBackend::new("r", n.clone(), ro).unwrap();
    assert!(BlockBackend::new("w3", n.clone(), BackendConfig::default()).is_err());
    drop(r);
    assert!(BlockBackend::new("w4", n, BackendConfig::default()).is_ok());
}

#[test]
fn permissions_propagate_along_edges() {
    // Two raw nodes over one file node: writers on both conflict at the
    // shared child, and the error names the parent edge.
    let g = BlockGraph::new();
    g.blockdev_add_str("driver=null-co,node-name=f0").unwrap();
    let a = g
        .blockdev_add_str("driver=raw,node-name=ra,file=f0")
        .unwrap();
    let b = g
        .blockdev_add_str("driver=raw,node-name=rb,file=f0")
        .unwrap();
    let wa = BlockBackend::new("a", a.clone(), BackendConfig::default()).unwrap();
    let e = BlockBackend::new("b", b.clone(), BackendConfig::default()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Conflicts with use by node 'ra' as 'file' which does not allow 'write' on f0"
    );
    // A user directly on the child is checked against the edge too.
    let f0 = g.get("f0").unwrap();
    assert!(BlockBackend::new("c", f0.clone(), BackendConfig::default()).is_err());
    // Sharing users (tools) coexist.
    let tool = BackendConfig {
        shared: block::driver::Perms::ALL,
        ..Default::default()
    };
    drop(wa);
    let t1 = BlockBackend::new("t1", a, tool.clone()).unwrap();
    let t2 = BlockBackend::new("t2", b.clone(), tool.clone()).unwrap();
    drop((t1, t2));
    // After release, the edge is gone and a writer on b works.
    assert!(BlockBackend::new("b2", b, BackendConfig::default()).is_ok());
}

#[test]
fn image_locking_between_open_files() {
    let dir = TempDir::new("lock");
    let img = dir.file("disk.img", 1 << 20);
    let g1 = BlockGraph::new();
    let a = g1.open_image(&img, Some("raw"), false, &[]).unwrap();
    let _wa = BlockBackend::new("a", a, BackendConfig::default()).unwrap();
    // A second, independent open (another open file description: what a
    // second process would have) is refused.
    let g2 = BlockGraph::new();
    let b = g2.open_image(&img, Some("raw"), false, &[]).unwrap();
    let e = BlockBackend::new("b", b, BackendConfig::default()).unwrap_err();
    assert!(matches!(e, BlockError::Locked(_)));
    assert_eq!(
        e.to_string(),
        format!("Failed to get \"write\" lock: is another process using the image [{img}]?")
    );
    // Read-only is refused too (it does not share write)...
    let c = g2.open_image(&img, Some("raw"), true, &[]).unwrap();
    let e = BlockBackend::new("c", c, BackendConfig::default()).unwrap_err();
    assert!(
        e.to_string()
            .contains("Failed to get shared \"write\" lock"),
        "{e}"
    );
    // ...but force-share (-U) opens read-only anyway.
    let d = g2
        .open_image(
            &img,
            Some("raw"),
            true,
            &[("force-share", "on"), ("file.force-share", "on")],
        )
        .unwrap();
    let u = BlockBackend::new("d", d, BackendConfig::default()).unwrap();
    let mut buf = [0u8; 16];
    u.read_at(0, &mut buf).unwrap();
    // force-share without read-only is a clear error.
    let e = g2
        .open_image(&img, Some("raw"), false, &[("force-share", "on")])
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "force-share=on can only be used with read-only images"
    );
}

fn have(cmd: &str) -> bool {
    std::process::Command::new(cmd)
        .arg("--version")
        .output()
        .is_ok()
}

fn qemu_img(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn locks_interoperate_with_qemu() {
    if !have("qemu-img") {
        eprintln!("qemu-img missing; skipped");
        return;
    }
    let dir = TempDir::new("qlock");
    let img = dir.file("disk.img", 1 << 20);
    let g = BlockGraph::new();
    // Strata as a device holds the image: a QEMU writer is refused, a QEMU
    // reader (which shares write, as qemu-img 10 does) is not.
    let n = g.open_image(&img, Some("raw"), false, &[]).unwrap();
    let w = BlockBackend::new("a", n, BackendConfig::default()).unwrap();
    let (ok, err) = qemu_img(&["bench", "-w", "-c", "1", "-f", "raw", &img]);
    assert!(!ok);
    assert!(err.contains("Failed to get \"write\" lock"), "{err}");
    assert!(qemu_img(&["info", &img]).0);
    drop(w);
    assert!(
        qemu_img(&["bench", "-w", "-c", "1", "-f", "raw", &img]).0,
        "lock released on drop"
    );
    // The other direction: qemu-nbd holds the image (write + unshared resize).
    if !have("qemu-nbd") {
        return;
    }
    let sock = dir.path("nbd.sock");
    let mut child = std::process::Command::new("qemu-nbd")
        .args(["-f", "raw", "-k", &sock, &img])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // qemu-nbd takes its locks around the time it creates the socket:
    // wait until the device's open is refused (or give up after 4 s).
    let mut n = g.open_image(&img, Some("raw"), false, &[]).unwrap();
    let mut dev = BlockBackend::new("b", n.clone(), BackendConfig::default());
    for _ in 0..200 {
        if dev.is_err() {
            break;
        }
        drop(dev);
        drop(n);
        std::thread::sleep(std::time::Duration::from_millis(20));
        n = g.open_image(&img, Some("raw"), false, &[]).unwrap();
        dev = BlockBackend::new("b", n.clone(), BackendConfig::default());
    }
    let tool = BlockBackend::new(
        "c",
        n.clone(),
        BackendConfig {
            shared: block::driver::Perms::ALL,
            resize: true,
            ..Default::default()
        },
    );
    let _ = child.kill();
    let _ = child.wait();
    let e = dev.unwrap_err().to_string();
    assert!(e.contains("Failed to get shared \"write\" lock"), "{e}");
    let e = tool.unwrap_err().to_string();
    assert!(e.contains("Failed to get \"resize\" lock"), "{e}");
}

#[test]
fn probing_warns_and_guards_sector0() {
    let dir = TempDir::new("probe");
    let img = dir.file("disk.img", 1 << 20);
    let g = BlockGraph::new();
    let spec = block::drive::parse_drive(&format!("file={img},if=none,id=p")).unwrap();
    assert!(spec.probe);
    let blk = spec.open(&g).unwrap();
    let w = g.take_warnings();
    assert_eq!(w.len(), 1);
    assert!(w[0].contains("probing guessed raw"), "{}", w[0]);
    assert_eq!(blk.root().unwrap().driver_name(), "raw");
    // A qcow2 header in sector 0 is refused...
    let mut hdr = vec![0u8; 512];
    hdr[..4].copy_from_slice(b"QFI\xfb");
    hdr[7] = 3;
    let e = blk.write_at(0, &hdr).unwrap_err();
    assert_eq!(e.errno(), libc::EPERM);
    // ...also when assembled by a partial write over existing bytes.
    blk.write_at(4, &[0, 0, 0, 3]).unwrap();
    assert!(blk.write_at(0, b"QFI\xfb").is_err());
    // ...and through the async path.
    let q = block::backend::CompletionQueue::new().unwrap();
    blk.submit(
        block::driver::IoRequest::write(0, block::iov::IoVecs::from_vec(hdr.clone()), false),
        q.completion(0),
    );
    assert!(q.wait()[0].2.is_err());
    // Ordinary data in sector 0 is fine.
    blk.write_at(0, &[0x55; 512]).unwrap();
    let mut back = [0u8; 512];
    blk.read_at(0, &mut back).unwrap();
    assert_eq!(back, [0x55; 512]);
    drop(blk);
    // With format=raw given explicitly the header may be written.
    let g = BlockGraph::new();
    let blk = block::drive::parse_drive(&format!("file={img},format=raw,if=none,id=q"))
        .unwrap()
        .open(&g)
        .unwrap();
    assert!(g.take_warnings().is_empty());
    blk.write_at(0, &hdr).unwrap();
    drop(blk);
    // Now the file probes as qcow2; its header is no valid qcow2 header:
    // one clear error naming the file.
    let g = BlockGraph::new();
    let e = block::drive::parse_drive(&format!("file={img},if=none,id=r"))
        .unwrap()
        .open(&g)
        .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(&img) && msg.contains("cluster size"), "{msg}");
}

#[test]
fn raw_offset_and_size_window() {
    let dir = TempDir::new("win");
    let img = dir.file("disk.img", 1 << 20);
    std::fs::write(&img, pattern(1 << 20, 1)).unwrap();
    let g = BlockGraph::new();
    let n = g
        .blockdev_add_str(&format!(
            "driver=raw,node-name=w,offset=64k,size=128k,file.driver=file,file.filename={img}"
        ))
        .unwrap();
    assert_eq!(n.len(), 128 * 1024);
    let blk = BlockBackend::new("w", n, BackendConfig::default()).unwrap();
    let mut buf = vec![0u8; 4096];
    blk.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, pattern(1 << 20, 1)[65536..65536 + 4096]);
    blk.write_at(128 * 1024 - 4, &[0xee; 4]).unwrap();
    assert!(
        blk.write_at(128 * 1024 - 3, &[0xee; 4]).is_err(),
        "past the window"
    );
    drop(blk);
    let raw = std::fs::read(&img).unwrap();
    assert_eq!(&raw[65536 + 128 * 1024 - 4..65536 + 128 * 1024], &[0xee; 4]);
    assert_eq!(
        raw[65536 + 128 * 1024],
        pattern(1 << 20, 1)[65536 + 128 * 1024]
    );
    let e = g
        .blockdev_add_str(&format!(
            "driver=raw,node-name=x,offset=1M,size=1,file.driver=file,file.filename={img}"
        ))
        .unwrap_err();
    assert!(e.to_string().contains("has to be smaller or equal"), "{e}");
}

#[test]
fn null_drivers() {
    let g = BlockGraph::new();
    for d in ["null-co", "null-aio"] {
        let n = g
            .blockdev_add_str(&format!(
                "driver={d},node-name={},size=1G,read-zeroes=on",
                d.replace('-', "_")
            ))
            .unwrap();
        assert_eq!(n.len(), 1 << 30);
        let blk = BlockBackend::new(d, n, BackendConfig::default()).unwrap();
        let mut buf = vec![0xffu8; 4096];
        blk.read_at(1 << 29, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        blk.write_at(0, &[1; 512]).unwrap();
        let q = block::backend::CompletionQueue::new().unwrap();
        for i in 0..64 {
            blk.submit(
                block::backend::read_request(i * 4096, 4096),
                q.completion(i),
            );
        }
        let mut n = 0;
        while n < 64 {
            n += q.wait().len();
        }
        assert_eq!(blk.stats().read.ops, 65);
    }
}

#[test]
fn bad_input_gives_one_line_errors() {
    let dir = TempDir::new("bad");
    let img = dir.file("disk.img", 4096);
    let g = BlockGraph::new();
    let cases: Vec<(String, String)> = vec![
        (
            "driver=file,node-name=a,filename=/nonexistent/x".into(),
            "Could not open '/nonexistent/x': No such file or directory".into(),
        ),
        (
            format!("driver=file,node-name=b,filename={}", dir.0.display()),
            format!(
                "'file' driver requires '{}' to be a regular file",
                dir.0.display()
            ),
        ),
        (
            "driver=bogus,node-name=c".into(),
            "Unknown driver 'bogus'".into(),
        ),
        (
            format!("driver=file,node-name=d,filename={img},bogus=1"),
            "Block protocol 'file' doesn't support the option 'bogus'".into(),
        ),
        (
            format!("driver=raw,node-name=e,file.driver=file,file.filename={img},file.bogus=1"),
            "Block protocol 'file' doesn't support the option 'bogus'".into(),
        ),
        (
            "driver=null-co,node-name=f,size=12Q".into(),
            "-blockdev: parameter 'size' expects a size (e.g. 512, 64K, 1.5G), got '12Q'".into(),
        ),
        (
            format!("driver=file,node-name=g,filename={img},aio=native"),
            "aio=native was specified, but it requires cache.direct=on, which was not specified."
                .into(),
        ),
        (
            format!("driver=file,node-name=h,filename={img},aio=bogus"),
            "invalid parameter value: bogus".into(),
        ),
        (
            "driver=null-co,node-name=i,read-only=maybe".into(),
            "-blockdev: parameter 'read-only' expects 'on' or 'off', got 'maybe'".into(),
        ),
        ("{\"driver\":".into(), "".into()),
    ];
    for (opt, want) in cases {
        let e = g.blockdev_add_str(&opt).unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
        if want.is_empty() {
            assert!(e.starts_with("-blockdev: invalid JSON"), "{e}");
        } else {
            assert_eq!(e, want, "for {opt}");
        }
    }
    // Fuzz-ish: arbitrary option strings never panic.
    let alphabet = [
        "driver",
        "=",
        ",",
        ",,",
        ".",
        "raw",
        "file",
        "null-co",
        "{",
        "}",
        "\"",
        "node-name",
        "x",
        "size",
        "1k",
        "backing",
        "",
    ];
    let mut seed = 12345u64;
    for _ in 0..3000 {
        let mut s = String::new();
        for _ in 0..(seed % 12) {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            s.push_str(alphabet[(seed >> 33) as usize % alphabet.len()]);
        }
        let _ = g.blockdev_add_str(&s);
        let _ = block::drive::parse_drive(&s);
        let _ = keyval::parse("-x", &s, Some("k")).map(|m| Options::new("-x", m).finish());
    }
}

#[test]
fn json_pseudo_protocol_filenames() {
    let dir = TempDir::new("jsonfn");
    let img = dir.file("disk.img", 1 << 20);
    std::fs::write(&img, pattern(1 << 20, 2)).unwrap();
    let g = BlockGraph::new();
    let fname = format!(
        r#"json:{{"driver":"raw","offset":4096,"file":{{"driver":"file","filename":"{img}"}}}}"#
    );
    let n = g.open_image(&fname, None, true, &[]).unwrap();
    assert_eq!(n.driver_name(), "raw");
    assert_eq!(n.len(), (1 << 20) - 4096);
    let blk = BlockBackend::new("j", n, BackendConfig::default()).unwrap();
    let mut b = [0u8; 16];
    blk.read_at(0, &mut b).unwrap();
    assert_eq!(&b[..], &pattern(1 << 20, 2)[4096..4112]);
    drop(blk);
    // The same through -drive (commas escaped as ,,).
    let spec =
        block::drive::parse_drive(&format!("file={},if=none,id=j2", fname.replace(',', ",,")))
            .unwrap();
    let blk = spec.open(&g).unwrap();
    assert_eq!(blk.len(), (1 << 20) - 4096);
    let e = g.open_image("json:{bad", None, true, &[]).unwrap_err();
    assert!(
        e.to_string().starts_with("json: filename: invalid JSON"),
        "{e}"
    );
}

#[test]
fn auto_read_only_falls_back_when_writing_is_refused() {
    let dir = TempDir::new("aro");
    let img = dir.file("imm.img", 65536);
    // An immutable file cannot be opened for writing, even by root.
    let ok = std::process::Command::new("chattr")
        .args(["+i", &img])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("chattr +i unavailable; skipped");
        return;
    }
    struct Unlock(String);
    impl Drop for Unlock {
        fn drop(&mut self) {
            let _ = std::process::Command::new("chattr")
                .args(["-i", &self.0])
                .status();
        }
    }
    let _u = Unlock(img.clone());
    let g = BlockGraph::new();
    let e = g
        .blockdev_add_str(&format!("driver=file,node-name=a,filename={img}"))
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("Could not open '{img}': Operation not permitted")
    );
    let n = g
        .blockdev_add_str(&format!(
            "driver=file,node-name=b,filename={img},auto-read-only=on"
        ))
        .unwrap();
    assert!(n.is_read_only());
    let blk = BlockBackend::new("b", n, BackendConfig::default()).unwrap();
    assert!(blk.is_read_only());
    let mut b = [1u8; 16];
    blk.read_at(0, &mut b).unwrap();
    assert_eq!(b, [0; 16]);
    assert_eq!(blk.write_at(0, &[1]).unwrap_err().errno(), libc::EROFS);
}

#[test]
fn lock_conflict_between_two_strata_processes() {
    // Child mode: hold the image as a device would, until stdin closes.
    if let Ok(img) = std::env::var("STRATA_LOCK_CHILD") {
        let g = BlockGraph::new();
        let n = g.open_image(&img, Some("raw"), false, &[]).unwrap();
        let _blk = BlockBackend::new("held", n, BackendConfig::default()).unwrap();
        println!("locked");
        let mut s = String::new();
        let _ = std::io::stdin().read_line(&mut s);
        return;
    }
    use std::io::{BufRead, BufReader};
    let dir = TempDir::new("lock2p");
    let img = dir.file("disk.img", 1 << 20);
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "lock_conflict_between_two_strata_processes",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("STRATA_LOCK_CHILD", &img)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("locked") {
        line.clear();
        if out.read_line(&mut line).unwrap() == 0 {
            break;
        }
    }
    assert!(line.contains("locked"), "child did not lock");
    let g = BlockGraph::new();
    let n = g.open_image(&img, Some("raw"), false, &[]).unwrap();
    let e = BlockBackend::new("w", n, BackendConfig::default()).unwrap_err();
    let ro = g.open_image(&img, Some("raw"), true, &[]).unwrap();
    let e2 = BlockBackend::new("r", ro, BackendConfig::default()).unwrap_err();
    let shared = g
        .open_image(&img, Some("raw"), true, &[("force-share", "on")])
        .unwrap();
    let u = BlockBackend::new("u", shared, BackendConfig::default());
    drop(child.stdin.take());
    let _ = child.wait();
    assert_eq!(
        e.to_string(),
        format!("Failed to get \"write\" lock: is another process using the image [{img}]?")
    );
    assert!(
        e2.to_string()
            .contains("Failed to get shared \"write\" lock"),
        "{e2}"
    );
    assert!(u.is_ok(), "-U / force-share opens read-only anyway");
}

#[test]
fn a_fifo_is_refused_not_waited_on() {
    let dir = TempDir::new("fifo");
    let p = dir.path("pipe");
    let c = std::ffi::CString::new(p.clone()).unwrap();
    // SAFETY: mkfifo on a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let g = BlockGraph::new();
    let t = std::time::Instant::now();
    let e = g.open_image(&p, None, true, &[]).unwrap_err();
    assert!(t.elapsed() < std::time::Duration::from_secs(2));
    assert_eq!(
        e.to_string(),
        format!("'file' driver requires '{p}' to be a regular file")
    );
}

/// At exit the VMM closes the graph while some thread (a job's, a
/// monitor's) may still hold a node: the images must be consistent and
/// their bitmaps stored all the same, as `qemu-img check` sees them.
#[test]
fn close_all_leaves_images_clean_while_a_node_is_still_held() {
    let dir = TempDir::new("close-all");
    let img = dir.path("d.qcow2");
    let (rc, out) = qemu("qemu-img", &["create", "-q", "-f", "qcow2", &img, "8M"]);
    assert_eq!(rc, 0, "{out}");
    let g = BlockGraph::new();
    let n = g
        .blockdev_add_str(&format!(
            "driver=qcow2,node-name=d,file.driver=file,file.filename={img}"
        ))
        .unwrap();
    let bm = block::bitmap::DirtyBitmap::new("b0", n.len(), 65536, true).unwrap();
    n.add_bitmap(std::sync::Arc::new(bm)).unwrap();
    let data = vec![7u8; 1 << 20];
    for i in 0..4u64 {
        n.write_vectored(i << 21, &[std::io::IoSlice::new(&data)], false)
            .unwrap();
    }
    let held = n.clone();
    drop(n);
    g.close_all();
    // `-U`: the node is still open (and locked) in this process.
    let (rc, out) = qemu("qemu-img", &["check", "-U", &img]);
    assert_eq!(rc, 0, "{out}");
    let (rc, out) = qemu("qemu-img", &["info", "-U", "--output=json", &img]);
    assert_eq!(rc, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let b = &v["format-specific"]["data"]["bitmaps"][0];
    assert_eq!(b["name"], "b0", "{out}");
    assert_eq!(b["flags"], serde_json::json!(["auto"]), "{out}");
    let (rc, out) = qemu("qemu-io", &["-U", "-r", "-c", "read -P 7 6M 1M", &img]);
    assert!(rc == 0 && !out.contains("fail"), "{out}");
    drop(held);
    let (rc, out) = qemu("qemu-img", &["check", &img]);
    assert_eq!(rc, 0, "closing twice changes nothing: {out}");
}
