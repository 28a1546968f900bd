//! The block layer: option grammar, node graph, protocols, cache modes and
//! `BlockBackend`. See `DESIGN.md` for the architecture.

pub mod keyval;
