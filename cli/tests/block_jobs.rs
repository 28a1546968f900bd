//! [JOBS] Live block operations on a running strata (qtest mode), driven
//! over QMP while the disk keeps being written through its backend
//! (HMP `qemu-io DRIVE "write -P ..."`, the path a device's requests
//! take) with a pattern the test also applies to a raw model. After each
//! operation strata quits, and `qemu-img check` and `qemu-img compare`
//! against the model judge the images.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use support::qmp::Qmp;
use support::qtest::Qtest;

const SIZE: u64 = 32 << 20;

fn qemu_img(args: &[&str]) -> String {
    let o = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    assert!(
        o.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A disk and the model of what it should hold.
struct Disk {
    id: String,
    model: Vec<u8>,
}

impl Disk {
    fn new(id: &str) -> Disk {
        Disk {
            id: id.into(),
            model: vec![0; SIZE as usize],
        }
    }
    fn write(&mut self, q: &mut Qmp, pattern: u8, off: u64, len: u64) {
        let line = format!(
            "qemu-io {} \"write -P 0x{pattern:02x} {off} {len}\"",
            self.id
        );
        let r = q.ok("human-monitor-command", json!({"command-line": line}));
        assert!(r.as_str().unwrap().starts_with("wrote"), "{line}: {r}");
        self.model[off as usize..(off + len) as usize].fill(pattern);
    }
    /// A few writes spread over the disk, different each round.
    fn scribble(&mut self, q: &mut Qmp, round: u8) {
        for i in 0..4u64 {
            let off = ((round as u64 * 7919 + i * 5_000_003) % (SIZE - 200_000)) & !511;
            self.write(
                q,
                round.wrapping_mul(16).wrapping_add(i as u8 + 1),
                off,
                65536 + i * 4096,
            );
        }
    }
    fn save_model(&self, path: &Path) {
        std::fs::write(path, &self.model).unwrap();
    }
}

fn start(dir: &Path, drives: &[(&str, &str)]) -> (Qtest, Qmp) {
    let sock = dir.join("qmp.sock");
    let qmp = format!("unix:{},server=on,wait=off", sock.display());
    let mut args: Vec<String> = vec!["-qmp".into(), qmp];
    for (id, file) in drives {
        args.push("-drive".into());
        args.push(format!("if=none,id={id},file={file},format=qcow2"));
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let qt = Qtest::start(&a);
    let q = Qmp::negotiated(&sock);
    (qt, q)
}

fn quit(mut qt: Qtest, mut q: Qmp) {
    q.ok("quit", json!({}));
    assert!(
        qt.wait_exit(Duration::from_secs(30)).is_some(),
        "strata did not exit"
    );
}

fn check_equal(image: &str, fmt: &str, model: &Disk, dir: &Path) {
    if fmt == "qcow2" {
        qemu_img(&["check", image]);
    }
    let m = dir.join(format!("model-{}.raw", model.id));
    model.save_model(&m);
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        fmt,
        m.to_str().unwrap(),
        image,
    ]);
}

fn create(dir: &Path, name: &str) -> String {
    let p = dir.join(name);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        p.to_str().unwrap(),
        &SIZE.to_string(),
    ]);
    p.to_str().unwrap().to_string()
}

fn depth(q: &mut Qmp, drive: &str) -> u64 {
    let v = q.ok("query-block", json!({}));
    let d = v
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == drive)
        .unwrap_or_else(|| panic!("{drive} not in {v}"));
    d["inserted"]["backing_file_depth"].as_u64().unwrap()
}

fn file_of(q: &mut Qmp, drive: &str) -> String {
    let v = q.ok("query-block", json!({}));
    let d = v
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == drive)
        .unwrap();
    d["inserted"]["file"].as_str().unwrap().to_string()
}

/// Waits for the job's end event, scribbling while it runs.
fn run_to_end(q: &mut Qmp, disks: &mut [&mut Disk], job: &str, mut round: u8) -> Value {
    let mut completed = false;
    loop {
        for d in disks.iter_mut() {
            d.scribble(q, round);
        }
        round = round.wrapping_add(1);
        let jobs = q.ok("query-block-jobs", json!({}));
        let running = jobs.as_array().unwrap().iter().any(|j| j["device"] == job);
        if !running {
            break;
        }
        if !completed
            && jobs
                .as_array()
                .unwrap()
                .iter()
                .any(|j| j["device"] == job && j["ready"] == true)
        {
            q.ok("block-job-complete", json!({"device": job}));
            completed = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let e = q.event("BLOCK_JOB_COMPLETED");
    assert_eq!(e["data"]["device"], job, "{e}");
    assert!(e["data"].get("error").is_none(), "{e}");
    e
}

#[test]
fn snapshots_in_a_transaction_then_commit_and_stream() {
    let dir = support::scratch("jobs-chain");
    let b0 = create(&dir, "base0.qcow2");
    let b1 = create(&dir, "base1.qcow2");
    let (qt, mut q) = start(&dir, &[("d0", &b0), ("d1", &b1)]);
    let (mut d0, mut d1) = (Disk::new("d0"), Disk::new("d1"));
    d0.scribble(&mut q, 1);
    d1.scribble(&mut q, 2);
    let s1a = dir.join("s1a.qcow2");
    let s1b = dir.join("s1b.qcow2");
    q.ok(
        "transaction",
        json!({"actions": [
            {"type": "blockdev-snapshot-sync", "data": {"device": "d0",
                "snapshot-file": s1a, "snapshot-node-name": "s1a", "format": "qcow2"}},
            {"type": "blockdev-snapshot-sync", "data": {"device": "d1",
                "snapshot-file": s1b, "snapshot-node-name": "s1b"}},
        ]}),
    );
    assert_eq!(depth(&mut q, "d0"), 1);
    assert_eq!(depth(&mut q, "d1"), 1);
    d0.scribble(&mut q, 3);
    d1.scribble(&mut q, 4);
    let s2a = dir.join("s2a.qcow2");
    let s2b = dir.join("s2b.qcow2");
    q.ok(
        "blockdev-snapshot-sync",
        json!({"device": "d0", "snapshot-file": s2a, "snapshot-node-name": "s2a"}),
    );
    q.ok(
        "blockdev-snapshot-sync",
        json!({"device": "d1", "snapshot-file": s2b, "snapshot-node-name": "s2b"}),
    );
    d0.scribble(&mut q, 5);
    d1.scribble(&mut q, 6);
    assert_eq!(depth(&mut q, "d0"), 2);
    // A failing action leaves every disk as it was.
    let (_, e) = q.err(
        "transaction",
        json!({"actions": [
            {"type": "blockdev-snapshot-sync", "data": {"device": "d0",
                "snapshot-file": dir.join("x.qcow2")}},
            {"type": "blockdev-snapshot-sync", "data": {"device": "nosuch",
                "snapshot-file": dir.join("y.qcow2")}},
        ]}),
    );
    assert!(e.contains("nosuch"), "{e}");
    assert_eq!(depth(&mut q, "d0"), 2);

    // d0: commit the active layer into s1a (ready, then pivot).
    q.ok(
        "block-commit",
        json!({"device": "d0", "job-id": "c0", "base-node": "s1a"}),
    );
    run_to_end(&mut q, &mut [&mut d0], "c0", 7);
    assert_eq!(depth(&mut q, "d0"), 1);
    assert!(file_of(&mut q, "d0").ends_with("s1a.qcow2"));
    d0.scribble(&mut q, 8);
    // ...then stream the base into it: one layer.
    q.ok("block-stream", json!({"device": "d0", "job-id": "st0"}));
    run_to_end(&mut q, &mut [&mut d0], "st0", 9);
    assert_eq!(depth(&mut q, "d0"), 0);

    // d1: commit the middle layer into the base.
    q.ok(
        "block-commit",
        json!({"device": "d1", "job-id": "c1", "top-node": "s1b"}),
    );
    run_to_end(&mut q, &mut [&mut d1], "c1", 10);
    assert_eq!(depth(&mut q, "d1"), 1);
    d1.scribble(&mut q, 11);
    quit(qt, q);

    let s1a = s1a.to_str().unwrap();
    assert!(!qemu_img(&["info", s1a]).contains("backing file"));
    check_equal(s1a, "qcow2", &d0, &dir);
    let s2b = s2b.to_str().unwrap();
    let info = qemu_img(&["info", s2b]);
    assert!(info.contains(&format!("backing file: {b1}")), "{info}");
    check_equal(s2b, "qcow2", &d1, &dir);
}

#[test]
fn mirror_to_a_file_and_to_qemu_nbd_with_pivot() {
    let dir = support::scratch("jobs-mirror");
    let b0 = create(&dir, "d0.qcow2");
    let (qt, mut q) = start(&dir, &[("d0", &b0)]);
    let mut d0 = Disk::new("d0");
    d0.scribble(&mut q, 1);
    let m = dir.join("m.qcow2");
    q.ok(
        "drive-mirror",
        json!({"device": "d0", "job-id": "m0", "target": m, "sync": "full", "format": "qcow2"}),
    );
    let e = q.event("BLOCK_JOB_READY");
    assert_eq!(e["data"]["type"], "mirror");
    run_to_end(&mut q, &mut [&mut d0], "m0", 2);
    assert!(file_of(&mut q, "d0").ends_with("m.qcow2"));
    // The old image's nodes are gone (and its file closed).
    let nodes = q.ok("query-named-block-nodes", json!({}));
    assert!(!nodes.to_string().contains("d0.qcow2"), "{nodes}");
    d0.scribble(&mut q, 3);

    // Then on to a qemu-nbd export (a raw file), as storage migration does.
    let raw = dir.join("t.raw");
    std::fs::File::create(&raw).unwrap().set_len(SIZE).unwrap();
    let sock = dir.join("nbd.sock");
    let mut nbd = std::process::Command::new("qemu-nbd")
        .args(["-f", "raw", "-x", "exp", "-t", "-k"])
        .arg(&sock)
        .arg(&raw)
        .spawn()
        .expect("qemu-nbd");
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    q.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "nbdt",
               "file": {"driver": "nbd", "server": {"type": "unix", "path": sock}, "export": "exp"}}),
    );
    q.ok(
        "blockdev-mirror",
        json!({"device": "d0", "job-id": "m1", "target": "nbdt", "sync": "full"}),
    );
    run_to_end(&mut q, &mut [&mut d0], "m1", 4);
    d0.scribble(&mut q, 5);
    quit(qt, q);
    let _ = nbd.kill();
    let _ = nbd.wait();
    check_equal(raw.to_str().unwrap(), "raw", &d0, &dir);
    // The first mirror's target holds the disk as it was at the second pivot.
    qemu_img(&["check", m.to_str().unwrap()]);
}

#[test]
fn full_and_incremental_backup_from_a_persistent_bitmap_across_a_restart() {
    let dir = support::scratch("jobs-backup");
    let b0 = create(&dir, "d0.qcow2");
    let (qt, mut q) = start(&dir, &[("d0", &b0)]);
    let mut d0 = Disk::new("d0");
    d0.scribble(&mut q, 1);
    let full = dir.join("full.qcow2");
    // The bitmap starts where the full backup's point in time is.
    q.ok(
        "transaction",
        json!({"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "d0", "name": "b0",
                "persistent": true}},
            {"type": "drive-backup", "data": {"device": "d0", "job-id": "full",
                "target": full, "sync": "full", "format": "qcow2", "speed": 8388608}},
        ]}),
    );
    let at_full = d0.model.clone();
    // Writes during the backup do not reach it (copy-before-write).
    d0.scribble(&mut q, 2);
    let e = q.event("BLOCK_JOB_COMPLETED");
    assert!(e["data"].get("error").is_none(), "{e}");
    d0.scribble(&mut q, 3);
    quit(qt, q);
    // The bitmap is in the image, stored at exit, and consistent.
    let info = qemu_img(&["info", "--output=json", &b0]);
    let v: Value = serde_json::from_str(&info).unwrap();
    let bm = &v["format-specific"]["data"]["bitmaps"][0];
    assert_eq!(bm["name"], "b0", "{info}");
    assert_eq!(bm["flags"], json!(["auto"]), "{info}");
    qemu_img(&["check", &b0]);

    // After the restart the bitmap holds what changed since the full
    // backup, and goes on recording.
    let (qt, mut q) = start(&dir, &[("d0", &b0)]);
    let v = q.ok("query-block", json!({}));
    let bm = &v[0]["inserted"]["dirty-bitmaps"][0];
    assert_eq!(bm["name"], "b0", "{v}");
    assert_eq!(bm["persistent"], true, "{v}");
    assert!(bm["count"].as_u64().unwrap() > 0, "{v}");
    d0.scribble(&mut q, 4);
    let inc = dir.join("inc.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        full.to_str().unwrap(),
        "-F",
        "qcow2",
        inc.to_str().unwrap(),
    ]);
    let at_inc = d0.model.clone();
    q.ok(
        "drive-backup",
        json!({"device": "d0", "job-id": "inc", "target": inc, "sync": "incremental",
               "bitmap": "b0", "mode": "existing", "format": "qcow2"}),
    );
    d0.scribble(&mut q, 5);
    let e = q.event("BLOCK_JOB_COMPLETED");
    assert!(e["data"].get("error").is_none(), "{e}");
    quit(qt, q);
    qemu_img(&["check", &b0]);
    let mut m = Disk::new("full");
    m.model = at_full;
    check_equal(full.to_str().unwrap(), "qcow2", &m, &dir);
    // Restoring: the full backup with the incremental one on top.
    let mut m = Disk::new("inc");
    m.model = at_inc;
    check_equal(inc.to_str().unwrap(), "qcow2", &m, &dir);
    check_equal(&b0, "qcow2", &d0, &dir);
}

#[test]
fn pause_resume_speed_cancel_and_a_target_error_that_stops() {
    let dir = support::scratch("jobs-verbs");
    let b0 = create(&dir, "d0.qcow2");
    let (qt, mut q) = start(&dir, &[("d0", &b0)]);
    let mut d0 = Disk::new("d0");
    // Data everywhere, so the mirror has 32 MiB to copy.
    for i in 0..32u64 {
        d0.write(&mut q, i as u8 + 1, i << 20, 1 << 20);
    }
    let t = dir.join("slow.qcow2");
    q.ok(
        "drive-mirror",
        json!({"device": "d0", "job-id": "slow", "target": t,
        "sync": "full", "speed": 1048576}),
    );
    q.ok("block-job-pause", json!({"device": "slow"}));
    std::thread::sleep(Duration::from_millis(300));
    let j = &q.ok("query-block-jobs", json!({}))[0];
    assert_eq!(j["paused"], true, "{j}");
    assert_eq!(j["status"], "paused", "{j}");
    let (class, _) = q.err("block-job-complete", json!({"device": "slow"}));
    assert_eq!(class, "GenericError");
    q.ok("block-job-resume", json!({"device": "slow"}));
    q.ok(
        "block-job-set-speed",
        json!({"device": "slow", "speed": 2097152}),
    );
    let j = &q.ok("query-block-jobs", json!({}))[0];
    assert_eq!(j["speed"], 2097152, "{j}");
    assert_eq!(j["paused"], false, "{j}");
    // A guest reset does not touch the job.
    q.ok("system_reset", json!({}));
    let j = &q.ok("query-block-jobs", json!({}))[0];
    assert_eq!(j["device"], "slow", "{j}");
    q.ok("block-job-cancel", json!({"device": "slow"}));
    let e = q.event("BLOCK_JOB_CANCELLED");
    assert_eq!(e["data"]["device"], "slow");
    // Then it concludes and, with auto-dismiss, goes.
    loop {
        let e = q.event("JOB_STATUS_CHANGE");
        if e["data"]["id"] == "slow" && e["data"]["status"] == "null" {
            break;
        }
    }
    let (class, _) = q.err("block-job-cancel", json!({"device": "slow"}));
    assert_eq!(class, "DeviceNotActive");

    // A target whose writes fail once: the job stops, and goes on when
    // resumed.
    let tf = dir.join("flaky.raw");
    std::fs::File::create(&tf).unwrap().set_len(SIZE).unwrap();
    q.ok(
        "blockdev-add",
        json!({"driver": "blkdebug", "node-name": "flaky",
               "inject-error": [{"event": "write_aio", "once": true}],
               "image": {"driver": "file", "filename": tf}}),
    );
    q.ok(
        "blockdev-mirror",
        json!({"device": "d0", "job-id": "err", "target": "flaky",
        "sync": "full", "on-target-error": "stop"}),
    );
    let e = q.event("BLOCK_JOB_ERROR");
    assert_eq!(e["data"]["action"], "stop", "{e}");
    assert_eq!(e["data"]["operation"], "write", "{e}");
    let j = &q.ok("query-block-jobs", json!({}))[0];
    assert_eq!(j["io-status"], "failed", "{j}");
    q.ok("block-job-resume", json!({"device": "err"}));
    q.event("BLOCK_JOB_READY");
    q.ok("block-job-complete", json!({"device": "err"}));
    q.event("BLOCK_JOB_COMPLETED");
    d0.scribble(&mut q, 9);
    quit(qt, q);
    check_equal(tf.to_str().unwrap(), "raw", &d0, &dir);
}

#[test]
fn nbd_server_add_exports_a_running_disk() {
    let dir = support::scratch("jobs-nbd");
    let b0 = create(&dir, "d0.qcow2");
    let (qt, mut q) = start(&dir, &[("d0", &b0)]);
    let mut d0 = Disk::new("d0");
    d0.scribble(&mut q, 1);
    let sock: PathBuf = dir.join("export.sock");
    q.ok(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    );
    q.ok("nbd-server-add", json!({"device": "d0"}));
    let (class, _) = q.err(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": sock}}}),
    );
    assert_eq!(class, "GenericError");
    let out = dir.join("pulled.raw");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &format!("nbd+unix:///d0?socket={}", sock.display()),
        out.to_str().unwrap(),
    ]);
    let pulled = d0.model.clone();
    let v = q.ok("query-block-exports", json!({}));
    assert_eq!(v[0]["id"], "d0", "{v}");
    q.ok("nbd-server-remove", json!({"name": "d0"}));
    // A dirty bitmap as a metadata context, as an incremental pull reads
    // it: QEMU's client reports dirty ranges as holes (x-dirty-bitmap).
    q.ok(
        "block-dirty-bitmap-add",
        json!({"node": "d0", "name": "b0"}),
    );
    d0.write(&mut q, 0x77, 0, 1 << 20);
    q.ok(
        "nbd-server-add",
        json!({"device": "d0", "name": "inc", "bitmap": "b0"}),
    );
    let map = qemu_img(&[
        "map", "--output=json", "--image-opts",
        &format!(
            "driver=nbd,server.type=unix,server.path={},export=inc,x-dirty-bitmap=qemu:dirty-bitmap:b0",
            sock.display()
        ),
    ]);
    let v: Value = serde_json::from_str(&map).unwrap();
    assert_eq!(v[0]["start"], 0, "{map}");
    assert_eq!(v[0]["length"], 1 << 20, "{map}");
    assert_eq!(v[0]["data"], false, "{map}");
    assert_eq!(v[1]["data"], true, "{map}");
    let (_, e) = q.err(
        "nbd-server-add",
        json!({"device": "d0", "name": "x", "bitmap": "nosuch"}),
    );
    assert!(e.contains("nosuch"), "{e}");
    q.ok("nbd-server-stop", json!({}));
    quit(qt, q);
    let mut m = Disk::new("pulled");
    m.model = pulled;
    check_equal(out.to_str().unwrap(), "raw", &m, &dir);
}

fn hmp(q: &mut Qmp, line: &str) -> String {
    q.ok("human-monitor-command", json!({"command-line": line}))
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn hmp_commit_drive_mirror_and_job_commands() {
    let dir = support::scratch("jobs-hmp");
    let base = create(&dir, "base.qcow2");
    let top = dir.join("top.qcow2");
    let top = top.to_str().unwrap();
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", top,
    ]);
    let (qt, mut q) = start(&dir, &[("d0", top)]);
    let mut d0 = Disk::new("d0");
    d0.scribble(&mut q, 1);
    assert_eq!(hmp(&mut q, "commit d0"), "");
    assert!(hmp(&mut q, "commit nosuch").starts_with("Error:"));
    assert_eq!(hmp(&mut q, "info block-jobs"), "No active jobs\n");
    d0.scribble(&mut q, 2);
    let m = dir.join("m.qcow2");
    let out = hmp(&mut q, &format!("drive_mirror -f d0 {} qcow2", m.display()));
    assert_eq!(out, "", "{out}");
    let jobs = hmp(&mut q, "info block-jobs");
    assert!(
        jobs.starts_with("Type mirror, device d0: Completed"),
        "{jobs}"
    );
    q.event("BLOCK_JOB_READY");
    d0.scribble(&mut q, 3);
    assert_eq!(hmp(&mut q, "block_job_complete d0"), "");
    q.event("BLOCK_JOB_COMPLETED");
    quit(qt, q);
    check_equal(m.to_str().unwrap(), "qcow2", &d0, &dir);
    // The commit put round 1 into the base; the top then read through.
    qemu_img(&["check", &base]);
    let map = qemu_img(&["map", "--output=json", top]);
    assert!(map.contains("\"depth\": 1"), "{map}");
}

#[test]
fn compressed_backup_is_a_point_in_time_copy() {
    let dir = support::scratch("jobs-compress");
    let b0 = create(&dir, "d0.qcow2");
    let (qt, mut q) = start(&dir, &[("d0", &b0)]);
    let mut d0 = Disk::new("d0");
    for i in 0..8u64 {
        d0.write(&mut q, 0x40 + i as u8, i * (3 << 20), 1 << 20);
    }
    let t = dir.join("c.qcow2");
    let at = d0.model.clone();
    q.ok(
        "drive-backup",
        json!({"device": "d0", "job-id": "c", "target": t, "sync": "full",
               "format": "qcow2", "compress": true, "speed": 4194304}),
    );
    d0.scribble(&mut q, 1);
    let e = q.event("BLOCK_JOB_COMPLETED");
    assert!(e["data"].get("error").is_none(), "{e}");
    let raw = dir.join("r.raw");
    std::fs::File::create(&raw).unwrap().set_len(SIZE).unwrap();
    q.ok(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "r",
        "file": {"driver": "file", "filename": raw}}),
    );
    let (_, e) = q.err(
        "blockdev-backup",
        json!({"device": "d0", "job-id": "x",
        "target": "r", "sync": "full", "compress": true}),
    );
    assert!(e.contains("Compression is not supported"), "{e}");
    quit(qt, q);
    let mut m = Disk::new("c");
    m.model = at;
    check_equal(t.to_str().unwrap(), "qcow2", &m, &dir);
    // Eight 1 MiB runs of one byte each compress to almost nothing.
    let info = qemu_img(&["info", "--output=json", t.to_str().unwrap()]);
    let v: Value = serde_json::from_str(&info).unwrap();
    assert!(v["actual-size"].as_u64().unwrap() < 2 << 20, "{info}");
}

#[test]
fn quit_during_a_job_cancels_it_and_stores_the_bitmaps() {
    let dir = support::scratch("jobs-quit");
    let b0 = create(&dir, "d0.qcow2");
    let (qt, mut q) = start(&dir, &[("d0", &b0)]);
    let mut d0 = Disk::new("d0");
    q.ok(
        "block-dirty-bitmap-add",
        json!({"node": "d0", "name": "b0", "persistent": true}),
    );
    for i in 0..8u64 {
        d0.write(&mut q, 0x10 + i as u8, i << 20, 1 << 20);
    }
    let t = dir.join("slow.qcow2");
    q.ok(
        "drive-backup",
        json!({"device": "d0", "job-id": "slow", "target": t, "sync": "full",
               "format": "qcow2", "speed": 1048576}),
    );
    quit(qt, q);
    qemu_img(&["check", &b0]);
    let info = qemu_img(&["info", "--output=json", &b0]);
    let v: Value = serde_json::from_str(&info).unwrap();
    let bm = &v["format-specific"]["data"]["bitmaps"][0];
    assert_eq!(bm["name"], "b0", "{info}");
    assert_eq!(
        bm["flags"],
        json!(["auto"]),
        "stored, not left in use: {info}"
    );
    check_equal(&b0, "qcow2", &d0, &dir);
}
