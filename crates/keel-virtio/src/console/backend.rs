//! Where a virtio console's output goes and its input comes from.

use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind, Read, Stdout, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The host side of a [`Console`](crate::Console).
///
/// Output is simple: the console calls [`write_output`](Self::write_output)
/// with what the guest transmitted. Input is an fd the console watches on
/// its event loop: when [`input_fd`](Self::input_fd) is readable it calls
/// [`read_input`](Self::read_input), but only while the guest has receive
/// buffers for what it reads (backpressure: otherwise the fd is left
/// unwatched and the input waits in the kernel).
///
/// The console re-reads `input_fd` after every call into the backend, so a
/// backend may change it — a socket backend switches from its listener to an
/// accepted client and back. An fd that `input_fd` returned must stay open
/// until the console calls [`input_ended`](Self::input_ended) or `input_fd`
/// returns something else after a `read_input`, because the console removes
/// it from its epoll set first.
pub trait ConsoleBackend: Send {
    /// Writes guest output, on the event-loop thread: a backend whose sink
    /// can stall indefinitely (a socket client that stopped reading) should
    /// drop output rather than block. Errors are logged and the output
    /// dropped.
    fn write_output(&mut self, data: &[u8]) -> io::Result<()>;

    /// The fd to watch for host input, if there is input now.
    fn input_fd(&self) -> Option<RawFd> {
        None
    }

    /// Reads input; called when `input_fd` is readable. `Ok(0)` means the
    /// input ended; `ErrorKind::WouldBlock` means nothing to read yet (maybe
    /// `input_fd` changed). Any other error ends the input as `Ok(0)` does.
    fn read_input(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let _ = buf;
        Ok(0)
    }

    /// The input behind `input_fd` ended and the console no longer watches
    /// it: close it, and offer another one through `input_fd` if there is
    /// one (a listener waiting for the next client).
    fn input_ended(&mut self) {}
}

/// A console on a writer and, optionally, a pollable reader: stdio, a file,
/// a pipe, a terminal.
///
/// Output is written with blocking `write_all`, which suits terminals and
/// files; a pipe nobody reads stalls the event loop, so prefer
/// [`UnixSocketBackend`] for output that goes to another program.
///
/// # Example
///
/// ```
/// use keel_virtio::{ConsoleBackend, StreamBackend};
///
/// let mut backend = StreamBackend::output_only(Vec::new());
/// backend.write_output(b"guest says hi\n").unwrap();
/// assert!(backend.input_fd().is_none());
/// ```
#[derive(Debug)]
pub struct StreamBackend<W, R> {
    output: W,
    input: Option<R>,
}

impl<W: Write + Send, R: Read + AsRawFd + Send> StreamBackend<W, R> {
    /// Output to `output`, input from `input`, which must be pollable with
    /// `epoll` (a terminal, pipe, socket or character device). It is only
    /// read when readable, so it need not be non-blocking.
    pub fn new(output: W, input: R) -> Self {
        Self {
            output,
            input: Some(input),
        }
    }

    /// The writer the output goes to.
    pub fn output(&self) -> &W {
        &self.output
    }
}

impl<W: Write + Send> StreamBackend<W, File> {
    /// Output only; the guest gets no input.
    pub fn output_only(output: W) -> Self {
        Self { output, input: None }
    }
}

impl StreamBackend<Stdout, File> {
    /// The VMM's standard output and standard input. Putting a terminal in
    /// raw mode is the caller's business. If stdin cannot be watched (a
    /// regular file, `/dev/null`), the guest simply gets no input.
    pub fn stdio() -> Result<Self> {
        // A duplicate of fd 0 read directly, not through std's buffered
        // Stdin, whose buffer would hide bytes from epoll.
        let stdin = io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map_err(Error::ConsoleStdin)?;
        Ok(Self::new(io::stdout(), File::from(stdin)))
    }
}

impl StreamBackend<File, File> {
    /// Output appended to the file at `path` (created if missing); no input.
    pub fn file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| Error::ConsoleFile {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self::output_only(file))
    }
}

impl<W: Write + Send, R: Read + AsRawFd + Send> ConsoleBackend for StreamBackend<W, R> {
    fn write_output(&mut self, data: &[u8]) -> io::Result<()> {
        self.output.write_all(data)?;
        self.output.flush()
    }

    fn input_fd(&self) -> Option<RawFd> {
        self.input.as_ref().map(AsRawFd::as_raw_fd)
    }

    fn read_input(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.input.as_mut() {
            Some(input) => input.read(buf),
            None => Ok(0),
        }
    }

    fn input_ended(&mut self) {
        self.input = None;
    }
}

/// A console on a Unix stream socket: listening for one client at a time,
/// or connected to a server.
///
/// A listening backend serves one client; further clients wait in the
/// listen backlog until it disconnects. Output while no client is connected
/// is dropped, as is output a client does not read fast enough (the socket
/// is non-blocking, so a stalled client never stalls the VM).
#[derive(Debug)]
pub struct UnixSocketBackend {
    path: PathBuf,
    listener: Option<UnixListener>,
    client: Option<UnixStream>,
}

impl UnixSocketBackend {
    /// Listens on `path`. A stale socket file there is replaced; any other
    /// file is an error.
    pub fn listen(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_owned();
        let socket_error = |source| Error::ConsoleSocket {
            path: path.clone(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if meta.file_type().is_socket() {
                std::fs::remove_file(&path).map_err(socket_error)?;
            }
        }
        let listener = UnixListener::bind(&path).map_err(socket_error)?;
        listener.set_nonblocking(true).map_err(socket_error)?;
        Ok(Self {
            path,
            listener: Some(listener),
            client: None,
        })
    }

    /// Connects to the server listening on `path`. When the server closes
    /// the connection, input ends and output is dropped.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_owned();
        let socket_error = |source| Error::ConsoleSocket {
            path: path.clone(),
            source,
        };
        let stream = UnixStream::connect(&path).map_err(socket_error)?;
        stream.set_nonblocking(true).map_err(socket_error)?;
        Ok(Self {
            path,
            listener: None,
            client: Some(stream),
        })
    }

    /// Whether a client (or the server) is connected.
    pub fn is_connected(&self) -> bool {
        self.client.is_some()
    }

    fn accept(&mut self) -> io::Result<usize> {
        let Some(listener) = self.listener.as_ref() else {
            return Ok(0);
        };
        let (stream, _) = listener.accept()?;
        stream.set_nonblocking(true)?;
        keel_ratelimit::info_limited!("virtio-console: client connected on {}", self.path.display());
        self.client = Some(stream);
        // Nothing read yet; the console now watches the client.
        Err(ErrorKind::WouldBlock.into())
    }
}

impl Drop for UnixSocketBackend {
    fn drop(&mut self) {
        if self.listener.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl ConsoleBackend for UnixSocketBackend {
    fn write_output(&mut self, mut data: &[u8]) -> io::Result<()> {
        if self.client.is_none() {
            // A client may have connected before the event loop watched the
            // listener (it only does once the device is active): take it
            // now rather than drop the guest's first output. The console
            // re-reads `input_fd` after transmitting.
            match self.accept() {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => {
                    keel_ratelimit::warn_limited!("virtio-console: accept on {}: {e}", self.path.display())
                }
            }
        }
        let Some(client) = self.client.as_ref() else {
            return Ok(());
        };
        while !data.is_empty() {
            // SAFETY: the pointer and length describe `data`, which send only
            // reads; the fd is owned by `client`, open for the call.
            // MSG_NOSIGNAL: a vanished client is an EPIPE error, not a
            // SIGPIPE that kills the VMM.
            let ret = unsafe {
                libc::send(
                    client.as_raw_fd(),
                    data.as_ptr().cast(),
                    data.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if ret < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    ErrorKind::Interrupted => continue,
                    ErrorKind::WouldBlock => {
                        log::debug!(
                            "virtio-console: client on {} is not reading; dropped {} bytes",
                            self.path.display(),
                            data.len()
                        );
                        return Ok(());
                    }
                    // The disconnect shows up on the input side too, where
                    // it is handled.
                    _ => return Err(e),
                }
            }
            // ret is non-negative and at most data.len(); were it more,
            // nothing is left to send.
            data = usize::try_from(ret)
                .ok()
                .and_then(|sent| data.get(sent..))
                .unwrap_or_default();
        }
        Ok(())
    }

    fn input_fd(&self) -> Option<RawFd> {
        match (&self.client, &self.listener) {
            (Some(client), _) => Some(client.as_raw_fd()),
            (None, Some(listener)) => Some(listener.as_raw_fd()),
            (None, None) => None,
        }
    }

    fn read_input(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.client.as_mut() {
            Some(client) => client.read(buf),
            None => self.accept(),
        }
    }

    fn input_ended(&mut self) {
        if self.client.take().is_some() {
            keel_ratelimit::info_limited!("virtio-console: client on {} disconnected", self.path.display());
        } else if self.listener.take().is_some() {
            keel_ratelimit::warn_limited!(
                "virtio-console: stopped accepting clients on {}",
                self.path.display()
            );
        }
    }
}
