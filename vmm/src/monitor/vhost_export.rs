//! `block-export-add type=vhost-user-blk` (QAPI `block-export.json`:
//! `BlockExportOptionsVhostUserBlk`): a node served as a virtio-blk device
//! to a vhost-user front end on a unix socket, through the same
//! virtio-blk device the VMM gives its guests
//! (`devices::virtio::block::VirtioBlock`) behind the vhost-user transport
//! (`devices::virtio::vhost_user`). Each export has its own event loop
//! thread, as a `-device virtio-blk-pci,iothread=` has.
//!
//! As with the NBD exports, the export's backend shares everything with
//! the node's other users (QEMU's `blk_exp_add` does the same): the
//! exported node stays usable by the VMM's own devices and block jobs.

use std::collections::BTreeMap;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use block::backend::{BackendConfig, BlockBackend};
use block::driver::Perms;
use block::node::Node;
use devices::virtio::block::{BlockOptions, VirtioBlock};
use devices::virtio::event_loop::EventLoop;
use devices::virtio::vhost_user::VhostUserServer;

/// What `block-export-add` asked for.
pub struct VhostUserBlkExport {
    pub id: String,
    pub node: Arc<Node>,
    pub addr: Listen,
    pub writable: bool,
    /// QEMU's `writethrough`: the device starts with its write cache off.
    pub writethrough: bool,
    pub num_queues: u16,
    pub logical_block_size: u32,
}

/// Where an export listens (QAPI `SocketAddress` of type `unix` or `fd`).
pub enum Listen {
    /// A socket file the export makes.
    Path(PathBuf),
    /// A socket already listening, inherited from the process's parent.
    Listener(UnixListener),
}

struct Running {
    node: String,
    server: VhostUserServer,
}

/// The vhost-user-blk exports, by id.
#[derive(Default)]
pub struct VhostUserExports(Mutex<BTreeMap<String, Running>>);

impl VhostUserExports {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Running>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn contains(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    pub fn add(&self, e: VhostUserBlkExport) -> Result<(), String> {
        let mut map = self.lock();
        if map.contains_key(&e.id) {
            return Err(format!("Block export id '{}' is already in use", e.id));
        }
        let cfg = BackendConfig {
            read_only: !e.writable,
            write_cache: !e.writethrough,
            shared: Perms::ALL,
            ..Default::default()
        };
        let node_name = e.node.name().to_string();
        let blk = BlockBackend::new("", e.node, cfg).map_err(|err| err.to_string())?;
        let opts = BlockOptions {
            num_queues: e.num_queues,
            logical_block_size: e.logical_block_size,
            physical_block_size: e.logical_block_size,
            ..Default::default()
        };
        let lp = EventLoop::new(&format!("vhost-user-blk {}", e.id))?;
        let dev = VirtioBlock::new(blk, opts, lp)?;
        let server = match e.addr {
            Listen::Path(p) => VhostUserServer::bind(&p, Box::new(dev), &e.id)
                .map_err(|err| format!("Failed to bind socket to {}: {err}", p.display()))?,
            Listen::Listener(l) => {
                VhostUserServer::start(l, Box::new(dev), &e.id).map_err(|err| err.to_string())?
            }
        };
        map.insert(
            e.id,
            Running {
                node: node_name,
                server,
            },
        );
        Ok(())
    }

    /// `block-export-del`: the connection ends once its requests in
    /// flight are answered. False: no such export.
    pub fn remove(&self, id: &str) -> bool {
        let r = self.lock().remove(id);
        match r {
            Some(mut r) => {
                r.server.stop();
                true
            }
            None => false,
        }
    }

    pub fn stop_all(&self) {
        let all = std::mem::take(&mut *self.lock());
        for (_, mut r) in all {
            r.server.stop();
        }
    }

    /// `query-block-exports`: (id, node-name).
    pub fn list(&self) -> Vec<(String, String)> {
        self.lock()
            .iter()
            .map(|(id, r)| (id.clone(), r.node.clone()))
            .collect()
    }
}
