//! A guest that makes the VMM complain as fast as it can (the built-in
//! guest's `flood` program: notifications of a missing queue, reads past
//! the end of a disk, IOAPIC entries with a reserved delivery mode) must not
//! flood the VMM's log: each call site logs a bounded number of lines per
//! window and counts the rest (`keel_ratelimit::suppressed_log_lines`).
//!
//! Its own test binary, because it installs a process-wide logger.

#[macro_use]
mod common;
use common::Serial;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use keel_vmm::{DiskConfig, ExitReason, VirtioTransport, VmBuilder, VmConfig};

/// Counts the lines a logger at the CLI's default level (warn) would print.
struct CountingLogger;

static LINES: AtomicU64 = AtomicU64::new(0);

impl log::Log for CountingLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            LINES.fetch_add(1, Ordering::Relaxed);
        }
    }
    fn flush(&self) {}
}

#[test]
fn a_flooding_guest_gets_a_bounded_number_of_log_lines_and_the_rest_are_counted() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: no /dev/kvm");
        return;
    }
    log::set_logger(&CountingLogger).unwrap();
    log::set_max_level(log::LevelFilter::Warn);
    let image = std::env::temp_dir().join(format!("keel-log-flood-{}", std::process::id()));
    std::fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
    let serial = Serial::default();
    let flood_ms = 2000;
    let config = {
        let mut config = VmConfig::default();
        config.memory_mib = 32;
        config.transport = VirtioTransport::Mmio;
        config.cmdline = Some(format!("flood ms={flood_ms}"));
        config.disks = vec![{
            let mut disk = DiskConfig::new(image.clone());
            disk.read_only = false;
            disk.id = None;
            disk.transport = None;
            disk
        }];
        config
    };
    let suppressed_before = keel_ratelimit::suppressed_log_lines();
    let started = Instant::now();
    let reason = VmBuilder::new(config)
        .unwrap()
        .serial_output(serial.clone())
        .build()
        .unwrap()
        .run()
        .unwrap();
    let seconds = started.elapsed().as_secs_f64();
    std::fs::remove_file(&image).unwrap();
    let text = serial.text();
    assert_eq!(reason, ExitReason::GuestExit(0), "{text}");
    let rounds: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("flood: ")?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no flood summary: {text}"));
    let logged = LINES.load(Ordering::Relaxed);
    let suppressed = keel_ratelimit::suppressed_log_lines() - suppressed_before;
    eprintln!(
        "flood: {rounds} rounds in {seconds:.2} s: {} lines/s would have been logged, {:.1} lines/s were ({logged} lines, {suppressed} suppressed)",
        ((logged + suppressed) as f64 / seconds) as u64,
        logged as f64 / seconds
    );
    assert!(
        rounds > 100,
        "the guest flooded too little to tell: {rounds} rounds"
    );
    // Three kinds of complaint, each allowed LINES_PER_WINDOW lines plus
    // one summary per window, over at most two windows of a 2 s flood.
    let windows = flood_ms / keel_ratelimit::WINDOW_MS + 2;
    let bound = 3 * (keel_ratelimit::LINES_PER_WINDOW + 1) * windows;
    assert!(logged <= bound, "{logged} lines logged (bound {bound})");
    // Every complaint that was not logged was counted.
    assert!(
        logged + suppressed >= 3 * rounds,
        "{logged} + {suppressed} < 3 × {rounds}"
    );
}
