//! Every example runs and succeeds: an example in the README that stopped
//! working would fail here first.

use std::path::PathBuf;
use std::process::Command;

/// `target/<profile>/examples/NAME`, which `cargo test` builds before
/// running this test.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/examples-HASH -> target/<profile>/examples/NAME
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary lives in target/<profile>/deps");
    profile_dir.join("examples").join(name)
}

fn run(name: &str) -> String {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm");
        return String::new();
    }
    let path = example(name);
    let output = Command::new(&path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e} (built by `cargo test`)", path.display()));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "example {name} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn hello_example_runs() {
    run("hello");
}

#[test]
fn custom_device_example_runs() {
    let out = run("custom_device");
    assert!(out.is_empty() || out.contains("guest passed"), "{out}");
}

#[test]
fn custom_virtio_device_example_runs() {
    let out = run("custom_virtio_device");
    assert!(out.is_empty() || out.contains("3 upper-case replies"), "{out}");
}

#[test]
fn custom_block_backend_example_runs() {
    let out = run("custom_block_backend");
    assert!(out.is_empty() || out.contains("the base is untouched"), "{out}");
}

#[test]
fn raw_vcpu_example_runs() {
    run("raw_vcpu");
}
