//! Building a VM from its layers, running it, and learning why it ended.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use std::os::fd::FromRawFd;
use std::os::unix::io::AsRawFd;
use std::time::Instant;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use keel_boot::BootProtocol;
use keel_devices::{BootTimer, ExitPort, I8042Reset, PowerControl, SerialConsole, SerialInput};
use keel_irq::{InterruptLine, IrqfdLine};
use keel_memory::{GuestLayout, GuestMemoryMmap, MMIO_DEVICES_END, MMIO_DEVICES_START};
use keel_vcpu::{CpuidConfig, Ring0Execution, Vcpu, VcpuKicker, VcpuStop};
use kvm_ioctls::{Kvm, VmFd};
use vm_allocator::{AddressAllocator, AllocPolicy};
use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::{DeviceMmio, DevicePio};
use vmm_sys_util::eventfd::EventFd;

use crate::boot_progress::ConsoleWatcher;
use crate::snapshot::{Snapshot, SnapshotInfo, SnapshotKind};
use crate::{
    BootProtocolChoice, ConsoleConfig, Error, IrqchipChoice, Result, Ring0Choice, SerialMode,
    VirtioTransport, VmConfig,
};

/// Everything a virtio device needs from the VM, while it is built.
struct VirtioWiring<'a> {
    vm_fd: &'a Arc<VmFd>,
    mem: &'a GuestMemoryMmap,
    io: &'a mut IoManager,
    mmio_allocator: &'a mut AddressAllocator,
    gsis: keel_irq::GsiAllocator,
    pci: crate::pci::PciWiring,
    cmdline: Vec<String>,
    /// The virtio-mmio windows, for the ACPI tables.
    mmio_windows: Vec<keel_boot::MmioDeviceWindow>,
    subscribers: &'a mut Vec<Subscriber>,
    /// Devices with an event loop (and thread) of their own: disks, whose
    /// backends may block.
    own_threads: &'a mut Vec<Subscriber>,
    /// The virtio transports, in order, for snapshots.
    transports: Vec<(String, crate::snapshot::WiredTransport)>,
}

impl VirtioWiring<'_> {
    /// Attaches `device` with `transport` and hands it to the event loop.
    fn add<D>(&mut self, what: &str, device: Arc<Mutex<D>>, transport: VirtioTransport) -> Result<()>
    where
        D: keel_virtio::VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        self.add_shared(what, device.clone(), device, transport, false)
    }

    /// [`Self::add`] for a device seen through its two roles.
    fn add_shared(
        &mut self,
        what: &str,
        device: Arc<Mutex<dyn keel_virtio::VirtioDevice>>,
        subscriber: Subscriber,
        transport: VirtioTransport,
        own_thread: bool,
    ) -> Result<()> {
        match transport {
            VirtioTransport::Mmio => self.add_mmio(what, device)?,
            VirtioTransport::Pci => {
                let (transport, address) = self.pci.add_virtio(what, device, self.vm_fd, self.mem)?;
                self.transports.push((
                    what.to_string(),
                    crate::snapshot::WiredTransport::Pci(transport, address),
                ));
            }
        }
        if own_thread {
            self.own_threads.push(subscriber);
        } else {
            self.subscribers.push(subscriber);
        }
        Ok(())
    }

    /// Gives `device` an MMIO window and a GSI, puts its transport on the
    /// bus, turns its queue notifications into ioeventfds and announces it
    /// on the command line.
    fn add_mmio(&mut self, what: &str, device: Arc<Mutex<dyn keel_virtio::VirtioDevice>>) -> Result<()> {
        let place = |e: String| Error::DeviceRange(format!("{what}: {e}"));
        let window = self
            .mmio_allocator
            .allocate(keel_virtio::MMIO_WINDOW_SIZE, 0x1000, AllocPolicy::FirstMatch)
            .map_err(|e| place(format!("no MMIO window left: {e}")))?;
        let gsi = self.gsis.allocate().map_err(|e| place(e.to_string()))?;
        let slot = keel_virtio::MmioSlot {
            base: window.start(),
            gsi,
        };
        let line = Arc::new(IrqfdLine::new(self.vm_fd, gsi)?);
        let transport = keel_virtio::MmioTransport::new(device, self.mem.clone(), line, slot)
            .map_err(|e| place(e.to_string()))?;
        for notifier in transport.queue_notifiers() {
            let address = kvm_ioctls::IoEventAddress::Mmio(notifier.address);
            self.vm_fd
                .register_ioevent(notifier.event, &address, notifier.datamatch)
                .map_err(|e| place(format!("ioeventfd at {:#x}: {e}", notifier.address)))?;
        }
        let range = slot.range().map_err(|e| place(e.to_string()))?;
        let transport = Arc::new(Mutex::new(transport));
        self.io
            .register_mmio(range, transport.clone())
            .map_err(|e| place(format!("{e:?}")))?;
        self.transports
            .push((what.to_string(), crate::snapshot::WiredTransport::Mmio(transport)));
        self.cmdline.push(slot.cmdline_entry());
        self.mmio_windows.push(keel_boot::MmioDeviceWindow {
            base: slot.base,
            size: keel_virtio::MMIO_WINDOW_SIZE,
            gsi,
        });
        log::debug!("{what}: virtio-mmio at {:#x}, GSI {gsi}", slot.base);
        Ok(())
    }
}

/// `cmdline` with `params` added as kernel parameters: before a ` -- `
/// (after which words belong to init), else at the end.
fn with_kernel_params(cmdline: &str, params: &[String]) -> String {
    if params.is_empty() {
        return cmdline.to_string();
    }
    let extra = params.join(" ");
    match cmdline.find(" -- ") {
        Some(i) => format!("{} {extra}{}", &cmdline[..i], &cmdline[i..]),
        None if cmdline.is_empty() => extra,
        None => format!("{cmdline} {extra}"),
    }
}

#[cfg(test)]
mod tests {
    use super::with_kernel_params;

    #[test]
    fn kernel_params_go_before_init_arguments() {
        let p = vec!["a=1".to_string(), "b=2".to_string()];
        assert_eq!(with_kernel_params("console=ttyS0", &p), "console=ttyS0 a=1 b=2");
        assert_eq!(with_kernel_params("ro -- single", &p), "ro a=1 b=2 -- single");
        assert_eq!(with_kernel_params("", &p), "a=1 b=2");
        assert_eq!(with_kernel_params("x", &[]), "x");
    }
}

/// Where the boot timer sits: the first page of the device window. A guest
/// writes 123 there when it reaches user space (`devmem 0xd0000000 8 123`).
pub const BOOT_TIMER_ADDR: u64 = MMIO_DEVICES_START;

/// Kernel parameters that keep Linux off what a software-emulated ring 0
/// cannot run (see `docs/host-kvm-notes.md`): XSAVE, the instructions whose
/// CPUID bits KVM cannot hide there, and the SSSE3/SSE4 code paths a stock
/// kernel picks for its built-in crypto (BLAKE2s for the random pool),
/// whose SIMD instructions the emulator lacks.
pub const EMULATED_RING0_CMDLINE: &str = "noxsave clearcpuid=smap,smep,umip,pku,fsgsbase,rdpid,cx16,avx,avx2,xsave,popcnt,rdrand,rdseed,movbe,bmi1,bmi2,abm,erms,fsrm,ssse3,sse4_1,sse4_2";

/// Host input for the serial console: anything readable that epoll can watch.
pub trait SerialSource: std::io::Read + AsRawFd + Send {}
impl<T: std::io::Read + AsRawFd + Send> SerialSource for T {}

pub(crate) type Console = Box<dyn Write + Send>;

/// A boxed [`SerialSource`] (std implements `AsRawFd` only for sized boxes).
struct BoxedSource(Box<dyn SerialSource>);

impl std::io::Read for BoxedSource {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl AsRawFd for BoxedSource {
    fn as_raw_fd(&self) -> std::os::unix::io::RawFd {
        self.0.as_raw_fd()
    }
}

/// Serial output: the configured sink behind a boot-progress watcher.
fn serial_sink(mode: &SerialMode) -> Result<Console> {
    Ok(match mode {
        SerialMode::None => Box::new(std::io::sink()),
        SerialMode::Stdio => Box::new(std::io::stdout()),
        SerialMode::File(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| Error::Config(format!("serial file {}: {e}", path.display())))?,
        ),
    })
}

/// Why a VM stopped.
///
/// The VM's outcome is the last of three words for "why it stopped", each
/// at its own layer: `keel_vcpu::RunOutcome` is why one `KVM_RUN` returned
/// (an exit handled, a kick, a halt, a triple fault, a KVM system event);
/// `keel_vcpu::VcpuStop` is why one vCPU's run loop ended; `ExitReason` is
/// why the whole VM ended, whichever vCPU or device decided it:
///
/// | `VcpuStop` | or a device | `ExitReason` |
/// |---|---|---|
/// | `TripleFault` | | [`TripleFault`](Self::TripleFault) `{ vcpu }` |
/// | `Reset` | i8042 reset line | [`GuestReset`](Self::GuestReset) |
/// | `PowerOff` | ACPI S5 (sleep control register) | [`GuestShutdown`](Self::GuestShutdown) |
/// | | exit port | [`GuestExit`](Self::GuestExit) |
/// | `Requested` | | [`Stopped`](Self::Stopped) (after [`StopHandle::stop`]) |
///
/// A vCPU error is not an outcome but the `Err` of [`VmHandle::wait`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExitReason {
    /// The guest reset the machine (i8042 reset line, `reboot`, `panic=-1`).
    GuestReset,
    /// The guest powered the machine off.
    GuestShutdown,
    /// The guest wrote this status to the exit port.
    GuestExit(u8),
    /// A vCPU triple-faulted.
    TripleFault {
        /// The vCPU that faulted.
        vcpu: u8,
    },
    /// [`StopHandle::stop`] was called.
    Stopped,
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::GuestReset => write!(f, "guest reset"),
            ExitReason::GuestShutdown => write!(f, "guest powered off"),
            ExitReason::GuestExit(status) => write!(f, "guest exited with status {status}"),
            ExitReason::TripleFault { vcpu } => write!(f, "triple fault on vCPU {vcpu}"),
            ExitReason::Stopped => write!(f, "stopped by the host"),
        }
    }
}

/// Shared between the vCPU threads, the devices and the handles: the first
/// outcome wins, then everything stops.
struct Control {
    outcome: Mutex<Option<Result<ExitReason>>>,
    finished: Condvar,
    stop: AtomicBool,
    /// Tells the vCPU threads to leave `KVM_RUN`: set when stopping, and
    /// while paused.
    leave_run: AtomicBool,
    /// Where the vCPU threads and the event loop park while paused.
    pause: crate::pause::PauseGate,
    kickers: Mutex<Vec<VcpuKicker>>,
    /// Wakes the event loop so it sees `stop` or a pause.
    wake_event_loop: EventFd,
    /// Where the VM's counters come from, for [`VmController::metrics`].
    metrics: Mutex<Vec<MetricsSource>>,
    /// The configuration's devices, for changes while the VM runs.
    devices: Mutex<ConfigDevices>,
    /// Where each vCPU thread puts its state when a snapshot asks.
    vcpu_states: Mutex<Vec<Option<keel_vcpu::Result<keel_vcpu::VcpuState>>>>,
    /// What a snapshot saves besides the vCPUs; dropped when the VM ends.
    snapshot_parts: Mutex<Option<crate::snapshot::SnapshotParts>>,
}

/// The devices [`VmConfig`] asked for, typed, in configuration order.
#[derive(Default)]
struct ConfigDevices {
    disks: Vec<Arc<Mutex<keel_virtio::Block<keel_virtio::FileBackend>>>>,
    nets: Vec<Arc<Mutex<keel_virtio::Net<keel_virtio::TapBackend>>>>,
    rng: Option<Arc<Mutex<keel_virtio::Rng>>>,
}

/// Counters of one part of the VM (the vCPUs, a device), by name.
pub type Counters = Vec<(&'static str, u64)>;

/// A named group of counters and how to sample it.
type MetricsSource = (String, Box<dyn Fn() -> Counters + Send + Sync>);

impl Control {
    fn lock_devices(&self) -> std::sync::MutexGuard<'_, ConfigDevices> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add_metrics(&self, group: impl Into<String>, sample: impl Fn() -> Counters + Send + Sync + 'static) {
        self.metrics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((group.into(), Box::new(sample)));
    }

    fn sample_metrics(&self) -> Vec<(String, Counters)> {
        self.metrics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(group, sample)| (group.clone(), sample()))
            .collect()
    }
}

impl Control {
    fn finish(&self, outcome: Result<ExitReason>) {
        {
            let mut slot = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                match &outcome {
                    Ok(reason) => log::info!("VM stopping: {reason}"),
                    Err(e) => log::error!("VM stopping: {e}"),
                }
                *slot = Some(outcome);
            }
        }
        self.stop.store(true, Ordering::Release);
        self.leave_run.store(true, Ordering::Release);
        self.pause.close();
        self.kick_all();
        self.finished.notify_all();
    }

    /// Gets every vCPU out of `KVM_RUN` and the event loop out of `epoll`
    /// so they look at `leave_run`, `stop` and the pause gate.
    fn kick_all(&self) {
        for kicker in self.kickers.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            // A thread that already left its loop no longer needs a kick.
            let _ = kicker.kick();
        }
        let _ = self.wake_event_loop.write(1);
    }

    /// See [`VmHandle::pause`].
    fn pause(&self) -> Result<()> {
        if self.stop.load(Ordering::Acquire) {
            return Err(Error::InvalidState(
                "the VM has ended; there is nothing to pause".into(),
            ));
        }
        if !self.pause.request() {
            return if self.pause.is_paused() {
                Ok(())
            } else {
                Err(Error::InvalidState(
                    "the VM has ended; there is nothing to pause".into(),
                ))
            };
        }
        self.leave_run.store(true, Ordering::Release);
        self.kick_all();
        if self.pause.wait_parked(PAUSE_TIMEOUT) {
            return Ok(());
        }
        // Someone did not park in time (or the VM ended meanwhile): undo.
        self.resume_threads();
        if self.stop.load(Ordering::Acquire) {
            Err(Error::InvalidState("the VM ended while pausing".into()))
        } else {
            Err(Error::InvalidState(format!(
                "the VM's threads did not reach a pause point within {} ms; it keeps running",
                PAUSE_TIMEOUT.as_millis()
            )))
        }
    }

    /// See [`VmHandle::resume`].
    fn resume(&self) -> Result<()> {
        if self.stop.load(Ordering::Acquire) {
            return Err(Error::InvalidState(
                "the VM has ended; there is nothing to resume".into(),
            ));
        }
        if !self.pause.is_paused() {
            return Err(Error::InvalidState("the VM is not paused".into()));
        }
        self.resume_threads();
        Ok(())
    }

    /// See [`VmController::snapshot`].
    fn snapshot(
        &self,
        state_path: &std::path::Path,
        memory_path: &std::path::Path,
        kind: SnapshotKind,
        record: Option<String>,
    ) -> Result<SnapshotInfo> {
        let started = Instant::now();
        if self.stop.load(Ordering::Acquire) {
            return Err(Error::InvalidState(
                "the VM has ended; there is nothing to snapshot".into(),
            ));
        }
        if !self.pause.is_paused() {
            return Err(Error::InvalidState(
                "the VM is running: pause it before taking a snapshot".into(),
            ));
        }
        let parts_guard = self.snapshot_parts.lock().unwrap_or_else(|e| e.into_inner());
        let Some(parts) = parts_guard.as_ref() else {
            return Err(Error::InvalidState(
                "the VM has ended; there is nothing to snapshot".into(),
            ));
        };
        // Each vCPU thread saves its own vCPU (KVM wants a vCPU's ioctls
        // from its thread), while parked.
        {
            let mut slots = self.vcpu_states.lock().unwrap_or_else(|e| e.into_inner());
            slots.iter_mut().for_each(|s| *s = None);
        }
        // A VM started paused may not have parked every thread yet.
        if !self.pause.wait_parked(PAUSE_TIMEOUT) || !self.pause.run_work(PAUSE_TIMEOUT) {
            return Err(Error::Snapshot(
                "the vCPU threads did not save their state in time (or the VM ended)".into(),
            ));
        }
        let vcpus = {
            let mut slots = self.vcpu_states.lock().unwrap_or_else(|e| e.into_inner());
            let mut vcpus = Vec::with_capacity(slots.len());
            for (id, slot) in slots.iter_mut().enumerate() {
                match slot.take() {
                    Some(Ok(state)) => vcpus.push(state),
                    Some(Err(e)) => return Err(Error::Snapshot(format!("vCPU {id}: {e}"))),
                    None => return Err(Error::Snapshot(format!("vCPU {id} did not save its state"))),
                }
            }
            vcpus
        };
        let (state_bytes, memory) = parts.write(vcpus, kind, record, state_path, memory_path)?;
        Ok(SnapshotInfo {
            state_bytes,
            memory,
            took: started.elapsed(),
        })
    }

    fn resume_threads(&self) {
        if !self.stop.load(Ordering::Acquire) {
            self.leave_run.store(false, Ordering::Release);
        }
        self.pause.release();
    }
}

impl PowerControl for Control {
    fn request_reset(&self) {
        self.finish(Ok(ExitReason::GuestReset));
    }

    fn request_exit(&self, status: u8) {
        self.finish(Ok(ExitReason::GuestExit(status)));
    }

    fn request_power_off(&self) {
        self.finish(Ok(ExitReason::GuestShutdown));
    }
}

/// Assembles a VM: validates the configuration, lets the caller add
/// devices and set the serial console, then [`VmBuilder::build`]s it.
pub struct VmBuilder {
    config: VmConfig,
    kvm_device: std::path::PathBuf,
    start: Instant,
    serial_out: Option<Console>,
    serial_in: Option<Box<dyn SerialSource>>,
    mmio_allocator: AddressAllocator,
    mmio_devices: Vec<(MmioRange, Arc<dyn DeviceMmio + Send + Sync>)>,
    pio_devices: Vec<(PioRange, Arc<dyn DevicePio + Send + Sync>)>,
    virtio_devices: Vec<UserVirtioDevice>,
}

/// A virtio device the caller built, waiting for [`VmBuilder::build`].
struct UserVirtioDevice {
    name: String,
    device: Arc<Mutex<dyn keel_virtio::VirtioDevice>>,
    subscriber: Subscriber,
    transport: Option<VirtioTransport>,
    /// Processed on a thread of its own (a disk, whose backend may block).
    own_thread: bool,
}

/// The ports Keel's own devices hold in every VM, and who holds them.
const PLATFORM_PORTS: &[(u16, u16, &str)] = &[
    (
        keel_devices::ports::I8042,
        keel_devices::ports::I8042_PORT_COUNT,
        "the i8042 reset controller",
    ),
    (
        keel_devices::ports::RTC,
        keel_devices::ports::RTC_PORT_COUNT,
        "the CMOS clock (RTC)",
    ),
    (keel_devices::ports::EXIT_PORT, 1, "the guest exit port"),
    (
        keel_devices::ports::COM1,
        keel_devices::ports::SERIAL_PORT_COUNT,
        "the serial console (COM1)",
    ),
    (
        keel_devices::ports::ACPI_SLEEP_CONTROL,
        keel_devices::ports::ACPI_SLEEP_PORT_COUNT,
        "the ACPI sleep registers",
    ),
    (
        keel_pci::CONFIG_ADDRESS_PORT,
        keel_pci::CONFIG_PORTS,
        "the PCI configuration ports",
    ),
];

/// Whether `[a, a + a_len)` and `[b, b + b_len)` share an address.
fn overlaps(a: u64, a_len: u64, b: u64, b_len: u64) -> bool {
    a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
}

impl std::fmt::Debug for VmBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl VmBuilder {
    /// Starts from `config`, which must be valid.
    pub fn new(config: VmConfig) -> Result<Self> {
        config.validate()?;
        let mut mmio_allocator =
            AddressAllocator::new(MMIO_DEVICES_START, MMIO_DEVICES_END - MMIO_DEVICES_START)
                .expect("the MMIO device window is a valid range");
        mmio_allocator
            .allocate(0x1000, 0x1000, AllocPolicy::ExactMatch(BOOT_TIMER_ADDR))
            .expect("the device window is empty");
        Ok(VmBuilder {
            config,
            kvm_device: std::path::PathBuf::from(DEFAULT_KVM_DEVICE),
            start: Instant::now(),
            serial_out: None,
            serial_in: None,
            mmio_allocator,
            mmio_devices: Vec::new(),
            pio_devices: Vec::new(),
            virtio_devices: Vec::new(),
        })
    }

    /// The configuration being built.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Opens KVM at `path` instead of `/dev/kvm`.
    pub fn kvm_device(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.kvm_device = path.into();
        self
    }

    /// Replaces the kernel command line.
    pub fn cmdline(mut self, cmdline: impl Into<String>) -> Self {
        self.config.cmdline = Some(cmdline.into());
        self
    }

    /// Where the 16550 serial console's output goes, overriding
    /// [`VmConfig::serial`].
    pub fn serial_output(mut self, out: impl Write + Send + 'static) -> Self {
        self.serial_out = Some(Box::new(out));
        self
    }

    /// Feeds the serial console from `input` (a terminal, pipe or socket),
    /// on the VM's event-loop thread, with backpressure.
    pub fn serial_input(mut self, input: impl SerialSource + 'static) -> Self {
        self.serial_in = Some(Box::new(input));
        self
    }

    /// The instant boot milestones are measured from (default: when the
    /// builder was made). A command-line VMM passes its process start.
    pub fn start_time(mut self, start: Instant) -> Self {
        self.start = start;
        self
    }

    /// Registers a device on the MMIO bus at an address chosen from the
    /// 32-bit device window, page aligned, and returns that address.
    pub fn add_mmio_device(&mut self, size: u64, device: Arc<dyn DeviceMmio + Send + Sync>) -> Result<u64> {
        let range = self
            .mmio_allocator
            .allocate(size.max(1), 4096, AllocPolicy::FirstMatch)
            .map_err(|e| Error::DeviceRange(format!("MMIO device of {size:#x} bytes: {e}")))?;
        self.push_mmio(range.start(), size, device)?;
        Ok(range.start())
    }

    /// Registers a device on the MMIO bus at `base`. The range must not
    /// touch guest RAM or anything Keel or an earlier device placed there;
    /// the error names the address, the size and what holds it.
    pub fn add_mmio_device_at(
        &mut self,
        base: u64,
        size: u64,
        device: Arc<dyn DeviceMmio + Send + Sync>,
    ) -> Result<()> {
        let what = || format!("MMIO device at {base:#x} ({size:#x} bytes)");
        if size == 0 || base.checked_add(size).is_none() {
            return Err(Error::DeviceRange(format!(
                "{}: the range is empty or wraps around the address space",
                what()
            )));
        }
        if let Some((start, len, owner)) = self
            .mmio_occupants()
            .into_iter()
            .find(|&(start, len, _)| overlaps(base, size, start, len))
        {
            return Err(Error::DeviceRange(format!(
                "{}: overlaps {owner} at {start:#x}..{:#x}",
                what(),
                start.saturating_add(len)
            )));
        }
        if (MMIO_DEVICES_START..MMIO_DEVICES_END).contains(&base) {
            self.mmio_allocator
                .allocate(size, 1, AllocPolicy::ExactMatch(base))
                .map_err(|e| Error::DeviceRange(format!("{}: {e}", what())))?;
        }
        self.push_mmio(base, size, device)
    }

    /// Every MMIO range already taken before build: guest RAM, Keel's
    /// platform windows and the devices added so far, with who holds it.
    fn mmio_occupants(&self) -> Vec<(u64, u64, String)> {
        let mut taken: Vec<(u64, u64, String)> = Vec::new();
        if let Ok(layout) = GuestLayout::new(self.config.memory_mib.saturating_mul(keel_memory::MIB)) {
            for (start, len) in layout.ram_ranges() {
                taken.push((start.0, len, "guest RAM".into()));
            }
            let (start, len) = layout.pci_mmio64_window();
            taken.push((start, len, "the 64-bit PCI BAR window".into()));
        }
        taken.push((
            keel_memory::PCI_ECAM_START,
            keel_memory::PCI_ECAM_SIZE,
            "the PCI configuration window (ECAM)".into(),
        ));
        taken.push((BOOT_TIMER_ADDR, 0x1000, "the boot timer".into()));
        taken.push((
            keel_memory::PCI_MMIO32_START,
            keel_memory::PCI_MMIO32_END - keel_memory::PCI_MMIO32_START,
            "the 32-bit PCI BAR window".into(),
        ));
        taken.push((keel_memory::IOAPIC_START, 0x1000, "the IOAPIC".into()));
        taken.push((keel_memory::LAPIC_START, 0x1000, "the local APIC".into()));
        if self.config.acpi {
            taken.push((
                keel_memory::ACPI_GED_START,
                keel_boot::GED_WINDOW_SIZE,
                "the ACPI generic event device".into(),
            ));
        }
        for (range, _) in &self.mmio_devices {
            taken.push((
                range.base().0,
                range.size(),
                format!("the MMIO device added at {:#x}", range.base().0),
            ));
        }
        taken
    }

    fn push_mmio(&mut self, base: u64, size: u64, device: Arc<dyn DeviceMmio + Send + Sync>) -> Result<()> {
        let range = MmioRange::new(MmioAddress(base), size)
            .map_err(|e| Error::DeviceRange(format!("MMIO device at {base:#x} ({size:#x} bytes): {e}")))?;
        self.mmio_devices.push((range, device));
        Ok(())
    }

    /// Registers a device on the port I/O bus at `base`. The ports must not
    /// be Keel's own (COM1, the i8042, the CMOS clock, the exit port, the
    /// ACPI sleep registers, the PCI configuration ports) or an earlier
    /// device's; the error names the port and its owner.
    pub fn add_pio_device(
        &mut self,
        base: u16,
        size: u16,
        device: Arc<dyn DevicePio + Send + Sync>,
    ) -> Result<()> {
        let what = || format!("port device at {base:#x} ({size} ports)");
        let range = PioRange::new(PioAddress(base), size)
            .map_err(|e| Error::DeviceRange(format!("{}: {e:?}", what())))?;
        let (base64, size64) = (u64::from(base), u64::from(size));
        let platform = PLATFORM_PORTS
            .iter()
            .map(|&(start, len, owner)| (start, len, owner.to_string()));
        let added = self.pio_devices.iter().map(|(r, _)| {
            (
                r.base().0,
                r.size(),
                format!("the port device added at {:#x}", r.base().0),
            )
        });
        if let Some((start, _, owner)) = platform
            .chain(added)
            .find(|&(start, len, _)| overlaps(base64, size64, u64::from(start), u64::from(len)))
        {
            let port = base.max(start);
            return Err(Error::DeviceRange(format!(
                "{}: port {port:#x} belongs to {owner}",
                what()
            )));
        }
        self.pio_devices.push((range, device));
        Ok(())
    }

    /// Attaches a virtio device the caller built — one of keel-virtio's,
    /// a [`keel_virtio::RequestDevice`], or any type implementing
    /// [`keel_virtio::VirtioDevice`] and `MutEventSubscriber` — on the
    /// VM's default transport ([`VmConfig::transport`]). At
    /// [`build`](Self::build) the VM gives it an MMIO window and a GSI (and
    /// a `virtio_mmio.device=` entry) or a PCI function with MSI-X,
    /// ioeventfds for its queues and irqfds for its interrupts, and runs it
    /// on the VM's event loop. Devices added here come after the
    /// configuration's, in the order added. `name` appears in errors and
    /// logs. Keep a clone of `device` to look at it while the VM runs.
    pub fn add_virtio_device<D>(&mut self, name: impl Into<String>, device: Arc<Mutex<D>>) -> Result<()>
    where
        D: keel_virtio::VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        self.push_virtio(name.into(), device, None, false)
    }

    /// [`add_virtio_device`](Self::add_virtio_device) on `transport`
    /// rather than the VM's default.
    pub fn add_virtio_device_on<D>(
        &mut self,
        name: impl Into<String>,
        device: Arc<Mutex<D>>,
        transport: VirtioTransport,
    ) -> Result<()>
    where
        D: keel_virtio::VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        self.push_virtio(name.into(), device, Some(transport), false)
    }

    fn push_virtio<D>(
        &mut self,
        name: String,
        device: Arc<Mutex<D>>,
        transport: Option<VirtioTransport>,
        own_thread: bool,
    ) -> Result<()>
    where
        D: keel_virtio::VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        if self.virtio_devices.iter().any(|d| d.name == name) {
            return Err(Error::DeviceRange(format!(
                "virtio device {name:?}: a device of that name was already added"
            )));
        }
        self.virtio_devices.push(UserVirtioDevice {
            name,
            device: device.clone(),
            subscriber: device,
            transport,
            own_thread,
        });
        Ok(())
    }

    /// Adds a virtio-blk disk on the caller's own backend (a
    /// [`keel_virtio::MemoryBackend`], a copy-on-write layer, a network
    /// block store: any [`keel_virtio::BlockBackend`]). Returns the device,
    /// to look at while the VM runs. Disks from the configuration come
    /// first; see [`add_virtio_device`](Self::add_virtio_device).
    pub fn add_disk<B>(
        &mut self,
        backend: B,
        options: keel_virtio::BlockOptions,
    ) -> Result<Arc<Mutex<keel_virtio::Block<B>>>>
    where
        B: keel_virtio::BlockBackend + 'static,
    {
        let name = format!("disk {} (caller's backend)", self.virtio_devices.len());
        let block =
            keel_virtio::Block::new(backend, options).map_err(|e| Error::Config(format!("{name}: {e}")))?;
        let block = Arc::new(Mutex::new(block));
        self.push_virtio(name, block.clone(), None, true)?;
        Ok(block)
    }

    /// Adds a virtio-net card on the caller's own backend (any
    /// [`keel_virtio::NetBackend`], e.g. [`keel_virtio::MemoryNetBackend`]
    /// or a user-space switch). Returns the device.
    pub fn add_network_interface<B>(
        &mut self,
        backend: B,
        options: keel_virtio::NetOptions,
    ) -> Result<Arc<Mutex<keel_virtio::Net<B>>>>
    where
        B: keel_virtio::NetBackend + 'static,
    {
        let name = format!(
            "network interface {} (caller's backend)",
            self.virtio_devices.len()
        );
        let card =
            keel_virtio::Net::new(backend, options).map_err(|e| Error::Config(format!("{name}: {e}")))?;
        let card = Arc::new(Mutex::new(card));
        self.push_virtio(name, card.clone(), None, false)?;
        Ok(card)
    }

    /// Adds a virtio-console whose port 0 is the caller's
    /// [`keel_virtio::ConsoleBackend`]. Returns the device.
    pub fn add_console(
        &mut self,
        backend: Box<dyn keel_virtio::ConsoleBackend>,
    ) -> Result<Arc<Mutex<keel_virtio::Console>>> {
        let name = format!("console {} (caller's backend)", self.virtio_devices.len());
        let console =
            keel_virtio::Console::new(backend).map_err(|e| Error::Config(format!("{name}: {e}")))?;
        let console = Arc::new(Mutex::new(console));
        self.push_virtio(name, console.clone(), None, false)?;
        Ok(console)
    }

    /// Creates the VM: KVM objects, memory, interrupt controller, devices,
    /// kernel and vCPUs. Nothing runs until [`Vm::start`].
    pub fn build(self) -> Result<Vm> {
        Vm::build(self, None)
    }

    /// Creates the VM of a [`Snapshot`] instead of a new one: the devices
    /// this builder describes (its configuration — usually
    /// [`Snapshot::config`], changed where a clone needs its own backends —
    /// and the devices added to it, in the same order as the original),
    /// guest memory from the snapshot's memory file (`mode`:
    /// copy-on-write or copied), and every vCPU and device put back as it
    /// was. [`Vm::start`] continues the guest where it was paused.
    ///
    /// Fails, before any vCPU exists, if the builder's machine differs from
    /// the snapshot's (vCPUs, memory size, interrupt controller, the
    /// devices' number, types or places), if the host lacks a CPU feature
    /// the snapshot's vCPUs use, or if the memory file is not the
    /// snapshot's size.
    pub fn restore(self, snapshot: &Snapshot, mode: keel_memory::RestoreMode) -> Result<Vm> {
        let saved = snapshot.config();
        let mine = &self.config;
        let differs = |what: &str, theirs: String, ours: String| {
            Error::Snapshot(format!(
                "the snapshot's {what} is {theirs}, this VM's configuration says {ours}"
            ))
        };
        if saved.vcpus != mine.vcpus {
            return Err(differs(
                "vCPU count",
                saved.vcpus.to_string(),
                mine.vcpus.to_string(),
            ));
        }
        if saved.memory_mib != mine.memory_mib {
            return Err(differs(
                "memory size",
                format!("{} MiB", saved.memory_mib),
                format!("{} MiB", mine.memory_mib),
            ));
        }
        if saved.irqchip != mine.irqchip {
            return Err(differs(
                "irqchip",
                format!("{:?}", saved.irqchip),
                format!("{:?}", mine.irqchip),
            ));
        }
        if saved.acpi != mine.acpi {
            return Err(differs(
                "ACPI setting",
                saved.acpi.to_string(),
                mine.acpi.to_string(),
            ));
        }
        if let crate::snapshot::MemoryContents::Diff { ranges } = &snapshot.state.memory {
            return Err(Error::Snapshot(format!(
                "this is a diff snapshot ({} page ranges): merge it onto the snapshot it follows first \
                 (keel_vmm::merge_diff_snapshot, or keel --merge-diff)",
                ranges.len()
            )));
        }
        Vm::build(self, Some((snapshot, mode)))
    }
}

/// A VM ready to start.
pub struct Vm {
    control: Arc<Control>,
    io: Arc<VmExits>,
    subscribers: Vec<Subscriber>,
    /// Devices on event loops of their own.
    own_threads: Vec<Subscriber>,
    vcpus: Vec<Vcpu>,
    // Fields drop in order: the helper thread is joined, then the VM is
    // torn down, then its memory unmapped (unmapping first would make KVM
    // zap the guest's mappings page range by page range for nothing).
    pit_setup: Background,
    /// The ACPI generic event device's power button, with ACPI.
    ged: Option<keel_devices::GedHandle>,
    balloon: Option<keel_virtio::BalloonHandle>,
    /// The MSRs a vCPU saves in a snapshot.
    msr_indices: Arc<Vec<u32>>,
    /// The filter the VM's threads install.
    seccomp: keel_seccomp::SeccompLevel,
    _vm_fd: Arc<VmFd>,
    // Kept alive as long as the VM: the vCPUs and slots refer to them.
    mem: GuestMemoryMmap,
}

/// Keel's user-space IOAPIC, its routes installed in this VM's merged
/// routing table (shared with MSI-X vectors).
pub(crate) type SplitIoapic = keel_irq::Ioapic<keel_irq::GsiRouting>;

/// Where the vCPUs send their exits: the device buses, and the user-space
/// IOAPIC's end-of-interrupt notifications in split-irqchip mode.
struct VmExits {
    bus: IoManager,
    ioapic: Option<Arc<Mutex<SplitIoapic>>>,
}

impl keel_vcpu::ExitHandler for VmExits {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        keel_vcpu::ExitHandler::pio_read(&self.bus, port, data)
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        keel_vcpu::ExitHandler::pio_write(&self.bus, port, data)
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        keel_vcpu::ExitHandler::mmio_read(&self.bus, addr, data)
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        keel_vcpu::ExitHandler::mmio_write(&self.bus, addr, data)
    }
    fn ioapic_eoi(&self, vector: u8) {
        if let Some(ioapic) = &self.ioapic {
            ioapic
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .end_of_interrupt(vector);
        }
    }
}

/// A start-up task that runs on a thread of its own, off the path to the
/// first `KVM_RUN`; joined when dropped, at the latest before the VM it
/// works on is torn down.
#[derive(Debug, Default)]
struct Background(Option<JoinHandle<()>>);

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(thread) = self.0.take() {
            let _ = thread.join();
        }
    }
}

/// Puts the PIT in "discard lost ticks" mode (see
/// [`VmConfig::pit_reinject`]). KVM answers that ioctl only after an SRCU
/// grace period (about 14 ms on the development host), which nothing in the
/// VM's start needs to wait for, so it runs on a thread of its own while the
/// guest starts (in line if no thread can be spawned); the grace period it
/// waits for is one VM teardown would otherwise wait for too.
fn discard_pit_ticks(vm_fd: &Arc<VmFd>) -> Background {
    let discard = |vm_fd: &VmFd| {
        if let Err(e) = keel_irq::set_pit_ticks(vm_fd, keel_irq::PitTicks::Discard) {
            log::warn!("{e}; the PIT keeps reinjecting lost ticks");
        }
    };
    let for_thread = vm_fd.clone();
    let spawned = std::thread::Builder::new()
        .name("keel-pit".into())
        .spawn(move || discard(&for_thread));
    match spawned {
        Ok(thread) => Background(Some(thread)),
        Err(e) => {
            log::debug!("setting the PIT tick policy in line: {e}");
            discard(vm_fd);
            Background::default()
        }
    }
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("vcpus", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

/// How long [`VmHandle::pause`] waits for every thread to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The KVM device node.
pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";

fn open_kvm(path: &std::path::Path) -> Result<Kvm> {
    let open_error = |source: std::io::Error| Error::OpenKvm {
        path: path.to_owned(),
        source,
    };
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| open_error(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    let kvm =
        Kvm::new_with_path(&c_path).map_err(|e| open_error(std::io::Error::from_raw_os_error(e.errno())))?;
    let version = kvm.get_api_version();
    if version < 0 {
        return Err(Error::NotKvm {
            path: path.to_owned(),
        });
    }
    if version != kvm_bindings::KVM_API_VERSION as i32 {
        return Err(Error::KvmApiVersion {
            path: path.to_owned(),
            version,
        });
    }
    Ok(kvm)
}

/// Where KVM on Intel hosts keeps the real-mode TSS (three pages), just
/// below the BIOS area at the top of the 32-bit space.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

impl Vm {
    fn build(builder: VmBuilder, restore: Option<(&Snapshot, keel_memory::RestoreMode)>) -> Result<Vm> {
        let config = builder.config;
        let kvm = open_kvm(&builder.kvm_device)?;
        let max_vcpus = kvm.get_max_vcpus();
        if usize::from(config.vcpus) > max_vcpus {
            return Err(Error::Config(format!(
                "vcpus {}: this host's KVM allows at most {max_vcpus}",
                config.vcpus
            )));
        }
        let vm_fd = Arc::new(kvm.create_vm().map_err(|e| Error::Kvm("KVM_CREATE_VM", e))?);
        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(|e| Error::Kvm("KVM_SET_TSS_ADDR", e))?;

        let layout = GuestLayout::new(config.memory_mib * keel_memory::MIB)?;
        let mem = match restore {
            None => layout.create_memory()?,
            Some((snapshot, mode)) => {
                let path = snapshot.memory_path();
                let file = std::fs::File::open(path)
                    .map_err(|e| Error::Snapshot(format!("memory file {}: {e}", path.display())))?;
                keel_memory::restore_memory(&layout, &file, mode)
                    .map_err(|e| Error::Snapshot(format!("{}: {e}", path.display())))?
            }
        };
        keel_memory::register_with_kvm_logging(&vm_fd, &mem, config.track_dirty_pages)?;
        // KVM_SET_GSI_ROUTING replaces the whole table: the irqchip's routes
        // and the MSI-X vectors' go through one merged table.
        let (pit_setup, ioapic, routing) = match config.irqchip {
            IrqchipChoice::Kernel => {
                keel_irq::create_in_kernel_irqchip(&vm_fd)?;
                if let Some((snapshot, _)) = restore {
                    match &snapshot.state.irqchip {
                        crate::snapshot::IrqchipState::Kernel(state) => state.restore(&vm_fd)?,
                        crate::snapshot::IrqchipState::Split(_) => {
                            return Err(Error::Snapshot(
                                "the snapshot has a split irqchip, this VM KVM's in-kernel one".into(),
                            ))
                        }
                    }
                }
                let pit_setup = if config.pit_reinject {
                    Background::default()
                } else {
                    discard_pit_ticks(&vm_fd)
                };
                (pit_setup, None, keel_irq::GsiRouting::kernel(vm_fd.clone()))
            }
            IrqchipChoice::Split => {
                keel_irq::enable_split_irqchip(&vm_fd)?;
                let routing = keel_irq::GsiRouting::split(vm_fd.clone());
                let mut ioapic = keel_irq::Ioapic::new(routing.clone());
                if let Some((snapshot, _)) = restore {
                    match &snapshot.state.irqchip {
                        crate::snapshot::IrqchipState::Split(state) => ioapic.restore_state(state)?,
                        crate::snapshot::IrqchipState::Kernel(_) => {
                            return Err(Error::Snapshot(
                                "the snapshot has KVM's in-kernel irqchip, this VM a split one".into(),
                            ))
                        }
                    }
                }
                let ioapic = Arc::new(Mutex::new(ioapic));
                (Background::default(), Some(ioapic), routing)
            }
        };

        let control = Arc::new(Control {
            outcome: Mutex::new(None),
            finished: Condvar::new(),
            stop: AtomicBool::new(false),
            leave_run: AtomicBool::new(false),
            pause: crate::pause::PauseGate::default(),
            metrics: Mutex::new(Vec::new()),
            devices: Mutex::new(ConfigDevices::default()),
            vcpu_states: Mutex::new(Vec::new()),
            snapshot_parts: Mutex::new(None),
            kickers: Mutex::new(Vec::new()),
            wake_event_loop: EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventLoop)?,
        });
        let is_linux = config.kernel.is_some();
        let power: Arc<dyn PowerControl> = control.clone();

        let mut io = IoManager::new();
        if let Some(ioapic) = &ioapic {
            let range =
                MmioRange::new(MmioAddress(SplitIoapic::BASE), SplitIoapic::SIZE).expect("valid range");
            io.register_mmio(range, ioapic.clone())
                .map_err(|e| Error::DeviceRange(format!("IOAPIC: {e}")))?;
        }
        let serial_irq: Arc<dyn InterruptLine> =
            Arc::new(IrqfdLine::new(&vm_fd, keel_devices::ports::COM1_IRQ)?);
        let serial_out = match builder.serial_out {
            Some(out) => out,
            None => serial_sink(&config.serial)?,
        };
        let serial_out: Console = Box::new(ConsoleWatcher::new(serial_out, builder.start));
        let serial = match restore {
            None => SerialConsole::new(serial_irq, serial_out)
                .map_err(|e| Error::DeviceRange(format!("serial console: {e}")))?,
            Some((snapshot, _)) => SerialConsole::from_state(serial_irq, serial_out, &snapshot.state.serial)
                .map_err(|e| Error::Snapshot(e.to_string()))?,
        };
        let serial = Arc::new(Mutex::new(serial));
        let mut subscribers: Vec<Subscriber> = Vec::new();
        let mut own_threads: Vec<Subscriber> = Vec::new();
        if let Some(input) = builder.serial_in {
            let input = SerialInput::new(BoxedSource(input), serial.clone())
                .map_err(|e| Error::DeviceRange(format!("serial input: {e}")))?;
            subscribers.push(Arc::new(Mutex::new(input)));
        }
        let register_pio =
            |io: &mut IoManager, base: u16, size: u16, dev: Arc<dyn DevicePio + Send + Sync>| {
                let range = PioRange::new(PioAddress(base), size).map_err(|e| {
                    Error::DeviceRange(format!("port device at {base:#x} ({size} ports): {e}"))
                })?;
                io.register_pio(range, dev)
                    .map_err(|e| Error::DeviceRange(format!("port device at {base:#x} ({size} ports): {e}")))
            };
        register_pio(&mut io, keel_devices::ports::COM1, 8, serial.clone())?;
        register_pio(
            &mut io,
            keel_devices::ports::I8042,
            5,
            Arc::new(Mutex::new(I8042Reset::new(power.clone()))),
        )?;
        register_pio(
            &mut io,
            keel_devices::ports::EXIT_PORT,
            1,
            Arc::new(Mutex::new(ExitPort::new(power.clone()))),
        )?;
        let mut rtc = keel_devices::Rtc::new();
        if let Some((snapshot, _)) = restore {
            rtc.restore_state(&snapshot.state.rtc)
                .map_err(|e| Error::Snapshot(e.to_string()))?;
        }
        let rtc = Arc::new(Mutex::new(rtc));
        register_pio(
            &mut io,
            keel_devices::ports::RTC,
            keel_devices::ports::RTC_PORT_COUNT,
            rtc.clone(),
        )?;
        register_pio(
            &mut io,
            keel_devices::ports::ACPI_SLEEP_CONTROL,
            keel_devices::ports::ACPI_SLEEP_PORT_COUNT,
            Arc::new(Mutex::new(keel_devices::AcpiSleep::new(power))),
        )?;
        for (range, dev) in builder.pio_devices {
            register_pio(&mut io, range.base().0, range.size(), dev)?;
        }
        let boot_timer = MmioRange::new(MmioAddress(BOOT_TIMER_ADDR), 0x1000).expect("valid range");
        io.register_mmio(boot_timer, Arc::new(Mutex::new(BootTimer::new(builder.start))))
            .map_err(|e| Error::DeviceRange(format!("boot timer: {e}")))?;
        for (range, dev) in builder.mmio_devices {
            io.register_mmio(range, dev)
                .map_err(|e| Error::DeviceRange(format!("MMIO device at {:#x}: {e}", range.base().0)))?;
        }

        let mut mmio_allocator = builder.mmio_allocator;
        let mut virtio = VirtioWiring {
            vm_fd: &vm_fd,
            mem: &mem,
            io: &mut io,
            mmio_allocator: &mut mmio_allocator,
            gsis: keel_irq::GsiAllocator::new(),
            pci: crate::pci::PciWiring::new(&layout, routing)?,
            cmdline: Vec::new(),
            mmio_windows: Vec::new(),
            subscribers: &mut subscribers,
            own_threads: &mut own_threads,
            transports: Vec::new(),
        };
        for disk in &config.disks {
            let backend = match &disk.overlay {
                Some(_) if disk.read_only => {
                    return Err(Error::Config(format!(
                        "disk {}: an overlay is for writes; a read-only disk needs none",
                        disk.path.display()
                    )))
                }
                Some(overlay) => keel_virtio::FileBackend::with_overlay(&disk.path, overlay),
                None => keel_virtio::FileBackend::open(&disk.path, disk.read_only),
            }
            .map_err(|e| Error::Config(format!("disk {}: {e}", disk.path.display())))?;
            let options = keel_virtio::BlockOptions {
                read_only: disk.read_only,
                id: disk.id.clone().unwrap_or_default(),
                ..Default::default()
            };
            let mut block = keel_virtio::Block::new(backend, options)
                .map_err(|e| Error::Config(format!("disk {}: {e}", disk.path.display())))?;
            if let Some(limiter) = &disk.rate_limiter {
                let (bandwidth, ops) = limiter.updates();
                block.update_rate_limiter(bandwidth, ops);
            }
            let block = Arc::new(Mutex::new(block));
            control.lock_devices().disks.push(block.clone());
            virtio.add_shared(
                &format!("disk {}", disk.path.display()),
                block.clone(),
                block,
                disk.transport.unwrap_or(config.transport),
                true,
            )?;
        }
        for (index, net) in config.nets.iter().enumerate() {
            let mac = net.mac_bytes(index).map_err(Error::Config)?;
            let tap = match net.fd {
                Some(fd) => {
                    // The caller handed this fd over (config or `--net
                    // fd=N`); take ownership only after checking it is open.
                    // SAFETY: fcntl(F_GETFD) only inspects the descriptor.
                    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                        return Err(Error::Config(format!("net fd={fd}: not an open file descriptor")));
                    }
                    // SAFETY: `fd` is open and, by the configuration's
                    // contract, handed to this VM to own and close.
                    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
                    keel_virtio::TapBackend::from_fd(owned)
                        .map_err(|e| Error::Config(format!("net fd={fd}: {e}")))?
                }
                None => keel_virtio::TapBackend::open(&net.tap)
                    .map_err(|e| Error::Config(format!("net tap={}: {e}", net.tap)))?,
            };
            let options = keel_virtio::NetOptions {
                mac,
                ..Default::default()
            };
            let mut card = keel_virtio::Net::new(tap, options)
                .map_err(|e| Error::Config(format!("net tap={}: {e}", net.tap)))?;
            if let Some(limiter) = &net.rx_rate_limiter {
                let (bandwidth, ops) = limiter.updates();
                card.update_rx_rate_limiter(bandwidth, ops);
            }
            if let Some(limiter) = &net.tx_rate_limiter {
                let (bandwidth, ops) = limiter.updates();
                card.update_tx_rate_limiter(bandwidth, ops);
            }
            let card = Arc::new(Mutex::new(card));
            let sampled = card.clone();
            control.add_metrics(format!("net_{}", net.tap), move || {
                let c = sampled.lock().unwrap_or_else(|e| e.into_inner()).counters();
                vec![
                    ("rx_bytes_count", c.rx_bytes),
                    ("rx_packets_count", c.rx_frames),
                    ("rx_fails", c.rx_backend_errors),
                    (
                        "rx_dropped",
                        c.rx_dropped_too_big + c.rx_dropped_malformed + c.rx_dropped_reset,
                    ),
                    ("tx_bytes_count", c.tx_bytes),
                    ("tx_packets_count", c.tx_frames),
                    ("tx_fails", c.tx_backend_errors),
                    ("tx_dropped", c.tx_dropped_malformed + c.tx_dropped_oversized),
                ]
            });
            control.lock_devices().nets.push(card.clone());
            virtio.add(
                &format!("net tap={}", net.tap),
                card,
                net.transport.unwrap_or(config.transport),
            )?;
        }
        if config.rng {
            let mut rng =
                keel_virtio::Rng::new().map_err(|e| Error::DeviceRange(format!("virtio-rng: {e}")))?;
            if let Some(limiter) = &config.rng_rate_limiter {
                let (bandwidth, ops) = limiter.updates();
                rng.update_rate_limiter(bandwidth, ops);
            }
            let rng = Arc::new(Mutex::new(rng));
            let sampled = rng.clone();
            control.add_metrics("entropy", move || {
                let bytes = sampled.lock().unwrap_or_else(|e| e.into_inner()).bytes_served();
                vec![("entropy_bytes", bytes)]
            });
            control.lock_devices().rng = Some(rng.clone());
            virtio.add("virtio-rng", rng, config.transport)?;
        }
        let balloon = match &config.balloon {
            Some(settings) => {
                let device = keel_virtio::Balloon::new(settings.options())
                    .map_err(|e| Error::Config(format!("balloon: {e}")))?;
                let handle = device.handle();
                let sampled = handle.clone();
                control.add_metrics("balloon", move || {
                    let c = sampled.counters();
                    vec![
                        ("inflate_count", c.inflate_requests),
                        ("inflated_pages", c.inflated_pages),
                        ("deflate_count", c.deflate_requests),
                        ("deflated_pages", c.deflated_pages),
                        ("ignored_pages", c.ignored_pages),
                        ("stats_updates_count", c.stats_updates),
                        ("free_page_report_count", c.reports),
                        ("free_page_report_bytes", c.reported_bytes),
                    ]
                });
                virtio.add("virtio-balloon", Arc::new(Mutex::new(device)), config.transport)?;
                Some(handle)
            }
            None => None,
        };
        if let Some(console) = &config.console {
            let device = match console {
                ConsoleConfig::Stdio => keel_virtio::Console::stdio(),
                ConsoleConfig::File(path) => keel_virtio::Console::file(path),
                ConsoleConfig::Socket(path) => keel_virtio::Console::unix_listener(path),
            }
            .map_err(|e| Error::Config(format!("console {console:?}: {e}")))?;
            let device = Arc::new(Mutex::new(device));
            let sampled = device.clone();
            control.add_metrics("console", move || {
                let c = sampled.lock().unwrap_or_else(|e| e.into_inner()).counters();
                vec![
                    ("tx_bytes", c.tx_bytes),
                    ("tx_requests", c.tx_requests),
                    ("tx_truncated_bytes", c.tx_truncated_bytes),
                    ("tx_throttled", c.tx_throttled),
                ]
            });
            virtio.add("virtio-console", device, config.transport)?;
        }
        if let Some(vsock) = &config.vsock {
            let device = keel_virtio::Vsock::new(vsock.cid, &vsock.uds, keel_virtio::VsockOptions::default())
                .map_err(|e| {
                    Error::Config(format!(
                        "vsock cid={} uds={}: {e}",
                        vsock.cid,
                        vsock.uds.display()
                    ))
                })?;
            virtio.add(
                "virtio-vsock",
                Arc::new(Mutex::new(device)),
                vsock.transport.unwrap_or(config.transport),
            )?;
        }
        for user in builder.virtio_devices {
            virtio.add_shared(
                &user.name,
                user.device,
                user.subscriber,
                user.transport.unwrap_or(config.transport),
                user.own_thread,
            )?;
        }
        // The ACPI event device takes the next GSI after the devices', so
        // theirs do not depend on whether ACPI is on.
        let ged = if config.acpi {
            let gsi = virtio
                .gsis
                .allocate()
                .map_err(|e| Error::DeviceRange(format!("ACPI event device: {e}")))?;
            let ged = keel_devices::Ged::new(Arc::new(IrqfdLine::new(&vm_fd, gsi)?));
            let handle = ged.handle();
            let range = MmioRange::new(
                MmioAddress(keel_memory::ACPI_GED_START),
                keel_boot::GED_WINDOW_SIZE,
            )
            .expect("valid range");
            virtio
                .io
                .register_mmio(range, Arc::new(Mutex::new(ged)))
                .map_err(|e| Error::DeviceRange(format!("ACPI event device: {e}")))?;
            Some((handle, gsi))
        } else {
            None
        };
        let VirtioWiring {
            cmdline: virtio_cmdline,
            mmio_windows,
            pci,
            io: bus,
            transports,
            ..
        } = virtio;
        let pci_bus = pci.register(bus)?;
        if let Some((snapshot, _)) = restore {
            crate::snapshot::restore_virtio(&transports, &snapshot.state.virtio, &pci_bus)?;
        }

        // A restored VM's memory holds its kernel, boot tables and ACPI
        // tables already; only a new VM is loaded.
        let mut emulated_ring0 = false;
        let boot_entry = if restore.is_none() {
            let kernel = match &config.kernel {
                Some(path) => {
                    let mut file = std::fs::File::open(path)
                        .map_err(|e| Error::Config(format!("kernel {}: {e}", path.display())))?;
                    keel_boot::load_kernel(&mem, &mut file)
                        .map_err(|e| Error::Boot(format!("kernel {}: {e}", path.display())))?
                }
                None => keel_boot::load_kernel(&mem, &mut std::io::Cursor::new(keel_guest::elf()))
                    .map_err(|e| Error::Boot(format!("built-in guest: {e}")))?,
            };
            let kernel = match config.boot_protocol {
                BootProtocolChoice::Auto => kernel.with_pvh_entry().unwrap_or(kernel),
                BootProtocolChoice::Linux64 => kernel,
                BootProtocolChoice::Pvh => kernel.with_pvh_entry().ok_or_else(|| {
                    Error::Boot("boot protocol pvh: the kernel has no PVH entry note".into())
                })?,
            };
            emulated_ring0 = match config.ring0 {
                Ring0Choice::Hardware => false,
                Ring0Choice::Emulated => true,
                // Only a Linux kernel needs the workarounds; the built-in
                // guest's ring 0 avoids the instructions itself.
                Ring0Choice::Auto if !is_linux => false,
                Ring0Choice::Auto => keel_vcpu::probe_ring0_execution(&kvm)? == Ring0Execution::Emulated,
            };
            let mut cmdline = config.effective_cmdline().to_string();
            if emulated_ring0 && is_linux {
                log::warn!(
                    "this host's KVM emulates guest ring 0: Linux is steered off the instructions it cannot emulate, \
                     and guest user space cannot make system calls here, so init will die at its first one"
                );
                cmdline.push(' ');
                cmdline.push_str(EMULATED_RING0_CMDLINE);
            }
            // With ACPI, Linux finds its virtio-mmio devices in the DSDT; the
            // built-in guest reads them from its command line either way.
            let mut cmdline_devices: Vec<String> = if config.acpi && is_linux {
                Vec::new()
            } else {
                virtio_cmdline
            };
            if let (Some((_, gsi)), false) = (&ged, is_linux) {
                // The built-in guest does not parse the DSDT: it is told where
                // the ACPI event device is.
                cmdline_devices.push(format!("keel.ged={:#x}:{gsi}", keel_memory::ACPI_GED_START));
            }
            let cmdline = with_kernel_params(&cmdline, &cmdline_devices);
            let mut boot = keel_boot::BootConfig::new(cmdline);
            if let Some((_, ged_gsi)) = &ged {
                let mut platform = keel_boot::AcpiPlatform::new(config.vcpus);
                platform.legacy_pic = config.irqchip == IrqchipChoice::Kernel;
                platform.virtio_mmio = mmio_windows;
                platform.pci = Some(keel_boot::PciHostBridge {
                    ecam_base: keel_memory::PCI_ECAM_START,
                    last_bus: 0,
                    mmio32: (keel_memory::PCI_MMIO32_START, keel_memory::PCI_MMIO32_END),
                    mmio64: Some({
                        let (start, size) = layout.pci_mmio64_window();
                        (start, start + size)
                    }),
                });
                platform.ged = Some(keel_boot::GedWindow {
                    base: keel_memory::ACPI_GED_START,
                    gsi: *ged_gsi,
                });
                let rsdp =
                    keel_boot::write_acpi_tables(&mem, &platform).map_err(|e| Error::Boot(e.to_string()))?;
                boot = boot.acpi_rsdp(rsdp);
            }
            if let Some(path) = &config.initrd {
                let mut file = std::fs::File::open(path)
                    .map_err(|e| Error::Config(format!("initrd {}: {e}", path.display())))?;
                let (addr, size) = keel_boot::load_initrd(&mem, &layout, &kernel, &mut file)
                    .map_err(|e| Error::Boot(format!("initrd {}: {e}", path.display())))?;
                boot = boot.initrd(addr, size);
            }
            boot.write(&mem, &layout, &kernel)
                .map_err(|e| Error::Boot(e.to_string()))?;
            if !config.acpi {
                keel_boot::write_mptable(&mem, config.vcpus).map_err(|e| Error::Boot(e.to_string()))?;
            }
            keel_vcpu::write_boot_tables(&mem)?;
            Some((kernel.protocol, kernel.entry))
        } else {
            None
        };
        let ged = ged.map(|(handle, _)| handle);

        let host = crate::host::host_kvm(&kvm, &builder.kvm_device)?;
        let supported = &host.supported_cpuid;
        let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
        let mut tsc_khz = None;
        for id in 0..config.vcpus {
            let vcpu = Vcpu::new(&vm_fd, id, mem.clone())?;
            if id == 0 {
                // Every vCPU's TSC runs at this rate; published in CPUID so
                // a guest needs no PIT to learn it.
                tsc_khz = vcpu.fd().get_tsc_khz().ok();
            }
            match (boot_entry, restore) {
                (Some((protocol, entry)), _) => {
                    let mut cpuid = CpuidConfig::new(id, config.vcpus);
                    cpuid.tsc_khz = tsc_khz;
                    cpuid.no_pv_hypercalls = emulated_ring0;
                    cpuid.hide_unemulated_instructions = emulated_ring0;
                    vcpu.configure_cpuid(supported, &cpuid)?;
                    vcpu.configure_msrs()?;
                    match protocol {
                        BootProtocol::Linux64 => vcpu.configure_long_mode_entry(entry)?,
                        BootProtocol::Pvh => vcpu.configure_pvh_entry(entry, keel_memory::PVH_INFO_START)?,
                    }
                    vcpu.configure_lapic()?;
                }
                (None, Some((snapshot, _))) => {
                    let state =
                        snapshot.state.vcpus.get(usize::from(id)).ok_or_else(|| {
                            Error::Snapshot(format!("the snapshot has no state for vCPU {id}"))
                        })?;
                    vcpu.restore_state(&vm_fd, supported, state)?;
                }
                (None, None) => unreachable!("a VM is either new or restored"),
            }
            vcpus.push(vcpu);
        }
        if let Some((snapshot, _)) = restore {
            // kvmclock continues from the snapshot's time: the time the VM
            // spent saved does not pass for the guest.
            let mut clock = snapshot.state.clock;
            clock.flags = 0;
            vm_fd
                .set_clock(&clock)
                .map_err(|e| Error::Kvm("KVM_SET_CLOCK", e))?;
        }
        let msr_indices = host.msrs_to_save.clone();
        *control.vcpu_states.lock().unwrap_or_else(|e| e.into_inner()) =
            (0..vcpus.len()).map(|_| None).collect();
        *control.snapshot_parts.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(crate::snapshot::SnapshotParts {
                vm_fd: vm_fd.clone(),
                config: config.clone(),
                serial,
                rtc,
                ioapic: ioapic.clone(),
                transports,
                track_dirty_pages: config.track_dirty_pages,
                mem: mem.clone(),
            });
        let counters: Vec<_> = vcpus.iter().map(Vcpu::counters).collect();
        control.add_metrics("vcpu", move || {
            // Summed over the vCPUs, as Firecracker reports them.
            let mut total: Counters = Vec::new();
            for c in &counters {
                for (i, (name, value)) in c.snapshot().into_iter().enumerate() {
                    match total.get_mut(i) {
                        Some((_, sum)) => *sum += value,
                        None => total.push((name, value)),
                    }
                }
            }
            total
        });

        Ok(Vm {
            control,
            io: Arc::new(VmExits { bus: io, ioapic }),
            subscribers,
            own_threads,
            vcpus,
            pit_setup,
            ged,
            balloon,
            msr_indices,
            seccomp: config.seccomp,
            _vm_fd: vm_fd,
            mem,
        })
    }

    /// The guest's memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The balloon's control handle, if the VM has one
    /// ([`VmConfig::balloon`](crate::VmConfig::balloon)).
    pub fn balloon(&self) -> Option<&keel_virtio::BalloonHandle> {
        self.balloon.as_ref()
    }

    /// Starts one thread per vCPU.
    pub fn start(self) -> Result<VmHandle> {
        self.start_inner(false)
    }

    /// Starts the VM paused: its threads park before running any guest
    /// code or touching guest memory; [`VmHandle::resume`] lets them go.
    /// For a restored VM that should wait (Firecracker's `resume_vm:
    /// false`), or one to snapshot before it runs.
    pub fn start_paused(self) -> Result<VmHandle> {
        self.start_inner(true)
    }

    fn start_inner(self, paused: bool) -> Result<VmHandle> {
        if paused {
            self.control.pause.request();
            self.control.leave_run.store(true, Ordering::Release);
        }
        let Vm {
            control,
            io,
            subscribers,
            own_threads,
            vcpus,
            pit_setup,
            ged,
            balloon,
            msr_indices,
            seccomp,
            _vm_fd,
            mem,
        } = self;
        let mut threads = Vec::with_capacity(vcpus.len() + own_threads.len() + 1);
        if !subscribers.is_empty() {
            threads.push(spawn_event_loop(
                control.clone(),
                subscribers,
                seccomp,
                "keel-events".into(),
            )?);
        }
        // A disk whose backend blocks (a stalled file system) holds up its
        // own thread only: the other devices and the vCPUs go on.
        for (index, subscriber) in own_threads.into_iter().enumerate() {
            match spawn_event_loop(
                control.clone(),
                vec![subscriber],
                seccomp,
                format!("keel-disk{index}"),
            ) {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    control.finish(Ok(ExitReason::Stopped));
                    halt_threads(&control, threads);
                    return Err(e);
                }
            }
        }
        for mut vcpu in vcpus {
            let control_for_thread = control.clone();
            let io = io.clone();
            let id = vcpu.id();
            let vm_fd = _vm_fd.clone();
            let msr_indices = msr_indices.clone();
            control.pause.join();
            let kicker = VcpuKicker::new();
            control
                .kickers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(kicker.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("keel-vcpu{id}"))
                .spawn(move || {
                    let _bound = kicker.bind_current_thread();
                    let control = control_for_thread;
                    // Confined before the guest runs: a vCPU thread that
                    // cannot install its filter does not run the guest.
                    let confined = keel_seccomp::apply(keel_seccomp::ThreadRole::Vcpu, seccomp);
                    let outcome = if let Err(e) = confined {
                        Some(Err(Error::Seccomp(e.to_string())))
                    } else {
                        loop {
                            match vcpu.run(&*io, &control.leave_run) {
                                // Paused: park between two KVM_RUNs, then go on.
                                Ok(VcpuStop::Requested) if !control.stop.load(Ordering::Acquire) => {
                                    // While parked, save this vCPU whenever a
                                    // snapshot asks.
                                    control.pause.park_if_requested_with(&mut || {
                                        let state = vcpu.save_state(&vm_fd, &msr_indices);
                                        let mut slots =
                                            control.vcpu_states.lock().unwrap_or_else(|e| e.into_inner());
                                        if let Some(slot) = slots.get_mut(usize::from(id)) {
                                            *slot = Some(state);
                                        }
                                    });
                                }
                                Ok(VcpuStop::Requested) => break None,
                                Ok(VcpuStop::TripleFault) => {
                                    break Some(Ok(ExitReason::TripleFault { vcpu: id }))
                                }
                                Ok(VcpuStop::Reset) => break Some(Ok(ExitReason::GuestReset)),
                                Ok(VcpuStop::PowerOff) => break Some(Ok(ExitReason::GuestShutdown)),
                                Ok(other) => {
                                    break Some(Err(Error::InvalidState(format!(
                                        "vCPU {id} stopped for a reason this VMM does not know: {other:?}"
                                    ))))
                                }
                                Err(e) => break Some(Err(Error::Vcpu(e))),
                            }
                        }
                    };
                    control.pause.leave();
                    if let Some(outcome) = outcome {
                        control.finish(outcome);
                    }
                });
            let thread = match spawned {
                Ok(t) => t,
                Err(e) => {
                    control.pause.leave();
                    control.finish(Ok(ExitReason::Stopped));
                    halt_threads(&control, threads);
                    return Err(Error::Thread(e));
                }
            };
            threads.push(thread);
        }
        // A stop requested while threads were being spawned must reach them.
        if control.stop.load(Ordering::Acquire) {
            control.finish(Ok(ExitReason::Stopped));
        }
        Ok(VmHandle {
            control,
            threads,
            _pit_setup: pit_setup,
            ged,
            balloon,
            _vm_fd,
            mem,
        })
    }

    /// Starts the VM and waits for it to end.
    pub fn run(self) -> Result<ExitReason> {
        self.start()?.wait()
    }
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Wakes the event loop when the VM stops.
struct StopWatcher {
    control: Arc<Control>,
}

impl MutEventSubscriber for StopWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Not read: every event loop watches the one eventfd, edge-
        // triggered, and each write wakes them all.
    }

    fn init(&mut self, ops: &mut EventOps) {
        let events = Events::new(
            &self.control.wake_event_loop,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        );
        if let Err(e) = ops.add(events) {
            log::error!("event loop: cannot watch the stop event: {e:?}");
        }
    }
}

/// The device I/O thread: serial input now, virtio queues later.
fn spawn_event_loop(
    control: Arc<Control>,
    subscribers: Vec<Subscriber>,
    seccomp: keel_seccomp::SeccompLevel,
    name: String,
) -> Result<JoinHandle<()>> {
    let mut manager: EventManager<Subscriber> =
        EventManager::new().map_err(|e| Error::EventLoop(std::io::Error::other(format!("{e:?}"))))?;
    manager.add_subscriber(Arc::new(Mutex::new(StopWatcher {
        control: control.clone(),
    })));
    for s in subscribers {
        manager.add_subscriber(s);
    }
    control.pause.join();
    let thread_control = control.clone();
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let control = thread_control;
            if let Err(e) = keel_seccomp::apply(keel_seccomp::ThreadRole::Devices, seccomp) {
                control.finish(Err(Error::Seccomp(e.to_string())));
                control.pause.leave();
                return;
            }
            loop {
                // Between two events no device is inside a request (and
                // a VM started paused parks before its first).
                control.pause.park_if_requested();
                if control.stop.load(Ordering::Acquire) {
                    break;
                }
                if let Err(e) = manager.run() {
                    control.finish(Err(Error::EventLoop(std::io::Error::other(format!("{e:?}")))));
                    break;
                }
            }
            control.pause.leave();
        })
        .map_err(|e| {
            control.pause.leave();
            Error::Thread(e)
        })
}

/// Stops and joins the vCPU threads (a kick reaches a vCPU thread only
/// while it is bound; see `keel_vcpu::VcpuKicker`).
fn halt_threads(control: &Control, threads: Vec<JoinHandle<()>>) {
    let kickers = std::mem::take(&mut *control.kickers.lock().unwrap_or_else(|e| e.into_inner()));
    control.stop.store(true, Ordering::Release);
    for k in &kickers {
        let _ = k.kick();
    }
    let _ = control.wake_event_loop.write(1);
    for t in threads {
        if t.join().is_err() {
            log::error!("a vCPU thread panicked");
        }
    }
}

/// A running VM.
pub struct VmHandle {
    control: Arc<Control>,
    threads: Vec<JoinHandle<()>>,
    // Dropped in this order, for the reasons given on `Vm`.
    _pit_setup: Background,
    ged: Option<keel_devices::GedHandle>,
    balloon: Option<keel_virtio::BalloonHandle>,
    _vm_fd: Arc<VmFd>,
    mem: GuestMemoryMmap,
}

impl std::fmt::Debug for VmHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmHandle")
            .field("vcpu_threads", &self.threads.len())
            .finish_non_exhaustive()
    }
}

/// Stops a running VM from any thread.
#[derive(Clone)]
pub struct StopHandle {
    control: Arc<Control>,
}

impl std::fmt::Debug for StopHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopHandle").finish_non_exhaustive()
    }
}

impl StopHandle {
    /// Stops the VM; [`VmHandle::wait`] then returns [`ExitReason::Stopped`]
    /// unless the guest had already ended.
    pub fn stop(&self) {
        self.control.finish(Ok(ExitReason::Stopped));
    }
}

/// Controls a running VM from any thread: the operations of [`VmHandle`]
/// that do not end it, for a control plane that must act while another
/// thread waits on the handle.
#[derive(Clone)]
pub struct VmController {
    control: Arc<Control>,
    ged: Option<keel_devices::GedHandle>,
    balloon: Option<keel_virtio::BalloonHandle>,
}

impl std::fmt::Debug for VmController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmController")
            .field("paused", &self.is_paused())
            .finish_non_exhaustive()
    }
}

impl VmController {
    /// See [`VmHandle::pause`].
    pub fn pause(&self) -> Result<()> {
        self.control.pause()
    }

    /// See [`VmHandle::resume`].
    pub fn resume(&self) -> Result<()> {
        self.control.resume()
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.control.pause.is_paused()
    }

    /// Whether the VM has ended.
    pub fn is_finished(&self) -> bool {
        self.control
            .outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// See [`VmHandle::press_power_button`].
    pub fn press_power_button(&self) -> Result<()> {
        press_power_button(self.ged.as_ref())
    }

    /// The VM's counters now, by group: `vcpu` (exits by reason, summed
    /// over the vCPUs), `net_<tap>` (bytes, packets, failures, drops),
    /// `entropy`, `console`.
    pub fn metrics(&self) -> Vec<(String, Counters)> {
        self.control.sample_metrics()
    }

    /// The virtio-blk device of [`VmConfig::disks`]`[index]`, to change
    /// while the VM runs (its rate limiter, its backend: see
    /// `keel_virtio::Block::replace_backend`).
    pub fn disk(&self, index: usize) -> Option<Arc<Mutex<keel_virtio::Block<keel_virtio::FileBackend>>>> {
        self.control.lock_devices().disks.get(index).cloned()
    }

    /// The virtio-net device of [`VmConfig::nets`]`[index]` (its rate
    /// limiters, its counters).
    pub fn network_interface(
        &self,
        index: usize,
    ) -> Option<Arc<Mutex<keel_virtio::Net<keel_virtio::TapBackend>>>> {
        self.control.lock_devices().nets.get(index).cloned()
    }

    /// The balloon's control handle, if [`VmConfig::balloon`].
    pub fn balloon(&self) -> Option<&keel_virtio::BalloonHandle> {
        self.balloon.as_ref()
    }

    /// The virtio-rng device, if [`VmConfig::rng`].
    pub fn rng(&self) -> Option<Arc<Mutex<keel_virtio::Rng>>> {
        self.control.lock_devices().rng.clone()
    }

    /// Saves the paused VM: its state to `state_path` (vCPUs, interrupt
    /// controller, devices, clock; versioned and checksummed) and its
    /// memory to `memory_path` (sparse). The VM stays paused; resume it or
    /// stop it afterwards. Fails if the VM is not paused, or has a device
    /// that cannot be saved (named in the error); nothing is left at
    /// either path then, and an existing file there is kept.
    pub fn snapshot(
        &self,
        state_path: impl AsRef<std::path::Path>,
        memory_path: impl AsRef<std::path::Path>,
    ) -> Result<SnapshotInfo> {
        self.snapshot_with(state_path, memory_path, SnapshotKind::Full, None)
    }

    /// [`Self::snapshot`] of `kind`: a [`SnapshotKind::Diff`] writes only
    /// the pages written since the VM's previous snapshot (it needs
    /// [`VmConfig::track_dirty_pages`]; merge it onto that snapshot with
    /// [`crate::merge_diff_snapshot`]). `record` is kept in the state file
    /// for whoever restores it ([`Snapshot::record`]): a control plane's
    /// own view of the VM (Keel's keeps its Firecracker configuration
    /// there).
    pub fn snapshot_with(
        &self,
        state_path: impl AsRef<std::path::Path>,
        memory_path: impl AsRef<std::path::Path>,
        kind: SnapshotKind,
        record: Option<String>,
    ) -> Result<SnapshotInfo> {
        self.control
            .snapshot(state_path.as_ref(), memory_path.as_ref(), kind, record)
    }

    /// [`Self::snapshot`] into `dir` (created if missing), as
    /// [`crate::STATE_FILE_NAME`] and [`crate::MEMORY_FILE_NAME`], the
    /// layout [`Snapshot::load_dir`] and `keel --restore` read.
    pub fn snapshot_to_dir(&self, dir: impl AsRef<std::path::Path>) -> Result<SnapshotInfo> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::Snapshot(format!("{}: {e}", dir.display())))?;
        self.snapshot(
            dir.join(crate::STATE_FILE_NAME),
            dir.join(crate::MEMORY_FILE_NAME),
        )
    }

    /// Stops the VM, as [`StopHandle::stop`].
    pub fn stop(&self) {
        self.control.finish(Ok(ExitReason::Stopped));
    }
}

fn press_power_button(ged: Option<&keel_devices::GedHandle>) -> Result<()> {
    match ged {
        Some(ged) => ged.press_power_button().map_err(Error::Irq),
        None => Err(Error::Config("the power button needs ACPI (acpi: true)".into())),
    }
}

impl VmHandle {
    /// A handle that pauses, resumes and stops this VM from other threads.
    pub fn controller(&self) -> VmController {
        VmController {
            control: self.control.clone(),
            ged: self.ged.clone(),
            balloon: self.balloon.clone(),
        }
    }

    /// A handle that stops this VM from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            control: self.control.clone(),
        }
    }

    /// Presses the machine's ACPI power button: the guest's ACPI gets a
    /// power-button notification through the generic event device (Linux
    /// then shuts down in an orderly way where its user space handles the
    /// button; Keel's built-in guest's `acpi-power-button` program powers
    /// off). Fails if the VM was built without ACPI.
    pub fn press_power_button(&self) -> Result<()> {
        press_power_button(self.ged.as_ref())
    }

    /// Pauses the VM: when this returns, no vCPU runs guest code (each is
    /// out of `KVM_RUN`, between two exits) and no device touches guest
    /// memory (the event loop is between two events, so no request is
    /// half-processed). Pausing a paused VM does nothing. Fails if the VM
    /// has ended, or if its threads do not all reach a pause point within
    /// 5 seconds (the VM then keeps running).
    pub fn pause(&self) -> Result<()> {
        self.control.pause()
    }

    /// Resumes a paused VM where it stopped. Fails if it is not paused.
    pub fn resume(&self) -> Result<()> {
        self.control.resume()
    }

    /// Saves the paused VM; see [`VmController::snapshot`].
    pub fn snapshot(
        &self,
        state_path: impl AsRef<std::path::Path>,
        memory_path: impl AsRef<std::path::Path>,
    ) -> Result<SnapshotInfo> {
        self.control.snapshot(
            state_path.as_ref(),
            memory_path.as_ref(),
            SnapshotKind::Full,
            None,
        )
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.control.pause.is_paused()
    }

    /// The balloon's control handle, if the VM has one: set its target,
    /// change its statistics interval and read its statistics from any
    /// thread while the VM runs (clone it to keep it past this handle).
    pub fn balloon(&self) -> Option<&keel_virtio::BalloonHandle> {
        self.balloon.as_ref()
    }

    /// Whether the VM has ended (wait would not block).
    pub fn is_finished(&self) -> bool {
        self.control
            .outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Waits for the VM to end and says why.
    pub fn wait(mut self) -> Result<ExitReason> {
        self.wait_inner(None).expect("no timeout")
    }

    /// Like [`VmHandle::wait`], but gives the handle back if the VM is still
    /// running after `timeout`.
    pub fn wait_timeout(mut self, timeout: Duration) -> std::result::Result<Result<ExitReason>, VmHandle> {
        match self.wait_inner(Some(timeout)) {
            Some(r) => Ok(r),
            None => Err(self),
        }
    }

    fn wait_inner(&mut self, timeout: Option<Duration>) -> Option<Result<ExitReason>> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let mut slot = self.control.outcome.lock().unwrap_or_else(|e| e.into_inner());
        while slot.is_none() {
            slot = match deadline {
                None => self
                    .control
                    .finished
                    .wait(slot)
                    .unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    self.control
                        .finished
                        .wait_timeout(slot, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
        let outcome = slot.take().expect("checked above");
        // Keep later finish() calls from recording a second outcome.
        *slot = Some(Ok(ExitReason::Stopped));
        drop(slot);
        self.stop_and_join();
        if log::log_enabled!(log::Level::Debug) {
            // What the guest touched, for telling the VMM's own memory
            // overhead apart from the guest's (benches/whole_process.py).
            match keel_memory::resident_bytes(&self.mem) {
                Ok(bytes) => log::debug!(
                    "guest memory resident at exit: {} KiB of {} MiB",
                    bytes / 1024,
                    vm_memory::GuestMemoryBackend::iter(&self.mem)
                        .map(vm_memory::GuestMemoryRegion::len)
                        .sum::<u64>()
                        >> 20
                ),
                Err(e) => log::debug!("guest memory residency unknown: {e}"),
            }
        }
        Some(outcome)
    }

    fn stop_and_join(&mut self) {
        halt_threads(&self.control, std::mem::take(&mut self.threads));
        // Nothing to snapshot any more: let go of the devices and memory.
        drop(
            self.control
                .snapshot_parts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
    }
}

impl Drop for VmHandle {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.control.finish(Ok(ExitReason::Stopped));
            self.stop_and_join();
        }
    }
}
