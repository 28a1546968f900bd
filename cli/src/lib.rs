//! Command-line front ends: QEMU's option grammar for `strata`, and the
//! clap-based CLIs of the tools. Each binary's `main` stays short and calls
//! into here.

pub mod chardev_args;
pub mod daemon;
pub mod snapshot_param;
pub mod storage_daemon;
pub mod system_args;
