//! virtio-mmio next to virtio-pci, side by side in one run: what each
//! transport costs at start-up and per request, to choose the default.
//!
//! ```text
//! cargo bench --bench virtio_transport          # 30 start-ups and 5 request runs per case
//! cargo bench --bench virtio_transport -- 60 9  # start-ups, request runs
//! ```
//!
//! - **start-up**: a VM with N virtio-blk disks (N = 0, 1 and 8, sparse 1 MiB
//!   images) is built, runs the built-in guest's `exit code=0` (which
//!   touches no device) and is torn down: what attaching the devices costs
//!   the VMM (MMIO windows, GSIs and irqfds; or PCI functions, BARs, MSI-X
//!   vectors on irqfds and routes, ioeventfds placed when the bus assigns
//!   the BAR). Median and minimum wall time of the build → exit → drop.
//! - **driver bring-up**: the same VM with 8 disks running `virtio-blk
//!   event-idx=0`, which brings every disk up (reset, features, queue,
//!   DRIVER_OK; over PCI also enumeration, BAR and capability reads, the
//!   MSI-X table and vectors) and runs 17 interrupt-driven requests on
//!   each; median wall time.
//! - **request latency**: the guest's `virtio-blk-bench size=4096
//!   count=4000` (one request at a time, completion polled), with
//!   interrupts suppressed and with `irq=1` (each completion also raises
//!   the device's interrupt: an IOAPIC pin's MSI route, or an MSI-X
//!   vector's), median of the runs' cycles per request.
//!
//! Cases alternate transports run by run, so both see the same machine.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use keel_vmm::{DiskConfig, ExitReason, SerialMode, VirtioTransport, VmBuilder, VmConfig};

struct Images(PathBuf, Vec<PathBuf>);

impl Images {
    fn new(count: usize) -> Self {
        let dir = std::env::temp_dir().join(format!("keel-transport-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let paths = (0..count)
            .map(|i| {
                let path = dir.join(format!("d{i}.img"));
                std::fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
                path
            })
            .collect();
        Self(dir, paths)
    }

    fn disks(&self, n: usize) -> Vec<DiskConfig> {
        self.1[..n]
            .iter()
            .map(|path| {
                let mut disk = DiskConfig::new(path.clone());
                disk.read_only = false;
                disk.id = None;
                disk.transport = None;
                disk
            })
            .collect()
    }
}

impl Drop for Images {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Boots `cmdline` with `disks` on `transport`; the wall time and serial.
fn run(transport: VirtioTransport, disks: Vec<DiskConfig>, cmdline: &str) -> (Duration, String) {
    let serial = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let config = {
        let mut config = VmConfig::default();
        config.memory_mib = 64;
        config.serial = SerialMode::None;
        config.disks = disks;
        config.transport = transport;
        config
    };
    let start = Instant::now();
    let vm = VmBuilder::new(config)
        .unwrap()
        .cmdline(cmdline)
        .serial_output(Sink(serial.clone()))
        .build()
        .unwrap();
    let exit = vm.run().unwrap();
    let elapsed = start.elapsed();
    let text = String::from_utf8_lossy(&serial.lock().unwrap()).replace('\r', "");
    assert_eq!(exit, ExitReason::GuestExit(0), "{cmdline}:\n{text}");
    (elapsed, text)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .filter_map(|a| a.parse().ok())
        .collect();
    // `cargo test --benches` runs this too: keep that short.
    let testing = !std::env::args().any(|a| a == "--bench");
    let startups = args.first().copied().unwrap_or(if testing { 2 } else { 30 });
    let request_runs = args.get(1).copied().unwrap_or(if testing { 1 } else { 5 });
    let images = Images::new(8);
    let transports = [VirtioTransport::Mmio, VirtioTransport::Pci];

    println!("start-up (build → exit code=0 → teardown), {startups} runs each, wall ms:");
    for disks in [0usize, 1, 8] {
        let mut times = [Vec::new(), Vec::new()];
        for _ in 0..startups {
            for (i, &t) in transports.iter().enumerate() {
                let (elapsed, _) = run(t, images.disks(disks), "exit code=0");
                times[i].push(elapsed.as_secs_f64() * 1e3);
            }
        }
        for (i, t) in transports.iter().enumerate() {
            let min = times[i].iter().copied().fold(f64::MAX, f64::min);
            println!(
                "  {disks} disk(s) over {t:<4}: median {:.2} ms, min {min:.2} ms",
                median(times[i].clone())
            );
        }
    }

    println!("driver bring-up and 17 requests on each of 8 disks (virtio-blk event-idx=0), {request_runs} runs, wall ms:");
    let mut times = [Vec::new(), Vec::new()];
    for _ in 0..request_runs {
        for (i, &t) in transports.iter().enumerate() {
            let (elapsed, text) = run(t, images.disks(8), "virtio-blk event-idx=0");
            assert!(text.contains("virtio-blk: PASS"), "{text}");
            times[i].push(elapsed.as_secs_f64() * 1e3);
        }
    }
    for (i, t) in transports.iter().enumerate() {
        println!("  over {t:<4}: median {:.1} ms", median(times[i].clone()));
    }

    for irq in [0, 1] {
        println!(
            "request latency (virtio-blk-bench size=4096 count=4000 irq={irq}), {request_runs} runs, median per request:"
        );
        let mut figures = [[Vec::new(), Vec::new()], [Vec::new(), Vec::new()]];
        let mut unit = String::new();
        for _ in 0..request_runs {
            for (i, &t) in transports.iter().enumerate() {
                let cmdline = format!("virtio-blk-bench size=4096 count=4000 irq={irq}");
                let (_, text) = run(t, images.disks(1), &cmdline);
                for (k, what) in ["write", "read"].iter().enumerate() {
                    let line = text
                        .lines()
                        .find(|l| l.contains(&format!(": {what} 4000 x 4096 bytes")))
                        .unwrap_or_else(|| panic!("no {what} figure:\n{text}"));
                    let (value, per) = per_request(line);
                    unit = per;
                    figures[i][k].push(value);
                }
            }
        }
        for (k, what) in ["write", "read"].iter().enumerate() {
            let mmio = median(figures[0][k].clone());
            let pci = median(figures[1][k].clone());
            println!(
                "  4 KiB {what}: mmio {mmio:.0} {unit}, pci {pci:.0} {unit} (pci/mmio {:.2})",
                pci / mmio
            );
        }
    }
}

/// The TSC cycles per request in a `virtio-blk-bench` result line (`… K
/// cycles/request` with a known TSC frequency, `… N TSC cycles per
/// request` without), and the unit.
fn per_request(line: &str) -> (f64, String) {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| *w == "cycles/request" || *w == "TSC")
        .unwrap_or_else(|| panic!("no per-request figure in {line:?}"));
    let value = words[at - 1]
        .parse()
        .unwrap_or_else(|_| panic!("no number before {:?} in {line:?}", words[at]));
    (value, "TSC cycles".to_string())
}
