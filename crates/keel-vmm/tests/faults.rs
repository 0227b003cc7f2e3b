//! Faults of the host under a running guest: a disk that fills up, a
//! backend that fails with EIO. The guest's request fails with
//! `VIRTIO_BLK_S_IOERR`, the VMM keeps running, and every write the guest
//! saw acknowledged is on the disk.

mod common;
#[path = "common/netns.rs"]
mod netns;
use common::Serial;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use keel_virtio::{BlockBackend, BlockOptions, MemoryBackend};
use keel_vmm::{DiskConfig, ExitReason, VirtioTransport, VmBuilder, VmConfig};

fn kvm() -> bool {
    Path::new("/dev/kvm").exists()
}

/// The `seq: step N` lines the guest printed: the writes it saw succeed.
fn acknowledged(text: &str) -> u64 {
    text.lines().filter(|l| l.starts_with("seq: step ")).count() as u64
}

/// The guest program of these tests: 200 steps, each writing a sector.
const SEQ: &str = "snapshot-seq steps=200 delay-ms=0";

fn seq_config() -> VmConfig {
    let mut config = VmConfig::default();
    config.memory_mib = 32;
    config.transport = VirtioTransport::Mmio;
    config.cmdline = Some(SEQ.into());
    config
}

/// A small tmpfs, unmounted on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(size: &str) -> Option<SmallFs> {
        let dir = std::env::temp_dir().join(format!("keel-enospc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "keel-enospc"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallFs(dir))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_full_disk_fails_the_guests_write_with_ioerr_and_loses_nothing_acknowledged() {
    if !kvm() {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: mounting a small tmpfs needs root");
        return;
    }
    let Some(fs) = SmallFs::mount("64k") else {
        eprintln!("SKIPPED: cannot mount a tmpfs");
        return;
    };
    // A sparse 1 MiB image on a 64 KiB file system: writes allocate pages
    // until the file system is full.
    let image = fs.0.join("disk.img");
    std::fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
    let mut config = seq_config();
    config.disks = vec![DiskConfig::new(&image)];
    let (outcome, text) = common::run_guest(VmBuilder::new(config).unwrap(), SEQ, Duration::from_secs(60));
    // The guest's check failed (status 1) on its write's IOERR; the VMM
    // ran on and reported it as the guest's exit.
    assert!(
        matches!(outcome, Ok(ExitReason::GuestExit(1))),
        "{outcome:?}\n{text}"
    );
    assert!(
        text.contains("disk write status 1"),
        "the guest saw VIRTIO_BLK_S_IOERR:\n{text}"
    );
    let steps = acknowledged(&text);
    assert!(
        steps > 0 && steps < 200,
        "{steps} writes before the disk filled:\n{text}"
    );
    // Every acknowledged sector holds its step's value (a word repeated).
    let disk = std::fs::read(&image).unwrap();
    for step in 0..steps as usize {
        let sector = &disk[step * 512..(step + 1) * 512];
        let first = &sector[..8];
        assert!(first != [0u8; 8], "sector {step} was acknowledged but is empty");
        assert!(sector.chunks(8).all(|w| w == first), "sector {step} is torn");
    }
    eprintln!("disk full after {steps} acknowledged writes; all of them on the disk");
}

/// A disk that fails every write after the first `good` with EIO.
struct FailingDisk {
    disk: MemoryBackend,
    good: usize,
}

impl BlockBackend for FailingDisk {
    fn capacity(&self) -> u64 {
        self.disk.capacity()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.disk.read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        if self.good == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        self.good -= 1;
        self.disk.write_at(offset, buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_backend_failing_with_eio_fails_the_request_and_the_vmm_keeps_serving() {
    if !kvm() {
        return;
    }
    let mut builder = VmBuilder::new(seq_config()).unwrap();
    let disk = builder
        .add_disk(
            FailingDisk {
                disk: MemoryBackend::new(1 << 20),
                good: 10,
            },
            BlockOptions::default(),
        )
        .unwrap();
    let (outcome, text) = common::run_guest(builder, SEQ, Duration::from_secs(60));
    assert!(
        matches!(outcome, Ok(ExitReason::GuestExit(1))),
        "{outcome:?}\n{text}"
    );
    assert!(text.contains("seq: step 10: disk write status 1"), "{text}");
    assert_eq!(acknowledged(&text), 10);
    // The ten acknowledged writes are in the backend, the failed one not.
    let guard = disk.lock().unwrap();
    let data = guard.backend().disk.data();
    for step in 0..10 {
        let sector = &data[step * 512..(step + 1) * 512];
        assert!(
            sector[..8] != [0u8; 8],
            "sector {step} was acknowledged but is empty"
        );
        assert!(
            sector.chunks(8).all(|w| w == &sector[..8]),
            "sector {step} is torn"
        );
    }
    assert!(
        data[10 * 512..11 * 512].iter().all(|&b| b == 0),
        "the failed write left data"
    );
}

#[test]
fn a_tap_deleted_under_a_running_vm_takes_the_guests_link_down_and_the_vmm_runs_on() {
    use std::sync::atomic::Ordering;
    if !netns::usable() {
        eprintln!("SKIPPED: needs root, /dev/kvm, /dev/net/tun and iproute2");
        return;
    }
    let Some(ns) = netns::Netns::new("faults") else {
        eprintln!("SKIPPED: cannot create a network namespace");
        return;
    };
    const ECHO_PORT: u16 = 7777;
    let serial = Serial::default();
    let (outcome, link_up, errors) = std::thread::scope(|scope| {
        let runner = scope.spawn(|| {
            ns.enter();
            let socket = std::net::UdpSocket::bind((netns::HOST_ADDR, ECHO_PORT)).unwrap();
            let (stop, count) = (
                ns.stop.clone(),
                std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0)),
            );
            scope.spawn(move || netns::echo_server(socket, stop, count));
            let mut config = seq_config();
            config.cmdline = Some(format!(
                "snapshot-seq steps=4000 delay-ms=1 net=1 host={} me=10.0.2.15 udp-port={ECHO_PORT}",
                netns::HOST_ADDR
            ));
            config.nets = vec![keel_vmm::NetConfig::tap(netns::TAP.to_string())];
            let handle = VmBuilder::new(config)
                .unwrap()
                .serial_output(serial.clone())
                .build()
                .unwrap()
                .start()
                .unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while !serial.text().contains("seq: step 20\n") {
                assert!(std::time::Instant::now() < deadline, "{}", serial.text());
                std::thread::sleep(Duration::from_millis(5));
            }
            // The tap goes away under the running VM.
            assert!(Command::new("ip")
                .args(["netns", "exec", &ns.name, "ip", "link", "del", netns::TAP])
                .status()
                .unwrap()
                .success());
            let controller = handle.controller();
            let outcome = handle.wait_timeout(Duration::from_secs(60));
            let card = controller.network_interface(0).unwrap();
            let card = card.lock().unwrap();
            (
                outcome.map_err(|_| "hung"),
                card.link_up(),
                card.counters().rx_backend_errors,
            )
        });
        let result = runner.join().unwrap();
        ns.stop.store(true, Ordering::SeqCst);
        result
    });
    let text = serial.text();
    // The guest's next echo got no answer: its check failed, and it said
    // so; the VMM ran on to report it.
    assert!(
        matches!(outcome, Ok(Ok(ExitReason::GuestExit(1)))),
        "{outcome:?}\n{text}"
    );
    assert!(text.contains("network echo"), "{text}");
    assert!(!link_up, "the guest was told the link is down");
    assert_eq!(errors, 1, "one backend error, counted once");
}

/// A disk whose `stall_at`-th write blocks until the test releases it: a
/// backend stuck on a stalled file system.
struct StallingDisk {
    disk: MemoryBackend,
    writes: usize,
    stall_at: usize,
    entered: std::sync::mpsc::Sender<()>,
    release: std::sync::mpsc::Receiver<()>,
}

impl BlockBackend for StallingDisk {
    fn capacity(&self) -> u64 {
        self.disk.capacity()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.disk.read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        self.writes += 1;
        if self.writes == self.stall_at {
            let _ = self.entered.send(());
            let _ = self.release.recv();
        }
        self.disk.write_at(offset, buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Serial input that counts the bytes the VMM has read from it.
struct CountingInput {
    stream: std::os::unix::net::UnixStream,
    read: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl std::io::Read for CountingInput {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.stream.read(buf)?;
        self.read.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
        Ok(n)
    }
}

impl std::os::fd::AsRawFd for CountingInput {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.stream.as_raw_fd()
    }
}

#[test]
fn a_backend_that_blocks_stalls_only_its_own_disk() {
    use std::io::Write;
    use std::sync::atomic::Ordering;
    if !kvm() {
        return;
    }
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel();
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let read = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut builder = VmBuilder::new(seq_config()).unwrap();
    builder
        .add_disk(
            StallingDisk {
                disk: MemoryBackend::new(1 << 20),
                writes: 0,
                stall_at: 6,
                entered: entered_tx,
                release: release_rx,
            },
            BlockOptions::default(),
        )
        .unwrap();
    let serial = Serial::default();
    let handle = builder
        .serial_output(serial.clone())
        .serial_input(CountingInput {
            stream: theirs,
            read: read.clone(),
        })
        .build()
        .unwrap()
        .start()
        .unwrap();
    // Dropped before the handle if the test fails, so the stalled thread
    // returns and the VM can be torn down.
    let release = release;
    entered
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("the guest never reached the sixth write:\n{}", serial.text()));
    // The disk's thread is inside the backend, holding the disk. The other
    // devices' event loop still serves: serial input is read.
    (&ours).write_all(b"ping\n").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while read.load(Ordering::SeqCst) < 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "serial input was not read while a disk backend was blocked"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(acknowledged(&serial.text()), 5, "{}", serial.text());
    // Released, the disk finishes the request and the guest goes on.
    release.send(()).unwrap();
    let outcome = handle.wait_timeout(Duration::from_secs(120));
    let text = serial.text();
    assert!(
        matches!(outcome, Ok(Ok(ExitReason::GuestExit(0)))),
        "{outcome:?}\n{text}"
    );
    assert_eq!(acknowledged(&text), 200, "{text}");
}
