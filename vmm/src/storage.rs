//! The machine's storage, opened once per process and kept across guest
//! resets: the block graph built from `-blockdev` and `-drive`, and the
//! `BlockBackend`s devices attach to. The board turns each `-drive`'s
//! device half into a device (`crate::machine::Board::drive_device`).

use std::collections::BTreeMap;
use std::sync::Arc;

use block::backend::{BackendConfig, BlockBackend};
use block::drive::DriveSpec;
use block::graph::BlockGraph;

use crate::config::MachineConfig;
use crate::VmmError;

pub struct Storage {
    pub graph: Arc<BlockGraph>,
    /// Backends by drive id (a drive without medium has a backend with
    /// nothing inserted, which a CD-ROM's medium can go into).
    drives: BTreeMap<String, Arc<BlockBackend>>,
    /// The `-drive`s, in order, for the board to create their devices.
    specs: Vec<DriveSpec>,
    /// Backends made for devices that name a node (`drive=NODE`), so that
    /// the monitor can find them; weak, as the devices own them.
    anonymous: std::sync::Mutex<Vec<std::sync::Weak<BlockBackend>>>,
    /// Block jobs: they belong to the storage, so a guest reset leaves
    /// them running.
    pub jobs: Arc<block::jobs::Jobs>,
    /// The NBD server of `nbd-server-start`, with its exports.
    pub nbd: crate::monitor::nbd_export::NbdServerSlot,
    /// The vhost-user-blk exports of `block-export-add`.
    pub virtio_exports: crate::monitor::virtio_export::VirtioExports,
}

impl Drop for Storage {
    /// Jobs still running when the VMM exits are cancelled and waited for
    /// (as QEMU does at quit), the NBD server stops, and then every image
    /// is closed: bitmaps stored, metadata written back, flushed. That is
    /// done explicitly, not left to the nodes' `Drop`, because the process
    /// exits without joining the threads (a job's, a monitor's) that may
    /// still hold a node.
    fn drop(&mut self) {
        self.jobs.cancel_all(std::time::Duration::from_secs(30));
        let _ = self.nbd.stop();
        self.virtio_exports.stop_all();
        self.graph.close_all();
    }
}

impl Storage {
    pub fn open(cfg: &MachineConfig) -> Result<Storage, VmmError> {
        let graph = Arc::new(BlockGraph::new());
        // Persistent dirty bitmaps are tracked while the VM runs and
        // stored back at exit, as QEMU does.
        graph.set_load_bitmaps(true);
        // A migration destination opens its images inactive: the source
        // still writes them until it hands them over.
        if cfg.incoming.is_some() {
            graph.set_incoming(true);
        }
        for text in &cfg.blockdevs {
            graph
                .blockdev_add_str(text)
                .map_err(|e| VmmError::Config(format!("-blockdev {text}: {e}")))?;
        }
        let mut drives = BTreeMap::new();
        for d in &cfg.drives {
            let backend = d
                .open(&graph)
                .map_err(|e| VmmError::Config(format!("-drive {}: {e}", d.id)))?;
            drives.insert(d.id.clone(), backend);
        }
        for w in graph.take_warnings() {
            // The raw-probing warning carries its own "WARNING:" heading,
            // printed as QEMU prints it.
            if w.starts_with("WARNING: ") {
                eprintln!("{w}");
            } else {
                let w = w.strip_prefix("warning: ").unwrap_or(&w);
                eprintln!("strata: warning: {w}");
            }
        }
        Ok(Storage {
            graph,
            drives,
            specs: cfg.drives.clone(),
            anonymous: Default::default(),
            jobs: block::jobs::Jobs::new(),
            nbd: Default::default(),
            virtio_exports: Default::default(),
        })
    }

    /// The `-drive`s, in order.
    pub fn drives(&self) -> &[DriveSpec] {
        &self.specs
    }

    /// Routes every drive's I/O errors to the main loop: each one is a
    /// BLOCK_IO_ERROR event, and a `stop` policy pauses the guest.
    pub fn set_stop_handlers(&self, events: &crate::EventSender) {
        for b in self.drives.values() {
            let (ev, id) = (events.clone(), b.id().to_string());
            b.set_error_handler(move |op, action, e| {
                ev.send(crate::VmEvent::BlockError {
                    drive: id.clone(),
                    write: op != block::driver::IoOp::Read,
                    action,
                    error: e.to_string(),
                    nospace: e.errno() == libc::ENOSPC,
                    corrupt: matches!(e, block::error::BlockError::Corrupt(_)),
                })
            });
        }
    }

    /// Retries the requests a `stop` policy parked (the guest continues).
    pub fn resume(&self) {
        for b in self.drives.values() {
            if b.is_stopped() {
                b.resume();
            }
        }
    }

    /// The backend a device's `drive=` names: a `-drive` id, or a
    /// `-blockdev` node-name (which gets an anonymous backend, as in QEMU).
    /// A drive without medium is a backend with nothing inserted.
    pub fn backend(&self, name: &str) -> Result<Option<Arc<BlockBackend>>, String> {
        if let Some(b) = self.drives.get(name) {
            return Ok(Some(b.clone()));
        }
        match self.graph.get(name) {
            Some(node) => {
                let b = BlockBackend::new("", node, BackendConfig::default())
                    .map_err(|e| e.to_string())?;
                let mut anon = devices::bus::lock(&self.anonymous);
                anon.retain(|w| w.strong_count() > 0);
                anon.push(Arc::downgrade(&b));
                Ok(Some(b))
            }
            None => Err(format!("Property 'drive' can't find value '{name}'")),
        }
    }

    /// Every backend in use whose medium is `node`.
    pub fn backends_of(&self, node: &Arc<block::node::Node>) -> Vec<Arc<BlockBackend>> {
        let anon: Vec<_> = devices::bus::lock(&self.anonymous)
            .iter()
            .filter_map(|w| w.upgrade())
            .collect();
        self.drives
            .values()
            .cloned()
            .chain(anon)
            .filter(|b| b.root().is_some_and(|r| Arc::ptr_eq(&r, node)))
            .collect()
    }

    /// Every backend in use: the drives' and the anonymous ones.
    pub fn all_backends(&self) -> Vec<Arc<BlockBackend>> {
        let anon: Vec<_> = devices::bus::lock(&self.anonymous)
            .iter()
            .filter_map(|w| w.upgrade())
            .collect();
        self.drives.values().cloned().chain(anon).collect()
    }

    /// The backend a block job's `device` names: a `-drive` id, or the
    /// node-name of a device's root node.
    pub fn job_backend(&self, device: &str) -> Option<Arc<BlockBackend>> {
        if let Some(b) = self.drives.get(device) {
            return Some(b.clone());
        }
        let node = self.graph.get(device)?;
        self.backends_of(&node).into_iter().next()
    }

    /// The backend of the `-drive` `id`.
    pub fn drive(&self, id: &str) -> Option<Arc<BlockBackend>> {
        self.drives.get(id).cloned()
    }
}
