//! `virtio-net`: ARP, ICMP echo and UDP echo against the host end of a tap,
//! receive backpressure, a transmit flood, a timed UDP burst to the host and
//! a timed burst from it (the receive path's throughput), on the first
//! virtio-net card.
//!
//! The driver accepts VERSION_1 and MAC only (no MRG_RXBUF, no offloads):
//! every receive buffer holds a 12-byte `virtio_net_hdr_v1` and a whole
//! 1514-byte frame, and every transmitted frame is one device-readable
//! buffer, header first. Completions are polled. The guest answers ARP
//! requests for its own address whenever it receives.

use super::{arg, virtio_devices, Context, Failure, Outcome};
use crate::dma::{self, Buffer};
use crate::virtio::queue::{Chain, Virtqueue};
use crate::virtio::{feature, init_device, Transport};
use crate::{println, tsc};

const DEVICE_ID_NET: u32 = 1;
const F_MAC: u64 = 1 << 5;
const HDR: usize = 12;
const MAX_FRAME: usize = 1514;
const QUEUE_SIZE: u16 = 128;
/// Receive buffers posted until the receive burst, which fills the ring.
const RX_BUFS: usize = 64;
const RX_RING_BUFS: usize = QUEUE_SIZE as usize;
const RX_BUF_LEN: usize = 2048;
const TX_SLOTS: usize = QUEUE_SIZE as usize;
const TX_SLOT_LEN: usize = 1536;
const TIMEOUT_MS: u64 = 2000;
const ETH_IPV4: u16 = 0x0800;
const ETH_ARP: u16 = 0x0806;
/// IEEE local experimental EtherType: the host kernel drops such frames.
const ETH_FLOOD: u16 = 0x88b5;
const PROTO_ICMP: u8 = 1;
const PROTO_UDP: u8 = 17;
const GUEST_PORT: u16 = 40000;
const BROADCAST: [u8; 6] = [0xff; 6];
/// The receive burst's request: magic, run id, count, size (big-endian).
const RX_BURST_MAGIC: [u8; 4] = *b"KRXB";
const RX_BURST_REQUEST: usize = 16;
/// Payload sizes of the receive burst: minimum-size frames (60 bytes, for
/// frames/s) and full-size ones (1514 bytes, for Mbit/s).
const RX_BURST_SIZES: [usize; 2] = [18, 1472];
/// At most this many datagrams per receive burst (the duplicate bitmap).
const RX_BURST_MAX: usize = 16384;
/// A receive burst ends this long after the last frame.
const RX_QUIET_MS: u64 = 200;
/// ... and at the latest this long after its request.
const RX_BURST_CAP_MS: u64 = 20_000;
const UDP_SIZES: [usize; 20] = [
    1, 2, 3, 7, 8, 31, 63, 64, 100, 255, 256, 511, 512, 777, 1000, 1023, 1024, 1400, 1471, 1472,
];

/// One received frame (without the virtio-net header).
struct Frame {
    data: [u8; MAX_FRAME],
    len: usize,
}

impl Frame {
    fn bytes(&self) -> &[u8] {
        &self.data[..self.len]
    }

    fn ethertype(&self) -> u16 {
        be16(&self.data, 12)
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// One's-complement sum of `data` as big-endian 16-bit words, added to `sum`.
fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    sum
}

fn csum_fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The IPv4 pseudo-header sum for a `len`-byte L4 segment.
fn pseudo_sum(src: [u8; 4], dst: [u8; 4], proto: u8, len: usize) -> u32 {
    let sum = csum_add(csum_add(0, &src), &dst);
    sum + u32::from(proto) + len as u32
}

struct Ip([u8; 4]);

impl core::fmt::Display for Ip {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let [a, b, c, d] = self.0;
        write!(f, "{a}.{b}.{c}.{d}")
    }
}

struct Mac([u8; 6]);

impl core::fmt::Display for Mac {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

fn parse_ip(text: &str) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = text.split('.');
    for byte in out.iter_mut() {
        *byte = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = text.split(':');
    for byte in out.iter_mut() {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// An IPv4 packet found in a frame: protocol, source, destination, and the
/// payload's range in the frame. The header checksum is checked.
struct Ipv4 {
    proto: u8,
    src: [u8; 4],
    dst: [u8; 4],
    start: usize,
    end: usize,
}

/// Parses an IPv4 frame; `Err` for a malformed packet or a bad header
/// checksum, `Ok(None)` for other EtherTypes.
fn parse_ipv4(b: &[u8]) -> Result<Option<Ipv4>, &'static str> {
    if b.len() < 14 || be16(b, 12) != ETH_IPV4 {
        return Ok(None);
    }
    if b.len() < 34 || b[14] >> 4 != 4 {
        return Err("not an IPv4 header");
    }
    let ihl = usize::from(b[14] & 0xf) * 4;
    let total = usize::from(be16(b, 16));
    if ihl < 20 || total < ihl || 14 + total > b.len() {
        return Err("IPv4 lengths do not fit the frame");
    }
    if csum_fold(csum_add(0, &b[14..14 + ihl])) != 0 {
        return Err("bad IPv4 header checksum");
    }
    let mut src = [0u8; 4];
    let mut dst = [0u8; 4];
    src.copy_from_slice(&b[26..30]);
    dst.copy_from_slice(&b[30..34]);
    Ok(Some(Ipv4 {
        proto: b[23],
        src,
        dst,
        start: 14 + ihl,
        end: 14 + total,
    }))
}

/// The payload byte `i` of UDP datagram `seq` of `size` bytes.
fn pattern(seq: u32, size: usize, i: usize) -> u8 {
    (i as u32)
        .wrapping_mul(131)
        .wrapping_add(seq.wrapping_mul(7))
        .wrapping_add(size as u32) as u8
}

/// The first virtio-net card, brought up.
struct Nic {
    transport: Transport,
    rxq: Virtqueue,
    txq: Virtqueue,
    rx: Buffer,
    rx_slot_of: [u16; QUEUE_SIZE as usize],
    /// Receive buffers used and not posted again (while `repost` is off).
    parked: [u16; RX_BUFS],
    parked_len: usize,
    repost: bool,
    tx: Buffer,
    tx_slot_of: [u16; QUEUE_SIZE as usize],
    tx_busy: [bool; TX_SLOTS],
    tx_next: usize,
    tx_sent: u64,
    tx_done: u64,
    mac: [u8; 6],
    me: [u8; 4],
    ip_id: u16,
}

impl Nic {
    fn post_rx(&mut self, slot: usize) -> Result<(), &'static str> {
        let buffer = self.rx.slice(slot * RX_BUF_LEN, RX_BUF_LEN);
        let head = self
            .rxq
            .add(&Chain::new().write_buf(buffer))
            .ok_or("receive queue full")?;
        self.rx_slot_of[usize::from(head)] = slot as u16;
        Ok(())
    }

    fn reclaim_tx(&mut self) {
        while let Some((id, _)) = self.txq.poll() {
            let slot = usize::from(self.tx_slot_of[usize::from(id) % TX_SLOTS]);
            self.tx_busy[slot] = false;
            self.tx_done += 1;
        }
    }

    /// Sends a `len`-byte frame that `build` fills in (after a zero header).
    fn send(&mut self, len: usize, build: impl FnOnce(&mut [u8])) -> Result<(), &'static str> {
        let start = tsc::now();
        let limit = tsc::ticks_per_ms(TIMEOUT_MS);
        let slot = loop {
            self.reclaim_tx();
            let free = (0..TX_SLOTS)
                .map(|k| (self.tx_next + k) % TX_SLOTS)
                .find(|&s| !self.tx_busy[s]);
            if let Some(slot) = free {
                break slot;
            }
            if tsc::now().wrapping_sub(start) > limit {
                return Err("transmit queue stuck: no completion in time");
            }
            core::hint::spin_loop();
        };
        let buffer = self.tx.slice(slot * TX_SLOT_LEN, HDR + len);
        let bytes = buffer.bytes_mut();
        bytes[..HDR].fill(0);
        build(&mut bytes[HDR..]);
        dma::barrier();
        let head = self
            .txq
            .add(&Chain::new().read_buf(buffer))
            .ok_or("transmit queue full")?;
        self.tx_slot_of[usize::from(head)] = slot as u16;
        self.tx_busy[slot] = true;
        self.tx_next = (slot + 1) % TX_SLOTS;
        self.tx_sent += 1;
        self.txq.kick(&self.transport);
        Ok(())
    }

    /// Waits for all transmitted frames to complete.
    fn flush_tx(&mut self, timeout_ms: u64) -> bool {
        let start = tsc::now();
        let limit = tsc::ticks_per_ms(timeout_ms);
        loop {
            self.reclaim_tx();
            if self.tx_done == self.tx_sent {
                return true;
            }
            if tsc::now().wrapping_sub(start) > limit {
                return false;
            }
            core::hint::spin_loop();
        }
    }

    /// The next frame the guest does not answer itself (ARP requests for
    /// its address are), or `None` after `timeout_ms` without one.
    fn recv(&mut self, timeout_ms: u64) -> Result<Option<Frame>, &'static str> {
        let start = tsc::now();
        let limit = tsc::ticks_per_ms(timeout_ms);
        loop {
            self.reclaim_tx();
            if let Some((id, len)) = self.rxq.poll() {
                let slot = usize::from(self.rx_slot_of[usize::from(id)]);
                let len = len as usize;
                if !(HDR..=RX_BUF_LEN).contains(&len) {
                    return Err("receive buffer used with a bad length");
                }
                let mut frame = Frame {
                    data: [0; MAX_FRAME],
                    len: (len - HDR).min(MAX_FRAME),
                };
                let buffer = self.rx.slice(slot * RX_BUF_LEN, RX_BUF_LEN);
                buffer.read(HDR, &mut frame.data[..frame.len]);
                if self.repost {
                    self.post_rx(slot)?;
                    self.rxq.kick(&self.transport);
                } else {
                    self.parked[self.parked_len] = slot as u16;
                    self.parked_len += 1;
                }
                if frame.len >= 14 && !self.answer_arp(frame.bytes())? {
                    return Ok(Some(frame));
                }
                continue;
            }
            if tsc::now().wrapping_sub(start) > limit {
                return Ok(None);
            }
            core::hint::spin_loop();
        }
    }

    /// Posts the parked receive buffers again and resumes reposting.
    fn unpark(&mut self) -> Result<(), &'static str> {
        for i in 0..self.parked_len {
            self.post_rx(usize::from(self.parked[i]))?;
        }
        self.parked_len = 0;
        self.repost = true;
        self.rxq.kick(&self.transport);
        Ok(())
    }

    /// Answers an ARP request for the guest's address; returns whether the
    /// frame was an ARP request (for anyone).
    fn answer_arp(&mut self, b: &[u8]) -> Result<bool, &'static str> {
        if b.len() < 42 || be16(b, 12) != ETH_ARP || be16(b, 20) != 1 {
            return Ok(false);
        }
        if b[38..42] == self.me {
            let mut peer_mac = [0u8; 6];
            let mut peer_ip = [0u8; 4];
            peer_mac.copy_from_slice(&b[22..28]);
            peer_ip.copy_from_slice(&b[28..32]);
            let (mac, me) = (self.mac, self.me);
            self.send(60, |f| arp(f, 2, mac, me, peer_mac, peer_ip))?;
        }
        Ok(true)
    }

    /// Sends an IPv4 packet of `payload` bytes that `build` fills in.
    fn send_ipv4(
        &mut self,
        dst_mac: [u8; 6],
        dst: [u8; 4],
        proto: u8,
        payload: usize,
        build: impl FnOnce(&mut [u8]),
    ) -> Result<(), &'static str> {
        let (mac, me) = (self.mac, self.me);
        self.ip_id = self.ip_id.wrapping_add(1);
        let id = self.ip_id;
        let len = (14 + 20 + payload).max(60);
        self.send(len, |f| {
            f.fill(0);
            f[0..6].copy_from_slice(&dst_mac);
            f[6..12].copy_from_slice(&mac);
            put16(f, 12, ETH_IPV4);
            let ip = &mut f[14..34];
            ip[0] = 0x45;
            put16(ip, 2, (20 + payload) as u16);
            put16(ip, 4, id);
            put16(ip, 6, 0x4000);
            ip[8] = 64;
            ip[9] = proto;
            ip[12..16].copy_from_slice(&me);
            ip[16..20].copy_from_slice(&dst);
            let sum = csum_fold(csum_add(0, ip));
            put16(ip, 10, sum);
            build(&mut f[34..34 + payload]);
        })
    }

    /// Sends a UDP datagram of [`pattern`] `seq` (checksummed) from
    /// [`GUEST_PORT`].
    fn send_udp(
        &mut self,
        dst_mac: [u8; 6],
        dst: [u8; 4],
        port: u16,
        size: usize,
        seq: u32,
    ) -> Result<(), &'static str> {
        self.send_udp_with(dst_mac, dst, port, size, |p| {
            for (i, byte) in p.iter_mut().enumerate() {
                *byte = pattern(seq, size, i);
            }
        })
    }

    /// Sends a UDP datagram (checksummed) from [`GUEST_PORT`] whose `size`
    /// payload bytes `fill` writes.
    fn send_udp_with(
        &mut self,
        dst_mac: [u8; 6],
        dst: [u8; 4],
        port: u16,
        size: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<(), &'static str> {
        let me = self.me;
        self.send_ipv4(dst_mac, dst, PROTO_UDP, 8 + size, |u| {
            put16(u, 0, GUEST_PORT);
            put16(u, 2, port);
            put16(u, 4, (8 + size) as u16);
            put16(u, 6, 0);
            fill(&mut u[8..]);
            let sum = csum_fold(csum_add(pseudo_sum(me, dst, PROTO_UDP, 8 + size), u));
            put16(u, 6, if sum == 0 { 0xffff } else { sum });
        })
    }
}

/// Fills in an ARP frame (60 bytes).
fn arp(f: &mut [u8], op: u16, mac: [u8; 6], me: [u8; 4], peer_mac: [u8; 6], peer: [u8; 4]) {
    f.fill(0);
    f[0..6].copy_from_slice(if op == 1 { &BROADCAST } else { &peer_mac });
    f[6..12].copy_from_slice(&mac);
    put16(f, 12, ETH_ARP);
    put16(f, 14, 1);
    put16(f, 16, ETH_IPV4);
    f[18] = 6;
    f[19] = 4;
    put16(f, 20, op);
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&me);
    if op == 2 {
        f[32..38].copy_from_slice(&peer_mac);
    }
    f[38..42].copy_from_slice(&peer);
}

/// A UDP datagram from `src:port` to the guest's port in frame `b`,
/// checksums checked: `Ok(Some(payload range))`.
fn udp_from(b: &[u8], src: [u8; 4], port: u16) -> Result<Option<(usize, usize)>, &'static str> {
    let Some(ip) = parse_ipv4(b)? else {
        return Ok(None);
    };
    if ip.proto != PROTO_UDP || ip.src != src {
        return Ok(None);
    }
    let u = &b[ip.start..ip.end];
    if u.len() < 8 || usize::from(be16(u, 4)) != u.len() {
        return Err("UDP length does not match the IPv4 length");
    }
    if be16(u, 0) != port || be16(u, 2) != GUEST_PORT {
        return Ok(None);
    }
    if be16(u, 6) != 0 && csum_fold(csum_add(pseudo_sum(ip.src, ip.dst, PROTO_UDP, u.len()), u)) != 0 {
        return Err("bad UDP checksum");
    }
    Ok(Some((ip.start + 8, ip.end)))
}

fn ip_arg(ctx: &Context<'_>, key: &str, default: [u8; 4]) -> Result<[u8; 4], Failure> {
    match ctx.cmdline.value(key) {
        None => Ok(default),
        Some(text) => match parse_ip(text) {
            Some(ip) => Ok(ip),
            None => bad_args!("{key}={text} is not an IPv4 address"),
        },
    }
}

/// `virtio-net [mac=MAC] [host=IP] [me=IP] [udp-port=N] [burst=N] [flood=N]`:
/// the UDP echo server is at `udp-port`, the sink of the transmit burst at
/// `udp-port+1`, the blaster of the receive burst at `udp-port+2`; `burst`
/// datagrams go each way (the receive bursts at most [`RX_BURST_MAX`];
/// `burst=0` skips them).
pub fn run(ctx: &Context<'_>) -> Outcome {
    let host = ip_arg(ctx, "host", [10, 0, 2, 1])?;
    let me = ip_arg(ctx, "me", [10, 0, 2, 15])?;
    let port = arg(ctx.cmdline.number("udp-port"))?.unwrap_or(7777);
    let Ok(port) = u16::try_from(port) else {
        bad_args!("udp-port={port} is not a port");
    };
    if port > u16::MAX - 2 {
        bad_args!("udp-port={port}: the bursts use udp-port+1 and udp-port+2");
    }
    let burst = arg(ctx.cmdline.number("burst"))?.unwrap_or(2000);
    let flood = arg(ctx.cmdline.number("flood"))?.unwrap_or(4000);
    let want_mac = match ctx.cmdline.value("mac") {
        None => None,
        Some(text) => match parse_mac(text) {
            Some(mac) => Some(mac),
            None => bad_args!("mac={text} is not a MAC address"),
        },
    };
    let mut nic = bring_up(ctx, me, want_mac)?;
    match checks(&mut nic, host, port, burst, flood) {
        Ok(()) => {
            let _ = nic.transport.reset();
            Ok(())
        }
        Err(e) => {
            let _ = nic.transport.reset();
            fail!("virtio-net: {e}")
        }
    }
}

/// Brings up the first virtio-net card as `me`, its receive buffers
/// posted; checks its MAC against `want_mac` if given.
fn bring_up(ctx: &Context<'_>, me: [u8; 4], want_mac: Option<[u8; 6]>) -> Result<Nic, Failure> {
    let devices = virtio_devices(ctx)?;
    let Some(found) = devices.of_type(DEVICE_ID_NET).next() else {
        fail!("no virtio-net device on the command line (virtio_mmio.device=...)");
    };
    let transport = Transport::new(found, ctx.params, false);
    let mut nic = Nic {
        transport,
        rxq: Virtqueue::new(0, QUEUE_SIZE),
        txq: Virtqueue::new(1, QUEUE_SIZE),
        rx: dma::alloc_or_panic(RX_RING_BUFS * RX_BUF_LEN, 4096),
        rx_slot_of: [0; QUEUE_SIZE as usize],
        parked: [0; RX_BUFS],
        parked_len: 0,
        repost: true,
        tx: dma::alloc_or_panic(TX_SLOTS * TX_SLOT_LEN, 4096),
        tx_slot_of: [0; QUEUE_SIZE as usize],
        tx_busy: [false; TX_SLOTS],
        tx_next: 0,
        tx_sent: 0,
        tx_done: 0,
        mac: [0; 6],
        me,
        ip_id: 0,
    };
    let accepted = match init_device(
        &nic.transport,
        F_MAC,
        &mut [&mut nic.rxq, &mut nic.txq],
        QUEUE_SIZE,
    ) {
        Ok(accepted) => accepted,
        Err(e) => fail!("virtio-net: initialisation: {e}"),
    };
    if accepted & F_MAC == 0 || accepted & feature::VERSION_1 == 0 {
        fail!("virtio-net: MAC or VERSION_1 not accepted (features {accepted:#x})");
    }
    let mac = nic.transport.config(0, 6).to_le_bytes();
    nic.mac.copy_from_slice(&mac[..6]);
    println!(
        "virtio-net: card at {}, features {accepted:#x}, MAC {}",
        found.location,
        Mac(nic.mac)
    );
    if let Some(want) = want_mac {
        if want != nic.mac {
            fail!("virtio-net: MAC is {}, expected {}", Mac(nic.mac), Mac(want));
        }
    }
    for slot in 0..RX_BUFS {
        if let Err(e) = nic.post_rx(slot) {
            fail!("virtio-net: posting receive buffers: {e}");
        }
    }
    nic.rxq.kick(&nic.transport);
    Ok(nic)
}

/// The host's MAC, by ARP (three tries).
fn resolve(nic: &mut Nic, host: [u8; 4]) -> Result<[u8; 6], &'static str> {
    let mut host_mac = None;
    for _ in 0..3 {
        let (mac, me) = (nic.mac, nic.me);
        nic.send(60, |f| arp(f, 1, mac, me, [0; 6], host))?;
        while let Some(frame) = nic.recv(500)? {
            let b = frame.bytes();
            if frame.ethertype() == ETH_ARP
                && b.len() >= 42
                && be16(b, 20) == 2
                && b[28..32] == host
                && b[32..38] == nic.mac
            {
                let mut m = [0u8; 6];
                m.copy_from_slice(&b[22..28]);
                host_mac = Some(m);
                break;
            }
        }
        if host_mac.is_some() {
            break;
        }
    }
    match host_mac {
        Some(mac) => Ok(mac),
        None => {
            println!("virtio-net: ARP: no reply for {} after 3 requests", Ip(host));
            Err("check failed (see above)")
        }
    }
}

/// A card that echoes one datagram with the host per call: the
/// snapshot sequence's network check (`host=`, `me=`, `udp-port=` as for
/// `virtio-net`).
pub struct Echoer {
    nic: Nic,
    host: [u8; 4],
    host_mac: [u8; 6],
    port: u16,
}

/// Brings up the first virtio-net card and finds the host.
pub fn echoer(ctx: &Context<'_>) -> Result<Echoer, Failure> {
    let host = ip_arg(ctx, "host", [10, 0, 2, 1])?;
    let me = ip_arg(ctx, "me", [10, 0, 2, 15])?;
    let port = arg(ctx.cmdline.number("udp-port"))?.unwrap_or(7777);
    let Ok(port) = u16::try_from(port) else {
        bad_args!("udp-port={port} is not a port");
    };
    let mut nic = bring_up(ctx, me, None)?;
    let host_mac = match resolve(&mut nic, host) {
        Ok(mac) => mac,
        Err(e) => fail!("virtio-net: {e}"),
    };
    Ok(Echoer {
        nic,
        host,
        host_mac,
        port,
    })
}

impl Echoer {
    /// Sends datagram `seq` (64 bytes of its pattern) and waits for its
    /// echo, checked byte by byte.
    pub fn round(&mut self, seq: u32) -> Result<(), &'static str> {
        self.nic.send_udp(self.host_mac, self.host, self.port, 64, seq)?;
        echo(&mut self.nic, self.host, self.port, 64, seq)
    }
}

/// Formats an error into a static-free message by printing it first.
macro_rules! check_fail {
    ($($arg:tt)*) => {{
        $crate::println!("virtio-net: {}", format_args!($($arg)*));
        return Err("check failed (see above)");
    }};
}

fn checks(nic: &mut Nic, host: [u8; 4], port: u16, burst: u64, flood: u64) -> Result<(), &'static str> {
    let hz = tsc::frequency().map_or(tsc::ticks_per_ms(1000), |(hz, _)| hz);
    // (1) ARP.
    let host_mac = resolve(nic, host)?;
    println!("virtio-net: ARP: {} is at {}", Ip(host), Mac(host_mac));

    // (2) ICMP echo.
    const ICMP_ID: u16 = 0x4b45;
    const ICMP_DATA: usize = 56;
    for seq in 1..=3u16 {
        nic.send_ipv4(host_mac, host, PROTO_ICMP, 8 + ICMP_DATA, |p| {
            p[0] = 8;
            p[1] = 0;
            put16(p, 2, 0);
            put16(p, 4, ICMP_ID);
            put16(p, 6, seq);
            for (i, byte) in p[8..].iter_mut().enumerate() {
                *byte = i as u8 ^ seq as u8;
            }
            let sum = csum_fold(csum_add(0, p));
            put16(p, 2, sum);
        })?;
        let start = tsc::now();
        loop {
            let Some(frame) = nic.recv(TIMEOUT_MS)? else {
                check_fail!("ICMP: no echo reply to seq {seq}");
            };
            let Some(ip) = parse_ipv4(frame.bytes())? else {
                continue;
            };
            if ip.proto != PROTO_ICMP || ip.src != host || ip.dst != nic.me {
                continue;
            }
            let p = &frame.bytes()[ip.start..ip.end];
            if p.len() < 8 || p[0] != 0 || be16(p, 4) != ICMP_ID || be16(p, 6) != seq {
                continue;
            }
            if csum_fold(csum_add(0, p)) != 0 {
                check_fail!("ICMP: bad checksum on the reply to seq {seq}");
            }
            let good =
                p.len() == 8 + ICMP_DATA && p[8..].iter().enumerate().all(|(i, &b)| b == i as u8 ^ seq as u8);
            if !good {
                check_fail!("ICMP: the reply to seq {seq} does not carry the request's data");
            }
            let us = tsc::now().wrapping_sub(start) * 1_000_000 / hz;
            println!(
                "virtio-net: ICMP: echo reply from {} seq {seq}, {ICMP_DATA} bytes, checksums good, ~{us} us",
                Ip(host)
            );
            break;
        }
    }

    // (3) UDP echo, many sizes.
    let mut seq = 0u32;
    let mut bytes = 0usize;
    for round in 0..3 {
        for &size in UDP_SIZES.iter() {
            let size = if round == 2 {
                1 + (size * 37 + 11) % 1472
            } else {
                size
            };
            seq += 1;
            nic.send_udp(host_mac, host, port, size, seq)?;
            echo(nic, host, port, size, seq)?;
            bytes += size;
        }
    }
    println!(
        "virtio-net: UDP: {seq} datagrams of 1..1472 bytes echoed intact by {}:{port} ({bytes} bytes)",
        Ip(host)
    );

    // (4) Backpressure: more echoes than posted buffers.
    const N: usize = RX_BUFS + 64;
    const SIZE: usize = 64;
    let base = seq + 1;
    nic.repost = false;
    for k in 0..N as u32 {
        nic.send_udp(host_mac, host, port, SIZE, base + k)?;
    }
    let mut seen = [false; N];
    let mut early = 0usize;
    let mut count = 0usize;
    let mut take = |frame: &Frame| -> Result<bool, &'static str> {
        let Some((start, end)) = udp_from(frame.bytes(), host, port)? else {
            return Ok(false);
        };
        let p = &frame.bytes()[start..end];
        if p.len() != SIZE {
            return Ok(false);
        }
        // Which datagram: the one whose pattern this is.
        let Some(k) = (0..N as u32).find(|&k| {
            p.iter()
                .enumerate()
                .all(|(i, &b)| b == pattern(base + k, SIZE, i))
        }) else {
            return Err("backpressure: an echo matches no datagram sent");
        };
        if core::mem::replace(&mut seen[k as usize], true) {
            return Err("backpressure: an echo arrived twice");
        }
        Ok(true)
    };
    while let Some(frame) = nic.recv(300)? {
        if take(&frame)? {
            early += 1;
            count += 1;
        }
    }
    let exhausted = nic.parked_len;
    if exhausted != RX_BUFS {
        check_fail!("backpressure: only {exhausted} of {RX_BUFS} receive buffers were used before the pause");
    }
    nic.unpark()?;
    while count < N {
        let Some(frame) = nic.recv(TIMEOUT_MS)? else {
            check_fail!(
                "backpressure: {} of {N} echoes lost ({early} before the buffers ran out)",
                N - count
            );
        };
        if take(&frame)? {
            count += 1;
        }
    }
    println!(
        "virtio-net: backpressure: {N} echoes, {early} while {RX_BUFS} buffers lasted, {} after reposting, none lost",
        N - early
    );
    seq = base + N as u32;

    // (5) Transmit flood: small frames back to back.
    let before = nic.tx_sent;
    let start = tsc::now();
    let mac = nic.mac;
    for k in 0..flood {
        nic.send(60, |f| {
            f.fill(0);
            f[0..6].copy_from_slice(&host_mac);
            f[6..12].copy_from_slice(&mac);
            put16(f, 12, ETH_FLOOD);
            f[14..22].copy_from_slice(&k.to_le_bytes());
        })?;
    }
    if !nic.flush_tx(TIMEOUT_MS) {
        check_fail!(
            "tx flood: {} of {flood} frames never completed",
            nic.tx_sent - nic.tx_done
        );
    }
    let ticks = tsc::now().wrapping_sub(start).max(1);
    println!(
        "virtio-net: tx flood: {} frames of 60 bytes completed (ring of {QUEUE_SIZE} wrapped {} times), {} frames/s",
        nic.tx_sent - before,
        flood / u64::from(QUEUE_SIZE),
        flood * hz / ticks
    );

    // UDP burst to the sink port, timed.
    let start = tsc::now();
    for k in 0..burst {
        nic.send_udp(host_mac, host, port + 1, 1472, seq.wrapping_add(k as u32))?;
    }
    if !nic.flush_tx(TIMEOUT_MS) {
        check_fail!(
            "UDP burst: {} of {burst} datagrams never completed",
            nic.tx_sent - nic.tx_done
        );
    }
    let ticks = tsc::now().wrapping_sub(start).max(1);
    println!(
        "virtio-net: UDP burst: {burst} datagrams of 1472 bytes to port {}: {} frames/s, {} Mbit/s of frames, {} Mbit/s of payload",
        port + 1,
        burst * hz / ticks,
        burst * MAX_FRAME as u64 * 8 * hz / ticks / 1_000_000,
        burst * 1472 * 8 * hz / ticks / 1_000_000
    );

    // (6) Receive bursts from the blaster, timed, with every buffer of the
    // ring posted.
    if burst == 0 {
        return Ok(());
    }
    for slot in RX_BUFS..RX_RING_BUFS {
        nic.post_rx(slot)?;
    }
    nic.rxq.kick(&nic.transport);
    let count = burst.min(RX_BURST_MAX as u64) as u32;
    let mut failed = false;
    for size in RX_BURST_SIZES {
        let run = rx_burst(nic, host, host_mac, port + 2, count, size)?;
        run.report(hz);
        failed |= !run.intact();
    }
    if failed {
        check_fail!("rx burst: nothing received, or a datagram malformed or duplicated (see above)");
    }
    Ok(())
}

/// What one receive burst got.
#[derive(Default)]
struct RxBurst {
    count: u32,
    size: usize,
    requests: u32,
    /// Distinct intact datagrams of the last request.
    received: u32,
    first_seq: u32,
    last_seq: u32,
    max_seq: u32,
    /// Received after one with a higher sequence number.
    out_of_order: u32,
    malformed: u32,
    duplicates: u32,
    /// Intact but of an earlier request (or burst).
    stale: u32,
    /// TSC at the first and the last datagram received.
    first: u64,
    last: u64,
}

impl RxBurst {
    /// Passes with at least one datagram, and none malformed or twice.
    fn intact(&self) -> bool {
        self.received > 0 && self.malformed == 0 && self.duplicates == 0
    }

    /// Rates over the time from the first datagram to the last (the
    /// request's round trip left out): `received - 1` frames in it.
    fn report(&self, hz: u64) {
        let ticks = self.last.wrapping_sub(self.first);
        let frames = u64::from(self.received.saturating_sub(1));
        let frame_len = (14 + 20 + 8 + self.size).max(60) as u64;
        let (fps, bits, payload_bits) = match ticks {
            0 => (0, 0, 0),
            t => (
                frames * hz / t,
                frames * frame_len * 8 * hz / t / 1_000_000,
                frames * self.size as u64 * 8 * hz / t / 1_000_000,
            ),
        };
        println!(
            "virtio-net: rx burst: received {} of {} datagrams of {} bytes in {} us: {fps} frames/s, {bits} Mbit/s of frames, {payload_bits} Mbit/s of payload (seq {}..{}, {} out of order, {} malformed, {} duplicates, {} stale, {} request{})",
            self.received,
            self.count,
            self.size,
            ticks * 1_000_000 / hz,
            self.first_seq,
            self.last_seq,
            self.out_of_order,
            self.malformed,
            self.duplicates,
            self.stale,
            self.requests,
            if self.requests == 1 { "" } else { "s" }
        );
    }
}

/// One frame of a receive burst, as [`blast_datagram`] finds it.
enum Blasted {
    /// Not a datagram from the blaster.
    Other,
    /// Intact, of another run.
    Stale,
    Malformed,
    /// Intact: its sequence number.
    Good(u32),
}

/// Classifies frame `b`: a datagram of the blaster at `host:port` for run
/// `run_id` carries the run id, its sequence number below `count` (both
/// big-endian) and [`pattern`] `seq + run_id` from byte 8 on, `size` bytes
/// in all.
fn blast_datagram(b: &[u8], host: [u8; 4], port: u16, run_id: u32, count: u32, size: usize) -> Blasted {
    let (start, end) = match udp_from(b, host, port) {
        Ok(Some(range)) => range,
        Ok(None) => return Blasted::Other,
        Err(_) => return Blasted::Malformed,
    };
    let p = &b[start..end];
    if p.len() < 8 {
        return Blasted::Malformed;
    }
    let id = u32::from_be_bytes([p[0], p[1], p[2], p[3]]);
    let seq = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
    let key = seq.wrapping_add(id);
    let intact = p
        .iter()
        .enumerate()
        .skip(8)
        .all(|(i, &x)| x == pattern(key, p.len(), i));
    if !intact {
        Blasted::Malformed
    } else if id != run_id {
        Blasted::Stale
    } else if p.len() != size || seq >= count {
        Blasted::Malformed
    } else {
        Blasted::Good(seq)
    }
}

/// Asks the blaster at `host:port` for `count` datagrams of `size` bytes
/// and takes them as they come, reposting each buffer at once and kicking
/// every 32 (or when the ring looks empty). Ends with all of them, or
/// [`RX_QUIET_MS`] after the last frame; asks again (a new run) up to
/// twice when nothing arrives in [`TIMEOUT_MS`].
fn rx_burst(
    nic: &mut Nic,
    host: [u8; 4],
    host_mac: [u8; 6],
    port: u16,
    count: u32,
    size: usize,
) -> Result<RxBurst, &'static str> {
    let mut run = RxBurst {
        count,
        size,
        ..RxBurst::default()
    };
    let mut seen = [0u64; RX_BURST_MAX / 64];
    let quiet = tsc::ticks_per_ms(RX_QUIET_MS);
    let first_wait = tsc::ticks_per_ms(TIMEOUT_MS);
    let cap = tsc::ticks_per_ms(RX_BURST_CAP_MS);
    let start = tsc::now();
    while run.received == 0 && run.requests < 3 && tsc::now().wrapping_sub(start) < cap {
        let run_id = (tsc::now() as u32) ^ ((size as u32) << 20);
        run.requests += 1;
        nic.send_udp_with(host_mac, host, port, RX_BURST_REQUEST, |p| {
            p[0..4].copy_from_slice(&RX_BURST_MAGIC);
            p[4..8].copy_from_slice(&run_id.to_be_bytes());
            p[8..12].copy_from_slice(&count.to_be_bytes());
            p[12..16].copy_from_slice(&(size as u32).to_be_bytes());
        })?;
        let asked = tsc::now();
        let mut last_frame = asked;
        let mut unkicked = 0usize;
        loop {
            while let Some((id, len)) = nic.rxq.poll() {
                let now = tsc::now();
                last_frame = now;
                let slot = usize::from(nic.rx_slot_of[usize::from(id)]);
                let len = len as usize;
                if !(HDR..=RX_BUF_LEN).contains(&len) {
                    return Err("receive buffer used with a bad length");
                }
                let buffer = nic.rx.slice(slot * RX_BUF_LEN + HDR, len - HDR);
                let b = buffer.bytes();
                match blast_datagram(b, host, port, run_id, count, size) {
                    Blasted::Good(seq) => {
                        let (word, bit) = (seq as usize / 64, 1u64 << (seq % 64));
                        if seen[word] & bit != 0 {
                            run.duplicates += 1;
                        } else {
                            seen[word] |= bit;
                            if run.received == 0 {
                                run.first = now;
                                run.first_seq = seq;
                            } else if seq < run.max_seq {
                                run.out_of_order += 1;
                            }
                            run.max_seq = run.max_seq.max(seq);
                            run.last_seq = seq;
                            run.last = now;
                            run.received += 1;
                        }
                    }
                    Blasted::Stale => run.stale += 1,
                    Blasted::Malformed => run.malformed += 1,
                    Blasted::Other => {
                        nic.answer_arp(b)?;
                    }
                }
                nic.post_rx(slot)?;
                unkicked += 1;
                if unkicked == 32 {
                    nic.rxq.kick(&nic.transport);
                    unkicked = 0;
                }
            }
            if unkicked > 0 {
                nic.rxq.kick(&nic.transport);
                unkicked = 0;
            }
            if run.received == count {
                break;
            }
            let now = tsc::now();
            let waited_out = if run.received == 0 {
                now.wrapping_sub(asked) > first_wait
            } else {
                now.wrapping_sub(last_frame) > quiet
            };
            if waited_out || now.wrapping_sub(start) > cap {
                break;
            }
            core::hint::spin_loop();
        }
    }
    Ok(run)
}

/// Waits for the echo of datagram `seq` and checks every byte.
fn echo(nic: &mut Nic, host: [u8; 4], port: u16, size: usize, seq: u32) -> Result<(), &'static str> {
    loop {
        let Some(frame) = nic.recv(TIMEOUT_MS)? else {
            check_fail!("UDP: no echo of datagram {seq} ({size} bytes)");
        };
        let Some((start, end)) = udp_from(frame.bytes(), host, port)? else {
            continue;
        };
        let p = &frame.bytes()[start..end];
        if p.len() != size {
            check_fail!("UDP: echo of datagram {seq} is {} bytes, sent {size}", p.len());
        }
        if let Some(i) = (0..size).find(|&i| p[i] != pattern(seq, size, i)) {
            check_fail!(
                "UDP: echo of datagram {seq} ({size} bytes) differs at byte {i}: {:#04x}, sent {:#04x}",
                p[i],
                pattern(seq, size, i)
            );
        }
        return Ok(());
    }
}
