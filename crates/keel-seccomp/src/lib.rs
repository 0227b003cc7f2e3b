//! Seccomp filters for the threads of a Keel VMM, one per thread role,
//! built with rust-vmm's [`seccompiler`].
//!
//! A VMM's threads do different work, so each gets its own allow-list:
//!
//! | role | thread | what it may do |
//! |---|---|---|
//! | [`ThreadRole::Vcpu`] | `keel-vcpuN` | run its vCPU (`KVM_RUN`, state get/set), raise interrupts, emulate device registers |
//! | [`ThreadRole::Devices`] | `keel-events` (and a device's own I/O thread) | virtio queues: file and socket I/O on descriptors it already holds, interrupts |
//! | [`ThreadRole::Api`] | the API server and its connections | build, start, pause, snapshot and restore VMs: open files, create the VM, spawn threads |
//! | [`ThreadRole::Main`] | `keel`'s main thread once the VM runs | wait for the VM, restore the terminal, tear down |
//!
//! Arguments are checked where the anchor has one: `ioctl` requests against
//! the role's list of KVM, tap and terminal requests; `mmap`/`mprotect`
//! never with `PROT_EXEC`; `socket` only `AF_UNIX`; `fcntl`, `madvise`,
//! `prctl` and `tgkill` only with the commands, advice and signals named.
//!
//! [`apply`] installs a role's filter on the calling thread (its threads
//! inherit it), one call per role:
//!
//! ```no_run
//! use keel_seccomp::{apply, SeccompLevel, ThreadRole};
//! std::thread::spawn(|| {
//!     apply(ThreadRole::Devices, SeccompLevel::Kill).expect("seccomp filter");
//!     // ... the device loop ...
//! });
//! ```
//!
//! At [`SeccompLevel::Kill`] a forbidden system call ends the process: the
//! filter traps it and a `SIGSYS` handler writes one line naming the role
//! and the call (`keel: seccomp: the vcpu filter forbids socket (41)`) to
//! standard error and exits with [`EXIT_FORBIDDEN_SYSCALL`] (159, as a
//! shell reports a death by `SIGSYS`). At [`SeccompLevel::Log`] the call
//! goes through and the kernel logs it (an `audit: type=1326` line with
//! the thread's name and `syscall=N`), for finding what a filter misses.

mod ioctls;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::os::raw::{c_int, c_ulong, c_void};
use std::str::FromStr;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

/// The exit status of a process whose filter stopped a system call at
/// [`SeccompLevel::Kill`]: 128 + `SIGSYS`, what a shell shows for a death
/// by that signal.
pub const EXIT_FORBIDDEN_SYSCALL: i32 = 159;

/// What a thread of a VMM does, which decides what it may call.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadRole {
    /// Runs one vCPU and handles its exits (port and MMIO accesses, so the
    /// device registers' emulation).
    Vcpu,
    /// Processes virtio queues and other device events.
    Devices,
    /// Serves the control API: builds, starts, pauses, snapshots and
    /// restores VMs.
    Api,
    /// A `keel` process's main thread once its VM runs: waits for the VM,
    /// restores the terminal and tears down.
    Main,
}

impl ThreadRole {
    /// Every role.
    pub const ALL: [ThreadRole; 4] = [
        ThreadRole::Vcpu,
        ThreadRole::Devices,
        ThreadRole::Api,
        ThreadRole::Main,
    ];

    /// The role's name, as reports and documentation give it.
    pub const fn name(self) -> &'static str {
        match self {
            ThreadRole::Vcpu => "vcpu",
            ThreadRole::Devices => "devices",
            ThreadRole::Api => "api",
            ThreadRole::Main => "main",
        }
    }

    const fn index(self) -> usize {
        match self {
            ThreadRole::Vcpu => 0,
            ThreadRole::Devices => 1,
            ThreadRole::Api => 2,
            ThreadRole::Main => 3,
        }
    }
}

impl fmt::Display for ThreadRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a filter treats a system call outside its role's list.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeccompLevel {
    /// No filter.
    Off,
    /// Allow it, and have the kernel log it (for finding what a filter
    /// misses while debugging).
    Log,
    /// End the process, naming the call (the default).
    #[default]
    Kill,
}

impl SeccompLevel {
    const fn index(self) -> usize {
        match self {
            SeccompLevel::Off => 0,
            SeccompLevel::Log => 1,
            SeccompLevel::Kill => 2,
        }
    }
}

impl fmt::Display for SeccompLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeccompLevel::Off => "off",
            SeccompLevel::Log => "log",
            SeccompLevel::Kill => "kill",
        })
    }
}

impl FromStr for SeccompLevel {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "off" => Ok(SeccompLevel::Off),
            "log" => Ok(SeccompLevel::Log),
            "kill" => Ok(SeccompLevel::Kill),
            _ => Err(Error::UnknownLevel(s.to_owned())),
        }
    }
}

/// What can go wrong building or installing a filter.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A seccomp level that is not `off`, `log` or `kill`.
    #[error("seccomp level {0:?}: expected off, log or kill")]
    UnknownLevel(String),
    /// The role's rules did not compile (a bug in this crate).
    #[error("the {role} seccomp filter does not compile: {message}")]
    Compile {
        /// The role whose filter failed.
        role: ThreadRole,
        /// seccompiler's report.
        message: String,
    },
    /// The kernel refused the filter.
    #[error("cannot install the {role} seccomp filter: {message}")]
    Install {
        /// The role whose filter failed.
        role: ThreadRole,
        /// seccompiler's report.
        message: String,
    },
    /// The `SIGSYS` handler that reports a stopped call could not be set.
    #[error("cannot install the SIGSYS handler for seccomp reports: {0}")]
    SignalHandler(#[source] std::io::Error),
}

/// Installs `role`'s filter on the calling thread at `level` (nothing at
/// [`SeccompLevel::Off`]). Threads the caller spawns afterwards inherit
/// it; a filter cannot be removed, and a second one only narrows the
/// first. At [`SeccompLevel::Kill`] this also installs the process-wide
/// `SIGSYS` handler that reports the stopped call (replacing any other).
pub fn apply(role: ThreadRole, level: SeccompLevel) -> Result<(), Error> {
    let Some(program) = program(role, level)? else {
        return Ok(());
    };
    if level == SeccompLevel::Kill {
        install_sigsys_handler()?;
    }
    THREAD_ROLE.with(|r| r.set(Some(role)));
    seccompiler::apply_filter(program).map_err(|e| Error::Install {
        role,
        message: e.to_string(),
    })
}

/// `role`'s filter at `level` as a BPF program (`None` at
/// [`SeccompLevel::Off`]), compiled once per process.
pub fn program(role: ThreadRole, level: SeccompLevel) -> Result<Option<&'static BpfProgram>, Error> {
    static COMPILED: [[OnceLock<BpfProgram>; 3]; 4] = [const { [const { OnceLock::new() }; 3] }; 4];
    if level == SeccompLevel::Off {
        return Ok(None);
    }
    let Some(cell) = COMPILED.get(role.index()).and_then(|r| r.get(level.index())) else {
        return Ok(None);
    };
    if let Some(program) = cell.get() {
        return Ok(Some(program));
    }
    let compiled = compile(role, level)?;
    Ok(Some(cell.get_or_init(|| compiled)))
}

/// The system calls `role` may make, by name, sorted (arguments may be
/// restricted further; see the crate documentation).
pub fn allowed_syscalls(role: ThreadRole) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = rules(role)
        .map(|rules| {
            rules
                .keys()
                .filter_map(|&nr| u32::try_from(nr).ok())
                .map(|nr| syscalls::Sysno::from(nr).name())
                .collect()
        })
        .unwrap_or_default();
    names.sort_unstable();
    names
}

fn compile(role: ThreadRole, level: SeccompLevel) -> Result<BpfProgram, Error> {
    let compile_error = |message: String| Error::Compile { role, message };
    let mismatch = match level {
        SeccompLevel::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let filter = SeccompFilter::new(rules(role)?, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| compile_error(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| compile_error(e.to_string()))
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// Builds an allow-list.
struct Allow {
    role: ThreadRole,
    /// Calls allowed with any arguments.
    any: std::collections::BTreeSet<i64>,
    /// Calls allowed when one of their rules matches.
    when: Rules,
}

impl Allow {
    fn new(role: ThreadRole) -> Self {
        Allow {
            role,
            any: std::collections::BTreeSet::new(),
            when: BTreeMap::new(),
        }
    }

    /// `nr` with any arguments.
    fn calls(&mut self, nrs: &[i64]) {
        self.any.extend(nrs);
    }

    /// `nr` when argument `arg` (its low 32 bits) is one of `values`.
    fn arg_in(&mut self, nr: i64, arg: u8, values: &[u64]) -> Result<(), Error> {
        for &value in values {
            let condition = self.condition(arg, SeccompCmpOp::Eq, value)?;
            self.push(nr, vec![condition])?;
        }
        Ok(())
    }

    /// `nr` when none of `bits` are set in argument `arg`.
    fn arg_without(&mut self, nr: i64, arg: u8, bits: u64) -> Result<(), Error> {
        let condition = self.condition(arg, SeccompCmpOp::MaskedEq(bits), 0)?;
        self.push(nr, vec![condition])
    }

    /// `nr` when argument `arg` is within `low..=high`.
    fn arg_range(&mut self, nr: i64, arg: u8, low: u64, high: u64) -> Result<(), Error> {
        let conditions = vec![
            self.condition(arg, SeccompCmpOp::Ge, low)?,
            self.condition(arg, SeccompCmpOp::Le, high)?,
        ];
        self.push(nr, conditions)
    }

    fn condition(&self, arg: u8, op: SeccompCmpOp, value: u64) -> Result<SeccompCondition, Error> {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(|e| Error::Compile {
            role: self.role,
            message: e.to_string(),
        })
    }

    fn push(&mut self, nr: i64, conditions: Vec<SeccompCondition>) -> Result<(), Error> {
        let rule = SeccompRule::new(conditions).map_err(|e| Error::Compile {
            role: self.role,
            message: e.to_string(),
        })?;
        self.when.entry(nr).or_default().push(rule);
        Ok(())
    }

    /// The list, as seccompiler takes it (an empty rule list allows any
    /// arguments).
    fn finish(mut self) -> Rules {
        for nr in self.any {
            self.when.insert(nr, Vec::new());
        }
        self.when
    }
}

/// What every thread does: memory, locks, time, its own signals, logging
/// to descriptors it holds, ending.
fn common(allow: &mut Allow) -> Result<(), Error> {
    allow.calls(&[
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_close,
        libc::SYS_lseek,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_getrandom,
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_restart_syscall,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ]);
    // No executable mappings.
    let exec = to_u64(libc::PROT_EXEC);
    allow.arg_without(libc::SYS_mmap, 2, exec)?;
    allow.arg_without(libc::SYS_mprotect, 2, exec)?;
    // Freeing memory (the allocator, a thread's stack, balloon pages) and
    // pre-faulting it; never MADV_HWPOISON and friends.
    allow.arg_in(
        libc::SYS_madvise,
        2,
        &[
            to_u64(libc::MADV_DONTNEED),
            to_u64(libc::MADV_FREE),
            to_u64(libc::MADV_REMOVE),
            to_u64(libc::MADV_WILLNEED),
            to_u64(libc::MADV_HUGEPAGE),
            to_u64(libc::MADV_NOHUGEPAGE),
            to_u64(libc::MADV_DONTDUMP),
            to_u64(libc::MADV_POPULATE_READ),
            to_u64(libc::MADV_POPULATE_WRITE),
        ],
    )?;
    allow.arg_in(
        libc::SYS_fcntl,
        1,
        &[
            to_u64(libc::F_GETFD),
            to_u64(libc::F_SETFD),
            to_u64(libc::F_GETFL),
            to_u64(libc::F_SETFL),
            to_u64(libc::F_DUPFD_CLOEXEC),
        ],
    )?;
    // Kicking a vCPU out of KVM_RUN (a real-time signal), and abort().
    allow.arg_range(
        libc::SYS_tgkill,
        2,
        to_u64(libc::SIGRTMIN()),
        to_u64(libc::SIGRTMAX()),
    )?;
    allow.arg_in(libc::SYS_tgkill, 2, &[to_u64(libc::SIGABRT)])?;
    Ok(())
}

fn to_u64(value: c_int) -> u64 {
    // The filter compares the argument's low 32 bits.
    u64::from(value.cast_unsigned())
}

fn ioctls(allow: &mut Allow, requests: &[c_ulong]) -> Result<(), Error> {
    let values: Vec<u64> = requests.iter().map(|&r| r & 0xffff_ffff).collect();
    allow.arg_in(libc::SYS_ioctl, 1, &values)
}

/// I/O on descriptors a device already holds: files, taps, sockets,
/// eventfds and timerfds, through an epoll loop.
fn device_io(allow: &mut Allow) -> Result<(), Error> {
    allow.calls(&[
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_ctl,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_preadv2,
        libc::SYS_pwritev2,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_fallocate,
        libc::SYS_ftruncate,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_accept4,
        libc::SYS_connect,
        libc::SYS_shutdown,
        libc::SYS_getsockopt,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_timerfd_settime,
        libc::SYS_timerfd_gettime,
    ]);
    // vsock's host side connects to Unix sockets.
    allow.arg_in(libc::SYS_socket, 0, &[to_u64(libc::AF_UNIX)])?;
    Ok(())
}

/// Building and running VMs from a control thread: everything above, plus
/// opening files and /dev/kvm, creating the VM's descriptors, spawning its
/// threads and installing their filters.
fn control(allow: &mut Allow) -> Result<(), Error> {
    device_io(allow)?;
    allow.calls(&[
        libc::SYS_openat,
        libc::SYS_open,
        libc::SYS_mkdirat,
        libc::SYS_mkdir,
        libc::SYS_unlinkat,
        libc::SYS_unlink,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_rename,
        libc::SYS_linkat,
        libc::SYS_readlinkat,
        libc::SYS_readlink,
        libc::SYS_getdents64,
        libc::SYS_faccessat,
        libc::SYS_faccessat2,
        libc::SYS_access,
        libc::SYS_fchmod,
        libc::SYS_fchmodat,
        libc::SYS_umask,
        libc::SYS_getcwd,
        libc::SYS_statfs,
        libc::SYS_fstatfs,
        libc::SYS_copy_file_range,
        libc::SYS_sendfile,
        libc::SYS_dup,
        libc::SYS_dup3,
        libc::SYS_pipe2,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        libc::SYS_setsockopt,
        libc::SYS_eventfd2,
        libc::SYS_timerfd_create,
        libc::SYS_epoll_create1,
        libc::SYS_memfd_create,
        libc::SYS_mincore,
        libc::SYS_sysinfo,
        libc::SYS_uname,
        libc::SYS_getuid,
        libc::SYS_geteuid,
        libc::SYS_getgid,
        libc::SYS_getegid,
        // Threads: spawning (clone3's flags are out of a filter's reach;
        // execve is forbidden, so no new program runs), their start-up.
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_rt_sigaction,
    ]);
    allow.arg_in(
        libc::SYS_prctl,
        0,
        &[
            to_u64(libc::PR_SET_NAME),
            to_u64(libc::PR_GET_NAME),
            to_u64(libc::PR_SET_NO_NEW_PRIVS),
        ],
    )?;
    // A VM's threads narrow their filter further.
    allow.arg_in(libc::SYS_seccomp, 0, &[u64::from(libc::SECCOMP_SET_MODE_FILTER)])?;
    let mut requests = ioctls::machine();
    requests.extend(ioctls::vcpu());
    requests.extend(ioctls::interrupts());
    requests.extend(ioctls::device_files());
    requests.extend(ioctls::tap_setup());
    requests.extend(ioctls::terminal());
    ioctls(allow, &requests)
}

fn rules(role: ThreadRole) -> Result<Rules, Error> {
    let mut allow = Allow::new(role);
    common(&mut allow)?;
    match role {
        ThreadRole::Vcpu => {
            let mut requests = ioctls::vcpu();
            requests.extend(ioctls::interrupts());
            // A driver acknowledging virtio-net's features sets the tap's
            // offloads from the vCPU thread.
            requests.extend(ioctls::device_files());
            ioctls(&mut allow, &requests)?;
        }
        ThreadRole::Devices => {
            device_io(&mut allow)?;
            let mut requests = ioctls::interrupts();
            requests.extend(ioctls::device_files());
            ioctls(&mut allow, &requests)?;
        }
        ThreadRole::Api => control(&mut allow)?,
        ThreadRole::Main => {
            allow.calls(&[libc::SYS_poll, libc::SYS_ppoll, libc::SYS_epoll_ctl]);
            // Tearing the VM down: devices remove the Unix sockets they
            // created (vsock, console), disks flush, sockets shut down.
            allow.calls(&[
                libc::SYS_unlink,
                libc::SYS_unlinkat,
                libc::SYS_fsync,
                libc::SYS_fdatasync,
                libc::SYS_shutdown,
            ]);
            ioctls(&mut allow, &ioctls::terminal())?;
        }
    }
    Ok(allow.finish())
}

thread_local! {
    // The role whose filter this thread installed last. Const-initialised
    // with no destructor, so the SIGSYS handler may read it.
    static THREAD_ROLE: Cell<Option<ThreadRole>> = const { Cell::new(None) };
}

/// `siginfo_t` as the kernel fills it for `SIGSYS` on x86_64.
#[repr(C)]
struct SigsysInfo {
    signo: c_int,
    errno: c_int,
    code: c_int,
    _pad: c_int,
    call_addr: *mut c_void,
    syscall: c_int,
    arch: u32,
}

/// A fixed buffer the handler formats its line into (no allocation in a
/// signal handler).
struct Line {
    buf: [u8; 224],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if let Some(slot) = self.buf.get_mut(self.len) {
                *slot = b;
                self.len = self.len.saturating_add(1);
            }
        }
    }

    fn push_hex(&mut self, mut n: u64) {
        let mut digits = [0u8; 16];
        let mut i = digits.len();
        loop {
            i = i.saturating_sub(1);
            if let Some(d) = digits.get_mut(i) {
                *d = b"0123456789abcdef"
                    .get((n & 0xf) as usize)
                    .copied()
                    .unwrap_or(b'?');
            }
            n >>= 4;
            if n == 0 || i == 0 {
                break;
            }
        }
        self.push(b"0x");
        if let Some(digits) = digits.get(i..) {
            self.push(digits);
        }
    }

    fn push_number(&mut self, mut n: u32) {
        let mut digits = [0u8; 10];
        let mut i = digits.len();
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
        if let Some(digits) = digits.get(i..) {
            self.push(digits);
        }
    }
}

extern "C" fn report_forbidden_syscall(_: c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    let nr = if info.is_null() {
        u32::MAX
    } else {
        // SAFETY: the kernel passes SIGSYS handlers a siginfo_t of its
        // full size (128 bytes), whose first 32 bytes are `SigsysInfo`'s
        // layout for that signal; the read is unaligned-safe.
        let info = unsafe { std::ptr::read_unaligned(info.cast::<SigsysInfo>()) };
        info.syscall.cast_unsigned()
    };
    let mut line = Line {
        buf: [0; 224],
        len: 0,
    };
    line.push(b"keel: seccomp: the ");
    let role = THREAD_ROLE.with(Cell::get);
    line.push(role.map_or("inherited", ThreadRole::name).as_bytes());
    line.push(b" filter forbids ");
    line.push(
        syscalls::Sysno::new(nr as usize)
            .map_or("an unknown call", |s| s.name())
            .as_bytes(),
    );
    line.push(b" (");
    line.push_number(nr);
    if !context.is_null() {
        // SAFETY: the kernel passes an SA_SIGINFO handler the interrupted
        // thread's ucontext_t; its saved registers hold the call's
        // arguments (rdi, rsi, rdx on x86_64).
        let gregs = unsafe { (*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
        line.push(b", arguments");
        for reg in [libc::REG_RDI, libc::REG_RSI, libc::REG_RDX] {
            line.push(b" ");
            let value = usize::try_from(reg)
                .ok()
                .and_then(|r| gregs.get(r))
                .copied()
                .unwrap_or(0);
            line.push_hex(value.cast_unsigned());
        }
    }
    line.push(b"); the process exits\n");
    let text = line.buf.get(..line.len).unwrap_or_default();
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is
    // live for the call.
    unsafe {
        libc::write(libc::STDERR_FILENO, text.as_ptr().cast(), text.len());
        libc::_exit(EXIT_FORBIDDEN_SYSCALL);
    }
}

fn install_sigsys_handler() -> Result<(), Error> {
    static RESULT: OnceLock<Result<(), i32>> = OnceLock::new();
    let result = RESULT.get_or_init(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask"
        // start; the handler is an `extern "C"` function with the
        // SA_SIGINFO signature that only calls async-signal-safe functions.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = report_forbidden_syscall as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
            }
        }
    });
    result.map_err(|errno| Error::SignalHandler(std::io::Error::from_raw_os_error(errno)))
}
