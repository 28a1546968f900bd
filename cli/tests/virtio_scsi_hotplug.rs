//! virtio-scsi hotplug through the qtest protocol and QMP: the test is the
//! guest driver (support::virtio) with VIRTIO_SCSI_F_HOTPLUG negotiated
//! and buffers on the event queue. `device_add scsi-hd` on the HBA's bus
//! posts TRANSPORT_RESET/RESCAN for the new unit's LUN, which then
//! answers; `device_del` takes it off at once with TRANSPORT_RESET/REMOVED
//! and DEVICE_DELETED, and its target answers BAD_TARGET again. An HBA
//! that cannot hotplug (the LSI) refuses.

mod support;

use serde_json::json;
use support::qtest::Qtest;
use support::virtio::*;

const VERSION_1: u64 = 1 << 32;
const HOTPLUG: u64 = 1 << 1;
/// Queue indexes: control, event, the first request queue.
const EVENTQ: usize = 1;
const REQQ: usize = 2;
const EVENT_BUFS: u64 = 0x60_0000;
const REQ: u64 = 0x70_0000;

fn image(dir: &std::path::Path, name: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, vec![0x5au8; 1 << 20]).unwrap();
    p.display().to_string()
}

/// One request on the request queue: LUN field, CDB, a data-in buffer of
/// `in_len` bytes; returns (response, status, data).
fn command(v: &mut VirtioPci, target: u8, cdb: &[u8], in_len: u32) -> (u8, u8, Vec<u8>) {
    let (req, resp, data) = (REQ, REQ + 0x100, REQ + 0x1000);
    let mut r = vec![0u8; 51];
    r[0] = 1;
    r[1] = target;
    r[2] = 0x40;
    r[19..19 + cdb.len()].copy_from_slice(cdb);
    v.qt.memwrite(req, &r);
    v.qt.memwrite(resp, &[0xff; 108]);
    let mut bufs = vec![(req, 51, false), (resp, 108, true)];
    if in_len > 0 {
        bufs.push((data, in_len, true));
    }
    let vq = &mut v.vqs[REQQ];
    let head = vq.add(&mut v.qt, &bufs, None);
    vq.kick(&mut v.qt, head, |qt, q| qt.writew(NOTIFY + 4 * q as u64, q));
    let (id, _) = v.vqs[REQQ].wait_used(&mut v.qt);
    assert_eq!(id, head as u32);
    let resp = v.qt.memread(resp, 12);
    let d = v.qt.memread(data, in_len as usize);
    (resp[11], resp[10], d)
}

/// Puts `n` 16-byte buffers on the event queue.
fn give_event_buffers(v: &mut VirtioPci, n: u64) {
    for i in 0..n {
        let at = EVENT_BUFS + 16 * i;
        v.qt.memwrite(at, &[0xee; 16]);
        let vq = &mut v.vqs[EVENTQ];
        let head = vq.add(&mut v.qt, &[(at, 16, true)], None);
        vq.kick(&mut v.qt, head, |qt, q| qt.writew(NOTIFY + 4 * q as u64, q));
    }
}

/// The next event: (event, lun field, reason).
fn next_event(v: &mut VirtioPci) -> (u32, [u8; 8], u32) {
    let (id, len) = v.vqs[EVENTQ].wait_used(&mut v.qt);
    assert_eq!(len, 16, "an event fills its buffer");
    let e = v.qt.memread(EVENT_BUFS + 16 * id as u64, 16);
    (
        u32::from_le_bytes(e[0..4].try_into().unwrap()),
        e[4..12].try_into().unwrap(),
        u32::from_le_bytes(e[12..16].try_into().unwrap()),
    )
}

#[test]
fn device_add_and_del_reach_the_driver_as_events() {
    let dir = support::scratch("vscsi-hotplug");
    let sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", sock.display());
    let d0 = format!("file={},format=raw,if=none,id=d0", image(&dir, "a.img"));
    let d1 = format!("file={},format=raw,if=none,id=d1", image(&dir, "b.img"));
    let qt = Qtest::start(&[
        "-qmp",
        &qmp_arg,
        "-drive",
        &d0,
        "-drive",
        &d1,
        "-device",
        "virtio-scsi-pci,id=hba,addr=4",
        "-device",
        "scsi-hd,drive=d0,bus=hba.0,scsi-id=0,lun=0",
    ]);
    let mut q = support::qmp::Qmp::negotiated(&sock);
    let mut v = VirtioPci::init(qt, VERSION_1 | HOTPLUG, 3);
    give_event_buffers(&mut v, 4);
    // Nothing happened yet: no event is used.
    assert_eq!(v.qt.readw(v.vqs[EVENTQ].used + 2), 0);

    let inquiry = [0x12, 0, 0, 0, 36, 0];
    assert_eq!(command(&mut v, 3, &inquiry, 36).0, 3, "BAD_TARGET before");

    q.ok(
        "device_add",
        json!({"driver": "scsi-hd", "id": "new", "drive": "d1", "bus": "hba.0",
               "scsi-id": 3, "lun": 0}),
    );
    let (ev, lun, reason) = next_event(&mut v);
    assert_eq!((ev, reason), (1, 0), "TRANSPORT_RESET, RESCAN");
    assert_eq!(lun[..4], [1, 3, 0x40, 0], "the new unit's LUN");
    let (resp, status, data) = command(&mut v, 3, &inquiry, 36);
    assert_eq!((resp, status), (0, 0));
    assert_eq!(&data[8..12], b"QEMU");

    q.ok("device_del", json!({"id": "new"}));
    let e = q.event("DEVICE_DELETED");
    assert_eq!(e["data"]["device"], "new", "{e}");
    let (ev, lun, reason) = next_event(&mut v);
    assert_eq!((ev, reason), (1, 2), "TRANSPORT_RESET, REMOVED");
    assert_eq!(lun[..4], [1, 3, 0x40, 0]);
    assert_eq!(command(&mut v, 3, &inquiry, 36).0, 3, "BAD_TARGET after");
    // The unit and its drive are free again.
    q.ok(
        "device_add",
        json!({"driver": "scsi-hd", "id": "again", "drive": "d1", "bus": "hba.0",
               "scsi-id": 3, "lun": 0}),
    );
    assert_eq!(next_event(&mut v).2, 0);
}

#[test]
fn the_lsi_does_not_hotplug() {
    let dir = support::scratch("lsi-hotplug");
    let sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", sock.display());
    let d1 = format!("file={},format=raw,if=none,id=d1", image(&dir, "b.img"));
    let _qt = Qtest::start(&[
        "-qmp",
        &qmp_arg,
        "-drive",
        &d1,
        "-device",
        "lsi53c895a,id=lsi",
    ]);
    let mut q = support::qmp::Qmp::negotiated(&sock);
    let (_, msg) = q.err(
        "device_add",
        json!({"driver": "scsi-hd", "drive": "d1", "bus": "lsi.0"}),
    );
    assert_eq!(msg, "Bus 'lsi.0' does not support hotplugging");
}
