//! Replays the corpora of the devices fuzz targets (fuzz/corpus/scsi_cdb,
//! fuzz/corpus/virtio_chain, fuzz/corpus/ata_taskfile,
//! fuzz/corpus/ahci_command, fuzz/corpus/lsi, fuzz/corpus/usb_bot,
//! fuzz/corpus/usb_ccid, fuzz/corpus/usb_ehci, fuzz/corpus/usb_uas, fuzz/corpus/usb_uhci, fuzz/corpus/xhci_ring, fuzz/corpus/vhost_user,
//! fuzz/corpus/vduse) and
//! seeded random inputs through the same harnesses cargo fuzz runs (the
//! harnesses' only random-input test: nothing panics, hangs or leaks).

use std::path::PathBuf;

fn corpus(name: &str) {
    let run = devices::harness::by_name(name).unwrap();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(name);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus directory") {
        run(&std::fs::read(entry.unwrap().path()).unwrap());
        n += 1;
    }
    assert!(n > 0, "empty corpus in {}", dir.display());
    // xorshift64*: deterministic, so a failure reproduces.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    for _ in 0..500 {
        let len = (next() % 600) as usize;
        let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        run(&data);
    }
}

#[test]
fn scsi_cdb_corpus() {
    corpus("scsi_cdb");
}

#[test]
fn virtio_chain_corpus() {
    corpus("virtio_chain");
}

#[test]
fn ata_taskfile_corpus() {
    corpus("ata_taskfile");
}

#[test]
fn ahci_command_corpus() {
    corpus("ahci_command");
}

#[test]
fn lsi_corpus() {
    corpus("lsi");
}

#[test]
fn usb_bot_corpus() {
    corpus("usb_bot");
}

#[test]
fn usb_ccid_corpus() {
    corpus("usb_ccid");
}

#[test]
fn usb_uas_corpus() {
    corpus("usb_uas");
}

#[test]
fn xhci_ring_corpus() {
    corpus("xhci_ring");
}

#[test]
fn usb_ehci_corpus() {
    corpus("usb_ehci");
}

#[test]
fn usb_uhci_corpus() {
    corpus("usb_uhci");
}

#[test]
fn vduse_corpus() {
    corpus("vduse");
}

#[test]
fn vhost_user_corpus() {
    corpus("vhost_user");
}
