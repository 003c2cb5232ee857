//! The crate's one error type: failures to serve the API or to reach it.

use std::io;
use std::path::PathBuf;

/// What went wrong starting the server or talking to it as a client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("API socket path {0} is too long for a Unix socket (at most 107 bytes)")]
    SocketPathTooLong(PathBuf),
    #[error("API socket {0} is in use by a running process (is another podvisor serving it?)")]
    SocketInUse(PathBuf),
    #[error("API socket path {0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot remove stale API socket {path}: {source}")]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("cannot listen on API socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot start the API server's runtime: {0}")]
    Runtime(io::Error),
    #[error("cannot reach podvisor at {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("API request {endpoint} to {path} failed: {message}")]
    Request {
        path: PathBuf,
        endpoint: String,
        message: String,
    },
}
