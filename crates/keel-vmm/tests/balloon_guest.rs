//! KVM tests of the virtio-balloon through the full VMM, driven by the
//! built-in guest's `virtio-balloon` program while the test thread plays
//! the control plane through `VmHandle::balloon`: it sets the target,
//! reads statistics and measures how much guest memory the host backs
//! (`keel_memory::resident_bytes`, `mincore(2)` over the guest's mapping)
//! before and after the guest gives pages back. Each runs over virtio-mmio
//! (`NAME::mmio`) and virtio-pci (`NAME::pci`).

#[macro_use]
mod common;
use common::Serial;
use std::time::{Duration, Instant};

use keel_vmm::{BalloonConfig, ExitReason, VirtioTransport, VmBuilder, VmConfig, VmHandle};

const MIB: u64 = 1 << 20;
/// Longest any wait here may take before the test fails as hung.
const WATCHDOG: Duration = Duration::from_secs(30);

over_both_transports!(
    inflating_gives_the_host_back_the_memory_and_deflating_gets_zeroed_pages,
    free_page_reports_give_the_host_back_their_memory,
);

fn config(transport: VirtioTransport, balloon: BalloonConfig) -> VmConfig {
    let mut config = VmConfig::default();
    config.memory_mib = 128;
    config.transport = transport;
    config.balloon = Some(balloon);
    config
}

/// A running VM, its serial output and its guest memory.
struct Running {
    handle: VmHandle,
    serial: Serial,
    mem: keel_virtio::GuestMemoryMmap,
}

fn start(config: VmConfig, cmdline: &str) -> Running {
    let serial = Serial::default();
    let vm = VmBuilder::new(config)
        .unwrap()
        .cmdline(cmdline)
        .serial_output(serial.clone())
        .build()
        .unwrap();
    let mem = vm.memory().clone();
    assert!(vm.balloon().is_some());
    Running {
        handle: vm.start().unwrap(),
        serial,
        mem,
    }
}

impl Running {
    /// Waits until the guest has printed `text`.
    fn wait_for(&self, text: &str) {
        let deadline = Instant::now() + WATCHDOG;
        while !self.serial.text().contains(text) {
            if self.handle.is_finished() || Instant::now() > deadline {
                self.handle.stop_handle().stop();
                panic!(
                    "the guest never printed {text:?}; serial:\n{}",
                    self.serial.text()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn resident(&self) -> u64 {
        keel_memory::resident_bytes(&self.mem).unwrap()
    }

    /// Waits for the guest to exit and checks it passed.
    fn assert_passed(self) {
        let Running { handle, serial, .. } = self;
        let exit = match handle.wait_timeout(WATCHDOG) {
            Ok(result) => result.unwrap(),
            Err(handle) => {
                handle.stop_handle().stop();
                panic!("the guest hung; serial:\n{}", serial.text());
            }
        };
        let text = serial.text();
        assert_eq!(exit, ExitReason::GuestExit(0), "serial:\n{text}");
        assert!(
            text.contains("keel-guest: virtio-balloon: PASS"),
            "serial:\n{text}"
        );
        assert!(!text.contains("FAIL"), "serial:\n{text}");
    }
}

fn inflating_gives_the_host_back_the_memory_and_deflating_gets_zeroed_pages(transport: VirtioTransport) {
    let mut balloon = BalloonConfig::new(0);
    balloon.deflate_on_oom = true;
    balloon.stats_polling_interval_s = 1;
    let vm = start(
        config(transport, balloon),
        "virtio-balloon touch-mib=64 deflate=1 stats-rounds=2",
    );
    let control = vm.handle.balloon().unwrap().clone();

    vm.wait_for("virtio-balloon: waiting for a target");
    let before = vm.resident();
    control.update_target_mib(64).unwrap();
    vm.wait_for("virtio-balloon: inflated 16384 pages (64 MiB), actual 16384");
    let after = vm.resident();
    let inflated = 64 * MIB;
    eprintln!(
        "{transport}: guest memory resident {} KiB before inflating 64 MiB, {} KiB after: {:.1} % of the balloon released",
        before / 1024,
        after / 1024,
        (before.saturating_sub(after)) as f64 * 100.0 / inflated as f64
    );
    assert!(
        before.saturating_sub(after) >= inflated * 9 / 10,
        "resident {before} -> {after} bytes: less than 90 % of {inflated} released"
    );
    assert_eq!(control.actual_mib(), 64);
    let counters = control.counters();
    assert_eq!(counters.inflated_pages, 16384);
    assert_eq!(counters.ignored_pages, 0);

    // Statistics: the guest's answer to a request made by the device's
    // timer carries the pages it touched and what is left free.
    vm.wait_for("virtio-balloon: answered statistics request 2");
    let stats = control.statistics().unwrap();
    assert_eq!((stats.target_mib, stats.actual_mib), (64, 64));
    assert_eq!(stats.minor_faults, Some(16384), "{stats:?}");
    assert_eq!(stats.free_memory, Some((128 - 16 - 64) * MIB), "{stats:?}");
    assert!(stats.total_memory.is_some_and(|t| t > 120 * MIB), "{stats:?}");

    vm.wait_for("virtio-balloon: waiting for a smaller target");
    control.update_target_mib(16).unwrap();
    vm.wait_for("virtio-balloon: deflated 12288 pages, actual 4096; 12288 of them read back as zero");
    assert_eq!(control.counters().deflated_pages, 12288);
    vm.assert_passed();
}

fn free_page_reports_give_the_host_back_their_memory(transport: VirtioTransport) {
    let mut balloon = BalloonConfig::new(0);
    balloon.free_page_reporting = true;
    let vm = start(
        config(transport, balloon),
        "virtio-balloon touch-mib=64 report-mib=32",
    );
    let control = vm.handle.balloon().unwrap().clone();
    assert!(matches!(
        control.statistics(),
        Err(keel_virtio::BalloonError::StatisticsDisabled)
    ));

    vm.wait_for("virtio-balloon: waiting for a target");
    let before = vm.resident();
    control.update_target_mib(16).unwrap();
    vm.wait_for("virtio-balloon: reported 32 MiB of free pages");
    let after = vm.resident();
    let given_back = (16 + 32) * MIB;
    eprintln!(
        "{transport}: guest memory resident {} KiB before, {} KiB after a 16 MiB balloon and 32 MiB of free page reports",
        before / 1024,
        after / 1024
    );
    assert!(
        before.saturating_sub(after) >= given_back * 9 / 10,
        "resident {before} -> {after} bytes: less than 90 % of {given_back} released"
    );
    let counters = control.counters();
    assert_eq!(counters.reported_bytes, 32 * MIB);
    assert_eq!(counters.reports, 16, "2 MiB per report");
    vm.assert_passed();
}
