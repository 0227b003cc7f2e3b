//! Getting the host ready before anything builds or any test runs: which
//! tools are missing, refreshing apt's package lists, installing, and
//! resolving the Debian package versions the guest's cache key takes — in
//! that order.
//!
//! The order matters: a version read from package lists that are about to
//! be refreshed may no longer exist in the archive once they are (`apt-get
//! download linux-source-6.1=6.1.172-1` → "Version '6.1.172-1' was not
//! found"). So every refresh makes [`prepare`] read the versions again, and
//! the cache key is computed from what it returns. The decisions are a pure
//! function of a [`Host`], so they are unit-tested with a fake apt.

use crate::deps::{self, Dep, Probe};
use std::process::{Command, Stdio};

/// What [`prepare`] needs from the machine. [`SystemHost`] is the real one.
pub trait Host {
    /// The output of `apt-cache policy PKGS...`.
    fn apt_policy(&mut self, pkgs: &[&str]) -> Result<String, String>;
    /// `apt-get update`.
    fn apt_update(&mut self) -> Result<(), String>;
    /// `apt-get install PKGS...`.
    fn apt_install(&mut self, pkgs: &[&str]) -> Result<(), String>;
    /// Whether `probe` is satisfied now.
    fn present(&self, probe: Probe) -> bool;
}

/// Where the guest stands for a given set of package versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestState {
    /// The artifacts for these versions are cached: nothing to build.
    Cached,
    /// A build is needed; `downloads` says whether it must fetch a `.deb`
    /// (then the package lists must be current).
    Build {
        /// Some `.deb` of these versions is not on hand yet.
        downloads: bool,
    },
}

/// What one run asks of the host.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    /// Debian packages whose candidate versions the guest build takes, in
    /// order; empty when no guest is wanted.
    pub packages: &'a [&'a str],
    /// Tools needed whatever the guest's state (the tests').
    pub tools: &'a [Dep],
    /// Tools needed only to build the guest.
    pub build_tools: &'a [Dep],
    /// May this run change the host: `apt-get update` and `install` (root
    /// and allowed)?
    pub may_change_host: bool,
    /// How else to get the tools installed, ending the one-line message
    /// when they cannot be installed here.
    pub how_to_install: &'a str,
}

/// The outcome of [`prepare`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepared {
    /// One version per [`Request::packages`] entry: the ones to build with
    /// and to key the cache by.
    pub versions: Vec<String>,
    /// The guest's state for those versions (`None` when no guest is
    /// wanted).
    pub guest: Option<GuestState>,
    /// Whether `versions` were read from the refreshed lists (`false` when
    /// there was no refresh, or when a guest found cached before it was
    /// kept).
    pub from_refreshed_lists: bool,
    /// Whether the package lists were refreshed.
    pub refreshed: bool,
    /// The packages installed.
    pub installed: Vec<&'static str>,
}

/// Names packages apt knows no version of (`None` entries of `versions`).
fn unknown_versions(packages: &[&str], versions: &[Option<String>]) -> Vec<String> {
    packages
        .iter()
        .zip(versions)
        .filter(|(_, v)| v.is_none())
        .map(|(p, _)| format!("`{p}`"))
        .collect()
}

/// Gets the host ready for `req`: installs (when allowed) or names, in one
/// line, every missing tool; refreshes the package lists before any install
/// and before a build that downloads; and resolves the package versions
/// after the last refresh. `guest` tells, for a set of versions, whether the
/// guest is cached (it is asked again after each refresh and install, since
/// both the versions and the compiler's may change).
///
/// A guest found cached before a refresh is kept: installing a test tool
/// must not move the kernel to a newer package version and rebuild it.
pub fn prepare(
    host: &mut dyn Host,
    req: &Request<'_>,
    mut guest: impl FnMut(&[String]) -> GuestState,
) -> Result<Prepared, String> {
    let wants_guest = !req.packages.is_empty();
    let mut refreshed = false;
    let mut installed: Vec<&'static str> = Vec::new();
    // Versions whose guest was cached before a refresh.
    let mut kept: Option<Vec<String>> = None;
    loop {
        let still_cached = kept.as_deref().map(&mut guest) == Some(GuestState::Cached);
        let (versions, state, from_refreshed_lists) = match &kept {
            Some(v) if still_cached => (vec_some(v.clone()), Some(GuestState::Cached), false),
            _ => {
                let versions: Vec<Option<String>> = if wants_guest {
                    let policy = host.apt_policy(req.packages)?;
                    req.packages.iter().map(|p| parse_candidate(&policy, p)).collect()
                } else {
                    Vec::new()
                };
                let known: Option<Vec<String>> = versions.iter().cloned().collect();
                let state = match (&known, wants_guest) {
                    (Some(v), true) => Some(guest(v)),
                    _ => None,
                };
                (versions, state, refreshed && wants_guest)
            }
        };
        if !refreshed && state == Some(GuestState::Cached) {
            kept = versions.iter().cloned().collect();
        }
        let building = wants_guest && state != Some(GuestState::Cached);
        let mut wanted: Vec<Dep> = Vec::new();
        if building {
            wanted.extend_from_slice(req.build_tools);
        }
        wanted.extend_from_slice(req.tools);
        let missing = deps::missing(&wanted, |p| host.present(p));
        // A download needs current lists; so does an unknown version.
        let lists_needed = building && !matches!(state, Some(GuestState::Build { downloads: false }));
        let done = missing.is_empty() && (!lists_needed || refreshed || !req.may_change_host);
        if done {
            let unknown = unknown_versions(req.packages, &versions);
            if !unknown.is_empty() {
                return Err(if refreshed {
                    format!(
                        "apt knows no version of {} even after `apt-get update`: is Debian's main archive in /etc/apt/sources.list?",
                        unknown.join(" and ")
                    )
                } else {
                    format!(
                        "apt knows no version of {}: run `apt-get update` as root (`cargo xtask test` as root does)",
                        unknown.join(" and ")
                    )
                });
            }
            return Ok(Prepared {
                versions: versions.into_iter().flatten().collect(),
                guest: state,
                from_refreshed_lists,
                refreshed,
                installed,
            });
        }
        // Each package is installed once: what is still missing after
        // that, apt cannot provide.
        let to_install: Vec<&'static str> = deps::packages(&missing)
            .into_iter()
            .filter(|p| !installed.contains(p))
            .collect();
        if !missing.is_empty() && (to_install.is_empty() || !req.may_change_host) {
            let msg = deps::missing_message(&missing, req.how_to_install);
            return Err(if installed.is_empty() {
                msg
            } else {
                format!("after apt-get install {}: {msg}", installed.join(" "))
            });
        }
        // From here on the host may change.
        if !refreshed {
            host.apt_update()?;
            refreshed = true;
        }
        if !to_install.is_empty() {
            host.apt_install(&to_install)?;
            installed.extend(to_install);
        }
    }
}

fn vec_some(v: Vec<String>) -> Vec<Option<String>> {
    v.into_iter().map(Some).collect()
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

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // The effective uid without libc: /proc/self/status, line "Uid: r e s f".
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// This machine: apt and `$PATH`. Progress goes to stderr with `prefix`.
pub struct SystemHost {
    /// Prefix of the progress lines (`xtask test`, `xtask guest`).
    pub prefix: &'static str,
    /// Stream apt-get's output to stderr instead of dropping it.
    pub verbose: bool,
}

impl SystemHost {
    fn apt_get(&self, args: &[&str]) -> Result<(), String> {
        let desc = format!("apt-get {}", args.join(" "));
        eprintln!("{}: {desc}", self.prefix);
        if deps::which("apt-get").is_none() {
            return Err(format!(
                "`apt-get` not found: cannot run `{desc}`; Keel's tasks need a Debian-based host"
            ));
        }
        let mut cmd = Command::new("apt-get");
        cmd.args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null());
        // stdout is reserved for `cargo xtask guest`'s name=path lines.
        let out = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| format!("cannot run {desc}: {e}"))?;
        if self.verbose {
            eprint!("{}", String::from_utf8_lossy(&out.stdout));
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
        }
        if out.status.success() {
            return Ok(());
        }
        let tail = |b: &[u8]| {
            let t = String::from_utf8_lossy(b).into_owned();
            let lines: Vec<&str> = t.lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n")
        };
        Err(format!(
            "{desc} failed ({}):\n{}\n{}",
            out.status,
            tail(&out.stdout),
            tail(&out.stderr)
        ))
    }
}

impl Host for SystemHost {
    fn apt_policy(&mut self, pkgs: &[&str]) -> Result<String, String> {
        if deps::which("apt-cache").is_none() {
            return Err(format!(
                "`apt-cache` not found: the Linux guest is built from Debian's {}",
                pkgs.join(" and ")
            ));
        }
        let out = Command::new("apt-cache")
            .arg("policy")
            .args(pkgs)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("cannot run apt-cache policy: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "apt-cache policy {} failed ({})",
                pkgs.join(" "),
                out.status
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn apt_update(&mut self) -> Result<(), String> {
        self.apt_get(&["update", "-q"])
    }

    fn apt_install(&mut self, pkgs: &[&str]) -> Result<(), String> {
        let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
        args.extend_from_slice(pkgs);
        self.apt_get(&args)
    }

    fn present(&self, probe: Probe) -> bool {
        deps::present(probe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deps::{needed_for, Need};

    const PKGS: &[&str] = &["busybox-static", "linux-source-6.1"];
    const BUSYBOX: &str = "1:1.35.0-4+deb12u1+b1";

    fn policy(kernel: Option<&str>) -> String {
        let mut s = format!(
            "busybox-static:\n  Installed: (none)\n  Candidate: {BUSYBOX}\n  Version table:\n     {BUSYBOX} 500\n"
        );
        if let Some(k) = kernel {
            s.push_str(&format!(
                "linux-source-6.1:\n  Installed: (none)\n  Candidate: {k}\n  Version table:\n     {k} 500\n        500 http://deb.debian.org/debian bookworm/main amd64 Packages\n"
            ));
        }
        s
    }

    /// apt as a fake: what `apt-cache policy` says before and after
    /// `apt-get update`, which tools are absent until installed, and a log
    /// of every call.
    struct FakeApt {
        kernel_before: Option<&'static str>,
        kernel_after: Option<&'static str>,
        updated: bool,
        absent: Vec<&'static str>,
        /// Packages `apt-get install` cannot actually provide.
        broken: Vec<&'static str>,
        calls: Vec<String>,
    }

    impl FakeApt {
        fn new(before: Option<&'static str>, after: Option<&'static str>, absent: &[&'static str]) -> Self {
            FakeApt {
                kernel_before: before,
                kernel_after: after,
                updated: false,
                absent: absent.to_vec(),
                broken: Vec::new(),
                calls: Vec::new(),
            }
        }
    }

    impl Host for FakeApt {
        fn apt_policy(&mut self, pkgs: &[&str]) -> Result<String, String> {
            self.calls.push(format!("policy {}", pkgs.join(" ")));
            Ok(policy(if self.updated {
                self.kernel_after
            } else {
                self.kernel_before
            }))
        }
        fn apt_update(&mut self) -> Result<(), String> {
            self.calls.push("update".into());
            self.updated = true;
            Ok(())
        }
        fn apt_install(&mut self, pkgs: &[&str]) -> Result<(), String> {
            assert!(self.updated, "apt-get install before apt-get update");
            self.calls.push(format!("install {}", pkgs.join(" ")));
            let broken = self.broken.clone();
            self.absent.retain(|name| {
                let dep = dep_named(name);
                !pkgs.contains(&dep.package) || broken.contains(&dep.package)
            });
            Ok(())
        }
        fn present(&self, probe: Probe) -> bool {
            let name = match probe {
                Probe::Tool(t) => t,
                Probe::File(f) => crate::deps::HOST_DEPS
                    .iter()
                    .find(|d| d.probe == probe)
                    .map(|d| d.package)
                    .unwrap_or(f),
            };
            !self.absent.contains(&name)
        }
    }

    fn dep_named(name: &str) -> Dep {
        *crate::deps::HOST_DEPS
            .iter()
            .find(|d| d.name() == name)
            .unwrap_or_else(|| panic!("{name} is not in HOST_DEPS"))
    }

    struct Suite {
        tools: Vec<Dep>,
        build: Vec<Dep>,
    }

    fn suite() -> Suite {
        Suite {
            tools: needed_for(&[Need::Tests, Need::LinuxTests]),
            build: needed_for(&[Need::GuestBuild]),
        }
    }

    const HOW: &str = "or run `cargo xtask test` as root, which installs them";

    fn request<'a>(s: &'a Suite, may_change_host: bool) -> Request<'a> {
        Request {
            packages: PKGS,
            tools: &s.tools,
            build_tools: &s.build,
            may_change_host,
            how_to_install: HOW,
        }
    }

    /// Runs [`prepare`] for the whole suite (`may_change_host`: as root)
    /// against `apt` and a cache that holds the guest for `cached` kernel
    /// versions and the `.deb`s of `on_hand` ones; also returns every
    /// version set the cache was asked about, in order.
    fn run(
        apt: &mut FakeApt,
        may_change_host: bool,
        cached: &[&str],
        on_hand: &[&str],
    ) -> (Result<Prepared, String>, Vec<Vec<String>>) {
        let s = suite();
        let mut asked: Vec<Vec<String>> = Vec::new();
        let r = prepare(apt, &request(&s, may_change_host), |v: &[String]| {
            asked.push(v.to_vec());
            assert_eq!(v[0], BUSYBOX);
            if cached.contains(&v[1].as_str()) {
                GuestState::Cached
            } else {
                GuestState::Build {
                    downloads: !on_hand.contains(&v[1].as_str()),
                }
            }
        });
        (r, asked)
    }

    #[test]
    fn the_kernel_version_is_resolved_again_after_the_lists_are_refreshed() {
        // The fresh machine: stale lists name 6.1.172-1, which the
        // archive no longer has; flex, bison, libelf-dev and dnsmasq absent.
        let mut apt = FakeApt::new(
            Some("6.1.172-1"),
            Some("6.1.192-3"),
            &["flex", "bison", "libelf-dev", "dnsmasq"],
        );
        let (p, asked) = run(&mut apt, true, &[], &[]);
        let p = p.unwrap();
        assert_eq!(p.versions, [BUSYBOX, "6.1.192-3"]);
        assert_eq!(p.guest, Some(GuestState::Build { downloads: true }));
        assert!(p.refreshed && p.from_refreshed_lists);
        assert_eq!(p.installed, ["flex", "bison", "libelf-dev", "dnsmasq-base"]);
        assert_eq!(
            apt.calls,
            [
                "policy busybox-static linux-source-6.1",
                "update",
                "install flex bison libelf-dev dnsmasq-base",
                "policy busybox-static linux-source-6.1",
            ]
        );
        // The cache key is computed from the refreshed version last.
        assert_eq!(asked.last().unwrap()[1], "6.1.192-3");
    }

    #[test]
    fn stale_lists_are_refreshed_before_a_download_even_with_every_tool_present() {
        let mut apt = FakeApt::new(Some("6.1.172-1"), Some("6.1.192-3"), &[]);
        let p = run(&mut apt, true, &[], &[]).0.unwrap();
        assert_eq!(p.versions[1], "6.1.192-3");
        assert!(p.installed.is_empty());
        assert_eq!(
            apt.calls,
            [
                "policy busybox-static linux-source-6.1",
                "update",
                "policy busybox-static linux-source-6.1",
            ]
        );
    }

    #[test]
    fn a_refreshed_version_that_is_cached_is_not_rebuilt() {
        let mut apt = FakeApt::new(Some("6.1.172-1"), Some("6.1.192-3"), &["dnsmasq"]);
        let p = run(&mut apt, true, &["6.1.192-3"], &[]).0.unwrap();
        assert_eq!(p.versions[1], "6.1.192-3");
        assert_eq!(p.guest, Some(GuestState::Cached));
        // The guest did not need building after the refresh: no kernel tools.
        assert_eq!(p.installed, ["dnsmasq-base"]);
    }

    #[test]
    fn without_package_lists_the_versions_are_read_after_the_refresh() {
        // A container image ships without package lists at all.
        let mut apt = FakeApt::new(None, Some("6.1.192-3"), &[]);
        let (p, asked) = run(&mut apt, true, &[], &[]);
        let p = p.unwrap();
        assert_eq!(p.versions[1], "6.1.192-3");
        assert_eq!(asked, [vec![BUSYBOX.to_string(), "6.1.192-3".into()]]);
    }

    #[test]
    fn a_cached_guest_is_kept_when_only_a_test_tool_is_installed() {
        // Installing dnsmasq refreshes the lists; the kernel package moved
        // on meanwhile, but the guest built from the old one stays in use.
        let mut apt = FakeApt::new(Some("6.1.192-3"), Some("6.1.200-1"), &["dnsmasq", "flex"]);
        let (p, asked) = run(&mut apt, true, &["6.1.192-3"], &[]);
        let p = p.unwrap();
        assert!(asked.iter().all(|v| v[1] == "6.1.192-3"), "{asked:?}");
        assert_eq!(p.versions[1], "6.1.192-3");
        assert_eq!(p.guest, Some(GuestState::Cached));
        assert_eq!(
            p.installed,
            ["dnsmasq-base"],
            "no kernel tools for a cached guest"
        );
        assert_eq!(
            apt.calls,
            [
                "policy busybox-static linux-source-6.1",
                "update",
                "install dnsmasq-base",
            ]
        );
    }

    #[test]
    fn a_cached_guest_needs_neither_build_tools_nor_a_refresh() {
        let mut apt = FakeApt::new(Some("6.1.192-3"), None, &["flex", "bison", "gcc"]);
        let p = run(&mut apt, false, &["6.1.192-3"], &[]).0.unwrap();
        assert_eq!(p.guest, Some(GuestState::Cached));
        assert_eq!(apt.calls, ["policy busybox-static linux-source-6.1"]);
    }

    #[test]
    fn debs_on_hand_need_no_refresh() {
        let mut apt = FakeApt::new(Some("6.1.192-3"), Some("6.1.200-1"), &[]);
        let p = run(&mut apt, true, &[], &["6.1.192-3"]).0.unwrap();
        assert_eq!(p.versions[1], "6.1.192-3");
        assert_eq!(p.guest, Some(GuestState::Build { downloads: false }));
        assert!(!p.refreshed);
    }

    #[test]
    fn without_root_everything_missing_is_named_in_one_line_and_nothing_changes() {
        let mut apt = FakeApt::new(
            Some("6.1.172-1"),
            Some("6.1.192-3"),
            &["flex", "bison", "libelf-dev", "dnsmasq", "mkfs.ext4"],
        );
        let err = run(&mut apt, false, &[], &[]).0.unwrap_err();
        assert_eq!(
            err,
            "missing host tools: `flex` (package flex), `bison` (package bison), \
             /usr/include/gelf.h (package libelf-dev), `mkfs.ext4` (package e2fsprogs), \
             `dnsmasq` (package dnsmasq-base); install them with `apt-get update && apt-get install \
             flex bison libelf-dev e2fsprogs dnsmasq-base` or run `cargo xtask test` as root, which installs them"
        );
        assert_eq!(apt.calls, ["policy busybox-static linux-source-6.1"]);
    }

    #[test]
    fn without_root_stale_lists_are_used_as_they_are() {
        // Nothing to install and no right to refresh: the build tries the
        // download (whose error says to refresh the lists).
        let mut apt = FakeApt::new(Some("6.1.172-1"), Some("6.1.192-3"), &[]);
        let p = run(&mut apt, false, &[], &[]).0.unwrap();
        assert_eq!(p.versions[1], "6.1.172-1");
        assert!(!p.refreshed);
    }

    #[test]
    fn an_unknown_package_is_named() {
        let mut apt = FakeApt::new(None, None, &[]);
        let err = run(&mut apt, false, &[], &[]).0.unwrap_err();
        assert!(
            err.contains("no version of `linux-source-6.1`: run `apt-get update` as root"),
            "{err}"
        );
        let mut apt = FakeApt::new(None, None, &[]);
        let err = run(&mut apt, true, &[], &[]).0.unwrap_err();
        assert!(
            err.contains("no version of `linux-source-6.1` even after `apt-get update`"),
            "{err}"
        );
        assert_eq!(apt.calls.iter().filter(|c| *c == "update").count(), 1);
    }

    #[test]
    fn a_tool_still_missing_after_the_install_is_named() {
        let mut apt = FakeApt::new(Some("6.1.192-3"), Some("6.1.192-3"), &["dnsmasq"]);
        apt.broken = vec!["dnsmasq-base"];
        let err = run(&mut apt, true, &["6.1.192-3"], &[]).0.unwrap_err();
        assert!(
            err.starts_with("after apt-get install dnsmasq-base: missing host tools: `dnsmasq`"),
            "{err}"
        );
        assert_eq!(apt.calls.iter().filter(|c| c.starts_with("install")).count(), 1);
    }

    #[test]
    fn without_a_guest_no_package_versions_are_asked_for() {
        // `cargo xtask test --no-linux`: only the test tools.
        let tools = needed_for(&[Need::Tests]);
        let req = Request {
            packages: &[],
            tools: &tools,
            build_tools: &[],
            may_change_host: true,
            how_to_install: HOW,
        };
        let mut apt = FakeApt::new(None, None, &["ip"]);
        let p = prepare(&mut apt, &req, |_| unreachable!("no guest wanted")).unwrap();
        assert!(p.versions.is_empty());
        assert_eq!(p.installed, ["iproute2"]);
        assert_eq!(apt.calls, ["update", "install iproute2"]);
        let mut apt = FakeApt::new(None, None, &[]);
        prepare(&mut apt, &req, |_| unreachable!()).unwrap();
        assert!(apt.calls.is_empty(), "nothing to do: {:?}", apt.calls);
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
