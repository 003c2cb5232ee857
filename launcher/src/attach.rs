//! `podvisor ctl console`: this terminal on a VM's serial socket, as `virtctl console` does.
//! The socket is found in `vm.info` (serial mode Socket); Ctrl-] detaches.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

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
    });
    copy_until_detach(&mut std::io::stdin(), &stream);
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let _ = output.join();
    eprintln!("\r\npodvisor: detached\r");
    Ok(())
}

/// Copies `input` to the VM until its end or Ctrl-] (which is not sent).
fn copy_until_detach(input: &mut impl Read, mut to_vm: &UnixStream) {
    let mut buf = [0u8; 256];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let (chunk, detach) = match buf[..n].iter().position(|&b| b == DETACH) {
            Some(at) => (&buf[..at], true),
            None => (&buf[..n], false),
        };
        if to_vm.write_all(chunk).is_err() || detach {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_bracket_detaches_and_is_not_sent() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mut typed: &[u8] = b"echo hi\n\x1dnot sent";
        copy_until_detach(&mut typed, &ours);
        drop(ours);
        let mut got = Vec::new();
        theirs.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"echo hi\n");
    }
}
