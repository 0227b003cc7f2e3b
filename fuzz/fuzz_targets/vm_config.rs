//! What a user feeds `keel`: a `--config` JSON file, and `--disk`,
//! `--net`, `--vsock` and `--console` flag values.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = keel_vmm::VmConfig::from_json(text) {
        let _ = config.validate();
    }
    let _ = text.parse::<keel_vmm::DiskConfig>();
    let _ = text.parse::<keel_vmm::NetConfig>();
    let _ = text.parse::<keel_vmm::VsockConfig>();
    let _ = text.parse::<keel_vmm::ConsoleConfig>();
});
