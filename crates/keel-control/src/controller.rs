//! The VM's lifecycle as Firecracker's API sees it.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use keel_vmm::{
    DiskConfig, ExitReason, NetConfig, SerialMode, VirtioTransport, VmBuilder, VmConfig, VmController,
    VsockConfig,
};

use crate::metrics::MetricsRegistry;
use crate::models::{
    ActionType, Balloon, BalloonStats, BalloonStatsUpdate, BalloonUpdate, BootSource, Drive, DriveUpdate,
    Entropy, FullVmConfiguration, InstanceInfo, Logger, MachineConfig, MachineConfigUpdate, MemBackendType,
    Metrics, NetworkInterface, NetworkInterfaceUpdate, SnapshotCreateParams, SnapshotLoadParams,
    SnapshotType, Version, VmStateName, Vsock,
};
use crate::Result;

/// `kernel_image_path` that boots Keel's built-in test guest (whose
/// program is the `boot_args`) instead of a kernel file: a Keel extension.
pub const BUILT_IN_GUEST: &str = "keel:built-in-guest";

/// Most vCPUs the API accepts, as Firecracker.
const MAX_API_VCPUS: u8 = 32;

/// Why a control operation was refused. Every message names the field,
/// value or state at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// A value in the request is wrong.
    #[error("{0}")]
    InvalidRequest(String),
    /// The request does not fit the VM's state (configure after start,
    /// start twice, resume while running).
    #[error("{0}")]
    InvalidState(String),
    /// The VM could not be built or controlled.
    #[error(transparent)]
    Vmm(#[from] keel_vmm::Error),
    /// A host file (metrics, log) could not be opened or written.
    #[error("{what} {path}: {source}")]
    Host {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// How long a change to a running drive waits for the disk's thread to be
/// between requests; as long as a pause waits for it.
const BUSY_DRIVE_WAIT: Duration = Duration::from_secs(5);

/// `device` locked, if its holder lets go within `limit`. A disk's own
/// thread holds its lock while a request is in the backend; when the
/// backend stalls (an image on a hung NFS mount), the control plane must
/// answer rather than wait with it.
fn lock_within<T: ?Sized>(device: &Mutex<T>, limit: Duration) -> Option<MutexGuard<'_, T>> {
    let deadline = Instant::now() + limit;
    loop {
        match device.try_lock() {
            Ok(guard) => return Some(guard),
            Err(TryLockError::Poisoned(poisoned)) => return Some(poisoned.into_inner()),
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(TryLockError::WouldBlock) => return None,
        }
    }
}

fn invalid(message: impl Into<String>) -> ControlError {
    ControlError::InvalidRequest(message.into())
}

fn wrong_state(message: impl Into<String>) -> ControlError {
    ControlError::InvalidState(message.into())
}

/// Applies `PUT /logger`: the binary owns the process's logger, so it
/// says how (Keel's `keel` command installs one that can be redirected).
pub trait LogControl: Send + Sync {
    /// Redirects and filters logging as `logger` says.
    fn configure(&self, logger: &Logger) -> std::result::Result<(), String>;
}

/// The VM's outcome as the control plane reports it: why it ended, or the
/// error that ended it.
pub type Outcome = std::result::Result<ExitReason, String>;

/// Called once, on the VM's waiter thread, when the VM ends.
pub type ExitCallback = Box<dyn Fn(&Outcome) + Send + Sync>;

/// How the VMM runs its VM, beyond what the API configures.
#[non_exhaustive]
pub struct VmmOptions {
    /// The VM's ID (`GET /`).
    pub id: String,
    /// Where the serial console goes (Firecracker: the process's stdout).
    pub serial: SerialMode,
    /// The transport for virtio devices. Firecracker's is virtio-mmio (the
    /// default here too), which its guests' kernels expect.
    pub transport: VirtioTransport,
    /// The KVM device node.
    pub kvm_device: std::path::PathBuf,
    /// What `PUT /logger` reconfigures; refused when absent.
    pub log_control: Option<Arc<dyn LogControl>>,
    /// Called on the VM's waiter thread when the VM ends.
    pub on_exit: Option<ExitCallback>,
    /// The seccomp filter on the VM's vCPU and device threads (the API
    /// thread's own is its caller's to install; see `keel_seccomp`).
    pub seccomp: keel_vmm::SeccompLevel,
}

impl VmmOptions {
    /// Defaults for a VM named `id`: serial console nowhere, virtio-mmio.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            serial: SerialMode::None,
            transport: VirtioTransport::Mmio,
            kvm_device: std::path::PathBuf::from(keel_vmm::DEFAULT_KVM_DEVICE),
            log_control: None,
            on_exit: None,
            seccomp: keel_vmm::SeccompLevel::default(),
        }
    }
}

impl std::fmt::Debug for VmmOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmmOptions")
            .field("id", &self.id)
            .field("serial", &self.serial)
            .field("transport", &self.transport)
            .finish_non_exhaustive()
    }
}

/// The VM's outcome, once it has ended; shared with the waiter thread.
#[derive(Debug, Default)]
pub struct ExitWatch {
    outcome: Mutex<Option<Outcome>>,
    ended: Condvar,
}

impl ExitWatch {
    /// Waits at most `timeout` for the VM to end and returns its outcome.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Outcome> {
        let deadline = Instant::now() + timeout;
        let mut slot = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        while slot.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            slot = self
                .ended
                .wait_timeout(slot, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        slot.clone()
    }

    /// The outcome, if the VM has ended.
    pub fn outcome(&self) -> Option<Outcome> {
        self.outcome.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

enum Phase {
    NotStarted,
    Started {
        controller: VmController,
        exit: Arc<ExitWatch>,
    },
}

/// One VM and its configuration, driven by Firecracker's operations.
pub struct Vmm {
    options: VmmOptions,
    config: FullVmConfiguration,
    phase: Phase,
    metrics: Arc<MetricsRegistry>,
    metrics_file: Option<std::fs::File>,
    started_at: Instant,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("id", &self.options.id)
            .field("state", &self.state_name())
            .finish_non_exhaustive()
    }
}

fn check_readable(what: &str, path: &str) -> Result<()> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| invalid(format!("{what} {path}: cannot be opened: {e}")))
}

impl Vmm {
    /// A VMM with nothing configured.
    pub fn new(options: VmmOptions) -> Self {
        Self {
            options,
            config: FullVmConfiguration::default(),
            phase: Phase::NotStarted,
            metrics: Arc::new(MetricsRegistry::default()),
            metrics_file: None,
            started_at: Instant::now(),
        }
    }

    /// The counters behind the metrics, for the API server to count its
    /// requests in.
    pub fn metrics(&self) -> Arc<MetricsRegistry> {
        self.metrics.clone()
    }

    fn started(&self) -> bool {
        matches!(self.phase, Phase::Started { .. })
    }

    fn before_start(&self, what: &str) -> Result<()> {
        if self.started() {
            return Err(wrong_state(format!(
                "{what}: the operation is not allowed after the VM has started"
            )));
        }
        Ok(())
    }

    /// The running VM's controller, for an embedder that reaches past the
    /// API (a device's backend or counters); `None` before `InstanceStart`.
    pub fn vm_controller(&self) -> Option<&VmController> {
        match &self.phase {
            Phase::Started { controller, .. } => Some(controller),
            Phase::NotStarted => None,
        }
    }

    fn controller(&self, what: &str) -> Result<&VmController> {
        match &self.phase {
            Phase::Started { controller, .. } if !controller.is_finished() => Ok(controller),
            Phase::Started { .. } => Err(wrong_state(format!("{what}: the VM has ended"))),
            Phase::NotStarted => Err(wrong_state(format!("{what}: the VM has not been started"))),
        }
    }

    fn state_name(&self) -> &'static str {
        match &self.phase {
            Phase::NotStarted => "Not started",
            Phase::Started { controller, .. } if controller.is_paused() => "Paused",
            Phase::Started { controller, .. } if controller.is_finished() => "Stopped",
            Phase::Started { .. } => "Running",
        }
    }

    /// `GET /`.
    pub fn instance_info(&self) -> InstanceInfo {
        InstanceInfo {
            app_name: "Keel".into(),
            id: self.options.id.clone(),
            state: self.state_name().into(),
            vmm_version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    /// `GET /version`.
    pub fn version(&self) -> Version {
        Version {
            firecracker_version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    /// `GET /machine-config`.
    pub fn machine_config(&self) -> MachineConfig {
        self.config.machine_config.clone().unwrap_or_default()
    }

    fn check_machine(machine: &MachineConfig) -> Result<()> {
        if machine.vcpu_count == 0 || machine.vcpu_count > MAX_API_VCPUS {
            return Err(invalid(format!(
                "vcpu_count {}: must be between 1 and {MAX_API_VCPUS}",
                machine.vcpu_count
            )));
        }
        if machine.mem_size_mib == 0 {
            return Err(invalid("mem_size_mib 0: a VM needs memory"));
        }
        if machine.smt {
            return Err(invalid("smt true: Keel exposes no SMT siblings (set smt false)"));
        }
        if let Some(h) = machine.huge_pages.as_deref().filter(|&h| h != "None") {
            return Err(invalid(format!("huge_pages {h:?}: only \"None\" is supported")));
        }
        if let Some(t) = machine.cpu_template.as_deref().filter(|&t| t != "None") {
            return Err(invalid(format!(
                "cpu_template {t:?}: CPU templates are not supported"
            )));
        }
        Ok(())
    }

    /// `PUT /machine-config`.
    pub fn put_machine_config(&mut self, machine: MachineConfig) -> Result<()> {
        self.before_start("machine-config")?;
        Self::check_machine(&machine)?;
        self.config.machine_config = Some(machine);
        Ok(())
    }

    /// `PATCH /machine-config`.
    pub fn patch_machine_config(&mut self, update: MachineConfigUpdate) -> Result<()> {
        self.before_start("machine-config")?;
        let mut machine = self.machine_config();
        let MachineConfigUpdate {
            vcpu_count,
            mem_size_mib,
            smt,
            track_dirty_pages,
            huge_pages,
            cpu_template,
        } = update;
        machine.vcpu_count = vcpu_count.unwrap_or(machine.vcpu_count);
        machine.mem_size_mib = mem_size_mib.unwrap_or(machine.mem_size_mib);
        machine.smt = smt.unwrap_or(machine.smt);
        machine.track_dirty_pages = track_dirty_pages.unwrap_or(machine.track_dirty_pages);
        machine.huge_pages = huge_pages.or(machine.huge_pages);
        machine.cpu_template = cpu_template.or(machine.cpu_template);
        self.put_machine_config(machine)
    }

    /// `PUT /boot-source`.
    pub fn put_boot_source(&mut self, boot: BootSource) -> Result<()> {
        self.before_start("boot-source")?;
        if boot.kernel_image_path != BUILT_IN_GUEST {
            check_readable("kernel_image_path", &boot.kernel_image_path)?;
        }
        if let Some(initrd) = &boot.initrd_path {
            check_readable("initrd_path", initrd)?;
        }
        self.config.boot_source = Some(boot);
        Ok(())
    }

    /// `PUT /drives/{drive_id}`: adds a drive, or replaces the one of that
    /// ID, before start.
    pub fn put_drive(&mut self, path_id: &str, drive: Drive) -> Result<()> {
        self.before_start(&format!("drives/{path_id}"))?;
        if drive.drive_id != path_id {
            return Err(invalid(format!(
                "drive_id {:?}: does not match the path's {path_id:?}",
                drive.drive_id
            )));
        }
        if drive.socket.is_some() {
            return Err(invalid(format!(
                "drives/{path_id} socket: vhost-user drives are not supported"
            )));
        }
        let Some(path) = &drive.path_on_host else {
            return Err(invalid(format!("drives/{path_id}: path_on_host is required")));
        };
        check_readable(&format!("drives/{path_id} path_on_host"), path)?;
        for (field, value, allowed) in [
            ("cache_type", &drive.cache_type, &["Unsafe", "Writeback"][..]),
            ("io_engine", &drive.io_engine, &["Sync", "Async"][..]),
        ] {
            if let Some(v) = value.as_deref().filter(|v| !allowed.contains(v)) {
                return Err(invalid(format!(
                    "drives/{path_id} {field} {v:?}: expected one of {allowed:?}"
                )));
            }
        }
        if drive.is_root_device {
            if let Some(other) = self
                .config
                .drives
                .iter()
                .find(|d| d.is_root_device && d.drive_id != drive.drive_id)
            {
                return Err(invalid(format!(
                    "drives/{path_id} is_root_device: drive {:?} is already the root device",
                    other.drive_id
                )));
            }
        }
        match self
            .config
            .drives
            .iter_mut()
            .find(|d| d.drive_id == drive.drive_id)
        {
            Some(slot) => *slot = drive,
            None => self.config.drives.push(drive),
        }
        Ok(())
    }

    /// `PATCH /drives/{drive_id}`: on a running VM only.
    pub fn patch_drive(&mut self, path_id: &str, update: DriveUpdate) -> Result<()> {
        if update.drive_id != path_id {
            return Err(invalid(format!(
                "drive_id {:?}: does not match the path's {path_id:?}",
                update.drive_id
            )));
        }
        self.controller(&format!("drives/{path_id}"))?;
        if !self.config.drives.iter().any(|d| d.drive_id == path_id) {
            return Err(invalid(format!("drives/{path_id}: no drive with that ID")));
        }
        let index = self
            .disk_order()
            .iter()
            .position(|d| d.drive_id == path_id)
            .ok_or_else(|| invalid(format!("drives/{path_id}: no drive with that ID")))?;
        let device = self
            .controller(&format!("drives/{path_id}"))?
            .disk(index)
            .ok_or_else(|| invalid(format!("drives/{path_id}: the running VM has no such disk")))?;
        let read_only = self
            .config
            .drives
            .iter()
            .find(|d| d.drive_id == path_id)
            .is_some_and(|d| d.is_read_only);
        // Open the new image before touching the device: a bad path changes
        // nothing.
        let backend = match &update.path_on_host {
            Some(path) => Some(
                keel_vmm::keel_virtio::FileBackend::open(path, read_only)
                    .map_err(|e| invalid(format!("drives/{path_id} path_on_host {path}: {e}")))?,
            ),
            None => None,
        };
        let Some(mut device) = lock_within(&device, BUSY_DRIVE_WAIT) else {
            return Err(wrong_state(format!(
                "drives/{path_id}: the drive is busy: a request has been in its backend for over {} s \
                 (a stalled image?); nothing was changed, try again",
                BUSY_DRIVE_WAIT.as_secs()
            )));
        };
        if let Some(backend) = backend {
            device.replace_backend(backend);
        }
        if let Some(limiter) = &update.rate_limiter {
            let (bandwidth, ops) = limiter.updates();
            device.update_rate_limiter(bandwidth, ops);
        }
        drop(device);
        if let Some(drive) = self.config.drives.iter_mut().find(|d| d.drive_id == path_id) {
            if update.path_on_host.is_some() {
                drive.path_on_host = update.path_on_host;
            }
            if update.rate_limiter.is_some() {
                drive.rate_limiter = update.rate_limiter;
            }
        }
        Ok(())
    }

    /// The drives in the order the VM gets them: the root drive first.
    fn disk_order(&self) -> Vec<&Drive> {
        let mut drives: Vec<&Drive> = self.config.drives.iter().filter(|d| d.is_root_device).collect();
        drives.extend(self.config.drives.iter().filter(|d| !d.is_root_device));
        drives
    }

    /// `PUT /network-interfaces/{iface_id}`.
    pub fn put_network_interface(&mut self, path_id: &str, iface: NetworkInterface) -> Result<()> {
        self.before_start(&format!("network-interfaces/{path_id}"))?;
        if iface.iface_id != path_id {
            return Err(invalid(format!(
                "iface_id {:?}: does not match the path's {path_id:?}",
                iface.iface_id
            )));
        }
        let mut probe = NetConfig::tap(iface.host_dev_name.clone());
        probe.mac = iface.guest_mac.clone();
        if iface.host_dev_name.is_empty() || iface.host_dev_name.len() > 15 {
            return Err(invalid(format!(
                "network-interfaces/{path_id} host_dev_name {:?}: interface names are 1 to 15 bytes",
                iface.host_dev_name
            )));
        }
        probe
            .mac_bytes(0)
            .map_err(|e| invalid(format!("network-interfaces/{path_id} guest_mac: {e}")))?;
        if let Some(other) = self
            .config
            .network_interfaces
            .iter()
            .find(|n| n.host_dev_name == iface.host_dev_name && n.iface_id != iface.iface_id)
        {
            return Err(invalid(format!(
                "network-interfaces/{path_id} host_dev_name {:?}: already used by {:?}",
                iface.host_dev_name, other.iface_id
            )));
        }
        match self
            .config
            .network_interfaces
            .iter_mut()
            .find(|n| n.iface_id == iface.iface_id)
        {
            Some(slot) => *slot = iface,
            None => self.config.network_interfaces.push(iface),
        }
        Ok(())
    }

    /// `PATCH /network-interfaces/{iface_id}`: on a running VM only.
    pub fn patch_network_interface(&mut self, path_id: &str, update: NetworkInterfaceUpdate) -> Result<()> {
        if update.iface_id != path_id {
            return Err(invalid(format!(
                "iface_id {:?}: does not match the path's {path_id:?}",
                update.iface_id
            )));
        }
        self.controller(&format!("network-interfaces/{path_id}"))?;
        if !self
            .config
            .network_interfaces
            .iter()
            .any(|n| n.iface_id == path_id)
        {
            return Err(invalid(format!(
                "network-interfaces/{path_id}: no interface with that ID"
            )));
        }
        let index = self
            .config
            .network_interfaces
            .iter()
            .position(|n| n.iface_id == path_id)
            .ok_or_else(|| invalid(format!("network-interfaces/{path_id}: no interface with that ID")))?;
        let device = self
            .controller(&format!("network-interfaces/{path_id}"))?
            .network_interface(index)
            .ok_or_else(|| {
                invalid(format!(
                    "network-interfaces/{path_id}: the running VM has no such card"
                ))
            })?;
        let mut device = device.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(limiter) = &update.rx_rate_limiter {
            let (bandwidth, ops) = limiter.updates();
            device.update_rx_rate_limiter(bandwidth, ops);
        }
        if let Some(limiter) = &update.tx_rate_limiter {
            let (bandwidth, ops) = limiter.updates();
            device.update_tx_rate_limiter(bandwidth, ops);
        }
        drop(device);
        if let Some(iface) = self.config.network_interfaces.get_mut(index) {
            if update.rx_rate_limiter.is_some() {
                iface.rx_rate_limiter = update.rx_rate_limiter;
            }
            if update.tx_rate_limiter.is_some() {
                iface.tx_rate_limiter = update.tx_rate_limiter;
            }
        }
        Ok(())
    }

    /// `PUT /vsock`.
    pub fn put_vsock(&mut self, vsock: Vsock) -> Result<()> {
        self.before_start("vsock")?;
        if vsock.guest_cid < 3 {
            return Err(invalid(format!(
                "guest_cid {}: must be 3 or more (0-2 are reserved)",
                vsock.guest_cid
            )));
        }
        if Path::new(&vsock.uds_path).exists() {
            return Err(invalid(format!("uds_path {}: already exists", vsock.uds_path)));
        }
        self.config.vsock = Some(vsock);
        Ok(())
    }

    /// `PUT /entropy`.
    pub fn put_entropy(&mut self, entropy: Entropy) -> Result<()> {
        self.before_start("entropy")?;
        self.config.entropy = Some(entropy);
        Ok(())
    }

    /// `PUT /balloon`.
    pub fn put_balloon(&mut self, balloon: Balloon) -> Result<()> {
        self.before_start("balloon")?;
        let memory = self.machine_config().mem_size_mib;
        if u64::from(balloon.amount_mib) > memory {
            return Err(invalid(format!(
                "balloon amount_mib {}: more than the VM's {memory} MiB",
                balloon.amount_mib
            )));
        }
        self.config.balloon = Some(balloon);
        Ok(())
    }

    fn balloon_handle(&self, what: &str) -> Result<keel_vmm::keel_virtio::BalloonHandle> {
        if self.config.balloon.is_none() {
            return Err(invalid(format!("{what}: no balloon device is configured")));
        }
        self.controller(what)?
            .balloon()
            .cloned()
            .ok_or_else(|| invalid(format!("{what}: the running VM has no balloon")))
    }

    /// `GET /balloon`: the configuration, with the current target.
    pub fn balloon(&self) -> Result<Balloon> {
        let mut balloon = self
            .config
            .balloon
            .ok_or_else(|| invalid("balloon: no balloon device is configured"))?;
        if let Ok(handle) = self.balloon_handle("balloon") {
            balloon.amount_mib = handle.target_mib();
        }
        Ok(balloon)
    }

    /// `PATCH /balloon`: a new target on a running VM (before start: the
    /// configured size).
    pub fn patch_balloon(&mut self, update: BalloonUpdate) -> Result<()> {
        if !self.started() {
            let memory = self.machine_config().mem_size_mib;
            let balloon = self
                .config
                .balloon
                .as_mut()
                .ok_or_else(|| invalid("balloon: no balloon device is configured"))?;
            if u64::from(update.amount_mib) > memory {
                return Err(invalid(format!(
                    "balloon amount_mib {}: more than the VM's {memory} MiB",
                    update.amount_mib
                )));
            }
            balloon.amount_mib = update.amount_mib;
            return Ok(());
        }
        self.balloon_handle("balloon")?
            .update_target_mib(update.amount_mib)
            .map_err(|e| invalid(format!("balloon amount_mib {}: {e}", update.amount_mib)))?;
        if let Some(balloon) = self.config.balloon.as_mut() {
            balloon.amount_mib = update.amount_mib;
        }
        Ok(())
    }

    /// `GET /balloon/statistics`.
    pub fn balloon_stats(&self) -> Result<BalloonStats> {
        let stats = self
            .balloon_handle("balloon/statistics")?
            .statistics()
            .map_err(|e| invalid(format!("balloon/statistics: {e}")))?;
        let mut guest = std::collections::BTreeMap::new();
        for (name, value) in [
            ("swap_in", stats.swap_in),
            ("swap_out", stats.swap_out),
            ("major_faults", stats.major_faults),
            ("minor_faults", stats.minor_faults),
            ("free_memory", stats.free_memory),
            ("total_memory", stats.total_memory),
            ("available_memory", stats.available_memory),
            ("disk_caches", stats.disk_caches),
            ("hugetlb_allocations", stats.hugetlb_allocations),
            ("hugetlb_failures", stats.hugetlb_failures),
            ("oom_kill", stats.oom_kill),
            ("alloc_stall", stats.alloc_stall),
            ("async_scan", stats.async_scan),
            ("direct_scan", stats.direct_scan),
            ("async_reclaim", stats.async_reclaim),
            ("direct_reclaim", stats.direct_reclaim),
        ] {
            if let Some(value) = value {
                guest.insert(name.to_string(), value);
            }
        }
        Ok(BalloonStats {
            target_pages: stats.target_pages,
            actual_pages: stats.actual_pages,
            target_mib: stats.target_mib,
            actual_mib: stats.actual_mib,
            guest,
        })
    }

    /// `PATCH /balloon/statistics`.
    pub fn patch_balloon_stats(&mut self, update: BalloonStatsUpdate) -> Result<()> {
        let seconds = update.stats_polling_interval_s;
        if !self.started() {
            let balloon = self
                .config
                .balloon
                .as_mut()
                .ok_or_else(|| invalid("balloon: no balloon device is configured"))?;
            balloon.stats_polling_interval_s = seconds;
            return Ok(());
        }
        self.balloon_handle("balloon/statistics")?
            .update_stats_polling_interval(seconds)
            .map_err(|e| {
                invalid(format!(
                    "balloon/statistics stats_polling_interval_s {seconds}: {e}"
                ))
            })?;
        if let Some(balloon) = self.config.balloon.as_mut() {
            balloon.stats_polling_interval_s = seconds;
        }
        Ok(())
    }

    /// `PUT /logger`.
    pub fn put_logger(&mut self, logger: Logger) -> Result<()> {
        if let Some(level) = logger.level.as_deref() {
            const LEVELS: [&str; 6] = ["Error", "Warning", "Info", "Debug", "Trace", "Off"];
            if !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level)) {
                return Err(invalid(format!("level {level:?}: expected one of {LEVELS:?}")));
            }
        }
        let Some(control) = &self.options.log_control else {
            return Err(invalid("logger: this VMM's logging cannot be reconfigured"));
        };
        control.configure(&logger).map_err(invalid)?;
        self.config.logger = Some(logger);
        Ok(())
    }

    /// `PUT /metrics`: opens `metrics_path` for appending JSON lines.
    pub fn put_metrics(&mut self, metrics: Metrics) -> Result<()> {
        if self.metrics_file.is_some() {
            return Err(wrong_state(
                "metrics: already configured (Firecracker allows it once)",
            ));
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics.metrics_path)
            .map_err(|source| ControlError::Host {
                what: "metrics_path",
                path: metrics.metrics_path.clone(),
                source,
            })?;
        self.metrics_file = Some(file);
        self.config.metrics = Some(metrics);
        Ok(())
    }

    /// `GET /vm/config`.
    pub fn vm_config(&self) -> FullVmConfiguration {
        let mut config = self.config.clone();
        config.machine_config = Some(self.machine_config());
        config
    }

    /// Applies a whole configuration (`--config-file`), section by section,
    /// before start.
    pub fn configure(&mut self, config: FullVmConfiguration) -> Result<()> {
        let FullVmConfiguration {
            boot_source,
            drives,
            machine_config,
            network_interfaces,
            vsock,
            entropy,
            balloon,
            logger,
            metrics,
        } = config;
        if let Some(logger) = logger {
            self.put_logger(logger)?;
        }
        if let Some(metrics) = metrics {
            self.put_metrics(metrics)?;
        }
        if let Some(machine) = machine_config {
            self.put_machine_config(machine)?;
        }
        if let Some(boot) = boot_source {
            self.put_boot_source(boot)?;
        }
        for drive in drives {
            let id = drive.drive_id.clone();
            self.put_drive(&id, drive)?;
        }
        for iface in network_interfaces {
            let id = iface.iface_id.clone();
            self.put_network_interface(&id, iface)?;
        }
        if let Some(vsock) = vsock {
            self.put_vsock(vsock)?;
        }
        if let Some(entropy) = entropy {
            self.put_entropy(entropy)?;
        }
        if let Some(balloon) = balloon {
            self.put_balloon(balloon)?;
        }
        Ok(())
    }

    /// The [`VmConfig`] the API configuration amounts to.
    pub fn to_vm_config(&self) -> Result<VmConfig> {
        let machine = self.machine_config();
        let Some(boot) = &self.config.boot_source else {
            return Err(wrong_state(
                "InstanceStart: no boot-source is configured (PUT /boot-source first)",
            ));
        };
        let mut config = VmConfig::default();
        config.vcpus = machine.vcpu_count;
        config.memory_mib = machine.mem_size_mib;
        config.track_dirty_pages = machine.track_dirty_pages;
        config.serial = self.options.serial.clone();
        config.seccomp = self.options.seccomp;
        config.transport = self.options.transport;
        let mut cmdline = boot.boot_args.clone();
        if boot.kernel_image_path != BUILT_IN_GUEST {
            config.kernel = Some(boot.kernel_image_path.clone().into());
            config.initrd = boot.initrd_path.clone().map(Into::into);
        }
        // The root drive is the first disk (vda), as Firecracker orders it.
        let drives = self.disk_order();
        for drive in &drives {
            let Some(path) = &drive.path_on_host else { continue };
            let mut disk = DiskConfig::new(path);
            disk.read_only = drive.is_read_only;
            // virtio-blk IDs are at most 20 bytes; longer ones are not given.
            disk.id = Some(drive.drive_id.clone()).filter(|id| id.len() <= 20);
            disk.rate_limiter = drive.rate_limiter;
            config.disks.push(disk);
        }
        if let Some(root) = drives.first().filter(|d| d.is_root_device) {
            if config.kernel.is_some() {
                let line =
                    cmdline.get_or_insert_with(|| keel_vmm::DEFAULT_LINUX_CMDLINE.replace(" pci=off", ""));
                if !line.split_whitespace().any(|w| w.starts_with("root=")) {
                    let device = match &root.partuuid {
                        Some(uuid) => format!("PARTUUID={uuid}"),
                        None => "/dev/vda".into(),
                    };
                    let mode = if root.is_read_only { "ro" } else { "rw" };
                    line.push_str(&format!(" root={device} {mode}"));
                }
            }
        }
        config.cmdline = cmdline;
        for iface in &self.config.network_interfaces {
            let mut net = NetConfig::tap(iface.host_dev_name.clone());
            net.mac = iface.guest_mac.clone();
            net.rx_rate_limiter = iface.rx_rate_limiter;
            net.tx_rate_limiter = iface.tx_rate_limiter;
            config.nets.push(net);
        }
        if let Some(vsock) = &self.config.vsock {
            config.vsock = Some(VsockConfig::new(
                u64::from(vsock.guest_cid),
                vsock.uds_path.clone(),
            ));
        }
        config.rng = self.config.entropy.is_some();
        config.rng_rate_limiter = self.config.entropy.as_ref().and_then(|e| e.rate_limiter);
        config.balloon = self.config.balloon;
        config.validate()?;
        Ok(config)
    }

    fn start(&mut self) -> Result<()> {
        self.before_start("InstanceStart")?;
        let config = self.to_vm_config()?;
        let handle = VmBuilder::new(config)?
            .kvm_device(&self.options.kvm_device)
            .start_time(self.started_at)
            .build()?
            .start()?;
        self.watch(handle)
    }

    /// Waits for `handle`'s VM on a thread of its own; the VM is now
    /// started.
    fn watch(&mut self, handle: keel_vmm::VmHandle) -> Result<()> {
        let controller = handle.controller();
        let exit = Arc::new(ExitWatch::default());
        let watch = exit.clone();
        let on_exit = self.options.on_exit.take();
        std::thread::Builder::new()
            .name("keel-vm-wait".into())
            .spawn(move || {
                let outcome = handle.wait().map_err(|e| e.to_string());
                if let Some(on_exit) = &on_exit {
                    on_exit(&outcome);
                }
                *watch.outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
                watch.ended.notify_all();
            })
            .map_err(|e| ControlError::Vmm(keel_vmm::Error::Thread(e)))?;
        self.phase = Phase::Started { controller, exit };
        Ok(())
    }

    /// `PUT /actions`.
    pub fn action(&mut self, action: ActionType) -> Result<()> {
        match action {
            ActionType::InstanceStart => self.start(),
            ActionType::SendCtrlAltDel => Ok(self.controller("SendCtrlAltDel")?.press_power_button()?),
            ActionType::FlushMetrics => self.flush_metrics(),
            #[allow(unreachable_patterns)]
            other => Err(invalid(format!("action_type {other:?}: not supported"))),
        }
    }

    /// `PATCH /vm`.
    pub fn set_vm_state(&mut self, state: VmStateName) -> Result<()> {
        let controller = self.controller("vm state")?;
        match state {
            VmStateName::Paused => Ok(controller.pause()?),
            VmStateName::Resumed if !controller.is_paused() => {
                Err(wrong_state("state Resumed: the VM is not paused"))
            }
            VmStateName::Resumed => Ok(controller.resume()?),
            #[allow(unreachable_patterns)]
            other => Err(invalid(format!("state {other:?}: not supported"))),
        }
    }

    /// `PUT /snapshot/create`: saves the paused VM to `snapshot_path` and
    /// `mem_file_path` (see `keel_vmm::VmController::snapshot`), with this
    /// VMM's configuration kept in the state file for `PUT /snapshot/load`.
    pub fn create_snapshot(&mut self, params: SnapshotCreateParams) -> Result<keel_vmm::SnapshotInfo> {
        let controller = self.controller("snapshot/create")?;
        if !controller.is_paused() {
            return Err(wrong_state(
                "snapshot/create: the VM is running: pause it first (PATCH /vm {\"state\": \"Paused\"})",
            ));
        }
        let kind = match params.snapshot_type {
            SnapshotType::Full => keel_vmm::SnapshotKind::Full,
            SnapshotType::Diff if !self.machine_config().track_dirty_pages => {
                return Err(invalid(
                    "snapshot_type Diff: the VM does not track dirty pages (machine-config track_dirty_pages, or track_dirty_pages in snapshot/load)",
                ))
            }
            SnapshotType::Diff => keel_vmm::SnapshotKind::Diff,
            #[allow(unreachable_patterns)]
            other => return Err(invalid(format!("snapshot_type {other:?}: not supported"))),
        };
        let record = serde_json::to_string(&self.config)
            .map_err(|e| invalid(format!("snapshot/create: cannot record the configuration: {e}")))?;
        Ok(controller.snapshot_with(&params.snapshot_path, &params.mem_file_path, kind, Some(record))?)
    }

    /// `PUT /snapshot/load`: restores a snapshot into this VMM, which must
    /// not be configured yet, with the backends `params` overrides; the VM
    /// runs at once if `resume_vm`, else waits paused.
    pub fn load_snapshot(&mut self, params: SnapshotLoadParams) -> Result<()> {
        self.before_start("snapshot/load")?;
        if self.config.boot_source.is_some()
            || !self.config.drives.is_empty()
            || !self.config.network_interfaces.is_empty()
        {
            return Err(wrong_state(
                "snapshot/load: loading a snapshot is not allowed after configuring the VM (boot-source, drives, network-interfaces)",
            ));
        }
        let memory = match (&params.mem_backend, &params.mem_file_path) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "snapshot/load: give mem_backend or mem_file_path, not both",
                ))
            }
            (Some(backend), None) => match backend.backend_type {
                MemBackendType::File => backend.backend_path.clone(),
                MemBackendType::Uffd => {
                    return Err(invalid(
                        "mem_backend backend_type Uffd: not supported; use File (Keel maps the memory file copy-on-write)",
                    ))
                }
                #[allow(unreachable_patterns)]
                other => return Err(invalid(format!("mem_backend backend_type {other:?}: not supported"))),
            },
            (None, Some(path)) => path.clone(),
            (None, None) => return Err(invalid("snapshot/load: mem_backend is missing")),
        };
        let track_dirty_pages =
            params.track_dirty_pages == Some(true) || params.enable_diff_snapshots == Some(true);
        let snapshot = keel_vmm::Snapshot::load(&params.snapshot_path, &memory)?;
        let mut recorded: FullVmConfiguration = match snapshot.record() {
            Some(json) => serde_json::from_str(json).map_err(|e| {
                invalid(format!(
                    "snapshot_path {}: the recorded configuration does not parse: {e}",
                    params.snapshot_path
                ))
            })?,
            None => FullVmConfiguration::default(),
        };
        let mut config = snapshot.config().clone();
        config.serial = self.options.serial.clone();
        config.seccomp = self.options.seccomp;
        config.track_dirty_pages = track_dirty_pages;
        if let Some(machine) = recorded.machine_config.as_mut() {
            machine.track_dirty_pages = track_dirty_pages;
        }
        for change in params.network_overrides.iter().flatten() {
            let index = recorded
                .network_interfaces
                .iter()
                .position(|n| n.iface_id == change.iface_id)
                .ok_or_else(|| {
                    invalid(format!(
                        "network_overrides: iface_id {:?}: the snapshot has no such network interface",
                        change.iface_id
                    ))
                })?;
            recorded.network_interfaces[index].host_dev_name = change.host_dev_name.clone();
            if let Some(net) = config.nets.get_mut(index) {
                net.tap = change.host_dev_name.clone();
            }
        }
        if let Some(change) = &params.vsock_override {
            let (Some(vsock), Some(saved)) = (config.vsock.as_mut(), recorded.vsock.as_mut()) else {
                return Err(invalid("vsock_override: the snapshot has no vsock device"));
            };
            vsock.uds = change.uds_path.clone().into();
            saved.uds_path = change.uds_path.clone();
        }
        let vm = VmBuilder::new(config)?
            .kvm_device(&self.options.kvm_device)
            .start_time(self.started_at)
            .restore(&snapshot, keel_vmm::RestoreMode::CopyOnWrite)?;
        let handle = if params.resume_vm {
            vm.start()?
        } else {
            vm.start_paused()?
        };
        self.config = recorded;
        self.watch(handle)
    }

    /// The VM's outcome, once started (to wait for its end).
    pub fn exit_watch(&self) -> Option<Arc<ExitWatch>> {
        match &self.phase {
            Phase::Started { exit, .. } => Some(exit.clone()),
            Phase::NotStarted => None,
        }
    }

    /// Stops the VM if it runs.
    pub fn stop(&self) {
        if let Phase::Started { controller, exit } = &self.phase {
            controller.stop();
            let _ = exit.wait_timeout(Duration::from_secs(10));
        }
    }

    /// Copies the running VM's counters into the registry, under
    /// Firecracker's group names (`net_<iface_id>` for a card).
    fn sample_vm(&self) {
        let Phase::Started { controller, .. } = &self.phase else {
            return;
        };
        for (group, counters) in controller.metrics() {
            let group = match group.strip_prefix("net_") {
                Some(tap) => self
                    .config
                    .network_interfaces
                    .iter()
                    .find(|n| n.host_dev_name == tap)
                    .map_or(group.clone(), |n| format!("net_{}", n.iface_id)),
                None => group,
            };
            for (name, value) in counters {
                self.metrics.set(&group, name, value);
            }
        }
    }

    /// The metrics now, as one JSON object (what `FlushMetrics` writes).
    pub fn metrics_json(&self) -> serde_json::Value {
        self.sample_vm();
        self.metrics.snapshot_json(self.started_at.elapsed())
    }

    /// The metrics now in Prometheus' text format (`GET /metrics`).
    pub fn metrics_prometheus(&self) -> String {
        self.sample_vm();
        self.metrics.prometheus(self.started_at.elapsed())
    }

    /// `FlushMetrics`: appends one JSON line to the metrics file.
    pub fn flush_metrics(&mut self) -> Result<()> {
        let line = self.metrics_json().to_string();
        let path = self
            .config
            .metrics
            .as_ref()
            .map(|m| m.metrics_path.clone())
            .unwrap_or_default();
        let Some(file) = self.metrics_file.as_mut() else {
            return Err(wrong_state(
                "FlushMetrics: no metrics_path is configured (PUT /metrics first)",
            ));
        };
        use std::io::Write;
        writeln!(file, "{line}").map_err(|source| ControlError::Host {
            what: "metrics_path",
            path,
            source,
        })
    }
}

/// How often [`spawn_periodic_flush`] writes the metrics (Firecracker's
/// period).
pub const METRICS_FLUSH_PERIOD: Duration = Duration::from_secs(60);

/// Flushes `vmm`'s metrics every `period` (when a metrics path is set) on a
/// thread of its own, until `vmm` is dropped.
pub fn spawn_periodic_flush(vmm: &Arc<Mutex<Vmm>>, period: Duration) -> std::io::Result<()> {
    let vmm = Arc::downgrade(vmm);
    std::thread::Builder::new()
        .name("keel-metrics".into())
        .spawn(move || loop {
            std::thread::sleep(period);
            let Some(vmm) = vmm.upgrade() else { return };
            let mut vmm = vmm.lock().unwrap_or_else(|e| e.into_inner());
            if vmm.metrics_file.is_some() {
                if let Err(e) = vmm.flush_metrics() {
                    log::warn!("periodic metrics flush: {e}");
                }
            }
        })
        .map(drop)
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.stop();
    }
}
