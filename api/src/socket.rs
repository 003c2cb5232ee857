//! The listening Unix socket: created mode 0600, a stale file from a dead process replaced, a
//! live one left alone.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use crate::error::Error;

/// Pending connections the kernel queues before `accept`.
const BACKLOG: libc::c_int = 128;

/// The socket file we bound, identified so that only our own file is removed: at the
/// latest when this is dropped.
pub(crate) struct SocketFile {
    pub path: PathBuf,
    dev_ino: (u64, u64),
}

impl SocketFile {
    /// Removes the socket file if it is still the one we created.
    pub fn remove_file(&self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.dev_ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        self.remove_file();
    }
}

/// Binds `path`, mode 0600. An existing socket nobody answers on is stale and replaced; one
/// that accepts a connection belongs to a live process and is an error, as is a file that is
/// not a socket.
pub(crate) fn bind(path: &Path) -> Result<(UnixListener, SocketFile), Error> {
    let bytes = path.as_os_str().as_bytes();
    let mut addr = libc::sockaddr_un {
        sun_family: libc::AF_UNIX as libc::sa_family_t,
        sun_path: [0; 108],
    };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(Error::SocketPathTooLong(path.to_owned()));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    remove_if_stale(path)?;

    let bind_err = |source| Error::Bind {
        path: path.to_owned(),
        source,
    };
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(bind_err(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // On Linux the socket file takes its mode from the socket's inode (less the umask): set it
    // before bind(2), so the file is never reachable with wider permissions.
    // SAFETY: fchmod on a descriptor we own.
    if unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) } < 0 {
        return Err(bind_err(io::Error::last_os_error()));
    }
    // SAFETY: `addr` is a valid, NUL-terminated sockaddr_un and the length is its size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::AddrInUse {
            // Someone bound it between our check and our bind.
            return Err(Error::SocketInUse(path.to_owned()));
        }
        return Err(bind_err(err));
    }
    // Belt and braces for kernels that ignore the pre-bind mode.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(bind_err)?;
    // SAFETY: listen(2) on a bound socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) } < 0 {
        let err = io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(bind_err(err));
    }
    let meta = std::fs::symlink_metadata(path).map_err(bind_err)?;
    let file = SocketFile {
        path: path.to_owned(),
        dev_ino: (meta.dev(), meta.ino()),
    };
    Ok((UnixListener::from(fd), file))
}

fn remove_if_stale(path: &Path) -> Result<(), Error> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(Error::Bind {
                path: path.to_owned(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(Error::NotASocket(path.to_owned()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(Error::SocketInUse(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!("replacing stale API socket {}", path.display());
            std::fs::remove_file(path).map_err(|source| Error::RemoveStale {
                path: path.to_owned(),
                source,
            })
        }
        Err(source) => Err(Error::Bind {
            path: path.to_owned(),
            source,
        }),
    }
}
