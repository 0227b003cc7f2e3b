//! The serial console on this process's terminal: raw input while the VM
//! runs (restored on every exit path), and an escape sequence to quit.

use std::io::{ErrorKind, Read};
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, OnceLock};

use keel_vmm::StopHandle;

/// Ctrl-A: the escape prefix. Ctrl-A x quits; Ctrl-A Ctrl-A sends Ctrl-A.
pub const ESCAPE: u8 = 0x01;
/// What follows [`ESCAPE`] to quit.
pub const QUIT: u8 = b'x';

/// Puts a terminal in raw input mode and restores it when dropped (and from
/// the panic hook).
pub struct RawMode {
    fd: RawFd,
}

static SAVED: Mutex<Option<(RawFd, libc::termios)>> = Mutex::new(None);

fn restore_saved() {
    if let Some((fd, termios)) = SAVED.lock().unwrap_or_else(|e| e.into_inner()).take() {
        // SAFETY: restoring attributes previously read from the same fd.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &termios) };
    }
}

impl RawMode {
    /// Raw mode on `fd` if it is a terminal; `None` otherwise.
    pub fn enable(fd: RawFd) -> Option<RawMode> {
        // SAFETY: `termios` is plain data, valid when zeroed.
        let mut termios: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: isatty only inspects the descriptor.
        let is_tty = unsafe { libc::isatty(fd) } == 1;
        // SAFETY: tcgetattr writes into the struct we own and pass.
        if !is_tty || unsafe { libc::tcgetattr(fd, &mut termios) } != 0 {
            return None;
        }
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some((fd, termios));
        let previous_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_saved();
            previous_hook(info);
        }));
        let mut raw = termios;
        // Input byte by byte, no echo, no signals from keys: everything goes
        // to the guest. Output processing stays on so "\n" still returns
        // the cursor.
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN);
        raw.c_iflag &= !(libc::IXON | libc::ICRNL | libc::BRKINT | libc::INPCK | libc::ISTRIP);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: setting attributes on a terminal fd we just read them from.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) };
        Some(RawMode { fd })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = self.fd;
        restore_saved();
    }
}

/// Standard input with the escape sequence filtered out.
pub struct EscapeFilter<R> {
    input: R,
    after_escape: bool,
    stop: Arc<OnceLock<StopHandle>>,
}

impl<R> EscapeFilter<R> {
    /// Filters `input`; the quit sequence calls the stop handle once it is
    /// set.
    pub fn new(input: R, stop: Arc<OnceLock<StopHandle>>) -> Self {
        EscapeFilter {
            input,
            after_escape: false,
            stop,
        }
    }

    /// Removes escape sequences from `buf[..n]` in place; returns the bytes
    /// left and whether quit was asked.
    fn filter(&mut self, buf: &mut [u8], n: usize) -> (usize, bool) {
        let mut out = 0;
        for i in 0..n {
            let b = buf[i];
            if self.after_escape {
                self.after_escape = false;
                match b {
                    QUIT => return (out, true),
                    ESCAPE => {
                        buf[out] = ESCAPE;
                        out += 1;
                    }
                    _ => {}
                }
            } else if b == ESCAPE {
                self.after_escape = true;
            } else {
                buf[out] = b;
                out += 1;
            }
        }
        (out, false)
    }
}

impl<R: Read> Read for EscapeFilter<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.input.read(buf)?;
        if n == 0 {
            return Ok(0);
        }
        let (kept, quit) = self.filter(buf, n);
        if quit {
            eprint!("\r\nkeel: quit (Ctrl-A x)\r\n");
            if let Some(stop) = self.stop.get() {
                stop.stop();
            }
        }
        if kept == 0 {
            // Everything was escape bytes; not an end of file.
            return Err(ErrorKind::WouldBlock.into());
        }
        Ok(kept)
    }
}

impl<R: AsRawFd> AsRawFd for EscapeFilter<R> {
    fn as_raw_fd(&self) -> RawFd {
        self.input.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(input: &[u8]) -> (Vec<u8>, bool) {
        let mut f = EscapeFilter::new(std::io::empty(), Arc::new(OnceLock::new()));
        let mut buf = input.to_vec();
        let (n, quit) = f.filter(&mut buf, input.len());
        (buf[..n].to_vec(), quit)
    }

    #[test]
    fn plain_bytes_pass_through() {
        assert_eq!(filter(b"ls -l\r"), (b"ls -l\r".to_vec(), false));
    }

    #[test]
    fn ctrl_a_x_quits_and_drops_what_follows() {
        assert_eq!(filter(b"ab\x01xcd"), (b"ab".to_vec(), true));
    }

    #[test]
    fn ctrl_a_twice_sends_one_ctrl_a() {
        assert_eq!(filter(b"\x01\x01z"), (b"\x01z".to_vec(), false));
    }

    #[test]
    fn escape_split_across_reads_still_quits() {
        let mut f = EscapeFilter::new(std::io::empty(), Arc::new(OnceLock::new()));
        let mut a = *b"q\x01";
        assert_eq!(f.filter(&mut a, 2), (1, false));
        let mut b = *b"x";
        assert_eq!(f.filter(&mut b, 1), (0, true));
    }

    #[test]
    fn a_read_of_only_the_prefix_is_not_end_of_file() {
        let mut f = EscapeFilter::new(&b"\x01"[..], Arc::new(OnceLock::new()));
        let mut buf = [0u8; 8];
        assert_eq!(f.read(&mut buf).unwrap_err().kind(), ErrorKind::WouldBlock);
    }
}

/// Standard input read straight from fd 0. `std::io::Stdin` buffers, and
/// bytes left in its buffer would never wake the event loop again.
#[derive(Debug, Default)]
pub struct StdinFd;

impl Read for StdinFd {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        // SAFETY: reads at most buf.len() bytes into buf from fd 0.
        let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl AsRawFd for StdinFd {
    fn as_raw_fd(&self) -> RawFd {
        libc::STDIN_FILENO
    }
}

/// Whether fd 0 is something epoll can watch (a terminal, pipe or socket),
/// rather than a regular file or `/dev/null`.
pub fn stdin_is_pollable() -> bool {
    // SAFETY: `stat` is plain data, valid when zeroed.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into the struct we own and pass.
    if unsafe { libc::fstat(libc::STDIN_FILENO, &mut st) } != 0 {
        return false;
    }
    let kind = st.st_mode & libc::S_IFMT;
    // SAFETY: isatty only inspects the fd.
    kind == libc::S_IFIFO || kind == libc::S_IFSOCK || unsafe { libc::isatty(libc::STDIN_FILENO) } == 1
}
