//! `keel-jail` running `keel`: the VM boots its guest while the jailed
//! process is checked from inside its own view (its root, credentials,
//! namespaces, limits, cgroup and descriptors, read through /proc/PID).
//! Needs root, as the jailer does.

#[path = "http_client/mod.rs"]
mod http_client;

use std::collections::BTreeSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http_client::request;

const UID: u32 = 41234;
const GID: u32 = 41235;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn base_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("keel-jail-test-{}-{name}", std::process::id()))
}

/// Every path under `dir`, relative to it.
fn tree(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.unwrap().path();
            out.insert(path.strip_prefix(dir).unwrap().display().to_string());
            if path.is_dir() && !path.is_symlink() {
                stack.push(path);
            }
        }
    }
    out
}

/// Kills the jailed program if the test fails before it ends.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.0) {
            // SAFETY: kill(2) on the jailed program's PID; harmless once it
            // has exited (its PID stays reserved until the jailer reaps it,
            // which this test's wait does after this guard's last use).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The jailer's child (the jailed program), by /proc's children list.
fn jailed_pid(jailer: &Child) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let children =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", jailer.id())).unwrap_or_default();
        // The jailer's earlier children (ldd) are not it: the jailed
        // program is the one in a PID namespace of its own.
        for pid in children.split_whitespace() {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let nspid = status
                .lines()
                .find(|l| l.starts_with("NSpid:"))
                .unwrap_or_default();
            if nspid.split_whitespace().count() == 3 {
                return pid.parse().unwrap();
            }
        }
        assert!(Instant::now() < deadline, "the jailer started no child");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// The value of a cgroup file of `pid`'s group for `controller`, on
/// whichever hierarchy (v2 or v1) the host has it.
fn cgroup_value(pid: u32, controller: &str, file: &str) -> Option<(String, String)> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
        let path = path.trim_start_matches('/');
        let candidates: Vec<PathBuf> = if controllers.is_empty() {
            vec![
                Path::new("/sys/fs/cgroup").join(path),
                Path::new("/sys/fs/cgroup/unified").join(path),
            ]
        } else if controllers.split(',').any(|c| c == controller) {
            vec![Path::new("/sys/fs/cgroup").join(controllers).join(path)]
        } else {
            continue;
        };
        for dir in candidates {
            if let Ok(value) = std::fs::read_to_string(dir.join(file)) {
                return Some((path.to_string(), value.trim().to_string()));
            }
        }
    }
    None
}

#[test]
fn a_jailed_keel_boots_its_guest_and_sees_only_its_jail() {
    assert!(
        is_root(),
        "the jail tests need root (the README's test command runs as root)"
    );
    let id = format!("jail-test-{}", std::process::id());
    let base = base_dir("boot");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let disk = base.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    std::os::unix::fs::chown(&disk, Some(UID), Some(GID)).unwrap();
    // Descriptors the jailed program must not inherit and one it keeps.
    let mut leaked = [0; 2];
    let mut kept = [0; 2];
    // SAFETY: pipe(2) fills the arrays; the descriptors are closed below.
    unsafe {
        assert_eq!(libc::pipe(leaked.as_mut_ptr()), 0);
        assert_eq!(libc::pipe(kept.as_mut_ptr()), 0);
    }
    let keel = env!("CARGO_BIN_EXE_keel");
    let mut jailer = Command::new(env!("CARGO_BIN_EXE_keel-jail"))
        .args(["--id", &id, "--exec-file", keel])
        .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
        .arg("--chroot-base-dir")
        .arg(&base)
        .arg("--file")
        .arg(format!("{}:/images/disk.img:rw", disk.display()))
        .args(["--new-netns", "--keep-fd", &kept[0].to_string()])
        .args(["--cgroup", "pids.max=64", "--cgroup", "memory.max=1073741824"])
        .args(["--cgroup", "cpu.max=50000 100000"])
        .args([
            "--resource-limit",
            "no-file=256",
            "--resource-limit",
            "fsize=1073741824",
        ])
        .args(["--", "--api-sock", "/api.sock", "--serial", "stdio"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = jailed_pid(&jailer);
    let _kill_on_failure = KillOnDrop(pid);
    let console = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut stdout = jailer.stdout.take().unwrap();
    let reader = {
        let console = console.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = std::io::Read::read(&mut stdout, &mut buf) {
                console
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let root = base.join("keel").join(&id).join("root");
    let sock = root.join("api.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "no API socket in the jail");
        std::thread::sleep(Duration::from_millis(5));
    }
    let ok = |method: &str, path: &str, body: &str| {
        let (status, text) = request(&sock, method, path, Some(body));
        assert_eq!(status, 204, "{method} {path}: {text}");
    };
    ok(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 64}"#,
    );
    ok(
        "PUT",
        "/boot-source",
        r#"{"kernel_image_path": "keel:built-in-guest", "boot_args": "acpi-power-button timeout-ms=30000"}"#,
    );
    ok(
        "PUT",
        "/drives/data",
        r#"{"drive_id": "data", "path_on_host": "/images/disk.img", "is_root_device": false, "is_read_only": false}"#,
    );
    ok("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);

    // Its root: the program, its libraries, the three device nodes, the
    // disk and its socket; nothing of the host's.
    let proc_root = PathBuf::from(format!("/proc/{pid}/root"));
    let seen = tree(&proc_root);
    for expected in [
        "keel",
        "dev/kvm",
        "dev/net/tun",
        "dev/urandom",
        "images/disk.img",
        "api.sock",
    ] {
        assert!(
            seen.contains(expected),
            "{expected} missing from the jail: {seen:?}"
        );
    }
    for entry in &seen {
        // Under a top-level entry the jail was given, a library directory
        // (lib, lib64, …) or a shared object.
        let top = entry.split('/').next().unwrap_or_default();
        let allowed = ["keel", "dev", "images", "api.sock", "usr"].contains(&top)
            || entry.starts_with("lib")
            || entry.ends_with(".so")
            || entry.contains(".so.");
        assert!(allowed, "the jail shows {entry}: {seen:?}");
    }
    assert!(!proc_root.join("etc/passwd").exists());
    assert!(!proc_root.join("proc").exists());
    let kvm = std::fs::metadata(proc_root.join("dev/kvm")).unwrap();
    assert!(kvm.file_type().is_char_device());
    assert_eq!((kvm.uid(), kvm.gid()), (UID, GID));
    assert_eq!(kvm.rdev(), std::fs::metadata("/dev/kvm").unwrap().rdev());

    // Credentials: the uid and gid given, no groups, no capabilities, no
    // new privileges, a seccomp filter, PID 1 of its namespace.
    assert_eq!(status_field(pid, "Uid"), format!("{UID}\t{UID}\t{UID}\t{UID}"));
    assert_eq!(status_field(pid, "Gid"), format!("{GID}\t{GID}\t{GID}\t{GID}"));
    assert_eq!(status_field(pid, "Groups"), "");
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm"), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(status_field(pid, "Seccomp"), "2");
    assert_eq!(status_field(pid, "NSpid"), format!("{pid}\t1"));

    // Namespaces: none shared with this process.
    for ns in ["mnt", "pid", "ipc", "uts", "net"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "the jail shares the {ns} namespace");
    }

    // Limits in force.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let limit = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in {limits}"))
            .split_whitespace()
            .filter(|w| w.chars().all(|c| c.is_ascii_digit()))
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(limit("Max open files"), "256 256");
    assert_eq!(limit("Max file size"), "1073741824 1073741824");
    // Each limit where the host keeps the controller: v2's file, or the
    // v1 file the jailer translated it to.
    let value = |controller: &str, files: &[&str]| {
        files
            .iter()
            .find_map(|f| cgroup_value(pid, controller, f))
            .unwrap_or_else(|| panic!("no {files:?} for the jailed process's {controller} cgroup"))
    };
    let (path, pids_max) = value("pids", &["pids.max"]);
    assert!(path.ends_with(&format!("keel/{id}")), "{path}");
    assert_eq!(pids_max, "64");
    let (path, memory) = value("memory", &["memory.max", "memory.limit_in_bytes"]);
    assert!(path.ends_with(&format!("keel/{id}")), "{path}");
    assert_eq!(memory, "1073741824");
    let (_, cpu) = value("cpu", &["cpu.max", "cpu.cfs_quota_us"]);
    assert!(cpu == "50000 100000" || cpu == "50000", "{cpu}");

    // Descriptors: the kept pipe end is there, the other pipe is not. The
    // running VMM may close a descriptor between the listing and the read
    // of its link; such a one is no inherited pipe.
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|link| link.display().to_string())
        .collect();
    let pipe_of = |fd: i32| {
        std::fs::read_link(format!("/proc/self/fd/{fd}"))
            .unwrap()
            .display()
            .to_string()
    };
    assert!(
        fds.contains(&pipe_of(kept[0])),
        "the kept descriptor is missing: {fds:?}"
    );
    assert!(
        !fds.contains(&pipe_of(leaked[0])) && !fds.contains(&pipe_of(leaked[1])),
        "{fds:?}"
    );

    // The guest runs in the jail: it waits for the power button; press it
    // and see it power off.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !console
        .lock()
        .unwrap()
        .contains("acpi: waiting for the power button")
    {
        assert!(
            Instant::now() < deadline,
            "the guest never waited: {}",
            console.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    ok("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    let output = jailer.wait_with_output().unwrap();
    reader.join().unwrap();
    let stdout = console.lock().unwrap().clone();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{:?}\n{stdout}\n{stderr}", output.status);
    assert!(
        stdout.contains("power button pressed; entering S5"),
        "{stdout}\n{stderr}"
    );
    assert!(stderr.contains("guest powered off"), "{stderr}");
    // The jail's cgroup went with it.
    for dir in [
        format!("/sys/fs/cgroup/pids/keel/{id}"),
        format!("/sys/fs/cgroup/keel/{id}"),
    ] {
        assert!(!Path::new(&dir).exists(), "{dir} is left behind");
    }
    // SAFETY: closing the pipes this test made.
    unsafe {
        for fd in leaked.into_iter().chain(kept) {
            libc::close(fd);
        }
    }
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn a_jailed_keel_uses_its_disk_and_the_jailer_names_bad_input() {
    assert!(
        is_root(),
        "the jail tests need root (the README's test command runs as root)"
    );
    let id = format!("jail-disk-{}", std::process::id());
    let base = base_dir("disk");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let disk = base.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    std::os::unix::fs::chown(&disk, Some(UID), Some(GID)).unwrap();
    let jail = |extra: &[&str], args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_keel-jail"))
            .args(["--id", &id, "--exec-file", env!("CARGO_BIN_EXE_keel")])
            .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
            .arg("--chroot-base-dir")
            .arg(&base)
            .args(extra)
            .arg("--")
            .args(args)
            .output()
            .unwrap()
    };
    let file = format!("{}:/disk.img:rw", disk.display());
    let out = jail(
        &["--file", &file],
        &["--memory", "32", "--disk", "/disk.img", "--cmdline", "virtio-blk"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("virtio-blk: PASS"), "{stdout}");
    // A host path outside the jail does not exist for the program.
    let out = jail(
        &[],
        &[
            "--memory",
            "32",
            "--disk",
            disk.to_str().unwrap(),
            "--cmdline",
            "virtio-blk",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(disk.to_str().unwrap()), "{stderr}");
    // Bad input is named.
    let out = jail(&["--file", "/no/such/file:/x"], &[]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/file"));
    let out = Command::new(env!("CARGO_BIN_EXE_keel-jail"))
        .args([
            "--id",
            "../escape",
            "--exec-file",
            env!("CARGO_BIN_EXE_keel"),
            "--uid",
            "1",
            "--gid",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"../escape\""));
    let out = Command::new(env!("CARGO_BIN_EXE_keel-jail"))
        .args([
            "--id",
            "x",
            "--exec-file",
            "/bin/true",
            "--uid",
            "1",
            "--gid",
            "1",
        ])
        .args(["--cgroup", "pids.max"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"pids.max\""));
    let _ = std::fs::remove_dir_all(&base);
}
