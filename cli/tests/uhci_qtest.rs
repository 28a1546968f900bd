//! `-usb` (the PIIX3 UHCI at 01.2) with `usb-storage` through the qtest
//! protocol: the test is the UHCI driver. It resets a port, builds a
//! frame list whose every frame points at one queue head, queues TDs on
//! it and lets `clock_step` run the frames (the controller's frame clock
//! is a device timer on the qtest clock). Through those TDs it
//! enumerates the device and moves Bulk-Only Transport commands: a
//! READ(10) checked against the image and a WRITE(10) checked in the
//! file. Hotplug: `device_add usb-storage,port=2` connects a device the
//! port's status shows, `device_del` disconnects it.

mod support;

use serde_json::json;
use support::qtest::Qtest;

const IO: u16 = 0xc000;
const USBCMD: u16 = IO;
const USBSTS: u16 = IO + 2;
const FLBASEADD: u16 = IO + 8;
const PORTSC1: u16 = IO + 0x10;

const FRAME_LIST: u64 = 0x10_0000;
const QH: u64 = 0x10_1000;
const TDS: u64 = 0x10_2000;
const BUF: u64 = 0x11_0000;

const PID_SETUP: u8 = 0x2d;
const PID_IN: u8 = 0x69;
const PID_OUT: u8 = 0xe1;

const ACTIVE: u32 = 1 << 23;
const STALLED: u32 = 1 << 22;
const ERRORS: u32 = 0x7e << 16;

const PORT_CCS: u16 = 1 << 0;
const PORT_CSC: u16 = 1 << 1;
const PORT_PE: u16 = 1 << 2;
const PORT_PR: u16 = 1 << 9;

/// One transaction to queue: PID, endpoint, length, guest buffer.
struct Td {
    pid: u8,
    ep: u8,
    len: usize,
    buf: u64,
}

struct Uhci {
    qt: Qtest,
    addr: u8,
    /// Data toggles by endpoint and direction.
    toggles: [bool; 32],
}

impl Uhci {
    fn start(extra: &[&str]) -> Uhci {
        let mut args = vec!["-usb"];
        args.extend_from_slice(extra);
        let mut qt = Qtest::start(&args);
        assert_eq!(qt.pci_read32(1, 2, 0), 0x7020_8086, "PIIX3 UHCI at 01.2");
        assert_eq!(qt.pci_read32(1, 2, 8) >> 8, 0x0c_0300, "class: UHCI");
        qt.pci_write32(1, 2, 0x20, IO as u32 | 1);
        qt.pci_write32(1, 2, 0x04, 0x5);
        // Host controller reset, then the schedule: every frame the QH.
        qt.outw(USBCMD, 0x2);
        assert_eq!(qt.inw(USBCMD) & 0x2, 0, "HCRESET self-clears");
        let frames: Vec<u8> = (0..1024)
            .flat_map(|_| ((QH as u32) | 2).to_le_bytes())
            .collect();
        qt.memwrite(FRAME_LIST, &frames);
        qt.writel(QH, 1);
        qt.writel(QH + 4, 1);
        qt.outl(FLBASEADD, FRAME_LIST as u32);
        qt.outw(USBCMD, 0x81);
        assert_eq!(qt.inw(USBSTS) & 0x20, 0, "running");
        Uhci {
            qt,
            addr: 0,
            toggles: [false; 32],
        }
    }

    fn portsc(&mut self, port: u16) -> u16 {
        self.qt.inw(PORTSC1 + 2 * port)
    }

    fn reset_port(&mut self, port: u16) {
        let at = PORTSC1 + 2 * port;
        self.qt.outw(at, PORT_PR);
        self.qt.clock_step(50_000_000);
        self.qt.outw(at, 0);
        self.qt.outw(at, PORT_PE);
        assert_ne!(self.portsc(port) & PORT_PE, 0, "port {port} enabled");
    }

    /// Queues `tds` on the QH and runs frames until the last is done or
    /// one stops the queue; returns each TD's control/status word.
    fn run(&mut self, tds: &[Td]) -> Vec<u32> {
        for (i, t) in tds.iter().enumerate() {
            let at = TDS + 32 * i as u64;
            let link = if i + 1 == tds.len() {
                1
            } else {
                // Depth first to the next TD.
                (at + 32) as u32 | 4
            };
            let toggle = match t.pid {
                PID_SETUP => {
                    self.toggles[0] = true;
                    self.toggles[16] = true;
                    false
                }
                pid => {
                    let k = t.ep as usize + if pid == PID_IN { 16 } else { 0 };
                    let v = self.toggles[k];
                    self.toggles[k] = !v;
                    v
                }
            };
            let maxlen = (t.len as u32).wrapping_sub(1) & 0x7ff;
            let token = maxlen << 21
                | (toggle as u32) << 19
                | (t.ep as u32) << 15
                | (self.addr as u32) << 8
                | t.pid as u32;
            let ctrl = ACTIVE | 3 << 27;
            let mut b = Vec::new();
            for w in [link, ctrl, token, t.buf as u32] {
                b.extend_from_slice(&w.to_le_bytes());
            }
            self.qt.memwrite(at, &b);
        }
        self.qt.writel(QH + 4, TDS as u32);
        let start = std::time::Instant::now();
        loop {
            let st: Vec<u32> = (0..tds.len())
                .map(|i| self.qt.readl(TDS + 32 * i as u64 + 4))
                .collect();
            let done = st.last().is_some_and(|s| s & ACTIVE == 0)
                || st.iter().any(|s| s & ACTIVE == 0 && s & ERRORS != 0);
            if done {
                return st;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(20),
                "TDs still active: {st:x?}"
            );
            self.qt.clock_step(1_000_000);
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }

    /// A control transfer without a data stage.
    fn control_no_data(&mut self, setup: [u8; 8]) {
        self.qt.memwrite(BUF, &setup);
        let st = self.run(&[
            Td {
                pid: PID_SETUP,
                ep: 0,
                len: 8,
                buf: BUF,
            },
            Td {
                pid: PID_IN,
                ep: 0,
                len: 0,
                buf: 0,
            },
        ]);
        assert!(st.iter().all(|s| s & (ACTIVE | ERRORS) == 0), "{st:x?}");
    }

    fn enumerate(&mut self) {
        self.control_no_data([0, 5, 1, 0, 0, 0, 0, 0]); // SET_ADDRESS 1
        self.addr = 1;
        self.control_no_data([0, 9, 1, 0, 0, 0, 0, 0]); // SET_CONFIGURATION 1
    }

    /// One Bulk-Only command: CBW on EP 2 OUT, the data stage in 64-byte
    /// packets (IN on EP 1, or OUT of `out`), CSW on EP 1 IN. Returns the
    /// CSW status and the data read.
    fn bot(&mut self, cdb: &[u8], in_len: usize, out: Option<&[u8]>) -> (u8, Vec<u8>) {
        let len = out.map_or(in_len, |d| d.len());
        let mut cbw = vec![0u8; 31];
        cbw[0..4].copy_from_slice(&0x4342_5355u32.to_le_bytes());
        cbw[4..8].copy_from_slice(&0x1234u32.to_le_bytes());
        cbw[8..12].copy_from_slice(&(len as u32).to_le_bytes());
        cbw[12] = if out.is_some() { 0 } else { 0x80 };
        cbw[14] = cdb.len() as u8;
        cbw[15..15 + cdb.len()].copy_from_slice(cdb);
        self.qt.memwrite(BUF, &cbw);
        let data = BUF + 0x1000;
        if let Some(d) = out {
            self.qt.memwrite(data, d);
        }
        let mut tds = vec![Td {
            pid: PID_OUT,
            ep: 2,
            len: 31,
            buf: BUF,
        }];
        for off in (0..len).step_by(64) {
            tds.push(Td {
                pid: if out.is_some() { PID_OUT } else { PID_IN },
                ep: if out.is_some() { 2 } else { 1 },
                len: (len - off).min(64),
                buf: data + off as u64,
            });
        }
        let csw = BUF + 0x800;
        tds.push(Td {
            pid: PID_IN,
            ep: 1,
            len: 13,
            buf: csw,
        });
        let st = self.run(&tds);
        assert!(
            st.iter().all(|s| s & (ACTIVE | ERRORS | STALLED) == 0),
            "{st:x?}"
        );
        let csw = self.qt.memread(csw, 13);
        assert_eq!(&csw[0..4], &0x5342_5355u32.to_le_bytes(), "CSW signature");
        assert_eq!(&csw[4..8], &0x1234u32.to_le_bytes(), "CSW tag");
        (csw[12], self.qt.memread(data, in_len))
    }
}

fn image(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("stick.img");
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i / 512 + i % 251) as u8).collect();
    std::fs::write(&p, data).unwrap();
    p
}

#[test]
fn usb_storage_on_uhci_reads_and_writes_the_image() {
    let dir = support::scratch("uhci-bot");
    let img = image(&dir);
    let drive = format!("file={},format=raw,if=none,id=stick", img.display());
    let mut u = Uhci::start(&[
        "-drive",
        &drive,
        "-device",
        "usb-storage,drive=stick,port=1",
    ]);
    let ps = u.portsc(0);
    assert_eq!(ps & (PORT_CCS | PORT_CSC), PORT_CCS | PORT_CSC, "{ps:x}");
    assert_eq!(u.portsc(1) & PORT_CCS, 0, "port 2 is empty");
    u.reset_port(0);
    u.enumerate();
    // The power-on UNIT ATTENTION goes to the first command.
    let (status, _) = u.bot(&[0; 6], 0, None);
    assert_eq!(status, 1, "TEST UNIT READY: the power-on unit attention");
    assert_eq!(u.bot(&[0; 6], 0, None).0, 0, "then ready");
    let (status, data) = u.bot(&[0x28, 0, 0, 0, 0, 7, 0, 0, 2, 0], 1024, None);
    assert_eq!(status, 0);
    let want = std::fs::read(&img).unwrap();
    assert_eq!(data, &want[7 * 512..9 * 512], "READ(10) of LBA 7-8");
    let pattern: Vec<u8> = (0..512u32).map(|i| (i * 7) as u8).collect();
    let (status, _) = u.bot(&[0x2a, 0, 0, 0, 0, 3, 0, 0, 1, 0], 0, Some(&pattern));
    assert_eq!(status, 0);
    assert_eq!(u.bot(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, None).0, 0);
    let after = std::fs::read(&img).unwrap();
    assert_eq!(
        &after[3 * 512..4 * 512],
        &pattern[..],
        "WRITE(10) in the file"
    );
}

#[test]
fn usb_storage_hotplug_shows_on_the_port() {
    let dir = support::scratch("uhci-hotplug");
    let img = image(&dir);
    let sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", sock.display());
    let drive = format!("file={},format=raw,if=none,id=stick", img.display());
    let mut u = Uhci::start(&["-qmp", &qmp_arg, "-drive", &drive]);
    let mut q = support::qmp::Qmp::negotiated(&sock);
    assert_eq!(u.portsc(1) & PORT_CCS, 0);
    q.ok(
        "device_add",
        json!({"driver": "usb-storage", "id": "stick0", "drive": "stick", "port": "2"}),
    );
    let ps = u.portsc(1);
    assert_eq!(ps & (PORT_CCS | PORT_CSC), PORT_CCS | PORT_CSC, "{ps:x}");
    // The driver acknowledges the change, resets and uses the port.
    u.qt.outw(PORTSC1 + 2, PORT_CSC);
    u.reset_port(1);
    u.enumerate();
    assert_eq!(u.bot(&[0; 6], 0, None).0, 1, "unit attention");
    // A port in use is refused, naming it.
    let (_, desc) = q.err(
        "device_add",
        json!({"driver": "usb-storage", "id": "x", "drive": "stick", "port": "2"}),
    );
    assert!(desc.contains("in use"), "{desc}");
    q.ok("device_del", json!({"id": "stick0"}));
    let e = q.event("DEVICE_DELETED");
    assert_eq!(e["data"]["device"], "stick0", "{e}");
    let ps = u.portsc(1);
    assert_eq!(ps & (PORT_CCS | PORT_CSC | PORT_PE), PORT_CSC, "{ps:x}");
    // The port and the drive are free again.
    q.ok(
        "device_add",
        json!({"driver": "usb-storage", "id": "again", "drive": "stick", "port": "2"}),
    );
    assert_ne!(u.portsc(1) & PORT_CCS, 0);
}
