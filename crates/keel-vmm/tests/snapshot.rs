//! Snapshots of the built-in guest: taken mid-run with disk writes going
//! on, restored in a new VM, which continues exactly; and every way a
//! snapshot can be refused.

mod common;
#[path = "common/netns.rs"]
mod netns;
use common::Serial;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keel_memory::RestoreMode;
use keel_vmm::{DiskConfig, ExitReason, IrqchipChoice, Snapshot, VirtioTransport, VmBuilder, VmConfig};

fn kvm() -> bool {
    std::path::Path::new("/dev/kvm").exists()
}

/// A fresh directory under the system's temporary directory.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keel-snapshot-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn wait_for_text(serial: &Serial, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !serial.text().contains(text) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {text:?}; output so far:\n{}",
            serial.text()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The `seq: step N` numbers in `text`, in order.
fn steps(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("seq: step "))
        .map(|n| n.trim().parse().unwrap())
        .collect()
}

const STEPS: u64 = 300;

fn seq_config(disk: &Path, irqchip: IrqchipChoice) -> VmConfig {
    // 260 steps of 5 ms after step 40: time to pause it on a loaded host.
    seq_config_of(disk, irqchip, STEPS, 5)
}

fn seq_config_of(disk: &Path, irqchip: IrqchipChoice, steps: u64, delay_ms: u64) -> VmConfig {
    let mut config = VmConfig::default();
    config.memory_mib = 32;
    config.irqchip = irqchip;
    config.transport = VirtioTransport::Mmio;
    config.cmdline = Some(format!("snapshot-seq steps={steps} delay-ms={delay_ms}"));
    // Devices the sequence does not drive are saved and restored too.
    config.rng = true;
    config.balloon = Some(keel_vmm::BalloonConfig::new(0));
    config.disks = vec![DiskConfig::new(disk)];
    config
}

fn disk(dir: &Path) -> PathBuf {
    let path = dir.join("disk.img");
    std::fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
    path
}

/// Runs the sequence, snapshots it after `seq: step 40` (paused mid-run,
/// a disk write likely in flight), stops it; returns its output.
fn run_and_snapshot(config: VmConfig, dir: &Path) -> String {
    run_and_snapshot_at(config, dir, 40)
}

/// [`run_and_snapshot`] after `seq: step {step}`.
fn run_and_snapshot_at(config: VmConfig, dir: &Path, step: u64) -> String {
    let serial = Serial::default();
    let handle = VmBuilder::new(config)
        .unwrap()
        .serial_output(serial.clone())
        .build()
        .unwrap()
        .start()
        .unwrap();
    wait_for_text(&serial, &format!("seq: step {step}\n"));
    handle.pause().unwrap();
    let info = handle.controller().snapshot_to_dir(dir).unwrap();
    assert!(info.state_bytes > 0);
    assert_eq!(info.memory.size, 32 << 20);
    assert!(
        info.memory.data_bytes < 8 << 20,
        "the memory file holds only what the guest touched: {} bytes",
        info.memory.data_bytes
    );
    // Whatever the guest does after the snapshot is not the restored
    // guest's business: stop it here.
    handle.stop_handle().stop();
    assert_eq!(handle.wait().unwrap(), ExitReason::Stopped);
    serial.text()
}

fn restore_and_finish(dir: &Path, mode: RestoreMode) -> String {
    let snapshot = Snapshot::load_dir(dir).unwrap();
    let serial = Serial::default();
    let vm = VmBuilder::new(snapshot.config().clone())
        .unwrap()
        .serial_output(serial.clone())
        .restore(&snapshot, mode)
        .unwrap();
    let handle = vm.start().unwrap();
    let outcome = handle.wait_timeout(Duration::from_secs(120));
    let outcome = match outcome {
        Ok(outcome) => outcome.unwrap(),
        Err(handle) => {
            let text = serial.text();
            drop(handle);
            panic!("the restored guest did not finish; its output:\n{text}");
        }
    };
    let text = serial.text();
    assert_eq!(outcome, ExitReason::GuestExit(0), "restored output:\n{text}");
    text
}

fn check_continuity(before: &str, after: &str) {
    // The bytes of both runs together are one run: every step once, in
    // order (a line cut by the pause is finished by the restored guest).
    let whole = format!("{before}{after}");
    let all = steps(&whole);
    let expected: Vec<u64> = (0..STEPS).collect();
    assert_eq!(all, expected, "original:\n{before}\nrestored:\n{after}");
    assert!(
        after.contains(&format!(
            "seq: done: {STEPS} steps, table checked, {STEPS} sectors read back"
        )),
        "{after}"
    );
    assert!(!steps(after).is_empty(), "the restored guest made progress");
}

fn a_guest_snapshotted_mid_run_continues_exactly_after_restore(
    irqchip: IrqchipChoice,
    mode: RestoreMode,
    transport: VirtioTransport,
) {
    if !kvm() {
        eprintln!("SKIPPED: no /dev/kvm");
        return;
    }
    let dir = temp_dir(&format!("continue-{irqchip:?}-{mode:?}-{transport:?}"));
    let disk = disk(&dir);
    let snap = dir.join("snap");
    let mut config = seq_config(&disk, irqchip);
    config.transport = transport;
    let before = run_and_snapshot(config, &snap);
    let after = restore_and_finish(&snap, mode);
    check_continuity(&before, &after);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn split_irqchip_copy_on_write() {
    a_guest_snapshotted_mid_run_continues_exactly_after_restore(
        IrqchipChoice::Split,
        RestoreMode::CopyOnWrite,
        VirtioTransport::Mmio,
    );
}

#[test]
fn split_irqchip_copied_memory() {
    a_guest_snapshotted_mid_run_continues_exactly_after_restore(
        IrqchipChoice::Split,
        RestoreMode::Copy,
        VirtioTransport::Mmio,
    );
}

#[test]
fn kernel_irqchip_copy_on_write() {
    a_guest_snapshotted_mid_run_continues_exactly_after_restore(
        IrqchipChoice::Kernel,
        RestoreMode::CopyOnWrite,
        VirtioTransport::Mmio,
    );
}

#[test]
fn virtio_pci_with_msi_x() {
    a_guest_snapshotted_mid_run_continues_exactly_after_restore(
        IrqchipChoice::Split,
        RestoreMode::CopyOnWrite,
        VirtioTransport::Pci,
    );
}

#[test]
fn virtio_pci_kernel_irqchip() {
    a_guest_snapshotted_mid_run_continues_exactly_after_restore(
        IrqchipChoice::Kernel,
        RestoreMode::Copy,
        VirtioTransport::Pci,
    );
}

#[test]
fn a_snapshot_needs_a_paused_vm() {
    if !kvm() {
        return;
    }
    let dir = temp_dir("unpaused");
    let mut config = VmConfig::default();
    config.memory_mib = 32;
    config.cmdline = Some("snapshot-seq steps=4000 delay-ms=5".into());
    let handle = VmBuilder::new(config).unwrap().build().unwrap().start().unwrap();
    let err = handle.controller().snapshot_to_dir(&dir).unwrap_err().to_string();
    assert_eq!(err, "the VM is running: pause it before taking a snapshot");
    assert!(!dir.join(keel_vmm::STATE_FILE_NAME).exists());
    drop(handle);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A device of a user's own that does not implement `save_state`.
struct Unsaveable;

impl keel_virtio::VirtioDevice for Unsaveable {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn features(&self) -> u64 {
        keel_virtio::features::VERSION_1
    }
    fn ack_features(&mut self, _: u64) {}
    fn read_config(&self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&mut self, _: u64, _: &[u8]) {}
    fn activate(&mut self, _: keel_virtio::Activation) -> keel_virtio::Result<()> {
        Ok(())
    }
    fn reset(&mut self) -> bool {
        true
    }
}

impl keel_vmm::event_manager::MutEventSubscriber for Unsaveable {
    fn process(&mut self, _: keel_vmm::event_manager::Events, _: &mut keel_vmm::event_manager::EventOps) {}
    fn init(&mut self, _: &mut keel_vmm::event_manager::EventOps) {}
}

#[test]
fn a_device_that_cannot_be_saved_is_named_and_nothing_is_written() {
    if !kvm() {
        return;
    }
    let dir = temp_dir("unsaveable");
    let mut config = VmConfig::default();
    config.memory_mib = 32;
    config.cmdline = Some("snapshot-seq steps=4000 delay-ms=5".into());
    config.transport = VirtioTransport::Mmio;
    let mut builder = VmBuilder::new(config).unwrap();
    builder
        .add_virtio_device(
            "my-device",
            std::sync::Arc::new(std::sync::Mutex::new(Unsaveable)),
        )
        .unwrap();
    let handle = builder.build().unwrap().start().unwrap();
    handle.pause().unwrap();
    let err = handle
        .controller()
        .snapshot_to_dir(dir.join("snap"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("my-device") && err.contains("device type 42") && err.contains("cannot be saved"),
        "{err}"
    );
    assert!(!dir.join("snap").join(keel_vmm::STATE_FILE_NAME).exists());
    assert!(!dir.join("snap").join(keel_vmm::MEMORY_FILE_NAME).exists());
    drop(handle);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Takes one snapshot of the sequence for the error tests below.
fn one_snapshot(name: &str) -> (PathBuf, PathBuf) {
    let dir = temp_dir(name);
    let disk = disk(&dir);
    let snap = dir.join("snap");
    run_and_snapshot(seq_config(&disk, IrqchipChoice::Split), &snap);
    (dir, snap)
}

#[test]
fn damaged_snapshots_and_mismatched_machines_are_refused_by_name() {
    if !kvm() {
        return;
    }
    let (dir, snap) = one_snapshot("damaged");
    let state = snap.join(keel_vmm::STATE_FILE_NAME);
    let memory = snap.join(keel_vmm::MEMORY_FILE_NAME);
    let good = std::fs::read(&state).unwrap();
    let load_err = |bytes: &[u8]| {
        let path = dir.join("bad.state");
        std::fs::write(&path, bytes).unwrap();
        Snapshot::load(&path, &memory).unwrap_err().to_string()
    };

    let err = load_err(&good[..good.len() / 2]);
    assert!(err.contains("truncated"), "{err}");
    let mut flipped = good.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    let err = load_err(&flipped);
    assert!(
        err.contains("checksum mismatch") && err.contains("corrupted"),
        "{err}"
    );
    let mut newer = good.clone();
    newer[8..12].copy_from_slice(&99u32.to_le_bytes());
    let err = load_err(&newer);
    assert!(err.contains("format version 99"), "{err}");
    let err = load_err(b"#!/bin/sh\necho not a snapshot\n");
    assert!(err.contains("not a Keel snapshot"), "{err}");
    let err = Snapshot::load(dir.join("missing.state"), &memory)
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.state"), "{err}");

    // A machine that differs from the snapshot's.
    let snapshot = Snapshot::load_dir(&snap).unwrap();
    let mut bigger = snapshot.config().clone();
    bigger.memory_mib = 64;
    let err = VmBuilder::new(bigger)
        .unwrap()
        .restore(&snapshot, RestoreMode::CopyOnWrite)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "snapshot: the snapshot's memory size is 32 MiB, this VM's configuration says 64 MiB"
    );
    let mut no_disk = snapshot.config().clone();
    no_disk.disks.clear();
    let err = VmBuilder::new(no_disk)
        .unwrap()
        .restore(&snapshot, RestoreMode::CopyOnWrite)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the snapshot has 3 virtio devices (disk ")
            && err.contains("this VM 2 (virtio-rng, virtio-balloon)"),
        "{err}"
    );

    let mut on_pci = snapshot.config().clone();
    on_pci.transport = VirtioTransport::Pci;
    let err = VmBuilder::new(on_pci)
        .unwrap()
        .restore(&snapshot, RestoreMode::CopyOnWrite)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("is on virtio-pci, but the snapshot's") && err.contains("was on virtio-mmio"),
        "{err}"
    );

    // A memory file of the wrong size.
    let short = dir.join("short.mem");
    std::fs::write(&short, [0u8; 4096]).unwrap();
    let snapshot = Snapshot::load(&state, &short).unwrap();
    let err = VmBuilder::new(snapshot.config().clone())
        .unwrap()
        .restore(&snapshot, RestoreMode::CopyOnWrite)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("short.mem") && err.contains("4096 bytes") && err.contains("33554432"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn fifty_clones_of_one_snapshot_run_at_once_each_on_its_own_overlay() {
    if !kvm() {
        return;
    }
    const CLONES: usize = 50;
    // Snapshotted after step 10, the original has 89 steps of 3 ms left:
    // time to pause it on a loaded host, and little for 50 clones to spin.
    const CLONE_STEPS: u64 = 100;
    let dir = temp_dir("clones");
    let base = disk(&dir);
    let snap = dir.join("snap");
    // The original writes the base image up to the snapshot, then stops:
    // the base is the disk as the snapshot saw it.
    run_and_snapshot_at(
        seq_config_of(&base, IrqchipChoice::Split, CLONE_STEPS, 3),
        &snap,
        10,
    );
    let base_before = std::fs::read(&base).unwrap();
    let snapshot = Snapshot::load_dir(&snap).unwrap();
    let started = Instant::now();
    let clones: Vec<_> = (0..CLONES)
        .map(|i| {
            let mut config = snapshot.config().clone();
            config.disks[0].overlay = Some(dir.join(format!("clone{i}.ovl")));
            let serial = Serial::default();
            let handle = VmBuilder::new(config)
                .unwrap()
                .serial_output(serial.clone())
                .restore(&snapshot, RestoreMode::CopyOnWrite)
                .unwrap()
                .start()
                .unwrap();
            (handle, serial)
        })
        .collect();
    eprintln!("{CLONES} clones restored and started in {:?}", started.elapsed());
    for (i, (handle, serial)) in clones.into_iter().enumerate() {
        let outcome = match handle.wait_timeout(Duration::from_secs(300)) {
            Ok(outcome) => outcome.unwrap(),
            Err(_) => panic!("clone {i} did not finish:\n{}", serial.text()),
        };
        let text = serial.text();
        assert_eq!(outcome, ExitReason::GuestExit(0), "clone {i}:\n{text}");
        assert!(
            text.contains(&format!(
                "seq: done: {CLONE_STEPS} steps, table checked, {CLONE_STEPS} sectors read back"
            )),
            "clone {i}:\n{text}"
        );
    }
    eprintln!("{CLONES} clones finished in {:?}", started.elapsed());
    assert!(
        std::fs::read(&base).unwrap() == base_before,
        "the base image changed"
    );
    // Each clone's writes are in its own overlay, and they differ: the
    // values mix in each clone's TSC.
    let overlays: Vec<Vec<u8>> = (0..CLONES)
        .map(|i| std::fs::read(dir.join(format!("clone{i}.ovl"))).unwrap())
        .collect();
    assert!(overlays.iter().all(|o| o.starts_with(b"KEELOVL1")));
    let distinct: std::collections::HashSet<&Vec<u8>> = overlays.iter().collect();
    assert_eq!(distinct.len(), CLONES, "every clone wrote its own data");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_diff_snapshot_holds_only_what_changed_and_merged_onto_its_base_restores() {
    if !kvm() {
        return;
    }
    let dir = temp_dir("diff");
    let disk = disk(&dir);
    let mut config = seq_config(&disk, IrqchipChoice::Split);
    config.track_dirty_pages = true;
    let serial = Serial::default();
    let handle = VmBuilder::new(config)
        .unwrap()
        .serial_output(serial.clone())
        .build()
        .unwrap()
        .start()
        .unwrap();
    let controller = handle.controller();
    // A full snapshot at step 40, then the guest goes on.
    wait_for_text(&serial, "seq: step 40\n");
    handle.pause().unwrap();
    let (base_state, base_memory) = (dir.join("base.state"), dir.join("base.mem"));
    let full = controller.snapshot(&base_state, &base_memory).unwrap();
    handle.resume().unwrap();
    // A diff at step 100.
    wait_for_text(&serial, "seq: step 100\n");
    handle.pause().unwrap();
    let (diff_state, diff_memory) = (dir.join("diff.state"), dir.join("diff.mem"));
    let diff = controller
        .snapshot_with(&diff_state, &diff_memory, keel_vmm::SnapshotKind::Diff, None)
        .unwrap();
    let before = serial.text();
    handle.stop_handle().stop();
    handle.wait().unwrap();
    eprintln!(
        "full snapshot: {} KiB of data; diff 60 steps later: {} KiB",
        full.memory.data_bytes / 1024,
        diff.memory.data_bytes / 1024
    );
    assert!(
        diff.memory.data_bytes * 2 < full.memory.data_bytes,
        "the diff ({} bytes) holds only the pages written since the full snapshot ({} bytes)",
        diff.memory.data_bytes,
        full.memory.data_bytes
    );

    // A diff alone is not a VM.
    let unmerged = Snapshot::load(&diff_state, &diff_memory).unwrap();
    let err = VmBuilder::new(unmerged.config().clone())
        .unwrap()
        .restore(&unmerged, RestoreMode::CopyOnWrite)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("this is a diff snapshot") && err.contains("merge it"),
        "{err}"
    );

    // Merged onto the full snapshot's memory, it restores the VM at step 100.
    let copied = keel_vmm::merge_diff_snapshot(&diff_state, &diff_memory, &base_memory).unwrap();
    assert_eq!(copied, diff.memory.data_bytes);
    let snapshot = Snapshot::load(&diff_state, &base_memory).unwrap();
    let after_serial = Serial::default();
    let handle = VmBuilder::new(snapshot.config().clone())
        .unwrap()
        .serial_output(after_serial.clone())
        .restore(&snapshot, RestoreMode::CopyOnWrite)
        .unwrap()
        .start()
        .unwrap();
    let outcome = handle.wait_timeout(Duration::from_secs(120));
    let after = after_serial.text();
    assert!(matches!(outcome, Ok(Ok(ExitReason::GuestExit(0)))), "{after}");
    check_continuity(&before, &after);
    let err = keel_vmm::merge_diff_snapshot(&diff_state, &diff_memory, &base_memory)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("is a full snapshot: there is nothing to merge"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_diff_snapshot_without_dirty_tracking_is_refused() {
    if !kvm() {
        return;
    }
    let dir = temp_dir("diff-untracked");
    let mut config = VmConfig::default();
    config.memory_mib = 32;
    config.cmdline = Some("snapshot-seq steps=4000 delay-ms=5".into());
    let handle = VmBuilder::new(config).unwrap().build().unwrap().start().unwrap();
    handle.pause().unwrap();
    let err = handle
        .controller()
        .snapshot_with(dir.join("s"), dir.join("m"), keel_vmm::SnapshotKind::Diff, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("needs dirty-page tracking"), "{err}");
    drop(handle);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_guest_using_its_disk_network_and_vsock_continues_after_restore() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    if !netns::usable() {
        eprintln!("SKIPPED: needs root, /dev/kvm, /dev/net/tun and iproute2");
        return;
    }
    let Some(ns) = netns::Netns::new("snapshot") else {
        eprintln!("SKIPPED: cannot create a network namespace");
        return;
    };
    const ECHO_PORT: u16 = 7777;
    let dir = temp_dir("net");
    let disk = disk(&dir);
    let snap = dir.join("snap");
    let echoed = Arc::new(AtomicU64::new(0));
    // The host end of the guest's vsock exchanges: an echo on <uds>_1235.
    const VSOCK_PORT: u32 = 1235;
    let uds = dir.join("v.sock");
    let listener = std::os::unix::net::UnixListener::bind(format!("{}_{VSOCK_PORT}", uds.display())).unwrap();
    listener.set_nonblocking(true).unwrap();
    let vsock_echoes = Arc::new(AtomicU64::new(0));
    let (before, after) = std::thread::scope(|scope| {
        {
            let (stop, count) = (ns.stop.clone(), vsock_echoes.clone());
            let listener = &listener;
            scope.spawn(move || {
                use std::io::{Read, Write};
                while !stop.load(Ordering::SeqCst) {
                    let Ok((mut conn, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    };
                    conn.set_nonblocking(false).unwrap();
                    let mut buf = [0u8; 4096];
                    // Echo until the guest shuts its side (or the
                    // connection is lost with the VM).
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 || conn.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    count.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        let runner = scope.spawn(|| {
            // The servers' sockets and the VMs' taps live in the namespace.
            ns.enter();
            let socket = std::net::UdpSocket::bind((netns::HOST_ADDR, ECHO_PORT)).unwrap();
            let (stop, count) = (ns.stop.clone(), echoed.clone());
            scope.spawn(move || netns::echo_server(socket, stop, count));
            let mut config = seq_config(&disk, IrqchipChoice::Split);
            config.cmdline = Some(format!(
                "snapshot-seq steps={STEPS} delay-ms=2 net=1 host={} me=10.0.2.15 udp-port={ECHO_PORT} \
                 vsock=1 vsock-port={VSOCK_PORT}",
                netns::HOST_ADDR
            ));
            config.nets = vec![keel_vmm::NetConfig::tap(netns::TAP.to_string())];
            config.vsock = Some(keel_vmm::VsockConfig::new(3, &uds));
            let before = run_and_snapshot(config, &snap);
            let after = restore_and_finish(&snap, RestoreMode::CopyOnWrite);
            (before, after)
        });
        let result = runner.join();
        ns.stop.store(true, Ordering::SeqCst);
        result.unwrap()
    });
    check_continuity(&before, &after);
    assert!(
        after.contains(&format!("{STEPS} datagrams echoed, {STEPS} vsock exchanges")),
        "{after}"
    );
    assert!(
        echoed.load(Ordering::SeqCst) >= STEPS,
        "the host echoed every datagram"
    );
    assert!(
        vsock_echoes.load(Ordering::SeqCst) >= STEPS,
        "the host's vsock echo served every step"
    );
    // The restored device reset the transport, as the virtio spec has it.
    assert!(after.contains("seq: vsock: 1 transport reset(s) seen"), "{after}");
    drop(ns);
    std::fs::remove_dir_all(&dir).unwrap();
}
