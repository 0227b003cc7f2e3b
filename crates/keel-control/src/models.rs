//! The request and response bodies of Firecracker's API (its
//! `firecracker.yaml`), field for field, as serde types. Unknown fields are
//! rejected, as Firecracker does.

use serde::{Deserialize, Serialize};

/// `GET /`: what this VMM is and what state its VM is in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct InstanceInfo {
    /// The application name (`"Keel"`).
    pub app_name: String,
    /// The VM's ID (`--id`).
    pub id: String,
    /// `"Not started"`, `"Running"` or `"Paused"`.
    pub state: String,
    /// This VMM's version.
    pub vmm_version: String,
}

/// `GET /version`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Version {
    /// This VMM's version (Firecracker's field name).
    pub firecracker_version: String,
}

/// `GET|PUT|PATCH /machine-config`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct MachineConfig {
    /// Number of vCPUs (1–32, as Firecracker).
    pub vcpu_count: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading: Keel exposes none (`false` only).
    #[serde(default)]
    pub smt: bool,
    /// Whether dirty pages are tracked (for diff snapshots).
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// `"None"` only (no huge pages yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
    /// CPU templates are not supported: absent or `"None"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            huge_pages: None,
            cpu_template: None,
        }
    }
}

/// `PATCH /machine-config`: any subset of the fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct MachineConfigUpdate {
    /// See [`MachineConfig::vcpu_count`].
    pub vcpu_count: Option<u8>,
    /// See [`MachineConfig::mem_size_mib`].
    pub mem_size_mib: Option<u64>,
    /// See [`MachineConfig::smt`].
    pub smt: Option<bool>,
    /// See [`MachineConfig::track_dirty_pages`].
    pub track_dirty_pages: Option<bool>,
    /// See [`MachineConfig::huge_pages`].
    pub huge_pages: Option<String>,
    /// See [`MachineConfig::cpu_template`].
    pub cpu_template: Option<String>,
}

/// `PUT /boot-source`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct BootSource {
    /// The kernel (ELF vmlinux or bzImage), or [`crate::BUILT_IN_GUEST`].
    pub kernel_image_path: String,
    /// The kernel command line; Keel's default for the kernel when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// An initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

impl BootSource {
    /// Boots `kernel_image_path` with Keel's default command line.
    pub fn new(kernel_image_path: impl Into<String>) -> Self {
        Self {
            kernel_image_path: kernel_image_path.into(),
            boot_args: None,
            initrd_path: None,
        }
    }

    /// The same, with `boot_args` as the command line.
    pub fn with_boot_args(mut self, boot_args: impl Into<String>) -> Self {
        self.boot_args = Some(boot_args.into());
        self
    }
}

/// A device's rate limiter: Firecracker's `{"bandwidth": …, "ops": …}`,
/// the same type `keel-vmm`'s configuration uses.
pub use keel_vmm::RateLimiterConfig as RateLimiter;
/// One token bucket of a [`RateLimiter`]: `size`, `one_time_burst`,
/// `refill_time` (ms).
pub use keel_vmm::TokenBucketConfig as TokenBucket;

/// `PUT /drives/{drive_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Drive {
    /// The drive's ID; must match the path.
    pub drive_id: String,
    /// The image on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// Whether the kernel mounts it as its root (`root=/dev/vda`); at most
    /// one drive.
    pub is_root_device: bool,
    /// Read-only to the guest.
    #[serde(default)]
    pub is_read_only: bool,
    /// The root partition's UUID (`root=PARTUUID=…` instead of `/dev/vda`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// `"Unsafe"` (flushes ignored) or `"Writeback"`: Keel always honours
    /// flushes, so both behave as `"Writeback"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    /// `"Sync"` (Keel's engine) or `"Async"` (accepted, served as `"Sync"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    /// Throttling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    /// A vhost-user socket: not supported by Keel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

/// `PATCH /drives/{drive_id}` on a running VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct DriveUpdate {
    /// The drive's ID; must match the path.
    pub drive_id: String,
    /// A new image for the drive (same role, new file: e.g. a rotated
    /// data disk); the guest sees a capacity change.
    #[serde(default)]
    pub path_on_host: Option<String>,
    /// New throttling.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct NetworkInterface {
    /// The interface's ID; must match the path.
    pub iface_id: String,
    /// The host tap device.
    pub host_dev_name: String,
    /// The guest's MAC address, `aa:bb:cc:dd:ee:ff`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// Receive throttling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Transmit throttling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PATCH /network-interfaces/{iface_id}` on a running VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct NetworkInterfaceUpdate {
    /// The interface's ID; must match the path.
    pub iface_id: String,
    /// New receive throttling.
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// New transmit throttling.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PUT /vsock`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Vsock {
    /// The guest's context ID (3 or more).
    pub guest_cid: u32,
    /// The host-side Unix socket.
    pub uds_path: String,
    /// Deprecated in Firecracker; accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// `PUT /entropy`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Entropy {
    /// Throttling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT|GET /balloon`: `amount_mib`, `deflate_on_oom`,
/// `stats_polling_interval_s` and (a Keel extension) `free_page_reporting`,
/// the same type `keel-vmm`'s configuration uses.
pub use keel_vmm::BalloonConfig as Balloon;

/// `PATCH /balloon`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct BalloonUpdate {
    /// New target size in MiB.
    pub amount_mib: u32,
}

/// `PATCH /balloon/statistics`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct BalloonStatsUpdate {
    /// New interval in seconds (not 0 if statistics were on, nor from 0).
    pub stats_polling_interval_s: u16,
}

/// `PUT /actions`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct InstanceActionInfo {
    /// `InstanceStart`, `SendCtrlAltDel` or `FlushMetrics`.
    pub action_type: ActionType,
}

/// What `PUT /actions` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ActionType {
    /// Boot the configured VM.
    InstanceStart,
    /// Ask the guest to shut down (Keel: the ACPI power button).
    SendCtrlAltDel,
    /// Write the metrics now.
    FlushMetrics,
}

/// `PATCH /vm`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct VmState {
    /// `Paused` or `Resumed`.
    pub state: VmStateName,
}

/// The states `PATCH /vm` sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum VmStateName {
    /// Stop running guest code.
    Paused,
    /// Run guest code again.
    Resumed,
}

/// `PUT /logger`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Logger {
    /// Where log lines go (a file or FIFO, appended to); stderr if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// `Error`, `Warning`, `Info`, `Debug`, `Trace` or `Off`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// Prefix lines with their level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Prefix lines with their origin (file:line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only log this module (path prefix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `PUT /metrics`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Metrics {
    /// Where metrics are appended as JSON lines (a file or FIFO).
    pub metrics_path: String,
}

/// `GET /vm/config`, and the `--config-file` format: everything that was
/// configured, under Firecracker's keys.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct FullVmConfiguration {
    /// The kernel.
    #[serde(rename = "boot-source", default, skip_serializing_if = "Option::is_none")]
    pub boot_source: Option<BootSource>,
    /// The disks, in order.
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// vCPUs and memory.
    #[serde(rename = "machine-config", default, skip_serializing_if = "Option::is_none")]
    pub machine_config: Option<MachineConfig>,
    /// The network cards, in order.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// The vsock device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,
    /// The entropy device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<Entropy>,
    /// The balloon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<Balloon>,
    /// Logging.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<Logger>,
    /// Metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
}

/// `GET /balloon/statistics`: Firecracker's field names.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BalloonStats {
    /// Target size in 4 KiB pages.
    pub target_pages: u32,
    /// Pages the guest has given.
    pub actual_pages: u32,
    /// Target size in MiB.
    pub target_mib: u32,
    /// Given so far, in MiB.
    pub actual_mib: u32,
    /// The guest's statistics, each present once reported.
    #[serde(flatten)]
    pub guest: std::collections::BTreeMap<String, u64>,
}

/// `snapshot_type` of `PUT /snapshot/create`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum SnapshotType {
    /// All of guest memory (its untouched pages as holes).
    #[default]
    Full,
    /// Only the pages dirtied since the last snapshot.
    Diff,
}

/// `PUT /snapshot/create`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct SnapshotCreateParams {
    /// Full (the default) or Diff.
    #[serde(default)]
    pub snapshot_type: SnapshotType,
    /// Where the state file goes.
    pub snapshot_path: String,
    /// Where the memory file goes.
    pub mem_file_path: String,
    /// Firecracker's deprecated target version; accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// `backend_type` of a snapshot's memory backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum MemBackendType {
    /// A memory file, mapped copy-on-write.
    File,
    /// A userfaultfd handler (not supported by Keel).
    Uffd,
}

/// `mem_backend` of `PUT /snapshot/load`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct MemBackend {
    /// File or Uffd.
    pub backend_type: MemBackendType,
    /// The memory file (or the userfaultfd socket).
    pub backend_path: String,
}

/// One entry of `network_overrides`: a restored card on another tap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct NetworkOverride {
    /// The card, as it was configured.
    pub iface_id: String,
    /// The tap device it uses now.
    pub host_dev_name: String,
}

/// `vsock_override`: the restored vsock device's socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct VsockOverride {
    /// The host-side Unix socket.
    pub uds_path: String,
}

/// `PUT /snapshot/load`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct SnapshotLoadParams {
    /// The state file.
    pub snapshot_path: String,
    /// The memory file (Firecracker's older form of `mem_backend`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<String>,
    /// The memory backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemBackend>,
    /// Track dirty pages for later Diff snapshots (Firecracker's older
    /// name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_diff_snapshots: Option<bool>,
    /// Track dirty pages for later Diff snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// Run the VM at once (otherwise it waits, paused, for `PATCH /vm`).
    #[serde(default)]
    pub resume_vm: bool,
    /// Cards to put on other tap devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_overrides: Option<Vec<NetworkOverride>>,
    /// Another socket for the vsock device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
}
