//! What a host's KVM reports that does not change while the process runs,
//! asked once per KVM device: a process that starts or restores many VMs
//! does not ask again for each.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kvm_bindings::CpuId;
use kvm_ioctls::Kvm;

use crate::{Error, Result};

/// The host's `KVM_GET_SUPPORTED_CPUID` and the MSRs a vCPU saves.
#[derive(Debug)]
pub(crate) struct HostKvm {
    pub supported_cpuid: CpuId,
    pub msrs_to_save: Arc<Vec<u32>>,
}

static CACHE: Mutex<Vec<(PathBuf, Arc<HostKvm>)>> = Mutex::new(Vec::new());

/// The facts of the KVM at `path` (opened as `kvm`), from the cache or
/// asked now.
pub(crate) fn host_kvm(kvm: &Kvm, path: &Path) -> Result<Arc<HostKvm>> {
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, host)) = cache.iter().find(|(p, _)| p == path) {
        return Ok(host.clone());
    }
    let host = Arc::new(HostKvm {
        supported_cpuid: kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::Kvm("KVM_GET_SUPPORTED_CPUID", e))?,
        msrs_to_save: Arc::new(keel_vcpu::msrs_to_save(kvm)?),
    });
    cache.push((path.to_path_buf(), host.clone()));
    Ok(host)
}
