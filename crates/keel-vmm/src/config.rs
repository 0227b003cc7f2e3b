//! What a VM is made of, as data.

use std::path::PathBuf;

use keel_seccomp::SeccompLevel;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Most vCPUs a Keel VM can have (APIC IDs are 8 bits; 0xff is broadcast).
pub const MAX_VCPUS: u8 = 254;

/// The settings of one VM. Deserialises from JSON; unknown keys are errors.
///
/// ```
/// let config: keel_vmm::VmConfig = serde_json::from_str(r#"{"vcpus": 2, "memory_mib": 256}"#).unwrap();
/// assert_eq!(config.vcpus, 2);
/// assert!(config.kernel.is_none()); // the built-in test guest
/// assert!(serde_json::from_str::<keel_vmm::VmConfig>(r#"{"cpus": 2}"#).is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct VmConfig {
    /// Number of vCPUs, 1..=[`MAX_VCPUS`].
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Guest RAM in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// Kernel image (ELF vmlinux or bzImage). `None` boots Keel's built-in
    /// test guest.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// Kernel command line. `None` picks a default for the kernel: `hello`
    /// for the built-in guest, a serial-console Linux line otherwise.
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Initial RAM disk (initramfs) for a Linux kernel.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// How to enter the kernel.
    #[serde(default)]
    pub boot_protocol: BootProtocolChoice,
    /// Whether this host's KVM runs guest ring 0 in its emulator; `auto`
    /// probes at start. Decides the guest workarounds (see
    /// `docs/host-kvm-notes.md`); they are only applied to a Linux kernel.
    #[serde(default)]
    pub ring0: Ring0Choice,
    /// Where the 16550 serial console goes.
    #[serde(default)]
    pub serial: SerialMode,
    /// virtio-blk disks, in order: the guest sees vda, vdb, …
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// Whether to add a virtio-rng device fed by the host's `getrandom`.
    #[serde(default)]
    pub rng: bool,
    /// Limits the virtio-rng device (Firecracker's `entropy`
    /// `rate_limiter`); needs `rng`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng_rate_limiter: Option<RateLimiterConfig>,
    /// A virtio-console (port 0, `hvc0` in Linux) and where it goes.
    #[serde(default)]
    pub console: Option<ConsoleConfig>,
    /// virtio-net cards, each on a host tap device.
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    /// A virtio-vsock device, its host side on Unix sockets (Firecracker's
    /// convention).
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// A virtio-balloon device (Firecracker's `balloon` settings), on the
    /// VM's default transport; controlled while the VM runs through
    /// `VmHandle::balloon`.
    #[serde(default)]
    pub balloon: Option<BalloonConfig>,
    /// Whether KVM's in-kernel PIT reinjects timer ticks the guest missed
    /// (KVM's own default), for guests that keep time by counting PIT
    /// interrupts (Linux 2.4 and older). Off by default, as the KVM API
    /// documentation recommends for other guests: lost ticks are dropped
    /// (QEMU's `lost_tick_policy=discard`), and VM teardown does not wait
    /// for the SRCU grace period that unhooking reinjection costs.
    #[serde(default)]
    pub pit_reinject: bool,
    /// Which interrupt controllers KVM emulates (see [`IrqchipChoice`]).
    /// `pit_reinject` only applies to `kernel`, the only mode with a PIT.
    #[serde(default)]
    pub irqchip: IrqchipChoice,
    /// The virtio transport of every device that does not choose its own
    /// (`transport` in a disk, net or vsock entry); see
    /// [`VirtioTransport`].
    #[serde(default)]
    pub transport: VirtioTransport,
    /// Whether the guest gets ACPI tables (the default): a stock kernel
    /// finds its CPUs, interrupt controller, virtio-mmio devices, PCI host
    /// bridge and power controls there. `false` gives today's MP table and
    /// `virtio_mmio.device=` command-line entries instead, for kernels
    /// built without ACPI.
    #[serde(default = "default_acpi")]
    pub acpi: bool,
    /// Track the pages the guest and the devices write (KVM's dirty log
    /// and guest memory's bitmap), so that diff snapshots can save only
    /// those (Firecracker's `track_dirty_pages`). Costs the guest a fault
    /// on its first write to a page after each snapshot.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub track_dirty_pages: bool,
    /// The seccomp filter on the VM's vCPU and device threads (see
    /// `keel_seccomp`): `kill` (the default) ends the process on a system
    /// call outside the thread's role, `log` lets it through and has the
    /// kernel log it, `off` installs none. A device of your own whose
    /// backend makes calls the devices role does not allow needs `off`.
    #[serde(default, skip_serializing_if = "is_default_seccomp")]
    pub seccomp: SeccompLevel,
}

/// How a virtio device is attached: as a virtio-pci function (found by PCI
/// enumeration, MSI-X vectors through KVM MSI routes; up to 247 devices;
/// the default) or as a virtio-mmio window (found through the kernel
/// command line or ACPI, one IOAPIC pin each, 15 devices at most).
///
/// The default is measured (`cargo bench --bench virtio_transport`,
/// `docs/performance.md`): attaching costs the same, a Linux guest reaches
/// `Run /init` as fast, and an interrupt-driven request completes about a
/// fifth faster over virtio-pci. A guest kernel without `CONFIG_VIRTIO_PCI`
/// needs `mmio`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum VirtioTransport {
    /// virtio-mmio version 2.
    Mmio,
    /// Modern virtio-pci with MSI-X.
    #[default]
    Pci,
}

impl std::str::FromStr for VirtioTransport {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "mmio" => Ok(VirtioTransport::Mmio),
            "pci" => Ok(VirtioTransport::Pci),
            _ => Err(format!("transport {s:?}: expected mmio or pci")),
        }
    }
}

impl std::fmt::Display for VirtioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VirtioTransport::Mmio => "mmio",
            VirtioTransport::Pci => "pci",
        })
    }
}

/// A virtio-vsock device: the guest's CID and the host's Unix socket.
///
/// Host-initiated connections: connect to `uds`, send `CONNECT <port>\n`,
/// read `OK <host_port>\n`, then the stream is the guest's port. A guest
/// connecting to host port P reaches the Unix socket `<uds>_P`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct VsockConfig {
    /// The guest's context ID (3 or more).
    pub cid: u64,
    /// The Unix socket path the VMM listens on (must not exist yet).
    pub uds: PathBuf,
    /// Its transport (default: the VM's [`VmConfig::transport`]).
    #[serde(default)]
    pub transport: Option<VirtioTransport>,
}

impl VsockConfig {
    /// A vsock device with guest CID `cid` whose host side listens at and
    /// connects through the Unix socket `uds`, on the VM's default transport.
    pub fn new(cid: u64, uds: impl Into<PathBuf>) -> Self {
        Self {
            cid,
            uds: uds.into(),
            transport: None,
        }
    }
}

impl std::str::FromStr for VsockConfig {
    type Err = String;
    /// `cid=N,uds=PATH[,transport=mmio|pci]`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (mut cid, mut uds, mut transport) = (None, None, None);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("transport", t)) => {
                    transport = Some(t.parse().map_err(|e| format!("vsock {s:?}: {e}"))?)
                }
                Some(("cid", n)) => {
                    cid = Some(
                        n.parse::<u64>()
                            .map_err(|_| format!("vsock {s:?}: cid {n:?} is not a number"))?,
                    )
                }
                Some(("uds", p)) if !p.is_empty() => uds = Some(PathBuf::from(p)),
                _ => {
                    return Err(format!(
                        "vsock {s:?}: unknown option {part:?} (expected cid=N,uds=PATH[,transport=mmio|pci])"
                    ))
                }
            }
        }
        match (cid, uds) {
            (Some(cid), Some(uds)) => Ok(VsockConfig { cid, uds, transport }),
            _ => Err(format!("vsock {s:?}: needs both cid=N and uds=PATH")),
        }
    }
}

/// A virtio-balloon device, with the fields of Firecracker's `balloon`
/// configuration (`PUT /balloon`, the config file's `balloon` object).
///
/// ```
/// let config: keel_vmm::BalloonConfig =
///     serde_json::from_str(r#"{"amount_mib": 64, "deflate_on_oom": true, "stats_polling_interval_s": 1}"#)
///         .unwrap();
/// assert_eq!(config.amount_mib, 64);
/// assert!(!config.free_page_reporting);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct BalloonConfig {
    /// Target size of the balloon in MiB: memory the guest is asked to give
    /// back (at most the VM's memory).
    pub amount_mib: u32,
    /// Whether the guest may take pages back out of the balloon when it
    /// would otherwise run out of memory (`VIRTIO_BALLOON_F_DEFLATE_ON_OOM`).
    pub deflate_on_oom: bool,
    /// Seconds between statistics requests to the guest; 0 (the default)
    /// disables statistics. Cannot be switched between zero and non-zero
    /// once the VM is built.
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// Whether the guest reports free pages, which the host then releases
    /// (`VIRTIO_BALLOON_F_REPORTING`).
    #[serde(default)]
    pub free_page_reporting: bool,
}

impl BalloonConfig {
    /// A balloon of `amount_mib` MiB, without deflate-on-OOM, statistics or
    /// free page reporting.
    pub fn new(amount_mib: u32) -> Self {
        Self {
            amount_mib,
            deflate_on_oom: false,
            stats_polling_interval_s: 0,
            free_page_reporting: false,
        }
    }

    /// The device options these settings stand for.
    pub fn options(&self) -> keel_virtio::BalloonOptions {
        let mut options = keel_virtio::BalloonOptions::new(self.amount_mib);
        options.deflate_on_oom = self.deflate_on_oom;
        options.stats_polling_interval_s = self.stats_polling_interval_s;
        options.free_page_reporting = self.free_page_reporting;
        options
    }
}

/// One virtio-net card.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct NetConfig {
    /// Name of the host tap device (opened with `IFF_TAP | IFF_NO_PI |
    /// IFF_VNET_HDR`; it must exist or be creatable by this process). Empty
    /// when `fd` is given.
    #[serde(default)]
    pub tap: String,
    /// An already-open tap file descriptor this process inherited (so an
    /// unprivileged VMM can be handed one); used instead of `tap`.
    #[serde(default)]
    pub fd: Option<i32>,
    /// The card's MAC, `aa:bb:cc:dd:ee:ff`. Default: `52:54:00:12:34:NN`
    /// with NN the card's index.
    #[serde(default)]
    pub mac: Option<String>,
    /// Its transport (default: the VM's [`VmConfig::transport`]).
    #[serde(default)]
    pub transport: Option<VirtioTransport>,
    /// Limits what the card hands the guest (Firecracker's
    /// `rx_rate_limiter`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits what the guest sends (Firecracker's `tx_rate_limiter`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

impl NetConfig {
    /// A card on the host tap device `tap`, MAC address chosen by index, on
    /// the VM's default transport.
    pub fn tap(tap: impl Into<String>) -> Self {
        Self {
            tap: tap.into(),
            fd: None,
            mac: None,
            transport: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        }
    }

    /// A card on an open tap file descriptor that the VM takes over.
    pub fn fd(fd: i32) -> Self {
        Self {
            tap: String::new(),
            fd: Some(fd),
            mac: None,
            transport: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        }
    }

    /// The MAC as bytes (the configured one, or the default for card
    /// `index`).
    pub fn mac_bytes(&self, index: usize) -> std::result::Result<[u8; 6], String> {
        let Some(text) = &self.mac else {
            return Ok([0x52, 0x54, 0x00, 0x12, 0x34, 0x56u8.wrapping_add(index as u8)]);
        };
        let parts: Vec<&str> = text.split(':').collect();
        let bad = || {
            format!(
                "net tap={} mac {text:?}: expected six hex bytes like 52:54:00:12:34:56",
                self.tap
            )
        };
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut mac = [0u8; 6];
        for (byte, part) in mac.iter_mut().zip(&parts) {
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if mac[0] & 1 != 0 {
            return Err(format!(
                "net tap={} mac {text}: a multicast address cannot be a card's",
                self.tap
            ));
        }
        Ok(mac)
    }
}

impl std::str::FromStr for NetConfig {
    type Err = String;
    /// `tap=NAME[,mac=MAC]` or `fd=N[,mac=MAC]`, and `transport=mmio|pci`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let mut tap = None;
        let mut fd = None;
        let mut mac = None;
        let mut transport = None;
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("transport", t)) => transport = Some(t.parse().map_err(|e| format!("net {s:?}: {e}"))?),
                Some(("tap", name)) if !name.is_empty() => tap = Some(name.to_string()),
                Some(("fd", n)) => {
                    let parsed = n.parse::<i32>().ok().filter(|&n| n >= 0);
                    fd = Some(
                        parsed
                            .ok_or_else(|| format!("net {s:?}: fd {n:?} is not a file descriptor number"))?,
                    );
                }
                Some(("mac", m)) => mac = Some(m.to_string()),
                _ => {
                    return Err(format!(
                        "net {s:?}: unknown option {part:?} (expected tap=NAME or fd=N, mac=MAC, transport=mmio|pci)"
                    ))
                }
            }
        }
        let tap = match (tap, fd) {
            (Some(tap), None) => tap,
            (None, Some(_)) => String::new(),
            _ => return Err(format!("net {s:?}: needs exactly one of tap=NAME and fd=N")),
        };
        let config = NetConfig {
            tap,
            fd,
            mac,
            transport,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        };
        config.mac_bytes(0)?;
        Ok(config)
    }
}

/// One virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct DiskConfig {
    /// Raw image file (sparse is fine).
    pub path: PathBuf,
    /// Refuse guest writes (the guest sees `VIRTIO_BLK_F_RO`).
    #[serde(default)]
    pub read_only: bool,
    /// Serial the guest reads with `GET_ID` (at most 20 bytes).
    #[serde(default)]
    pub id: Option<String>,
    /// Its transport (default: the VM's [`VmConfig::transport`]).
    #[serde(default)]
    pub transport: Option<VirtioTransport>,
    /// Limits the disk's requests (Firecracker's drive `rate_limiter`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
    /// A copy-on-write overlay: `path` becomes a read-only base (shared by
    /// any number of disks) and this disk's writes go to this file, in
    /// Keel's overlay format (created if missing). For clones of one
    /// snapshot, each with its own overlay on one base image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<PathBuf>,
}

impl DiskConfig {
    /// A read-write disk on the image at `path`, no ID, on the VM's default
    /// transport.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            read_only: false,
            id: None,
            transport: None,
            rate_limiter: None,
            overlay: None,
        }
    }
}

impl std::str::FromStr for DiskConfig {
    type Err = String;
    /// `PATH[,ro][,id=NAME][,overlay=PATH][,transport=mmio|pci]`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let mut parts = s.split(',');
        let path = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| format!("disk {s:?}: no path"))?;
        let mut disk = DiskConfig {
            path: PathBuf::from(path),
            read_only: false,
            id: None,
            transport: None,
            rate_limiter: None,
            overlay: None,
        };
        for part in parts {
            match part.split_once('=') {
                None if part == "ro" => disk.read_only = true,
                None if part == "rw" => disk.read_only = false,
                Some(("id", id)) => disk.id = Some(id.to_string()),
                Some(("overlay", path)) if !path.is_empty() => disk.overlay = Some(PathBuf::from(path)),
                Some(("transport", t)) => {
                    disk.transport = Some(t.parse().map_err(|e| format!("disk {s:?}: {e}"))?)
                }
                _ => {
                    return Err(format!(
                        "disk {s:?}: unknown option {part:?} (expected ro, rw, id=NAME, overlay=PATH or transport=mmio|pci)"
                    ))
                }
            }
        }
        Ok(disk)
    }
}

/// Where a virtio-console's port 0 goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum ConsoleConfig {
    /// This process's stdout (output only; stdin belongs to the serial
    /// console).
    Stdio,
    /// Append output to a file.
    File(PathBuf),
    /// Listen on a Unix socket; one client at a time gets the console.
    Socket(PathBuf),
}

impl std::str::FromStr for ConsoleConfig {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "stdio" {
            return Ok(ConsoleConfig::Stdio);
        }
        match s.split_once(':') {
            Some(("file", p)) if !p.is_empty() => Ok(ConsoleConfig::File(PathBuf::from(p))),
            Some(("socket", p)) if !p.is_empty() => Ok(ConsoleConfig::Socket(PathBuf::from(p))),
            _ => Err(format!("console {s:?}: expected stdio, file:PATH or socket:PATH")),
        }
    }
}

/// How to enter the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum BootProtocolChoice {
    /// PVH when the ELF has a PVH entry point, the Linux 64-bit entry
    /// otherwise.
    #[default]
    Auto,
    /// Linux's 64-bit boot protocol (zero page).
    Linux64,
    /// PVH (`hvm_start_info`); the kernel must have a PVH note.
    Pvh,
}

/// Which interrupt controllers KVM emulates and which the VMM does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum IrqchipChoice {
    /// KVM emulates the local APICs; Keel emulates the IOAPIC in user space
    /// (`keel_irq::Ioapic`, its entries turned into KVM MSI routes, so
    /// device interrupts still go straight from an irqfd into the guest).
    /// No 8259 PIC and no 8254 PIT: Linux finds no PIC ("Using NULL legacy
    /// PIC") and runs its clock events on the local APIC's TSC-deadline
    /// timer. VM teardown does not wait for the SRCU grace periods KVM's
    /// in-kernel PIC and IOAPIC cost (`benches/kvm_teardown.rs`).
    #[default]
    Split,
    /// KVM's in-kernel PIC, IOAPIC, local APICs and PIT
    /// (`KVM_CREATE_IRQCHIP` + `KVM_CREATE_PIT2`), for guests that need a
    /// PIC or a PIT.
    Kernel,
}

/// What the host's KVM does with guest ring 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Ring0Choice {
    /// Probe the host at start.
    #[default]
    Auto,
    /// Assume VT-x / AMD-V: no workarounds.
    Hardware,
    /// Assume a software-emulated ring 0: apply the workarounds.
    Emulated,
}

/// Where the serial console's output goes (and, for `stdio`, where its
/// input comes from when the embedder wires one).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum SerialMode {
    /// Discard output (the library's default: an embedder says where the
    /// console goes; the `keel` command defaults to `stdio`).
    #[default]
    None,
    /// This process's standard output.
    Stdio,
    /// Append to a file.
    File(PathBuf),
}

impl std::str::FromStr for SerialMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(SerialMode::None),
            "stdio" => Ok(SerialMode::Stdio),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(SerialMode::File(PathBuf::from(p))),
                _ => Err(format!("serial {s:?}: expected none, stdio or file:PATH")),
            },
        }
    }
}

fn default_vcpus() -> u8 {
    1
}

fn is_default_seccomp(level: &SeccompLevel) -> bool {
    *level == SeccompLevel::default()
}

fn default_acpi() -> bool {
    true
}

fn default_memory_mib() -> u64 {
    128
}

/// Command line given to a Linux kernel when none is set.
pub const DEFAULT_LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off nomodules i8042.noaux";
/// [`DEFAULT_LINUX_CMDLINE`] for a VM with devices on PCI: the same, with
/// PCI probing on.
pub const DEFAULT_LINUX_PCI_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 nomodules i8042.noaux";
/// Command line given to the built-in guest when none is set.
pub const DEFAULT_GUEST_CMDLINE: &str = "hello";

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            vcpus: default_vcpus(),
            memory_mib: default_memory_mib(),
            kernel: None,
            cmdline: None,
            initrd: None,
            boot_protocol: BootProtocolChoice::Auto,
            ring0: Ring0Choice::Auto,
            serial: SerialMode::None,
            disks: Vec::new(),
            rng: false,
            rng_rate_limiter: None,
            console: None,
            nets: Vec::new(),
            vsock: None,
            balloon: None,
            pit_reinject: false,
            irqchip: IrqchipChoice::default(),
            transport: VirtioTransport::default(),
            acpi: default_acpi(),
            track_dirty_pages: false,
            seccomp: SeccompLevel::default(),
        }
    }
}

impl VmConfig {
    /// Parses a JSON configuration.
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| Error::Config(e.to_string()))
    }

    /// Checks every value, naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(Error::Config(format!(
                "vcpus {}: must be between 1 and {MAX_VCPUS}",
                self.vcpus
            )));
        }
        if self.pit_reinject && self.irqchip == IrqchipChoice::Split {
            return Err(Error::Config(
                "pit_reinject true: only irqchip \"kernel\" has a PIT (irqchip is \"split\")".into(),
            ));
        }
        let bytes = self
            .memory_mib
            .checked_mul(keel_memory::MIB)
            .ok_or_else(|| Error::Config(format!("memory {} MiB: too large", self.memory_mib)))?;
        keel_memory::GuestLayout::new(bytes).map_err(|e| Error::Config(e.to_string()))?;
        if self.kernel.is_none() && self.memory_mib < keel_guest::MIN_MEMORY_MIB {
            return Err(Error::Config(format!(
                "memory {} MiB: the built-in guest needs at least {} MiB",
                self.memory_mib,
                keel_guest::MIN_MEMORY_MIB
            )));
        }
        if let Some(host) = host_memory_bytes() {
            if bytes > host {
                return Err(Error::Config(format!(
                    "memory {} MiB: more than the host's {} MiB of RAM",
                    self.memory_mib,
                    host / keel_memory::MIB
                )));
            }
        }
        if self.rng_rate_limiter.is_some() && !self.rng {
            return Err(Error::Config(
                "rng_rate_limiter: set, but there is no virtio-rng device (rng is false)".into(),
            ));
        }
        for (what, path) in [("kernel", &self.kernel), ("initrd", &self.initrd)] {
            if let Some(path) = path {
                check_readable_file(what, path)?;
            }
        }
        for disk in &self.disks {
            let what = if disk.read_only {
                "disk (read-only)"
            } else {
                "disk"
            };
            check_readable_file(what, &disk.path)?;
            if let Some(id) = &disk.id {
                if id.len() > 20 {
                    return Err(Error::Config(format!(
                        "disk {} id {id:?}: at most 20 bytes",
                        disk.path.display()
                    )));
                }
            }
        }
        for (index, net) in self.nets.iter().enumerate() {
            match net.fd {
                Some(fd) if !net.tap.is_empty() => {
                    return Err(Error::Config(format!(
                        "net tap={} fd={fd}: give one of them",
                        net.tap
                    )));
                }
                Some(_) => {}
                None if net.tap.is_empty() || net.tap.len() > 15 => {
                    return Err(Error::Config(format!(
                        "net tap={:?}: interface names are 1 to 15 bytes",
                        net.tap
                    )));
                }
                None => {}
            }
            net.mac_bytes(index).map_err(Error::Config)?;
        }
        if let Some(vsock) = &self.vsock {
            if vsock.cid < 3 || vsock.cid >= u64::from(u32::MAX) {
                return Err(Error::Config(format!(
                    "vsock cid {}: must be between 3 and {}",
                    vsock.cid,
                    u32::MAX - 1
                )));
            }
            if vsock.uds.exists() {
                return Err(Error::Config(format!(
                    "vsock uds {}: already exists",
                    vsock.uds.display()
                )));
            }
        }
        if let Some(balloon) = &self.balloon {
            if u64::from(balloon.amount_mib) > self.memory_mib {
                return Err(Error::Config(format!(
                    "balloon amount_mib {}: more than the VM's {} MiB of memory",
                    balloon.amount_mib, self.memory_mib
                )));
            }
        }
        if self.initrd.is_some() && self.kernel.is_none() {
            return Err(Error::Config(
                "initrd: needs --kernel (the built-in guest takes none)".into(),
            ));
        }
        Ok(())
    }

    /// The command line the guest will get (before the devices' own
    /// parameters). A Linux kernel without one gets
    /// [`DEFAULT_LINUX_CMDLINE`], or [`DEFAULT_LINUX_PCI_CMDLINE`] when a
    /// device is on PCI.
    pub fn effective_cmdline(&self) -> &str {
        match (&self.cmdline, &self.kernel) {
            (Some(c), _) => c,
            (None, None) => DEFAULT_GUEST_CMDLINE,
            (None, Some(_)) if self.uses_pci() => DEFAULT_LINUX_PCI_CMDLINE,
            (None, Some(_)) => DEFAULT_LINUX_CMDLINE,
        }
    }

    /// Every virtio device's transport, in the order devices are added:
    /// disks, nets, rng, balloon, console, vsock.
    pub fn transports(&self) -> impl Iterator<Item = VirtioTransport> + '_ {
        let default = self.transport;
        self.disks
            .iter()
            .map(move |d| d.transport.unwrap_or(default))
            .chain(self.nets.iter().map(move |n| n.transport.unwrap_or(default)))
            .chain(self.rng.then_some(default))
            .chain(self.balloon.as_ref().map(|_| default))
            .chain(self.console.as_ref().map(|_| default))
            .chain(self.vsock.iter().map(move |v| v.transport.unwrap_or(default)))
    }

    /// Whether any virtio device is on PCI.
    pub fn uses_pci(&self) -> bool {
        self.transports().any(|t| t == VirtioTransport::Pci)
    }
}

fn check_readable_file(what: &str, path: &std::path::Path) -> Result<()> {
    let why = match std::fs::metadata(path) {
        Ok(m) if m.is_file() => match std::fs::File::open(path) {
            Ok(_) => return Ok(()),
            Err(e) => e.to_string(),
        },
        Ok(_) => "not a regular file".to_string(),
        Err(e) => e.to_string(),
    };
    Err(Error::Config(format!("{what} {}: {why}", path.display())))
}

fn host_memory_bytes() -> Option<u64> {
    // SAFETY: sysinfo only writes into the struct we pass.
    unsafe {
        let mut info: libc::sysinfo = std::mem::zeroed();
        if libc::sysinfo(&mut info) != 0 {
            return None;
        }
        Some((info.totalram as u64).saturating_mul(u64::from(info.mem_unit)))
    }
}

/// A device's rate limiter in Firecracker's API and config-file shape:
/// `{"bandwidth": {"size": N, "one_time_burst": N, "refill_time": MS},
/// "ops": {…}}`, either bucket optional.
///
/// Applied to a new device, a missing bucket means no limit of that kind;
/// as an update of a running one (Firecracker's PATCH), a missing bucket
/// keeps what the device has and a bucket of `size` or `refill_time` 0
/// removes the limit ([`updates`](Self::updates)).
///
/// ```
/// let limiter: keel_vmm::RateLimiterConfig = serde_json::from_str(
///     r#"{"bandwidth": {"size": 41943, "refill_time": 10}}"#,
/// ).unwrap();
/// assert_eq!(limiter.bandwidth.unwrap().size, 41943);
/// assert!(limiter.ops.is_none());
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RateLimiterConfig {
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucketConfig>,
    /// Operations (requests, frames).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucketConfig>,
}

impl RateLimiterConfig {
    /// A limiter with these buckets.
    pub fn new(bandwidth: Option<TokenBucketConfig>, ops: Option<TokenBucketConfig>) -> Self {
        Self { bandwidth, ops }
    }

    /// The bandwidth and ops changes this configuration makes to a device's
    /// limiter: `Keep` for a missing bucket, `Set` otherwise (a bucket that
    /// limits nothing then removes it).
    pub fn updates(&self) -> (keel_ratelimit::BucketUpdate, keel_ratelimit::BucketUpdate) {
        let update = |bucket: Option<TokenBucketConfig>| match bucket {
            Some(bucket) => keel_ratelimit::BucketUpdate::Set(bucket.bucket()),
            None => keel_ratelimit::BucketUpdate::Keep,
        };
        (update(self.bandwidth), update(self.ops))
    }
}

/// One token bucket in Firecracker's shape: `size` tokens refilled in
/// `refill_time` milliseconds, plus `one_time_burst` tokens once. A `size`
/// or `refill_time` of 0 means no limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TokenBucketConfig {
    /// Most tokens the bucket holds.
    pub size: u64,
    /// Tokens available once, on top of the first full bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill the bucket from empty.
    pub refill_time: u64,
}

impl TokenBucketConfig {
    /// `size` tokens per `refill_time` milliseconds, no one-time burst.
    pub fn new(size: u64, refill_time: u64) -> Self {
        Self {
            size,
            one_time_burst: None,
            refill_time,
        }
    }

    /// The same with `tokens` available once on top.
    pub fn with_one_time_burst(mut self, tokens: u64) -> Self {
        self.one_time_burst = Some(tokens);
        self
    }

    /// The bucket as [`keel_ratelimit`] takes it.
    pub fn bucket(&self) -> keel_ratelimit::BucketConfig {
        keel_ratelimit::BucketConfig::new(self.size, self.refill_time)
            .with_one_time_burst(self.one_time_burst.unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        VmConfig::default().validate().unwrap();
    }

    #[test]
    fn balloon_takes_firecrackers_fields_and_fits_in_memory() {
        let config: VmConfig = serde_json::from_str(
            r#"{"memory_mib": 128, "balloon": {"amount_mib": 64, "deflate_on_oom": false, "stats_polling_interval_s": 2, "free_page_reporting": true}}"#,
        )
        .unwrap();
        config.validate().unwrap();
        let options = config.balloon.unwrap().options();
        assert_eq!((options.amount_mib, options.stats_polling_interval_s), (64, 2));
        assert!(options.free_page_reporting && !options.deflate_on_oom);

        let missing = serde_json::from_str::<VmConfig>(r#"{"balloon": {"amount_mib": 1}}"#).unwrap_err();
        assert!(missing.to_string().contains("deflate_on_oom"), "{missing}");
        let unknown = serde_json::from_str::<VmConfig>(
            r#"{"balloon": {"amount_mib": 1, "deflate_on_oom": true, "size": 2}}"#,
        )
        .unwrap_err();
        assert!(unknown.to_string().contains("size"), "{unknown}");

        let too_big = VmConfig {
            balloon: Some(BalloonConfig::new(129)),
            ..VmConfig::default()
        };
        let err = too_big.validate().unwrap_err();
        assert!(
            err.to_string()
                .contains("balloon amount_mib 129: more than the VM's 128 MiB"),
            "{err}"
        );
    }

    #[test]
    fn irqchip_defaults_to_split_and_parses_both_modes() {
        assert_eq!(VmConfig::default().irqchip, IrqchipChoice::Split);
        let c = VmConfig::from_json(r#"{"irqchip": "kernel", "pit_reinject": true}"#).unwrap();
        assert_eq!(c.irqchip, IrqchipChoice::Kernel);
        c.validate().unwrap();
        let err = VmConfig::from_json(r#"{"irqchip": "pic"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("pic"), "{err}");
    }

    #[test]
    fn rejects_pit_reinject_without_a_pit() {
        let c = VmConfig {
            pit_reinject: true,
            ..Default::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("pit_reinject") && err.contains("split"), "{err}");
    }

    #[test]
    fn rejects_zero_vcpus_naming_the_value() {
        let c = VmConfig {
            vcpus: 0,
            ..Default::default()
        };
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "invalid configuration: vcpus 0: must be between 1 and 254"
        );
    }

    #[test]
    fn rejects_zero_memory_naming_the_value() {
        let c = VmConfig {
            memory_mib: 0,
            ..Default::default()
        };
        let msg = c.validate().unwrap_err().to_string();
        assert!(
            msg.contains("memory size 0 bytes (0 MiB): must be at least 2 MiB"),
            "{msg}"
        );
    }

    #[test]
    fn rejects_memory_beyond_the_host() {
        let c = VmConfig {
            memory_mib: 512 * 1024,
            ..Default::default()
        };
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains("memory 524288 MiB"), "{msg}");
    }

    #[test]
    fn rejects_overflowing_memory() {
        let c = VmConfig {
            memory_mib: u64::MAX,
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains(&u64::MAX.to_string()));
    }

    #[test]
    fn rejects_a_missing_kernel_naming_the_path() {
        let c = VmConfig {
            kernel: Some("/nonexistent/vmlinux".into()),
            ..Default::default()
        };
        let msg = c.validate().unwrap_err().to_string();
        assert!(
            msg.contains("/nonexistent/vmlinux: No such file or directory"),
            "{msg}"
        );
    }

    #[test]
    fn rejects_unknown_json_keys_naming_them() {
        let msg = VmConfig::from_json(r#"{"vcpu": 1}"#).unwrap_err().to_string();
        assert!(msg.contains("unknown field `vcpu`"), "{msg}");
    }

    #[test]
    fn rejects_bad_json_values_naming_them() {
        let msg = VmConfig::from_json(r#"{"vcpus": 1000}"#).unwrap_err().to_string();
        assert!(msg.contains("1000"), "{msg}");
    }

    #[test]
    fn rejects_a_missing_initrd_naming_the_path() {
        let c = VmConfig {
            kernel: Some("/proc/self/exe".into()),
            initrd: Some("/no/initrd.cpio".into()),
            ..Default::default()
        };
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains("initrd /no/initrd.cpio"), "{msg}");
    }

    #[test]
    fn serial_modes_parse_and_name_bad_values() {
        assert_eq!("none".parse::<SerialMode>(), Ok(SerialMode::None));
        assert_eq!(
            "file:/tmp/x".parse::<SerialMode>(),
            Ok(SerialMode::File("/tmp/x".into()))
        );
        assert!("tty".parse::<SerialMode>().unwrap_err().contains("\"tty\""));
        assert!("file:".parse::<SerialMode>().is_err());
    }

    #[test]
    fn json_takes_every_setting() {
        let c = VmConfig::from_json(
            r#"{"vcpus":2,"memory_mib":256,"kernel":"/k","cmdline":"x","initrd":"/i","boot_protocol":"pvh","ring0":"emulated","serial":{"file":"/tmp/s"}}"#,
        )
        .unwrap();
        assert_eq!(c.boot_protocol, BootProtocolChoice::Pvh);
        assert_eq!(c.ring0, Ring0Choice::Emulated);
        assert_eq!(c.serial, SerialMode::File("/tmp/s".into()));
        assert!(VmConfig::from_json(r#"{"boot_protocol":"uefi"}"#)
            .unwrap_err()
            .to_string()
            .contains("uefi"));
    }

    #[test]
    fn transport_defaults_to_the_vm_setting_and_devices_may_choose_their_own() {
        let config: VmConfig = serde_json::from_str(
            r#"{"transport": "pci", "disks": [{"path": "/a"}, {"path": "/b", "transport": "mmio"}], "rng": true}"#,
        )
        .unwrap();
        let transports: Vec<_> = config.transports().collect();
        assert_eq!(
            transports,
            [VirtioTransport::Pci, VirtioTransport::Mmio, VirtioTransport::Pci]
        );
        assert!(config.uses_pci());
        assert!(!VmConfig::default().uses_pci(), "no devices");
        let defaults: VmConfig = serde_json::from_str(r#"{"rng": true}"#).unwrap();
        assert_eq!(defaults.transport, VirtioTransport::Pci);
        let err = serde_json::from_str::<VmConfig>(r#"{"transport": "isa"}"#).unwrap_err();
        assert!(err.to_string().contains("isa"), "{err}");
    }

    #[test]
    fn linux_default_cmdline_probes_pci_only_with_pci_devices() {
        let mut config = VmConfig {
            kernel: Some("/vmlinux".into()),
            ..Default::default()
        };
        assert_eq!(config.effective_cmdline(), DEFAULT_LINUX_CMDLINE);
        config.rng = true;
        assert_eq!(config.effective_cmdline(), DEFAULT_LINUX_PCI_CMDLINE);
        config.transport = VirtioTransport::Mmio;
        assert_eq!(config.effective_cmdline(), DEFAULT_LINUX_CMDLINE);
        assert!(!DEFAULT_LINUX_PCI_CMDLINE.contains("pci=off"));
    }

    #[test]
    fn disk_flags_parse_and_name_bad_options() {
        let d: DiskConfig = "/img,ro,id=root".parse().unwrap();
        assert_eq!(
            d,
            DiskConfig {
                path: "/img".into(),
                read_only: true,
                id: Some("root".into()),
                transport: None,
                rate_limiter: None,
                overlay: None,
            }
        );
        assert!("/img,rx".parse::<DiskConfig>().unwrap_err().contains("\"rx\""));
        let cow: DiskConfig = "/base.img,overlay=/clone1.ovl".parse().unwrap();
        assert_eq!(cow.overlay.as_deref(), Some(std::path::Path::new("/clone1.ovl")));
        let pci: DiskConfig = "/img,transport=pci".parse().unwrap();
        assert_eq!(pci.transport, Some(VirtioTransport::Pci));
        let err = "/img,transport=isa".parse::<DiskConfig>().unwrap_err();
        assert!(err.contains("\"isa\"") && err.contains("mmio or pci"), "{err}");
        assert!(",ro".parse::<DiskConfig>().is_err());
    }

    #[test]
    fn console_flags_parse() {
        assert_eq!(
            "socket:/s".parse::<ConsoleConfig>(),
            Ok(ConsoleConfig::Socket("/s".into()))
        );
        assert_eq!(
            "file:/f".parse::<ConsoleConfig>(),
            Ok(ConsoleConfig::File("/f".into()))
        );
        assert!("tcp:1".parse::<ConsoleConfig>().is_err());
    }

    #[test]
    fn rejects_a_missing_disk_and_a_long_id() {
        let c = VmConfig {
            disks: vec!["/no/disk.img".parse().unwrap()],
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("/no/disk.img"));
        let c = VmConfig {
            disks: vec!["/proc/self/exe,id=123456789012345678901".parse().unwrap()],
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("at most 20 bytes"));
    }

    #[test]
    fn net_flags_parse_and_name_bad_values() {
        let n: NetConfig = "tap=tap0,mac=02:00:00:00:00:01".parse().unwrap();
        assert_eq!(n.mac_bytes(0), Ok([2, 0, 0, 0, 0, 1]));
        let d: NetConfig = "tap=tap1".parse().unwrap();
        assert_eq!(d.mac_bytes(2), Ok([0x52, 0x54, 0, 0x12, 0x34, 0x58]));
        assert!("tap=t,mac=zz:00:00:00:00:01"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("zz:00"));
        assert!("tap=t,mac=01:00:00:00:00:01"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("multicast"));
        assert!("mac=02:00:00:00:00:01"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("exactly one"));
        assert!("tap=a,fd=3"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("exactly one"));
        assert_eq!("fd=7".parse::<NetConfig>().unwrap().fd, Some(7));
        assert!("fd=-1".parse::<NetConfig>().unwrap_err().contains("\"-1\""));
        assert!("tap=t,speed=10"
            .parse::<NetConfig>()
            .unwrap_err()
            .contains("speed"));
    }

    #[test]
    fn rejects_an_overlong_tap_name() {
        let c = VmConfig {
            nets: vec!["tap=a-very-long-interface-name".parse().unwrap()],
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("1 to 15 bytes"));
    }

    #[test]
    fn vsock_flags_parse_and_name_bad_values() {
        let v: VsockConfig = "cid=3,uds=/tmp/v.sock".parse().unwrap();
        assert_eq!(
            v,
            VsockConfig {
                cid: 3,
                uds: "/tmp/v.sock".into(),
                transport: None,
            }
        );
        let pci: VsockConfig = "cid=3,uds=/s,transport=pci".parse().unwrap();
        assert_eq!(pci.transport, Some(VirtioTransport::Pci));
        assert!("cid=x,uds=/s"
            .parse::<VsockConfig>()
            .unwrap_err()
            .contains("\"x\""));
        assert!("cid=3".parse::<VsockConfig>().unwrap_err().contains("needs both"));
        let c = VmConfig {
            vsock: Some("cid=2,uds=/nonexistent/v".parse().unwrap()),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("vsock cid 2"));
        let c = VmConfig {
            vsock: Some("cid=3,uds=/".parse().unwrap()),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("already exists"));
    }

    #[test]
    fn default_cmdline_depends_on_the_kernel() {
        assert_eq!(VmConfig::default().effective_cmdline(), "hello");
        let linux = VmConfig {
            kernel: Some("/k".into()),
            ..Default::default()
        };
        assert!(linux.effective_cmdline().contains("console=ttyS0"));
    }

    #[test]
    fn rate_limiters_take_firecrackers_shape() {
        let disk: DiskConfig = serde_json::from_str(
            r#"{"path": "/d", "rate_limiter": {
                "bandwidth": {"size": 1048576, "one_time_burst": 4096, "refill_time": 1000},
                "ops": {"size": 100, "refill_time": 100}}}"#,
        )
        .unwrap();
        let limiter = disk.rate_limiter.unwrap();
        assert_eq!(
            limiter.bandwidth,
            Some(TokenBucketConfig::new(1 << 20, 1000).with_one_time_burst(4096))
        );
        assert_eq!(
            limiter.updates(),
            (
                keel_ratelimit::BucketUpdate::Set(
                    keel_ratelimit::BucketConfig::new(1 << 20, 1000).with_one_time_burst(4096)
                ),
                keel_ratelimit::BucketUpdate::Set(keel_ratelimit::BucketConfig::new(100, 100)),
            )
        );
        let net: NetConfig = serde_json::from_str(
            r#"{"tap": "t0", "rx_rate_limiter": {"ops": {"size": 1, "refill_time": 1}},
                "tx_rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1}}}"#,
        )
        .unwrap();
        assert!(net.rx_rate_limiter.unwrap().bandwidth.is_none());
        assert!(net.tx_rate_limiter.unwrap().ops.is_none());
        // Serialized back the same way, missing buckets left out.
        let text = serde_json::to_string(&net).unwrap();
        assert!(
            text.contains(r#""rx_rate_limiter":{"ops":{"size":1,"refill_time":1}}"#),
            "{text}"
        );
    }

    #[test]
    fn rate_limiter_updates_keep_missing_buckets_and_remove_zero_ones() {
        let patch: RateLimiterConfig =
            serde_json::from_str(r#"{"bandwidth": {"size": 0, "refill_time": 100}}"#).unwrap();
        let (bandwidth, ops) = patch.updates();
        assert_eq!(ops, keel_ratelimit::BucketUpdate::Keep);
        let keel_ratelimit::BucketUpdate::Set(bucket) = bandwidth else {
            panic!("{bandwidth:?}");
        };
        assert!(!bucket.is_limiting(), "size 0 removes the limit");
    }

    #[test]
    fn malformed_rate_limiters_are_refused_naming_the_field() {
        for (body, names) in [
            (r#"{"bandwidth": {"size": 1}}"#, "refill_time"),
            (r#"{"bandwidth": {"size": -1, "refill_time": 1}}"#, "-1"),
            (r#"{"bandwith": {"size": 1, "refill_time": 1}}"#, "bandwith"),
            (r#"{"ops": {"size": 1, "refill_time": 1, "burst": 3}}"#, "burst"),
        ] {
            let err = serde_json::from_str::<RateLimiterConfig>(body)
                .unwrap_err()
                .to_string();
            assert!(err.contains(names), "{body}: {err}");
        }
        let c = VmConfig {
            rng_rate_limiter: Some(RateLimiterConfig::default()),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("rng_rate_limiter"));
    }
}
