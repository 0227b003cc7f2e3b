//! The vsock device driven through the test guest driver, with real Unix
//! sockets in a temporary directory standing in for host programs.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::GuestMemoryMmap;
use event_manager::{EventManager, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::packet::{op, Header, HDR_SIZE, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::*;
use crate::device::{RecordingInterrupt, StopSignal, VirtioSignal};
use crate::guest_driver::{memory, Buf, DriverQueue, DATA};

const CID: u64 = 3;
const RX_BUFS: u16 = 16;
const RX_BUF_LEN: u32 = 4096 + HDR_SIZE as u32;
const TX_AREA: u64 = DATA + 0x40_0000;
const GUEST_BUF_ALLOC: u32 = 1 << 20;

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("keel-vsock-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The guest: three queues, rx buffers kept posted, and a view of what the
/// device sent.
struct Guest<'a> {
    mem: &'a GuestMemoryMmap,
    rx: DriverQueue<'a>,
    tx: DriverQueue<'a>,
    notify: Vec<EventFd>,
    interrupt: Arc<RecordingInterrupt>,
    event_loop: EventManager<Arc<Mutex<Vsock>>>,
    vsock: Arc<Mutex<Vsock>>,
    rx_addrs: HashMap<u16, u64>,
    rx_seen: u16,
    rx_slot: u64,
    tx_slot: u64,
    /// Bytes received per (guest port, host port): the guest's fwd_cnt.
    received: HashMap<(u32, u32), u32>,
    /// Whether `recv` gives used rx buffers back.
    repost: bool,
    path: PathBuf,
    _dir: TempDir,
}

fn guest(mem: &GuestMemoryMmap) -> Guest<'_> {
    guest_with(mem, VsockOptions::default(), RX_BUFS)
}

fn guest_with(mem: &GuestMemoryMmap, options: VsockOptions, rx_bufs: u16) -> Guest<'_> {
    let dir = TempDir::new();
    let path = dir.0.join("v.sock");
    let vsock = Arc::new(Mutex::new(Vsock::new(CID, &path, options).unwrap()));
    let rx = DriverQueue::at(mem, GuestAddress(0x1000), 64).unwrap();
    let tx = DriverQueue::at(mem, GuestAddress(0x4000), 64).unwrap();
    let ev = DriverQueue::at(mem, GuestAddress(0x7000), 64).unwrap();
    let notify: Vec<EventFd> = (0..3)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    let interrupt = Arc::new(RecordingInterrupt::new());
    let mut event_loop = EventManager::new().unwrap();
    event_loop.add_subscriber(vsock.clone());
    vsock
        .lock()
        .unwrap()
        .activate(Activation {
            mem: mem.clone(),
            queues: vec![rx.queue().unwrap(), tx.queue().unwrap(), ev.queue().unwrap()],
            queue_events: notify.iter().map(|e| e.try_clone().unwrap()).collect(),
            interrupt: interrupt.clone(),
            stop: StopSignal::new(),
        })
        .unwrap();
    let mut g = Guest {
        mem,
        rx,
        tx,
        notify,
        interrupt,
        event_loop,
        vsock,
        rx_addrs: HashMap::new(),
        rx_seen: 0,
        rx_slot: 0,
        tx_slot: 0,
        received: HashMap::new(),
        repost: true,
        path,
        _dir: dir,
    };
    for _ in 0..rx_bufs {
        g.post_rx();
    }
    g.pump();
    g
}

impl Guest<'_> {
    fn post_rx(&mut self) {
        let addr = DATA + (self.rx_slot % 32) * 0x2000;
        self.rx_slot += 1;
        let head = self.rx.add(&[Buf::writable(addr, RX_BUF_LEN)]).unwrap();
        self.rx_addrs.insert(head, addr);
        self.notify[0].write(1).unwrap();
    }

    /// Runs the event loop until it has nothing left to do.
    fn pump(&mut self) {
        for _ in 0..500 {
            if self.event_loop.run_with_timeout(20).unwrap() == 0 {
                return;
            }
        }
        panic!("the device keeps the event loop busy");
    }

    fn header(&self, op: u16, guest_port: u32, host_port: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: guest_port,
            dst_port: host_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: GUEST_BUF_ALLOC,
            fwd_cnt: self.received.get(&(guest_port, host_port)).copied().unwrap_or(0),
            ..Header::default()
        }
    }

    /// Puts a tx chain (header and payload in two descriptors) in the queue.
    fn send_raw(&mut self, header: &[u8], payload: &[u8]) -> u16 {
        let addr = TX_AREA + (self.tx_slot % 32) * 0x2_0000;
        self.tx_slot += 1;
        self.mem.write_slice(header, GuestAddress(addr)).unwrap();
        self.mem
            .write_slice(payload, GuestAddress(addr + 0x1000))
            .unwrap();
        let mut bufs = vec![Buf::readable(addr, header.len() as u32)];
        if !payload.is_empty() {
            bufs.push(Buf::readable(addr + 0x1000, payload.len() as u32));
        }
        let head = self.tx.add(&bufs).unwrap();
        self.notify[1].write(1).unwrap();
        head
    }

    fn send(&mut self, hdr: Header, payload: &[u8]) {
        let mut hdr = hdr;
        hdr.len = payload.len() as u32;
        self.send_raw(&hdr.encode(), payload);
        self.pump();
    }

    fn send_op(&mut self, op: u16, guest_port: u32, host_port: u32) {
        let hdr = self.header(op, guest_port, host_port);
        self.send(hdr, &[]);
    }

    fn send_data(&mut self, guest_port: u32, host_port: u32, data: &[u8]) {
        for chunk in data.chunks(4096) {
            let hdr = self.header(op::RW, guest_port, host_port);
            self.send(hdr, chunk);
        }
    }

    /// Packets the device put in the rx queue since the last call; their
    /// buffers go back to the device.
    fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        self.pump();
        let mut packets = Vec::new();
        while self.rx_seen != self.rx.used_idx() {
            let (head, len) = self.rx.used_entry(self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let addr = self.rx_addrs[&(head as u16)];
            let mut bytes = vec![0u8; len as usize];
            self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
            let hdr = Header::decode(&bytes).expect("the device wrote a whole header");
            assert_eq!(
                hdr.len as usize,
                bytes.len() - HDR_SIZE,
                "len matches the bytes written"
            );
            assert_eq!(
                (hdr.src_cid, hdr.dst_cid, hdr.type_),
                (HOST_CID, CID, TYPE_STREAM)
            );
            if hdr.op == op::RW {
                *self.received.entry((hdr.dst_port, hdr.src_port)).or_insert(0) += hdr.len;
            }
            packets.push((hdr, bytes[HDR_SIZE..].to_vec()));
            if self.repost {
                self.post_rx();
            }
        }
        if !packets.is_empty() {
            self.pump();
        }
        packets
    }

    fn recv_one(&mut self) -> (Header, Vec<u8>) {
        let mut packets = self.recv();
        assert_eq!(packets.len(), 1, "{packets:?}");
        packets.remove(0)
    }

    fn connections(&self) -> usize {
        self.vsock.lock().unwrap().connection_count()
    }

    /// A host program connecting with `CONNECT <port>`, accepted by the
    /// guest: the stream after `OK` and the host port.
    fn host_connect(&mut self, guest_port: u32) -> (UnixStream, u32) {
        let mut host = UnixStream::connect(&self.path).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        host.write_all(format!("CONNECT {guest_port}\n").as_bytes())
            .unwrap();
        self.pump();
        let (req, _) = self.recv_one();
        assert_eq!((req.op, req.dst_port), (op::REQUEST, guest_port));
        assert!(req.src_port >= 1 << 30);
        self.send_op(op::RESPONSE, guest_port, req.src_port);
        let expected = format!("OK {}\n", req.src_port);
        let mut line = vec![0u8; expected.len()];
        host.read_exact(&mut line).unwrap();
        assert_eq!(String::from_utf8(line).unwrap(), expected);
        (host, req.src_port)
    }

    /// A guest connection to host port `port`, accepted on `PATH_port`.
    fn guest_connect(&mut self, listener: &UnixListener, guest_port: u32, port: u32) -> UnixStream {
        self.send_op(op::REQUEST, guest_port, port);
        let (rsp, _) = self.recv_one();
        assert_eq!(
            (rsp.op, rsp.src_port, rsp.dst_port),
            (op::RESPONSE, port, guest_port)
        );
        let (stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        stream
    }

    fn listen(&self, port: u32) -> UnixListener {
        UnixListener::bind(format!("{}_{port}", self.path.display())).unwrap()
    }
}

fn checksum(data: &[u8]) -> u64 {
    // FNV-1a.
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn config_space_is_the_guest_cid_and_the_device_type_is_19() {
    let dir = TempDir::new();
    let v = Vsock::new(0x1_0203, dir.0.join("s"), VsockOptions::default()).unwrap();
    assert_eq!(v.device_type(), 19);
    assert_eq!(v.queue_max_sizes().len(), 3);
    let mut cfg = [0xffu8; 8];
    v.read_config(0, &mut cfg);
    assert_eq!(cfg, 0x1_0203u64.to_le_bytes());
    let mut high = [0xffu8; 4];
    v.read_config(4, &mut high);
    assert_eq!(high, [0; 4]);
}

#[test]
fn reserved_cids_and_empty_limits_are_rejected() {
    let dir = TempDir::new();
    for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 40] {
        let err = Vsock::new(cid, dir.0.join("s"), VsockOptions::default()).unwrap_err();
        assert!(matches!(err, VsockError::InvalidCid(c) if c == cid), "{err}");
    }
    let options = VsockOptions {
        max_connections: 0,
        ..VsockOptions::default()
    };
    assert!(matches!(
        Vsock::new(3, dir.0.join("s"), options),
        Err(VsockError::InvalidOptions(_))
    ));
}

#[test]
fn host_initiated_connect_gets_ok_and_carries_data_both_ways() {
    let mem = memory().unwrap();
    let mut g = guest(&mem);
    let (mut host, port) = g.host_connect(52);
    assert_eq!(g.connections(), 1);

    host.write_all(b"ping").unwrap();
    let (rw, data) = g.recv_one();
    assert_eq!(
        (rw.op, rw.src_port, rw.dst_port, data.as_slice()),
        (op::RW, port, 52, &b"ping"[..])
    );

    g.send_data(52, port, b"pong");
    let mut reply = [0u8; 4];
    host.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"pong");
    assert!(!g.interrupt.signals().contains(&VirtioSignal::NeedsReset));
}

#[test]
fn bytes_after_the_connect_line_reach_the_guest_once_it_accepts() {
    let mem = memory().unwrap();
    let mut g = guest(&mem);
    let mut host = UnixStream::connect(&g.path).unwrap();
    host.write_all(b"CONNECT 7\nearly").unwrap();
    g.pump();
    let (req, _) = g.recv_one();
    assert_eq!(req.op, op::REQUEST);
    g.send_op(op::RESPONSE, 7, req.src_port);
    let (rw, data) = g.recv_one();
    assert_eq!((rw.op, data.as_slice()), (op::RW, &b"early"[..]));
}

#[test]
fn host_connect_refused_by_the_guest_closes_the_socket() {
    let mem = memory().unwrap();
    let mut g = guest(&mem);
    let mut host = UnixStream::connect(&g.path).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    host.write_all(b"CONNECT 99\n").unwrap();
    g.pump();
    let (req, _) = g.recv_one();
    g.send_op(op::RST, 99, req.src_port);
    let mut buf = [0u8; 8];
    assert_eq!(host.read(&mut buf).unwrap(), 0, "closed without OK");
    assert_eq!(g.connections(), 0);
}

#[test]
fn malformed_or_overlong_connect_lines_close_the_socket() {
    let mem = memory().unwrap();
    let mut g = guest(&mem);
    for line in [&b"HELLO 5\n"[..], &[b'9'; 64][..]] {
        let mut host = UnixStream::connect(&g.path).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        host.write_all(line).unwrap();
        g.pump();
        let mut buf = [0u8; 8];
        assert!(matches!(host.read(&mut buf), Ok(0) | Err(_)));
    }
    assert!(g.recv().is_empty(), "nothing reached the guest");
}

#[test]
fn guest_initiated_connection_reaches_path_underscore_port() {
    let mem = memory().unwrap();
    let mut g = guest(&mem);
    let listener = g.listen(1234);
    let mut host = g.guest_connect(&listener, 40000, 1234);
    g.send_data(40000, 1234, b"hello host");
    let mut buf = [0u8; 10];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello host");
    host.write_all(b"hello guest").unwrap();
    let (rw, data) = g.recv_one();
    assert_eq!(
        (rw.src_port, rw.dst_port, data.as_slice()),
        (1234, 40000, &b"hello guest"[..])
    );
}

#[test]
fn guest_connect_to_a_missing_socket_is_reset() {
    let mem = memory().unwrap();
    let mut g = guest(&mem);
    g.send_op(op::REQUEST, 5000, 8080);
    let (rst, _) = g.recv_one();
    assert_eq!((rst.op, rst.src_port, rst.dst_port), (op::RST, 8080, 5000));
    assert_eq!(g.connections(), 0);
}

#[test]
fn several_connections_carry_data_both_ways_with_checksums() {
    let mem = memory().unwrap();
    let mut g = guest(&mem);
    const LEN: usize = 48 * 1024;
    let mut hosts = Vec::new();
    let listener = g.listen(700);
    for i in 0..3u32 {
        hosts.push((g.guest_connect(&listener, 2000 + i, 700), 2000 + i, 700));
    }
    for i in 0..2u32 {
        let (stream, port) = g.host_connect(90 + i);
        hosts.push((stream, 90 + i, port));
    }
    // Host to guest, all at once.
    for (n, (stream, _, _)) in hosts.iter_mut().enumerate() {
        stream.write_all(&pattern(n as u8, LEN)).unwrap();
    }
    let mut got: HashMap<(u32, u32), Vec<u8>> = HashMap::new();
    for _ in 0..200 {
        for (hdr, data) in g.recv() {
            assert_eq!(hdr.op, op::RW);
            got.entry((hdr.dst_port, hdr.src_port)).or_default().extend(data);
        }
        if got.values().map(Vec::len).sum::<usize>() == LEN * hosts.len() {
            break;
        }
    }
    for (n, (_, guest_port, host_port)) in hosts.iter().enumerate() {
        let data = &got[&(*guest_port, *host_port)];
        assert_eq!(
            (data.len(), checksum(data)),
            (LEN, checksum(&pattern(n as u8, LEN)))
        );
    }
    // Guest to host, interleaved by chunk.
    for chunk in 0..LEN / 4096 {
        for (n, &(_, guest_port, host_port)) in hosts.iter().enumerate() {
            let data = pattern(100 + n as u8, LEN);
            g.send_data(guest_port, host_port, &data[chunk * 4096..(chunk + 1) * 4096]);
        }
        let _credit_updates = g.recv();
    }
    for (n, (stream, _, _)) in hosts.iter_mut().enumerate() {
        let mut data = vec![0u8; LEN];
        stream.read_exact(&mut data).unwrap();
        assert_eq!(checksum(&data), checksum(&pattern(100 + n as u8, LEN)));
    }
    assert_eq!(g.connections(), 5);
}

#[test]
fn data_to_the_guest_waits_for_its_credit() {
    let mem = memory().unwrap();
    let mut g = guest(&mem);
    let listener = g.listen(1);
    let mut hdr = g.header(op::REQUEST, 10, 1);
    hdr.buf_alloc = 100;
    g.send(hdr, &[]);
    let (rsp, _) = g.recv_one();
    assert_eq!(rsp.op, op::RESPONSE);
    let (mut host, _) = listener.accept().unwrap();
    host.write_all(&[5; 1000]).unwrap();
    let (rw, _) = g.recv_one();
    assert_eq!(rw.len, 100, "only the credit the guest gave");
    assert!(g.recv().is_empty());
    // The guest consumed those 100 bytes.
    let mut update = g.header(op::CREDIT_UPDATE, 10, 1);
    update.buf_alloc = 100;
    g.send(update, &[]);
    let (rw, _) = g.recv_one();
    assert_eq!(rw.len, 100);
}

#[test]
fn credit_request_gets_a_credit_update_with_our_buffer() {
    let mem = memory().unwrap();
    let mut g = guest(&mem);
    let listener = g.listen(1);
    let _host = g.guest_connect(&listener, 10, 1);
    g.send_op(op::CREDIT_REQUEST, 10, 1);
    let (upd, _) = g.recv_one();
    assert_eq!(
        (upd.op, upd.buf_alloc, upd.fwd_cnt),
        (op::CREDIT_UPDATE, VsockOptions::default().buf_alloc, 0)
    );
}

#[test]
fn guest_data_past_our_credit_resets_the_connection() {
    let mem = memory().unwrap();
    let options = VsockOptions {
        buf_alloc: 4096,
        ..VsockOptions::default()
    };
    let mut g = guest_with(&mem, options, RX_BUFS);
    let listener = g.listen(1);
    let _host = g.guest_connect(&listener, 10, 1);
    // The host program never reads; the kernel buffer takes some, then
    // our 4 KiB, then the guest is over its credit.
    let mut reset = false;
    for _ in 0..200 {
        g.send_data(10, 1, &[1; 4096]);
        if g.recv().iter().any(|(h, _)| h.op == op::RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "an overrunning guest is reset");
    assert_eq!(g.connections(), 0);
}

#[test]
fn host_close_sends_shutdown_and_the_guest_rst_ends_the_connection() {
    let mem = memory().unwrap();
    let mut g = guest(&mem);
    let (mut host, port) = g.host_connect(52);
    host.write_all(b"last words").unwrap();
    drop(host);
    let packets = g.recv();
    let ops: Vec<u16> = packets.iter().map(|(h, _)| h.op).collect();
    assert_eq!(ops, [op::RW, op::SHUTDOWN]);
    assert_eq!(packets[0].1, b"last words");
    assert_eq!(packets[1].0.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    assert_eq!(g.connections(), 1);
    g.send_op(op::RST, 52, port);
    assert_eq!(g.connections(), 0);
}

#[test]
fn guest_shutdown_of_its_send_side_half_closes_the_host_socket() {
    let mem = memory().unwrap();
    let mut g = guest(&mem);
    let listener = g.listen(3);
    let mut host = g.guest_connect(&listener, 10, 3);
    g.send_data(10, 3, b"abc");
    let mut hdr = g.header(op::SHUTDOWN, 10, 3);
    hdr.flags = SHUTDOWN_SEND;
    g.send(hdr, &[]);
    let mut all = Vec::new();
    host.read_to_end(&mut all).unwrap();
    assert_eq!(all, b"abc", "data, then EOF");
    // The other direction still works.
    host.write_all(b"reply").unwrap();
    let (rw, data) = g.recv_one();
    assert_eq!((rw.op, data.as_slice()), (op::RW, &b"reply"[..]));
    // Shutting down the rest ends in RST.
    hdr.flags = SHUTDOWN_RCV;
    g.send(hdr, &[]);
    let (rst, _) = g.recv_one();
    assert_eq!(rst.op, op::RST);
    assert_eq!(g.connections(), 0);
}

#[test]
fn packets_for_unknown_connections_are_reset_but_rst_is_not() {
    let mem = memory().unwrap();
    let mut g = guest(&mem);
    for op in [
        op::RW,
        op::RESPONSE,
        op::SHUTDOWN,
        op::CREDIT_UPDATE,
        op::CREDIT_REQUEST,
    ] {
        let hdr = g.header(op, 11, 22);
        let payload: &[u8] = if op == op::RW { b"x" } else { b"" };
        g.send(hdr, payload);
        let (rst, _) = g.recv_one();
        assert_eq!((rst.op, rst.src_port, rst.dst_port), (op::RST, 22, 11));
    }
    g.send_op(op::RST, 11, 22);
    assert!(g.recv().is_empty());
}

#[test]
fn too_many_connections_are_refused() {
    let mem = memory().unwrap();
    let options = VsockOptions {
        max_connections: 2,
        ..VsockOptions::default()
    };
    let mut g = guest_with(&mem, options, RX_BUFS);
    let listener = g.listen(1);
    let _a = g.guest_connect(&listener, 10, 1);
    let _b = g.guest_connect(&listener, 11, 1);
    g.send_op(op::REQUEST, 12, 1);
    let (rst, _) = g.recv_one();
    assert_eq!((rst.op, rst.dst_port), (op::RST, 12));
    // Host programs are turned away too.
    let mut host = UnixStream::connect(&g.path).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = host.write_all(b"CONNECT 5\n");
    g.pump();
    let mut buf = [0u8; 4];
    assert!(matches!(host.read(&mut buf), Ok(0) | Err(_)));
    assert_eq!(g.connections(), 2);
}

#[test]
fn hostile_tx_chains_are_dropped_or_reset_and_never_written() {
    let mem = memory().unwrap();
    let mut g = guest(&mem);
    let good = g.header(op::REQUEST, 1, 2);

    // A short header: dropped.
    g.send_raw(&good.encode()[..10], &[]);
    // A length past the chain: reset.
    let mut h = g.header(op::RW, 1, 2);
    h.len = 5000;
    g.send_raw(&h.encode(), &[0; 100]);
    // A spoofed source CID and a foreign destination: dropped.
    let mut h = good;
    h.src_cid = 4;
    g.send_raw(&h.encode(), &[]);
    let mut h = good;
    h.dst_cid = 7;
    g.send_raw(&h.encode(), &[]);
    // An unknown op and a non-stream type: reset.
    let mut h = good;
    h.op = 42;
    g.send_raw(&h.encode(), &[]);
    let mut h = good;
    h.type_ = 2;
    g.send_raw(&h.encode(), &[]);
    // A writable buffer in a tx chain is never written.
    mem.write_slice(&[0xaa; 64], GuestAddress(DATA + 0x80_0000))
        .unwrap();
    let addr = TX_AREA + 0x10_0000;
    mem.write_slice(&good.encode(), GuestAddress(addr)).unwrap();
    g.tx.add(&[
        Buf::readable(addr, HDR_SIZE as u32),
        Buf::writable(DATA + 0x80_0000, 64),
    ])
    .unwrap();
    g.notify[1].write(1).unwrap();

    let packets = g.recv();
    let rsts = packets.iter().filter(|(h, _)| h.op == op::RST).count();
    assert_eq!(
        rsts,
        3 + 1,
        "three bad packets reset, plus the REQUEST to a missing socket"
    );
    assert_eq!(packets.len(), 4);
    let mut untouched = [0u8; 64];
    mem.read_slice(&mut untouched, GuestAddress(DATA + 0x80_0000))
        .unwrap();
    assert_eq!(untouched, [0xaa; 64]);
    assert!(g.tx.used().iter().all(|&(_, len)| len == 0));
    assert_eq!(g.tx.used().len(), 7);
    assert!(!g.interrupt.signals().contains(&VirtioSignal::NeedsReset));
}

#[test]
fn rx_buffers_too_small_for_a_header_are_returned_empty() {
    let mem = memory().unwrap();
    let mut g = guest_with(&mem, VsockOptions::default(), 0);
    let head = g.rx.add(&[Buf::writable(DATA, 10)]).unwrap();
    g.rx_addrs.insert(head, DATA);
    g.send_op(op::REQUEST, 1, 2);
    g.pump();
    assert_eq!(g.rx.used(), [(u32::from(head), 0)]);
    // The RST waits for a proper buffer.
    g.rx_seen = 1;
    g.post_rx();
    let (rst, _) = g.recv_one();
    assert_eq!(rst.op, op::RST);
}

#[test]
fn without_rx_buffers_the_host_socket_is_not_drained() {
    let mem = memory().unwrap();
    let options = VsockOptions {
        rx_buffer_bytes: 1024,
        ..VsockOptions::default()
    };
    let mut g = guest_with(&mem, options, 1);
    let listener = g.listen(1);
    let mut host = g.guest_connect(&listener, 10, 1);
    g.repost = false;
    g.recv(); // the buffer the RESPONSE used is back
              // One rx buffer: one packet, at most the 1 KiB staged; the rest stays
              // in the socket until the guest gives more buffers.
    host.write_all(&[9; 8192]).unwrap();
    let packets = g.recv();
    assert_eq!(packets.len(), 1);
    assert_eq!(packets[0].1.len(), 1024);
    assert!(g.recv().is_empty(), "no buffers, no packets");
    let mut total = 1024;
    for _ in 0..40 {
        for _ in 0..4 {
            g.post_rx();
        }
        total += g.recv().iter().map(|(_, d)| d.len()).sum::<usize>();
    }
    assert_eq!(total, 8192);
}

#[test]
fn host_close_with_guest_bytes_still_queued_resets_without_spinning() {
    let mem = memory().unwrap();
    let mut g = guest(&mem);
    let listener = g.listen(4);
    let host = g.guest_connect(&listener, 10, 4);
    // The host program reads nothing: the socket fills and the device
    // keeps the rest, waiting for the socket to become writable.
    g.repost = false;
    for _ in 0..60 {
        g.send_data(10, 4, &[3; 4096]);
    }
    g.recv();
    drop(host);
    // No rx buffers may be left for the RST: the hung-up socket must not
    // keep the event loop busy (`pump` panics if it does).
    g.pump();
    g.repost = true;
    for _ in 0..4 {
        g.post_rx();
    }
    let packets = g.recv();
    assert!(
        packets
            .iter()
            .any(|(h, _)| h.op == op::RST || h.op == op::SHUTDOWN),
        "{packets:?}"
    );
    if packets.iter().any(|(h, _)| h.op == op::SHUTDOWN) {
        g.send_op(op::RST, 10, 4);
    }
    assert_eq!(g.connections(), 0);
}

#[test]
fn silent_host_programs_and_unanswered_requests_time_out() {
    let mem = memory().unwrap();
    let options = VsockOptions {
        connect_timeout: Duration::from_millis(100),
        ..VsockOptions::default()
    };
    let mut g = guest_with(&mem, options, RX_BUFS);
    // A host program that never sends its CONNECT line.
    let mut silent = UnixStream::connect(&g.path).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // One whose REQUEST the guest never answers.
    let mut waiting = UnixStream::connect(&g.path).unwrap();
    waiting.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    waiting.write_all(b"CONNECT 77\n").unwrap();
    g.pump();
    let (req, _) = g.recv_one();
    assert_eq!(req.op, op::REQUEST);

    std::thread::sleep(Duration::from_millis(250));
    g.pump();
    let (rst, _) = g.recv_one();
    assert_eq!((rst.op, rst.src_port, rst.dst_port), (op::RST, req.src_port, 77));
    let mut buf = [0u8; 4];
    assert!(matches!(silent.read(&mut buf), Ok(0) | Err(_)));
    assert!(matches!(waiting.read(&mut buf), Ok(0) | Err(_)));
    assert_eq!(g.connections(), 0);
    // With nothing pending the timer stops: the loop goes quiet.
    std::thread::sleep(Duration::from_millis(150));
    g.pump();
    assert_eq!(g.event_loop.run_with_timeout(150).unwrap(), 0);
}

#[test]
fn device_reset_closes_every_connection() {
    let mem = memory().unwrap();
    let mut g = guest(&mem);
    let (mut host, _) = g.host_connect(52);
    assert!(g.vsock.lock().unwrap().reset());
    g.pump();
    let mut buf = [0u8; 4];
    assert!(matches!(host.read(&mut buf), Ok(0) | Err(_)));
    assert_eq!(g.connections(), 0);
}

#[test]
fn a_restored_vsock_tells_the_driver_its_connections_are_gone() {
    let mem = memory().unwrap();
    let dir = TempDir::new();
    let vsock = Arc::new(Mutex::new(
        Vsock::new(CID, dir.0.join("v.sock"), VsockOptions::default()).unwrap(),
    ));
    // What a snapshot saved of an active device: queue positions, no data.
    assert!(vsock.lock().unwrap().save_state().unwrap().data.is_empty());
    vsock.lock().unwrap().restore_state(&[]).unwrap();
    assert!(vsock.lock().unwrap().restore_state(&[1]).is_err());

    let rx = DriverQueue::at(&mem, GuestAddress(0x1000), 64).unwrap();
    let tx = DriverQueue::at(&mem, GuestAddress(0x4000), 64).unwrap();
    let mut ev = DriverQueue::at(&mem, GuestAddress(0x7000), 64).unwrap();
    let event_buf = DATA + 0x10_0000;
    mem.write_obj(0xffff_ffff_u32, GuestAddress(event_buf)).unwrap();
    ev.add(&[Buf::writable(event_buf, 8)]).unwrap();
    let notify: Vec<EventFd> = (0..3)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    let interrupt = Arc::new(RecordingInterrupt::new());
    let mut event_loop = EventManager::new().unwrap();
    event_loop.add_subscriber(vsock.clone());
    vsock
        .lock()
        .unwrap()
        .activate(Activation {
            mem: mem.clone(),
            queues: vec![rx.queue().unwrap(), tx.queue().unwrap(), ev.queue().unwrap()],
            queue_events: notify.iter().map(|e| e.try_clone().unwrap()).collect(),
            interrupt: interrupt.clone(),
            stop: StopSignal::new(),
        })
        .unwrap();
    for _ in 0..5 {
        event_loop.run_with_timeout(20).unwrap();
    }
    assert_eq!(ev.used().len(), 1, "one event");
    assert_eq!(ev.used()[0].1, 4);
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(event_buf)).unwrap(),
        0,
        "TRANSPORT_RESET"
    );
    assert!(interrupt.signals().contains(&VirtioSignal::UsedQueue(2)));
}
