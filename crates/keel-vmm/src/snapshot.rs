//! Snapshots: a paused VM saved to a state file and a memory file, and
//! restored from them — once, or many times over as clones.
//!
//! [`VmController::snapshot`](crate::VmController::snapshot) writes the
//! memory file first ([`keel_memory::save_memory`]: sparse, untouched and
//! zero pages are holes), then the state file ([`keel_snapshot`]'s
//! checksummed container around [`VmState`]), each to a temporary name
//! renamed into place once complete, so an interrupted snapshot never
//! leaves a state file that looks whole.
//!
//! [`Snapshot::load`] reads and checks a state file; its
//! [`config`](Snapshot::config) can be changed before restoring (another
//! disk image, tap device or vsock socket for a clone); then
//! [`VmBuilder::restore`](crate::VmBuilder::restore) builds the VM with the
//! snapshot's devices, maps its memory copy-on-write from the memory file
//! and puts every vCPU and device back as it was. The restored VM starts
//! with [`Vm::start`](crate::Vm::start) and continues where the original
//! was paused.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_devices::{RtcState, SerialConsoleState};
use keel_irq::{IoapicState, KernelIrqchipState};
use keel_memory::{GuestMemoryMmap, SavedMemory};
use keel_vcpu::VcpuState;
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use crate::{Error, Result, VmConfig};

/// The file names [`crate::VmController::snapshot_to_dir`] and the `keel`
/// command use in a snapshot directory: the state file.
pub const STATE_FILE_NAME: &str = "vm.state";
/// The memory file's name in a snapshot directory.
pub const MEMORY_FILE_NAME: &str = "vm.mem";

/// Everything a snapshot keeps besides guest memory.
#[derive(Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub struct VmState {
    /// The Keel version that wrote the snapshot.
    pub keel_version: String,
    /// The VM's configuration, as JSON (the `--config` format).
    pub config_json: String,
    /// Guest memory size in bytes (the memory file's length).
    pub memory_size: u64,
    /// What the memory file holds: all of memory, or a diff.
    pub memory: MemoryContents,
    /// `KVM_GET_CLOCK`: kvmclock's time.
    pub clock: kvm_bindings::kvm_clock_data,
    /// Every vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// The interrupt controller.
    pub irqchip: IrqchipState,
    /// The 16550 serial console.
    pub serial: SerialConsoleState,
    /// The CMOS RTC.
    pub rtc: RtcState,
    /// Every virtio-mmio device, in the order the VM was built with them.
    pub virtio: Vec<SavedVirtioDevice>,
    /// What the caller attached to the snapshot
    /// ([`crate::VmController::snapshot_with`]): Keel's control
    /// plane keeps its Firecracker configuration here.
    pub record: Option<String>,
}

/// What a snapshot's memory file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum MemoryContents {
    /// All of guest memory (pages never written are holes).
    Full,
    /// Only the pages written since the previous snapshot of the same VM,
    /// as (offset, length) ranges of the memory file; merge it onto that
    /// snapshot's memory file with [`merge_diff_snapshot`] to restore.
    Diff {
        /// The ranges the diff holds.
        ranges: Vec<(u64, u64)>,
    },
}

/// Full or diff: what [`crate::VmController::snapshot_with`] writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum SnapshotKind {
    /// All of guest memory.
    #[default]
    Full,
    /// Only the pages written since the VM's previous snapshot (or its
    /// start); needs [`VmConfig::track_dirty_pages`].
    Diff,
}

/// The interrupt controller's part of a snapshot.
#[derive(Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub enum IrqchipState {
    /// Keel's user-space IOAPIC (split irqchip; the local APICs are in
    /// the vCPU states).
    Split(IoapicState),
    /// KVM's PICs, IOAPIC and PIT.
    Kernel(Box<KernelIrqchipState>),
}

/// One virtio device of a snapshot.
#[derive(Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SavedVirtioDevice {
    /// What the VM called it (`disk /path`, `virtio-rng`, a user's name).
    pub name: String,
    /// Its transport's state, with the device's.
    pub transport: SavedTransport,
}

/// A virtio transport's part of a snapshot.
#[derive(Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub enum SavedTransport {
    /// virtio-mmio at `base` (checked on restore).
    Mmio {
        /// The MMIO window.
        base: u64,
        /// Registers and device state.
        state: keel_virtio::TransportState,
    },
    /// virtio-pci at `address` (checked on restore).
    Pci {
        /// The function's bus address, `00:dd.f`.
        address: String,
        /// Configuration space, MSI-X, registers and device state.
        state: keel_virtio::PciTransportState,
    },
}

/// A transport as the VM wired it, for snapshots.
pub(crate) enum WiredTransport {
    Mmio(Arc<Mutex<keel_virtio::MmioTransport>>),
    Pci(Arc<Mutex<keel_virtio::PciTransport>>, keel_pci::PciAddress),
}

/// What a snapshot wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct SnapshotInfo {
    /// Bytes in the state file.
    pub state_bytes: u64,
    /// The memory file's size and the data in it.
    pub memory: SavedMemory,
    /// How long the VM was held for it (it stays paused afterwards).
    pub took: Duration,
}

/// A snapshot read from disk, ready to restore one VM or many.
#[derive(Debug)]
pub struct Snapshot {
    pub(crate) state: VmState,
    config: VmConfig,
    memory_path: PathBuf,
}

impl Snapshot {
    /// Reads and checks the state file at `state_path`; `memory_path` is
    /// its memory file, opened (and checked for size) on restore. A file
    /// that is not a Keel snapshot, was written by another format version,
    /// is truncated or corrupted fails here with an error that says which.
    pub fn load(state_path: impl AsRef<Path>, memory_path: impl AsRef<Path>) -> Result<Self> {
        let state_path = state_path.as_ref();
        let bytes = std::fs::read(state_path)
            .map_err(|e| Error::Snapshot(format!("state file {}: {e}", state_path.display())))?;
        let state: VmState = keel_snapshot::decode(&bytes)
            .map_err(|e| Error::Snapshot(format!("{}: {e}", state_path.display())))?;
        let config: VmConfig = serde_json::from_str(&state.config_json).map_err(|e| {
            Error::Snapshot(format!(
                "{}: the saved configuration does not parse: {e}",
                state_path.display()
            ))
        })?;
        if usize::from(config.vcpus) != state.vcpus.len() {
            return Err(Error::Snapshot(format!(
                "{}: the configuration has {} vCPUs, the state {}",
                state_path.display(),
                config.vcpus,
                state.vcpus.len()
            )));
        }
        if config.memory_mib.checked_mul(keel_memory::MIB) != Some(state.memory_size) {
            return Err(Error::Snapshot(format!(
                "{}: the configuration has {} MiB of memory, the state {} bytes",
                state_path.display(),
                config.memory_mib,
                state.memory_size
            )));
        }
        Ok(Self {
            state,
            config,
            memory_path: memory_path.as_ref().to_path_buf(),
        })
    }

    /// [`Snapshot::load`] of the two files in a snapshot directory
    /// ([`STATE_FILE_NAME`], [`MEMORY_FILE_NAME`]).
    pub fn load_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        Self::load(dir.join(STATE_FILE_NAME), dir.join(MEMORY_FILE_NAME))
    }

    /// The saved VM's configuration: build the restored VM with it
    /// ([`crate::VmBuilder::new`]), changed where a clone needs its own
    /// backends (disk paths, tap names, vsock socket, console).
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The memory file.
    pub fn memory_path(&self) -> &Path {
        &self.memory_path
    }

    /// The Keel version that wrote the snapshot.
    pub fn keel_version(&self) -> &str {
        &self.state.keel_version
    }

    /// What the snapshot's taker attached to it, if anything.
    pub fn record(&self) -> Option<&str> {
        self.state.record.as_deref()
    }

    /// The saved state.
    pub fn state(&self) -> &VmState {
        &self.state
    }
}

/// The devices and handles a running VM keeps for snapshots.
pub(crate) struct SnapshotParts {
    pub vm_fd: Arc<VmFd>,
    pub config: VmConfig,
    pub serial: Arc<Mutex<keel_devices::SerialConsole<crate::vm::Console>>>,
    pub rtc: Arc<Mutex<keel_devices::Rtc>>,
    pub ioapic: Option<Arc<Mutex<crate::vm::SplitIoapic>>>,
    pub transports: Vec<(String, WiredTransport)>,
    /// Whether the memory slots log dirty pages (diff snapshots).
    pub track_dirty_pages: bool,
    /// Kept last: the VM above refers to it.
    pub mem: GuestMemoryMmap,
}

/// Applies a diff snapshot to the snapshot it followed: copies the pages
/// the diff's memory file holds (`diff_memory`, listed in its state file
/// `diff_state`) onto the earlier snapshot's memory file `base_memory`, in
/// place, then rewrites `diff_state` as a full snapshot's. Afterwards
/// `diff_state` with `base_memory` restores the VM as the diff saw it; a
/// chain of diffs is merged oldest first. Returns the bytes copied.
pub fn merge_diff_snapshot(
    diff_state: impl AsRef<Path>,
    diff_memory: impl AsRef<Path>,
    base_memory: impl AsRef<Path>,
) -> Result<u64> {
    let (diff_state, diff_memory, base_memory) =
        (diff_state.as_ref(), diff_memory.as_ref(), base_memory.as_ref());
    let bytes = std::fs::read(diff_state)
        .map_err(|e| Error::Snapshot(format!("state file {}: {e}", diff_state.display())))?;
    let mut state: VmState = keel_snapshot::decode(&bytes)
        .map_err(|e| Error::Snapshot(format!("{}: {e}", diff_state.display())))?;
    let MemoryContents::Diff { ranges } = &state.memory else {
        return Err(Error::Snapshot(format!(
            "{} is a full snapshot: there is nothing to merge",
            diff_state.display()
        )));
    };
    let open = |path: &Path, write: bool| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(|e| Error::Snapshot(format!("{}: {e}", path.display())))
    };
    let diff = open(diff_memory, false)?;
    let base = open(base_memory, true)?;
    let copied = keel_memory::merge_memory_diff(&diff, &base, ranges).map_err(|e| {
        Error::Snapshot(format!(
            "merging {} onto {}: {e}",
            diff_memory.display(),
            base_memory.display()
        ))
    })?;
    state.memory = MemoryContents::Full;
    let bytes = keel_snapshot::encode(&state).map_err(|e| Error::Snapshot(e.to_string()))?;
    write_atomically(diff_state, |mut file| {
        use std::io::Write;
        file.write_all(&bytes)
            .map_err(|e| Error::Snapshot(format!("{}: {e}", diff_state.display())))
    })?;
    Ok(copied)
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SnapshotParts {
    /// Everything but the vCPUs, which their threads save.
    pub fn save(
        &self,
        vcpus: Vec<VcpuState>,
        record: Option<String>,
        memory: MemoryContents,
    ) -> Result<VmState> {
        let mut virtio = Vec::with_capacity(self.transports.len());
        for (name, wired) in &self.transports {
            let failed = |e: keel_virtio::Error| Error::Snapshot(format!("{name}: {e}"));
            let transport = match wired {
                WiredTransport::Mmio(t) => {
                    let t = lock(t);
                    SavedTransport::Mmio {
                        base: t.slot().base,
                        state: t.save_state().map_err(failed)?,
                    }
                }
                WiredTransport::Pci(t, address) => SavedTransport::Pci {
                    address: address.to_string(),
                    state: lock(t).save_state().map_err(failed)?,
                },
            };
            virtio.push(SavedVirtioDevice {
                name: name.clone(),
                transport,
            });
        }
        let irqchip = match &self.ioapic {
            Some(ioapic) => IrqchipState::Split(lock(ioapic).save_state()),
            None => IrqchipState::Kernel(Box::new(KernelIrqchipState::save(&self.vm_fd)?)),
        };
        let clock = self
            .vm_fd
            .get_clock()
            .map_err(|e| Error::Kvm("KVM_GET_CLOCK", e))?;
        let config_json = serde_json::to_string(&self.config)
            .map_err(|e| Error::Snapshot(format!("cannot serialize the configuration: {e}")))?;
        Ok(VmState {
            keel_version: env!("CARGO_PKG_VERSION").to_string(),
            config_json,
            memory_size: vm_memory::GuestMemoryBackend::iter(&self.mem)
                .map(vm_memory::GuestMemoryRegion::len)
                .sum(),
            memory,
            clock,
            vcpus,
            irqchip,
            serial: lock(&self.serial).save_state(),
            rtc: lock(&self.rtc).save_state(),
            virtio,
            record,
        })
    }

    /// Writes the snapshot of a paused VM whose vCPU threads saved
    /// `vcpus`: the memory file (all of it, or for a diff the pages
    /// written since the last snapshot), then the state file, each
    /// through a temporary file renamed into place. Returns the state
    /// file's size and what the memory file holds.
    pub fn write(
        &self,
        vcpus: Vec<VcpuState>,
        kind: SnapshotKind,
        record: Option<String>,
        state_path: &Path,
        memory_path: &Path,
    ) -> Result<(u64, SavedMemory)> {
        // With tracking on, what was written since the last snapshot: the
        // content of a diff, and for a full snapshot the start of the next.
        let dirty = if self.track_dirty_pages {
            Some(
                keel_memory::take_dirty_pages(&self.vm_fd, &self.mem)
                    .map_err(|e| Error::Snapshot(e.to_string()))?,
            )
        } else {
            None
        };
        let contents = match (kind, dirty) {
            (SnapshotKind::Full, _) => MemoryContents::Full,
            (SnapshotKind::Diff, Some(ranges)) => MemoryContents::Diff { ranges },
            (SnapshotKind::Diff, None) => {
                return Err(Error::Snapshot(
                    "a diff snapshot needs dirty-page tracking: build the VM with track_dirty_pages".into(),
                ))
            }
        };
        let state = self.save(vcpus, record, contents.clone())?;
        let mut memory = SavedMemory::default();
        write_atomically(memory_path, |file| {
            memory = match &contents {
                MemoryContents::Diff { ranges } => keel_memory::save_memory_diff(&self.mem, file, ranges),
                _ => keel_memory::save_memory(&self.mem, file),
            }
            .map_err(|e| Error::Snapshot(format!("{}: {e}", memory_path.display())))?;
            Ok(())
        })?;
        let bytes = keel_snapshot::encode(&state).map_err(|e| Error::Snapshot(e.to_string()))?;
        write_atomically(state_path, |mut file| {
            use std::io::Write;
            file.write_all(&bytes)
                .map_err(|e| Error::Snapshot(format!("{}: {e}", state_path.display())))
        })?;
        Ok((bytes.len() as u64, memory))
    }
}

/// Puts each saved virtio device back into the transport built in its
/// place, after checking that the VM has the same devices in the same
/// places; a PCI function's BARs are then routed where the guest had them.
pub(crate) fn restore_virtio(
    transports: &[(String, WiredTransport)],
    saved: &[SavedVirtioDevice],
    pci_bus: &keel_pci::PciBus,
) -> Result<()> {
    if transports.len() != saved.len() {
        return Err(Error::Snapshot(format!(
            "the snapshot has {} virtio devices ({}), this VM {} ({})",
            saved.len(),
            saved
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            transports.len(),
            transports
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        )));
    }
    for ((name, wired), device) in transports.iter().zip(saved) {
        let failed =
            |e: keel_virtio::Error| Error::Snapshot(format!("{name} (saved as {}): {e}", device.name));
        match (wired, &device.transport) {
            (WiredTransport::Mmio(transport), SavedTransport::Mmio { base, state }) => {
                let mut transport = transport.lock().unwrap_or_else(|e| e.into_inner());
                if transport.slot().base != *base {
                    return Err(Error::Snapshot(format!(
                        "{name} is at {:#x}, but the snapshot's {} was at {base:#x}",
                        transport.slot().base,
                        device.name,
                    )));
                }
                transport.restore_state(state).map_err(failed)?;
            }
            (
                WiredTransport::Pci(transport, address),
                SavedTransport::Pci {
                    address: saved_at,
                    state,
                },
            ) => {
                if address.to_string() != *saved_at {
                    return Err(Error::Snapshot(format!(
                        "{name} is PCI function {address}, but the snapshot's {} was {saved_at}",
                        device.name,
                    )));
                }
                transport
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .restore_state(state)
                    .map_err(failed)?;
                pci_bus.refresh_routes(*address);
            }
            (WiredTransport::Mmio(_), SavedTransport::Pci { .. }) => {
                return Err(Error::Snapshot(format!(
                    "{name} is on virtio-mmio, but the snapshot's {} was on virtio-pci",
                    device.name
                )))
            }
            (WiredTransport::Pci(..), SavedTransport::Mmio { .. }) => {
                return Err(Error::Snapshot(format!(
                    "{name} is on virtio-pci, but the snapshot's {} was on virtio-mmio",
                    device.name
                )))
            }
        }
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file renamed into place.
pub(crate) fn write_atomically(path: &Path, write: impl FnOnce(&File) -> Result<()>) -> Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".partial");
    let tmp = PathBuf::from(tmp_name);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| Error::Snapshot(format!("{}: {e}", tmp.display())))?;
    let written = write(&file).and_then(|()| {
        file.sync_all()
            .map_err(|e| Error::Snapshot(format!("{}: {e}", tmp.display())))
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::Snapshot(format!("{}: {e}", path.display()))
    })
}
