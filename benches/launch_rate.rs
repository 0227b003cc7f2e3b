//! Launch rate: how many VMs one process creates, runs to the guest's exit
//! and tears down per second, with 1 and 2 threads launching in parallel.
//!
//! ```text
//! cargo bench --bench launch_rate            # 5 s per thread count
//! cargo bench --bench launch_rate -- 10      # seconds per thread count
//! ```
//!
//! Each VM: 1 vCPU, 128 MiB, the built-in guest's `exit code=0` program,
//! serial output discarded. Firecracker publishes 5 VMs per core per second
//! (its microVMs start a kernel, so the comparison is loose).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_vmm::{ExitReason, SerialMode, VmBuilder, VmConfig};

fn one_vm() {
    let config = {
        let mut config = VmConfig::default();
        config.memory_mib = 128;
        config.serial = SerialMode::None;
        config
    };
    let vm = VmBuilder::new(config)
        .unwrap()
        .cmdline("exit code=0")
        .build()
        .unwrap();
    assert_eq!(vm.run().unwrap(), ExitReason::GuestExit(0));
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    // `cargo test --benches` runs this too: keep that short.
    let testing = !std::env::args().any(|a| a == "--bench");
    let seconds: f64 = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or(if testing { 0.2 } else { 5.0 });
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("launch rate: {seconds} s per run, {cores} host cores");
    for threads in [1usize, 2] {
        let done = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let (done, stop) = (done.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        one_vm();
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs_f64(seconds));
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        let elapsed = start.elapsed().as_secs_f64();
        let n = done.load(Ordering::Relaxed);
        let rate = n as f64 / elapsed;
        println!(
            "{threads} thread(s): {n} VMs in {elapsed:.2} s = {rate:.1} VMs/s ({:.1} per core used; Firecracker: 5 per core)",
            rate / threads.min(cores) as f64
        );
    }
}
