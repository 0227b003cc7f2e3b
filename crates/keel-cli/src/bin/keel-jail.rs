//! `keel-jail`: run a Keel VMM (or another program) in a jail. See the
//! `keel_jail` crate documentation and docs/security.md for what it does.

// The flags' doc comments are clap's help text, written for a terminal.
#![allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use keel_jail::{Jail, JailFile, NetNamespace, Rlimit};

/// Run a program (the `keel` VMM) confined: new mount, PID, IPC and UTS
/// namespaces, pivot_root into <base>/<program>/<id>/root holding only the
/// program, its libraries, /dev/kvm, /dev/net/tun, /dev/urandom and the
/// files named, cgroup limits, rlimits, an unprivileged uid/gid and no
/// inherited descriptors but 0-2 and those kept. Paths given to the
/// program are paths inside the jail.
///
/// Exit status: the program's (128 + N if signal N killed it), 125 when
/// setting the jail up failed.
#[derive(Parser, Debug)]
#[command(name = "keel-jail", version)]
struct Args {
    /// The jail's name: its directory, cgroup (keel/ID) and host name.
    #[arg(long, value_name = "ID")]
    id: String,

    /// The program to run (copied into the jail).
    #[arg(long, value_name = "PATH")]
    exec_file: PathBuf,

    /// The uid the program runs as.
    #[arg(long, value_name = "UID")]
    uid: u32,

    /// The gid the program runs as.
    #[arg(long, value_name = "GID")]
    gid: u32,

    /// Where jails are laid out.
    #[arg(long, value_name = "DIR", default_value = keel_jail::DEFAULT_BASE_DIR)]
    chroot_base_dir: PathBuf,

    /// A host file to show inside the jail, read-only unless :rw
    /// (SRC[:DEST][:rw]; DEST defaults to SRC). Repeatable.
    #[arg(long, value_name = "SRC[:DEST][:rw]")]
    file: Vec<JailFile>,

    /// Join this network namespace (/var/run/netns/NAME).
    #[arg(long, value_name = "PATH", conflicts_with = "new_netns")]
    netns: Option<PathBuf>,

    /// Run in a new, empty network namespace.
    #[arg(long)]
    new_netns: bool,

    /// A cgroup limit in cgroup v2's names: cpu.max="50000 100000",
    /// memory.max=BYTES, pids.max=N (or another FILE=VALUE of the
    /// controller). Repeatable.
    #[arg(long, value_name = "FILE=VALUE", value_parser = parse_cgroup)]
    cgroup: Vec<(String, String)>,

    /// A resource limit: no-file=N, fsize=BYTES, nproc=N, core=BYTES.
    /// Repeatable.
    #[arg(long, value_name = "NAME=VALUE")]
    resource_limit: Vec<Rlimit>,

    /// A descriptor the program keeps (0, 1 and 2 always are). Repeatable.
    #[arg(long, value_name = "FD")]
    keep_fd: Vec<i32>,

    /// The program's arguments, after `--`.
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<OsString>,
}

fn parse_cgroup(s: &str) -> Result<(String, String), String> {
    let (file, value) = s
        .split_once('=')
        .ok_or_else(|| format!("cgroup limit {s:?}: expected FILE=VALUE"))?;
    if file.contains('/') || !file.contains('.') || file.starts_with('.') {
        return Err(format!("cgroup limit {s:?}: {file:?} is not a controller file"));
    }
    Ok((file.to_owned(), value.to_owned()))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut jail = Jail::new(args.id, args.exec_file, args.uid, args.gid);
    jail.base_dir = args.chroot_base_dir;
    jail.files = args.file;
    jail.netns = match (args.netns, args.new_netns) {
        (Some(path), _) => NetNamespace::Join(path),
        (None, true) => NetNamespace::New,
        (None, false) => NetNamespace::Inherit,
    };
    jail.cgroup = args.cgroup;
    jail.rlimits = args.resource_limit;
    jail.keep_fds = args.keep_fd;
    jail.args = args.args;
    match jail.run() {
        Ok(status) => ExitCode::from(u8::try_from(status).unwrap_or(1)),
        Err(e) => {
            eprintln!("keel-jail: error: {e}");
            ExitCode::from(125)
        }
    }
}
