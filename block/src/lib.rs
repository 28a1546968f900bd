//! The block layer: option grammar, node graph, protocols, cache modes and
//! `BlockBackend`. See `DESIGN.md` for the architecture; vocabulary and
//! behaviour follow QEMU's block layer (`-drive`, `-blockdev`, `qemu-img`).
//!
//! Map of the crate:
//! * [`keyval`]: QEMU's `key=value` grammar (used by every option), sizes,
//!   booleans, the JSON form.
//! * [`graph`]: [`graph::BlockGraph`] opens nodes from `-blockdev` options
//!   (driver registry, node-names, children, backing, probing).
//! * [`format`]: the driver class ([`format::DriverClass`]: probe, open,
//!   create with typed options, measure), the registry's built-in
//!   classes, and what `strata-img` reads from formats (info, check).
//! * [`mapped`]: asynchronous I/O for formats that map guest ranges to
//!   host extents ([`mapped::MappingFormat`], [`mapped::MappedIo`]).
//! * [`node`]: a node with its generic options and the permission model.
//! * [`driver`]: the [`driver::BlockDriver`] trait and request types.
//! * Drivers: [`mod@file`] (`file`, `host_device`, locking, O_DIRECT, engines),
//!   [`nbd`] (client driver, server state machine, wire format),
//!   [`null`], [`raw`], [`qcow2`], [`blkdebug`]. Engines: [`aio`] (pool, io_uring,
//!   Linux AIO).
//! * [`backend`]: [`backend::BlockBackend`], what devices attach to
//!   (its module doc describes the device-facing API), and
//!   [`backend::CompletionQueue`].
//! * [`drive`]: `-drive` / `-hda` / `-cdrom` desugaring.
//! * [`throttle`]: `throttling.*` leaky buckets.
//! * [`objects`]: `-object secret` and `tls-creds-x509`, found by id.
//!
//! ```
//! use block::backend::{BackendConfig, BlockBackend, CompletionQueue};
//! use block::driver::IoRequest;
//! use block::graph::BlockGraph;
//! use block::iov::IoVecs;
//!
//! let graph = BlockGraph::new();
//! let node = graph
//!     .blockdev_add_str(r#"{"driver":"null-co","node-name":"n0","read-zeroes":true}"#)
//!     .unwrap();
//! let blk = BlockBackend::new("d0", node, BackendConfig::default()).unwrap();
//! // Blocking calls.
//! blk.write_at(0, &[1u8; 512]).unwrap();
//! let mut buf = [0xffu8; 512];
//! blk.read_at(0, &mut buf).unwrap();
//! assert_eq!(buf, [0u8; 512]); // null-co with read-zeroes
//! // Asynchronous calls with a completion queue (poll `q.eventfd()`).
//! let q = CompletionQueue::new().unwrap();
//! blk.submit(IoRequest::read(4096, IoVecs::from_vec(vec![0; 4096])), q.completion(7));
//! let done = q.wait();
//! assert_eq!(done[0].0, 7);
//! assert!(done[0].2.is_ok());
//! ```

pub mod aio;
pub mod backend;
pub mod bitmap;
pub mod blkdebug;
pub mod curl;
pub mod drive;
pub mod driver;
pub mod error;
pub mod file;
pub mod filename;
pub mod filters;
pub mod format;
pub mod graph;
pub mod harness;
pub mod iov;
pub mod iscsi;
pub mod jobs;
pub mod keyval;
pub mod luks;
pub mod mapped;
pub mod nbd;
pub mod neturi;
pub mod nfs;
pub mod node;
pub mod null;
pub mod objects;
pub mod parallels;
pub mod qcow;
pub mod qcow2;
pub mod qed;
pub mod raw;
#[cfg(have_rbd)]
pub mod rbd;
pub mod rbd_name;
pub mod readonly;
pub mod sectors;
pub mod serialise;
pub mod snapshot_overlay;
pub mod ssh;
pub mod throttle;
pub mod vdi;
pub mod vhdx;
pub mod vmdk;
pub mod vpc;
pub mod vvfat;
