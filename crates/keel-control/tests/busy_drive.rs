//! A running drive whose backend does not return: `PATCH /drives` answers
//! within its limit, naming the drive, and changes nothing; once the disk's
//! thread lets go, the same change goes through.

use std::path::Path;
use std::time::{Duration, Instant};

use keel_control::models::{ActionType, DriveUpdate, FullVmConfiguration};
use keel_control::{Vmm, VmmOptions};

#[test]
fn a_change_to_a_drive_stuck_in_its_backend_is_refused_in_time_and_nothing_changes() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: no /dev/kvm");
        return;
    }
    let image = std::env::temp_dir().join(format!("keel-busy-drive-{}.img", std::process::id()));
    std::fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
    let mut vmm = Vmm::new(VmmOptions::new("busy-drive"));
    let config: FullVmConfiguration = serde_json::from_str(&format!(
        r#"{{"boot-source": {{"kernel_image_path": "keel:built-in-guest",
                             "boot_args": "acpi-power-button timeout-ms=30000"}},
            "machine-config": {{"vcpu_count": 1, "mem_size_mib": 64}},
            "drives": [{{"drive_id": "data", "path_on_host": "{}",
                         "is_root_device": false, "is_read_only": false}}]}}"#,
        image.display()
    ))
    .unwrap();
    vmm.configure(config).unwrap();
    vmm.action(ActionType::InstanceStart).unwrap();
    let update: DriveUpdate = serde_json::from_str(
        r#"{"drive_id": "data", "rate_limiter": {"ops": {"size": 100, "refill_time": 100}}}"#,
    )
    .unwrap();

    // The disk's thread holds the device's lock while a request is in the
    // backend; hold it here as a backend that never returns would.
    let disk = vmm.vm_controller().unwrap().disk(0).unwrap();
    let held = disk.lock().unwrap();
    let asked = Instant::now();
    let refused = vmm.patch_drive("data", update.clone()).unwrap_err().to_string();
    let waited = asked.elapsed();
    assert!(
        refused.contains("drives/data") && refused.contains("busy"),
        "{refused}"
    );
    assert!(waited < Duration::from_secs(30), "answered after {waited:?}");
    assert!(held.rate_limiter().ops().is_none(), "the limiter changed");
    assert!(vmm.vm_config().drives[0].rate_limiter.is_none());
    drop(held);

    vmm.patch_drive("data", update).unwrap();
    assert!(disk.lock().unwrap().rate_limiter().ops().is_some());
    assert!(vmm.vm_config().drives[0].rate_limiter.is_some());
    vmm.stop();
    let _ = std::fs::remove_file(&image);
    eprintln!("refused after {waited:?}: {refused}");
}
