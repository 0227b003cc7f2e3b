//! Snapshots: how long creating one takes, how long a restore takes until
//! the guest runs again (from the library call, and from process start),
//! how many clones of one snapshot one process restores per second, and
//! what N running clones cost in memory.
//!
//! ```text
//! cargo bench --bench snapshot              # 128 MiB and 2 GiB guests, 100 clones
//! cargo bench --bench snapshot -- 20        # restores timed per size (default 20)
//! ```
//!
//! The guest is the built-in guest's `pio-loop` (an `out` to port 0x80
//! after another): "running" is the first write that reaches the port
//! device after the restore. Snapshots go to the system's temporary
//! directory. Targets (issue 12): restore ≤ 2 ms for both sizes; 100 clones
//! of a 128 MiB guest cost no more than one guest plus the pages each
//! clone touched.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_vmm::{RestoreMode, SerialMode, Snapshot, VirtioTransport, VmBuilder, VmConfig, VmHandle};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;

/// Port 0x80: counts the guest's writes and remembers when the first came.
#[derive(Default)]
struct Port {
    writes: AtomicU64,
    first: Mutex<Option<Instant>>,
}

impl DevicePio for Port {
    fn pio_read(&self, _: PioAddress, _: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }
    fn pio_write(&self, _: PioAddress, _: PioAddressOffset, _: &[u8]) {
        if self.writes.fetch_add(1, Ordering::Relaxed) == 0 {
            *self.first.lock().unwrap() = Some(Instant::now());
        }
    }
}

fn config(memory_mib: u64, cmdline: &str) -> VmConfig {
    let mut config = VmConfig::default();
    config.memory_mib = memory_mib;
    config.serial = SerialMode::None;
    config.transport = VirtioTransport::Mmio;
    config.cmdline = Some(cmdline.into());
    config
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

const PIO_LOOP: &str = "pio-loop count=4000000000 port=0x80";

/// Runs the pio loop, pauses it, snapshots it into `dir`; returns the
/// snapshot's cost.
fn take_snapshot(memory_mib: u64, dir: &Path) -> (Duration, keel_vmm::SnapshotInfo) {
    let port = Arc::new(Port::default());
    let mut builder = VmBuilder::new(config(memory_mib, PIO_LOOP)).unwrap();
    builder.add_pio_device(0x80, 1, port.clone()).unwrap();
    let handle = builder.build().unwrap().start().unwrap();
    wait_until("the guest's first writes", || {
        port.writes.load(Ordering::Relaxed) > 1000
    });
    handle.pause().unwrap();
    let started = Instant::now();
    let info = handle.controller().snapshot_to_dir(dir).unwrap();
    let took = started.elapsed();
    drop(handle);
    (took, info)
}

/// Restores `snapshot` and starts it; returns the handle and the time
/// from the call to the guest's first port write.
fn restore(snapshot: &Snapshot, mode: RestoreMode) -> (VmHandle, Duration, Arc<Port>) {
    let port = Arc::new(Port::default());
    let started = Instant::now();
    let mut builder = VmBuilder::new(snapshot.config().clone()).unwrap();
    builder.add_pio_device(0x80, 1, port.clone()).unwrap();
    let handle = builder.restore(snapshot, mode).unwrap().start().unwrap();
    wait_until("the restored guest's first write", || {
        port.first.lock().unwrap().is_some()
    });
    let first = port.first.lock().unwrap().unwrap();
    (handle, first - started, port)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

/// This process's proportional set size, in KiB.
fn pss_kib() -> u64 {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The `keel` binary next to this benchmark (built by `cargo bench`).
fn keel_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?.parent()?;
    let keel = dir.join("keel");
    keel.exists().then_some(keel)
}

/// Process start → the restored guest's first serial output, through
/// `keel --restore`.
fn process_restore(dir: &Path, runs: usize) -> Option<Duration> {
    let keel = keel_binary()?;
    let mut times = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        let mut child = Command::new(&keel)
            .arg("--restore")
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let mut out = child.stdout.take()?;
        let mut byte = [0u8; 1];
        use std::io::Read;
        out.read_exact(&mut byte).ok()?;
        times.push(started.elapsed());
        let _ = child.kill();
        let _ = child.wait();
    }
    Some(median(times))
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    // `cargo test --benches` runs this too: keep that short.
    let testing = !std::env::args().any(|a| a == "--bench");
    if !Path::new("/dev/kvm").exists() {
        println!("snapshot: SKIPPED (no /dev/kvm)");
        return;
    }
    let runs: usize = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or(if testing { 2 } else { 20 });
    let sizes: &[u64] = if testing { &[128] } else { &[128, 2048] };
    let base = std::env::temp_dir().join(format!("keel-bench-snapshot-{}", std::process::id()));
    println!("snapshot: {runs} restores per size, pio-loop guest, 1 vCPU, virtio none");
    println!("| guest | create (full) | memory file data | state file | restore → running, copy-on-write | restore → running, copied |");
    println!("|---|---:|---:|---:|---:|---:|");
    for &mib in sizes {
        let dir = base.join(format!("{mib}"));
        let (took, info) = take_snapshot(mib, &dir);
        let snapshot = Snapshot::load_dir(&dir).unwrap();
        let mut cow = Vec::new();
        let mut copied = Vec::new();
        for _ in 0..runs {
            let (handle, latency, _) = restore(&snapshot, RestoreMode::CopyOnWrite);
            cow.push(latency);
            drop(handle);
            let (handle, latency, _) = restore(&snapshot, RestoreMode::Copy);
            copied.push(latency);
            drop(handle);
        }
        println!(
            "| {mib} MiB | {} | {} KiB | {} B | {} | {} |",
            ms(took),
            info.memory.data_bytes / 1024,
            info.state_bytes,
            ms(median(cow)),
            ms(median(copied)),
        );
    }

    // Diff snapshots: their cost follows the pages written since the last.
    {
        let mib = if testing { 128 } else { 2048 };
        let port = Arc::new(Port::default());
        let mut c = config(mib, PIO_LOOP);
        c.track_dirty_pages = true;
        let mut builder = VmBuilder::new(c).unwrap();
        builder.add_pio_device(0x80, 1, port.clone()).unwrap();
        let vm = builder.build().unwrap();
        let mem = vm.memory().clone();
        let handle = vm.start().unwrap();
        wait_until("the guest's first writes", || {
            port.writes.load(Ordering::Relaxed) > 1000
        });
        handle.pause().unwrap();
        let dir = base.join("diff");
        std::fs::create_dir_all(&dir).unwrap();
        let controller = handle.controller();
        controller
            .snapshot(dir.join("full.state"), dir.join("full.mem"))
            .unwrap();
        println!("| diff of a {mib} MiB guest, pages written since the last snapshot | create (diff) | memory file data |");
        println!("|---|---:|---:|");
        for dirty_mib in [0u64, 1, 16, 64] {
            // The VMM writes the pages (as a device would), 1 MiB apart
            // from the guest's own, while the guest is paused.
            let chunk = vec![0x5au8; 1 << 20];
            for i in 0..dirty_mib {
                vm_memory::Bytes::write_slice(&mem, &chunk, vm_memory::GuestAddress((64 + i) << 20)).unwrap();
            }
            let started = Instant::now();
            let info = controller
                .snapshot_with(
                    dir.join("diff.state"),
                    dir.join("diff.mem"),
                    keel_vmm::SnapshotKind::Diff,
                    None,
                )
                .unwrap();
            println!(
                "| {dirty_mib} MiB | {} | {} KiB |",
                ms(started.elapsed()),
                info.memory.data_bytes / 1024
            );
        }
        drop(handle);
    }

    // Process start to the guest's first output, through `keel --restore`.
    let seq_dir = base.join("seq");
    {
        let serial = Arc::new(Mutex::new(Vec::new()));
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let handle = VmBuilder::new(config(128, "snapshot-seq steps=4096 delay-ms=0"))
            .unwrap()
            .serial_output(Sink(serial.clone()))
            .build()
            .unwrap()
            .start()
            .unwrap();
        wait_until("the sequence", || serial.lock().unwrap().len() > 200);
        handle.pause().unwrap();
        handle.controller().snapshot_to_dir(&seq_dir).unwrap();
    }
    match process_restore(&seq_dir, runs) {
        Some(t) => println!(
            "process start → restored guest's first output (keel --restore, 128 MiB): {}",
            ms(t)
        ),
        None => println!(
            "process start → restored guest: SKIPPED (build the keel binary: cargo build --release -p keel)"
        ),
    }

    // Clones per second and their memory, from the 128 MiB snapshot.
    let snapshot = Snapshot::load_dir(base.join("128")).unwrap();
    let seconds = if testing { 0.2 } else { 2.0 };
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed().as_secs_f64() < seconds {
        let (handle, _, _) = restore(&snapshot, RestoreMode::CopyOnWrite);
        drop(handle);
        n += 1;
    }
    println!(
        "clones restored, run to their first write and torn down, one thread: {:.0} per second",
        n as f64 / started.elapsed().as_secs_f64()
    );

    let clones = if testing { 4 } else { 100 };
    let before = pss_kib();
    let (first, _, _) = restore(&snapshot, RestoreMode::CopyOnWrite);
    first.pause().unwrap();
    let one = pss_kib().saturating_sub(before);
    let mut handles = vec![first];
    let mut ports = Vec::new();
    for _ in 1..clones {
        let (handle, _, port) = restore(&snapshot, RestoreMode::CopyOnWrite);
        // Each clone runs a little (its own pages get written), then waits.
        wait_until("the clone's writes", || port.writes.load(Ordering::Relaxed) > 100);
        handle.pause().unwrap();
        handles.push(handle);
        ports.push(port);
    }
    let all = pss_kib().saturating_sub(before);
    println!(
        "memory (PSS) of running clones of a 128 MiB guest: 1 clone {one} KiB, {clones} clones {all} KiB ({} KiB per extra clone)",
        all.saturating_sub(one) / (clones as u64 - 1).max(1)
    );
    drop(handles);
    let _ = std::fs::remove_dir_all(&base);
}
