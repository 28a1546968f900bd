//! Test helpers for the SCSI units: backends (null, a temporary raw file,
//! blkdebug error injection), CDB building and running a command through
//! the request runner to its outcome.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use block::backend::{BackendConfig, BlockBackend};
use block::graph::BlockGraph;

use super::lun::{Lun, Plan};
use super::request::{self, DataPath, Outcome, VecPath};
use super::sense::Sense;

/// A backend over `driver` options (`null-co`, `null-aio`, ...).
pub fn backend(opts: &str, cfg: BackendConfig) -> Arc<BlockBackend> {
    let g = BlockGraph::new();
    let node = g.blockdev_add_str(&format!("node-name=n0,{opts}")).unwrap();
    BlockBackend::new("scsi0", node, cfg).unwrap()
}

/// A null backend of `size` bytes that reads as zeroes.
pub fn null(size: u64) -> Arc<BlockBackend> {
    backend(
        &format!("driver=null-co,read-zeroes=on,size={size}"),
        BackendConfig::default(),
    )
}

/// A raw image file, removed on drop.
pub struct TempImage {
    pub path: PathBuf,
}

impl TempImage {
    pub fn new(size: u64) -> TempImage {
        static N: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "strata-scsi-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(size).unwrap();
        TempImage { path }
    }

    /// A backend on the file.
    pub fn backend(&self, cfg: BackendConfig) -> Arc<BlockBackend> {
        backend(
            &format!("driver=file,filename={}", self.path.display()),
            cfg,
        )
    }

    /// A backend on the file under blkdebug with `rules`
    /// (`,inject-error.0.event=...`).
    pub fn blkdebug(&self, rules: &str) -> Arc<BlockBackend> {
        backend(
            &format!(
                "driver=blkdebug,image.driver=file,image.filename={}{rules}",
                self.path.display()
            ),
            BackendConfig::default(),
        )
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A 16-byte CDB starting with `bytes`.
pub fn cdb(bytes: &[u8]) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[..bytes.len()].copy_from_slice(bytes);
    c
}

/// READ/WRITE/VERIFY/WRITE SAME(16)-style CDB: `op`, flags in byte 1, LBA,
/// length.
pub fn cdb16(op: u8, flags: u8, lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = op;
    c[1] = flags;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// READ/WRITE/VERIFY/SYNCHRONIZE CACHE(10)-style CDB.
pub fn cdb10(op: u8, flags: u8, lba: u32, blocks: u16) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = op;
    c[1] = flags;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

/// Runs `plan` for `lun` through the runner and waits for the outcome.
pub fn run_plan<P: DataPath>(lun: &Arc<dyn Lun>, plan: Plan, path: P) -> (Outcome, P) {
    let (tx, rx) = mpsc::channel();
    request::start(Some(lun.clone()), plan, path, move |o, p| {
        tx.send((o, p)).unwrap();
    });
    rx.recv().unwrap()
}

/// Executes `cdb` on `lun` and runs the plan with `path`.
pub fn exec<P: DataPath>(lun: &Arc<dyn Lun>, cdb: &[u8], path: P) -> (Outcome, P) {
    let plan = lun.execute(cdb);
    run_plan(lun, plan, path)
}

/// Runs a data-in command with a buffer of `len` bytes; returns the bytes
/// moved.
pub fn exec_in(lun: &Arc<dyn Lun>, cdb: &[u8], len: usize) -> (Outcome, Vec<u8>) {
    let (o, p) = exec(lun, cdb, VecPath::new(len));
    let mut v = p.buf;
    v.truncate(o.transferred as usize);
    (o, v)
}

/// The sense REQUEST SENSE reports now.
pub fn request_sense(lun: &Arc<dyn Lun>) -> Sense {
    match lun.execute(&cdb(&[0x03, 0, 0, 0, 18])) {
        Plan::DataIn(d) => Sense {
            key: d[2] & 0xf,
            asc: d[12],
            ascq: d[13],
        },
        p => panic!("REQUEST SENSE gave {p:?}"),
    }
}
