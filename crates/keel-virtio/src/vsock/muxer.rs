//! The host side of the vsock device: guest connections multiplexed over
//! Unix sockets with Firecracker's hybrid convention.
//!
//! - **Host-initiated**: a host program connects to the listening socket at
//!   `PATH` and writes `CONNECT <port>\n`. The muxer sends the guest a
//!   REQUEST for `<port>` from a fresh host port; when the guest answers
//!   RESPONSE it writes `OK <host port>\n` to the program and the stream
//!   carries the connection's bytes from then on. An RST (nobody listens in
//!   the guest) closes the program's socket.
//! - **Guest-initiated**: a REQUEST to host port `P` makes the muxer connect
//!   to the Unix socket `PATH_P`; RESPONSE if that works, RST if not.
//!
//! Every socket is non-blocking and in the event loop's epoll set only for
//! what the connection can take: readable while the connection may stage
//! more bytes for the guest (so a guest without credit or rx buffers stops
//! the reads), writable while guest bytes wait for a full socket (the guest
//! itself is held back by the credit the connection advertises).

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::GuestMemoryMmap;
use event_manager::{EventOps, EventSet, Events};
use vmm_sys_util::timerfd::TimerFd;

use super::conn::{check_guest_header, reset_for, Connection, Outcome, Reject, State};
use super::packet::{op, Header, HDR_SIZE};
use super::VsockOptions;
use crate::chain::RequestBuffers;

/// Longest `CONNECT <port>\n` line accepted from a host program.
pub const MAX_CONNECT_LINE: usize = 32;
/// Most packets queued for unknown connections (RSTs); more are dropped.
const MAX_PENDING_RESETS: usize = 256;
/// Most connections accepted from the listener per event.
const ACCEPTS_PER_EVENT: usize = 16;
/// First port handed to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

type Key = (u32, u32); // (host port, guest port)

struct Entry {
    conn: Connection,
    stream: UnixStream,
    /// What the stream is registered for (empty: not in the epoll set).
    watched: EventSet,
    /// Bytes for the host program ahead of the guest's (`OK <port>\n`).
    prefix: Vec<u8>,
    shut_write: bool,
    in_ready: bool,
    /// When the connection was created: a host-initiated one the guest has
    /// not answered by `connect_timeout` is reset.
    since: Instant,
}

impl Entry {
    /// A new connection on `stream`, watched for input, nothing queued.
    fn new(conn: Connection, stream: UnixStream) -> Self {
        Entry {
            conn,
            stream,
            watched: EventSet::IN,
            prefix: Vec::new(),
            shut_write: false,
            in_ready: false,
            since: Instant::now(),
        }
    }
}

struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    since: Instant,
}

/// The connection table and its sockets.
pub(crate) struct Muxer {
    guest_cid: u64,
    path: PathBuf,
    listener: UnixListener,
    /// Off while accept fails for lack of fds or memory, so a listener
    /// that stays readable does not spin the event loop; back on when a
    /// connection closes.
    listener_watched: bool,
    /// Ticks while handshakes or host-initiated connections are pending,
    /// to time them out.
    timer: TimerFd,
    timer_armed: bool,
    options: VsockOptions,
    conns: HashMap<Key, Entry>,
    by_fd: HashMap<RawFd, Key>,
    handshakes: HashMap<RawFd, Handshake>,
    resets: VecDeque<Header>,
    ready: VecDeque<Key>,
    next_local_port: u32,
    payload: Vec<u8>,
    read_buf: Vec<u8>,
}

impl Muxer {
    pub fn new(guest_cid: u64, path: &Path, options: VsockOptions) -> std::io::Result<Self> {
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        Ok(Self {
            guest_cid,
            path: path.to_path_buf(),
            listener,
            listener_watched: false,
            timer: nonblocking_timer()?,
            timer_armed: false,
            options,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            handshakes: HashMap::new(),
            resets: VecDeque::new(),
            ready: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            payload: Vec::new(),
            read_buf: vec![0; options.rx_buffer_bytes.clamp(1, 64 * 1024)],
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    pub fn init(&mut self, ops: &mut EventOps) {
        self.watch_listener(ops);
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            log::error!("virtio-vsock: cannot watch the connect timer: {e:?}");
        }
    }

    fn arm_timer(&mut self) {
        if self.timer_armed {
            return;
        }
        let half = self.options.connect_timeout.checked_div(2).unwrap_or_default();
        let tick = half.max(Duration::from_millis(10));
        match self.timer.reset(tick, Some(tick)) {
            Ok(()) => self.timer_armed = true,
            Err(e) => keel_ratelimit::warn_limited!("virtio-vsock: cannot arm the connect timer: {e}"),
        }
    }

    /// Times out handshakes and host-initiated connections the guest has
    /// not answered; stops the timer when none are left.
    fn on_timer(&mut self, ops: &mut EventOps) {
        // Non-blocking: EAGAIN if the expirations were already consumed.
        let _ = self.timer.wait();
        let timeout = self.options.connect_timeout;
        let stale: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.since.elapsed() >= timeout)
            .map(|(&fd, _)| fd)
            .collect();
        for fd in stale {
            log::debug!("virtio-vsock: no CONNECT line in time, closing");
            self.drop_handshake(fd, ops);
        }
        let unanswered: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, e)| e.conn.state() == State::Connecting && e.since.elapsed() >= timeout)
            .map(|(&key, _)| key)
            .collect();
        for key in unanswered {
            log::debug!(
                "virtio-vsock: the guest did not answer a connection to port {} in time",
                key.1
            );
            if let Some(entry) = self.conns.get_mut(&key) {
                entry.conn.host_error();
            }
            self.settle(key, ops);
        }
        let pending =
            !self.handshakes.is_empty() || self.conns.values().any(|e| e.conn.state() == State::Connecting);
        if !pending && self.timer_armed && self.timer.clear().is_ok() {
            self.timer_armed = false;
        }
    }

    fn watch_listener(&mut self, ops: &mut EventOps) {
        if self.listener_watched {
            return;
        }
        match ops.add(Events::new(&self.listener, EventSet::IN)) {
            Ok(()) => self.listener_watched = true,
            Err(e) => log::error!("virtio-vsock: cannot watch the listener: {e:?}"),
        }
    }

    pub fn is_listener(&self, fd: RawFd) -> bool {
        fd == self.listener.as_raw_fd()
    }

    /// Drops every connection (device reset): sockets leave the epoll set
    /// and close.
    pub fn clear(&mut self, ops: &mut EventOps) {
        for (_, mut entry) in self.conns.drain() {
            unwatch(ops, &mut entry);
        }
        for (_, h) in self.handshakes.drain() {
            let _ = ops.remove(Events::empty(&h.stream));
        }
        self.by_fd.clear();
        self.resets.clear();
        self.ready.clear();
        self.watch_listener(ops);
    }

    /// An event on one of our fds. `active`: whether the guest driver is
    /// there to connect to.
    pub fn handle_event(&mut self, fd: RawFd, set: EventSet, active: bool, ops: &mut EventOps) {
        if self.is_listener(fd) {
            self.accept(active, ops);
        } else if fd == self.timer.as_raw_fd() {
            self.on_timer(ops);
        } else if self.handshakes.contains_key(&fd) {
            self.read_handshake(fd, active, ops);
        } else if let Some(&key) = self.by_fd.get(&fd) {
            self.socket_event(key, set, ops);
        } else {
            keel_ratelimit::warn_limited!("virtio-vsock: event on unknown fd {fd}");
        }
    }

    fn accept(&mut self, active: bool, ops: &mut EventOps) {
        for _ in 0..ACCEPTS_PER_EVENT {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    ) =>
                {
                    keel_ratelimit::warn_limited!("virtio-vsock: accept failed, pausing the listener: {e}");
                    let _ = ops.remove(Events::empty(&self.listener));
                    self.listener_watched = false;
                    return;
                }
                Err(e) => {
                    keel_ratelimit::warn_limited!("virtio-vsock: accept failed: {e}");
                    continue;
                }
            };
            let full = self.conns.len().saturating_add(self.handshakes.len()) >= self.options.max_connections;
            if !active || full || stream.set_nonblocking(true).is_err() {
                continue; // dropped: the host program sees its socket close
            }
            if ops.add(Events::new(&stream, EventSet::IN)).is_ok() {
                self.handshakes.insert(
                    stream.as_raw_fd(),
                    Handshake {
                        stream,
                        line: Vec::with_capacity(MAX_CONNECT_LINE),
                        since: Instant::now(),
                    },
                );
                self.arm_timer();
            }
        }
    }

    fn read_handshake(&mut self, fd: RawFd, active: bool, ops: &mut EventOps) {
        let Some(h) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        // The line is never longer than MAX_CONNECT_LINE: a full one
        // without a newline ends the handshake below.
        let room = buf
            .get_mut(..MAX_CONNECT_LINE.saturating_sub(h.line.len()))
            .unwrap_or_default();
        match h.stream.read(room) {
            Ok(0) => return self.drop_handshake(fd, ops),
            Ok(n) => h.line.extend_from_slice(room.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => return,
            Err(_) => return self.drop_handshake(fd, ops),
        }
        // The line up to the first newline, and what follows it.
        let mut parts = h.line.splitn(2, |&b| b == b'\n');
        let line = parts.next().unwrap_or_default();
        let Some(leftover) = parts.next() else {
            if h.line.len() >= MAX_CONNECT_LINE {
                self.drop_handshake(fd, ops);
            }
            return;
        };
        let port = parse_connect(line);
        let leftover = leftover.to_vec();
        let Some(h) = self.handshakes.remove(&fd) else {
            return;
        };
        let (Some(peer_port), true) = (port, active && self.conns.len() < self.options.max_connections)
        else {
            let _ = ops.remove(Events::empty(&h.stream));
            return;
        };
        let Some(local_port) = self.allocate_local_port(peer_port) else {
            let _ = ops.remove(Events::empty(&h.stream));
            return;
        };
        let mut conn = Connection::host_initiated(
            self.guest_cid,
            local_port,
            peer_port,
            self.options.buf_alloc,
            self.options.rx_buffer_bytes,
        );
        conn.push_host_data(&leftover);
        let key = (local_port, peer_port);
        self.by_fd.insert(fd, key);
        self.conns.insert(key, Entry::new(conn, h.stream));
        self.settle(key, ops);
    }

    fn drop_handshake(&mut self, fd: RawFd, ops: &mut EventOps) {
        if let Some(h) = self.handshakes.remove(&fd) {
            let _ = ops.remove(Events::empty(&h.stream));
        }
        self.watch_listener(ops);
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=self.conns.len() {
            let port = self.next_local_port;
            self.next_local_port = self.next_local_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(port, peer_port)) {
                return Some(port);
            }
        }
        None
    }

    fn socket_event(&mut self, key: Key, set: EventSet, ops: &mut EventOps) {
        let Some(entry) = self.conns.get_mut(&key) else {
            return;
        };
        if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP)
            && entry.conn.wants_host_data()
        {
            let room = entry.conn.host_data_room().min(self.read_buf.len());
            // `room` is at most `read_buf.len()`, and above 0 while the
            // connection wants host data.
            let buf = self.read_buf.get_mut(..room).unwrap_or_default();
            match entry.stream.read(buf) {
                Ok(0) => entry.conn.host_eof(),
                Ok(n) => entry.conn.push_host_data(buf.get(..n).unwrap_or_default()),
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {}
                Err(_) => entry.conn.host_error(),
            }
        } else if set.intersects(EventSet::HANG_UP | EventSet::ERROR) && !entry.conn.wants_host_data() {
            // Not reading, and the socket is gone: nothing left to wait for.
            entry.conn.host_error();
        }
        self.settle(key, ops);
    }

    /// A packet from the guest's tx queue. Reads its payload from `chain`.
    pub fn handle_tx_chain(&mut self, mem: &GuestMemoryMmap, chain: &RequestBuffers, ops: &mut EventOps) {
        let mut reader = chain.reader(mem);
        let mut bytes = [0u8; HDR_SIZE];
        if reader.read_exact(&mut bytes).is_err() {
            log::debug!("virtio-vsock: tx chain shorter than a header, dropped");
            return;
        }
        let Some(hdr) = Header::decode(&bytes) else {
            return;
        };
        match check_guest_header(
            &hdr,
            self.guest_cid,
            reader.remaining(),
            self.options.max_packet_bytes,
        ) {
            Ok(()) => {}
            Err(Reject::Drop) => {
                log::debug!("virtio-vsock: dropped a packet not from the guest to the host: {hdr:?}");
                return;
            }
            Err(Reject::Reset) => {
                log::debug!("virtio-vsock: bad packet, resetting: {hdr:?}");
                self.queue_reset(&hdr);
                let key = (hdr.dst_port, hdr.src_port);
                if let Some(entry) = self.conns.get_mut(&key) {
                    entry.conn.host_error();
                    self.settle(key, ops);
                }
                return;
            }
        }
        let mut payload = std::mem::take(&mut self.payload);
        payload.clear();
        if hdr.op == op::RW {
            payload.resize(hdr.len as usize, 0);
            if reader.read_exact(&mut payload).is_err() {
                self.payload = payload;
                self.queue_reset(&hdr);
                return;
            }
        }
        self.on_guest_packet(&hdr, &payload, ops);
        self.payload = payload;
    }

    fn queue_reset(&mut self, hdr: &Header) {
        if self.resets.len() < MAX_PENDING_RESETS {
            self.resets.push_back(reset_for(hdr));
        }
    }

    fn on_guest_packet(&mut self, hdr: &Header, payload: &[u8], ops: &mut EventOps) {
        let key = (hdr.dst_port, hdr.src_port);
        let Some(entry) = self.conns.get_mut(&key) else {
            match hdr.op {
                op::RST => {}
                op::REQUEST => self.connect_for_guest(hdr, ops),
                _ => self.queue_reset(hdr),
            }
            return;
        };
        match entry.conn.on_guest_packet(hdr, payload) {
            Outcome::Established => {
                entry.prefix = format!("OK {}\n", entry.conn.local_port()).into_bytes();
            }
            Outcome::Reset => {
                self.remove(key, ops);
                return;
            }
            Outcome::Ok | Outcome::ProtocolError => {}
        }
        self.settle(key, ops);
    }

    fn connect_for_guest(&mut self, hdr: &Header, ops: &mut EventOps) {
        if self.conns.len() >= self.options.max_connections {
            log::debug!(
                "virtio-vsock: too many connections, refusing port {}",
                hdr.dst_port
            );
            return self.queue_reset(hdr);
        }
        let mut target = self.path.clone().into_os_string();
        target.push(format!("_{}", hdr.dst_port));
        let stream = match connect_nonblocking(Path::new(&target)) {
            Ok(stream) => stream,
            Err(e) => {
                log::debug!("virtio-vsock: cannot connect to {target:?}: {e}");
                return self.queue_reset(hdr);
            }
        };
        if ops.add(Events::new(&stream, EventSet::IN)).is_err() {
            return self.queue_reset(hdr);
        }
        let conn = Connection::guest_initiated(
            self.guest_cid,
            hdr,
            self.options.buf_alloc,
            self.options.rx_buffer_bytes,
        );
        let key = (hdr.dst_port, hdr.src_port);
        self.by_fd.insert(stream.as_raw_fd(), key);
        self.conns.insert(key, Entry::new(conn, stream));
        self.settle(key, ops);
    }

    /// After anything happened to a connection: write what can be written,
    /// watch the socket for what the connection can take, and queue it for
    /// the rx queue if it has a packet.
    fn settle(&mut self, key: Key, ops: &mut EventOps) {
        let Some(entry) = self.conns.get_mut(&key) else {
            return;
        };
        flush(entry);
        if entry.conn.state() == State::Closed {
            self.remove(key, ops);
            return;
        }
        let mut want = EventSet::empty();
        if entry.conn.wants_host_data() {
            want |= EventSet::IN;
        }
        if entry.conn.is_resetting() {
            // Nothing more goes through the socket; keeping it watched would
            // only report its hang-up again and again until the RST is out.
            entry.prefix.clear();
        } else if !entry.prefix.is_empty() || entry.conn.has_host_bytes() {
            want |= EventSet::OUT;
        }
        if want != entry.watched {
            let events = Events::new(&entry.stream, want);
            let result = if entry.watched.is_empty() {
                ops.add(events)
            } else if want.is_empty() {
                ops.remove(Events::empty(&entry.stream))
            } else {
                ops.modify(events)
            };
            match result {
                Ok(()) => entry.watched = want,
                Err(e) => {
                    keel_ratelimit::warn_limited!("virtio-vsock: cannot update a socket's events: {e:?}");
                    entry.conn.host_error();
                }
            }
        }
        if entry.conn.has_packet() && !entry.in_ready {
            entry.in_ready = true;
            self.ready.push_back(key);
        }
    }

    fn remove(&mut self, key: Key, ops: &mut EventOps) {
        if let Some(mut entry) = self.conns.remove(&key) {
            unwatch(ops, &mut entry);
            self.by_fd.remove(&entry.stream.as_raw_fd());
            let _ = entry.stream.shutdown(Shutdown::Both);
        }
        self.watch_listener(ops);
    }

    /// Whether a packet waits for the guest's rx queue.
    pub fn has_rx(&mut self) -> bool {
        if !self.resets.is_empty() {
            return true;
        }
        while let Some(&key) = self.ready.front() {
            match self.conns.get_mut(&key) {
                Some(entry) if entry.conn.has_packet() => return true,
                Some(entry) => entry.in_ready = false,
                None => {}
            }
            self.ready.pop_front();
        }
        false
    }

    /// Writes the next packet into an rx chain; returns the bytes written.
    /// A chain too small for a header is returned empty and the packet
    /// waits for the next.
    pub fn fill_rx(&mut self, mem: &GuestMemoryMmap, chain: &RequestBuffers, ops: &mut EventOps) -> u32 {
        let room = chain.writable_len();
        if room < HDR_SIZE as u64 || !self.has_rx() {
            return 0;
        }
        // `room` is at least HDR_SIZE (checked above).
        let max_payload = room
            .saturating_sub(HDR_SIZE as u64)
            .min(u64::from(self.options.max_packet_bytes)) as usize;
        let mut payload = std::mem::take(&mut self.payload);
        payload.clear();
        let hdr = if let Some(hdr) = self.resets.pop_front() {
            Some(hdr)
        } else if let Some(key) = self.ready.pop_front() {
            let hdr = self.conns.get_mut(&key).and_then(|entry| {
                entry.in_ready = false;
                entry.conn.next_packet(max_payload, &mut payload)
            });
            self.settle(key, ops);
            hdr
        } else {
            None
        };
        let mut written = 0;
        if let Some(hdr) = hdr {
            let mut writer = chain.writer(mem, room);
            let _ = writer.write(&hdr.encode()).and_then(|_| writer.write(&payload));
            written = writer.written() as u32;
        }
        self.payload = payload;
        written
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // The listening socket's path is ours: leave no stale socket behind.
        let _ = std::fs::remove_file(&self.path);
    }
}

fn unwatch(ops: &mut EventOps, entry: &mut Entry) {
    if !entry.watched.is_empty() {
        let _ = ops.remove(Events::empty(&entry.stream));
        entry.watched = EventSet::empty();
    }
}

/// Writes the prefix and the guest's bytes until the socket is full.
fn flush(entry: &mut Entry) {
    while !entry.prefix.is_empty() {
        match entry.stream.write(&entry.prefix) {
            Ok(n) => {
                entry.prefix.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(_) => return entry.conn.host_error(),
        }
    }
    while entry.conn.has_host_bytes() {
        match entry.stream.write(entry.conn.host_bytes()) {
            Ok(n) => entry.conn.host_bytes_written(n),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(_) => return entry.conn.host_error(),
        }
    }
    if entry.conn.wants_host_shutdown_write() && !entry.shut_write {
        entry.shut_write = true;
        let _ = entry.stream.shutdown(Shutdown::Write);
    }
}

/// A timerfd whose reads never block.
fn nonblocking_timer() -> std::io::Result<TimerFd> {
    let timer = TimerFd::new()?;
    let fd = timer.as_raw_fd();
    // SAFETY: fcntl(2) on an fd `timer` owns, reading its status flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above, setting O_NONBLOCK on that fd; no memory involved.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(timer)
}

/// Parses `CONNECT <port>` (the newline already stripped; a trailing `\r`
/// is tolerated).
pub(crate) fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let port = line.trim_end_matches('\r').strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

/// Connects a non-blocking Unix stream socket to `path`. A Unix connect
/// completes at once or fails (`EAGAIN` when the listener's backlog is
/// full): it never waits for the peer to accept.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::io::FromRawFd;

    // SAFETY: zeroed memory is a valid sockaddr_un (all integer fields).
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the returned fd is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nothing else owns; the stream closes it.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a valid, initialised sockaddr_un and `len` its size;
    // connect(2) only reads it.
    let ret = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines_parse_only_when_well_formed() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295\r"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"CONNECT "), None);
        assert_eq!(parse_connect(b"connect 52"), None);
        assert_eq!(parse_connect(b"CONNECT 5 2"), None);
        assert_eq!(parse_connect(&[0xff, 0xfe]), None);
    }
}
