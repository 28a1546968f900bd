//! The block layer: option grammar, node graph, protocols, cache modes and
//! `BlockBackend`. See `DESIGN.md` for the architecture.

pub mod aio;
pub mod backend;
pub mod blkdebug;
pub mod drive;
pub mod driver;
pub mod error;
pub mod file;
pub mod graph;
pub mod iov;
pub mod keyval;
pub mod node;
pub mod null;
pub mod raw;
pub mod throttle;
