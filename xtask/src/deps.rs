//! Host build dependencies: which are missing, and how to say so.

use std::path::{Path, PathBuf};

/// How to tell whether a dependency is present.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// An executable on `$PATH`.
    Tool(&'static str),
    /// A file (a header of a `-dev` package).
    File(&'static str),
}

/// One host dependency and the Debian package that provides it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dep {
    /// What is needed.
    pub probe: Probe,
    /// The Debian package to `apt-get install`.
    pub package: &'static str,
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

const fn tool(t: &'static str, package: &'static str) -> Dep {
    Dep {
        probe: Probe::Tool(t),
        package,
    }
}

/// Everything `cargo xtask guest` runs on the host.
///
/// * `apt-get`, `apt-cache`, `dpkg-deb`: fetch and unpack the Debian
///   packages (`linux-source-6.1`, `busybox-static`).
/// * `tar`, `xz`: unpack the kernel tarball.
/// * `make`, `gcc`, `flex`, `bison`, `bc`: Kconfig and the kernel build
///   (flex/bison even for `make tinyconfig`, bc for the timeconst header).
/// * `libelf-dev`: objtool, which x86-64 builds whatever the config.
/// * `lz4`: the bzImage payload is LZ4-compressed (see keel.config).
/// * `nice`: the build runs at low priority on shared machines.
/// * `libc6-dev` (`libc.a`) and `linux-libc-dev` (`<linux/vm_sockets.h>`):
///   `keel-xfer` is linked statically with glibc and speaks vsock
///   (`gcc` alone pulls in neither the static libc nor the kernel headers
///   for sure).
///
/// Not needed: `cpio` (the archive is written in Rust), `libssl-dev`
/// (only for module signing and trusted keys, both off).
pub const GUEST_DEPS: &[Dep] = &[
    tool("apt-get", "apt"),
    tool("apt-cache", "apt"),
    tool("dpkg-deb", "dpkg"),
    tool("tar", "tar"),
    tool("xz", "xz-utils"),
    tool("make", "make"),
    tool("gcc", "gcc"),
    tool("flex", "flex"),
    tool("bison", "bison"),
    tool("bc", "bc"),
    tool("lz4", "lz4"),
    tool("nice", "coreutils"),
    Dep {
        probe: Probe::File("/usr/include/gelf.h"),
        package: "libelf-dev",
    },
    Dep {
        probe: Probe::File("/usr/lib/x86_64-linux-gnu/libc.a"),
        package: "libc6-dev",
    },
    Dep {
        probe: Probe::File("/usr/include/linux/vm_sockets.h"),
        package: "linux-libc-dev",
    },
];

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

/// The one-line error for missing dependencies.
pub fn missing_message(missing: &[Dep]) -> String {
    let what: Vec<String> = missing
        .iter()
        .map(|d| match d.probe {
            Probe::Tool(t) => format!("`{t}` (package {})", d.package),
            Probe::File(f) => format!("{f} (package {})", d.package),
        })
        .collect();
    format!(
        "missing build dependencies: {}; install with `apt-get install {}` or rerun with --install-deps",
        what.join(", "),
        packages(missing).join(" ")
    )
}

/// Parses the `Candidate:` version of `pkg` out of `apt-cache policy PKG...`
/// output (which has one `pkg:` section per package asked for). `None` if
/// apt does not know the package (no `apt-get update` yet?).
pub fn parse_candidate(policy: &str, pkg: &str) -> Option<String> {
    let mut in_pkg = false;
    for line in policy.lines() {
        if !line.starts_with(char::is_whitespace) {
            in_pkg = line.trim_end().strip_suffix(':') == Some(pkg);
        } else if in_pkg {
            if let Some(v) = line.trim().strip_prefix("Candidate:") {
                let v = v.trim();
                return (!v.is_empty() && v != "(none)").then(|| v.to_string());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_missing_tools_and_packages() {
        let gone = ["flex", "bison"];
        let m = missing(GUEST_DEPS, |p| match p {
            Probe::Tool(t) => !gone.contains(&t),
            Probe::File(_) => false,
        });
        let names: Vec<_> = m.iter().map(Dep::name).collect();
        assert_eq!(
            names,
            ["flex", "bison", "libelf-dev", "libc6-dev", "linux-libc-dev"]
        );
        let msg = missing_message(&m);
        assert!(!msg.contains('\n'), "one line: {msg}");
        assert!(msg.contains("`flex` (package flex)"), "{msg}");
        assert!(msg.contains("/usr/include/gelf.h (package libelf-dev)"), "{msg}");
        assert!(
            msg.contains("/usr/lib/x86_64-linux-gnu/libc.a (package libc6-dev)"),
            "{msg}"
        );
        assert!(
            msg.contains("apt-get install flex bison libelf-dev libc6-dev linux-libc-dev"),
            "{msg}"
        );
        assert!(msg.contains("--install-deps"), "{msg}");
    }

    #[test]
    fn only_the_static_libc_missing() {
        let m = missing(GUEST_DEPS, |p| {
            p != Probe::File("/usr/lib/x86_64-linux-gnu/libc.a")
        });
        assert_eq!(
            missing_message(&m),
            "missing build dependencies: /usr/lib/x86_64-linux-gnu/libc.a (package libc6-dev); \
             install with `apt-get install libc6-dev` or rerun with --install-deps"
        );
    }

    #[test]
    fn nothing_missing() {
        assert!(missing(GUEST_DEPS, |_| true).is_empty());
    }

    #[test]
    fn packages_are_deduplicated() {
        assert_eq!(packages(&GUEST_DEPS[..3]), ["apt", "dpkg"]);
    }

    #[test]
    fn which_finds_sh() {
        assert!(which("sh").is_some());
        assert!(which("definitely-not-a-tool-keel").is_none());
    }

    #[test]
    fn apt_policy_candidate() {
        let out = "\
linux-source-6.1:
  Installed: (none)
  Candidate: 6.1.192-2
  Version table:
     6.1.192-2 500
        500 http://deb.example/debian bookworm/main amd64 Packages
busybox-static:
  Installed: (none)
  Candidate: 1:1.35.0-4+deb12u1+b1
  Version table:
unknown-pkg:
  Installed: (none)
  Candidate: (none)
";
        assert_eq!(
            parse_candidate(out, "linux-source-6.1").as_deref(),
            Some("6.1.192-2")
        );
        assert_eq!(
            parse_candidate(out, "busybox-static").as_deref(),
            Some("1:1.35.0-4+deb12u1+b1")
        );
        assert_eq!(parse_candidate(out, "unknown-pkg"), None);
        assert_eq!(parse_candidate(out, "not-listed"), None);
        assert_eq!(parse_candidate("", "busybox-static"), None);
    }
}
