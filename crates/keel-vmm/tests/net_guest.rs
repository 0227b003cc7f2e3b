//! KVM test of the virtio-net device through the full VMM, driven by the
//! built-in guest's `virtio-net` program: ARP, ICMP echo and UDP echo with
//! the host kernel at the other end of a tap, receive backpressure, a
//! transmit flood and a timed UDP burst.
//!
//! Everything happens in a network namespace the test makes (and deletes):
//! the tap `keelnet0` holds 10.0.2.1/24, a UDP echo server and a sink are
//! bound there, and the VM is built on a thread that entered the namespace,
//! so the tap it opens is the test's and nothing the guest sends can leave.
//! Needs root, `/dev/kvm`, `/dev/net/tun` and iproute2's `ip`; skipped
//! (with a note) without them.

mod common;
use common::Serial;
use std::io::Write;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_vmm::{ExitReason, NetConfig, VmBuilder, VmConfig};

const TAP: &str = "keelnet0";
const HOST_ADDR: &str = "10.0.2.1";
const GUEST_MAC: &str = "02:4b:45:45:4c:02";
const ECHO_PORT: u16 = 7777;
const WATCHDOG: Duration = Duration::from_secs(60);

/// A named network namespace with the tap, deleted on drop (which also
/// stops the server threads).
struct Netns {
    name: String,
    stop: Arc<AtomicBool>,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Netns {
    fn new() -> Option<Netns> {
        let name = format!("keel-net-{}", std::process::id());
        if !ip(&["netns", "add", &name]) {
            return None;
        }
        // From here on, drop cleans up.
        let netns = Netns {
            name,
            stop: Arc::new(AtomicBool::new(false)),
        };
        // No IPv6 chatter (router solicitations, MLD) on the tap.
        for key in ["all", "default"] {
            let _ = Command::new("ip")
                .args(["netns", "exec", &netns.name, "sysctl", "-qw"])
                .arg(format!("net.ipv6.conf.{key}.disable_ipv6=1"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let host_cidr = format!("{HOST_ADDR}/24");
        let steps: [&[&str]; 4] = [
            &["link", "set", "lo", "up"],
            &["tuntap", "add", "dev", TAP, "mode", "tap"],
            &["addr", "add", &host_cidr, "dev", TAP],
            &["link", "set", TAP, "up"],
        ];
        for step in steps {
            let mut all = vec!["netns", "exec", &netns.name, "ip"];
            all.extend_from_slice(step);
            assert!(ip(&all), "ip {all:?}");
        }
        Some(netns)
    }

    /// Moves the calling thread into the namespace.
    fn enter(&self) {
        let path = format!("/run/netns/{}", self.name);
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: setns on an open namespace fd affects only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
    }

    /// The tap's MAC, as the host kernel sees it.
    fn tap_mac(&self) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "cat"])
            .arg(format!("/sys/class/net/{TAP}/address"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Echoes every datagram back to its sender until `stop`.
fn echo_server(socket: UdpSocket, stop: Arc<AtomicBool>, echoed: Arc<AtomicU64>) {
    socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            if socket.send_to(&buf[..n], from).is_ok() {
                echoed.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

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

fn usable() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ip_ok = Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    root && ip_ok && Path::new("/dev/kvm").exists() && Path::new("/dev/net/tun").exists()
}

#[test]
fn guest_talks_arp_icmp_and_udp_to_the_host_over_virtio_net() {
    if !usable() {
        // On the real stderr: libtest captures eprintln!, and a skip must
        // never look like a silent pass.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: needs root, /dev/kvm, /dev/net/tun and iproute2"
        );
        return;
    }
    let Some(netns) = Netns::new() else {
        let _ = writeln!(std::io::stderr(), "SKIPPED: cannot create a network namespace");
        return;
    };
    let tap_mac = netns.tap_mac();
    let echoed = Arc::new(AtomicU64::new(0));
    let sunk = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
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
            let (stop, echoed) = (netns.stop.clone(), echoed.clone());
            scope.spawn(move || echo_server(echo, stop, echoed));
            let (stop, sunk) = (netns.stop.clone(), sunk.clone());
            scope.spawn(move || sink(discard, stop, sunk));
            let config = VmConfig {
                memory_mib: 32,
                nets: vec![NetConfig {
                    tap: TAP.to_string(),
                    fd: None,
                    mac: Some(GUEST_MAC.to_string()),
                }],
                ..Default::default()
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
    drop(netns);
    println!("{text}");
    println!(
        "virtio-net guest ran {:.2} s; host echoed {} datagrams; sink got {} datagrams ({} bytes) of the burst",
        elapsed.as_secs_f64(),
        echoed.load(Ordering::SeqCst),
        sunk.0.load(Ordering::SeqCst),
        sunk.1.load(Ordering::SeqCst)
    );
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
}
