//! KVM tests of the virtio-vsock device through the full VMM, driven by the
//! built-in guest's `virtio-vsock` program: the host side of every
//! connection is a thread here on Unix sockets in a temporary directory
//! (Firecracker's hybrid convention: `CONNECT <port>` on the device's
//! socket, and a listener on `<uds>_<port>` for the guest's connections).
//!
//! Data checks run on both sides: the guest checks every byte it receives
//! against the pattern (and fails otherwise); the threads here check every
//! byte the guest sends, and that each connection ends in EOF (or a reset)
//! after the guest's SHUTDOWN or RST.

#[macro_use]
mod common;
use common::Serial;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use keel_vmm::{ExitReason, VirtioTransport, VmBuilder, VmConfig, VsockConfig};

const GUEST_PORT: u32 = 1234;
const HOST_PORT: u32 = 1235;
/// A port the guest does not listen on.
const UNUSED_PORT: u32 = 999;
const GUEST_CID: u64 = 3;
/// Seeds of the guest program's four data streams.
const SEED_HOST_TO_GUEST: u32 = 1;
const SEED_GUEST_REPLY: u32 = 2;
const SEED_GUEST_TO_HOST: u32 = 3;
const SEED_HOST_REPLY: u32 = 4;

/// Byte `offset` of data stream `seed`, as the guest computes it
/// (`guest/programs/virtio_vsock.rs`).
fn pattern(seed: u32, offset: u64) -> u8 {
    let x = (offset as u32)
        .wrapping_mul(0x9e37_79b1)
        .wrapping_add(seed.wrapping_mul(0x0100_0193))
        ^ (offset >> 32) as u32;
    (x >> 24) as u8 ^ (offset >> 12) as u8
}

fn pattern_bytes(seed: u32, from: u64, out: &mut [u8]) {
    for (k, byte) in out.iter_mut().enumerate() {
        *byte = pattern(seed, from + k as u64);
    }
}

/// A private temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("keel-vsock-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What one host-side connection saw.
#[derive(Debug, Default)]
struct HostConn {
    /// Bytes sent to the guest.
    sent: u64,
    /// Bytes received from the guest, all matching the pattern.
    received: u64,
    /// First received byte that did not match, if any.
    bad_at: Option<u64>,
    /// The connection ended in EOF or a reset after the data.
    closed: bool,
    /// Time from the first byte sent to the whole transfer to the guest
    /// being acknowledged (the first byte of the answer arriving), and the
    /// time the answer took, first byte to last.
    to_guest: Duration,
    from_guest: Duration,
    error: Option<String>,
    /// Host-initiated, first connection only: whether a `CONNECT` to a
    /// port the guest does not listen on was refused.
    refused: Option<bool>,
}

/// Writes `len` bytes of stream `seed`.
fn write_pattern(stream: &mut UnixStream, seed: u32, len: u64) -> std::io::Result<()> {
    let mut chunk = vec![0u8; 64 * 1024];
    let mut sent = 0u64;
    while sent < len {
        let n = (len - sent).min(chunk.len() as u64) as usize;
        pattern_bytes(seed, sent, &mut chunk[..n]);
        stream.write_all(&chunk[..n])?;
        sent += n as u64;
    }
    Ok(())
}

/// Reads `len` bytes of stream `seed` into `conn`; returns when the first
/// byte arrived.
fn read_pattern(
    stream: &mut UnixStream,
    seed: u32,
    len: u64,
    conn: &mut HostConn,
) -> std::io::Result<Instant> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut first = None;
    while conn.received < len {
        let want = (len - conn.received).min(buf.len() as u64) as usize;
        let n = stream.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::Error::new(
                ErrorKind::UnexpectedEof,
                format!("EOF after {} of {len} bytes", conn.received),
            ));
        }
        first.get_or_insert_with(Instant::now);
        for (k, &byte) in buf[..n].iter().enumerate() {
            let at = conn.received + k as u64;
            if conn.bad_at.is_none() && byte != pattern(seed, at) {
                conn.bad_at = Some(at);
            }
        }
        conn.received += n as u64;
    }
    Ok(first.unwrap_or_else(Instant::now))
}

/// Waits for EOF (or a reset): the guest ended the connection.
fn wait_closed(stream: &mut UnixStream) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => return false, // more data than the guest should send
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return e.kind() == ErrorKind::ConnectionReset,
        }
    }
}

/// Host-initiated: connects to the device's socket until the guest
/// accepts `CONNECT <port>`, sends `bytes` and checks the guest's answer,
/// then closes (the guest sees SHUTDOWN and answers RST).
fn host_client(uds: PathBuf, bytes: u64, deadline: Instant, probe: bool) -> HostConn {
    let mut conn = HostConn::default();
    let mut stream = loop {
        if Instant::now() > deadline {
            conn.error = Some("the guest never accepted CONNECT".into());
            return conn;
        }
        if let Some(stream) = try_connect(&uds, deadline) {
            break stream;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    stream
        .set_read_timeout(Some(deadline.saturating_duration_since(Instant::now())))
        .unwrap();
    if probe {
        // The guest is up and listening: a port it does not listen on is
        // refused (its RST closes the socket without an `OK` line).
        conn.refused = Some(refused(&uds));
    }
    let start = Instant::now();
    if let Err(e) = write_pattern(&mut stream, SEED_HOST_TO_GUEST, bytes) {
        conn.error = Some(format!("sending: {e}"));
        return conn;
    }
    conn.sent = bytes;
    match read_pattern(&mut stream, SEED_GUEST_REPLY, bytes, &mut conn) {
        Ok(first) => {
            conn.to_guest = first - start;
            conn.from_guest = first.elapsed();
        }
        Err(e) => conn.error = Some(format!("receiving: {e}")),
    }
    conn.closed = true; // we close: the guest's side is checked by the guest
    conn
}

/// `CONNECT <UNUSED_PORT>`: the socket must close without an `OK` line.
fn refused(uds: &Path) -> bool {
    let Ok(mut stream) = UnixStream::connect(uds) else {
        return false;
    };
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    if stream
        .write_all(format!("CONNECT {UNUSED_PORT}\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer) {
        Ok(_) => answer.is_empty(),
        Err(e) => e.kind() == ErrorKind::ConnectionReset && answer.is_empty(),
    }
}

/// One `CONNECT <GUEST_PORT>` attempt: the stream once `OK <port>` came.
/// The device drops the socket while the guest driver is not up yet.
fn try_connect(uds: &Path, deadline: Instant) -> Option<UnixStream> {
    let mut stream = UnixStream::connect(uds).ok()?;
    // Until the test's deadline: a guest slowed down by a loaded machine
    // may take long to answer, and giving up on a connection it then
    // accepts would cost it one of its connections. A socket the device
    // drops (driver not up yet) ends the read at once anyway.
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    stream.set_read_timeout(Some(left)).unwrap();
    stream
        .write_all(format!("CONNECT {GUEST_PORT}\n").as_bytes())
        .ok()?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        match stream.read(&mut byte) {
            Ok(1) => line.push(byte[0]),
            _ => return None,
        }
        if line.len() > 32 {
            return None;
        }
    }
    let line = String::from_utf8_lossy(&line);
    let port: u32 = line.strip_prefix("OK ")?.trim_end().parse().ok()?;
    assert!(port >= 1 << 30, "host port {port} from {line:?}");
    Some(stream)
}

/// Guest-initiated: accepts `conns` connections on `<uds>_<HOST_PORT>`,
/// each in its own thread: receives `bytes`, answers with as many, then
/// waits for the guest's SHUTDOWN or RST to close the socket.
fn host_server(listener: UnixListener, conns: usize, bytes: u64, deadline: Instant) -> Vec<HostConn> {
    listener.set_nonblocking(true).unwrap();
    let mut handlers: Vec<JoinHandle<HostConn>> = Vec::new();
    while handlers.len() < conns && Instant::now() < deadline {
        match listener.accept() {
            Ok((mut stream, _)) => handlers.push(std::thread::spawn(move || {
                let mut conn = HostConn::default();
                stream.set_nonblocking(false).unwrap();
                stream
                    .set_read_timeout(Some(deadline.saturating_duration_since(Instant::now())))
                    .unwrap();
                match read_pattern(&mut stream, SEED_GUEST_TO_HOST, bytes, &mut conn) {
                    Ok(first) => conn.from_guest = first.elapsed(),
                    Err(e) => {
                        conn.error = Some(format!("receiving: {e}"));
                        return conn;
                    }
                }
                let sending = Instant::now();
                if let Err(e) = write_pattern(&mut stream, SEED_HOST_REPLY, bytes) {
                    conn.error = Some(format!("sending: {e}"));
                    return conn;
                }
                conn.sent = bytes;
                conn.closed = wait_closed(&mut stream);
                // Until the guest, having checked every byte, closed.
                conn.to_guest = sending.elapsed();
                conn
            })),
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => panic!("accept on the host port's socket: {e}"),
        }
    }
    handlers.into_iter().map(|h| h.join().unwrap()).collect()
}

/// What a run gave.
struct Run {
    exit: ExitReason,
    serial: String,
    host_initiated: Vec<HostConn>,
    guest_initiated: Vec<HostConn>,
}

/// Boots `virtio-vsock conns=K bytes=B` with the host side in threads.
fn run(transport: VirtioTransport, conns: usize, bytes: u64, watchdog: Duration) -> Run {
    let dir = TempDir::new();
    let uds = dir.0.join("v.sock");
    let config = {
        let mut config = VmConfig::default();
        config.memory_mib = 32;
        config.vsock = Some({
            let mut vsock = VsockConfig::new(GUEST_CID, uds.clone());
            vsock.transport = Some(transport);
            vsock
        });
        config
    };
    let listener = UnixListener::bind(format!("{}_{HOST_PORT}", uds.display())).unwrap();
    let serial = Serial::default();
    let timeout_ms = watchdog.as_millis() / 2;
    let cmdline = format!(
        "virtio-vsock port={GUEST_PORT} host-port={HOST_PORT} conns={conns} bytes={bytes} timeout-ms={timeout_ms}"
    );
    let vm = VmBuilder::new(config)
        .unwrap()
        .cmdline(&cmdline)
        .serial_output(serial.clone())
        .build()
        .unwrap();
    let deadline = Instant::now() + watchdog;
    let clients: Vec<_> = (0..conns)
        .map(|i| {
            let uds = uds.clone();
            std::thread::spawn(move || host_client(uds, bytes, deadline, i == 0))
        })
        .collect();
    let server = std::thread::spawn(move || host_server(listener, conns, bytes, deadline));
    let handle = vm.start().unwrap();
    let result = match handle.wait_timeout(watchdog) {
        Ok(result) => result,
        Err(handle) => {
            handle.stop_handle().stop();
            panic!("guest `{cmdline}` hung; serial:\n{}", serial.text());
        }
    };
    let text = serial.text();
    let exit = match result {
        Ok(exit) => exit,
        Err(e) => panic!("the VMM failed running `{cmdline}`: {e}\nserial:\n{text}"),
    };
    Run {
        exit,
        serial: text,
        host_initiated: clients.into_iter().map(|c| c.join().unwrap()).collect(),
        guest_initiated: server.join().unwrap(),
    }
}

impl Run {
    fn assert_passed(&self, conns: usize, bytes: u64) {
        let serial = &self.serial;
        assert_eq!(self.exit, ExitReason::GuestExit(0), "serial:\n{serial}");
        assert!(
            serial.contains("keel-guest: virtio-vsock: PASS (status 0)"),
            "serial:\n{serial}"
        );
        assert!(!serial.contains("FAIL"), "serial:\n{serial}");
        assert!(
            serial.contains(&format!(": guest CID {GUEST_CID}\n")),
            "serial:\n{serial}"
        );
        for (side, list) in [
            ("host-initiated", &self.host_initiated),
            ("guest-initiated", &self.guest_initiated),
        ] {
            assert_eq!(list.len(), conns, "{side}: {list:?}\nserial:\n{serial}");
            for conn in list {
                assert!(conn.error.is_none(), "{side}: {conn:?}\nserial:\n{serial}");
                assert_eq!(conn.bad_at, None, "{side}: data differs from the pattern");
                assert_eq!((conn.sent, conn.received), (bytes, bytes), "{side}: {conn:?}");
                assert!(
                    conn.closed,
                    "{side}: no EOF after the guest's SHUTDOWN/RST: {conn:?}"
                );
            }
        }
        assert!(
            serial.contains(&format!("virtio-vsock: host-initiated: {conns} connection(s) ok")),
            "serial:\n{serial}"
        );
        assert!(
            serial.contains(&format!(
                "virtio-vsock: guest-initiated: {conns} connection(s) ok"
            )),
            "serial:\n{serial}"
        );
        assert!(serial.contains("virtio-vsock: reset: port "), "serial:\n{serial}");
        assert_eq!(self.host_initiated[0].refused, Some(true), "serial:\n{serial}");
        assert!(
            serial.contains(&format!(
                "virtio-vsock: refused a connection to port {UNUSED_PORT} "
            )),
            "serial:\n{serial}"
        );
        if conns > 1 {
            assert!(serial.contains("sent SHUTDOWN, got RST"), "serial:\n{serial}");
        }
    }
}

over_both_transports!(
    vsock_host_and_guest_initiated_connections_carry_data_and_close,
    vsock_throughput_figures,
    vsock_program_without_the_device_fails_cleanly,
);

fn vsock_host_and_guest_initiated_connections_carry_data_and_close(transport: VirtioTransport) {
    let (conns, bytes) = (3, 200_000);
    let run = run(transport, conns, bytes, Duration::from_secs(30));
    run.assert_passed(conns, bytes);
    // Every host-initiated connection ended with the host's SHUTDOWN and
    // the guest's RST.
    assert_eq!(
        run.serial.matches("host shut down, RST sent").count(),
        conns,
        "serial:\n{}",
        run.serial
    );
    // 200 000 bytes through a 32 KiB window: credit updates went out.
    let stats = run
        .serial
        .lines()
        .find(|l| l.starts_with("virtio-vsock: packets: "))
        .unwrap_or_else(|| panic!("no packet counts; serial:\n{}", run.serial));
    assert!(!stats.contains("credit updates sent 0,"), "{stats}");
    println!("{stats}");
}

fn rate(bytes: u64, time: Duration) -> String {
    let per_s = bytes as f64 / time.as_secs_f64().max(1e-9);
    format!("{:.1} MiB/s ({:.0} bytes/s)", per_s / (1 << 20) as f64, per_s)
}

fn vsock_throughput_figures(transport: VirtioTransport) {
    let bytes = 8 << 20;
    let run = run(transport, 1, bytes, Duration::from_secs(60));
    run.assert_passed(1, bytes);
    let host = &run.host_initiated[0];
    let guest = &run.guest_initiated[0];
    println!(
        "vsock over {transport}, host-initiated, {bytes} bytes each way: host -> guest {}, guest -> host {}",
        rate(bytes, host.to_guest),
        rate(bytes, host.from_guest)
    );
    println!(
        "vsock over {transport}, guest-initiated, {bytes} bytes each way: guest -> host {}, host -> guest {}",
        rate(bytes, guest.from_guest),
        rate(bytes, guest.to_guest)
    );
}

fn vsock_program_without_the_device_fails_cleanly(transport: VirtioTransport) {
    let config = {
        let mut config = VmConfig::default();
        config.memory_mib = 32;
        config.transport = transport;
        config
    };
    let serial = Serial::default();
    let vm = VmBuilder::new(config)
        .unwrap()
        .cmdline("virtio-vsock")
        .serial_output(serial.clone())
        .build()
        .unwrap();
    let exit = match vm.start().unwrap().wait_timeout(Duration::from_secs(20)) {
        Ok(result) => result.unwrap(),
        Err(handle) => {
            handle.stop_handle().stop();
            panic!("guest hung; serial:\n{}", serial.text());
        }
    };
    let text = serial.text();
    assert_eq!(exit, ExitReason::GuestExit(1), "{text}");
    assert!(text.contains("FAIL: no virtio-vsock device"), "{text}");
    assert!(
        text.contains("keel-guest: virtio-vsock: FAIL (status 1)"),
        "{text}"
    );
}
