//! KVM tests of the devices' rate limiters through the full VMM: the
//! built-in guest's `virtio-blk-bench` runs against a disk limited to
//! 4 MiB/s and must see that rate within ±10 %, measured by the guest's own
//! clock (its TSC, at the rate the host measures for it) over more than a
//! second of throttled transfer each way.
//! The limiter resumes the queue from its timerfd; nothing polls.

#[macro_use]
mod common;
use std::path::PathBuf;
use std::time::Duration;

use keel_vmm::{
    DiskConfig, ExitReason, RateLimiterConfig, TokenBucketConfig, VirtioTransport, VmBuilder, VmConfig,
};

/// Longest any VM here may run before the test fails as hung.
const WATCHDOG: Duration = Duration::from_secs(60);
/// The configured rate: 41 943 bytes per 10 ms, 4 MiB/s to 0.001 %.
const BUCKET_BYTES: u64 = 41_943;
const REFILL_MS: u64 = 10;
const RATE: f64 = (BUCKET_BYTES * 1000 / REFILL_MS) as f64;

over_both_transports!(a_bandwidth_limited_disk_runs_at_the_configured_rate);

struct Image(PathBuf);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn run(config: VmConfig, cmdline: &str) -> String {
    let (result, text) = common::run_guest(VmBuilder::new(config).unwrap(), cmdline, WATCHDOG);
    match result {
        Ok(exit) => assert_eq!(exit, ExitReason::GuestExit(0), "serial:\n{text}"),
        Err(e) => panic!("the VMM failed running `{cmdline}`: {e}\nserial:\n{text}"),
    }
    text
}

/// The TSC's rate on this host, against the monotonic clock. The guest's
/// TSC ticks at the same rate (KVM offsets it, never scales it here).
/// Each of three 200 ms measurements reads the clock and the TSC back to
/// back at both ends; the median leaves out one that was preempted
/// between the two reads.
fn host_tsc_hz() -> f64 {
    let pair = || {
        let now = std::time::Instant::now();
        // SAFETY: RDTSC reads a counter; every x86_64 CPU has it.
        let tsc = unsafe { core::arch::x86_64::_rdtsc() };
        (now, tsc)
    };
    let mut rates: Vec<f64> = (0..3)
        .map(|_| {
            let (t0, c0) = pair();
            std::thread::sleep(Duration::from_millis(200));
            let (t1, c1) = pair();
            (c1 - c0) as f64 / (t1 - t0).as_secs_f64()
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[1]
}

/// The mmio and pci runs of this binary take turns: two guests polling
/// their disks at once would share two cores with everything else, and the
/// figure measured is the limiter's, not the scheduler's.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The guest-measured milliseconds of a `virtio-blk-bench: vda: WHAT N x
/// SIZE bytes …` line: its own figure when the guest knew its TSC
/// frequency (`in T ms`), else its TSC cycles per request at the host's
/// TSC rate.
fn guest_millis(serial: &str, what: &str, count: u64, tsc_hz: f64) -> f64 {
    let prefix = format!("virtio-blk-bench: vda: {what} ");
    let line = serial
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no {what} figure; serial:\n{serial}"));
    if let Some(rest) = line.split(" bytes in ").nth(1) {
        return rest.split(" ms").next().unwrap().parse().unwrap();
    }
    let cycles: f64 = line
        .split(" bytes: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected figure: {line}"));
    cycles * count as f64 / tsc_hz * 1000.0
}

fn a_bandwidth_limited_disk_runs_at_the_configured_rate(transport: VirtioTransport) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let image = Image(std::env::temp_dir().join(format!(
        "keel-rate-limit-{}-{transport:?}.img",
        std::process::id()
    )));
    std::fs::File::create(&image.0)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let mut disk = DiskConfig::new(image.0.clone());
    // A small bucket and no burst: the rate holds from the first request.
    disk.rate_limiter = Some(RateLimiterConfig::new(
        Some(TokenBucketConfig::new(BUCKET_BYTES, REFILL_MS)),
        None,
    ));
    let mut config = VmConfig::default();
    config.memory_mib = 32;
    config.transport = transport;
    config.disks = vec![disk];

    // 1536 x 4 KiB = 6 MiB each way: 1.5 s of throttled transfer.
    let (count, size) = (1536u64, 4096u64);
    let serial = run(config, &format!("virtio-blk-bench size={size} count={count}"));
    let tsc_hz = host_tsc_hz();
    for what in ["write", "read"] {
        let millis = guest_millis(&serial, what, count, tsc_hz);
        let rate = (count * size) as f64 * 1000.0 / millis;
        println!(
            "{transport:?} {what}: {} bytes in {millis:.1} ms (guest TSC): {:.3} MiB/s, {:+.2} % of the configured {:.3} MiB/s",
            count * size,
            rate / f64::from(1 << 20),
            (rate / RATE - 1.0) * 100.0,
            RATE / f64::from(1 << 20),
        );
        assert!(millis >= 1000.0, "{what}: only {millis} ms of throttled time");
        assert!(
            (rate / RATE - 1.0).abs() <= 0.10,
            "{what}: {rate:.0} B/s is not within 10 % of {RATE} B/s"
        );
    }
}
