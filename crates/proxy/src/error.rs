//! What can fail while a proxy is set up or served, as opposed to one request (whose errors are
//! `request::error::ApiError`, answered to the client in the provider's shape).

use std::io;
use std::path::PathBuf;

/// Why the proxy could not start, load its files, or keep serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A metric could not be registered (its name is already taken in the registry).
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A file could not be read.
    #[error("reading {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A manifest that does not parse or does not validate.
    #[error("{}: {message}", path.display())]
    Manifest {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A socket, thread or runtime the server needs failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        source: io::Error,
    },
    /// A serving task ended before shutdown was asked for.
    #[error("{0}")]
    Stopped(String),
}

impl Error {
    /// An I/O error with what was being done.
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}
