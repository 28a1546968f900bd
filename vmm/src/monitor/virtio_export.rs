//! `block-export-add type=vhost-user-blk` and `type=vduse-blk` (QAPI
//! `block-export.json`: `BlockExportOptionsVhostUserBlk`,
//! `BlockExportOptionsVduseBlk`): a node served as a virtio-blk device
//! through the same virtio-blk device the VMM gives its guests
//! (`devices::virtio::block::VirtioBlock`), behind another transport: a
//! vhost-user front end on a unix socket (`devices::virtio::vhost_user`),
//! or the host kernel's vDPA bus (`devices::virtio::vduse` over
//! `crate::vduse`). Each export has its own event loop thread, as a
//! `-device virtio-blk-pci,iothread=` has.
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
use devices::virtio::vduse::{VduseServer, ACCESS_PLATFORM};
use devices::virtio::vhost_user::VhostUserServer;
use devices::virtio::VirtioDevice;

/// Where a vhost-user export listens (QAPI `SocketAddress` of type `unix`
/// or `fd`).
pub enum Listen {
    /// A socket file the export makes.
    Path(PathBuf),
    /// A socket already listening, inherited from the process's parent.
    Listener(UnixListener),
}

/// How the device reaches its driver.
pub enum Transport {
    VhostUser(Listen),
    /// A VDUSE device named after the export's id.
    Vduse {
        queue_size: u16,
    },
}

impl Transport {
    fn kind(&self) -> &'static str {
        match self {
            Transport::VhostUser(_) => "vhost-user-blk",
            Transport::Vduse { .. } => "vduse-blk",
        }
    }
}

/// What `block-export-add` asked for.
pub struct BlkExport {
    pub id: String,
    pub node: Arc<Node>,
    pub transport: Transport,
    pub writable: bool,
    /// QEMU's `writethrough`: the device starts with its write cache off.
    pub writethrough: bool,
    pub num_queues: u16,
    pub logical_block_size: u32,
    pub serial: Option<String>,
}

enum Server {
    VhostUser(VhostUserServer),
    Vduse(VduseServer),
}

impl Server {
    fn stop(&mut self) {
        match self {
            Server::VhostUser(s) => s.stop(),
            Server::Vduse(s) => s.stop(),
        }
    }
}

struct Running {
    node: String,
    kind: &'static str,
    server: Server,
}

/// The virtio-blk exports, by id.
#[derive(Default)]
pub struct VirtioExports(Mutex<BTreeMap<String, Running>>);

impl VirtioExports {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Running>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn contains(&self, id: &str) -> bool {
        self.lock().contains_key(id)
    }

    pub fn add(&self, e: BlkExport) -> Result<(), String> {
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
        let queue_size = match e.transport {
            Transport::Vduse { queue_size } => queue_size,
            Transport::VhostUser(_) => BlockOptions::default().queue_size,
        };
        let opts = BlockOptions {
            num_queues: e.num_queues,
            queue_size,
            logical_block_size: e.logical_block_size,
            physical_block_size: e.logical_block_size,
            serial: e.serial.clone(),
            ..Default::default()
        };
        let kind = e.transport.kind();
        let lp = EventLoop::new(&format!("{kind} {}", e.id))?;
        let dev = VirtioBlock::new(blk, opts, lp)?;
        let server = match e.transport {
            Transport::VhostUser(Listen::Path(p)) => Server::VhostUser(
                VhostUserServer::bind(&p, Box::new(dev), &e.id)
                    .map_err(|err| format!("Failed to bind socket to {}: {err}", p.display()))?,
            ),
            Transport::VhostUser(Listen::Listener(l)) => Server::VhostUser(
                VhostUserServer::start(l, Box::new(dev), &e.id).map_err(|err| err.to_string())?,
            ),
            Transport::Vduse { queue_size } => {
                let mut config = vec![0u8; dev.config_len()];
                dev.read_config(0, &mut config);
                let kernel = crate::vduse::KernelDev::create(&crate::vduse::DeviceSpec {
                    name: &e.id,
                    device_id: dev.device_type() as u32,
                    features: dev.features()
                        | devices::virtio::features::VERSION_1
                        | ACCESS_PLATFORM,
                    queues: e.num_queues as u32,
                    queue_size,
                    config: &config,
                })?;
                Server::Vduse(
                    VduseServer::start(Box::new(dev), Arc::new(kernel), &e.id)
                        .map_err(|err| err.to_string())?,
                )
            }
        };
        map.insert(
            e.id,
            Running {
                node: node_name,
                kind,
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

    /// `query-block-exports`: (type, (id, node-name)).
    pub fn list(&self) -> Vec<(&'static str, (String, String))> {
        self.lock()
            .iter()
            .map(|(id, r)| (r.kind, (id.clone(), r.node.clone())))
            .collect()
    }
}
