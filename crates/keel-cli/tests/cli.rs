//! The `keel` command as a user runs it.

use std::process::Command;

fn keel(args: &[&str]) -> (i32, String, String) {
    // coreutils' timeout: a hung VM fails the test instead of the run.
    let out = Command::new("timeout")
        .arg("60")
        .arg(env!("CARGO_BIN_EXE_keel"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_documents_every_flag() {
    let (code, out, _) = keel(&["--help"]);
    assert_eq!(code, 0);
    for flag in [
        "--kernel",
        "--cmdline",
        "--cpus",
        "--memory",
        "--config",
        "--log-level",
    ] {
        assert!(out.contains(flag), "--help lacks {flag}:\n{out}");
    }
}

#[test]
fn without_a_kernel_runs_the_built_in_guest() {
    let (code, out, err) = keel(&["--memory", "32M"]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("Keel test guest: hello"), "{out}");
    assert!(err.contains("guest exited with status 0"), "{err}");
}

#[test]
fn guest_status_becomes_the_exit_code() {
    let (code, _, _) = keel(&["--memory", "32", "--cmdline", "exit code=42"]);
    assert_eq!(code, 42);
}

#[test]
fn guest_reset_exits_zero_and_says_why() {
    let (code, _, err) = keel(&["--memory", "32", "--cmdline", "reset"]);
    assert_eq!(code, 0);
    assert!(err.contains("guest reset"), "{err}");
}

#[test]
fn both_irqchip_modes_run_the_built_in_guest() {
    for mode in ["split", "kernel"] {
        let (code, out, err) = keel(&["--memory", "32", "--irqchip", mode, "--cmdline", "exit code=5"]);
        assert_eq!(code, 5, "--irqchip {mode}: stdout:\n{out}\nstderr:\n{err}");
    }
    let (code, _, err) = keel(&["--irqchip", "pic"]);
    assert_ne!(code, 0);
    assert!(err.contains("irqchip \"pic\": expected split or kernel"), "{err}");
}

#[test]
fn disks_attach_over_either_transport_from_the_command_line() {
    let image = std::env::temp_dir().join(format!("keel-cli-transport-{}.img", std::process::id()));
    std::fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
    let disk = image.display().to_string();
    let mmio_disk = format!("{disk},transport=mmio");
    for (args, on_pci) in [
        (vec!["--disk", &disk], true),
        (vec!["--transport", "mmio", "--disk", &disk], false),
        (vec!["--transport", "pci", "--disk", &disk], true),
        (vec!["--disk", &mmio_disk], false),
    ] {
        let mut all = vec!["--memory", "32", "--cmdline", "virtio-blk"];
        all.extend(args.iter().copied());
        let (code, out, err) = keel(&all);
        assert_eq!(code, 0, "{args:?}: stdout:\n{out}\nstderr:\n{err}");
        assert_eq!(out.contains("virtio: PCI 00:01.0 "), on_pci, "{args:?}:\n{out}");
        assert_eq!(
            out.contains("virtio: 0xd0001000 GSI 5: "),
            !on_pci,
            "{args:?}:\n{out}"
        );
    }
    let _ = std::fs::remove_file(&image);
    let (code, _, err) = keel(&["--transport", "isa"]);
    assert_ne!(code, 0);
    assert!(err.contains("transport \"isa\": expected mmio or pci"), "{err}");
}

fn assert_one_line_error(args: &[&str], needle: &str) {
    let (code, _, err) = keel(args);
    assert_ne!(code, 0, "{args:?} should fail");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one error line for {args:?}, got:\n{err}"
    );
    assert!(lines[0].contains(needle), "{:?} lacks {needle:?}", lines[0]);
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn zero_memory_is_one_clear_error() {
    assert_one_line_error(&["--memory", "0"], "memory size 0");
}

#[test]
fn absurd_memory_is_one_clear_error() {
    assert_one_line_error(&["--memory", "100T"], "(104857600 MiB)");
}

#[test]
fn zero_cpus_is_one_clear_error() {
    assert_one_line_error(&["--cpus", "0"], "vcpus 0");
}

#[test]
fn missing_kernel_is_one_clear_error() {
    assert_one_line_error(&["--kernel", "/no/such/bzImage"], "/no/such/bzImage");
}

#[test]
fn garbage_kernel_is_one_clear_error() {
    let path = std::env::temp_dir().join(format!("keel-cli-garbage-{}", std::process::id()));
    std::fs::write(&path, vec![0x5a; 4096]).unwrap();
    let p = path.to_str().unwrap().to_owned();
    assert_one_line_error(&["--kernel", &p], "neither an ELF");
    std::fs::remove_file(path).unwrap();
}

#[test]
fn missing_config_file_is_one_clear_error() {
    assert_one_line_error(&["--config", "/no/such/vm.json"], "/no/such/vm.json");
}

#[test]
fn missing_kvm_device_is_one_clear_error() {
    assert_one_line_error(
        &["--kvm-device", "/no/such/kvm"],
        "cannot open /no/such/kvm: No such file or directory",
    );
}

#[test]
fn inaccessible_kvm_device_is_one_clear_error() {
    // A directory cannot be opened read-write: stands in for a node without permission.
    assert_one_line_error(&["--kvm-device", "/"], "cannot open /: Is a directory");
}

#[test]
fn stdin_reaches_the_guest_serial_port() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["--memory", "32", "--cmdline", "serial-echo timeout-ms=10000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("KEEL-SERIAL: ready") {
            break;
        }
    }
    assert!(seen.contains("KEEL-SERIAL: ready"), "{seen}");
    stdin.write_all(b"hello from the host\n").unwrap();
    for line in lines {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
    }
    let status = child.wait().unwrap();
    assert!(seen.contains("KEEL-SERIAL: got hello from the host"), "{seen}");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_net_fd_that_is_not_open_is_one_clear_error() {
    assert_one_line_error(
        &["--memory", "32", "--net", "fd=987"],
        "net fd=987: not an open file descriptor",
    );
}

#[test]
fn a_net_fd_that_is_not_a_tap_is_one_clear_error() {
    // fd 0 is stdin (here /dev/null from `output()`): open, but no tap.
    assert_one_line_error(&["--memory", "32", "--net", "fd=0"], "net fd=0:");
}

/// Each thread of a running `keel` and its seccomp mode (2: a filter).
fn thread_filters(pid: u32) -> Vec<(String, String)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        // A thread that ended since the listing is no longer there to look at.
        let Ok(status) = task.and_then(|t| std::fs::read_to_string(t.path().join("status"))) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        threads.push((field("Name:"), field("Seccomp:")));
    }
    threads
}

/// Starts `keel` on a guest that waits and watches its threads until
/// `done` holds for them (or 20 s pass); ends it and returns the last look.
fn while_running(extra: &[&str], done: impl Fn(&[(String, String)]) -> bool) -> Vec<(String, String)> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args([
            "--memory",
            "32",
            "--rng",
            "--cmdline",
            "acpi-power-button timeout-ms=20000",
        ])
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let threads = loop {
        let threads = thread_filters(child.id());
        let started = threads.iter().any(|(name, _)| name == "keel-events")
            && threads.iter().any(|(name, _)| name.starts_with("keel-vcpu"));
        if (started && done(&threads)) || std::time::Instant::now() > deadline {
            break threads;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    let _ = child.kill();
    let _ = child.wait();
    threads
}

#[test]
fn every_thread_runs_under_a_seccomp_filter_by_default() {
    // The main thread installs its filter once the VM runs, a moment
    // after the VM's threads have theirs.
    let threads = while_running(&[], |t| t.iter().all(|(_, mode)| mode == "2"));
    assert!(
        threads.len() >= 3 && threads.iter().all(|(_, mode)| mode == "2"),
        "a thread has no seccomp filter: {threads:?}"
    );
    let threads = while_running(&["--no-seccomp"], |_| true);
    assert!(
        threads.len() >= 3 && threads.iter().all(|(_, mode)| mode == "0"),
        "a thread is filtered with --no-seccomp: {threads:?}"
    );
}

#[test]
fn a_bad_seccomp_level_is_named() {
    let (code, _, err) = keel(&["--seccomp-level", "strict"]);
    assert_eq!(code, 2);
    assert!(err.contains("seccomp level \"strict\""), "{err}");
}
