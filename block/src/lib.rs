//! The block layer: option grammar, node graph, protocols, cache modes and
//! `BlockBackend`. See `DESIGN.md` for the architecture.

pub mod keyval;
pub mod aio;
pub mod driver;
pub mod error;
pub mod file;
pub mod iov;
pub mod blkdebug;
pub mod graph;
pub mod node;
pub mod null;
pub mod raw;
pub mod backend;
