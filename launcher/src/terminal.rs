//! Raw mode for the console: keys go to the guest as typed, and the terminal comes back as it
//! was when podvisor ends.

use std::os::fd::AsRawFd;

/// Restores the saved terminal settings when dropped.
pub struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    /// Puts stdin in raw mode when it is a terminal; `None` when it is not.
    pub fn enable_on_stdin() -> Option<Self> {
        let fd = std::io::stdin().as_raw_fd();
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: an all-zero termios is a valid value for tcgetattr to overwrite.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is a terminal and `saved` is a valid termios to fill.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only modifies the termios it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so the host terminal renders the guest's newlines.
        raw.c_oflag = saved.c_oflag;
        // SAFETY: `fd` is a terminal and `raw` a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores settings read from the same terminal earlier.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}
