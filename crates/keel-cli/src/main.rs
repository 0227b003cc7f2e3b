//! `keel`: run a KVM virtual machine.
//!
//! A thin user of `keel-vmm`: flags and an optional JSON file become a
//! `VmConfig`; the serial console is this process's stdout. Without
//! `--kernel` it boots Keel's built-in test guest.

// The flags' doc comments are clap's help text, written for a terminal
// (`PATH[,ro]`, `<port>`), not rustdoc markup.
#![allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]

mod logger;
mod terminal;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use clap::Parser;
use keel_vmm::keel_seccomp::ThreadRole;
use keel_vmm::{
    BootProtocolChoice, ExitReason, IrqchipChoice, Ring0Choice, SeccompLevel, SerialMode, VmBuilder, VmConfig,
};
use terminal::{EscapeFilter, RawMode, StdinFd};

/// Run a KVM virtual machine.
///
/// With no --kernel, boots Keel's built-in test guest (its command line
/// picks a program: hello, mmio-rw, exit code=N, reset, int3, ...).
///
/// Exit status: 0 when the guest resets or powers off, the guest's status
/// when it writes one to the exit port, 1 on a triple fault or any error.
#[derive(Parser, Debug)]
#[command(name = "keel", version)]
struct Args {
    /// Kernel image: ELF vmlinux or bzImage. Default: the built-in test guest.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,

    /// Kernel command line.
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,

    /// Initial RAM disk (initramfs) for a Linux kernel.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,

    /// A virtio-blk disk: PATH[,ro][,id=NAME][,transport=mmio|pci]. Repeat
    /// for more (vda, vdb, …).
    #[arg(long, value_name = "PATH[,ro][,id=NAME]")]
    disk: Vec<keel_vmm::DiskConfig>,

    /// A virtio-net card on a host tap device: tap=NAME[,mac=MAC], or fd=N for
    /// an inherited, already-open tap; [,transport=mmio|pci]. Repeatable.
    #[arg(long, value_name = "tap=NAME|fd=N[,mac=MAC]")]
    net: Vec<keel_vmm::NetConfig>,

    /// A virtio-vsock device: cid=N,uds=PATH[,transport=mmio|pci]
    /// (Firecracker's hybrid vsock: host connects to PATH and sends
    /// "CONNECT <port>\n"; the guest's connections to port P reach PATH_P).
    #[arg(long, value_name = "cid=N,uds=PATH")]
    vsock: Option<keel_vmm::VsockConfig>,

    /// The virtio transport of devices that do not choose their own: pci
    /// (virtio-pci with MSI-X) or mmio (virtio-mmio, IOAPIC pins, 15 devices
    /// at most; for kernels without virtio-pci) [default: pci].
    #[arg(long, value_name = "TRANSPORT")]
    transport: Option<keel_vmm::VirtioTransport>,

    /// Add a virtio-rng device fed by the host's getrandom.
    #[arg(long)]
    rng: bool,

    /// No ACPI tables: an MP table and virtio_mmio.device= command-line
    /// entries instead, for kernels built without ACPI.
    #[arg(long)]
    no_acpi: bool,

    /// A virtio-console (hvc0): stdio (output), file:PATH or socket:PATH.
    #[arg(long, value_name = "MODE")]
    console: Option<keel_vmm::ConsoleConfig>,

    /// Serial console: none, stdio (output to stdout, input from stdin;
    /// on a terminal, Ctrl-A x quits) or file:PATH [default: stdio].
    #[arg(long, value_name = "MODE")]
    serial: Option<SerialMode>,

    /// How to enter the kernel: auto (PVH when the ELF has a PVH note),
    /// linux64 or pvh [default: auto].
    #[arg(long, value_name = "PROTOCOL", value_parser = parse_boot_protocol)]
    boot_protocol: Option<BootProtocolChoice>,

    /// Whether this host's KVM emulates guest ring 0 (then Linux gets
    /// workarounds): auto (probe), hardware or emulated [default: auto].
    #[arg(long, value_name = "MODE", value_parser = parse_ring0)]
    ring0: Option<Ring0Choice>,

    /// Interrupt controllers: split (KVM emulates the local APICs, keel the
    /// IOAPIC; no PIC, no PIT) or kernel (KVM's PIC, IOAPIC and PIT, for
    /// guests that need a PIC or PIT) [default: split].
    #[arg(long, value_name = "MODE", value_parser = parse_irqchip)]
    irqchip: Option<IrqchipChoice>,

    /// Number of vCPUs [default: 1].
    #[arg(long, value_name = "N")]
    cpus: Option<u8>,

    /// Guest memory, in MiB unless suffixed with K, M, G or T (e.g. 512M, 2G) [default: 128M].
    #[arg(long, value_name = "SIZE", value_parser = parse_size_mib)]
    memory: Option<u64>,

    /// Read settings from a JSON file (keys: vcpus, memory_mib, kernel,
    /// cmdline, initrd, boot_protocol, ring0, irqchip, pit_reinject, serial,
    /// disks, rng, console, nets, vsock, transport); flags given on the command line override it
    /// (--disk and --net add to its lists).
    #[arg(long, value_name = "FILE.json")]
    config: Option<PathBuf>,

    /// Serve Firecracker's HTTP API on this Unix socket and wait for the
    /// VM's configuration and InstanceStart (or boot at once from
    /// --config-file). The process exits when the VM ends.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,

    /// Boot from a configuration in Firecracker's config-file format
    /// (boot-source, drives, machine-config, network-interfaces, vsock,
    /// entropy, balloon, logger, metrics), with or without --api-sock.
    #[arg(long, value_name = "FILE.json")]
    config_file: Option<PathBuf>,

    /// Restore the VM saved in DIR (vm.state and vm.mem, as written by
    /// PUT /snapshot/create or VmController::snapshot_to_dir) and continue
    /// it. --disk, --net, --vsock and --console replace the snapshot's
    /// (same number, same order: a clone's own backends); --serial says
    /// where its serial console goes. The machine itself (--cpus,
    /// --memory, --kernel, ...) is the snapshot's.
    #[arg(long, value_name = "DIR")]
    restore: Option<PathBuf>,

    /// With --restore: read the memory file into memory instead of
    /// mapping it copy-on-write (the file may then change or go away).
    #[arg(long, requires = "restore")]
    restore_copy: bool,

    /// Merge the diff snapshot in DIR (PUT /snapshot/create with
    /// snapshot_type Diff, files vm.state and vm.mem) into the snapshot it
    /// followed, in --into: that directory then holds the VM as the diff
    /// saw it, for --restore. Merge a chain of diffs oldest first.
    #[arg(long, value_name = "DIR", requires = "into")]
    merge_diff: Option<PathBuf>,

    /// With --merge-diff: the snapshot directory the diff followed.
    #[arg(long, value_name = "DIR", requires = "merge_diff")]
    into: Option<PathBuf>,

    /// The VM's ID, as `GET /` reports it.
    #[arg(long, value_name = "ID", default_value = "keel-vm")]
    id: String,

    /// KVM device node.
    #[arg(long, value_name = "PATH", default_value = keel_vmm::DEFAULT_KVM_DEVICE)]
    kvm_device: PathBuf,

    /// Log level: error, warn, info, debug, trace (or RUST_LOG).
    #[arg(long, value_name = "LEVEL", default_value = "warn")]
    log_level: String,

    /// Seccomp filters, one per thread role (docs/security.md): kill (a
    /// system call outside the thread's role ends the process, naming the
    /// call), log (the kernel logs it and lets it through, for debugging)
    /// or off [default: kill, or the --config file's "seccomp"].
    #[arg(long, value_name = "LEVEL", value_parser = parse_seccomp_level)]
    seccomp_level: Option<SeccompLevel>,

    /// No seccomp filters (Firecracker's flag; --seccomp-level off).
    #[arg(long, conflicts_with = "seccomp_level")]
    no_seccomp: bool,
}

impl Args {
    /// The seccomp level the flags ask for, if they do.
    fn seccomp(&self) -> Option<SeccompLevel> {
        if self.no_seccomp {
            Some(SeccompLevel::Off)
        } else {
            self.seccomp_level
        }
    }
}

fn parse_seccomp_level(s: &str) -> Result<SeccompLevel, String> {
    s.parse()
        .map_err(|e: keel_vmm::keel_seccomp::Error| e.to_string())
}

/// Installs `role`'s seccomp filter on the calling thread (and so on the
/// threads it starts afterwards).
fn confine(role: ThreadRole, level: SeccompLevel) -> Result<(), String> {
    keel_vmm::keel_seccomp::apply(role, level).map_err(|e| e.to_string())
}

fn parse_boot_protocol(s: &str) -> Result<BootProtocolChoice, String> {
    match s {
        "auto" => Ok(BootProtocolChoice::Auto),
        "linux64" => Ok(BootProtocolChoice::Linux64),
        "pvh" => Ok(BootProtocolChoice::Pvh),
        _ => Err(format!("boot protocol {s:?}: expected auto, linux64 or pvh")),
    }
}

fn parse_irqchip(s: &str) -> Result<IrqchipChoice, String> {
    match s {
        "split" => Ok(IrqchipChoice::Split),
        "kernel" => Ok(IrqchipChoice::Kernel),
        _ => Err(format!("irqchip {s:?}: expected split or kernel")),
    }
}

fn parse_ring0(s: &str) -> Result<Ring0Choice, String> {
    match s {
        "auto" => Ok(Ring0Choice::Auto),
        "hardware" => Ok(Ring0Choice::Hardware),
        "emulated" => Ok(Ring0Choice::Emulated),
        _ => Err(format!("ring0 {s:?}: expected auto, hardware or emulated")),
    }
}

/// Parses `512`, `512M`, `2G`, `1T`, `65536K` into MiB.
fn parse_size_mib(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "M"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("memory size {s:?}: expected a number with an optional K, M, G or T suffix"))?;
    let overflow = || format!("memory size {s:?}: too large");
    match unit.to_ascii_uppercase().trim_end_matches(['B', 'I']) {
        "K" => {
            if !n.is_multiple_of(1024) {
                return Err(format!("memory size {s:?}: must be a whole number of MiB"));
            }
            Ok(n / 1024)
        }
        "M" => Ok(n),
        "G" => n.checked_mul(1024).ok_or_else(overflow),
        "T" => n.checked_mul(1024 * 1024).ok_or_else(overflow),
        _ => Err(format!(
            "memory size {s:?}: unknown unit {unit:?} (use K, M, G or T)"
        )),
    }
}

fn config_from(args: &Args) -> Result<VmConfig, String> {
    let mut config = match &args.config {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("config file {}: {e}", path.display()))?;
            let mut config =
                VmConfig::from_json(&text).map_err(|e| format!("config file {}: {e}", path.display()))?;
            // The library's default console goes nowhere; this command's
            // goes to the terminal unless the file says otherwise.
            let names_serial = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .is_some_and(|v| v.get("serial").is_some());
            if !names_serial {
                config.serial = SerialMode::Stdio;
            }
            config
        }
        None => {
            let mut config = VmConfig::default();
            config.serial = SerialMode::Stdio;
            config
        }
    };
    if let Some(k) = &args.kernel {
        config.kernel = Some(k.clone());
    }
    if let Some(c) = &args.cmdline {
        config.cmdline = Some(c.clone());
    }
    if let Some(n) = args.cpus {
        config.vcpus = n;
    }
    if let Some(m) = args.memory {
        config.memory_mib = m;
    }
    if let Some(i) = &args.initrd {
        config.initrd = Some(i.clone());
    }
    if let Some(s) = &args.serial {
        config.serial = s.clone();
    }
    if let Some(p) = args.boot_protocol {
        config.boot_protocol = p;
    }
    if let Some(r) = args.ring0 {
        config.ring0 = r;
    }
    if let Some(i) = args.irqchip {
        config.irqchip = i;
    }
    if let Some(t) = args.transport {
        config.transport = t;
    }
    config.disks.extend(args.disk.iter().cloned());
    config.nets.extend(args.net.iter().cloned());
    if let Some(v) = &args.vsock {
        config.vsock = Some(v.clone());
    }
    if args.rng {
        config.rng = true;
    }
    if args.no_acpi {
        config.acpi = false;
    }
    if let Some(c) = &args.console {
        config.console = Some(c.clone());
    }
    if let Some(level) = args.seccomp() {
        config.seccomp = level;
    }
    Ok(config)
}

fn run(args: &Args, process_start: Instant) -> Result<ExitReason, String> {
    let config = config_from(args)?;
    // Built from the command line and files its user gave, before any
    // guest code runs; filtered from the moment the guest runs (the VM's
    // threads install their own filters, this one narrows to main's).
    let seccomp = config.seccomp;
    let stdio = config.serial == SerialMode::Stdio;
    let mut builder = VmBuilder::new(config)
        .map_err(|e| e.to_string())?
        .kvm_device(&args.kvm_device)
        .start_time(process_start);
    let stop = Arc::new(OnceLock::new());
    let mut _raw_mode = None;
    if stdio && terminal::stdin_is_pollable() {
        _raw_mode = RawMode::enable(libc::STDIN_FILENO);
        builder = builder.serial_input(EscapeFilter::new(StdinFd, stop.clone()));
    }
    let handle = builder
        .build()
        .and_then(|vm| vm.start())
        .map_err(|e| e.to_string())?;
    let _ = stop.set(handle.stop_handle());
    if let Err(e) = confine(ThreadRole::Main, seccomp) {
        handle.stop_handle().stop();
        let _ = handle.wait();
        return Err(e);
    }
    handle.wait().map_err(|e| e.to_string())
}

/// `--restore DIR`: the snapshot's configuration with this command's
/// backend overrides.
fn restore_config(args: &Args, snapshot: &keel_vmm::Snapshot) -> Result<VmConfig, String> {
    let machine_flags = [
        ("--kernel", args.kernel.is_some()),
        ("--cmdline", args.cmdline.is_some()),
        ("--initrd", args.initrd.is_some()),
        ("--cpus", args.cpus.is_some()),
        ("--memory", args.memory.is_some()),
        ("--config", args.config.is_some()),
        ("--boot-protocol", args.boot_protocol.is_some()),
        ("--ring0", args.ring0.is_some()),
        ("--irqchip", args.irqchip.is_some()),
        ("--transport", args.transport.is_some()),
        ("--rng", args.rng),
        ("--no-acpi", args.no_acpi),
    ];
    if let Some((flag, _)) = machine_flags.iter().find(|(_, given)| *given) {
        return Err(format!(
            "{flag} cannot be used with --restore: the snapshot's machine is restored as it was saved"
        ));
    }
    let mut config = snapshot.config().clone();
    config.serial = args.serial.clone().unwrap_or(SerialMode::Stdio);
    let replace = |what: &str, saved: usize, given: usize| {
        if given != 0 && given != saved {
            Err(format!(
                "--restore: the snapshot has {saved} {what}, --{} gives {given}: give one for each, in order",
                what.trim_end_matches('s')
            ))
        } else {
            Ok(given != 0)
        }
    };
    if replace("disks", config.disks.len(), args.disk.len())? {
        config.disks = args.disk.clone();
    }
    if replace("nets", config.nets.len(), args.net.len())? {
        config.nets = args.net.clone();
    }
    if let Some(vsock) = &args.vsock {
        if config.vsock.is_none() {
            return Err("--vsock: the snapshot has no vsock device".into());
        }
        config.vsock = Some(vsock.clone());
    }
    if let Some(console) = &args.console {
        if config.console.is_none() {
            return Err("--console: the snapshot has no virtio-console".into());
        }
        config.console = Some(console.clone());
    }
    if let Some(level) = args.seccomp() {
        config.seccomp = level;
    }
    Ok(config)
}

fn run_restore(args: &Args, dir: &std::path::Path, process_start: Instant) -> Result<ExitReason, String> {
    let snapshot = keel_vmm::Snapshot::load_dir(dir).map_err(|e| e.to_string())?;
    let config = restore_config(args, &snapshot)?;
    let seccomp = config.seccomp;
    let mode = if args.restore_copy {
        keel_vmm::RestoreMode::Copy
    } else {
        keel_vmm::RestoreMode::CopyOnWrite
    };
    let handle = VmBuilder::new(config)
        .map_err(|e| e.to_string())?
        .kvm_device(&args.kvm_device)
        .start_time(process_start)
        .restore(&snapshot, mode)
        .and_then(|vm| vm.start())
        .map_err(|e| e.to_string())?;
    log::info!("restored from {} in {:?}", dir.display(), process_start.elapsed());
    if let Err(e) = confine(ThreadRole::Main, seccomp) {
        handle.stop_handle().stop();
        let _ = handle.wait();
        return Err(e);
    }
    handle.wait().map_err(|e| e.to_string())
}

/// `--merge-diff DIFF --into BASE`.
fn merge_diff(diff: &std::path::Path, base: &std::path::Path) -> Result<u64, String> {
    let (state, memory) = (
        diff.join(keel_vmm::STATE_FILE_NAME),
        diff.join(keel_vmm::MEMORY_FILE_NAME),
    );
    let base_memory = base.join(keel_vmm::MEMORY_FILE_NAME);
    let copied = keel_vmm::merge_diff_snapshot(&state, &memory, &base_memory).map_err(|e| e.to_string())?;
    // The diff's state (now a full snapshot's) goes with the merged memory.
    let target = base.join(keel_vmm::STATE_FILE_NAME);
    let partial = base.join(format!("{}.partial", keel_vmm::STATE_FILE_NAME));
    std::fs::copy(&state, &partial)
        .and_then(|_| std::fs::rename(&partial, &target))
        .map_err(|e| format!("{}: {e}", target.display()))?;
    Ok(copied)
}

fn exit_code(reason: ExitReason) -> ExitCode {
    match reason {
        ExitReason::GuestReset | ExitReason::GuestShutdown | ExitReason::Stopped => ExitCode::SUCCESS,
        ExitReason::GuestExit(status) => ExitCode::from(status),
        _ => ExitCode::FAILURE,
    }
}

fn exit_status(reason: ExitReason) -> i32 {
    match reason {
        ExitReason::GuestReset | ExitReason::GuestShutdown | ExitReason::Stopped => 0,
        ExitReason::GuestExit(status) => i32::from(status),
        _ => 1,
    }
}

/// `--api-sock` / `--config-file`: Firecracker's way of running a VM.
fn run_firecracker_style(args: &Args, logger: logger::ProcessLogger, process_start: Instant) -> ExitCode {
    let mut options = keel_control::VmmOptions::new(args.id.clone());
    options.serial = args.serial.clone().unwrap_or(SerialMode::Stdio);
    options.kvm_device = args.kvm_device.clone();
    options.log_control = Some(Arc::new(logger));
    if let Some(t) = args.transport {
        options.transport = t;
    }
    options.seccomp = args.seccomp().unwrap_or_default();
    // Every thread from here on (the API's, the VM's) starts under the
    // API role's filter; the VM's own threads narrow it to theirs.
    if let Err(message) = confine(ThreadRole::Api, options.seccomp) {
        eprintln!("keel: error: {message}");
        return ExitCode::FAILURE;
    }
    // Firecracker's process ends with its VM.
    options.on_exit = Some(Box::new(|outcome| {
        let code = match outcome {
            Ok(reason) => {
                eprintln!("keel: VM ended: {reason}");
                exit_status(*reason)
            }
            Err(message) => {
                eprintln!("keel: error: {message}");
                1
            }
        };
        std::process::exit(code);
    }));
    let _ = process_start;
    let options_seccomp = options.seccomp;
    let mut vmm = keel_control::Vmm::new(options);
    if let Some(path) = &args.config_file {
        let configured = std::fs::read_to_string(path)
            .map_err(|e| format!("config file {}: {e}", path.display()))
            .and_then(|text| {
                serde_json::from_str::<keel_control::models::FullVmConfiguration>(&text)
                    .map_err(|e| format!("config file {}: {e}", path.display()))
            })
            .and_then(|config| {
                vmm.configure(config)
                    .map_err(|e| format!("config file {}: {e}", path.display()))
            })
            .and_then(|()| {
                vmm.action(keel_control::models::ActionType::InstanceStart)
                    .map_err(|e| format!("config file {}: InstanceStart: {e}", path.display()))
            });
        if let Err(message) = configured {
            eprintln!("keel: error: {message}");
            return ExitCode::FAILURE;
        }
    }
    let Some(sock) = &args.api_sock else {
        // --config-file alone: no API; wait for the VM.
        let watch = vmm.exit_watch().expect("started above");
        if let Err(message) = confine(ThreadRole::Main, options_seccomp) {
            eprintln!("keel: error: {message}");
            return ExitCode::FAILURE;
        }
        loop {
            if let Some(outcome) = watch.wait_timeout(std::time::Duration::from_secs(3600)) {
                return match outcome {
                    Ok(reason) => exit_code(reason),
                    Err(_) => ExitCode::FAILURE,
                };
            }
        }
    };
    let vmm = Arc::new(std::sync::Mutex::new(vmm));
    if let Err(e) = keel_control::spawn_periodic_flush(&vmm, keel_control::METRICS_FLUSH_PERIOD) {
        log::warn!("no periodic metrics flush: {e}");
    }
    match keel_api::ApiServer::bind(sock, vmm) {
        Ok(server) => {
            log::info!("API listening on {}", server.path().display());
            server.serve();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keel: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let process_start = Instant::now();
    let args = Args::parse();
    let logger = logger::ProcessLogger::install(&args.log_level);
    if args.api_sock.is_some() || args.config_file.is_some() {
        if args.restore.is_some() {
            eprintln!("keel: error: --restore cannot be used with --api-sock or --config-file (use PUT /snapshot/load)");
            return ExitCode::FAILURE;
        }
        return run_firecracker_style(&args, logger, process_start);
    }
    if let (Some(diff), Some(base)) = (&args.merge_diff, &args.into) {
        return match merge_diff(diff, base) {
            Ok(copied) => {
                eprintln!(
                    "keel: merged {} ({} KiB of pages) into {}",
                    diff.display(),
                    copied / 1024,
                    base.display()
                );
                ExitCode::SUCCESS
            }
            Err(message) => {
                eprintln!("keel: error: {message}");
                ExitCode::FAILURE
            }
        };
    }
    let outcome = match &args.restore {
        Some(dir) => run_restore(&args, dir, process_start),
        None => run(&args, process_start),
    };
    match outcome {
        Ok(reason) => {
            eprintln!("keel: VM ended: {reason}");
            exit_code(reason)
        }
        Err(message) => {
            eprintln!("keel: error: {message}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_and_without_units() {
        assert_eq!(parse_size_mib("512"), Ok(512));
        assert_eq!(parse_size_mib("512M"), Ok(512));
        assert_eq!(parse_size_mib("2G"), Ok(2048));
        assert_eq!(parse_size_mib("2GiB"), Ok(2048));
        assert_eq!(parse_size_mib("1t"), Ok(1024 * 1024));
        assert_eq!(parse_size_mib("65536K"), Ok(64));
    }

    #[test]
    fn bad_sizes_name_the_value() {
        assert!(parse_size_mib("lots").unwrap_err().contains("\"lots\""));
        assert!(parse_size_mib("3X").unwrap_err().contains("unknown unit \"X\""));
        assert!(parse_size_mib("99999999999999999999T")
            .unwrap_err()
            .contains("99999999999999999999T"));
        assert!(parse_size_mib("1000K")
            .unwrap_err()
            .contains("whole number of MiB"));
    }

    #[test]
    fn flags_override_the_config_file() {
        let dir = std::env::temp_dir().join(format!("keel-cli-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("vm.json");
        std::fs::write(
            &file,
            r#"{"vcpus": 2, "memory_mib": 64, "cmdline": "exit code=3"}"#,
        )
        .unwrap();
        let args = Args::parse_from(["keel", "--config", file.to_str().unwrap(), "--memory", "1G"]);
        let config = config_from(&args).unwrap();
        assert_eq!((config.vcpus, config.memory_mib), (2, 1024));
        assert_eq!(config.cmdline.as_deref(), Some("exit code=3"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unknown_config_keys_are_named() {
        let dir = std::env::temp_dir().join(format!("keel-cli-test2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("vm.json");
        std::fs::write(&file, r#"{"vcpus": 1, "colour": "blue"}"#).unwrap();
        let args = Args::parse_from(["keel", "--config", file.to_str().unwrap()]);
        let err = config_from(&args).unwrap_err();
        assert!(err.contains("unknown field `colour`"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
