//! `virtio-vsock`: a stream-socket driver (virtio 1.2, section 5.10) with
//! per-connection credit accounting, checked against a host test on the
//! VMM's Unix sockets: connections the host opens to a listening guest
//! port, connections the guest opens to a host port, then a graceful
//! shutdown and a reset.
//!
//! Data is a known byte pattern ([`pattern`]) per direction: host to guest
//! on host-initiated connections uses seed 1, the guest's answer seed 2;
//! on guest-initiated connections the guest sends seed 3 and the host
//! answers with seed 4. Every received byte is checked against it.

use super::{arg, virtio_devices, Context, Failure, Outcome};
use crate::dma::{self, Buffer};
use crate::virtio::queue::{Chain, Virtqueue};
use crate::virtio::{init_device, submit_and_wait, Transport};
use crate::{println, tsc};

/// The program's arguments.
pub const KEYS: &[&str] = &["port", "host-port", "conns", "bytes", "timeout-ms"];

/// virtio device ID of a socket device.
const DEVICE_ID_VSOCK: u32 = 19;
const HDR: usize = 44;
const HOST_CID: u64 = 2;
const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const SHUTDOWN_BOTH: u32 = 3;

const RXQ: u16 = 0;
const TXQ: u16 = 1;
const EVENTQ: u16 = 2;
const QUEUE_SIZE: u16 = 64;
const RX_BUFFERS: usize = 32;
/// Payload room of one receive buffer (after the header).
const RX_PAYLOAD: usize = 8192;
/// Largest payload the guest sends in one packet.
const TX_PAYLOAD: usize = 16384;
/// The receive buffer the guest advertises per connection. Data is
/// consumed as it arrives, so this only bounds what the host may send
/// ahead of the guest's credit updates.
const BUF_ALLOC: u32 = 32 * 1024;
const MAX_CONNS: usize = 32;
/// Most connections per phase.
const MAX_PER_PHASE: u64 = 8;
/// First guest port of guest-initiated connections.
const FIRST_GUEST_PORT: u32 = 50_000;

/// Seeds of the four data streams.
const SEED_HOST_TO_GUEST: u32 = 1;
const SEED_GUEST_REPLY: u32 = 2;
const SEED_GUEST_TO_HOST: u32 = 3;
const SEED_HOST_REPLY: u32 = 4;

/// Byte `offset` of data stream `seed` (the host test computes the same).
pub fn pattern(seed: u32, offset: u64) -> u8 {
    let x = (offset as u32)
        .wrapping_mul(0x9e37_79b1)
        .wrapping_add(seed.wrapping_mul(0x0100_0193))
        ^ (offset >> 32) as u32;
    (x >> 24) as u8 ^ (offset >> 12) as u8
}

#[derive(Clone, Copy, Default)]
struct Header {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Header {
    fn decode(b: &[u8; HDR]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap_or_default());
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    fn encode(&self) -> [u8; HDR] {
        let mut b = [0u8; HDR];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Free,
    /// REQUEST sent, waiting for the RESPONSE.
    Connecting,
    Established,
    /// SHUTDOWN sent, waiting for the host's RST.
    Closing,
    Closed,
}

/// One connection and what went through it.
#[derive(Clone, Copy)]
struct Conn {
    state: State,
    host_initiated: bool,
    local_port: u32,
    peer_port: u32,
    // The host's receive buffer as it last described it, and what we sent.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
    // Our receive side.
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    credit_update_due: bool,
    credit_requested: bool,
    rx_seed: u32,
    rx_bytes: u64,
    rx_hash: u64,
    /// First byte that did not match the pattern, if any.
    rx_bad: Option<u64>,
    /// The host sent more than our credit allowed.
    overrun: bool,
    tx_seed: u32,
    tx_total: u64,
    tx_sent: u64,
    /// The host reset the connection (RST) rather than it ending as planned.
    reset_by_host: bool,
    /// The host shut it down (SHUTDOWN) and the guest answered RST.
    shut_by_host: bool,
}

const FREE: Conn = Conn {
    state: State::Free,
    host_initiated: false,
    local_port: 0,
    peer_port: 0,
    peer_buf_alloc: 0,
    peer_fwd_cnt: 0,
    tx_cnt: 0,
    fwd_cnt: 0,
    last_fwd_cnt_sent: 0,
    credit_update_due: false,
    credit_requested: false,
    rx_seed: 0,
    rx_bytes: 0,
    rx_hash: 0xcbf2_9ce4_8422_2325,
    rx_bad: None,
    overrun: false,
    tx_seed: 0,
    tx_total: 0,
    tx_sent: 0,
    reset_by_host: false,
    shut_by_host: false,
};

impl Conn {
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

#[derive(Default)]
struct Stats {
    rx_packets: u64,
    tx_packets: u64,
    credit_updates_sent: u64,
    credit_requests_sent: u64,
    credit_requests_received: u64,
    dropped: u64,
}

struct Vsock {
    transport: Transport,
    rx: Virtqueue,
    tx: Virtqueue,
    rx_bufs: [Buffer; RX_BUFFERS],
    rx_by_head: [u8; QUEUE_SIZE as usize],
    tx_buf: Buffer,
    cid: u64,
    listen_port: u32,
    /// Host-initiated connections still accepted.
    accept_left: u64,
    /// Bytes a host-initiated connection receives before the guest answers
    /// with as many.
    reply_after: u64,
    conns: [Conn; MAX_CONNS],
    stats: Stats,
}

/// Prints a `FAIL:` line and returns a test failure.
fn failed(what: core::fmt::Arguments<'_>) -> Failure {
    println!("FAIL: virtio-vsock: {what}");
    Failure::Test
}

impl Vsock {
    fn post(&mut self, i: usize) -> Outcome {
        match self.rx.add(&Chain::new().write_buf(self.rx_bufs[i])) {
            Some(head) => {
                self.rx_by_head[usize::from(head)] = i as u8;
                Ok(())
            }
            None => Err(failed(format_args!("cannot post receive buffer {i}"))),
        }
    }

    /// Sends one packet whose payload (`len` bytes) is already in the
    /// transmit buffer after the header room.
    fn send_raw(&mut self, hdr: Header) -> Outcome {
        self.tx_buf.write(0, &hdr.encode());
        let chain = Chain::new().read_buf(self.tx_buf.slice(0, HDR + hdr.len as usize));
        match submit_and_wait(&mut self.transport, &mut self.tx, &chain, 2000) {
            Ok(_) => {
                self.stats.tx_packets += 1;
                Ok(())
            }
            Err(e) => Err(failed(format_args!("tx queue: {e}"))),
        }
    }

    /// Sends `op` on connection `i` with `len` payload bytes (already in
    /// place), carrying the connection's credit.
    fn send(&mut self, i: usize, op: u16, flags: u32, len: usize) -> Outcome {
        let c = &mut self.conns[i];
        let hdr = Header {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port: c.local_port,
            dst_port: c.peer_port,
            len: len as u32,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: c.fwd_cnt,
        };
        c.last_fwd_cnt_sent = c.fwd_cnt;
        c.credit_update_due = false;
        if op == OP_RW {
            c.tx_cnt = c.tx_cnt.wrapping_add(len as u32);
        }
        self.send_raw(hdr)
    }

    /// Handles one used receive buffer, if there is one.
    fn poll(&mut self) -> Result<bool, Failure> {
        let Some((id, len)) = self.rx.poll() else {
            return Ok(false);
        };
        let index = usize::from(self.rx_by_head[usize::from(id) % usize::from(QUEUE_SIZE)]);
        let buf = self.rx_bufs[index];
        let len = len as usize;
        if len < HDR || len > buf.len() {
            return Err(failed(format_args!("rx buffer used with length {len}")));
        }
        let mut bytes = [0u8; HDR];
        buf.read(0, &mut bytes);
        let hdr = Header::decode(&bytes);
        if HDR + hdr.len as usize > len {
            return Err(failed(format_args!(
                "packet op {} claims {} payload bytes in a {len}-byte buffer",
                hdr.op, hdr.len
            )));
        }
        self.stats.rx_packets += 1;
        self.handle(&hdr, buf.slice(HDR, hdr.len as usize))?;
        self.post(index)?;
        self.rx.kick(&self.transport);
        Ok(true)
    }

    fn find(&self, hdr: &Header) -> Option<usize> {
        self.conns.iter().position(|c| {
            !matches!(c.state, State::Free | State::Closed)
                && c.local_port == hdr.dst_port
                && c.peer_port == hdr.src_port
        })
    }

    fn free_slot(&self) -> Result<usize, Failure> {
        self.conns
            .iter()
            .position(|c| c.state == State::Free)
            .ok_or_else(|| failed(format_args!("more than {MAX_CONNS} connections")))
    }

    fn reset_unknown(&mut self, hdr: &Header) -> Outcome {
        self.send_raw(Header {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        })
    }

    fn handle(&mut self, hdr: &Header, payload: Buffer) -> Outcome {
        if hdr.src_cid != HOST_CID || hdr.dst_cid != self.cid || hdr.type_ != TYPE_STREAM {
            self.stats.dropped += 1;
            println!(
                "virtio-vsock: dropped a packet from CID {} to CID {}, type {}",
                hdr.src_cid, hdr.dst_cid, hdr.type_
            );
            return Ok(());
        }
        let Some(i) = self.find(hdr) else {
            if hdr.op == OP_REQUEST && hdr.dst_port == self.listen_port && self.accept_left > 0 {
                self.accept_left -= 1;
                let i = self.free_slot()?;
                self.conns[i] = Conn {
                    state: State::Established,
                    host_initiated: true,
                    local_port: hdr.dst_port,
                    peer_port: hdr.src_port,
                    peer_buf_alloc: hdr.buf_alloc,
                    peer_fwd_cnt: hdr.fwd_cnt,
                    rx_seed: SEED_HOST_TO_GUEST,
                    tx_seed: SEED_GUEST_REPLY,
                    ..FREE
                };
                println!(
                    "virtio-vsock: accepted host port {} on port {} (host buf_alloc {})",
                    hdr.src_port, hdr.dst_port, hdr.buf_alloc
                );
                return self.send(i, OP_RESPONSE, 0, 0);
            }
            if hdr.op == OP_REQUEST {
                println!(
                    "virtio-vsock: refused a connection to port {} from host port {} (RST)",
                    hdr.dst_port, hdr.src_port
                );
            }
            if hdr.op != OP_RST {
                self.stats.dropped += 1;
                return self.reset_unknown(hdr);
            }
            return Ok(());
        };
        if hdr.op == OP_RST {
            let c = &mut self.conns[i];
            if c.state != State::Closing {
                c.reset_by_host = true;
            }
            c.state = State::Closed;
            return Ok(());
        }
        let reply_after = self.reply_after;
        let c = &mut self.conns[i];
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = hdr.fwd_cnt;
        if c.peer_credit() > 0 {
            c.credit_requested = false;
        }
        match hdr.op {
            OP_RESPONSE if c.state == State::Connecting => c.state = State::Established,
            OP_RW if matches!(c.state, State::Established | State::Closing) => {
                let data = payload.bytes();
                for (k, &byte) in data.iter().enumerate() {
                    if c.rx_bad.is_none() && byte != pattern(c.rx_seed, c.rx_bytes + k as u64) {
                        c.rx_bad = Some(c.rx_bytes + k as u64);
                    }
                }
                for &byte in data {
                    c.rx_hash = (c.rx_hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
                }
                c.rx_bytes += data.len() as u64;
                if c.host_initiated && c.rx_bytes == reply_after {
                    c.tx_total = reply_after;
                }
                // Consumed at once: forwarded. The host may have at most
                // BUF_ALLOC bytes beyond what we last announced in flight.
                c.fwd_cnt = c.fwd_cnt.wrapping_add(data.len() as u32);
                if c.fwd_cnt.wrapping_sub(c.last_fwd_cnt_sent) > BUF_ALLOC {
                    c.overrun = true;
                }
                if c.fwd_cnt.wrapping_sub(c.last_fwd_cnt_sent) >= BUF_ALLOC / 2 {
                    c.credit_update_due = true;
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => {
                self.stats.credit_requests_received += 1;
                c.credit_update_due = true;
            }
            OP_SHUTDOWN => {
                // Only both directions at once come from this VMM.
                if hdr.flags & SHUTDOWN_BOTH == SHUTDOWN_BOTH {
                    c.shut_by_host = true;
                    self.send(i, OP_RST, 0, 0)?;
                    self.conns[i].state = State::Closed;
                }
            }
            op => {
                let state = c.state as u8;
                return Err(failed(format_args!(
                    "unexpected op {op} on connection {}:{} in state {state}",
                    c.local_port, c.peer_port
                )));
            }
        }
        Ok(())
    }

    /// Sends what is due: credit updates, then one chunk of data per
    /// connection that has some to send and credit for it.
    fn pump(&mut self) -> Outcome {
        for i in 0..MAX_CONNS {
            let c = self.conns[i];
            if c.state != State::Established {
                continue;
            }
            if c.credit_update_due {
                self.stats.credit_updates_sent += 1;
                self.send(i, OP_CREDIT_UPDATE, 0, 0)?;
            }
            if c.tx_sent >= c.tx_total {
                continue;
            }
            let credit = u64::from(c.peer_credit());
            if credit == 0 {
                if !c.credit_requested {
                    self.conns[i].credit_requested = true;
                    self.stats.credit_requests_sent += 1;
                    self.send(i, OP_CREDIT_REQUEST, 0, 0)?;
                }
                continue;
            }
            let n = (c.tx_total - c.tx_sent).min(credit).min(TX_PAYLOAD as u64) as usize;
            let bytes = self.tx_buf.bytes_mut();
            for (k, byte) in bytes[HDR..HDR + n].iter_mut().enumerate() {
                *byte = pattern(c.tx_seed, c.tx_sent + k as u64);
            }
            dma::barrier();
            self.conns[i].tx_sent += n as u64;
            self.send(i, OP_RW, 0, n)?;
        }
        Ok(())
    }

    /// Receives and sends until `done` holds, failing after `timeout_ms`.
    fn run_until(&mut self, what: &str, timeout_ms: u64, done: impl Fn(&Self) -> bool) -> Outcome {
        let start = tsc::now();
        let limit = tsc::ticks_per_ms(timeout_ms);
        loop {
            while self.poll()? {}
            self.pump()?;
            for c in self.conns.iter().filter(|c| c.state != State::Free) {
                if let Some(at) = c.rx_bad {
                    return Err(failed(format_args!(
                        "connection {}:{}: received byte {at} differs from the pattern",
                        c.local_port, c.peer_port
                    )));
                }
                if c.overrun {
                    return Err(failed(format_args!(
                        "connection {}:{}: the host sent more than the credit of {BUF_ALLOC} bytes",
                        c.local_port, c.peer_port
                    )));
                }
            }
            if done(self) {
                return Ok(());
            }
            if tsc::now().wrapping_sub(start) > limit {
                return Err(failed(format_args!(
                    "{what}: not done within {timeout_ms} ms"
                )));
            }
            core::hint::spin_loop();
        }
    }
}

/// Brings up the first virtio-vsock device: its three queues set up, every
/// receive buffer posted, the guest CID read. `listen_port`,
/// `accept_left` and `reply_after` are the host-initiated phase's (see
/// [`run`]). Returns the device, its event queue (no buffers posted) and
/// where it was found.
fn bring_up(
    ctx: &Context<'_>,
    listen_port: u32,
    accept_left: u64,
    reply_after: u64,
) -> Result<(Vsock, Virtqueue, crate::virtio::Location), Failure> {
    let devices = virtio_devices(ctx)?;
    let Some(found) = devices.of_type(DEVICE_ID_VSOCK).next() else {
        fail!("no virtio-vsock device on the command line (virtio_mmio.device=...)");
    };
    let rx_memory = dma::alloc_or_panic(RX_BUFFERS * (HDR + RX_PAYLOAD), 64);
    let mut dev = Vsock {
        transport: Transport::new(found, ctx.params, false),
        rx: Virtqueue::new(RXQ, QUEUE_SIZE),
        tx: Virtqueue::new(TXQ, QUEUE_SIZE),
        rx_bufs: [rx_memory.slice(0, 0); RX_BUFFERS],
        rx_by_head: [0; QUEUE_SIZE as usize],
        tx_buf: dma::alloc_or_panic(HDR + TX_PAYLOAD, 64),
        cid: 0,
        listen_port,
        accept_left,
        reply_after,
        conns: [FREE; MAX_CONNS],
        stats: Stats::default(),
    };
    for (i, buf) in dev.rx_bufs.iter_mut().enumerate() {
        *buf = rx_memory.slice(i * (HDR + RX_PAYLOAD), HDR + RX_PAYLOAD);
    }
    let mut event = Virtqueue::new(EVENTQ, 8);
    if let Err(e) = init_device(
        &dev.transport,
        0,
        &mut [&mut dev.rx, &mut dev.tx, &mut event],
        QUEUE_SIZE,
    ) {
        fail!("virtio-vsock at {}: initialisation: {e}", found.location);
    }
    dev.cid = dev.transport.config(0, 8);
    for i in 0..RX_BUFFERS {
        dev.post(i)?;
    }
    dev.rx.kick(&dev.transport);
    Ok((dev, event, found.location))
}

/// `virtio-vsock [port=N] [host-port=M] [conns=K] [bytes=B] [timeout-ms=T]`.
pub fn run(ctx: &Context<'_>) -> Outcome {
    let port = arg(ctx.cmdline.number("port"))?.unwrap_or(1234);
    let host_port = arg(ctx.cmdline.number("host-port"))?.unwrap_or(1235);
    let conns = arg(ctx.cmdline.number("conns"))?.unwrap_or(2);
    let bytes = arg(ctx.cmdline.number("bytes"))?.unwrap_or(65536);
    let timeout_ms = arg(ctx.cmdline.number("timeout-ms"))?.unwrap_or(10_000);
    let (Ok(port), Ok(host_port)) = (u32::try_from(port), u32::try_from(host_port)) else {
        bad_args!("port= and host-port= must fit in 32 bits");
    };
    if !(1..=MAX_PER_PHASE).contains(&conns) {
        bad_args!("conns={conns}: must be 1 to {MAX_PER_PHASE}");
    }
    // The event queue gets no buffers: transport resets are not handled.
    let (mut dev, _event, location) = bring_up(ctx, port, conns, bytes)?;
    println!("virtio-vsock: device at {location}: guest CID {}", dev.cid);
    println!("virtio-vsock: listening on port {port} for {conns} connection(s) of {bytes} bytes");

    // (1) Host-initiated: receive `bytes`, answer with as many, and end
    // when the host closes (its SHUTDOWN, our RST).
    let phase1 = dev.run_until("host-initiated connections", timeout_ms, |d| {
        d.conns
            .iter()
            .filter(|c| c.host_initiated && c.state == State::Closed)
            .count() as u64
            == conns
    });
    if let Err(e) = phase1 {
        summary(&dev);
        return Err(e);
    }
    for c in dev.conns.iter().filter(|c| c.host_initiated) {
        println!(
            "virtio-vsock: host-initiated: port {} from host port {}: received {} bytes fnv1a64={:#018x}, sent {}; {}",
            c.local_port,
            c.peer_port,
            c.rx_bytes,
            c.rx_hash,
            c.tx_sent,
            if c.shut_by_host { "host shut down, RST sent" } else { "reset by the host" }
        );
    }
    let mut ok = true;
    for c in dev.conns.iter().filter(|c| c.host_initiated) {
        if c.rx_bytes != bytes || c.tx_sent != bytes || !c.shut_by_host {
            println!(
                "FAIL: virtio-vsock: host-initiated connection from host port {}: received {} of {bytes} bytes, sent {} of {bytes}, {}",
                c.peer_port,
                c.rx_bytes,
                c.tx_sent,
                if c.shut_by_host { "closed by SHUTDOWN" } else { "reset by the host" }
            );
            ok = false;
        }
    }
    if !ok {
        return Err(Failure::Test);
    }
    println!("virtio-vsock: host-initiated: {conns} connection(s) ok");
    // Host-initiated connections are done: keep the slots for the record
    // but stop them matching new packets (they are Closed).

    // (2) Guest-initiated: `conns` connections at once to the host port.
    let first = dev.conns.iter().filter(|c| c.state != State::Free).count();
    for k in 0..conns as usize {
        let i = dev.free_slot()?;
        dev.conns[i] = Conn {
            state: State::Connecting,
            local_port: FIRST_GUEST_PORT + k as u32,
            peer_port: host_port,
            rx_seed: SEED_HOST_REPLY,
            tx_seed: SEED_GUEST_TO_HOST,
            ..FREE
        };
        dev.send(i, OP_REQUEST, 0, 0)?;
    }
    let mine = first..first + conns as usize;
    dev.run_until("guest-initiated connections", timeout_ms, |d| {
        d.conns[mine.clone()]
            .iter()
            .all(|c| c.state != State::Connecting)
    })?;
    for c in &dev.conns[mine.clone()] {
        if c.state != State::Established {
            fail!(
                "guest-initiated connection from port {} to host port {host_port} refused (is anything listening on <uds>_{host_port}?)",
                c.local_port
            );
        }
    }
    println!(
        "virtio-vsock: guest-initiated: {conns} connection(s) to host port {host_port} established"
    );
    for c in &mut dev.conns[mine.clone()] {
        c.tx_total = bytes;
    }
    dev.run_until("guest-initiated transfers", timeout_ms, |d| {
        d.conns[mine.clone()]
            .iter()
            .all(|c| c.state != State::Established || (c.tx_sent == bytes && c.rx_bytes >= bytes))
    })?;
    for c in &dev.conns[mine.clone()] {
        println!(
            "virtio-vsock: guest-initiated: port {} to host port {}: sent {} bytes, received {} bytes fnv1a64={:#018x}",
            c.local_port, c.peer_port, c.tx_sent, c.rx_bytes, c.rx_hash
        );
        if c.state != State::Established || c.rx_bytes != bytes || c.tx_sent != bytes {
            fail!(
                "guest-initiated connection from port {}: sent {} and received {} of {bytes} bytes, {}",
                c.local_port,
                c.tx_sent,
                c.rx_bytes,
                if c.reset_by_host { "reset by the host" } else { "still open" }
            );
        }
    }
    println!("virtio-vsock: guest-initiated: {conns} connection(s) ok");

    // (3) The first connection is reset, the others shut down gracefully
    // (SHUTDOWN both ways, then the host's RST).
    let reset = first;
    dev.send(reset, OP_RST, 0, 0)?;
    dev.conns[reset].state = State::Closed;
    println!(
        "virtio-vsock: reset: port {} sent RST",
        dev.conns[reset].local_port
    );
    for i in mine.clone().skip(1) {
        dev.send(i, OP_SHUTDOWN, SHUTDOWN_BOTH, 0)?;
        dev.conns[i].state = State::Closing;
    }
    dev.run_until("graceful shutdowns", timeout_ms, |d| {
        d.conns[mine.clone()]
            .iter()
            .all(|c| c.state == State::Closed)
    })?;
    for c in dev.conns[mine.clone()].iter().skip(1) {
        if c.reset_by_host {
            fail!(
                "shutdown: port {}: reset by the host before SHUTDOWN",
                c.local_port
            );
        }
        println!(
            "virtio-vsock: shutdown: port {} sent SHUTDOWN, got RST",
            c.local_port
        );
    }
    summary(&dev);
    let _ = dev.transport.reset();
    Ok(())
}

fn summary(dev: &Vsock) {
    let s = &dev.stats;
    println!(
        "virtio-vsock: packets: {} received, {} sent; credit updates sent {}, credit requests sent {}, received {}; dropped {}",
        s.rx_packets,
        s.tx_packets,
        s.credit_updates_sent,
        s.credit_requests_sent,
        s.credit_requests_received,
        s.dropped
    );
}

/// What [`Exchanger::wait`] saw.
enum Waited {
    Done,
    /// The device reset the transport (`VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`,
    /// after a snapshot restore): every connection is gone.
    TransportReset,
    TimedOut,
}

/// A vsock device that makes one echo exchange with the host per call:
/// the snapshot sequence's vsock check. Each exchange is a connection to
/// `vsock-port=` (default 1235) that sends `bytes` of a pattern, reads
/// them back, and shuts down. A connection the device drops — a restored
/// device starts with none, and says so on the event queue — is retried
/// on a new one.
pub struct Exchanger {
    dev: Vsock,
    event: Virtqueue,
    event_buf: Buffer,
    host_port: u32,
    next_port: u32,
    /// Transport resets seen.
    pub resets: u64,
    /// Exchanges started again after their connection was lost.
    pub retries: u64,
}

/// Brings up the first virtio-vsock device, its event queue armed.
pub fn exchanger(ctx: &Context<'_>) -> Result<Exchanger, Failure> {
    let host_port = arg(ctx.cmdline.number("vsock-port"))?.unwrap_or(1235);
    let Ok(host_port) = u32::try_from(host_port) else {
        bad_args!("vsock-port={host_port} must fit in 32 bits");
    };
    let (dev, event, _) = bring_up(ctx, 0, 0, 0)?;
    let mut exchanger = Exchanger {
        dev,
        event,
        event_buf: dma::alloc_or_panic(8, 8),
        host_port,
        next_port: FIRST_GUEST_PORT,
        resets: 0,
        retries: 0,
    };
    exchanger.arm_event()?;
    Ok(exchanger)
}

impl Exchanger {
    fn arm_event(&mut self) -> Outcome {
        if self.event.add(&Chain::new().write_buf(self.event_buf)).is_none() {
            return Err(failed(format_args!("cannot post the event buffer")));
        }
        self.event.kick(&self.dev.transport);
        Ok(())
    }

    /// Receives and sends until `done`, a transport reset, or `timeout_ms`.
    fn wait(&mut self, timeout_ms: u64, done: impl Fn(&Vsock) -> bool) -> Result<Waited, Failure> {
        let start = tsc::now();
        let limit = tsc::ticks_per_ms(timeout_ms);
        loop {
            if self.event.poll().is_some() {
                let mut id = [0u8; 4];
                self.event_buf.read(0, &mut id);
                self.arm_event()?;
                if u32::from_le_bytes(id) == 0 {
                    // TRANSPORT_RESET: every connection is gone; the CID
                    // may have changed (virtio 1.2, 5.10.6.6).
                    self.resets += 1;
                    self.dev.conns = [FREE; MAX_CONNS];
                    self.dev.cid = self.dev.transport.config(0, 8);
                    return Ok(Waited::TransportReset);
                }
            }
            while self.dev.poll()? {}
            self.dev.pump()?;
            if let Some(c) = self.dev.conns.iter().find(|c| c.state != State::Free && c.rx_bad.is_some()) {
                return Err(failed(format_args!(
                    "connection {}:{}: an echoed byte differs from what was sent",
                    c.local_port, c.peer_port
                )));
            }
            if done(&self.dev) {
                return Ok(Waited::Done);
            }
            if tsc::now().wrapping_sub(start) > limit {
                return Ok(Waited::TimedOut);
            }
            core::hint::spin_loop();
        }
    }

    /// One exchange of `bytes`; retried (on a new connection) up to three
    /// times when the connection is lost.
    pub fn round(&mut self, bytes: u64) -> Outcome {
        for _ in 0..3 {
            if self.try_round(bytes)? {
                return Ok(());
            }
            self.retries += 1;
        }
        Err(failed(format_args!(
            "no echo exchange with host port {} after 3 connections",
            self.host_port
        )))
    }

    fn try_round(&mut self, bytes: u64) -> Result<bool, Failure> {
        // Slots of finished exchanges are free again.
        for c in self.dev.conns.iter_mut() {
            if c.state == State::Closed {
                *c = FREE;
            }
        }
        let i = self.dev.free_slot()?;
        let port = self.next_port;
        self.next_port = if port >= FIRST_GUEST_PORT + 10_000 { FIRST_GUEST_PORT } else { port + 1 };
        // The host echoes what it gets: the same pattern both ways.
        self.dev.conns[i] = Conn {
            state: State::Connecting,
            local_port: port,
            peer_port: self.host_port,
            rx_seed: SEED_GUEST_TO_HOST,
            tx_seed: SEED_GUEST_TO_HOST,
            ..FREE
        };
        self.dev.send(i, OP_REQUEST, 0, 0)?;
        match self.wait(5_000, |d| d.conns[i].state != State::Connecting)? {
            Waited::Done if self.dev.conns[i].state == State::Established => {}
            Waited::Done => {
                return Err(failed(format_args!(
                    "connection to host port {} refused (is anything listening on <uds>_{}?)",
                    self.host_port, self.host_port
                )))
            }
            Waited::TransportReset | Waited::TimedOut => return Ok(false),
        }
        self.dev.conns[i].tx_total = bytes;
        let echoed = self.wait(5_000, |d| {
            let c = &d.conns[i];
            c.state != State::Established || (c.tx_sent == bytes && c.rx_bytes >= bytes)
        })?;
        let c = self.dev.conns[i];
        if !matches!(echoed, Waited::Done) || c.state != State::Established || c.rx_bytes != bytes {
            self.dev.conns[i] = FREE;
            return Ok(false);
        }
        self.dev.send(i, OP_SHUTDOWN, SHUTDOWN_BOTH, 0)?;
        self.dev.conns[i].state = State::Closing;
        // The host closes its side and the device answers RST; a lost
        // connection here lost nothing (the echo is complete).
        let _ = self.wait(5_000, |d| d.conns[i].state == State::Closed)?;
        self.dev.conns[i] = FREE;
        Ok(true)
    }
}
