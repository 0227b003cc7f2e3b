//! A soak: 500 VMs with virtio devices started, run and stopped in one
//! process, two at a time. Open file descriptors, threads and resident
//! memory must come back to where they were.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel_virtio::{BlockOptions, MemoryBackend};
use keel_vmm::{BalloonConfig, ExitReason, VirtioTransport, VmBuilder, VmConfig};

fn kvm() -> bool {
    std::path::Path::new("/dev/kvm").exists()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// One VM: a disk, virtio-rng and a balloon on `transport`; the guest
/// reads from the rng (and its interrupts) and exits.
fn one_vm(transport: VirtioTransport) {
    let mut config = VmConfig::default();
    config.memory_mib = 32;
    config.transport = transport;
    config.rng = true;
    config.balloon = Some(BalloonConfig::new(0));
    config.cmdline = Some("virtio-rng".into());
    let mut builder = VmBuilder::new(config).unwrap();
    builder
        .add_disk(MemoryBackend::new(64 * 1024), BlockOptions::default())
        .unwrap();
    let outcome = builder
        .build()
        .unwrap()
        .start()
        .unwrap()
        .wait_timeout(Duration::from_secs(30));
    match outcome {
        Ok(Ok(ExitReason::GuestExit(0))) => {}
        Ok(other) => panic!("a soak VM ended with {other:?}"),
        Err(_) => panic!("a soak VM did not finish"),
    }
}

#[test]
fn five_hundred_vms_two_at_a_time_leave_no_descriptors_threads_or_memory_behind() {
    if !kvm() {
        return;
    }
    const VMS: usize = 500;
    // Warm up: what is made once per process (the kick signal handler,
    // the host's CPUID cache, the allocator's arenas) is made here.
    for _ in 0..10 {
        one_vm(VirtioTransport::Mmio);
        one_vm(VirtioTransport::Pci);
    }
    let (fds, tasks, rss) = (open_fds(), threads(), rss_kib());
    let started = Instant::now();
    let done = Arc::new(Mutex::new(0usize));
    let workers: Vec<_> = (0..2)
        .map(|w| {
            let done = done.clone();
            std::thread::spawn(move || {
                for i in 0..VMS / 2 {
                    // Alternate transports, so both are soaked.
                    one_vm(if (i + w) % 2 == 0 {
                        VirtioTransport::Mmio
                    } else {
                        VirtioTransport::Pci
                    });
                    *done.lock().unwrap() += 1;
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(*done.lock().unwrap(), VMS);
    let elapsed = started.elapsed();
    // Threads that ended may take a moment to leave /proc.
    let deadline = Instant::now() + Duration::from_secs(5);
    while threads() > tasks && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let (fds_after, tasks_after, rss_after) = (open_fds(), threads(), rss_kib());
    println!(
        "soak: {VMS} VMs (disk, rng, balloon; mmio and pci) in {:.1} s: open fds {fds} -> {fds_after}, \
         threads {tasks} -> {tasks_after}, RSS {rss} KiB -> {rss_after} KiB",
        elapsed.as_secs_f64()
    );
    assert_eq!(fds_after, fds, "open file descriptors leaked");
    assert_eq!(tasks_after, tasks, "threads leaked");
    assert!(
        rss_after <= rss + 4 * 1024,
        "RSS grew by {} KiB over {VMS} VMs",
        rss_after.saturating_sub(rss)
    );
}
