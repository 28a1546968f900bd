//! Errors of the block layer (QEMU's convention: every failure carries an
//! errno, see `include/block/block-io.h`).
//!
//! Every error prints as one line that names the file, node or option
//! concerned. I/O errors keep their `errno` so that `BlockBackend` can apply
//! QEMU's `rerror`/`werror` policies (`enospc` stops only on `ENOSPC`).

use crate::keyval::KeyvalError;
use thiserror::Error;

/// An error from the block layer.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BlockError {
    /// A system call failed.
    #[error("{context}: {}", strerror(*.errno))]
    Io { errno: i32, context: String },
    /// An option did not parse.
    #[error("{0}")]
    Config(#[from] KeyvalError),
    /// Opening a node failed (message already names the file or node).
    #[error("{0}")]
    Open(String),
    /// The node or backend is read-only.
    #[error("{0}: the node is read-only")]
    ReadOnly(String),
    /// A request reaches past the end of the node.
    #[error("{node}: request at offset {offset} length {len} is beyond the end of the device ({size} bytes)")]
    OutOfRange {
        node: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    /// The operation is not supported by this node.
    #[error("{0}")]
    Unsupported(String),
    /// Another process holds a conflicting image lock.
    #[error("{0}")]
    Locked(String),
    /// A permission conflict inside the graph, or a refused write.
    #[error("{0}")]
    Permission(String),
    /// The backend has no medium inserted.
    #[error("{0}: no medium found")]
    NoMedium(String),
    /// The image's metadata is corrupt (it has been marked so, and writes
    /// are refused): QMP's BLOCK_IMAGE_CORRUPTED.
    #[error("{0}")]
    Corrupt(String),
    /// A request that makes no sense in the current state (a QMP argument
    /// or a graph change refused).
    #[error("{0}")]
    Invalid(String),
}

impl BlockError {
    /// The `errno` value that best describes the error (positive).
    pub fn errno(&self) -> i32 {
        match self {
            BlockError::Io { errno, .. } => *errno,
            BlockError::ReadOnly(_) => libc::EROFS,
            BlockError::OutOfRange { .. } => libc::EIO,
            BlockError::Unsupported(_) => libc::ENOTSUP,
            BlockError::Locked(_) => libc::EAGAIN,
            BlockError::Permission(_) => libc::EPERM,
            BlockError::NoMedium(_) => libc::ENOMEDIUM,
            BlockError::Corrupt(_) => libc::EIO,
            BlockError::Config(_) | BlockError::Open(_) | BlockError::Invalid(_) => libc::EINVAL,
        }
    }
    /// An I/O error from the current `errno`.
    pub fn last_os(context: impl Into<String>) -> Self {
        BlockError::Io {
            errno: std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
            context: context.into(),
        }
    }
    /// An I/O error with an explicit errno.
    pub fn io(errno: i32, context: impl Into<String>) -> Self {
        BlockError::Io {
            errno,
            context: context.into(),
        }
    }
}

/// `strerror` text for an errno, as `std::io::Error` prints it, without the
/// "(os error N)" suffix.
pub fn strerror(errno: i32) -> String {
    let s = std::io::Error::from_raw_os_error(errno).to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Result alias for the block layer.
pub type BlockResult<T> = Result<T, BlockError>;
