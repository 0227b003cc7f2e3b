//! Builds the guest image from `guest/` with the host toolchain.
//!
//! Only the host target's `core` is available (no `x86_64-unknown-none`), so
//! the guest is a `no_std`, `no_main` program for `x86_64-unknown-linux-gnu`
//! linked freestanding: no C runtime or libc, static and not position
//! independent, at the addresses `guest/link.ld` gives. `RUSTFLAGS` meant for
//! the host crate (say `-C target-cpu=native`) are deliberately not passed on.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let guest = manifest_dir.join("guest");

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", guest.display());
    rerun_for_every_file(&guest);

    let image = out_dir.join("keel-guest.elf");
    let linker_script = guest.join("link.ld");
    let mut command = Command::new(&rustc);
    command
        .current_dir(&out_dir)
        .args([
            "--edition",
            "2021",
            "--crate-type",
            "bin",
            "--crate-name",
            "keel_guest_image",
        ])
        .args(["--target", "x86_64-unknown-linux-gnu"])
        .arg(format!("--remap-path-prefix={}=guest", guest.display()))
        .args(codegen_options())
        .arg("-C")
        .arg(format!("link-arg=-Wl,-T,{}", linker_script.display()))
        .arg(guest.join("main.rs"))
        .arg("-o")
        .arg(&image);
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", Path::new(&rustc).display()));
    if !output.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&output.stdout));
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        panic!("building the guest image failed: {command:?}");
    }
    // Warnings of the guest build surface in cargo's output.
    for line in String::from_utf8_lossy(&output.stderr)
        .lines()
        .filter(|l| l.starts_with("warning"))
    {
        println!("cargo:warning=guest: {line}");
    }
}

fn codegen_options() -> Vec<String> {
    [
        "panic=abort",
        "opt-level=s",
        "lto=fat",
        "codegen-units=1",
        "debuginfo=0",
        // Symbols stay: they name the function at a faulting RIP.
        "strip=debuginfo",
        "relocation-model=static",
        "target-feature=+crt-static",
        "link-arg=-nostdlib",
        "link-arg=-nostartfiles",
        "link-arg=-static",
        "link-arg=-Wl,--build-id=none",
        "link-arg=-Wl,-z,norelro",
    ]
    .iter()
    .flat_map(|option| ["-C".to_string(), (*option).to_string()])
    .collect()
}

fn rerun_for_every_file(dir: &Path) {
    let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("readable directory entry").path();
        if path.is_dir() {
            rerun_for_every_file(&path);
        } else {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}
