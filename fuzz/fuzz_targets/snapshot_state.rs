//! A snapshot's state file, as `Snapshot::load` reads it: arbitrary bytes
//! as a whole file (header, length, checksum checks), and the same bytes
//! framed in a valid header so they reach the payload decoder. Neither may
//! panic, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = keel_snapshot::decode::<keel_vmm::VmState>(data);
    let framed = keel_snapshot::frame(data);
    if let Ok(state) = keel_snapshot::decode::<keel_vmm::VmState>(&framed) {
        // A decoded state's configuration goes through the same parser
        // `Snapshot::load` uses.
        let _ = keel_vmm::VmConfig::from_json(&state.config_json);
    }
});
