//! Building a VM from its layers, running it, and learning why it ended.

use std::io::Write;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use keel_devices::{ExitPort, I8042Reset, PowerControl, SerialConsole};
use keel_irq::{InterruptLine, IrqfdLine};
use keel_memory::{GuestLayout, GuestMemoryMmap, MMIO_DEVICES_END, MMIO_DEVICES_START};
use keel_vcpu::{CpuidConfig, Vcpu, VcpuKicker, VcpuStop};
use kvm_ioctls::{Kvm, VmFd};
use vm_allocator::{AddressAllocator, AllocPolicy};
use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::{DeviceMmio, DevicePio};

use crate::{Error, Result, VmConfig};

/// Why a VM stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
            ExitReason::GuestShutdown => write!(f, "guest shut down"),
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
    kickers: Mutex<Vec<VcpuKicker>>,
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
        for kicker in self
            .kickers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            // A thread that already left its loop no longer needs a kick.
            let _ = kicker.kick();
        }
        self.finished.notify_all();
    }
}

impl PowerControl for Control {
    fn request_reset(&self) {
        self.finish(Ok(ExitReason::GuestReset));
    }

    fn request_exit(&self, status: u8) {
        self.finish(Ok(ExitReason::GuestExit(status)));
    }
}

/// Assembles a VM: validates the configuration, lets the caller add
/// devices and set the serial console, then [`VmBuilder::build`]s it.
pub struct VmBuilder {
    config: VmConfig,
    kvm_device: std::path::PathBuf,
    serial_out: Option<Box<dyn Write + Send>>,
    mmio_allocator: AddressAllocator,
    mmio_devices: Vec<(MmioRange, Arc<dyn DeviceMmio + Send + Sync>)>,
    pio_devices: Vec<(PioRange, Arc<dyn DevicePio + Send + Sync>)>,
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
        let mmio_allocator =
            AddressAllocator::new(MMIO_DEVICES_START, MMIO_DEVICES_END - MMIO_DEVICES_START)
                .expect("the MMIO device window is a valid range");
        Ok(VmBuilder {
            config,
            kvm_device: std::path::PathBuf::from(DEFAULT_KVM_DEVICE),
            serial_out: None,
            mmio_allocator,
            mmio_devices: Vec::new(),
            pio_devices: Vec::new(),
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

    /// Where the 16550 serial console's output goes (default: stdout).
    pub fn serial_output(mut self, out: impl Write + Send + 'static) -> Self {
        self.serial_out = Some(Box::new(out));
        self
    }

    /// Registers a device on the MMIO bus at an address chosen from the
    /// 32-bit device window, page aligned, and returns that address.
    pub fn add_mmio_device(
        &mut self,
        size: u64,
        device: Arc<dyn DeviceMmio + Send + Sync>,
    ) -> Result<u64> {
        let range = self
            .mmio_allocator
            .allocate(size.max(1), 4096, AllocPolicy::FirstMatch)
            .map_err(|e| Error::DeviceRange(format!("MMIO device of {size:#x} bytes: {e}")))?;
        self.push_mmio(range.start(), size, device)?;
        Ok(range.start())
    }

    /// Registers a device on the MMIO bus at `base`.
    pub fn add_mmio_device_at(
        &mut self,
        base: u64,
        size: u64,
        device: Arc<dyn DeviceMmio + Send + Sync>,
    ) -> Result<()> {
        if (MMIO_DEVICES_START..MMIO_DEVICES_END).contains(&base) {
            self.mmio_allocator
                .allocate(size.max(1), 1, AllocPolicy::ExactMatch(base))
                .map_err(|e| {
                    Error::DeviceRange(format!("MMIO device at {base:#x} ({size:#x} bytes): {e}"))
                })?;
        }
        self.push_mmio(base, size, device)
    }

    fn push_mmio(
        &mut self,
        base: u64,
        size: u64,
        device: Arc<dyn DeviceMmio + Send + Sync>,
    ) -> Result<()> {
        let range = MmioRange::new(MmioAddress(base), size).map_err(|e| {
            Error::DeviceRange(format!("MMIO device at {base:#x} ({size:#x} bytes): {e}"))
        })?;
        if let Some((r, _)) = self.mmio_devices.iter().find(|(r, _)| r.overlaps(&range)) {
            return Err(Error::DeviceRange(format!(
                "MMIO device at {base:#x} ({size:#x} bytes) overlaps the device at {:#x}",
                r.base().0
            )));
        }
        self.mmio_devices.push((range, device));
        Ok(())
    }

    /// Registers a device on the port I/O bus at `base`.
    pub fn add_pio_device(
        &mut self,
        base: u16,
        size: u16,
        device: Arc<dyn DevicePio + Send + Sync>,
    ) -> Result<()> {
        let range = PioRange::new(PioAddress(base), size).map_err(|e| {
            Error::DeviceRange(format!("port device at {base:#x} ({size} ports): {e}"))
        })?;
        self.pio_devices.push((range, device));
        Ok(())
    }

    /// Creates the VM: KVM objects, memory, interrupt controller, devices,
    /// kernel and vCPUs. Nothing runs until [`Vm::start`].
    pub fn build(self) -> Result<Vm> {
        Vm::build(self)
    }
}

/// A VM ready to start.
pub struct Vm {
    control: Arc<Control>,
    io: Arc<IoManager>,
    vcpus: Vec<Vcpu>,
    // Kept alive as long as the VM: the vCPUs and slots refer to them.
    mem: GuestMemoryMmap,
    _vm_fd: VmFd,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("vcpus", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

/// The KVM device node.
pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";

fn open_kvm(path: &std::path::Path) -> Result<Kvm> {
    let open_error = |source: std::io::Error| Error::OpenKvm {
        path: path.to_owned(),
        source,
    };
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| open_error(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
    let kvm = Kvm::new_with_path(&c_path)
        .map_err(|e| open_error(std::io::Error::from_raw_os_error(e.errno())))?;
    let version = kvm.get_api_version();
    if version != kvm_bindings::KVM_API_VERSION as i32 {
        return Err(Error::KvmApiVersion(version));
    }
    Ok(kvm)
}

/// Where KVM on Intel hosts keeps the real-mode TSS (three pages), just
/// below the BIOS area at the top of the 32-bit space.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

impl Vm {
    fn build(builder: VmBuilder) -> Result<Vm> {
        let config = builder.config;
        let kvm = open_kvm(&builder.kvm_device)?;
        let max_vcpus = kvm.get_max_vcpus();
        if usize::from(config.vcpus) > max_vcpus {
            return Err(Error::Config(format!(
                "vcpus {}: this host's KVM allows at most {max_vcpus}",
                config.vcpus
            )));
        }
        let vm_fd = kvm
            .create_vm()
            .map_err(|e| Error::Kvm("KVM_CREATE_VM", e))?;
        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(|e| Error::Kvm("KVM_SET_TSS_ADDR", e))?;

        let layout = GuestLayout::new(config.memory_mib * keel_memory::MIB)?;
        let mem = layout.create_memory()?;
        keel_memory::register_with_kvm(&vm_fd, &mem)?;
        keel_irq::create_in_kernel_irqchip(&vm_fd)?;

        let control = Arc::new(Control {
            outcome: Mutex::new(None),
            finished: Condvar::new(),
            stop: AtomicBool::new(false),
            kickers: Mutex::new(Vec::new()),
        });
        let power: Arc<dyn PowerControl> = control.clone();

        let mut io = IoManager::new();
        let serial_irq: Arc<dyn InterruptLine> = Arc::new(IrqfdLine::new(
            &vm_fd,
            u32::from(keel_devices::ports::COM1_IRQ),
        )?);
        let serial_out = builder
            .serial_out
            .unwrap_or_else(|| Box::new(std::io::stdout()));
        let serial = Arc::new(Mutex::new(
            SerialConsole::new(serial_irq, serial_out)
                .map_err(|e| Error::DeviceRange(format!("serial console: {e}")))?,
        ));
        let register_pio =
            |io: &mut IoManager, base: u16, size: u16, dev: Arc<dyn DevicePio + Send + Sync>| {
                let range = PioRange::new(PioAddress(base), size).map_err(|e| {
                    Error::DeviceRange(format!("port device at {base:#x} ({size} ports): {e}"))
                })?;
                io.register_pio(range, dev).map_err(|e| {
                    Error::DeviceRange(format!("port device at {base:#x} ({size} ports): {e}"))
                })
            };
        register_pio(&mut io, keel_devices::ports::COM1, 8, serial)?;
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
            Arc::new(Mutex::new(ExitPort::new(power))),
        )?;
        for (range, dev) in builder.pio_devices {
            register_pio(&mut io, range.base().0, range.size(), dev)?;
        }
        for (range, dev) in builder.mmio_devices {
            io.register_mmio(range, dev).map_err(|e| {
                Error::DeviceRange(format!("MMIO device at {:#x}: {e}", range.base().0))
            })?;
        }

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
        keel_boot::BootConfig::new(config.effective_cmdline())
            .write(&mem, &layout, &kernel)
            .map_err(|e| Error::Boot(e.to_string()))?;
        keel_vcpu::write_boot_tables(&mem)?;

        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
        for id in 0..config.vcpus {
            let vcpu = Vcpu::new(&vm_fd, id, mem.clone())?;
            vcpu.configure_cpuid(&supported, &CpuidConfig::new(id, config.vcpus))?;
            vcpu.configure_msrs()?;
            vcpu.configure_long_mode_entry(kernel.entry)?;
            vcpu.configure_lapic()?;
            vcpus.push(vcpu);
        }

        Ok(Vm {
            control,
            io: Arc::new(io),
            vcpus,
            mem,
            _vm_fd: vm_fd,
        })
    }

    /// The guest's memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Starts one thread per vCPU.
    pub fn start(self) -> Result<VmHandle> {
        let Vm {
            control,
            io,
            vcpus,
            mem,
            _vm_fd,
        } = self;
        let mut threads = Vec::with_capacity(vcpus.len());
        for mut vcpu in vcpus {
            let control_for_thread = control.clone();
            let io = io.clone();
            let id = vcpu.id();
            let spawned = std::thread::Builder::new()
                .name(format!("keel-vcpu{id}"))
                .spawn(move || {
                    let control = control_for_thread;
                    let outcome = match vcpu.run(&*io, &control.stop) {
                        Ok(VcpuStop::Requested) => return,
                        Ok(VcpuStop::TripleFault) => Ok(ExitReason::TripleFault { vcpu: id }),
                        Ok(VcpuStop::Reset) => Ok(ExitReason::GuestReset),
                        Ok(VcpuStop::PowerOff) => Ok(ExitReason::GuestShutdown),
                        Err(e) => Err(Error::Vcpu(e)),
                    };
                    control.finish(outcome);
                });
            let thread = match spawned {
                Ok(t) => t,
                Err(e) => {
                    control.finish(Ok(ExitReason::Stopped));
                    halt_threads(&control, threads);
                    return Err(Error::Thread(e));
                }
            };
            control
                .kickers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(VcpuKicker::for_thread(thread.as_pthread_t()));
            threads.push(thread);
        }
        // A stop requested while threads were being spawned must reach them.
        if control.stop.load(Ordering::Acquire) {
            control.finish(Ok(ExitReason::Stopped));
        }
        Ok(VmHandle {
            control,
            threads,
            _mem: mem,
            _vm_fd,
        })
    }

    /// Starts the VM and waits for it to end.
    pub fn run(self) -> Result<ExitReason> {
        self.start()?.wait()
    }
}

/// Stops and joins the vCPU threads. The kickers are taken out first, under
/// their lock, so no kick can ever target a joined thread.
fn halt_threads(control: &Control, threads: Vec<JoinHandle<()>>) {
    let kickers = std::mem::take(&mut *control.kickers.lock().unwrap_or_else(|e| e.into_inner()));
    control.stop.store(true, Ordering::Release);
    for k in &kickers {
        let _ = k.kick();
    }
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
    _mem: GuestMemoryMmap,
    _vm_fd: VmFd,
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

impl VmHandle {
    /// A handle that stops this VM from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            control: self.control.clone(),
        }
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
    pub fn wait_timeout(
        mut self,
        timeout: Duration,
    ) -> std::result::Result<Result<ExitReason>, VmHandle> {
        match self.wait_inner(Some(timeout)) {
            Some(r) => Ok(r),
            None => Err(self),
        }
    }

    fn wait_inner(&mut self, timeout: Option<Duration>) -> Option<Result<ExitReason>> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let mut slot = self
            .control
            .outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner());
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
        Some(outcome)
    }

    fn stop_and_join(&mut self) {
        halt_threads(&self.control, std::mem::take(&mut self.threads));
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
