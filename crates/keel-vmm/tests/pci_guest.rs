//! KVM tests of the PCI bus through the full VMM, driven by the built-in
//! guest: the `pci-hostile` program's configuration space and MSI-X abuse
//! (with both irqchips), and a VM with 32 virtio-blk disks, 8 network
//! cards, an entropy device, a console and a vsock device on PCI — past the
//! 15 devices virtio-mmio's IOAPIC pins allow, which is checked too.

#[macro_use]
mod common;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use keel_vmm::{
    ConsoleConfig, DiskConfig, ExitReason, IrqchipChoice, NetConfig, VirtioTransport, VmBuilder, VmConfig,
    VsockConfig,
};

const WATCHDOG: Duration = Duration::from_secs(60);

/// Sparse disk images in a directory removed on drop.
struct Images(PathBuf);

impl Images {
    fn new(tag: &str, count: usize, bytes: u64) -> (Self, Vec<DiskConfig>) {
        let dir = std::env::temp_dir().join(format!("keel-pci-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disks = (0..count)
            .map(|i| {
                let path = dir.join(format!("disk{i}.img"));
                let file = std::fs::File::create(&path).unwrap();
                // Sector 0 says which disk it is.
                std::os::unix::fs::FileExt::write_at(&file, format!("disk {i}").as_bytes(), 0).unwrap();
                file.set_len(bytes).unwrap();
                {
                    let mut disk = DiskConfig::new(path);
                    disk.read_only = false;
                    disk.id = Some(format!("pci{i}"));
                    disk.transport = None;
                    disk
                }
            })
            .collect();
        (Self(dir), disks)
    }
}

impl Drop for Images {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Boots `cmdline` with `config`; the exit reason and the serial text.
fn run(config: VmConfig, cmdline: &str) -> (ExitReason, String) {
    let (result, text) = common::run_guest(VmBuilder::new(config).unwrap(), cmdline, WATCHDOG);
    let exit = result.unwrap_or_else(|e| panic!("`{cmdline}`: {e}\nserial:\n{text}"));
    (exit, text)
}

fn hostile_guest_cannot_hurt_the_pci_bus_or_msix(irqchip: IrqchipChoice) {
    let (_images, disks) = Images::new(&format!("hostile-{irqchip:?}"), 2, 1 << 20);
    let config = {
        let mut config = VmConfig::default();
        config.memory_mib = 32;
        config.disks = disks;
        config.irqchip = irqchip;
        config.transport = VirtioTransport::Pci;
        config
    };
    let (exit, text) = run(config, "pci-hostile");
    assert_eq!(exit, ExitReason::GuestExit(0), "serial:\n{text}");
    for case in [
        "conf1-and-ecam-agree",
        "read-only-registers",
        "malformed-config-accesses",
        "bar-sizing",
        "bar-relocation",
        "bar-outside-the-windows",
        "overlapping-bars",
        "msix-out-of-range-entries",
        "msix-vector-changed-while-running",
        "msix-function-mask-holds-and-releases",
        "msix-address-outside-interrupt-range",
        "msix-queue-vector-out-of-range",
        "msix-disabled-while-running",
    ] {
        assert!(
            text.contains(&format!("pci-hostile: {case} ... ok")),
            "case {case}; serial:\n{text}"
        );
    }
    assert!(
        text.contains("pci-hostile: 13 cases, 0 failed"),
        "serial:\n{text}"
    );
}

#[test]
fn hostile_guest_cannot_hurt_the_pci_bus_or_msix_with_a_split_irqchip() {
    hostile_guest_cannot_hurt_the_pci_bus_or_msix(IrqchipChoice::Split);
}

#[test]
fn hostile_guest_cannot_hurt_the_pci_bus_or_msix_with_the_in_kernel_irqchip() {
    hostile_guest_cannot_hurt_the_pci_bus_or_msix(IrqchipChoice::Kernel);
}

#[test]
fn pci_hostile_without_a_pci_disk_fails_cleanly() {
    let (_images, disks) = Images::new("hostile-mmio", 1, 1 << 20);
    let config = {
        let mut config = VmConfig::default();
        config.memory_mib = 32;
        config.disks = disks;
        config.transport = VirtioTransport::Mmio;
        config
    };
    let (exit, text) = run(config, "pci-hostile");
    assert_eq!(exit, ExitReason::GuestExit(1), "serial:\n{text}");
    assert!(
        text.contains("FAIL: pci-hostile needs a virtio-blk device on PCI"),
        "{text}"
    );
}

#[test]
fn more_than_fifteen_mmio_devices_are_refused_naming_the_limit() {
    let (_images, disks) = Images::new("mmio-limit", 16, 1 << 20);
    let config = {
        let mut config = VmConfig::default();
        config.memory_mib = 32;
        config.disks = disks;
        config.transport = VirtioTransport::Mmio;
        config
    };
    let err = VmBuilder::new(config).unwrap().build().unwrap_err().to_string();
    assert!(err.contains("no free GSI"), "{err}");
}

/// Runs `test` on a thread inside a network namespace of its own (so the
/// taps it opens exist only there), or skips without root, `ip` or
/// `/dev/net/tun`.
fn in_netns<T: Send>(tag: &str, test: impl FnOnce() -> T + Send) -> Option<T> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ip = |args: &[&str]| {
        Command::new("ip")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let name = format!("keel-pci-{}-{tag}", std::process::id());
    if !root || !std::path::Path::new("/dev/net/tun").exists() || !ip(&["netns", "add", &name]) {
        return None;
    }
    let result = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
                // SAFETY: setns on an open namespace fd affects only this thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                test()
            })
            .join()
    });
    ip(&["netns", "delete", &name]);
    Some(result.unwrap_or_else(|e| std::panic::resume_unwind(e)))
}

/// 32 disks, 8 network cards, an entropy device, a console and a vsock
/// device: 43 virtio-pci functions, each with its MSI-X vectors. The guest
/// finds them all and drives every disk with interrupts.
#[test]
fn thirty_two_disks_and_eight_nics_attach_over_pci() {
    let (_images, disks) = Images::new("many", 32, 1 << 20);
    let dir = std::env::temp_dir().join(format!("keel-pci-{}-many-sockets", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = {
        let mut config = VmConfig::default();
        config.memory_mib = 64;
        config.disks = disks;
        config.nets = (0..8)
            .map(|i| {
                let mut net = NetConfig::tap(format!("keelpci{i}"));
                net.fd = None;
                net.mac = None;
                net.transport = None;
                net
            })
            .collect();
        config.rng = true;
        config.console = Some(ConsoleConfig::File(dir.join("hvc0.txt")));
        config.vsock = Some({
            let mut vsock = VsockConfig::new(3, dir.join("v.sock"));
            vsock.transport = None;
            vsock
        });
        config.transport = VirtioTransport::Pci;
        config
    };
    let outcome = in_netns("many", || run(config, "virtio-blk event-idx=0"));
    let _ = std::fs::remove_dir_all(&dir);
    let Some((exit, text)) = outcome else {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: needs root, iproute2 and /dev/net/tun for the 8 taps"
        );
        return;
    };
    assert_eq!(exit, ExitReason::GuestExit(0), "serial:\n{text}");
    let found = |kind: &str| {
        text.lines()
            .filter(|l| l.starts_with("virtio: PCI 00:") && l.contains(&format!(": {kind} (")))
            .count()
    };
    assert_eq!(found("block"), 32, "serial:\n{text}");
    assert_eq!(found("net"), 8, "serial:\n{text}");
    assert_eq!(
        (found("rng"), found("console"), found("vsock")),
        (1, 1, 1),
        "{text}"
    );
    assert!(text.contains("virtio-blk: 32 device(s)"), "serial:\n{text}");
    assert_eq!(
        text.matches("reads past the end: IOERR ok").count(),
        32,
        "serial:\n{text}"
    );
    // Every disk saw interrupts (MSI-X lines are shared past the 19 the
    // guest has, so each count is at least its own).
    let interrupt_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("virtio-blk: vd") && l.contains(": interrupts: "))
        .collect();
    assert_eq!(interrupt_lines.len(), 32, "serial:\n{text}");
    assert!(
        interrupt_lines.iter().all(|l| !l.contains("interrupts: 0 ")),
        "{interrupt_lines:#?}"
    );
    // Devices past the first slot's worth share functions of one slot.
    assert!(text.contains("virtio: PCI 00:01.1 "), "serial:\n{text}");
}
