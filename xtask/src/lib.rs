//! Keel's developer tasks, run as `cargo xtask <task>` (the alias lives in
//! `.cargo/config.toml`).
//!
//! # `cargo xtask test`
//!
//! The README's test command, and the only one CI runs for the tests. Before
//! any test runs it gets the host ready, in this order (see [`host`]):
//!
//! 1. finds every host tool the run needs missing: the tests' tools, and the
//!    guest build's when the Linux guest is not cached — all listed in
//!    [`deps::HOST_DEPS`], the one table to extend when a test needs a new
//!    host tool (how: [`deps`]);
//! 2. as root, refreshes apt's package lists (`apt-get update`) and
//!    installs what is missing in one `apt-get install`; not as root, it
//!    names everything missing in one line, says how to install it, and
//!    stops;
//! 3. resolves the Debian package versions of the guest (`apt-cache
//!    policy`) after that refresh, and keys the guest cache by them;
//! 4. finds the guest cached or builds it ([`guest`]);
//! 5. runs `cargo test --workspace --no-fail-fast` with the guest's paths
//!    in `KEEL_GUEST_*` and `KEEL_REQUIRE_LINUX=1`, so the Linux end-to-end
//!    tests cannot be skipped, and a failing test binary does not hide the
//!    results of the ones after it (one run shows every failure).
//!
//! `--no-linux` skips steps 3–4 and the Linux tests' tools; `-- ARGS` go to
//! `cargo test` (with `-p`, only the packages named).
//!
//! # `cargo xtask guest`
//!
//! Builds, from Debian packages and without any other network access, the
//! Linux guest that Keel's end-to-end tests boot, and caches it outside the
//! checkout:
//!
//! * `vmlinux`: an uncompressed ELF kernel with the PVH entry note
//!   (`XEN_ELFNOTE_PHYS32_ENTRY`), built from Debian's `linux-source-6.1`
//!   (or `--kernel-source PATH`) with `make tinyconfig` plus the fragment
//!   `guest/linux/keel.config`;
//! * `bzImage`: the same kernel in the Linux boot protocol format;
//! * `initramfs`: an uncompressed `newc` cpio with Debian's static BusyBox,
//!   `guest/linux/init` as `/init` and `keel-xfer` as `/bin/keel-xfer`;
//! * `xfer`: `keel-xfer`, compiled from `guest/linux/keel-xfer.c` with
//!   `gcc -static` (glibc's `libc.a` from `libc6-dev`); the same binary as
//!   in the initramfs, for the host end of the transfer tests.
//!
//! On success it prints exactly five `name=path` lines on stdout
//! (`vmlinux=`, `bzImage=`, `initramfs=`, `cache=`, `xfer=`, in that order)
//! and nothing else; progress goes to stderr. Artifacts live in
//! `<cache>/<key>/`, where `<cache>` is `$KEEL_CACHE_DIR/guest`,
//! `$XDG_CACHE_HOME/keel/guest` or `~/.cache/keel/guest`, and `<key>` is an
//! FNV-1a 64 hash of every input ([`cache::Inputs`]: the fragment, the init
//! script, `keel-xfer.c`, the Debian package versions or the tarball's
//! content, gcc's and libc6-dev's versions, [`cache::BUILD_LOGIC_VERSION`]
//! and [`cache::KERNEL_LOGIC_VERSION`]). A second run with the same
//! inputs finds the entry and returns at once.
//!
//! Every build happens in a `tmp-<pid>-<key>` directory inside the cache and
//! becomes visible by one `rename`, so an interrupted build never leaves a
//! half-written entry (the next run deletes the leftover directory). The
//! kernel is also kept in `<cache>/kernels/<kernel key>/`, keyed by the
//! kernel's inputs only, so editing `guest/linux/init` or `keel-xfer.c`
//! rebuilds just the initramfs (and `keel-xfer`). Downloaded `.deb`s (`<cache>/downloads/`) and the unpacked
//! kernel tree (`<cache>/src/`) are kept for later builds.
//!
//! Options:
//!
//! * `--install-deps`: as root, refresh the package lists and `apt-get
//!   install` missing build tools (without it, they are named in one line);
//! * `--print`: print the paths if cached, else fail; never builds;
//! * `--rebuild`: delete the cache entry and build again;
//! * `--kernel-source PATH`: a kernel tarball or unpacked tree instead of
//!   Debian's `linux-source-6.1`;
//! * `--jobs N`: parallel make jobs (default: number of CPUs);
//! * `--verbose`: show make's output instead of only logging it.
//!
//! See `guest/linux/README.md` for the configuration choices and timings.
//!
//! The crate has no dependencies; the pure parts (hashing, Kconfig
//! checking, cpio writing, ELF notes, cache paths) are unit-tested, and
//! `cargo test` never builds a kernel.

#![warn(missing_docs)]

pub mod cache;
pub mod cpio;
pub mod deps;
pub mod elf;
pub mod fnv;
pub mod guest;
pub mod host;
pub mod kconfig;
pub mod stock;

use std::path::PathBuf;

/// Options of `cargo xtask guest`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestOpts {
    /// `apt-get install` missing host dependencies.
    pub install_deps: bool,
    /// Only print cached paths; fail if not cached.
    pub print: bool,
    /// Throw away the cache entry and build again.
    pub rebuild: bool,
    /// Kernel tarball or tree instead of Debian's `linux-source-6.1`.
    pub kernel_source: Option<PathBuf>,
    /// `make -j` value; `None` means the number of CPUs.
    pub jobs: Option<usize>,
    /// Stream make's output to stderr.
    pub verbose: bool,
}

/// A parsed command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `cargo xtask guest ...`
    Guest(GuestOpts),
    /// `cargo xtask test [--no-linux] [-- cargo-test-args]`
    Test(TestOpts),
    /// `cargo xtask help` / `--help`
    Help,
}

/// Options of `cargo xtask test`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TestOpts {
    /// Do not build the Linux guest; its end-to-end tests report SKIPPED.
    pub no_linux: bool,
    /// Also fetch Debian's stock cloud kernel and boot it
    /// (`KEEL_STOCK_VMLINUX`; the boot takes tens of minutes where guest
    /// ring 0 is emulated).
    pub stock_kernel: bool,
    /// Arguments passed on to `cargo test`.
    pub cargo_args: Vec<String>,
}

/// Usage text.
pub const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  guest [options]   build (or find cached) Linux guest artifacts and print
                    vmlinux=, bzImage=, initramfs=, cache=, xfer= lines on
                    stdout
      --install-deps        as root: apt-get update, then install missing
                            build tools
      --print               print the cached paths; fail if not cached
      --rebuild             rebuild even if cached
      --kernel-source PATH  kernel tarball or unpacked tree to build instead
                            of Debian's linux-source-6.1
      --jobs N              make -j N (default: number of CPUs)
      --verbose             show make output
  test [--no-linux] [--stock-kernel] [-- ARGS]
                    the whole test suite: first every host tool it needs
                    (xtask/src/deps.rs) — as root apt-get installs the
                    missing ones, else names them all in one line and
                    stops — then the Linux guest (built or found cached),
                    then `cargo test --workspace ARGS` with
                    KEEL_GUEST_VMLINUX/BZIMAGE/INITRAMFS/XFER set and
                    KEEL_REQUIRE_LINUX=1, so the Linux end-to-end tests run
                    and cannot be skipped; --no-linux leaves them out (they
                    then say SKIPPED); ARGS with -p test only those packages;
                    --stock-kernel also fetches Debian's stock cloud kernel
                    (apt-get download) and boots it (KEEL_STOCK_VMLINUX;
                    tens of minutes where guest ring 0 is emulated)
  help              this text

cache: $KEEL_CACHE_DIR/guest, else $XDG_CACHE_HOME/keel/guest, else
       ~/.cache/keel/guest
";

/// Parses the arguments after `cargo xtask`.
pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Command, String> {
    let mut args = args.into_iter();
    let task = match args.next() {
        None => return Ok(Command::Help),
        Some(t) => t,
    };
    match task.as_str() {
        "help" | "-h" | "--help" => Ok(Command::Help),
        "guest" => {
            let mut o = GuestOpts::default();
            while let Some(a) = args.next() {
                let (flag, inline) = match a.split_once('=') {
                    Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
                    _ => (a.clone(), None),
                };
                let mut value = |name: &str| -> Result<String, String> {
                    inline
                        .clone()
                        .or_else(|| args.next())
                        .ok_or_else(|| format!("{name} needs a value"))
                };
                match flag.as_str() {
                    "--install-deps" => o.install_deps = true,
                    "--print" => o.print = true,
                    "--rebuild" => o.rebuild = true,
                    "--verbose" | "-v" => o.verbose = true,
                    "--kernel-source" => o.kernel_source = Some(PathBuf::from(value("--kernel-source")?)),
                    "--jobs" | "-j" => {
                        let v = value("--jobs")?;
                        let n: usize = v
                            .parse()
                            .ok()
                            .filter(|n| *n > 0)
                            .ok_or_else(|| format!("--jobs: not a positive number: `{v}`"))?;
                        o.jobs = Some(n);
                    }
                    "-h" | "--help" => return Ok(Command::Help),
                    other => {
                        return Err(format!(
                            "guest: unknown option `{other}` (see `cargo xtask help`)"
                        ))
                    }
                }
            }
            if o.print && (o.rebuild || o.install_deps) {
                return Err("--print cannot be combined with --rebuild or --install-deps".into());
            }
            Ok(Command::Guest(o))
        }
        "test" => {
            let mut o = TestOpts::default();
            while let Some(a) = args.next() {
                match a.as_str() {
                    "--no-linux" => o.no_linux = true,
                    "--stock-kernel" => o.stock_kernel = true,
                    "--" => {
                        o.cargo_args = args.by_ref().collect();
                        break;
                    }
                    "-h" | "--help" => return Ok(Command::Help),
                    other => return Err(format!("test: unknown option `{other}` (see `cargo xtask help`)")),
                }
            }
            Ok(Command::Test(o))
        }
        other => Err(format!("unknown task `{other}` (see `cargo xtask help`)")),
    }
}

/// Runs the command line; returns the process exit code.
pub fn main_with_args<I: IntoIterator<Item = String>>(args: I) -> i32 {
    match parse_args(args) {
        Ok(Command::Help) => {
            print!("{USAGE}");
            0
        }
        Ok(Command::Guest(opts)) => match guest::run_guest(&opts) {
            Ok(artifacts) => {
                print!("{}", cache::format_outputs(&artifacts.outputs()));
                0
            }
            Err(e) => {
                eprintln!("error: {e}");
                1
            }
        },
        Ok(Command::Test(opts)) => match run_tests(&opts) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e}");
                1
            }
        },
        Err(e) => {
            eprintln!("error: {e}");
            2
        }
    }
}

/// The environment variable through which `cargo xtask test` hands the
/// output `name` (of `cargo xtask guest`) to the tests; `None` for `cache`.
pub fn test_env_var(name: &str) -> Option<&'static str> {
    match name {
        "vmlinux" => Some("KEEL_GUEST_VMLINUX"),
        "bzImage" => Some("KEEL_GUEST_BZIMAGE"),
        "initramfs" => Some("KEEL_GUEST_INITRAMFS"),
        "xfer" => Some("KEEL_GUEST_XFER"),
        _ => None,
    }
}

/// The arguments of the `cargo test` that `cargo xtask test -- ARGS` runs:
/// the whole workspace, unless ARGS pick packages (`cargo test --workspace
/// -p X` would still test every package), and every test binary even after
/// one fails (`--no-fail-fast`, unless ARGS have it already).
pub fn cargo_test_args(args: &[String]) -> Vec<String> {
    let cargo_args = || args.iter().take_while(|a| *a != "--");
    let picks_packages = cargo_args().any(|a| {
        a == "-p" || a == "--package" || a.starts_with("--package=") || (a.starts_with("-p") && a.len() > 2)
    });
    let mut v = vec!["test".to_string()];
    if !picks_packages {
        v.push("--workspace".into());
    }
    if !cargo_args().any(|a| a == "--no-fail-fast") {
        v.push("--no-fail-fast".into());
    }
    v.extend(args.iter().cloned());
    v
}

/// What `cargo xtask test` says when tools are missing and it is not root.
pub const TEST_INSTALL_HINT: &str = "or run `cargo xtask test` as root, which installs them";

/// The [`deps::Need`]s of a `cargo xtask test` run (the guest build's are
/// added when the guest is not cached).
pub fn test_needs(opts: &TestOpts) -> &'static [deps::Need] {
    if opts.no_linux {
        &[deps::Need::Tests]
    } else {
        &[deps::Need::Tests, deps::Need::LinuxTests]
    }
}

/// `cargo xtask test`: every host tool the run needs (installed as root,
/// else named in one line), the guest artifacts, then the workspace's
/// tests — no test starts before all of that is in place.
fn run_tests(opts: &TestOpts) -> Result<i32, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(guest::repo_root())
        .args(cargo_test_args(&opts.cargo_args));
    let tools = deps::needed_for(test_needs(opts));
    let mut host = host::SystemHost {
        prefix: "xtask test",
        verbose: false,
    };
    let may_change_host = host::is_root();
    if opts.no_linux {
        let request = host::Request {
            packages: &[],
            tools: &tools,
            build_tools: &[],
            may_change_host,
            how_to_install: TEST_INSTALL_HINT,
        };
        host::prepare(&mut host, &request, |_| host::GuestState::Cached)?;
    } else {
        let artifacts = guest::guest_for(
            &GuestOpts::default(),
            &tools,
            may_change_host,
            TEST_INSTALL_HINT,
            &mut host,
        )?;
        for (name, path) in artifacts.outputs() {
            let Some(var) = test_env_var(name) else {
                continue;
            };
            cmd.env(var, path);
        }
        cmd.env("KEEL_REQUIRE_LINUX", "1");
        if opts.stock_kernel {
            let root = cache::guest_cache_root(
                std::env::var_os("KEEL_CACHE_DIR"),
                std::env::var_os("XDG_CACHE_HOME"),
                std::env::var_os("HOME"),
            )?;
            cmd.env("KEEL_STOCK_VMLINUX", stock::stock_vmlinux(&root)?);
        }
    }
    eprintln!("xtask test: {cmd:?}");
    let status = cmd.status().map_err(|e| format!("cannot run cargo test: {e}"))?;
    Ok(status.code().unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &[&str]) -> Result<Command, String> {
        parse_args(v.iter().map(|s| s.to_string()))
    }

    #[test]
    fn guest_defaults() {
        assert_eq!(parse(&["guest"]), Ok(Command::Guest(GuestOpts::default())));
        assert_eq!(parse(&[]), Ok(Command::Help));
        assert_eq!(parse(&["help"]), Ok(Command::Help));
    }

    #[test]
    fn guest_flags() {
        let Ok(Command::Guest(o)) = parse(&[
            "guest",
            "--install-deps",
            "--kernel-source",
            "/src/linux-6.1.tar.xz",
            "--jobs=3",
            "-v",
        ]) else {
            panic!("parse failed");
        };
        assert!(o.install_deps && o.verbose && !o.print && !o.rebuild);
        assert_eq!(o.kernel_source, Some(PathBuf::from("/src/linux-6.1.tar.xz")));
        assert_eq!(o.jobs, Some(3));
        let Ok(Command::Guest(o)) = parse(&["guest", "--print"]) else {
            panic!()
        };
        assert!(o.print);
    }

    #[test]
    fn test_task_takes_cargo_args_after_double_dash() {
        assert_eq!(
            parse(&["test", "--no-linux", "--", "-p", "keel-vmm"]),
            Ok(Command::Test(TestOpts {
                no_linux: true,
                stock_kernel: false,
                cargo_args: vec!["-p".into(), "keel-vmm".into()]
            }))
        );
        assert!(matches!(
            parse(&["test", "--stock-kernel"]),
            Ok(Command::Test(TestOpts {
                stock_kernel: true,
                ..
            }))
        ));
        assert!(parse(&["test", "--bogus"]).unwrap_err().contains("--bogus"));
    }

    #[test]
    fn cargo_test_covers_the_workspace_unless_packages_are_picked() {
        let args = |v: &[&str]| cargo_test_args(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(args(&[]), ["test", "--workspace", "--no-fail-fast"]);
        assert_eq!(
            args(&["--", "--nocapture"]),
            ["test", "--workspace", "--no-fail-fast", "--", "--nocapture"]
        );
        assert_eq!(args(&["-p", "xtask"]), ["test", "--no-fail-fast", "-p", "xtask"]);
        assert_eq!(
            args(&["--", "-p"]),
            ["test", "--workspace", "--no-fail-fast", "--", "-p"]
        );
        assert_eq!(args(&["-pkeel"]), ["test", "--no-fail-fast", "-pkeel"]);
        assert_eq!(
            args(&["--package=keel", "--test", "linux_e2e"]),
            ["test", "--no-fail-fast", "--package=keel", "--test", "linux_e2e"]
        );
        // Given already, it is not given twice (cargo refuses a repeat).
        assert_eq!(
            args(&["--no-fail-fast"]),
            ["test", "--workspace", "--no-fail-fast"]
        );
    }

    #[test]
    fn test_needs_leave_the_linux_tools_out_with_no_linux() {
        use deps::Need::*;
        assert_eq!(test_needs(&TestOpts::default()), [Tests, LinuxTests]);
        let no_linux = TestOpts {
            no_linux: true,
            ..TestOpts::default()
        };
        assert_eq!(test_needs(&no_linux), [Tests]);
    }

    #[test]
    fn every_artifact_reaches_the_tests() {
        let a = cache::Artifacts::new(std::path::Path::new("/c"), "k");
        let vars: Vec<_> = a
            .outputs()
            .iter()
            .filter_map(|(name, _)| test_env_var(name))
            .collect();
        assert_eq!(
            vars,
            [
                "KEEL_GUEST_VMLINUX",
                "KEEL_GUEST_BZIMAGE",
                "KEEL_GUEST_INITRAMFS",
                "KEEL_GUEST_XFER"
            ]
        );
        assert_eq!(test_env_var("cache"), None);
    }

    #[test]
    fn guest_errors() {
        assert!(parse(&["guest", "--bogus"]).unwrap_err().contains("--bogus"));
        assert!(parse(&["guest", "--jobs", "0"]).is_err());
        assert!(parse(&["guest", "--kernel-source"]).is_err());
        assert!(parse(&["guest", "--print", "--rebuild"]).is_err());
        assert!(parse(&["kernel"]).unwrap_err().contains("unknown task"));
    }
}
