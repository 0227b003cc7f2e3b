//! A jailer for Keel: runs a VMM (or any program) confined the way a
//! multi-tenant host needs, before it reads a byte a guest wrote.
//!
//! [`Jail::run`] does, in order:
//!
//! 1. Lays out `<base>/<program>/<id>/root`, owned by the jail's uid/gid,
//!    holding only the program, the shared libraries it loads (found with
//!    `ldd`; none for a static build), the `/dev/kvm`, `/dev/net/tun` and
//!    `/dev/urandom` nodes (made with `mknod`, owned by the jail's uid/gid)
//!    and the files named with [`JailFile`] (kernels, initrds, disks,
//!    bind-mounted read-only unless writable is asked).
//! 2. Creates the cgroup `keel/<id>` with the limits given (cgroup v2; a
//!    controller the host only has on a v1 hierarchy is set there).
//! 3. Unshares the mount, PID, IPC and UTS namespaces (and the network
//!    namespace, or joins a named one), then forks: the child is PID 1 of
//!    the new PID namespace.
//! 4. In the child: joins the cgroup, makes the mounts private, bind-mounts
//!    the files, `pivot_root`s into the jail and detaches the host's tree,
//!    sets the host name to the id, sets the rlimits, closes every
//!    descriptor but 0, 1, 2 and those kept, drops supplementary groups,
//!    gid and uid (so every capability), sets `no_new_privs` and executes
//!    the program with the arguments given and an empty environment (but
//!    `RUST_LOG` and `RUST_BACKTRACE`).
//! 5. Waits for the child, removes the cgroup and returns the child's exit
//!    status (128 + the signal if one killed it).
//!
//! The jail directory is left in place (the program's sockets live in
//! it); removing it is the caller's. Paths the program is given (`--kernel`,
//! `--api-sock`) are paths inside the jail.
//!
//! The child between `fork` and `exec` only makes system calls on values
//! built before the fork, so `run` is sound from a multi-threaded process.

mod cgroup;

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::io::RawFd;
use std::path::{Path, PathBuf};

/// The exit status of a jail whose set-up failed in the child (the
/// message on standard error names the step).
pub const EXIT_JAIL_FAILED: i32 = 125;

/// The device nodes every jail gets.
pub const DEVICES: [&str; 3] = ["/dev/kvm", "/dev/net/tun", "/dev/urandom"];

/// What can go wrong setting a jail up.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The id is empty, too long or has characters other than ASCII
    /// letters, digits, `-` and `_`.
    #[error("jail id {0:?}: use 1 to 64 ASCII letters, digits, '-' or '_'")]
    BadId(String),
    /// A path the jail needs is missing or unusable.
    #[error("{what} {path}: {source}")]
    Path {
        /// What the path is for.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// A destination inside the jail that is not an absolute path without
    /// `..`.
    #[error("jail file destination {0}: must be absolute, without '..'")]
    BadDestination(PathBuf),
    /// A cgroup could not be created or a limit not written.
    #[error("cgroup: {what}: {source}")]
    Cgroup {
        /// The step, with the file and value.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// A system call of the set-up failed.
    #[error("{what}: {source}")]
    Sys {
        /// The step.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// A host file made visible inside the jail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailFile {
    /// The file on the host.
    pub source: PathBuf,
    /// Where the program sees it (absolute, inside the jail).
    pub dest: PathBuf,
    /// Mounted read-write (a disk image) rather than read-only.
    pub writable: bool,
}

impl std::str::FromStr for JailFile {
    type Err = String;

    /// `SRC[:DEST][:rw]`; DEST defaults to SRC.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts: Vec<&str> = s.split(':').collect();
        let writable = parts.last() == Some(&"rw");
        if writable || parts.last() == Some(&"ro") {
            parts.pop();
        }
        match parts.as_slice() {
            [source] if !source.is_empty() => Ok(JailFile {
                source: source.into(),
                dest: source.into(),
                writable,
            }),
            [source, dest] if !source.is_empty() && !dest.is_empty() => Ok(JailFile {
                source: source.into(),
                dest: dest.into(),
                writable,
            }),
            _ => Err(format!("jail file {s:?}: expected SRC[:DEST][:rw]")),
        }
    }
}

/// The network namespace the jailed program runs in.
#[non_exhaustive]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NetNamespace {
    /// The jailer's own.
    #[default]
    Inherit,
    /// A new, empty one (only a loopback device, down).
    New,
    /// One that exists, named by its path (`/var/run/netns/NAME`).
    Join(PathBuf),
}

/// A resource limit (`setrlimit`).
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rlimit {
    /// Open descriptors (`RLIMIT_NOFILE`).
    NoFile(u64),
    /// The largest file the program may write (`RLIMIT_FSIZE`), bytes.
    FileSize(u64),
    /// Processes and threads of the uid (`RLIMIT_NPROC`).
    Processes(u64),
    /// Core dump size (`RLIMIT_CORE`), bytes.
    Core(u64),
}

impl std::str::FromStr for Rlimit {
    type Err = String;

    /// `no-file=N`, `fsize=N`, `nproc=N` or `core=N`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, value) = s
            .split_once('=')
            .ok_or_else(|| format!("resource limit {s:?}: expected NAME=VALUE"))?;
        let value: u64 = value
            .parse()
            .map_err(|_| format!("resource limit {s:?}: {value:?} is not a number"))?;
        match name {
            "no-file" | "nofile" => Ok(Rlimit::NoFile(value)),
            "fsize" => Ok(Rlimit::FileSize(value)),
            "nproc" => Ok(Rlimit::Processes(value)),
            "core" => Ok(Rlimit::Core(value)),
            _ => Err(format!(
                "resource limit {s:?}: unknown {name:?} (no-file, fsize, nproc or core)"
            )),
        }
    }
}

impl Rlimit {
    fn resource_and_value(self) -> (libc::__rlimit_resource_t, u64) {
        match self {
            Rlimit::NoFile(v) => (libc::RLIMIT_NOFILE, v),
            Rlimit::FileSize(v) => (libc::RLIMIT_FSIZE, v),
            Rlimit::Processes(v) => (libc::RLIMIT_NPROC, v),
            Rlimit::Core(v) => (libc::RLIMIT_CORE, v),
        }
    }
}

/// A jail to run one program in.
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct Jail {
    /// The jail's name: its directory, cgroup and host name.
    pub id: String,
    /// The program to run, copied into the jail.
    pub exec_file: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// The uid it runs as.
    pub uid: u32,
    /// The gid it runs as (and no supplementary groups).
    pub gid: u32,
    /// Where jails are laid out.
    pub base_dir: PathBuf,
    /// Host files to show it.
    pub files: Vec<JailFile>,
    /// Its network namespace.
    pub netns: NetNamespace,
    /// Cgroup limits as `file=value` in v2's names (`cpu.max=50000 100000`,
    /// `memory.max=536870912`, `pids.max=64`).
    pub cgroup: Vec<(String, String)>,
    /// Resource limits.
    pub rlimits: Vec<Rlimit>,
    /// Descriptors beyond 0, 1 and 2 it keeps (a tap, a listening socket).
    pub keep_fds: Vec<RawFd>,
}

/// Where jails go by default (Firecracker's jailer uses `/srv/jailer`).
pub const DEFAULT_BASE_DIR: &str = "/srv/keel-jail";

impl Jail {
    /// A jail named `id` for `exec_file`, run as `uid`/`gid`, with no
    /// files, limits or kept descriptors yet.
    pub fn new(id: impl Into<String>, exec_file: impl Into<PathBuf>, uid: u32, gid: u32) -> Self {
        Jail {
            id: id.into(),
            exec_file: exec_file.into(),
            args: Vec::new(),
            uid,
            gid,
            base_dir: PathBuf::from(DEFAULT_BASE_DIR),
            files: Vec::new(),
            netns: NetNamespace::Inherit,
            cgroup: Vec::new(),
            rlimits: Vec::new(),
            keep_fds: Vec::new(),
        }
    }

    /// The jail's root directory on the host.
    pub fn root(&self) -> PathBuf {
        let name = self
            .exec_file
            .file_name()
            .map(PathBuf::from)
            .unwrap_or_else(|| "program".into());
        self.base_dir.join(name).join(&self.id).join("root")
    }

    /// Sets the jail up, runs the program in it and waits for it; returns
    /// its exit status (128 + the signal if one killed it). While it waits,
    /// SIGTERM, SIGINT and SIGHUP to this process kill the program (which,
    /// as PID 1 of its namespace, would ignore them) and the jail is
    /// cleaned up as on any exit; the program also dies if this process
    /// does.
    pub fn run(&self) -> Result<i32, Error> {
        let plan = self.prepare()?;
        let cgroup = cgroup::create("keel", &self.id, &self.cgroup)?;
        let status = self.spawn(&plan, &cgroup);
        cgroup.remove();
        status
    }

    fn prepare(&self) -> Result<Plan, Error> {
        if self.id.is_empty()
            || self.id.len() > 64
            || !self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(Error::BadId(self.id.clone()));
        }
        let path_error = |what: &'static str, path: &Path| {
            let path = path.to_owned();
            move |source| Error::Path { what, path, source }
        };
        let exec = std::fs::canonicalize(&self.exec_file).map_err(path_error("program", &self.exec_file))?;
        let root = self.root();
        std::fs::create_dir_all(&root).map_err(path_error("jail root", &root))?;
        chown(&root, self.uid, self.gid)?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o750))
            .map_err(path_error("jail root", &root))?;
        // The program, and what its loader needs.
        let name = exec
            .file_name()
            .map(PathBuf::from)
            .unwrap_or_else(|| "program".into());
        let inside_exec = Path::new("/").join(&name);
        copy_into(&root, &exec, &inside_exec)?;
        for library in shared_libraries(&exec)? {
            // The file itself where the loader looks for it, not a link to
            // a path the jail lacks.
            let file = std::fs::canonicalize(&library).map_err(path_error("shared library", &library))?;
            copy_into(&root, &file, &library)?;
        }
        for node in DEVICES {
            make_node(&root, Path::new(node), self.uid, self.gid)?;
        }
        let mut binds = Vec::new();
        for file in &self.files {
            if !file.dest.is_absolute()
                || file
                    .dest
                    .components()
                    .any(|c| c == std::path::Component::ParentDir)
            {
                return Err(Error::BadDestination(file.dest.clone()));
            }
            let source =
                std::fs::canonicalize(&file.source).map_err(path_error("jail file", &file.source))?;
            let target = in_jail(&root, &file.dest)?;
            if !target.exists() {
                std::fs::File::create(&target).map_err(path_error("jail file", &target))?;
            }
            binds.push(Bind {
                source: cstring(source.as_os_str().as_bytes())?,
                target: cstring(target.as_os_str().as_bytes())?,
                writable: file.writable,
                label: cstring(format!("keel-jail: bind-mounting {}: ", file.source.display()).as_bytes())?,
            });
        }
        let netns = match &self.netns {
            NetNamespace::Join(path) => Some(
                std::fs::File::open(path)
                    .map(std::os::fd::OwnedFd::from)
                    .map_err(path_error("network namespace", path))?,
            ),
            _ => None,
        };
        let mut argv = vec![cstring(inside_exec.as_os_str().as_bytes())?];
        for arg in &self.args {
            argv.push(cstring(arg.as_bytes())?);
        }
        let mut envp = Vec::new();
        for key in ["RUST_LOG", "RUST_BACKTRACE"] {
            if let Some(value) = std::env::var_os(key) {
                let mut entry = OsString::from(key);
                entry.push("=");
                entry.push(value);
                envp.push(cstring(entry.as_bytes())?);
            }
        }
        let mut keep = self.keep_fds.clone();
        keep.retain(|&fd| fd > 2);
        keep.sort_unstable();
        keep.dedup();
        Ok(Plan {
            root: cstring(root.as_os_str().as_bytes())?,
            exec: argv.first().cloned().unwrap_or_default(),
            argv,
            envp,
            binds,
            netns,
            hostname: cstring(self.id.as_bytes())?,
            rlimits: self.rlimits.iter().map(|r| r.resource_and_value()).collect(),
            keep,
            uid: self.uid,
            gid: self.gid,
        })
    }

    fn spawn(&self, plan: &Plan, cgroup: &cgroup::Cgroup) -> Result<i32, Error> {
        let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
        if self.netns == NetNamespace::New {
            flags |= libc::CLONE_NEWNET;
        }
        let procs: Vec<CString> = cgroup
            .dirs
            .iter()
            .map(|d| cstring(d.join("cgroup.procs").as_os_str().as_bytes()))
            .collect::<Result<_, _>>()?;
        let argv: Vec<*const libc::c_char> = plan
            .argv
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let envp: Vec<*const libc::c_char> = plan
            .envp
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        // clone(2) with the namespace flags, fork-like (no new stack): the
        // child starts in its own namespaces, PID 1 of the new PID
        // namespace, and this process's stay as they were (unshare would
        // change the caller's, and fails in a multi-threaded process).
        // SAFETY: after the clone the child calls only async-signal-safe
        // system calls on values built above and then execs or _exits.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_clone,
                libc::c_ulong::from((flags | libc::SIGCHLD).cast_unsigned()),
                0usize,
                0usize,
                0usize,
                0usize,
            )
        };
        if ret < 0 {
            return Err(sys_error("clone into new namespaces"));
        }
        let pid = libc::pid_t::try_from(ret).unwrap_or(-1);
        if pid > 0 {
            forward_termination_to(pid);
        }
        if pid == 0 {
            // SAFETY: the pointers are to CStrings and arrays owned by this
            // function's frame, alive until exec replaces the process.
            unsafe { child(plan, &procs, &argv, &envp) };
        }
        let mut status = 0;
        loop {
            // SAFETY: waitpid writes the status into the local.
            let ret = unsafe { libc::waitpid(pid, &mut status, 0) };
            if ret == pid {
                break;
            }
            if ret < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return Err(sys_error("waiting for the jailed program"));
            }
        }
        Ok(if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            128 + libc::WTERMSIG(status)
        })
    }
}

/// The jailed program's PID, for the jailer's termination handler.
static CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn kill_child(_: libc::c_int) {
    let pid = CHILD.load(std::sync::atomic::Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// SIGTERM, SIGINT or SIGHUP to the jailer end the jailed program (PID 1
/// of its namespace, which would ignore them), and the jailer then cleans
/// up as on any exit.
fn forward_termination_to(pid: libc::pid_t) {
    CHILD.store(pid, std::sync::atomic::Ordering::Relaxed);
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: installs an async-signal-safe handler with an empty mask.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = kill_child as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

struct Bind {
    source: CString,
    target: CString,
    writable: bool,
    label: CString,
}

/// Everything the child needs, built before the fork.
struct Plan {
    root: CString,
    exec: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    binds: Vec<Bind>,
    netns: Option<std::os::fd::OwnedFd>,
    hostname: CString,
    rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
    keep: Vec<RawFd>,
    uid: u32,
    gid: u32,
}

fn cstring(bytes: &[u8]) -> Result<CString, Error> {
    CString::new(bytes).map_err(|_| Error::Sys {
        what: format!("{:?} contains a NUL byte", String::from_utf8_lossy(bytes)),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })
}

fn sys_error(what: &str) -> Error {
    Error::Sys {
        what: what.to_owned(),
        source: std::io::Error::last_os_error(),
    }
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), Error> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|source| Error::Path {
        what: "chown",
        path: path.to_owned(),
        source,
    })
}

/// Where the absolute path `inside` of the jail is on the host, its parent
/// directories made.
fn in_jail(root: &Path, inside: &Path) -> Result<PathBuf, Error> {
    let target = root.join(inside.strip_prefix("/").unwrap_or(inside));
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|source| Error::Path {
            what: "jail directory",
            path: parent.to_owned(),
            source,
        })?;
    }
    Ok(target)
}

/// Copies `source` to `inside` (an absolute path in the jail), hard-linking
/// when on the same file system.
fn copy_into(root: &Path, source: &Path, inside: &Path) -> Result<(), Error> {
    let target = in_jail(root, inside)?;
    let _ = std::fs::remove_file(&target);
    if std::fs::hard_link(source, &target).is_err() {
        std::fs::copy(source, &target).map_err(|e| Error::Path {
            what: "copying into the jail",
            path: source.to_owned(),
            source: e,
        })?;
    }
    Ok(())
}

/// The shared objects `exec` loads, as `ldd` lists them (none for a
/// statically linked program).
fn shared_libraries(exec: &Path) -> Result<Vec<PathBuf>, Error> {
    let output = std::process::Command::new("ldd")
        .arg(exec)
        .output()
        .map_err(|e| Error::Path {
            what: "ldd (from libc-bin, to list the program's libraries)",
            path: exec.to_owned(),
            source: e,
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        // "not a dynamic executable": nothing to copy.
        return Ok(Vec::new());
    }
    let mut libraries = Vec::new();
    for line in text.lines() {
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libraries.push(PathBuf::from(path));
        }
    }
    Ok(libraries)
}

/// Makes the device node `node` inside the jail, with the host node's
/// numbers, owned by the jail's uid/gid.
fn make_node(root: &Path, node: &Path, uid: u32, gid: u32) -> Result<(), Error> {
    let host = std::fs::metadata(node).map_err(|source| Error::Path {
        what: "device",
        path: node.to_owned(),
        source,
    })?;
    let target = in_jail(root, node)?;
    let _ = std::fs::remove_file(&target);
    let c_target = cstring(target.as_os_str().as_bytes())?;
    // SAFETY: mknod on a path this function owns, with the host node's
    // device number.
    if unsafe { libc::mknod(c_target.as_ptr(), libc::S_IFCHR | 0o660, host.rdev()) } != 0 {
        return Err(Error::Path {
            what: "mknod",
            path: target,
            source: std::io::Error::last_os_error(),
        });
    }
    chown(&target, uid, gid)
}

/// Writes `label` and the errno to standard error and exits.
///
/// # Safety
/// Only async-signal-safe calls; for the child after fork.
unsafe fn fail(label: &std::ffi::CStr) -> ! {
    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    let mut digits = [0u8; 12];
    let mut i = digits.len();
    let mut n = errno.unsigned_abs();
    loop {
        i = i.saturating_sub(1);
        if let Some(d) = digits.get_mut(i) {
            *d = b'0'.saturating_add((n % 10) as u8);
        }
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    let bytes = label.to_bytes();
    // SAFETY: write and _exit are async-signal-safe; buffers are live.
    unsafe {
        libc::write(2, bytes.as_ptr().cast(), bytes.len());
        libc::write(2, b"errno ".as_ptr().cast(), 6);
        if let Some(digits) = digits.get(i..) {
            libc::write(2, digits.as_ptr().cast(), digits.len());
        }
        libc::write(2, b"\n".as_ptr().cast(), 1);
        libc::_exit(EXIT_JAIL_FAILED)
    }
}

/// The child's side: confine and exec.
///
/// # Safety
/// Call only in the child of a fork, with `argv` and `envp` pointing into
/// `plan` and NUL-terminated.
unsafe fn child(
    plan: &Plan,
    procs: &[CString],
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> ! {
    macro_rules! step {
        ($ok:expr, $label:expr) => {
            if !$ok {
                fail($label)
            }
        };
    }
    // SAFETY: each call below is a plain system call on values owned by
    // `plan` (alive until exec) or literals.
    unsafe {
        if let Some(netns) = &plan.netns {
            use std::os::fd::AsRawFd;
            step!(
                libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) == 0,
                c"keel-jail: joining the network namespace: "
            );
        }
        for path in procs {
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            step!(fd >= 0, c"keel-jail: opening the cgroup: ");
            step!(
                libc::write(fd, b"0".as_ptr().cast(), 1) == 1,
                c"keel-jail: joining the cgroup: "
            );
            libc::close(fd);
        }
        let none = std::ptr::null();
        step!(
            libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null()
            ) == 0,
            c"keel-jail: making mounts private: "
        );
        for bind in &plan.binds {
            if libc::mount(
                bind.source.as_ptr(),
                bind.target.as_ptr(),
                none,
                libc::MS_BIND,
                std::ptr::null(),
            ) != 0
            {
                fail(&bind.label);
            }
            if !bind.writable
                && libc::mount(
                    none,
                    bind.target.as_ptr(),
                    none,
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                    std::ptr::null(),
                ) != 0
            {
                fail(&bind.label);
            }
        }
        step!(
            libc::mount(
                plan.root.as_ptr(),
                plan.root.as_ptr(),
                none,
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null()
            ) == 0,
            c"keel-jail: bind-mounting the jail root: "
        );
        step!(
            libc::chdir(plan.root.as_ptr()) == 0,
            c"keel-jail: entering the jail root: "
        );
        step!(
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) == 0,
            c"keel-jail: pivot_root: "
        );
        step!(
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH) == 0,
            c"keel-jail: detaching the host's tree: "
        );
        step!(libc::chdir(c"/".as_ptr()) == 0, c"keel-jail: chdir /: ");
        step!(
            libc::sethostname(plan.hostname.as_ptr(), plan.hostname.as_bytes().len()) == 0,
            c"keel-jail: sethostname: "
        );
        for &(resource, value) in &plan.rlimits {
            let limit = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            step!(libc::setrlimit(resource, &limit) == 0, c"keel-jail: setrlimit: ");
        }
        // Close every descriptor but 0-2 and the kept ones: the ranges
        // between them.
        let mut next: libc::c_uint = 3;
        for &fd in &plan.keep {
            let fd = fd.cast_unsigned();
            if fd > next {
                libc::syscall(libc::SYS_close_range, next, fd - 1, 0);
            }
            next = fd.saturating_add(1);
        }
        libc::syscall(libc::SYS_close_range, next, libc::c_uint::MAX, 0);
        step!(
            libc::setgroups(0, std::ptr::null()) == 0,
            c"keel-jail: setgroups: "
        );
        step!(
            libc::setresgid(plan.gid, plan.gid, plan.gid) == 0,
            c"keel-jail: setresgid: "
        );
        step!(
            libc::setresuid(plan.uid, plan.uid, plan.uid) == 0,
            c"keel-jail: setresuid: "
        );
        step!(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0,
            c"keel-jail: no_new_privs: "
        );
        // The program dies with the jailer (set after the uid change,
        // which clears it). As PID 1 of its namespace it ignores signals
        // it has no handler for, SIGKILL from outside excepted.
        step!(
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) == 0,
            c"keel-jail: parent-death signal: "
        );
        libc::execve(plan.exec.as_ptr(), argv.as_ptr(), envp.as_ptr());
        fail(c"keel-jail: executing the program: ")
    }
}
