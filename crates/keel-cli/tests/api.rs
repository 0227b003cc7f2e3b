//! `keel --api-sock`: whole VMs driven over Firecracker's HTTP API by an
//! HTTP client crate (hyper), as an orchestrator drives them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "http_client/mod.rs"]
mod http_client;
use http_client::request;

fn kvm() -> bool {
    Path::new("/dev/kvm").exists()
}

/// A unique path in the temp directory.
fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("keel-api-{}-{name}", std::process::id()))
}

/// A `keel --api-sock` process, killed when dropped.
struct Keel {
    child: Child,
    sock: PathBuf,
    stdout: PathBuf,
}

impl Keel {
    fn start(name: &str, extra: &[&str]) -> Keel {
        let sock = temp_path(&format!("{name}.sock"));
        let stdout = temp_path(&format!("{name}.out"));
        let _ = std::fs::remove_file(&sock);
        let child = Command::new(env!("CARGO_BIN_EXE_keel"))
            .arg("--api-sock")
            .arg(&sock)
            .args(extra)
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        // The socket file appears at bind(), a moment before listen().
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "the API socket never accepted");
            std::thread::sleep(Duration::from_millis(2));
        }
        Keel { child, sock, stdout }
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        request(&self.sock, method, path, body)
    }

    /// Asserts a 204 and no body.
    fn ok(&self, method: &str, path: &str, body: &str) {
        let (status, text) = self.call(method, path, Some(body));
        assert_eq!(status, 204, "{method} {path} {body}: {text}");
    }

    /// Asserts a 400 whose fault message contains `needle`.
    fn fault(&self, method: &str, path: &str, body: Option<&str>, needle: &str) {
        let (status, text) = self.call(method, path, body);
        assert_eq!(status, 400, "{method} {path}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let message = v["fault_message"].as_str().unwrap_or_default();
        assert!(
            message.contains(needle),
            "{method} {path}: {message:?} lacks {needle:?}"
        );
    }

    fn state(&self) -> String {
        let (status, text) = self.call("GET", "/", None);
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["state"].as_str().unwrap().to_string()
    }

    /// Waits for the process to end; returns its exit code and stdout.
    fn wait(self) -> (i32, String) {
        self.wait_for(Duration::from_secs(30))
    }

    /// [`Self::wait`], at most `timeout`.
    fn wait_for(mut self, timeout: Duration) -> (i32, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let out = std::fs::read_to_string(&self.stdout).unwrap_or_default();
                return (status.code().unwrap_or(-1), out);
            }
            assert!(Instant::now() < deadline, "keel did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Keel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
        let _ = std::fs::remove_file(&self.stdout);
    }
}

#[test]
fn configure_start_pause_resume_and_power_off_over_the_socket() {
    if !kvm() {
        return;
    }
    let disk = temp_path("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    let keel = Keel::start("lifecycle", &[]);
    assert_eq!(keel.state(), "Not started");
    let (status, version) = keel.call("GET", "/version", None);
    assert_eq!(status, 200, "{version}");
    keel.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 64}"#,
    );
    keel.ok(
        "PUT",
        "/boot-source",
        r#"{"kernel_image_path": "keel:built-in-guest", "boot_args": "acpi-power-button timeout-ms=30000"}"#,
    );
    keel.ok(
        "PUT",
        "/drives/data",
        &format!(
            r#"{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false, "is_read_only": false,
                 "rate_limiter": {{"bandwidth": {{"size": 1048576, "refill_time": 100}}}}}}"#,
            disk.display()
        ),
    );
    keel.ok(
        "PUT",
        "/entropy",
        r#"{"rate_limiter": {"ops": {"size": 100, "one_time_burst": 10, "refill_time": 1000}}}"#,
    );
    keel.fault(
        "PUT",
        "/entropy",
        Some(r#"{"rate_limiter": {"ops": {"size": 1, "refill": 1}}}"#),
        "unknown field `refill`",
    );
    keel.fault(
        "PATCH",
        "/drives/data",
        Some(r#"{"drive_id": "data", "rate_limiter": {}}"#),
        "has not been started",
    );
    keel.fault(
        "PATCH",
        "/vm",
        Some(r#"{"state": "Paused"}"#),
        "has not been started",
    );
    keel.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    assert_eq!(keel.state(), "Running");
    keel.fault(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        "after the VM has started",
    );
    keel.fault(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#),
        "after the VM has started",
    );
    keel.fault("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#), "not paused");
    let metrics = temp_path("lifecycle-metrics.json");
    let _ = std::fs::remove_file(&metrics);
    keel.ok(
        "PUT",
        "/metrics",
        &format!(r#"{{"metrics_path": "{}"}}"#, metrics.display()),
    );
    // The counters are live: flushed again, the guest's port writes show
    // up once its vCPUs have run (the first flush can come before their
    // first KVM_RUN on a loaded host).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        keel.ok("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#);
        let text = std::fs::read_to_string(&metrics).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        if line["vcpu"]["exit_io_out"].as_u64().unwrap() > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no port write counted in 10 s: {line}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(&metrics);
    // A running drive gets a new image and a new limit; a bad path changes
    // nothing.
    let bigger = temp_path("bigger.img");
    std::fs::File::create(&bigger).unwrap().set_len(4 << 20).unwrap();
    keel.ok(
        "PATCH",
        "/drives/data",
        &format!(
            r#"{{"drive_id": "data", "path_on_host": "{}", "rate_limiter": {{"ops": {{"size": 1000, "refill_time": 1000}}}}}}"#,
            bigger.display()
        ),
    );
    keel.fault(
        "PATCH",
        "/drives/data",
        Some(r#"{"drive_id": "data", "path_on_host": "/no/such/image"}"#),
        "/no/such/image",
    );
    keel.fault(
        "PATCH",
        "/drives/other",
        Some(r#"{"drive_id": "other"}"#),
        "no drive with that ID",
    );
    let (_, config) = keel.call("GET", "/vm/config", None);
    assert!(config.contains(&bigger.display().to_string()), "{config}");
    let _ = std::fs::remove_file(&bigger);
    keel.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    assert_eq!(keel.state(), "Paused");
    keel.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    assert_eq!(keel.state(), "Running");
    let (status, config) = keel.call("GET", "/vm/config", None);
    assert_eq!(status, 200);
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["machine-config"]["vcpu_count"], 2);
    assert_eq!(config["drives"][0]["drive_id"], "data");
    // The guest waits for the power button, then powers off through S5:
    // the process ends with the VM, status 0.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = std::fs::read_to_string(&keel.stdout).unwrap_or_default();
        if out.contains("acpi: waiting for the power button") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest never waited for the button:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    keel.ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    let (code, out) = keel.wait();
    let _ = std::fs::remove_file(&disk);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("acpi-power-button: PASS") || out.contains("power button"),
        "{out}"
    );
}

#[test]
fn bad_requests_get_firecrackers_fault_messages() {
    let keel = Keel::start("bad", &[]);
    keel.fault("PUT", "/machine-config", Some("{"), "invalid body");
    keel.fault(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64, "cpus": 2}"#),
        "unknown field `cpus`",
    );
    keel.fault(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 33, "mem_size_mib": 64}"#),
        "vcpu_count 33",
    );
    keel.fault(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64, "smt": true}"#),
        "smt",
    );
    keel.fault(
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": "/no/such/kernel"}"#),
        "/no/such/kernel",
    );
    keel.fault(
        "PUT",
        "/drives/a",
        Some(r#"{"drive_id": "b", "path_on_host": "/dev/null", "is_root_device": false}"#),
        "does not match",
    );
    keel.fault(
        "PUT",
        "/network-interfaces/eth0",
        Some(r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "zz:00:00:00:00:00"}"#),
        "guest_mac",
    );
    keel.fault(
        "PUT",
        "/vsock",
        Some(r#"{"guest_cid": 2, "uds_path": "/tmp/x"}"#),
        "guest_cid 2",
    );
    keel.fault(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "Reboot"}"#),
        "unknown variant `Reboot`",
    );
    keel.fault(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        "no boot-source",
    );
    keel.fault(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
        "no metrics_path",
    );
    keel.fault("PUT", "/actions", None, "needs a JSON body");
    keel.fault(
        "GET",
        "/nothing/here",
        None,
        "Invalid request method and/or path: GET /nothing/here",
    );
    keel.fault("DELETE", "/machine-config", None, "Invalid request method");
    // A body over the limit is refused before it is read.
    let (status, text) = keel.call("PUT", "/machine-config", Some(&"x".repeat(60 * 1024)));
    assert_eq!(status, 413, "{text}");
    // The VM is still unconfigured and the server still answers.
    assert_eq!(keel.state(), "Not started");
}

#[test]
fn metrics_are_flushed_as_json_lines_and_served_as_prometheus_text() {
    let metrics = temp_path("metrics.json");
    let _ = std::fs::remove_file(&metrics);
    let keel = Keel::start("metrics", &[]);
    keel.ok(
        "PUT",
        "/metrics",
        &format!(r#"{{"metrics_path": "{}"}}"#, metrics.display()),
    );
    keel.call("GET", "/", None);
    keel.call("PUT", "/machine-config", Some("{"));
    keel.ok("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#);
    let text = std::fs::read_to_string(&metrics).unwrap();
    let line: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(line["get_api_requests"]["instance_info_count"], 1, "{line}");
    assert_eq!(line["put_api_requests"]["machine_cfg_fails"], 1, "{line}");
    let (status, prometheus) = keel.call("GET", "/metrics", None);
    assert_eq!(status, 200);
    assert!(
        prometheus.contains("keel_put_api_requests_actions_count 1"),
        "{prometheus}"
    );
    let _ = std::fs::remove_file(&metrics);
}

#[test]
fn a_config_file_boots_at_once_and_the_process_exits_with_the_guest() {
    if !kvm() {
        return;
    }
    let file = temp_path("vm.json");
    std::fs::write(
        &file,
        r#"{
            "boot-source": {"kernel_image_path": "keel:built-in-guest", "boot_args": "exit code=7"},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 32},
            "entropy": {}
        }"#,
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("--config-file")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::write(
        &file,
        r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 32}, "drivez": []}"#,
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("--config-file")
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr.contains("unknown field `drivez`") && stderr.contains(&file.display().to_string()),
        "{stderr}"
    );
    let _ = std::fs::remove_file(&file);
}

#[test]
fn the_balloon_is_configured_inflated_and_read_over_the_api() {
    if !kvm() {
        return;
    }
    let keel = Keel::start("balloon", &[]);
    keel.fault("GET", "/balloon", None, "no balloon device is configured");
    keel.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 64}"#,
    );
    keel.fault(
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib": 65, "deflate_on_oom": false}"#),
        "amount_mib 65: more than the VM's 64 MiB",
    );
    keel.fault(
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib": 1}"#),
        "missing field `deflate_on_oom`",
    );
    keel.ok(
        "PUT",
        "/balloon",
        r#"{"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_s": 1}"#,
    );
    keel.ok(
        "PUT",
        "/boot-source",
        r#"{"kernel_image_path": "keel:built-in-guest", "boot_args": "virtio-balloon touch-mib=16 stats-rounds=1"}"#,
    );
    keel.fault("GET", "/balloon/statistics", None, "has not been started");
    keel.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    let wait_for = |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = std::fs::read_to_string(&keel.stdout).unwrap_or_default();
            if out.contains(needle) {
                return;
            }
            assert!(Instant::now() < deadline, "no {needle:?} in:\n{out}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_for("virtio-balloon: waiting for a target");
    keel.fault(
        "PATCH",
        "/balloon",
        Some(r#"{"amount_mib": 100}"#),
        "amount_mib 100",
    );
    keel.ok("PATCH", "/balloon", r#"{"amount_mib": 16}"#);
    wait_for("virtio-balloon: inflated 4096 pages (16 MiB)");
    let (status, balloon) = keel.call("GET", "/balloon", None);
    assert_eq!(status, 200, "{balloon}");
    let balloon: serde_json::Value = serde_json::from_str(&balloon).unwrap();
    assert_eq!(balloon["amount_mib"], 16);
    assert_eq!(balloon["deflate_on_oom"], true);
    let deadline = Instant::now() + Duration::from_secs(10);
    let stats = loop {
        let (status, text) = keel.call("GET", "/balloon/statistics", None);
        if status == 200 {
            let stats: serde_json::Value = serde_json::from_str(&text).unwrap();
            if stats.get("total_memory").is_some() {
                break stats;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no statistics from the guest: {status} {text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(stats["actual_mib"], 16, "{stats}");
    assert_eq!(stats["target_pages"], 4096, "{stats}");
    let (_, metrics) = keel.call("GET", "/metrics", None);
    assert!(metrics.contains("keel_balloon_inflated_pages 4096"), "{metrics}");
}

/// The `seq: step N` numbers of the built-in guest's `snapshot-seq`.
fn seq_steps(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("seq: step "))
        .map(|n| n.trim().parse().unwrap())
        .collect()
}

#[test]
fn a_snapshot_taken_over_the_api_continues_in_new_processes_through_the_api_and_keel_restore() {
    if !kvm() {
        return;
    }
    const STEPS: u64 = 300;
    let dir = temp_path("snapshot-dir");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    let state = dir.join("vm.state");
    let memory = dir.join("vm.mem");

    // Process A: boot, run part of the sequence, pause, snapshot.
    let a = Keel::start("snap-a", &[]);
    a.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 32}"#,
    );
    a.ok(
        "PUT",
        "/boot-source",
        &format!(r#"{{"kernel_image_path": "keel:built-in-guest", "boot_args": "snapshot-seq steps={STEPS} delay-ms=5"}}"#),
    );
    a.ok(
        "PUT",
        "/drives/data",
        &format!(
            r#"{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false, "is_read_only": false}}"#,
            disk.display()
        ),
    );
    a.fault(
        "PUT",
        "/snapshot/create",
        Some(&format!(
            r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            state.display(),
            memory.display()
        )),
        "the VM has not been started",
    );
    a.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    let create = format!(
        r#"{{"snapshot_type": "Full", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        state.display(),
        memory.display()
    );
    a.fault("PUT", "/snapshot/create", Some(&create), "pause it first");
    // The guest has 260 steps of 5 ms left after step 40: time to pause
    // it on a loaded host.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&a.stdout)
        .unwrap()
        .replace('\r', "")
        .contains("seq: step 40\n")
    {
        assert!(Instant::now() < deadline, "the guest never reached step 40");
        std::thread::sleep(Duration::from_millis(2));
    }
    a.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    a.fault(
        "PUT",
        "/snapshot/create",
        Some(&create.replace("Full", "Diff")),
        "snapshot_type Diff",
    );
    a.ok("PUT", "/snapshot/create", &create);
    let before = std::fs::read_to_string(&a.stdout).unwrap();
    drop(a);
    // A clone gets its own copy of the disk as it was at the snapshot.
    let clone_disk = dir.join("clone.img");
    std::fs::copy(&disk, &clone_disk).unwrap();

    // Process B: load through the API, resume at once.
    let b = Keel::start("snap-b", &[]);
    b.fault(
        "PUT",
        "/snapshot/load",
        Some(&format!(
            r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "Uffd", "backend_path": "/x"}}}}"#,
            state.display()
        )),
        "Uffd: not supported",
    );
    b.ok(
        "PUT",
        "/snapshot/load",
        &format!(
            r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true}}"#,
            state.display(),
            memory.display()
        ),
    );
    let (status, after) = b.wait_for(Duration::from_secs(120));
    assert_eq!(status, 0, "restored output:\n{after}");
    let whole = format!("{before}{after}");
    assert_eq!(
        seq_steps(&whole),
        (0..STEPS).collect::<Vec<_>>(),
        "A:\n{before}\nB:\n{after}"
    );
    assert!(
        after.contains("seq: done: 300 steps, table checked, 300 sectors read back"),
        "{after}"
    );

    // Process C: `keel --restore` with the clone's disk.
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("--restore")
        .arg(&dir)
        .arg("--disk")
        .arg(&clone_disk)
        .output()
        .unwrap();
    let after = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{after}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let whole = format!("{before}{after}");
    assert_eq!(
        seq_steps(&whole),
        (0..STEPS).collect::<Vec<_>>(),
        "A:\n{before}\nC:\n{after}"
    );

    // Flags that would change the machine are refused by name.
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("--restore")
        .arg(&dir)
        .args(["--memory", "64"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--memory cannot be used with --restore"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_diff_snapshot_over_the_api_merged_with_keel_merge_diff_restores_with_keel_restore() {
    if !kvm() {
        return;
    }
    const STEPS: u64 = 300;
    let dir = temp_path("diff-dir");
    let _ = std::fs::remove_dir_all(&dir);
    let (full, diff) = (dir.join("full"), dir.join("diff"));
    std::fs::create_dir_all(&full).unwrap();
    std::fs::create_dir_all(&diff).unwrap();
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    let a = Keel::start("diff-a", &[]);
    a.ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 32, "track_dirty_pages": true}"#,
    );
    a.ok(
        "PUT",
        "/boot-source",
        &format!(r#"{{"kernel_image_path": "keel:built-in-guest", "boot_args": "snapshot-seq steps={STEPS} delay-ms=5"}}"#),
    );
    a.ok(
        "PUT",
        "/drives/data",
        &format!(
            r#"{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false, "is_read_only": false}}"#,
            disk.display()
        ),
    );
    a.ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    let wait_step = |n: u64| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !std::fs::read_to_string(&a.stdout)
            .unwrap()
            .replace('\r', "")
            .contains(&format!("seq: step {n}\n"))
        {
            assert!(Instant::now() < deadline, "the guest never reached step {n}");
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    let create = |kind: &str, at: &Path| {
        format!(
            r#"{{"snapshot_type": "{kind}", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            at.join("vm.state").display(),
            at.join("vm.mem").display()
        )
    };
    wait_step(30);
    a.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    a.ok("PUT", "/snapshot/create", &create("Full", &full));
    a.ok("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    wait_step(90);
    a.ok("PATCH", "/vm", r#"{"state": "Paused"}"#);
    a.ok("PUT", "/snapshot/create", &create("Diff", &diff));
    let before = std::fs::read_to_string(&a.stdout).unwrap();
    drop(a);
    let full_data = std::fs::metadata(full.join("vm.mem")).unwrap();
    let diff_data = std::fs::metadata(diff.join("vm.mem")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        diff_data.blocks() < full_data.blocks(),
        "the diff is smaller on disk: {} vs {} blocks",
        diff_data.blocks(),
        full_data.blocks()
    );

    let merged = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("--merge-diff")
        .arg(&diff)
        .arg("--into")
        .arg(&full)
        .output()
        .unwrap();
    assert_eq!(
        merged.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&merged.stderr)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("--restore")
        .arg(&full)
        .output()
        .unwrap();
    let after = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{after}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let whole = format!("{before}{after}");
    assert_eq!(
        seq_steps(&whole),
        (0..STEPS).collect::<Vec<_>>(),
        "before:\n{before}\nafter:\n{after}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
