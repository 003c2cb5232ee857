//! `podvisor ctl console`: this terminal on a VM's serial socket, as `virtctl console` does.
//! The socket is found in `vm.info` (serial mode Socket); Ctrl-] detaches, and the VM's end
//! (its console closing) ends the attach too.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The byte Ctrl-] sends.
pub const DETACH: u8 = 0x1d;

/// Attaches stdin and stdout to the serial socket of the VM the API socket serves, until
/// Ctrl-] or the VM's end.
pub fn console(api_socket: &Path) -> Result<(), String> {
    let mut client = api::Client::connect(api_socket).map_err(|e| e.to_string())?;
    let reply = client
        .request("GET", "vm.info", None)
        .map_err(|e| e.to_string())?;
    if !reply.is_success() {
        return Err(format!(
            "vm.info: {} {}",
            reply.status,
            String::from_utf8_lossy(&reply.body).trim()
        ));
    }
    let info: serde_json::Value =
        serde_json::from_slice(&reply.body).map_err(|e| format!("vm.info is not JSON: {e}"))?;
    let serial = &info["config"]["serial"];
    let Some(path) = serial["socket"]
        .as_str()
        .filter(|_| serial["mode"] == "Socket")
    else {
        return Err(format!(
            "the VM's serial console is not on a socket (mode {}); see --serial socket=PATH",
            serial["mode"]
        ));
    };
    let stream = UnixStream::connect(path).map_err(|e| format!("cannot attach to {path}: {e}"))?;
    eprintln!("podvisor: attached to {path}; Ctrl-] detaches\r");
    let _raw = crate::terminal::RawMode::enable_on_stdin();
    let mut from_vm = stream.try_clone().map_err(|e| e.to_string())?;
    let vm_gone = Arc::new(AtomicBool::new(false));
    let gone = vm_gone.clone();
    let output = std::thread::spawn(move || {
        let mut stdout = std::io::stdout();
        let mut buf = [0u8; 4096];
        while let Ok(n) = from_vm.read(&mut buf) {
            if n == 0
                || stdout
                    .write_all(&buf[..n])
                    .and_then(|()| stdout.flush())
                    .is_err()
            {
                break;
            }
        }
        gone.store(true, Ordering::Release);
    });
    let stdin = std::io::stdin();
    let fd = stdin.as_raw_fd();
    // Typed keys until Ctrl-], or until the VM's end closes the console.
    let detached = copy_until_detach(&mut stdin.lock(), &stream, || {
        while !vm_gone.load(Ordering::Acquire) {
            if readable(fd, 100) {
                return true;
            }
        }
        false
    });
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let _ = output.join();
    if detached || !vm_gone.load(Ordering::Acquire) {
        eprintln!("\r\npodvisor: detached\r");
    } else {
        eprintln!("\r\npodvisor: the console closed (the VM ended)\r");
    }
    Ok(())
}

/// Whether `fd` has something to read (or is at its end) within `timeout_ms`.
fn readable(fd: i32, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes the one pollfd it is given, which outlives the call.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    n > 0
}

/// Copies `input` to the VM until its end or Ctrl-] (which is not sent), reading only while
/// `wait_input` says there is input (false: stop). True when Ctrl-] ended it.
fn copy_until_detach(
    input: &mut impl Read,
    mut to_vm: &UnixStream,
    mut wait_input: impl FnMut() -> bool,
) -> bool {
    let mut buf = [0u8; 256];
    while wait_input() {
        let n = match input.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        let (chunk, detach) = match buf[..n].iter().position(|&b| b == DETACH) {
            Some(at) => (&buf[..at], true),
            None => (&buf[..n], false),
        };
        if to_vm.write_all(chunk).is_err() {
            return false;
        }
        if detach {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_bracket_detaches_and_is_not_sent() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mut typed: &[u8] = b"echo hi\n\x1dnot sent";
        assert!(copy_until_detach(&mut typed, &ours, || true));
        drop(ours);
        let mut got = Vec::new();
        theirs.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"echo hi\n");
        // The VM's end (nothing more to wait for) is not a detach.
        let (ours, _theirs) = UnixStream::pair().unwrap();
        assert!(!copy_until_detach(&mut &b"ls\n"[..], &ours, || false));
    }
}
