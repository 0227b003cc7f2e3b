//! Every host tool Keel's guest build and test suite run, in one table
//! ([`HOST_DEPS`]), and how to say which are missing.
//!
//! # Adding a host tool
//!
//! A test (or a build step) that spawns a program the Rust toolchain does
//! not bring — `iasl` for an ACPI table check, `curl` for an HTTP API test,
//! `qemu-img` for an image format — adds one line to [`HOST_DEPS`]:
//!
//! ```text
//! dep(Probe::Tool("iasl"), "acpica-tools", Need::Tests, "keel-boot acpi_tables: disassembles the DSDT"),
//! ```
//!
//! * [`Probe::Tool`] for a program looked up on `$PATH` (what
//!   `Command::new("iasl")` does), [`Probe::File`] for a header or library;
//! * the Debian package that provides it (`apt-file search`, or
//!   `dpkg -S $(command -v iasl)` on a machine that has it);
//! * [`Need::Tests`] if any test run needs it (`cargo xtask test
//!   --no-linux` included), [`Need::LinuxTests`] if only the Linux
//!   end-to-end tests do, [`Need::GuestBuild`] if only building the Linux
//!   guest does;
//! * which test (or step) runs it, so the next reader knows why it is there.
//!
//! `cargo xtask test` then installs it as root before any test runs, or names
//! it in its one-line list of what is missing; nothing else (not `.ci/run`)
//! installs test tools. The test itself should still fail at once, with the
//! tool's name, if it is missing (a plain `cargo test` checks nothing up
//! front).
//!
//! Not listed: `cc` (cargo needs a C linker before `cargo xtask` can even
//! run), and what every Debian system has (`sh`, `cat`, `awk`, `perl-base`).

use std::path::{Path, PathBuf};

/// How to tell whether a dependency is present.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// An executable on `$PATH`.
    Tool(&'static str),
    /// A file (a header of a `-dev` package).
    File(&'static str),
}

/// What needs a dependency, and so when it must be there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Building the Linux guest: `cargo xtask guest`, and `cargo xtask test`
    /// when the guest is not cached yet.
    GuestBuild,
    /// Every `cargo xtask test` run, `--no-linux` included.
    Tests,
    /// The Linux end-to-end tests (`cargo xtask test` without `--no-linux`).
    LinuxTests,
}

/// One host dependency and the Debian package that provides it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dep {
    /// What is needed.
    pub probe: Probe,
    /// The Debian package to `apt-get install`.
    pub package: &'static str,
    /// When it is needed.
    pub need: Need,
    /// What runs it (documentation: keep it when you add a line).
    pub used_by: &'static str,
}

impl Dep {
    /// Short name for messages: the tool, or the package for a file probe.
    pub fn name(&self) -> &'static str {
        match self.probe {
            Probe::Tool(t) => t,
            Probe::File(_) => self.package,
        }
    }
}

const fn dep(probe: Probe, package: &'static str, need: Need, used_by: &'static str) -> Dep {
    Dep {
        probe,
        package,
        need,
        used_by,
    }
}

use Need::{GuestBuild, LinuxTests, Tests};
use Probe::{File, Tool};

/// Every host tool the guest build and the test suite run: the one place to
/// extend (see the module docs).
///
/// Building the guest: `apt-get`/`apt-cache`/`dpkg-deb` fetch and unpack
/// `linux-source-6.1` and `busybox-static`; flex and bison are needed even
/// for `make tinyconfig`, bc for the timeconst header, libelf-dev for
/// objtool (x86-64 builds it whatever the config), lz4 for the bzImage
/// payload (see keel.config). `keel-xfer` is linked statically against
/// glibc's `libc.a` and speaks vsock (`gcc` alone pulls in neither for
/// sure). Not needed: `cpio` (the archive is written in Rust), `libssl-dev`
/// (only for module signing and trusted keys, both off).
pub const HOST_DEPS: &[Dep] = &[
    dep(
        Tool("apt-get"),
        "apt",
        GuestBuild,
        "downloads the Debian packages",
    ),
    dep(
        Tool("apt-cache"),
        "apt",
        GuestBuild,
        "resolves the package versions",
    ),
    dep(Tool("dpkg-deb"), "dpkg", GuestBuild, "unpacks the .debs"),
    dep(Tool("tar"), "tar", GuestBuild, "unpacks the kernel tarball"),
    dep(Tool("xz"), "xz-utils", GuestBuild, "unpacks the kernel tarball"),
    dep(Tool("make"), "make", GuestBuild, "kernel build"),
    dep(Tool("gcc"), "gcc", GuestBuild, "kernel build, keel-xfer"),
    dep(Tool("flex"), "flex", GuestBuild, "Kconfig"),
    dep(Tool("bison"), "bison", GuestBuild, "Kconfig"),
    dep(Tool("bc"), "bc", GuestBuild, "kernel timeconst header"),
    dep(Tool("lz4"), "lz4", GuestBuild, "bzImage payload"),
    dep(
        Tool("nice"),
        "coreutils",
        GuestBuild,
        "the build runs at low priority",
    ),
    dep(File("/usr/include/gelf.h"), "libelf-dev", GuestBuild, "objtool"),
    dep(
        File("/usr/lib/x86_64-linux-gnu/libc.a"),
        "libc6-dev",
        GuestBuild,
        "static keel-xfer",
    ),
    dep(
        File("/usr/include/linux/vm_sockets.h"),
        "linux-libc-dev",
        GuestBuild,
        "keel-xfer's vsock",
    ),
    dep(
        Tool("ip"),
        "iproute2",
        Tests,
        "network namespaces and taps: keel-vmm net_guest, keel linux_e2e (DHCP, TCP)",
    ),
    dep(
        Tool("timeout"),
        "coreutils",
        Tests,
        "bounds each `keel` run of keel's cli tests",
    ),
    dep(
        Tool("ldd"),
        "libc-bin",
        Tests,
        "lists the libraries keel-jail copies into a jail: keel jail tests",
    ),
    dep(
        Tool("sysctl"),
        "procps",
        Tests,
        "turns IPv6 off in keel-vmm net_guest's namespace",
    ),
    dep(
        Tool("mkfs.ext4"),
        "e2fsprogs",
        LinuxTests,
        "the ext4 root disk of keel linux_e2e's full boot (`mkfs.ext4 -d`)",
    ),
    dep(
        Tool("dnsmasq"),
        "dnsmasq-base",
        LinuxTests,
        "the DHCP server of keel linux_e2e's virtio-net boot",
    ),
    dep(
        Tool("iasl"),
        "acpica-tools",
        LinuxTests,
        "disassembles the generated DSDT in keel-boot's ACPI tests",
    ),
];

/// The entries of [`HOST_DEPS`] whose [`Need`] is one of `needs`.
pub fn needed_for(needs: &[Need]) -> Vec<Dep> {
    HOST_DEPS
        .iter()
        .copied()
        .filter(|d| needs.contains(&d.need))
        .collect()
}

/// Looks `name` up on `$PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Whether `probe` is satisfied on this host.
pub fn present(probe: Probe) -> bool {
    match probe {
        Probe::Tool(t) => which(t).is_some(),
        Probe::File(f) => Path::new(f).exists(),
    }
}

/// The dependencies of `deps` for which `present` says no.
pub fn missing(deps: &[Dep], present: impl Fn(Probe) -> bool) -> Vec<Dep> {
    deps.iter().copied().filter(|d| !present(d.probe)).collect()
}

/// The distinct packages that provide `deps`, in order.
pub fn packages(deps: &[Dep]) -> Vec<&'static str> {
    let mut v: Vec<&'static str> = Vec::new();
    for d in deps {
        if !v.contains(&d.package) {
            v.push(d.package);
        }
    }
    v
}

/// The one-line error for missing dependencies; `how` ends it with the way
/// to get them installed for you (say, "or run `cargo xtask test` as root,
/// which installs them").
pub fn missing_message(missing: &[Dep], how: &str) -> String {
    let mut what: Vec<String> = Vec::new();
    for d in missing {
        let s = match d.probe {
            Probe::Tool(t) => format!("`{t}` (package {})", d.package),
            Probe::File(f) => format!("{f} (package {})", d.package),
        };
        if !what.contains(&s) {
            what.push(s);
        }
    }
    format!(
        "missing host tools: {}; install them with `apt-get update && apt-get install {}` {how}",
        what.join(", "),
        packages(missing).join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOW: &str = "or rerun as root with --install-deps";

    #[test]
    fn reports_missing_tools_and_packages_in_one_line() {
        let gone = ["flex", "bison"];
        let m = missing(&needed_for(&[GuestBuild]), |p| match p {
            Probe::Tool(t) => !gone.contains(&t),
            Probe::File(_) => false,
        });
        let names: Vec<_> = m.iter().map(Dep::name).collect();
        assert_eq!(
            names,
            ["flex", "bison", "libelf-dev", "libc6-dev", "linux-libc-dev"]
        );
        let msg = missing_message(&m, HOW);
        assert!(!msg.contains('\n'), "one line: {msg}");
        assert!(msg.contains("`flex` (package flex)"), "{msg}");
        assert!(msg.contains("/usr/include/gelf.h (package libelf-dev)"), "{msg}");
        assert!(
            msg.contains("/usr/lib/x86_64-linux-gnu/libc.a (package libc6-dev)"),
            "{msg}"
        );
        assert!(
            msg.contains("apt-get update && apt-get install flex bison libelf-dev libc6-dev linux-libc-dev`"),
            "{msg}"
        );
        assert!(msg.ends_with(HOW), "{msg}");
    }

    #[test]
    fn only_the_static_libc_missing() {
        let m = missing(&needed_for(&[GuestBuild]), |p| {
            p != Probe::File("/usr/lib/x86_64-linux-gnu/libc.a")
        });
        assert_eq!(
            missing_message(&m, HOW),
            "missing host tools: /usr/lib/x86_64-linux-gnu/libc.a (package libc6-dev); \
             install them with `apt-get update && apt-get install libc6-dev` or rerun as root with --install-deps"
        );
    }

    #[test]
    fn on_a_fresh_machine_the_suite_names_kernel_tools_and_test_tools_together() {
        // What the issue measured: no flex, bison, libelf-dev, dnsmasq.
        let gone = ["flex", "bison", "dnsmasq"];
        let all = needed_for(&[GuestBuild, Tests, LinuxTests]);
        let m = missing(&all, |p| match p {
            Probe::Tool(t) => !gone.contains(&t),
            Probe::File(f) => f != "/usr/include/gelf.h",
        });
        let msg = missing_message(&m, "or run `cargo xtask test` as root, which installs them");
        assert_eq!(
            msg,
            "missing host tools: `flex` (package flex), `bison` (package bison), \
             /usr/include/gelf.h (package libelf-dev), `dnsmasq` (package dnsmasq-base); \
             install them with `apt-get update && apt-get install flex bison libelf-dev dnsmasq-base` \
             or run `cargo xtask test` as root, which installs them"
        );
    }

    #[test]
    fn the_test_tools_the_suite_spawns_are_listed() {
        let tools = |needs: &[Need]| -> Vec<&str> { needed_for(needs).iter().map(Dep::name).collect() };
        // keel-vmm net_guest, keel's cli and jail tests run even with --no-linux.
        assert_eq!(tools(&[Tests]), ["ip", "timeout", "ldd", "sysctl"]);
        // keel linux_e2e: the root disk and the DHCP server.
        assert_eq!(tools(&[LinuxTests]), ["mkfs.ext4", "dnsmasq", "iasl"]);
        let pkgs = packages(&needed_for(&[Tests, LinuxTests]));
        for p in [
            "iproute2",
            "coreutils",
            "libc-bin",
            "procps",
            "e2fsprogs",
            "dnsmasq-base",
        ] {
            assert!(pkgs.contains(&p), "{p} in {pkgs:?}");
        }
    }

    #[test]
    fn every_dep_says_what_uses_it() {
        for d in HOST_DEPS {
            assert!(!d.used_by.is_empty() && !d.package.is_empty(), "{d:?}");
        }
    }

    #[test]
    fn nothing_missing() {
        assert!(missing(HOST_DEPS, |_| true).is_empty());
    }

    #[test]
    fn packages_are_deduplicated() {
        assert_eq!(packages(&HOST_DEPS[..3]), ["apt", "dpkg"]);
        let twice = [HOST_DEPS[0], HOST_DEPS[1]];
        let msg = missing_message(&twice, HOW);
        assert!(msg.contains("apt-get install apt`"), "{msg}");
    }

    #[test]
    fn which_finds_sh() {
        assert!(which("sh").is_some());
        assert!(which("definitely-not-a-tool-keel").is_none());
    }
}
