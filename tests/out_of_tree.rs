//! An embedder's crate outside this workspace, with only Keel crates in its
//! Cargo.toml (`tests/out-of-tree/`), builds and runs the built-in guest
//! against a disk on its own backend and a device type of its own.

use std::path::Path;
use std::process::Command;

#[test]
fn a_crate_outside_the_workspace_embeds_keel() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let keel = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("keel-embedder-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("src")).unwrap();
    let manifest = std::fs::read_to_string(keel.join("tests/out-of-tree/Cargo.toml.in"))
        .unwrap()
        .replace("@KEEL@", keel.to_str().unwrap());
    std::fs::write(dir.join("Cargo.toml"), manifest).unwrap();
    std::fs::copy(
        keel.join("tests/out-of-tree/src/main.rs"),
        dir.join("src/main.rs"),
    )
    .unwrap();
    // The workspace's lock file pins the same dependency versions, so the
    // build needs no registry access beyond what this checkout already has.
    std::fs::copy(keel.join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
    let output = Command::new(env!("CARGO"))
        .args(["run", "--quiet", "--offline"])
        .current_dir(&dir)
        // Its own target directory, kept between runs.
        .env("CARGO_TARGET_DIR", keel.join("target/out-of-tree"))
        .output()
        .expect("cargo runs");
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the out-of-tree crate failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("`virtio-blk pattern=9` passed"), "{stdout}");
    assert!(
        stdout.contains("`virtio-request type=0x3e send=embedded` passed"),
        "{stdout}"
    );
}
