//! `cargo xtask guest`: fetch, configure, build and cache the Linux guest.
//!
//! The steps that touch the host (apt, make, the file system) live here; the
//! decisions they rely on are pure functions in the sibling modules.

use crate::cache::{self, Artifacts, Inputs, KernelSource};
use crate::cpio::{self, Entry};
use crate::deps::{self, Dep, Need};
use crate::fnv::Fnv1a64;
use crate::host::{self, GuestState, Host, Request, SystemHost};
use crate::{elf, kconfig, GuestOpts};
use std::fs;
use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// Debian package with the kernel sources.
pub const KERNEL_PACKAGE: &str = "linux-source-6.1";
/// Debian package with a statically linked BusyBox.
pub const BUSYBOX_PACKAGE: &str = "busybox-static";
/// Debian package whose `libc.a` is linked into the static `keel-xfer`.
pub const LIBC_PACKAGE: &str = "libc6-dev";

/// How `guest/linux/keel-xfer.c` is compiled (static: the initramfs has no
/// shared libraries; `-Werror`: a warning is a bug in a test tool).
pub const XFER_CFLAGS: &[&str] = &["-static", "-O2", "-Wall", "-Wextra", "-Werror"];

/// Progress on stderr, with the time since the start.
struct Log {
    start: Instant,
}

impl Log {
    fn say(&self, msg: impl AsRef<str>) {
        eprintln!(
            "xtask guest [{:7.1}s] {}",
            self.start.elapsed().as_secs_f64(),
            msg.as_ref()
        );
    }
}

/// The workspace root (this crate lives in `<root>/xtask`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn io<T>(what: impl FnOnce() -> String, r: std::io::Result<T>) -> Result<T, String> {
    r.map_err(|e| format!("{}: {e}", what()))
}

/// Runs `cmd`; its output goes to `log` (appended) unless `verbose`.
fn run(cmd: &mut Command, log: Option<&Path>, verbose: bool) -> Result<(), String> {
    let desc = format!("{cmd:?}");
    if let (Some(log), false) = (log, verbose) {
        let f = io(
            || format!("cannot open {}", log.display()),
            fs::OpenOptions::new().create(true).append(true).open(log),
        )?;
        let f2 = io(|| "dup log".into(), f.try_clone())?;
        cmd.stdout(Stdio::from(f)).stderr(Stdio::from(f2));
    } else if !verbose {
        cmd.stdout(Stdio::null());
    } else {
        // stdout is reserved for the name=path lines.
        cmd.stdout(Stdio::from(io(
            || "dup stderr".into(),
            std::io::stderr().as_fd().try_clone_to_owned(),
        )?));
    }
    let status = io(|| format!("cannot run {desc}"), cmd.stdin(Stdio::null()).status())?;
    if status.success() {
        return Ok(());
    }
    let mut msg = format!("command failed ({status}): {desc}");
    if let (Some(log), false) = (log, verbose) {
        let text = fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(25).collect();
        msg.push_str(&format!("\n--- last lines of {} ---\n", log.display()));
        for l in tail.into_iter().rev() {
            msg.push_str(l);
            msg.push('\n');
        }
    }
    Err(msg)
}

/// Runs `cmd` and returns its stdout.
fn output(cmd: &mut Command) -> Result<String, String> {
    let desc = format!("{cmd:?}");
    let out = io(
        || format!("cannot run {desc}"),
        cmd.stdin(Stdio::null()).stderr(Stdio::inherit()).output(),
    )?;
    if !out.status.success() {
        return Err(format!("command failed ({}): {desc}", out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The trimmed stdout of `cmd`, or `none` if it cannot run or fails.
fn version_of(cmd: &mut Command) -> String {
    cmd.stderr(Stdio::null())
        .stdin(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "none".into())
}

fn gcc_version() -> String {
    version_of(Command::new("gcc").arg("-dumpfullversion"))
}

/// The installed version of `libc6-dev` (`none` if it is not installed).
fn libc_version() -> String {
    version_of(
        Command::new("dpkg-query")
            .args(["-W", "-f=${Version}"])
            .arg(LIBC_PACKAGE),
    )
}

/// FNV-1a 64 over a file's bytes, streamed.
fn hash_file(path: &Path) -> Result<u64, String> {
    let mut f = io(|| format!("cannot open {}", path.display()), fs::File::open(path))?;
    let mut h = Fnv1a64::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = io(|| format!("cannot read {}", path.display()), f.read(&mut buf))?;
        if n == 0 {
            return Ok(h.finish());
        }
        h.write(&buf[..n]);
    }
}

/// `VERSION.PATCHLEVEL.SUBLEVEL EXTRAVERSION` from a kernel Makefile.
pub fn makefile_version(makefile: &str) -> Option<String> {
    let get = |k: &str| {
        makefile.lines().take(20).find_map(|l| {
            let (name, v) = l.split_once('=')?;
            (name.trim() == k).then(|| v.trim().to_string())
        })
    };
    let v = format!(
        "{}.{}.{}{}",
        get("VERSION")?,
        get("PATCHLEVEL")?,
        get("SUBLEVEL")?,
        get("EXTRAVERSION").unwrap_or_default()
    );
    Some(v)
}

/// Where the kernel tree comes from, resolved enough to hash it.
#[derive(Clone)]
enum KernelOrigin {
    Debian { version: String },
    Tarball { path: PathBuf, hash: u64 },
    Tree { path: PathBuf },
}

/// A `--kernel-source` tarball or tree, hashed once (the Debian package's
/// version is resolved later, with the package lists current).
fn local_kernel(path: &Path, log: &Log) -> Result<(KernelOrigin, KernelSource), String> {
    let path = io(
        || format!("--kernel-source {}", path.display()),
        fs::canonicalize(path),
    )?;
    if path.is_dir() {
        let mk = fs::read_to_string(path.join("Makefile"))
            .map_err(|e| format!("--kernel-source {}: no kernel Makefile: {e}", path.display()))?;
        let version = makefile_version(&mk)
            .ok_or_else(|| format!("--kernel-source {}: no VERSION in its Makefile", path.display()))?;
        Ok((
            KernelOrigin::Tree { path: path.clone() },
            KernelSource::Tree { path, version },
        ))
    } else {
        log.say(format!("hashing {}", path.display()));
        let hash = hash_file(&path)?;
        Ok((
            KernelOrigin::Tarball { path, hash },
            KernelSource::Tarball { content_hash: hash },
        ))
    }
}

/// Everything the guest's cache key is made of except the Debian package
/// versions, which [`host::prepare`] resolves.
struct KeyParts {
    fragment: Vec<u8>,
    init: Vec<u8>,
    xfer_source: Vec<u8>,
    /// `--kernel-source`, if given.
    local_kernel: Option<(KernelOrigin, KernelSource)>,
}

impl KeyParts {
    /// The Debian packages whose versions the key takes, in the order
    /// [`KeyParts::inputs`] expects them.
    fn packages(&self) -> &'static [&'static str] {
        if self.local_kernel.is_some() {
            &[BUSYBOX_PACKAGE]
        } else {
            &[BUSYBOX_PACKAGE, KERNEL_PACKAGE]
        }
    }

    /// The full inputs for `versions` (one per [`KeyParts::packages`]
    /// entry), with the compiler and libc as installed now.
    fn inputs(&self, versions: &[String]) -> (KernelOrigin, Inputs) {
        let version = |i: usize| versions.get(i).cloned().unwrap_or_default();
        let (origin, kernel_source) = match &self.local_kernel {
            Some(local) => local.clone(),
            None => (
                KernelOrigin::Debian { version: version(1) },
                KernelSource::Debian {
                    package: KERNEL_PACKAGE.into(),
                    version: version(1),
                },
            ),
        };
        let inputs = Inputs {
            logic_version: cache::BUILD_LOGIC_VERSION.into(),
            kernel_logic_version: cache::KERNEL_LOGIC_VERSION.into(),
            kernel_fragment: self.fragment.clone(),
            init_script: self.init.clone(),
            xfer_source: self.xfer_source.clone(),
            kernel_source,
            busybox_version: version(0),
            compiler: gcc_version(),
            libc: libc_version(),
        };
        (origin, inputs)
    }
}

/// Where `pkg=version`'s `.deb` is kept.
fn deb_dir(root: &Path, pkg: &str, version: &str) -> PathBuf {
    root.join("downloads")
        .join(format!("{pkg}_{}", version.replace(':', "%3a")))
}

/// Whether `dir` holds a `.deb` (a finished download).
fn has_deb(dir: &Path) -> bool {
    matches!(single_entry(dir, Some("deb")), Ok(Some(_)))
}

/// Whether building `inputs` would download a `.deb` (and so needs
/// package lists that are current).
fn build_downloads(root: &Path, origin: &KernelOrigin, inputs: &Inputs) -> bool {
    let busybox = !has_deb(&deb_dir(root, BUSYBOX_PACKAGE, &inputs.busybox_version));
    let kernel = match origin {
        KernelOrigin::Debian { version } => {
            let built = KERNEL_FILES
                .iter()
                .all(|f| root.join("kernels").join(inputs.kernel_key()).join(f).is_file());
            let unpacked = root.join("src").join(debian_tree_name(version)).is_dir();
            !built && !unpacked && !has_deb(&deb_dir(root, KERNEL_PACKAGE, version))
        }
        KernelOrigin::Tarball { .. } | KernelOrigin::Tree { .. } => false,
    };
    busybox || kernel
}

fn debian_tree_name(version: &str) -> String {
    format!("{KERNEL_PACKAGE}_{}", version.replace(':', "%3a"))
}

/// Removes `<dir>/<prefix><pid>...` entries whose process is gone (left by an
/// interrupted run).
fn clean_stale(dir: &Path, prefix: &str) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if pid.parse::<u32>().is_ok()
            && pid != std::process::id().to_string()
            && !Path::new("/proc").join(pid).exists()
        {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// A fresh `<dir>/<prefix><pid>-<tag>` directory.
fn fresh_tmp(dir: &Path, prefix: &str, tag: &str) -> Result<PathBuf, String> {
    io(
        || format!("cannot create {}", dir.display()),
        fs::create_dir_all(dir),
    )?;
    clean_stale(dir, prefix);
    let tmp = dir.join(format!("{prefix}{}-{tag}", std::process::id()));
    if tmp.exists() {
        io(
            || format!("cannot remove {}", tmp.display()),
            fs::remove_dir_all(&tmp),
        )?;
    }
    io(
        || format!("cannot create {}", tmp.display()),
        fs::create_dir_all(&tmp),
    )?;
    Ok(tmp)
}

/// Moves a finished `tmp` into place; if another run got there first, keeps
/// theirs.
fn publish(tmp: &Path, dest: &Path) -> Result<(), String> {
    match fs::rename(tmp, dest) {
        Ok(()) => Ok(()),
        Err(_) if dest.exists() => {
            let _ = fs::remove_dir_all(tmp);
            Ok(())
        }
        Err(e) => Err(format!(
            "cannot rename {} to {}: {e}",
            tmp.display(),
            dest.display()
        )),
    }
}

fn single_entry(dir: &Path, ext: Option<&str>) -> Result<Option<PathBuf>, String> {
    let mut found = Vec::new();
    for e in io(|| format!("cannot list {}", dir.display()), fs::read_dir(dir))?.flatten() {
        let p = e.path();
        if ext.is_none_or(|x| p.extension().is_some_and(|e| e == x)) {
            found.push(p);
        }
    }
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(format!("{} has more than one candidate entry", dir.display())),
    }
}

/// Downloads `pkg=version` once into `<root>/downloads/<pkg>_<version>/`.
fn fetch_deb(root: &Path, pkg: &str, version: &str, log: &Log) -> Result<PathBuf, String> {
    let downloads = root.join("downloads");
    let dir = deb_dir(root, pkg, version);
    if dir.is_dir() {
        if let Some(deb) = single_entry(&dir, Some("deb"))? {
            log.say(format!("using {}", deb.display()));
            return Ok(deb);
        }
    }
    log.say(format!("apt-get download {pkg}={version}"));
    let tmp = fresh_tmp(&downloads, ".tmp-", pkg)?;
    run(
        Command::new("apt-get")
            // As root, apt would try to drop to `_apt`, which cannot write
            // into the cache directory: download as the caller.
            .args(["download", "-q", "-o", "APT::Sandbox::User=root"])
            .arg(format!("{pkg}={version}"))
            .current_dir(&tmp),
        None,
        false,
    )
    .map_err(|e| {
        format!(
            "cannot download Debian package `{pkg}={version}` (if apt says the version was not found, \
             the package lists are out of date: run `apt-get update` as root, or run `cargo xtask test` \
             or `cargo xtask guest --install-deps` as root, which refresh them first): {e}"
        )
    })?;
    single_entry(&tmp, Some("deb"))?.ok_or_else(|| format!("apt-get download {pkg} produced no .deb"))?;
    publish(&tmp, &dir)?;
    single_entry(&dir, Some("deb"))?.ok_or_else(|| format!("{} has no .deb", dir.display()))
}

/// Unpacks a kernel tarball into `<root>/src/<name>/` once; returns the tree.
fn unpack_tarball(root: &Path, name: &str, tarball: &Path, log: &Log) -> Result<PathBuf, String> {
    let srcs = root.join("src");
    let dir = srcs.join(name);
    let tree_in = |dir: &Path| -> Result<Option<PathBuf>, String> {
        Ok(single_entry(dir, None)?.filter(|t| t.join("Makefile").is_file()))
    };
    if dir.is_dir() {
        if let Some(t) = tree_in(&dir)? {
            return Ok(t);
        }
    }
    log.say(format!("unpacking {}", tarball.display()));
    let tmp = fresh_tmp(&srcs, ".tmp-", name)?;
    run(
        Command::new("tar").arg("-xf").arg(tarball).arg("-C").arg(&tmp),
        None,
        false,
    )?;
    tree_in(&tmp)?.ok_or_else(|| {
        format!(
            "{} does not hold one top-level kernel directory",
            tarball.display()
        )
    })?;
    publish(&tmp, &dir)?;
    tree_in(&dir)?.ok_or_else(|| format!("{} has no kernel tree", dir.display()))
}

/// Gets a kernel source tree ready to build with `O=`.
fn kernel_tree(root: &Path, origin: &KernelOrigin, work: &Path, log: &Log) -> Result<PathBuf, String> {
    match origin {
        KernelOrigin::Tree { path } => Ok(path.clone()),
        KernelOrigin::Tarball { path, hash } => {
            unpack_tarball(root, &format!("tarball-{hash:016x}"), path, log)
        }
        KernelOrigin::Debian { version } => {
            let name = debian_tree_name(version);
            let dir = root.join("src").join(&name);
            if let Some(t) = single_entry(&dir, None)
                .ok()
                .flatten()
                .filter(|t| t.join("Makefile").is_file())
            {
                log.say(format!("using kernel tree {}", t.display()));
                return Ok(t);
            }
            let deb = fetch_deb(root, KERNEL_PACKAGE, version, log)?;
            let x = work.join("linux-source-deb");
            log.say(format!("extracting {}", deb.display()));
            run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x), None, false)?;
            let tarball = single_entry(&x.join("usr/src"), Some("xz"))?
                .ok_or_else(|| format!("{} holds no usr/src/*.tar.xz", deb.display()))?;
            let tree = unpack_tarball(root, &name, &tarball, log)?;
            let _ = fs::remove_dir_all(&x);
            Ok(tree)
        }
    }
}

fn make(src: &Path, build: &Path, jobs: usize) -> Command {
    let mut c = Command::new("nice");
    c.args(["-n", "10", "make"])
        .arg("-C")
        .arg(src)
        .arg(format!("O={}", build.display()))
        .arg("ARCH=x86_64")
        .arg(format!("-j{jobs}"))
        // Reproducible version banner.
        .env("KBUILD_BUILD_USER", "keel")
        .env("KBUILD_BUILD_HOST", "keel")
        .env("KBUILD_BUILD_TIMESTAMP", "1970-01-01")
        .env("ARCH", "x86_64");
    c
}

/// Paths and parallelism of one kernel build.
#[derive(Clone, Copy)]
struct KernelBuild<'a> {
    /// Kernel source tree (left untouched: the build uses `O=`).
    src: &'a Path,
    /// Output directory (`O=`).
    build: &'a Path,
    /// The fragment to merge (a copy of guest/linux/keel.config).
    fragment_path: &'a Path,
    /// `make -j`.
    jobs: usize,
    /// Where make's output goes.
    klog: &'a Path,
}

/// Configures (tinyconfig + fragment), verifies and builds the kernel into
/// `build`; returns `(vmlinux, bzImage)`.
fn build_kernel(
    kb: &KernelBuild<'_>,
    fragment: &[kconfig::Setting],
    opts: &GuestOpts,
    log: &Log,
) -> Result<(PathBuf, PathBuf), String> {
    let KernelBuild {
        src,
        build,
        fragment_path,
        jobs,
        klog,
    } = *kb;
    io(
        || format!("cannot create {}", build.display()),
        fs::create_dir_all(build),
    )?;
    log.say(format!("make tinyconfig (log: {})", klog.display()));
    run(make(src, build, jobs).arg("tinyconfig"), Some(klog), opts.verbose)?;

    // Merge the fragment over tinyconfig's .config and re-resolve with
    // allnoconfig: anything neither file asks for stays off (olddefconfig
    // would instead turn on every new symbol's default, e.g. IPV6 with INET).
    log.say("merging guest/linux/keel.config (merge_config.sh -n)");
    let config = build.join(".config");
    run(
        Command::new("sh")
            .arg(src.join("scripts/kconfig/merge_config.sh"))
            .arg("-n")
            .arg("-O")
            .arg(build)
            .arg(&config)
            .arg(fragment_path)
            .current_dir(src)
            .env("ARCH", "x86_64"),
        Some(klog),
        opts.verbose,
    )?;
    run(
        make(src, build, jobs).arg("olddefconfig"),
        Some(klog),
        opts.verbose,
    )?;

    let final_config =
        fs::read_to_string(&config).map_err(|e| format!("cannot read {}: {e}", config.display()))?;
    let parsed = kconfig::parse(&final_config).map_err(|e| format!("{}: {e}", config.display()))?;
    let bad = kconfig::check(fragment, &parsed);
    if !bad.is_empty() {
        let mut msg = format!(
            "{} option(s) of guest/linux/keel.config did not survive tinyconfig + merge_config.sh -n + olddefconfig (see {}):",
            bad.len(),
            config.display()
        );
        for m in &bad {
            msg.push_str("\n  ");
            msg.push_str(&m.to_string());
        }
        return Err(msg);
    }
    log.say(format!(
        "kernel config verified: all {} fragment options present",
        fragment.len()
    ));

    log.say(format!(
        "make -j{jobs} vmlinux bzImage (several minutes; log: {})",
        klog.display()
    ));
    let t = Instant::now();
    run(
        make(src, build, jobs).args(["vmlinux", "bzImage"]),
        Some(klog),
        opts.verbose,
    )?;
    log.say(format!("kernel built in {:.0}s", t.elapsed().as_secs_f64()));
    Ok((build.join("vmlinux"), build.join("arch/x86/boot/bzImage")))
}

/// Directories of the initramfs, parents first.
pub const INITRAMFS_DIRS: &[&str] = &[
    "bin", "dev", "etc", "mnt", "proc", "root", "run", "sbin", "sys", "tmp", "usr", "usr/bin", "usr/sbin",
];

/// Where `keel-xfer` lives in the initramfs.
pub const XFER_PATH: &str = "bin/keel-xfer";

/// The initramfs members: directories, `/dev/console` (so `/init` has a
/// console before devtmpfs is mounted) and `/dev/null`, BusyBox with one
/// symlink per applet, `/bin/keel-xfer`, and `/init`.
///
/// `applets` is the output of `busybox --list-full` (`bin/sh`,
/// `usr/bin/awk`, ...); applets outside the directories above are skipped.
pub fn initramfs_entries(busybox: Vec<u8>, init: Vec<u8>, xfer: Vec<u8>, applets: &str) -> Vec<Entry> {
    let mut e: Vec<Entry> = INITRAMFS_DIRS
        .iter()
        .map(|d| Entry::Dir {
            path: (*d).into(),
            perm: if *d == "tmp" { 0o1777 } else { 0o755 },
        })
        .collect();
    e.push(Entry::CharDev {
        path: "dev/console".into(),
        perm: 0o600,
        major: 5,
        minor: 1,
    });
    e.push(Entry::CharDev {
        path: "dev/null".into(),
        perm: 0o666,
        major: 1,
        minor: 3,
    });
    e.push(Entry::File {
        path: "bin/busybox".into(),
        perm: 0o755,
        data: busybox,
    });
    let mut links: Vec<&str> = applets
        .lines()
        .map(|l| l.trim().trim_start_matches('/'))
        .filter(|l| {
            l.rsplit_once('/')
                .is_some_and(|(dir, name)| INITRAMFS_DIRS.contains(&dir) && !name.is_empty())
        })
        .filter(|l| *l != "bin/busybox" && *l != XFER_PATH)
        .collect();
    links.sort_unstable();
    links.dedup();
    e.extend(links.into_iter().map(|l| Entry::Symlink {
        path: l.into(),
        target: "/bin/busybox".into(),
    }));
    e.push(Entry::File {
        path: XFER_PATH.into(),
        perm: 0o755,
        data: xfer,
    });
    e.push(Entry::File {
        path: "init".into(),
        perm: 0o755,
        data: init,
    });
    e
}

/// Compiles `keel-xfer` (the source as hashed, copied into `work`) with
/// gcc and checks that it runs on the host; returns the binary.
fn build_xfer(source: &[u8], work: &Path, log: &Log) -> Result<Vec<u8>, String> {
    let src = work.join("keel-xfer.c");
    let bin = work.join("keel-xfer");
    io(
        || format!("cannot write {}", src.display()),
        fs::write(&src, source),
    )?;
    let mut cc = Command::new("gcc");
    cc.args(XFER_CFLAGS).arg("-o").arg(&bin).arg(&src);
    let desc = format!("{cc:?}");
    let out = io(|| format!("cannot run {desc}"), cc.stdin(Stdio::null()).output())?;
    if !out.status.success() {
        // A missing static libc was already reported by `host::prepare`.
        return Err(format!(
            "cannot compile guest/linux/keel-xfer.c ({}): {desc}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        ));
    }
    let bytes = read(&bin)?;
    if bytes.get(..4) != Some(b"\x7fELF") {
        return Err(format!("{} is not an ELF binary", bin.display()));
    }
    // It runs on the host too: without arguments it prints its usage and
    // exits 2. Anything else means a broken binary.
    let probe = io(
        || format!("cannot run {}", bin.display()),
        Command::new(&bin).stdin(Stdio::null()).output(),
    )?;
    let usage = String::from_utf8_lossy(&probe.stderr);
    if probe.status.code() != Some(2) || !usage.contains("usage: keel-xfer") {
        return Err(format!(
            "{} does not run as expected ({}): {}",
            bin.display(),
            probe.status,
            usage.trim_end()
        ));
    }
    log.say(format!("keel-xfer: {} KiB, static", bytes.len() / 1024));
    Ok(bytes)
}

/// Builds the initramfs; returns the cpio bytes.
fn build_initramfs(
    root: &Path,
    busybox_version: &str,
    init: &[u8],
    xfer: &[u8],
    work: &Path,
    log: &Log,
) -> Result<Vec<u8>, String> {
    let deb = fetch_deb(root, BUSYBOX_PACKAGE, busybox_version, log)?;
    let x = work.join("busybox-deb");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&x), None, false)?;
    let bb = x.join("bin/busybox");
    let busybox = read(&bb)?;
    if busybox.get(..4) != Some(b"\x7fELF") {
        return Err(format!("{} is not an ELF binary", bb.display()));
    }
    // The static x86-64 binary runs on the host: ask it for its applets.
    let applets = output(Command::new(&bb).arg("--list-full"))?;
    let entries = initramfs_entries(busybox, init.to_vec(), xfer.to_vec(), &applets);
    let bytes = cpio::write(&entries);
    // Read it back: catches a writer bug before a guest fails to boot.
    let back = cpio::read(&bytes)?;
    if back != entries {
        return Err("initramfs does not read back as written".into());
    }
    log.say(format!(
        "initramfs: {} members, {} KiB, uncompressed",
        entries.len(),
        bytes.len() / 1024
    ));
    Ok(bytes)
}

/// What `<root>/kernels/<kernel_key>/` must hold to be reused.
const KERNEL_FILES: [&str; 4] = ["vmlinux", "bzImage", "System.map", "config"];

/// Hard-links `from` to `to` (both live in the cache), copying if the file
/// system refuses.
fn link_or_copy(from: &Path, to: &Path) -> Result<(), String> {
    fs::hard_link(from, to).or_else(|_| copy(from, to))
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| format!("cannot copy {} to {}: {e}", from.display(), to.display()))
}

/// `cargo xtask guest`: the build tools are installed with
/// `--install-deps` as root, else named if missing.
pub fn run_guest(opts: &GuestOpts) -> Result<Artifacts, String> {
    let mut host = SystemHost {
        prefix: "xtask guest",
        verbose: opts.verbose,
    };
    let may_change_host = opts.install_deps && host::is_root();
    guest_for(
        opts,
        &[],
        may_change_host,
        "or rerun as root with --install-deps",
        &mut host,
    )
}

/// The Linux guest, found cached or built, after `host` has been given
/// every tool of `tools` (the tests' — nothing builds or runs before they
/// are all there) and, if a build is needed, the build tools; with
/// `may_change_host`, missing ones are installed and the package lists
/// refreshed first, else they are named in one line that ends with `how`.
pub fn guest_for(
    opts: &GuestOpts,
    tools: &[Dep],
    may_change_host: bool,
    how: &str,
    host: &mut dyn Host,
) -> Result<Artifacts, String> {
    let log = Log {
        start: Instant::now(),
    };
    let repo = repo_root();
    let fragment_path = repo.join("guest/linux/keel.config");
    let init_path = repo.join("guest/linux/init");
    let xfer_path = repo.join("guest/linux/keel-xfer.c");
    let fragment_text = read(&fragment_path)?;
    let init = read(&init_path)?;
    let xfer_source = read(&xfer_path)?;
    let fragment = kconfig::parse(&String::from_utf8_lossy(&fragment_text))
        .map_err(|e| format!("{}: {e}", fragment_path.display()))?;
    let root = cache::guest_cache_root(
        std::env::var_os("KEEL_CACHE_DIR"),
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
    )?;
    let local_kernel = match &opts.kernel_source {
        Some(p) => Some(local_kernel(p, &log)?),
        None => None,
    };
    let parts = KeyParts {
        fragment: fragment_text.clone(),
        init,
        xfer_source,
        local_kernel,
    };

    // `--print` never changes the host and never needs the build tools.
    let build_tools = if opts.print {
        Vec::new()
    } else {
        deps::needed_for(&[Need::GuestBuild])
    };
    let request = Request {
        packages: parts.packages(),
        tools,
        build_tools: &build_tools,
        may_change_host: may_change_host && !opts.print,
        how_to_install: how,
    };
    let prepared = host::prepare(host, &request, |versions| {
        let (origin, inputs) = parts.inputs(versions);
        if !opts.rebuild && Artifacts::new(&root, &inputs.key()).complete() {
            GuestState::Cached
        } else {
            GuestState::Build {
                downloads: build_downloads(&root, &origin, &inputs),
            }
        }
    })?;
    if prepared.refreshed {
        let versions: Vec<String> = parts
            .packages()
            .iter()
            .zip(&prepared.versions)
            .map(|(p, v)| format!("{p}={v}"))
            .collect();
        log.say(if prepared.from_refreshed_lists {
            format!(
                "package versions read after `apt-get update`: {}",
                versions.join(" ")
            )
        } else {
            format!("keeping the guest cached for {}", versions.join(" "))
        });
    }
    // The key of exactly the versions (and compiler) `prepare` settled on.
    let (origin, inputs) = parts.inputs(&prepared.versions);
    let key = inputs.key();
    let artifacts = Artifacts::new(&root, &key);
    if artifacts.complete() && !opts.rebuild {
        log.say(format!("cached: {}", artifacts.dir.display()));
        return Ok(artifacts);
    }
    if opts.print {
        return Err(format!(
            "guest artifacts are not cached (no {}): run `cargo xtask guest` first",
            artifacts.dir.display()
        ));
    }
    if artifacts.dir.exists() {
        log.say(format!("removing {}", artifacts.dir.display()));
        io(
            || format!("cannot remove {}", artifacts.dir.display()),
            fs::remove_dir_all(&artifacts.dir),
        )?;
    }

    log.say(format!("building guest {key} into {}", root.display()));
    let jobs = opts
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map(usize::from).unwrap_or(1));
    let work = fresh_tmp(&root, "tmp-", &key)?;
    let out = work.join("out");
    io(
        || format!("cannot create {}", out.display()),
        fs::create_dir_all(&out),
    )?;
    // What is built is exactly what was hashed.
    let frag_copy = work.join("keel.config");
    io(
        || "cannot write fragment copy".into(),
        fs::write(&frag_copy, &fragment_text),
    )?;
    let klog = work.join("kernel-build.log");

    // keel-xfer and the initramfs first: they take seconds, and a problem
    // with them should not wait for the kernel.
    let xfer = build_xfer(&inputs.xfer_source, &work, &log)?;
    let xfer_out = out.join("keel-xfer");
    io(
        || format!("cannot write {}", xfer_out.display()),
        fs::write(&xfer_out, &xfer),
    )?;
    {
        use std::os::unix::fs::PermissionsExt;
        io(
            || format!("cannot chmod {}", xfer_out.display()),
            fs::set_permissions(&xfer_out, fs::Permissions::from_mode(0o755)),
        )?;
    }
    let cpio_bytes = build_initramfs(
        &root,
        &inputs.busybox_version,
        &inputs.init_script,
        &xfer,
        &work,
        &log,
    )?;
    io(
        || "cannot write initramfs".into(),
        fs::write(out.join("initramfs.cpio"), &cpio_bytes),
    )?;

    // The kernel: reused from `<root>/kernels/<kernel_key>/` when only the
    // user space changed, else built and published there first.
    let kdir = root.join("kernels").join(inputs.kernel_key());
    if opts.rebuild && kdir.exists() {
        io(
            || format!("cannot remove {}", kdir.display()),
            fs::remove_dir_all(&kdir),
        )?;
    }
    if KERNEL_FILES.iter().all(|f| kdir.join(f).is_file()) {
        log.say(format!("reusing kernel {}", kdir.display()));
    } else {
        let src = kernel_tree(&root, &origin, &work, &log)?;
        let build = work.join("kbuild");
        let (vmlinux, bzimage) = build_kernel(
            &KernelBuild {
                src: &src,
                build: &build,
                fragment_path: &frag_copy,
                jobs,
                klog: &klog,
            },
            &fragment,
            opts,
            &log,
        )?;
        let kout = work.join("kernel");
        io(
            || format!("cannot create {}", kout.display()),
            fs::create_dir_all(&kout),
        )?;
        copy(&vmlinux, &kout.join("vmlinux"))?;
        copy(&bzimage, &kout.join("bzImage"))?;
        copy(&build.join("System.map"), &kout.join("System.map"))?;
        copy(&build.join(".config"), &kout.join("config"))?;
        let _ = fs::copy(&klog, kout.join("kernel-build.log"));
        if let Some(parent) = kdir.parent() {
            io(
                || format!("cannot create {}", parent.display()),
                fs::create_dir_all(parent),
            )?;
        }
        publish(&kout, &kdir)?;
    }
    let vmlinux = kdir.join("vmlinux");
    let entry = elf::pvh_entry(&read(&vmlinux)?)
        .map_err(|e| format!("{}: {e}", vmlinux.display()))?
        .ok_or_else(|| {
            format!(
                "{} has no XEN_ELFNOTE_PHYS32_ENTRY note: is CONFIG_PVH=y?",
                vmlinux.display()
            )
        })?;
    log.say(format!(
        "vmlinux PVH entry (XEN_ELFNOTE_PHYS32_ENTRY) at {entry:#x}"
    ));
    for f in KERNEL_FILES.iter().chain(["kernel-build.log"].iter()) {
        let from = kdir.join(f);
        if from.exists() {
            link_or_copy(&from, &out.join(f))?;
        }
    }
    let mut manifest = inputs.manifest();
    manifest.push_str(&format!("key={key}\npvh_entry={entry:#x}\n"));
    io(
        || "cannot write inputs.txt".into(),
        fs::write(out.join("inputs.txt"), manifest),
    )?;

    publish(&out, &artifacts.dir)?;
    let _ = fs::remove_dir_all(&work);
    if !artifacts.complete() {
        return Err(format!(
            "{} is incomplete after the build",
            artifacts.dir.display()
        ));
    }
    log.say(format!("done: {}", artifacts.dir.display()));
    Ok(artifacts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makefile_version_parsing() {
        let mk = "# SPDX\nVERSION = 6\nPATCHLEVEL = 1\nSUBLEVEL = 192\nEXTRAVERSION =\nNAME = Curry Ramen\n";
        assert_eq!(makefile_version(mk).as_deref(), Some("6.1.192"));
        let rc = "VERSION = 6\nPATCHLEVEL = 12\nSUBLEVEL = 0\nEXTRAVERSION = -rc3\n";
        assert_eq!(makefile_version(rc).as_deref(), Some("6.12.0-rc3"));
        assert_eq!(makefile_version("all:\n"), None);
    }

    #[test]
    fn initramfs_layout() {
        let applets = "bin/sh\nbin/busybox\nsbin/reboot\nusr/bin/awk\nlinuxrc\nweird/dir/x\nbin/sh\n";
        let e = initramfs_entries(
            b"\x7fELFbusybox".to_vec(),
            b"#!/bin/sh\n".to_vec(),
            b"\x7fELFkeel-xfer".to_vec(),
            applets,
        );
        let paths: Vec<&str> = e.iter().map(Entry::path).collect();
        // Every parent directory comes before its children.
        for (i, p) in paths.iter().enumerate() {
            if let Some((parent, _)) = p.rsplit_once('/') {
                let at = paths.iter().position(|q| *q == parent).expect(parent);
                assert!(at < i, "{parent} after {p}");
            }
        }
        assert!(e.contains(&Entry::CharDev {
            path: "dev/console".into(),
            perm: 0o600,
            major: 5,
            minor: 1
        }));
        assert_eq!(
            e.last(),
            Some(&Entry::File {
                path: "init".into(),
                perm: 0o755,
                data: b"#!/bin/sh\n".to_vec()
            })
        );
        let links: Vec<&str> = e
            .iter()
            .filter_map(|x| match x {
                Entry::Symlink { path, target } => {
                    assert_eq!(target, "/bin/busybox");
                    Some(path.as_str())
                }
                _ => None,
            })
            .collect();
        assert_eq!(links, ["bin/sh", "sbin/reboot", "usr/bin/awk"]);
        // keel-xfer: one executable file, whatever the applet list says.
        let xfers: Vec<&Entry> = e.iter().filter(|x| x.path() == XFER_PATH).collect();
        assert_eq!(
            xfers,
            [&Entry::File {
                path: "bin/keel-xfer".into(),
                perm: 0o755,
                data: b"\x7fELFkeel-xfer".to_vec()
            }]
        );
        let with_clash = initramfs_entries(Vec::new(), Vec::new(), b"x".to_vec(), "bin/keel-xfer\nbin/sh\n");
        assert_eq!(
            with_clash.iter().filter(|x| x.path() == XFER_PATH).count(),
            1,
            "an applet of the same name must not shadow keel-xfer"
        );
        // And it serializes.
        assert_eq!(cpio::read(&cpio::write(&e)).unwrap(), e);
    }

    #[test]
    fn repo_files_parse() {
        // The shipped fragment must parse, and the init script must be a
        // shell script that prints the marker the tests look for.
        let root = repo_root();
        let frag = fs::read_to_string(root.join("guest/linux/keel.config")).unwrap();
        let s = kconfig::parse(&frag).unwrap();
        let has = |n: &str, v: kconfig::Value| s.iter().any(|x| x.name == n && x.value == v);
        use kconfig::Value::{No, Yes};
        for y in [
            "64BIT",
            "SMP",
            "PVH",
            "KVM_GUEST",
            "SERIAL_8250_CONSOLE",
            "BLK_DEV_INITRD",
            "HZ_100",
            "X86_MPPARSE",
            "ACPI",
            "PCI",
            "PCI_MSI",
            "VIRTIO_PCI",
            "RTC_DRV_CMOS",
        ] {
            assert!(has(y, Yes), "CONFIG_{y}=y missing from keel.config");
        }
        // A distribution kernel's way to find devices: no command-line ones.
        assert!(
            !s.iter()
                .any(|x| x.name == "VIRTIO_MMIO_CMDLINE_DEVICES" && x.value == Yes),
            "keel.config must not enable VIRTIO_MMIO_CMDLINE_DEVICES"
        );
        for n in ["PTP_1588_CLOCK_KVM", "MODULES"] {
            assert!(has(n, No), "`# CONFIG_{n} is not set` missing from keel.config");
        }
        let init = fs::read_to_string(root.join("guest/linux/init")).unwrap();
        assert!(init.starts_with("#!/bin/sh\n"));
        assert!(init.contains("KEEL-INIT: userspace up"));
        assert!(init.contains("reboot -f"));
        // The checks that need keel-xfer call it where the cpio puts it.
        assert!(init.contains("keel-xfer send \"$2\""));
        assert!(init.contains("xfer tcp \"tcp:$server:5201\" 4194304 5201"));
        assert!(init.contains("xfer vsockrt vsock:2:5202 1048576 5202"));
        let xfer = fs::read_to_string(root.join("guest/linux/keel-xfer.c")).unwrap();
        assert!(xfer.contains("int main(int argc, char **argv)"));
        assert!(
            xfer.contains("usage: keel-xfer"),
            "build_xfer's run check looks for it"
        );
    }
}
