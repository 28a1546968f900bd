//! Errors of the format layer. Each prints as one line that names the image
//! file and the problem; I/O errors keep their errno so the block layer can
//! apply `rerror`/`werror` policies.

use thiserror::Error;

/// A format error.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FormatError {
    /// The storage below failed.
    #[error("{context}: {msg}")]
    Io {
        /// errno (positive).
        errno: i32,
        /// What was being done, naming the file.
        context: String,
        /// strerror text.
        msg: String,
    },
    /// The image contents are inconsistent or hostile.
    #[error("{0}")]
    Corrupt(String),
    /// A valid image using something not implemented.
    #[error("{0}")]
    Unsupported(String),
    /// Bad options or arguments.
    #[error("{0}")]
    Invalid(String),
    /// Writing refused (read-only or corrupt image).
    #[error("{0}")]
    ReadOnly(String),
    /// No space left.
    #[error("{0}")]
    NoSpace(String),
}

impl FormatError {
    /// Wrap an `io::Error` with context.
    pub fn io(e: std::io::Error, context: impl Into<String>) -> Self {
        let errno = e.raw_os_error().unwrap_or(5);
        let s = e.to_string();
        let msg = match s.find(" (os error") {
            Some(i) => s[..i].to_string(),
            None => s,
        };
        FormatError::Io {
            errno,
            context: context.into(),
            msg,
        }
    }
    /// The errno that best describes the error.
    pub fn errno(&self) -> i32 {
        match self {
            FormatError::Io { errno, .. } => *errno,
            FormatError::Corrupt(_) => 5,      // EIO
            FormatError::Unsupported(_) => 95, // ENOTSUP
            FormatError::Invalid(_) => 22,     // EINVAL
            FormatError::ReadOnly(_) => 30,    // EROFS
            FormatError::NoSpace(_) => 28,     // ENOSPC
        }
    }
}

/// Result alias.
pub type FResult<T> = Result<T, FormatError>;

/// For the hostile-image harnesses: the value, or `None` for an error,
/// which must name the image `name` (a panic otherwise: the user would
/// not know which file is wrong).
pub fn named<T>(name: &str, r: FResult<T>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            assert!(e.to_string().contains(name), "error without file name: {e}");
            None
        }
    }
}
