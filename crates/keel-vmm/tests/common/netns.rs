//! A network namespace with a tap device for tests that need a host
//! network peer (the tap `keelnet0` holding 10.0.2.1/24), and a UDP echo
//! server. Each test binary uses part of it.
#![allow(dead_code)]

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The tap device, in the namespace.
pub const TAP: &str = "keelnet0";
/// The host's address on it.
pub const HOST_ADDR: &str = "10.0.2.1";

/// A named network namespace with the tap, deleted on drop (which also
/// stops the server threads).
pub struct Netns {
    pub name: String,
    pub stop: Arc<AtomicBool>,
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
    /// A namespace named after this process and `tag` (tests run in
    /// parallel threads of one process).
    pub fn new(tag: &str) -> Option<Netns> {
        let name = format!("keel-net-{}-{tag}", std::process::id());
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
    pub fn enter(&self) {
        let path = format!("/run/netns/{}", self.name);
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: setns on an open namespace fd affects only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
    }

    /// The tap's MAC, as the host kernel sees it.
    pub fn tap_mac(&self) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "cat"])
            .arg(format!("/sys/class/net/{TAP}/address"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The tap's `tx_dropped` (frames for the guest dropped with the tap's
    /// queue full), or `None` if unreadable.
    pub fn tap_tx_dropped(&self) -> Option<u64> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "cat"])
            .arg(format!("/sys/class/net/{TAP}/statistics/tx_dropped"))
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Echoes every datagram back to its sender until `stop`.
pub fn echo_server(socket: UdpSocket, stop: Arc<AtomicBool>, echoed: Arc<AtomicU64>) {
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

/// Whether the namespace tests can run here.
pub fn usable() -> bool {
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
