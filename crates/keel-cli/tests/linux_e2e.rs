//! End to end with a real Linux guest, built by `cargo xtask guest` and
//! booted by the `keel` command.
//!
//! `cargo xtask test` (the README's test command) sets `KEEL_GUEST_*` to the
//! artifacts and `KEEL_REQUIRE_LINUX=1`; under a plain `cargo test` without
//! them these tests print `SKIPPED` with the reason.
//!
//! Linux boots in tens of seconds on hosts whose KVM emulates ring 0, so
//! the checks share boots: one full boot (bzImage, 2 vCPUs, initramfs, an
//! ext4 root on virtio-blk, a read-only second disk, virtio-rng, the kernel
//! log on hvc0) and two short ones that stop once both CPUs are up (ELF
//! vmlinux through the 64-bit entry, and through PVH), plus a DHCP boot
//! with virtio-net and vsock, and a boot with every device on virtio-pci
//! (root, network and vsock found by PCI enumeration). The boots run one at
//! a time.
//!
//! `keel-xfer` (`guest/linux/keel-xfer.c`, `KEEL_GUEST_XFER`) is the program
//! on both ends of the checked TCP and vsock transfers; it is also tested
//! here on the host over loopback, which needs no guest at all.
//!
//! The processes a test starts next to the VM (dnsmasq, `keel-xfer`
//! servers) are [`WatchedProcess`]es: one that cannot start or dies fails
//! the test at once with its stderr, never after a boot timeout. The host
//! tools these tests run (`mkfs.ext4`, `ip`, `dnsmasq`, `timeout`) are
//! listed in xtask's `deps::HOST_DEPS`, which `cargo xtask test` installs.

#[path = "http_client/mod.rs"]
mod http_client;
mod watched_process;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ONE_BOOT_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Says a part of a test was skipped, and why, on the real stderr: libtest
/// captures `println!`, and a skip must never look like a silent pass.
fn report_skip(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
}

struct Guest {
    vmlinux: PathBuf,
    bzimage: PathBuf,
    initramfs: PathBuf,
}

/// The artifacts, or `None` after printing why the test is skipped.
fn guest() -> Option<Guest> {
    let var = |name: &str| std::env::var_os(name).map(PathBuf::from).filter(|p| p.is_file());
    match (
        var("KEEL_GUEST_VMLINUX"),
        var("KEEL_GUEST_BZIMAGE"),
        var("KEEL_GUEST_INITRAMFS"),
    ) {
        (Some(vmlinux), Some(bzimage), Some(initramfs)) => Some(Guest {
            vmlinux,
            bzimage,
            initramfs,
        }),
        _ => {
            let why =
                "no Linux guest artifacts (KEEL_GUEST_VMLINUX/BZIMAGE/INITRAMFS); run `cargo xtask test`";
            if std::env::var_os("KEEL_REQUIRE_LINUX").is_some() {
                panic!("KEEL_REQUIRE_LINUX is set but there are {why}");
            }
            report_skip(why);
            None
        }
    }
}

/// The host copy of `keel-xfer` (`cargo xtask guest`'s `xfer=`), or `None`
/// after printing why the test (or its part) is skipped.
fn xfer_binary(what: &str) -> Option<PathBuf> {
    match std::env::var_os("KEEL_GUEST_XFER")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
    {
        Some(p) => Some(p),
        None => {
            let why = format!("{what}: no keel-xfer (KEEL_GUEST_XFER); run `cargo xtask test`");
            if std::env::var_os("KEEL_REQUIRE_LINUX").is_some() {
                panic!("KEEL_REQUIRE_LINUX is set but there is {why}");
            }
            report_skip(&why);
            None
        }
    }
}

use watched_process::{Lifetime, ProcessEnd, Ready, WatchedProcess};

/// Starts `cmd` (a `keel-xfer serve ...` command line, perhaps behind
/// `ip netns exec`) and waits for its `listening on` line, so a client can
/// connect at once; its [`WatchedProcess::ready_text`] is the address.
fn xfer_server(name: &str, cmd: Command) -> WatchedProcess {
    WatchedProcess::start(
        name,
        cmd,
        Lifetime::ExitsZeroWhenDone,
        Ready::StdoutPrefix("keel-xfer: listening on "),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `keel-xfer send ADDR BYTES SEED` to completion (60 s timeout inside
/// keel-xfer itself).
fn xfer_send(xfer: &Path, addr: &str, bytes: u64, seed: u64) -> ProcessEnd {
    let out = Command::new(xfer)
        .args(["send", addr, &bytes.to_string(), &seed.to_string()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    ProcessEnd {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The numbers of a `keel-xfer: sent=N sum=HEX recv=M sum=HEX ok` line
/// found anywhere in `text` (a console line may have a prefix).
#[derive(Debug, PartialEq, Eq)]
struct XferLine {
    sent: u64,
    sent_sum: u64,
    recv: u64,
    recv_sum: u64,
    ok: bool,
}

fn xfer_line(text: &str) -> Option<XferLine> {
    let line = text.lines().find_map(|l| l.split("keel-xfer: sent=").nth(1))?;
    let mut words = line.split_whitespace();
    let sent = words.next()?.parse().ok()?;
    let mut field = |name: &str| words.next()?.strip_prefix(name).map(str::to_string);
    let sent_sum = u64::from_str_radix(&field("sum=")?, 16).ok()?;
    let recv = field("recv=")?.parse().ok()?;
    let recv_sum = u64::from_str_radix(&field("sum=")?, 16).ok()?;
    let ok = words.next() == Some("ok");
    Some(XferLine {
        sent,
        sent_sum,
        recv,
        recv_sum,
        ok,
    })
}

/// FNV-1a 64 of `stream(seed)` of `len` bytes, computed independently of
/// keel-xfer from its documented definition (xorshift64*, state
/// `seed ^ 0x9E3779B97F4A7C15` or 1, outputs little-endian).
fn xfer_stream_sum(seed: u64, len: u64) -> u64 {
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    if x == 0 {
        x = 1;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut left = len;
    while left > 0 {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let out = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        for b in &out[..left.min(8) as usize] {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        left -= left.min(8);
    }
    h
}

/// Asserts a client/server pair both matched, each side's sums are the
/// other's, and they are the sums of the documented streams.
fn assert_xfer_pair(client: &ProcessEnd, server: &ProcessEnd, bytes: u64, seed: u64, what: &str) {
    assert_eq!(client.code, Some(0), "{what}: send: {client:?}");
    assert_eq!(server.code, Some(0), "{what}: serve: {server:?}");
    let c = xfer_line(&client.stdout).unwrap_or_else(|| panic!("{what}: send printed {client:?}"));
    let s = xfer_line(&server.stdout).unwrap_or_else(|| panic!("{what}: serve printed {server:?}"));
    assert!(c.ok && s.ok, "{what}: {c:?} {s:?}");
    assert_eq!(
        (c.sent, c.recv, s.sent, s.recv),
        (bytes, bytes, bytes, bytes),
        "{what}"
    );
    assert_eq!(c.sent_sum, s.recv_sum, "{what}: client→server checksums");
    assert_eq!(c.recv_sum, s.sent_sum, "{what}: server→client checksums");
    assert_eq!(c.sent_sum, xfer_stream_sum(seed, bytes), "{what}: stream(SEED)");
    assert_eq!(
        s.sent_sum,
        xfer_stream_sum(seed.wrapping_add(1), bytes),
        "{what}: stream(SEED+1)"
    );
    println!("{what}: send: {}", client.stdout.trim_end());
    println!("{what}: serve: {}", server.stdout.trim_end());
}

#[test]
fn keel_xfer_checks_both_directions_over_loopback() {
    let Some(xfer) = xfer_binary("keel-xfer loopback test") else {
        return;
    };
    let dir = scratch_dir("xfer");
    let serve = |addr: &str, bytes: u64, seed: u64| {
        let mut cmd = Command::new(&xfer);
        cmd.args(["serve", addr, &bytes.to_string(), &seed.to_string()]);
        xfer_server(&format!("keel-xfer serve {addr}"), cmd)
    };
    let limit = Duration::from_secs(60);

    // TCP over loopback: port 0 makes keel-xfer pick a free port and say it.
    let bytes = 4 << 20;
    let server = serve("tcp:127.0.0.1:0", bytes, 5201);
    let addr = server.ready_text().to_string();
    assert!(
        addr.starts_with("tcp:127.0.0.1:") && !addr.ends_with(":0"),
        "{addr}"
    );
    let client = xfer_send(&xfer, &addr, bytes, 5201);
    assert_xfer_pair(&client, &server.finish(limit), bytes, 5201, "tcp");

    // A Unix socket (what Keel's vsock muxer connects to on the host).
    let sock = format!("unix:{}", dir.join("xfer.sock").display());
    let server = serve(&sock, 1 << 20, 0xfeed);
    let client = xfer_send(&xfer, &sock, 1 << 20, 0xfeed);
    assert_xfer_pair(&client, &server.finish(limit), 1 << 20, 0xfeed, "unix");
    // Zero bytes is a valid (empty) transfer.
    let server = serve(&sock, 0, 9);
    let client = xfer_send(&xfer, &sock, 0, 9);
    assert_xfer_pair(&client, &server.finish(limit), 0, 9, "unix, empty");

    // The server expects another seed: both ends see a mismatch at byte 0
    // (the client gets stream(7 + 1), not stream(5 + 1)).
    let server = serve(&sock, 1000, 7);
    let client = xfer_send(&xfer, &sock, 1000, 5);
    let server = server.finish(limit);
    assert_eq!(server.code, Some(1), "{server:?}");
    assert_has(&server.stdout, "MISMATCH at byte 0", "server, wrong seed");
    assert_ne!(client.code, Some(0), "{client:?}");
    assert_has(&client.stdout, "MISMATCH at byte 0", "client, wrong seed");

    // The server expects one byte more: it sees the stream end early, and
    // the client gets one byte too many back.
    let server = serve(&sock, 1001, 5);
    let client = xfer_send(&xfer, &sock, 1000, 5);
    let server = server.finish(limit);
    assert_eq!(server.code, Some(1), "{server:?}");
    assert_has(
        &server.stdout,
        "MISMATCH at byte 1000 (stream ended early",
        "server, short",
    );
    assert_ne!(client.code, Some(0), "{client:?}");
    assert_has(
        &client.stdout,
        "MISMATCH at byte 1000 (more data than expected",
        "client, long",
    );

    // Failures are one line naming the address or the bad value.
    let gone = format!("unix:{}", dir.join("nobody.sock").display());
    let client = xfer_send(&xfer, &gone, 10, 1);
    assert_eq!(client.code, Some(1), "{client:?}");
    assert_eq!(client.stderr.lines().count(), 1, "{client:?}");
    assert_has(
        &client.stderr,
        &format!("keel-xfer: error: connect {gone}: "),
        "no server",
    );
    let out = Command::new(&xfer)
        .args(["send", "tcp:127.0.0.1:99999", "10", "1"])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert_has(
        &String::from_utf8_lossy(&out.stderr),
        "bad address 'tcp:127.0.0.1:99999': port",
        "bad port",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keel-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Unpacks a `newc` cpio archive (the initramfs) into `dir`.
fn unpack_cpio(archive: &[u8], dir: &Path) {
    let hex = |b: &[u8]| u64::from_str_radix(std::str::from_utf8(b).unwrap(), 16).unwrap();
    let align4 = |n: usize| (n + 3) & !3;
    let mut at = 0;
    while at + 110 <= archive.len() {
        let h = &archive[at..at + 110];
        assert_eq!(&h[..6], b"070701", "newc magic at {at}");
        let mode = hex(&h[14..22]) as u32;
        let size = hex(&h[54..62]) as usize;
        let name_len = hex(&h[94..102]) as usize;
        let name = std::str::from_utf8(&archive[at + 110..at + 110 + name_len - 1])
            .unwrap()
            .to_string();
        let data_at = align4(at + 110 + name_len);
        let data = &archive[data_at..data_at + size];
        at = align4(data_at + size);
        if name == "TRAILER!!!" {
            break;
        }
        let path = dir.join(name.trim_start_matches("./"));
        match mode & 0o170000 {
            0o040000 => std::fs::create_dir_all(&path).unwrap(),
            0o100000 => {
                std::fs::write(&path, data).unwrap();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode & 0o7777)).unwrap();
            }
            0o120000 => std::os::unix::fs::symlink(std::str::from_utf8(data).unwrap(), &path).unwrap(),
            // Device nodes: devtmpfs provides them in the guest.
            _ => {}
        }
    }
}

/// `s_mnt_count` of an ext4 image's superblock.
fn ext4_mount_count(image: &Path) -> u16 {
    let bytes = std::fs::read(image).unwrap();
    assert_eq!(
        u16::from_le_bytes([bytes[1024 + 0x38], bytes[1024 + 0x39]]),
        0xef53,
        "ext4 magic"
    );
    u16::from_le_bytes([bytes[1024 + 0x34], bytes[1024 + 0x35]])
}

/// An ext4 image holding the initramfs's files, so `init=/init` runs from it.
fn make_root_image(guest: &Guest, dir: &Path) -> PathBuf {
    let tree = dir.join("rootfs");
    std::fs::create_dir_all(&tree).unwrap();
    unpack_cpio(&std::fs::read(&guest.initramfs).unwrap(), &tree);
    for d in ["dev", "proc", "sys"] {
        std::fs::create_dir_all(tree.join(d)).unwrap();
    }
    let image = dir.join("root.img");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&image)
        .arg("64M")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run mkfs.ext4 (package e2fsprogs, which `cargo xtask test` installs): {e}")
        });
    assert!(
        out.status.success(),
        "mkfs.ext4 -d {} failed ({}): {}",
        tree.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim_end()
    );
    image
}

struct Boot {
    serial: String,
    stderr: String,
    exit_code: Option<i32>,
    elapsed: Duration,
}

/// Runs `keel` with `args`; stops it once the serial console shows
/// `stop_at` (if given). Fails the test if it takes longer than `limit`.
fn boot(args: &[&str], serial_log: &Path, stop_at: Option<&str>, limit: Duration) -> Boot {
    let mut keel = Command::new(env!("CARGO_BIN_EXE_keel"));
    keel.args(args);
    run_vm(keel, serial_log, stop_at, limit, &mut []).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `vm` (a `keel` command line, perhaps behind `ip netns exec`) with
/// its serial console in `serial_log` until it exits, the console shows
/// `stop_at`, or `limit` passes (an `Err`). Every poll also checks the
/// `helpers` the VM depends on: one that has died ends the run at once
/// with an `Err` carrying its stderr — the guest would only time out.
fn run_vm(
    mut vm: Command,
    serial_log: &Path,
    stop_at: Option<&str>,
    limit: Duration,
    helpers: &mut [&mut WatchedProcess],
) -> Result<Boot, String> {
    let start = Instant::now();
    let mut child = vm
        .arg("--serial")
        .arg(format!("file:{}", serial_log.display()))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {vm:?}: {e}"))?;
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let stop = |child: &mut std::process::Child| {
        let _ = child.kill();
        let _ = child.wait();
    };
    let exit_code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        let serial = std::fs::read_to_string(serial_log).unwrap_or_default();
        if stop_at.is_some_and(|marker| serial.contains(marker)) {
            stop(&mut child);
            break None;
        }
        for helper in helpers.iter_mut() {
            if let Err(e) = helper.check() {
                stop(&mut child);
                return Err(format!(
                    "{e}\n--- the VM was stopped after {:.1} s; its console so far ---\n{serial}",
                    start.elapsed().as_secs_f64()
                ));
            }
        }
        if start.elapsed() > limit {
            stop(&mut child);
            return Err(format!(
                "Linux boot did not finish within {limit:?}; console so far:\n{serial}"
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    Ok(Boot {
        serial: std::fs::read_to_string(serial_log).unwrap_or_default(),
        stderr: reader.join().unwrap(),
        exit_code,
        elapsed: start.elapsed(),
    })
}

#[test]
fn a_helper_that_dies_while_the_vm_runs_stops_the_run_at_once_with_its_stderr() {
    // No guest needed: `sleep` stands in for a VM that would boot for
    // minutes, the helper for a DHCP server that loses its interface.
    let dir = scratch_dir("helper-dies");
    let mut dhcp = WatchedProcess::start(
        "dnsmasq",
        {
            let mut c = Command::new("sh");
            c.args([
                "-c",
                "echo 'dnsmasq-dhcp: DHCP, IP range 10.0.2.10 -- 10.0.2.20' >&2; sleep 1; \
                 echo 'dnsmasq: failed to access keeltap0: No such device' >&2; exit 5",
            ]);
            c
        },
        Lifetime::UntilStopped,
        Ready::StderrContains("DHCP, IP range"),
        Duration::from_secs(30),
    )
    .unwrap();
    // (`run_vm` appends `--serial file:…`: the shell takes it as `$1`.)
    let mut vm = Command::new("sh");
    vm.args(["-c", "exec sleep 600", "sh"]);
    let start = Instant::now();
    let err = run_vm(
        vm,
        &dir.join("serial.log"),
        None,
        Duration::from_secs(600),
        &mut [&mut dhcp],
    )
    .err()
    .expect("the helper died");
    assert!(start.elapsed() < Duration::from_secs(30), "{:?}", start.elapsed());
    assert_has(
        &err,
        "dnsmasq exited (exit status: 5) while the test still needed it",
        "why",
    );
    assert_has(
        &err,
        "failed to access keeltap0: No such device",
        "the helper's stderr",
    );
    assert_has(&err, "the VM was stopped after", "the VM's fate");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_helper_that_finishes_its_job_lets_the_vm_run_on() {
    let dir = scratch_dir("helper-done");
    let mut server = WatchedProcess::start(
        "keel-xfer serve",
        {
            let mut c = Command::new("sh");
            c.args(["-c", "echo 'keel-xfer: listening on unix:/x'; exit 0"]);
            c
        },
        Lifetime::ExitsZeroWhenDone,
        Ready::StdoutPrefix("keel-xfer: listening on "),
        Duration::from_secs(30),
    )
    .unwrap();
    let mut vm = Command::new("sh");
    vm.args(["-c", "sleep 1; echo 'guest done' >&2; exit 0", "sh"]);
    let b = run_vm(
        vm,
        &dir.join("serial.log"),
        None,
        Duration::from_secs(60),
        &mut [&mut server],
    )
    .unwrap();
    assert_eq!(b.exit_code, Some(0));
    assert_eq!(b.stderr, "guest done\n");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Checks the kernel's `rtc_cmos …: setting system clock to … (EPOCH)`
/// line against the host's clock: the guest's time at boot must be the
/// host's within two seconds. The host's time then is when the VM started
/// plus the printk timestamp of the line (the guest's uptime, which
/// kvm-clock keeps in step with the host).
fn assert_rtc_matches_host(serial: &str, host_start: std::time::SystemTime) {
    let line = serial
        .lines()
        .find(|l| l.contains("rtc_cmos") && l.contains("setting system clock to"))
        .unwrap_or_else(|| panic!("no `rtc_cmos … setting system clock` line in:\n{serial}"));
    let epoch: i64 = line
        .rsplit('(')
        .next()
        .and_then(|t| t.trim_end_matches(')').trim().parse().ok())
        .unwrap_or_else(|| panic!("no epoch in {line:?}"));
    let uptime: f64 = line
        .split(']')
        .next()
        .and_then(|t| t.trim_start_matches('[').trim().parse().ok())
        .unwrap_or_else(|| panic!("no printk timestamp in {line:?}"));
    let secs = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    // The guest's printk clock never runs ahead of real time (under
    // emulation it lags: the time before kvm-clock counts little), so the
    // line was printed no earlier than `start + uptime` and no later than
    // now. The RTC has whole seconds: allow its truncation and 2 s more.
    let earliest = secs(host_start) + uptime;
    let latest = secs(std::time::SystemTime::now());
    let epoch = epoch as f64;
    println!("guest clock at boot: {line} (host window {earliest:.1}..{latest:.1})");
    assert!(
        epoch >= earliest - 3.0 && epoch <= latest + 3.0,
        "the guest's clock {epoch} is outside the host's {earliest:.1}..{latest:.1}: {line}"
    );
}

fn assert_has(text: &str, needle: &str, what: &str) {
    assert!(text.contains(needle), "{what}: no {needle:?} in:\n{text}");
}

/// `rodata=off` skips write-protecting kernel data, seconds of emulated
/// page-table work on hosts whose KVM emulates ring 0.
const SERIAL_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 rodata=off";

#[test]
fn linux_full_boot_two_cpus_root_on_virtio_blk() {
    let Some(guest) = guest() else { return };
    let _one = ONE_BOOT_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch_dir("full");
    let root = make_root_image(&guest, &dir);
    let ro = dir.join("ro.img");
    let ro_content: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
    std::fs::write(&ro, &ro_content).unwrap();
    let hvc = dir.join("hvc.log");
    let mounts_before = ext4_mount_count(&root);
    let host_start = std::time::SystemTime::now();

    let cmdline = format!(
        "{SERIAL_CMDLINE} console=hvc0 root=/dev/vda rw rootfstype=ext4 rdinit=/keel-no-rdinit init=/init \
         keel.test=all keel.cpus=2"
    );
    let root_arg = format!("{},id=keel-root", root.display());
    let ro_arg = format!("{},ro", ro.display());
    let hvc_arg = format!("file:{}", hvc.display());
    let b = boot(
        &[
            "--kernel",
            guest.bzimage.to_str().unwrap(),
            "--initrd",
            guest.initramfs.to_str().unwrap(),
            "--cpus",
            "2",
            "--memory",
            "256M",
            "--transport",
            "mmio",
            "--disk",
            &root_arg,
            "--disk",
            &ro_arg,
            "--rng",
            "--console",
            &hvc_arg,
            "--cmdline",
            &cmdline,
        ],
        &dir.join("serial.log"),
        None,
        Duration::from_secs(900),
    );
    let s = &b.serial;
    println!("full boot ended after {:.1} s", b.elapsed.as_secs_f64());
    // What the kernel does by itself.
    assert_has(s, "Linux version 6.1", "version line");
    assert_has(
        s,
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "e820 low RAM",
    );
    assert_has(
        s,
        "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
        "e820 legacy hole",
    );
    assert_has(
        s,
        "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable",
        "e820 RAM to 256 MiB",
    );
    assert_has(s, "smp: Brought up 1 node, 2 CPUs", "SMP");
    // The machine through ACPI: the CPUs from the MADT, the devices from
    // the DSDT (no virtio_mmio.device= on the command line), the tables
    // accepted without firmware bugs.
    assert_has(s, "ACPI: RSDP 0x00000000000E0000", "the RSDP where Keel put it");
    assert_has(
        s,
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        "CPUs from the MADT",
    );
    assert!(
        !s.contains("virtio_mmio.device="),
        "command-line devices with ACPI:\n{s}"
    );
    // (Linux's "[Firmware Bug]: TSC doesn't count with P0 frequency!" is
    // about the host's AMD CPU model seen through CPUID, not the tables.)
    let complaints: Vec<&str> = s
        .lines()
        .filter(|l| {
            l.contains("ACPI Error")
                || l.contains("ACPI BIOS Error")
                || l.contains("ACPI Warning")
                || (l.contains("[Firmware Bug]") && (l.contains("ACPI") || l.contains("table")))
        })
        .collect();
    assert!(
        complaints.is_empty(),
        "the guest complains about the tables: {complaints:?}\n{s}"
    );
    assert_rtc_matches_host(s, host_start);
    let total_kib: u64 = s
        .lines()
        .find_map(|l| l.split("Memory: ").nth(1))
        .and_then(|m| m.split('/').nth(1))
        .and_then(|t| t.split('K').next())
        .and_then(|n| n.parse().ok())
        .expect("a Memory: line");
    assert!(
        (250_000..=262_144).contains(&total_kib),
        "memory {total_kib} KiB for a 256 MiB guest"
    );
    assert_has(s, "Unpacking initramfs", "initramfs");
    assert_has(s, "Freeing initrd memory", "initramfs unpacked");
    // virtio: the root file system, the read-only disk, hvc0, the rng.
    assert_has(s, "[vda] 131072 512-byte logical blocks", "root disk size");
    assert_has(s, "[vdb] 16384 512-byte logical blocks", "read-only disk size");
    assert_has(s, "EXT4-fs (vda): mounted filesystem", "root mounted");
    assert_has(s, "VFS: Mounted root (ext4 filesystem)", "root mounted");
    assert_has(s, "Run /init as init process", "init started");
    assert!(
        ext4_mount_count(&root) > mounts_before,
        "the kernel's rw mount updates the superblock on the host"
    );
    assert!(
        std::fs::read(&ro).unwrap() == ro_content,
        "read-only disk image changed"
    );
    let ro_driver = b
        .stderr
        .lines()
        .find(|l| l.contains("driver ready for device type 2") && l.contains("0xd0002000"))
        .expect("the read-only disk's driver came up");
    let features = u64::from_str_radix(
        ro_driver
            .rsplit("features 0x")
            .next()
            .unwrap()
            .trim_end_matches(')'),
        16,
    )
    .unwrap();
    assert_ne!(
        features & (1 << 5),
        0,
        "Linux accepted VIRTIO_BLK_F_RO: {ro_driver}"
    );
    assert_has(
        &b.stderr,
        "virtio-rng: served the guest's first",
        "hwrng read virtio-rng",
    );
    let hvc_log = std::fs::read_to_string(&hvc).unwrap_or_default();
    assert_has(
        &hvc_log,
        "EXT4-fs (vda): mounted filesystem",
        "kernel log on hvc0",
    );
    assert_has(&b.stderr, "reached `Run /init`", "Run /init timing");

    // How the VM ended, and user space where the host allows it.
    assert_eq!(b.exit_code, Some(0), "stderr:\n{}", b.stderr);
    assert_has(&b.stderr, "VM ended: guest reset", "exit reason");
    if b.stderr
        .contains("guest user space cannot make system calls here")
    {
        assert_has(
            s,
            "Kernel panic - not syncing: Attempted to kill init",
            "init's first system call",
        );
        report_skip(
            "user-space checks (shell echo, nproc, reboot): this host's KVM emulates guest ring 0 \
             and guest user space cannot make system calls here",
        );
    } else {
        assert_has(s, "KEEL-INIT: userspace up", "user space");
        assert_has(s, "KEEL-TEST: nproc ok nproc=2", "nproc");
        assert_has(s, "KEEL-TEST: done", "tests finished");
        assert_has(s, "failed=0", "no user-space test failed");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn short_boot(name: &str, kernel: &Path, protocol: &str) {
    let _one = ONE_BOOT_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch_dir(name);
    let b = boot(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--boot-protocol",
            protocol,
            "--cpus",
            "2",
            "--memory",
            "128M",
            "--cmdline",
            SERIAL_CMDLINE,
        ],
        &dir.join("serial.log"),
        Some("smp: Brought up 1 node, 2 CPUs"),
        Duration::from_secs(600),
    );
    println!("{name}: both CPUs up after {:.1} s", b.elapsed.as_secs_f64());
    assert_has(&b.serial, "Linux version 6.1", name);
    assert_has(
        &b.serial,
        "BIOS-e820: [mem 0x0000000000100000-0x0000000007ffffff] usable",
        name,
    );
    assert_has(&b.serial, "smp: Brought up 1 node, 2 CPUs", name);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn linux_vmlinux_boots_through_the_64_bit_entry() {
    let Some(guest) = guest() else { return };
    short_boot("vmlinux-64", &guest.vmlinux, "linux64");
}

#[test]
fn linux_vmlinux_boots_through_pvh() {
    let Some(guest) = guest() else { return };
    short_boot("vmlinux-pvh", &guest.vmlinux, "pvh");
}

#[test]
fn linux_kernel_that_is_garbage_is_one_clear_error() {
    let dir = scratch_dir("garbage");
    let junk = dir.join("vmlinux");
    std::fs::write(&junk, b"\x7fELF but not really").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("--kernel")
        .arg(&junk)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_has(&err, "cannot load ELF kernel", "truncated ELF");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A network namespace of the test's own, with a tap and a DHCP server in
/// it; removed (server and all) on drop. No traffic leaves it.
struct DhcpNetns {
    name: String,
    /// Watched while the VM boots: `None` only while it is being set up.
    dnsmasq: Option<WatchedProcess>,
}

impl DhcpNetns {
    const TAP: &'static str = "keeltap0";
    const HOST_ADDR: &'static str = "10.0.2.1";

    fn new() -> DhcpNetns {
        let name = format!("keel-e2e-{}", std::process::id());
        let ip = |args: &[&str]| {
            let out = Command::new("ip")
                .args(args)
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| {
                    panic!("cannot run iproute2's `ip` (`cargo xtask test` installs it): {e}")
                });
            assert!(
                out.status.success(),
                "ip {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim_end()
            );
        };
        ip(&["netns", "add", &name]);
        // From here on, drop cleans up.
        let mut netns = DhcpNetns { name, dnsmasq: None };
        let in_ns = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &netns.name, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        in_ns(&["tuntap", "add", "dev", Self::TAP, "mode", "tap"]);
        in_ns(&[
            "addr",
            "add",
            &format!("{}/24", Self::HOST_ADDR),
            "dev",
            Self::TAP,
        ]);
        in_ns(&["link", "set", Self::TAP, "up"]);
        // In the foreground, logging to stderr, where the watcher reads
        // that the DHCP range is set up (or why it is not).
        let mut dnsmasq = Command::new("ip");
        dnsmasq
            .args(["netns", "exec", &netns.name, "dnsmasq"])
            .args(["--no-daemon", "--log-facility=-", "--conf-file=/dev/null"])
            .args([
                "--interface",
                Self::TAP,
                "--bind-interfaces",
                "--except-interface=lo",
                "--port=0",
            ])
            .args([
                "--dhcp-range=10.0.2.10,10.0.2.20,1h",
                "--dhcp-leasefile=/dev/null",
            ]);
        netns.dnsmasq = Some(
            WatchedProcess::start(
                "dnsmasq (the DHCP server; Debian package dnsmasq-base, which `cargo xtask test` installs)",
                dnsmasq,
                Lifetime::UntilStopped,
                Ready::StderrContains("DHCP, IP range"),
                Duration::from_secs(30),
            )
            .unwrap_or_else(|e| panic!("{e}")),
        );
        netns
    }
}

impl Drop for DhcpNetns {
    fn drop(&mut self) {
        // Kills and reaps dnsmasq.
        drop(self.dnsmasq.take());
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// The guest's `tcp` check: `keel-xfer send tcp:<bootserver>:5201 4194304
/// 5201` (see guest/linux/init).
const TCP_XFER: (u16, u64, u64) = (5201, 4 << 20, 5201);
/// The guest's `vsockrt` check: `keel-xfer send vsock:2:5202 1048576 5202`.
const VSOCK_XFER: (u32, u64, u64) = (5202, 1 << 20, 5202);

#[test]
fn linux_gets_an_address_by_dhcp_over_virtio_net() {
    let Some(guest) = guest() else { return };
    let _one = ONE_BOOT_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch_dir("dhcp");
    let mut netns = DhcpNetns::new();
    let serial = dir.join("serial.log");
    let vsock_uds = dir.join("vsock.sock");
    // The peers of the guest's `tcp` and `vsockrt` checks. The TCP server
    // runs in the namespace, on the tap's address; the vsock one is a Unix
    // socket on the host, where Keel's muxer connects for guest port 5202.
    // Their timeout outlasts the boot's; they are killed when not needed.
    let mut servers = xfer_binary("TCP and vsock round trips").map(|xfer| {
        let (port, bytes, seed) = TCP_XFER;
        let mut tcp = Command::new("ip");
        tcp.args(["netns", "exec", &netns.name])
            .arg(&xfer)
            .args(["-t", "660", "serve"])
            .arg(format!("tcp:{}:{port}", DhcpNetns::HOST_ADDR))
            .args([bytes.to_string(), seed.to_string()]);
        let tcp = xfer_server("keel-xfer serve (the guest's TCP peer)", tcp);
        let (port, bytes, seed) = VSOCK_XFER;
        let mut vsock = Command::new(&xfer);
        vsock
            .args(["-t", "660", "serve"])
            .arg(format!("unix:{}_{port}", vsock_uds.display()))
            .args([bytes.to_string(), seed.to_string()]);
        (
            tcp,
            xfer_server("keel-xfer serve (the guest's vsock peer)", vsock),
        )
    });
    // `keel` itself runs inside the namespace, so the tap it opens is the
    // test's tap and nothing it sends can leave. While it boots, the DHCP
    // server and the transfer servers are watched: one that dies ends the
    // test at once with its stderr.
    let mut keel = Command::new("ip");
    keel.args(["netns", "exec", &netns.name])
        .arg(env!("CARGO_BIN_EXE_keel"))
        .args(["--kernel", guest.bzimage.to_str().unwrap(), "--memory", "128M"])
        .args(["--transport", "mmio"])
        .args(["--initrd", guest.initramfs.to_str().unwrap()])
        .args(["--net", &format!("tap={},mac=02:4b:45:45:4c:01", DhcpNetns::TAP)])
        .args(["--vsock", &format!("cid=3,uds={}", vsock_uds.display())])
        .args([
            "--cmdline",
            &format!("{SERIAL_CMDLINE} ip=dhcp keel.test=net,tcp,vsockrt"),
        ]);
    let mut watched: Vec<&mut WatchedProcess> = netns.dnsmasq.iter_mut().collect();
    if let Some((tcp, vsock)) = servers.as_mut() {
        watched.push(tcp);
        watched.push(vsock);
    }
    let b =
        run_vm(keel, &serial, None, Duration::from_secs(600), &mut watched).unwrap_or_else(|e| panic!("{e}"));
    drop(watched);
    let console = b.serial.as_str();
    println!("dhcp boot ended after {:.1} s", b.elapsed.as_secs_f64());
    assert_has(console, "IP-Config: Complete", "kernel IP autoconfiguration");
    assert_has(
        console,
        &format!("IP-Config: Got DHCP answer from {}", DhcpNetns::HOST_ADDR),
        "DHCP server",
    );
    assert_has(console, "hwaddr=02:4b:45:45:4c:01", "the configured MAC");
    assert_has(console, "ipaddr=10.0.2.", "an address from the namespace's range");
    assert_eq!(b.exit_code, Some(0), "{}", b.stderr);
    let stderr = b.stderr.as_str();
    // The kernel's own part of the vsock path: its virtio-vsock driver
    // took the device (type 19) the round trip below goes through.
    assert_has(
        stderr,
        "driver ready for device type 19",
        "virtio-vsock driver (keel's stderr)",
    );
    if stderr.contains("guest user space cannot make system calls here") {
        // Nobody will connect: stop the servers (dropping them kills them).
        drop(servers);
        report_skip(
            "user-space network checks (init pings the DHCP server; a 4 MiB TCP round trip \
             and a 1 MiB vsock round trip with keel-xfer, checksums checked both ways): this \
             host's KVM emulates guest ring 0 and guest user space cannot make system calls here",
        );
    } else {
        assert_has(console, "KEEL-TEST: ping ok", "ping from user space");
        if let Some((tcp, vsock)) = servers {
            // The guest ran its checks before rebooting: the servers are
            // done or about to be.
            let limit = Duration::from_secs(30);
            for (name, server, (bytes, seed)) in [
                ("tcp", tcp.finish(limit), (TCP_XFER.1, TCP_XFER.2)),
                ("vsockrt", vsock.finish(limit), (VSOCK_XFER.1, VSOCK_XFER.2)),
            ] {
                let Some(guest_line) = console
                    .lines()
                    .find(|l| l.contains(&format!("KEEL-TEST: {name} ok")))
                else {
                    panic!("no `KEEL-TEST: {name} ok` (its server: {server:?}) in:\n{console}");
                };
                let guest_end = ProcessEnd {
                    code: Some(0),
                    stdout: guest_line.to_string(),
                    stderr: String::new(),
                };
                assert_xfer_pair(&guest_end, &server, bytes, seed, name);
            }
        }
    }
    drop(netns);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A second boot with every device on PCI (`--transport pci`): Linux finds
/// the host bridge in the DSDT and its configuration window in the MCFG,
/// enumerates the bus, binds virtio-pci with MSI-X
/// to the root disk, the network card and the vsock device, mounts the root
/// and gets an address by DHCP before `Run /init`.
#[test]
fn linux_finds_root_network_and_vsock_through_pci() {
    let Some(guest) = guest() else { return };
    // The driver registers as "virtio-pci"; a kernel built without
    // CONFIG_VIRTIO_PCI has no such string (its vmlinux is uncompressed).
    let vmlinux = std::fs::read(&guest.vmlinux).unwrap();
    if !vmlinux.windows(10).any(|w| w == b"virtio-pci") {
        report_skip(
            "the Linux boot over virtio-pci: the guest kernel has no virtio-pci driver \
             (guest/linux/keel.config needs PCI, PCI_MSI and VIRTIO_PCI)",
        );
        return;
    }
    let _one = ONE_BOOT_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch_dir("pci");
    let root = make_root_image(&guest, &dir);
    let mut netns = DhcpNetns::new();
    let serial = dir.join("serial.log");
    let vsock_uds = dir.join("vsock.sock");
    // `keel` runs inside the namespace (its tap is the test's); the DHCP
    // server is watched while it boots.
    let mut keel = Command::new("ip");
    keel.args(["netns", "exec", &netns.name])
        .arg(env!("CARGO_BIN_EXE_keel"))
        .args(["--kernel", guest.bzimage.to_str().unwrap(), "--memory", "256M"])
        .args(["--transport", "pci"])
        .args(["--disk", &format!("{},id=keel-root", root.display())])
        .args(["--net", &format!("tap={},mac=02:4b:45:45:4c:01", DhcpNetns::TAP)])
        .args(["--vsock", &format!("cid=3,uds={}", vsock_uds.display())])
        .args([
            "--cmdline",
            &format!(
                "{SERIAL_CMDLINE} root=/dev/vda rw rootfstype=ext4 rdinit=/keel-no-rdinit init=/init ip=dhcp"
            ),
        ]);
    let mut watched: Vec<&mut WatchedProcess> = netns.dnsmasq.iter_mut().collect();
    let b =
        run_vm(keel, &serial, None, Duration::from_secs(900), &mut watched).unwrap_or_else(|e| panic!("{e}"));
    drop(watched);
    let s = b.serial.as_str();
    let stderr = b.stderr.as_str();
    println!("PCI boot ended after {:.1} s", b.elapsed.as_secs_f64());
    if let Some(line) = stderr.lines().find(|l| l.contains("reached `Run /init`")) {
        println!("{line}");
    }
    assert!(!s.contains("virtio_mmio"), "a virtio-mmio device in:\n{s}");
    assert_has(s, "ACPI: PCI Root Bridge [PCI0]", "the host bridge from the DSDT");
    assert_has(
        s,
        "pci 0000:00:00.0: [1b36:0008] type 00 class 0x060000",
        "host bridge",
    );
    for (function, what) in [("01", "root disk"), ("02", "network card"), ("03", "vsock")] {
        assert_has(s, &format!("pci 0000:00:{function}.0: [1af4:"), what);
    }
    assert_has(
        s,
        "[vda] 131072 512-byte logical blocks",
        "root disk on virtio-pci",
    );
    assert_has(s, "EXT4-fs (vda): mounted filesystem", "root mounted");
    assert_has(s, "IP-Config: Complete", "DHCP over virtio-pci");
    assert_has(s, "hwaddr=02:4b:45:45:4c:01", "the configured MAC");
    assert_has(s, "Run /init as init process", "init started");
    for device_type in [1, 2, 19] {
        assert_has(
            stderr,
            &format!("virtio-pci: driver ready for device type {device_type} "),
            "Linux's virtio-pci driver (keel's stderr)",
        );
    }
    assert_has(stderr, "reached `Run /init`", "Run /init timing");
    assert_eq!(b.exit_code, Some(0), "{stderr}");
    drop(netns);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A Linux VM configured, started, paused and resumed over Firecracker's
/// API by an HTTP client crate, as an orchestrator drives it: it boots
/// through to `Run /init`, and the process ends with the VM.
#[test]
fn linux_boots_when_driven_over_the_api() {
    let Some(guest) = guest() else { return };
    let _one = ONE_BOOT_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch_dir("api");
    let sock = dir.join("api.sock");
    let serial = dir.join("serial.log");
    let mut keel = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("--api-sock")
        .arg(&sock)
        .arg("--serial")
        .arg(format!("file:{}", serial.display()))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "no API socket");
        std::thread::sleep(Duration::from_millis(5));
    }
    let call = |method: &str, path: &str, body: &str| {
        let (status, text) = http_client::request(&sock, method, path, Some(body));
        assert!(status < 300, "{method} {path} {body}: {status} {text}");
        text
    };
    call(
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 256}"#,
    );
    call(
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path": "{}", "initrd_path": "{}", "boot_args": "{SERIAL_CMDLINE}"}}"#,
            guest.vmlinux.display(),
            guest.initramfs.display()
        ),
    );
    call("PUT", "/entropy", "{}");
    // Linux's balloon driver inflates in a kernel thread as soon as it
    // probes a device with a target: no user space needed.
    call(
        "PUT",
        "/balloon",
        r#"{"amount_mib": 4, "deflate_on_oom": false, "stats_polling_interval_s": 1}"#,
    );
    let started = Instant::now();
    call("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    let read = || std::fs::read_to_string(&serial).unwrap_or_default();
    let wait_for = |needle: &str, limit: Duration| {
        while !read().contains(needle) {
            assert!(started.elapsed() < limit, "no {needle:?} in:\n{}", read());
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_for("smp: Brought up 1 node, 2 CPUs", Duration::from_secs(600));
    // Paused, the kernel prints nothing; resumed, it goes on.
    call("PATCH", "/vm", r#"{"state": "Paused"}"#);
    let (_, info) = http_client::request(&sock, "GET", "/", None);
    assert!(info.contains(r#""state":"Paused""#), "{info}");
    let at_pause = read().len();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(read().len(), at_pause, "the guest printed while paused");
    call("PATCH", "/vm", r#"{"state": "Resumed"}"#);
    // The kernel's balloon driver gives its first pages (in chunks of 256)
    // while the kernel is still booting.
    let inflated = loop {
        let (status, text) = http_client::request(&sock, "GET", "/balloon/statistics", None);
        let actual = (status == 200)
            .then(|| serde_json::from_str::<serde_json::Value>(&text).ok())
            .flatten()
            .and_then(|v| v["actual_pages"].as_u64())
            .unwrap_or(0);
        if actual >= 256 {
            break actual;
        }
        assert!(
            started.elapsed() < Duration::from_secs(900) && !read().contains("Kernel panic"),
            "Linux's balloon driver gave no pages ({status} {text}):\n{}",
            read()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    println!(
        "linux over the API: the kernel's balloon driver gave {inflated} pages after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    wait_for("Run /init as init process", Duration::from_secs(900));
    println!(
        "linux over the API: Run /init after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let text = read();
    // The devices are virtio-mmio as Firecracker's, found through ACPI.
    assert!(!text.contains("virtio_mmio.device="), "{text}");
    assert_has(&text, "ACPI: Using ACPI (MADT)", "CPUs from the MADT");
    // init dies (no system calls here) or runs: either way the VM ends,
    // and so does the process.
    let deadline = Instant::now() + Duration::from_secs(600);
    let status = loop {
        if let Some(status) = keel.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "keel did not exit with its VM");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "keel exited {status}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Debian's stock cloud kernel, unmodified from its package, on Keel's
/// ACPI platform: both CPUs from the MADT, the tables accepted, the RTC
/// found through PnP, to `Run /init` (its drivers are modules, so past
/// that it needs guest user space). Only with `cargo xtask test
/// --stock-kernel`, which fetches the kernel: where guest ring 0 is
/// emulated the boot takes tens of minutes.
#[test]
fn debians_stock_cloud_kernel_boots_to_run_init() {
    let Some(stock) = std::env::var_os("KEEL_STOCK_VMLINUX").map(PathBuf::from) else {
        println!(
            "SKIPPED: Debian's stock kernel: run `cargo xtask test --stock-kernel` to fetch and boot it"
        );
        return;
    };
    let Some(guest) = guest() else { return };
    let _one = ONE_BOOT_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch_dir("stock");
    let cmdline = format!("{SERIAL_CMDLINE} cryptomgr.notests");
    let b = boot(
        &[
            "--kernel",
            stock.to_str().unwrap(),
            "--initrd",
            guest.initramfs.to_str().unwrap(),
            "--cpus",
            "2",
            "--memory",
            "512M",
            "--cmdline",
            &cmdline,
        ],
        &dir.join("serial.log"),
        Some("Run /init as init process"),
        Duration::from_secs(3600),
    );
    println!("stock kernel: Run /init after {:.1} s", b.elapsed.as_secs_f64());
    let s = &b.serial;
    assert_has(s, "Linux version 6.1", "the stock kernel");
    assert_has(s, "ACPI: Using ACPI (MADT)", "CPUs from the MADT");
    assert_has(s, "smp: Brought up 1 node, 2 CPUs", "both CPUs");
    assert_has(s, "rtc_cmos 00:01: setting system clock", "the RTC through PnP");
    assert_has(s, "Run /init as init process", "init");
    let complaints: Vec<&str> = s
        .lines()
        .filter(|l| {
            l.contains("ACPI Error")
                || l.contains("ACPI BIOS Error")
                || l.contains("ACPI Warning")
                || (l.contains("[Firmware Bug]") && (l.contains("ACPI") || l.contains("table")))
        })
        .collect();
    assert!(complaints.is_empty(), "ACPI complaints: {complaints:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `keel --api-sock` process with its serial console in a file.
fn api_keel(dir: &Path, name: &str) -> (std::process::Child, PathBuf, PathBuf) {
    let sock = dir.join(format!("{name}.sock"));
    let serial = dir.join(format!("{name}.serial"));
    let child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .arg("--api-sock")
        .arg(&sock)
        .arg("--serial")
        .arg(format!("file:{}", serial.display()))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(Instant::now() < deadline, "no API socket");
        std::thread::sleep(Duration::from_millis(5));
    }
    (child, sock, serial)
}

#[test]
fn linux_snapshotted_after_its_devices_probed_continues_in_another_process_to_run_init() {
    let Some(guest) = guest() else { return };
    let _one = ONE_BOOT_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch_dir("snapshot");
    let root = make_root_image(&guest, &dir);
    let call = |sock: &Path, method: &str, path: &str, body: &str| {
        let (status, text) = http_client::request(sock, method, path, Some(body));
        assert!(status < 300, "{method} {path} {body}: {status} {text}");
    };
    let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();

    // Process A boots Linux with two vCPUs and its root on virtio-blk, and
    // is paused and saved once the disk has been probed.
    let (mut a, sock_a, serial_a) = api_keel(&dir, "a");
    call(
        &sock_a,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 256}"#,
    );
    call(
        &sock_a,
        "PUT",
        "/boot-source",
        &format!(
            // rootdelay: between the probe of vda and init, 3 s for the
            // test to pause it in, where a host runs guest ring 0 natively.
            r#"{{"kernel_image_path": "{}", "boot_args": "{SERIAL_CMDLINE} root=/dev/vda rw rootfstype=ext4 init=/init rootdelay=3"}}"#,
            guest.vmlinux.display()
        ),
    );
    call(
        &sock_a,
        "PUT",
        "/drives/root",
        &format!(
            r#"{{"drive_id": "root", "path_on_host": "{}", "is_root_device": true, "is_read_only": false}}"#,
            root.display()
        ),
    );
    call(&sock_a, "PUT", "/entropy", "{}");
    let started = Instant::now();
    call(&sock_a, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    while !read(&serial_a).contains("[vda]") {
        assert!(
            started.elapsed() < Duration::from_secs(900) && !read(&serial_a).contains("Kernel panic"),
            "virtio-blk never probed:\n{}",
            read(&serial_a)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let probed_after = started.elapsed();
    call(&sock_a, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    let state = dir.join("linux.state");
    let memory = dir.join("linux.mem");
    call(
        &sock_a,
        "PUT",
        "/snapshot/create",
        &format!(
            r#"{{"snapshot_type": "Full", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            state.display(),
            memory.display()
        ),
    );
    let before = read(&serial_a);
    let _ = a.kill();
    let _ = a.wait();
    assert!(
        !before.contains("Run /init"),
        "the snapshot came too late:\n{before}"
    );

    // Process B restores it and the kernel carries on to init.
    let (mut b, sock_b, serial_b) = api_keel(&dir, "b");
    let restored = Instant::now();
    call(
        &sock_b,
        "PUT",
        "/snapshot/load",
        &format!(
            r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true}}"#,
            state.display(),
            memory.display()
        ),
    );
    while !read(&serial_b).contains("Run /init as init process") {
        assert!(
            restored.elapsed() < Duration::from_secs(900)
                && !read(&serial_b).contains("Kernel panic - not syncing: VFS"),
            "the restored kernel did not reach init:\nbefore the snapshot:\n{before}\nafter:\n{}",
            read(&serial_b)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = read(&serial_b);
    let _ = b.kill();
    let _ = b.wait();
    assert!(
        after.contains("VFS: Mounted root (ext4 filesystem)"),
        "the restored kernel mounted its root:\n{after}"
    );
    println!(
        "linux snapshot: virtio-blk probed after {:.1} s; restored in another process, Run /init {:.1} s later",
        probed_after.as_secs_f64(),
        restored.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
