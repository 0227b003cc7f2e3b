//! KVM test of the virtio-net device through the full VMM, driven by the
//! built-in guest's `virtio-net` program: ARP, ICMP echo and UDP echo with
//! the host kernel at the other end of a tap, receive backpressure, a
//! transmit flood, a timed UDP burst to the host (guest→host) and timed
//! bursts from it (host→guest).
//!
//! Everything happens in a network namespace the test makes (and deletes):
//! the tap `keelnet0` holds 10.0.2.1/24, a UDP echo server, a sink and a
//! blaster are bound there, and the VM is built on a thread that entered
//! the namespace, so the tap it opens is the test's and nothing the guest
//! sends can leave. Needs root, `/dev/kvm`, `/dev/net/tun` and iproute2's
//! `ip`; skipped (with a note) without them.
//!
//! The figures it prints (with `--nocapture`):
//!
//! - `tx flood: … frames/s`: 60-byte frames the guest queues back to back,
//!   counted when the device completes them (guest→host frames/s; the host
//!   kernel drops them, EtherType 0x88b5).
//! - `UDP burst: … frames/s, … Mbit/s`: 2000 datagrams of 1472 bytes
//!   (1514-byte frames) to the sink, timed by the guest from the first
//!   queued to the last completed (guest→host Mbit/s).
//! - `rx burst: received R of N datagrams of S bytes in T us: F frames/s,
//!   M Mbit/s …`: the guest asks the blaster (port 7779) for N datagrams of
//!   S bytes — 18 (60-byte frames, for frames/s) and 1472 (1514-byte
//!   frames, for Mbit/s) — which it sends as fast as `sendto` goes; the
//!   guest, its 128-buffer receive ring kept full, checks each one (run id,
//!   sequence number, every payload byte) and times from the first to the
//!   last (host→guest). R below N means frames the tap dropped because its
//!   queue (1000 frames) was full while the guest read slower than the host
//!   sent: the test checks that the blaster's sent count equals what the
//!   guest received plus the tap's `tx_dropped`, i.e. that the device lost
//!   none it had taken. Figures vary with the host's load; the guest fails
//!   only on nothing received, or a malformed or duplicated datagram.

#[macro_use]
mod common;
#[path = "common/netns.rs"]
mod netns;
use common::Serial;
use netns::{echo_server, usable, Netns, HOST_ADDR, TAP};
use std::io::Write;
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_vmm::{ExitReason, NetConfig, VirtioTransport, VmBuilder, VmConfig};

const GUEST_MAC: &str = "02:4b:45:45:4c:02";
const ECHO_PORT: u16 = 7777;
/// The guest's receive bursts: it asks `ECHO_PORT + 2` (its `udp-port+2`).
const BLAST_PORT: u16 = ECHO_PORT + 2;
const RX_BURST_SIZES: [usize; 2] = [18, 1472];
const WATCHDOG: Duration = Duration::from_secs(60);

/// Counts datagrams (and bytes) until `stop`.
fn sink(socket: UdpSocket, stop: Arc<AtomicBool>, count: Arc<(AtomicU64, AtomicU64)>) {
    socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        if let Ok(n) = socket.recv(&mut buf) {
            count.0.fetch_add(1, Ordering::SeqCst);
            count.1.fetch_add(n as u64, Ordering::SeqCst);
        }
    }
}

/// The payload byte `i` of datagram `seq` of `size` bytes: the guest's
/// `pattern`.
fn pattern(seq: u32, size: usize, i: usize) -> u8 {
    (i as u32)
        .wrapping_mul(131)
        .wrapping_add(seq.wrapping_mul(7))
        .wrapping_add(size as u32) as u8
}

/// One request the blaster served.
#[derive(Debug)]
struct Blast {
    run_id: u32,
    count: u32,
    size: usize,
    /// Datagrams `sendto` took.
    sent: u64,
    /// `sendto` calls retried after ENOBUFS or EAGAIN.
    retries: u64,
    elapsed: Duration,
}

/// Answers each request — 16 bytes: `KRXB`, run id, count, size, all
/// big-endian — with `count` datagrams of `size` bytes to the requester,
/// sent as fast as the socket takes them: run id, sequence number
/// (big-endian), then [`pattern`] `seq + run id` from byte 8 on. Built
/// before the first is sent, so the sending is only `sendto` calls.
fn blaster(socket: UdpSocket, stop: Arc<AtomicBool>, log: Arc<Mutex<Vec<Blast>>>) {
    socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let word = |at: usize| u32::from_be_bytes(buf[at..at + 4].try_into().unwrap());
        if n != 16 || buf[..4] != *b"KRXB" {
            continue;
        }
        let (run_id, count, size) = (word(4), word(8), word(12) as usize);
        if !(8..=1472).contains(&size) || !(1..=65536).contains(&count) {
            continue;
        }
        let datagrams: Vec<Vec<u8>> = (0..count)
            .map(|seq| {
                let mut d: Vec<u8> = (0..size)
                    .map(|i| pattern(seq.wrapping_add(run_id), size, i))
                    .collect();
                d[0..4].copy_from_slice(&run_id.to_be_bytes());
                d[4..8].copy_from_slice(&seq.to_be_bytes());
                d
            })
            .collect();
        let start = Instant::now();
        let (mut sent, mut retries) = (0u64, 0u64);
        for d in &datagrams {
            for _ in 0..1000 {
                match socket.send_to(d, from) {
                    Ok(_) => {
                        sent += 1;
                        break;
                    }
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock
                            || e.raw_os_error() == Some(libc::ENOBUFS) =>
                    {
                        retries += 1;
                        std::thread::sleep(Duration::from_micros(20));
                    }
                    Err(_) => break,
                }
            }
        }
        log.lock().unwrap().push(Blast {
            run_id,
            count,
            size,
            sent,
            retries,
            elapsed: start.elapsed(),
        });
    }
}

/// The guest's `rx burst` line for `size`-byte datagrams, as
/// (received, count, stale, frames/s, Mbit/s of frames).
fn rx_burst_line(text: &str, size: usize) -> Option<(u64, u64, u64, u64, u64)> {
    let line = text.lines().find(|l| {
        l.contains("virtio-net: rx burst: received") && l.contains(&format!(" of {size} bytes "))
    })?;
    let words: Vec<&str> = line
        .split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')')
        .filter(|w| !w.is_empty())
        .collect();
    let before = |word: &str| -> Option<u64> {
        let at = words.iter().position(|w| *w == word)?;
        words.get(at.checked_sub(1)?)?.parse().ok()
    };
    let after = |word: &str| -> Option<u64> {
        let at = words.iter().position(|w| *w == word)?;
        words.get(at + 1)?.parse().ok()
    };
    Some((
        after("received")?,
        before("datagrams")?,
        before("stale")?,
        before("frames/s")?,
        before("Mbit/s")?,
    ))
}

over_both_transports!(guest_talks_arp_icmp_and_udp_to_the_host_over_virtio_net);

fn guest_talks_arp_icmp_and_udp_to_the_host_over_virtio_net(transport: VirtioTransport) {
    if !usable() {
        // On the real stderr: libtest captures eprintln!, and a skip must
        // never look like a silent pass.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: needs root, /dev/kvm, /dev/net/tun and iproute2"
        );
        return;
    }
    let Some(netns) = Netns::new(&transport.to_string()) else {
        let _ = writeln!(std::io::stderr(), "SKIPPED: cannot create a network namespace");
        return;
    };
    let tap_mac = netns.tap_mac();
    let echoed = Arc::new(AtomicU64::new(0));
    let sunk = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let blasts = Arc::new(Mutex::new(Vec::new()));
    let serial = Serial::default();
    let cmdline = format!("virtio-net mac={GUEST_MAC} host={HOST_ADDR} me=10.0.2.15 udp-port={ECHO_PORT}");

    // One thread enters the namespace: it binds the servers' sockets
    // (which stay in the namespace wherever they are used) and builds the
    // VM (which opens the tap by name there).
    let result = std::thread::scope(|scope| {
        let runner = scope.spawn(|| {
            netns.enter();
            let echo = UdpSocket::bind((HOST_ADDR, ECHO_PORT)).unwrap();
            let discard = UdpSocket::bind((HOST_ADDR, ECHO_PORT + 1)).unwrap();
            let blast = UdpSocket::bind((HOST_ADDR, BLAST_PORT)).unwrap();
            let (stop, echoed) = (netns.stop.clone(), echoed.clone());
            scope.spawn(move || echo_server(echo, stop, echoed));
            let (stop, sunk) = (netns.stop.clone(), sunk.clone());
            scope.spawn(move || sink(discard, stop, sunk));
            let (stop, blasts) = (netns.stop.clone(), blasts.clone());
            scope.spawn(move || blaster(blast, stop, blasts));
            let config = {
                let mut config = VmConfig::default();
                config.memory_mib = 32;
                config.nets = vec![{
                    let mut net = NetConfig::tap(TAP.to_string());
                    net.fd = None;
                    net.mac = Some(GUEST_MAC.to_string());
                    net.transport = Some(transport);
                    net
                }];
                config
            };
            let vm = VmBuilder::new(config)
                .unwrap()
                .cmdline(&cmdline)
                .serial_output(serial.clone())
                .build()
                .unwrap();
            let start = Instant::now();
            let handle = vm.start().unwrap();
            let result = match handle.wait_timeout(WATCHDOG) {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(handle) => {
                    handle.stop_handle().stop();
                    Err("hung".to_string())
                }
            };
            (result, start.elapsed())
        });
        let outcome = runner.join();
        // Stop the servers whatever happened, so the scope can end.
        netns.stop.store(true, Ordering::SeqCst);
        outcome
    });
    let text = serial.text();
    let (exit, elapsed) = match result {
        Ok(done) => done,
        Err(_) => panic!("the VM thread panicked; serial:\n{text}"),
    };
    let tap_dropped = netns.tap_tx_dropped();
    drop(netns);
    println!("{text}");
    println!(
        "virtio-net guest ran {:.2} s; host echoed {} datagrams; sink got {} datagrams ({} bytes) of the burst",
        elapsed.as_secs_f64(),
        echoed.load(Ordering::SeqCst),
        sunk.0.load(Ordering::SeqCst),
        sunk.1.load(Ordering::SeqCst)
    );
    let blasts = std::mem::take(&mut *blasts.lock().unwrap());
    for b in &blasts {
        println!(
            "blaster: run {:#010x}: sent {} of {} datagrams of {} bytes in {} us ({} retries)",
            b.run_id,
            b.sent,
            b.count,
            b.size,
            b.elapsed.as_micros(),
            b.retries
        );
    }
    println!("tap {TAP}: tx_dropped {tap_dropped:?} (frames for the guest dropped, its queue full)");
    let exit = exit.unwrap_or_else(|e| panic!("`{cmdline}`: {e}; serial:\n{text}"));
    assert_eq!(exit, ExitReason::GuestExit(0), "serial:\n{text}");
    assert!(
        text.contains("keel-guest: virtio-net: PASS (status 0)"),
        "serial:\n{text}"
    );
    assert!(!text.contains("FAIL"), "serial:\n{text}");
    for expected in [
        format!("MAC {GUEST_MAC}"),
        format!("virtio-net: ARP: {HOST_ADDR} is at {tap_mac}"),
        format!("virtio-net: ICMP: echo reply from {HOST_ADDR} seq 3"),
        "virtio-net: UDP: 60 datagrams of 1..1472 bytes echoed intact".to_string(),
        "virtio-net: backpressure: 128 echoes".to_string(),
        "virtio-net: tx flood: 4000 frames of 60 bytes completed".to_string(),
        "virtio-net: UDP burst: 2000 datagrams".to_string(),
    ] {
        assert!(text.contains(&expected), "no {expected:?}; serial:\n{text}");
    }
    // Host→guest: every datagram the blaster got out reached the guest or
    // was dropped by the tap with its queue full; none vanished between.
    let mut guest_total = 0;
    for size in RX_BURST_SIZES {
        let Some((received, count, stale, fps, mbits)) = rx_burst_line(&text, size) else {
            panic!("no rx burst line for {size}-byte datagrams; serial:\n{text}");
        };
        let sent: u64 = blasts.iter().filter(|b| b.size == size).map(|b| b.sent).sum();
        println!(
            "rx burst of {size}-byte datagrams: blaster sent {sent}, guest received {received} of {count} (+{stale} stale): {fps} frames/s, {mbits} Mbit/s of frames"
        );
        assert_eq!(count, 2000, "serial:\n{text}");
        assert!(received >= 1 && received <= count.min(sent), "serial:\n{text}");
        guest_total += received + stale;
    }
    let sent_total: u64 = blasts.iter().map(|b| b.sent).sum();
    if let Some(dropped) = tap_dropped {
        assert_eq!(
            sent_total,
            guest_total + dropped,
            "blaster sent {sent_total}; guest received {guest_total}, tap dropped {dropped}: {blasts:?}"
        );
    }
}
