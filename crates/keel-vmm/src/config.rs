//! What a VM is made of, as data.

use std::path::PathBuf;

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
}

fn default_vcpus() -> u8 {
    1
}

fn default_memory_mib() -> u64 {
    128
}

/// Command line given to a Linux kernel when none is set.
pub const DEFAULT_LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off nomodules i8042.noaux";
/// Command line given to the built-in guest when none is set.
pub const DEFAULT_GUEST_CMDLINE: &str = "hello";

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            vcpus: default_vcpus(),
            memory_mib: default_memory_mib(),
            kernel: None,
            cmdline: None,
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
            return Err(Error::Config(format!("vcpus {}: must be between 1 and {MAX_VCPUS}", self.vcpus)));
        }
        let bytes = self
            .memory_mib
            .checked_mul(keel_memory::MIB)
            .ok_or_else(|| Error::Config(format!("memory {} MiB: too large", self.memory_mib)))?;
        keel_memory::GuestLayout::new(bytes).map_err(|e| Error::Config(e.to_string()))?;
        if let Some(host) = host_memory_bytes() {
            if bytes > host {
                return Err(Error::Config(format!(
                    "memory {} MiB: more than the host's {} MiB of RAM",
                    self.memory_mib,
                    host / keel_memory::MIB
                )));
            }
        }
        if let Some(kernel) = &self.kernel {
            if !kernel.is_file() {
                let why = match std::fs::metadata(kernel) {
                    Ok(_) => "not a regular file".to_string(),
                    Err(e) => e.to_string(),
                };
                return Err(Error::Config(format!("kernel {}: {why}", kernel.display())));
            }
        }
        Ok(())
    }

    /// The command line the guest will get.
    pub fn effective_cmdline(&self) -> &str {
        match (&self.cmdline, &self.kernel) {
            (Some(c), _) => c,
            (None, None) => DEFAULT_GUEST_CMDLINE,
            (None, Some(_)) => DEFAULT_LINUX_CMDLINE,
        }
    }
}

fn host_memory_bytes() -> Option<u64> {
    // SAFETY: sysinfo only writes into the struct we pass.
    unsafe {
        let mut info: libc::sysinfo = std::mem::zeroed();
        if libc::sysinfo(&mut info) != 0 {
            return None;
        }
        Some(u64::from(info.totalram).saturating_mul(u64::from(info.mem_unit)))
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
    fn rejects_zero_vcpus_naming_the_value() {
        let c = VmConfig { vcpus: 0, ..Default::default() };
        assert_eq!(c.validate().unwrap_err().to_string(), "invalid configuration: vcpus 0: must be between 1 and 254");
    }

    #[test]
    fn rejects_zero_memory_naming_the_value() {
        let c = VmConfig { memory_mib: 0, ..Default::default() };
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains("memory size 0 bytes (0 MiB): must be at least 2 MiB"), "{msg}");
    }

    #[test]
    fn rejects_memory_beyond_the_host() {
        let c = VmConfig { memory_mib: 512 * 1024, ..Default::default() };
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains("memory 524288 MiB"), "{msg}");
    }

    #[test]
    fn rejects_overflowing_memory() {
        let c = VmConfig { memory_mib: u64::MAX, ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains(&u64::MAX.to_string()));
    }

    #[test]
    fn rejects_a_missing_kernel_naming_the_path() {
        let c = VmConfig { kernel: Some("/nonexistent/vmlinux".into()), ..Default::default() };
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains("/nonexistent/vmlinux: No such file or directory"), "{msg}");
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
    fn default_cmdline_depends_on_the_kernel() {
        assert_eq!(VmConfig::default().effective_cmdline(), "hello");
        let linux = VmConfig { kernel: Some("/k".into()), ..Default::default() };
        assert!(linux.effective_cmdline().contains("console=ttyS0"));
    }
}
