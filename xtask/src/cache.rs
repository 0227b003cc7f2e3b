//! Where the guest artifacts live and what their cache key is made of.

use crate::fnv::Fnv1a64;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Bump this whenever the build logic changes in a way that changes the
/// artifacts (cpio layout, how `keel-xfer` is compiled, the set of output
/// files, ...). It is part of the cache key, so a bump makes every machine
/// rebuild the initramfs once; the kernel is only rebuilt when
/// [`KERNEL_LOGIC_VERSION`] changes.
///
/// History: `-1` first layout; `-2` adds `/bin/keel-xfer` (compiled from
/// `guest/linux/keel-xfer.c`) to the initramfs and as `keel-xfer` to the
/// entry.
pub const BUILD_LOGIC_VERSION: &str = "keel-guest-build-2";

/// Bump this whenever the *kernel* build steps change (make targets, config
/// merging, ...): part of both keys, it makes every machine rebuild the
/// kernel once. Its value is hashed into [`Inputs::kernel_key`] exactly as
/// `BUILD_LOGIC_VERSION` was before the two were split, so kernels cached
/// by earlier versions stay valid.
pub const KERNEL_LOGIC_VERSION: &str = "keel-guest-build-1";

/// The directory that holds every cached guest build:
///
/// 1. `$KEEL_CACHE_DIR/guest` if `KEEL_CACHE_DIR` is set and non-empty;
/// 2. else `$XDG_CACHE_HOME/keel/guest` if `XDG_CACHE_HOME` is an absolute
///    path (the XDG spec says relative values are to be ignored);
/// 3. else `$HOME/.cache/keel/guest`.
///
/// The arguments are the values of those three variables, so this stays a
/// pure function (the caller reads the environment).
pub fn guest_cache_root(
    keel_cache_dir: Option<OsString>,
    xdg_cache_home: Option<OsString>,
    home: Option<OsString>,
) -> Result<PathBuf, String> {
    let nonempty = |v: Option<OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = nonempty(keel_cache_dir) {
        return Ok(dir.join("guest"));
    }
    if let Some(dir) = nonempty(xdg_cache_home).filter(|p| p.is_absolute()) {
        return Ok(dir.join("keel").join("guest"));
    }
    if let Some(home) = nonempty(home) {
        return Ok(home.join(".cache").join("keel").join("guest"));
    }
    Err("cannot find a cache directory: set KEEL_CACHE_DIR, XDG_CACHE_HOME or HOME".into())
}

/// Where the kernel sources come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelSource {
    /// Debian's `linux-source-6.1` at this package version.
    Debian {
        /// Package name.
        package: String,
        /// Exact Debian version (`apt-cache policy` candidate).
        version: String,
    },
    /// A kernel tarball; `content_hash` is FNV-1a 64 over its bytes.
    Tarball {
        /// The tarball's FNV-1a 64 content hash.
        content_hash: u64,
    },
    /// An unpacked tree, identified by its path and the version in its
    /// top-level Makefile (edits inside the tree are not noticed: use
    /// `--rebuild`).
    Tree {
        /// Canonical path to the tree.
        path: PathBuf,
        /// `VERSION.PATCHLEVEL.SUBLEVEL EXTRAVERSION` from the Makefile.
        version: String,
    },
}

impl KernelSource {
    fn describe(&self) -> String {
        match self {
            KernelSource::Debian { package, version } => format!("debian:{package}={version}"),
            KernelSource::Tarball { content_hash } => format!("tarball:{content_hash:016x}"),
            KernelSource::Tree { path, version } => {
                format!("tree:{}@{version}", path.display())
            }
        }
    }
}

/// Everything the guest artifacts depend on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inputs {
    /// [`BUILD_LOGIC_VERSION`] normally; a field so tests can vary it.
    pub logic_version: String,
    /// [`KERNEL_LOGIC_VERSION`] normally.
    pub kernel_logic_version: String,
    /// Contents of `guest/linux/keel.config`.
    pub kernel_fragment: Vec<u8>,
    /// Contents of `guest/linux/init`.
    pub init_script: Vec<u8>,
    /// Contents of `guest/linux/keel-xfer.c`.
    pub xfer_source: Vec<u8>,
    /// Kernel source identity.
    pub kernel_source: KernelSource,
    /// Debian version of `busybox-static`.
    pub busybox_version: String,
    /// `gcc -dumpfullversion` (the compiler shapes the kernel binary).
    pub compiler: String,
    /// Debian version of `libc6-dev`: its `libc.a` is linked into the static
    /// `keel-xfer`.
    pub libc: String,
}

impl Inputs {
    /// Human-readable list of the inputs, written next to the artifacts.
    pub fn manifest(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "logic={}", self.logic_version);
        let _ = writeln!(s, "kernel_logic={}", self.kernel_logic_version);
        let _ = writeln!(s, "kernel_source={}", self.kernel_source.describe());
        let _ = writeln!(
            s,
            "kernel_fragment_fnv={:016x}",
            crate::fnv::fnv1a64(&self.kernel_fragment)
        );
        let _ = writeln!(
            s,
            "init_script_fnv={:016x}",
            crate::fnv::fnv1a64(&self.init_script)
        );
        let _ = writeln!(
            s,
            "xfer_source_fnv={:016x}",
            crate::fnv::fnv1a64(&self.xfer_source)
        );
        let _ = writeln!(s, "busybox_static={}", self.busybox_version);
        let _ = writeln!(s, "gcc={}", self.compiler);
        let _ = writeln!(s, "libc6_dev={}", self.libc);
        let _ = writeln!(s, "kernel_key={}", self.kernel_key());
        s
    }

    /// The key of the kernel alone: the inputs that shape `vmlinux` and
    /// `bzImage` (not the init script, `keel-xfer`, BusyBox, libc nor
    /// [`BUILD_LOGIC_VERSION`]). Kernels are cached under
    /// `<root>/kernels/<kernel_key>/` so that editing `guest/linux/init` or
    /// `keel-xfer.c` rebuilds only the initramfs (a second) instead of the
    /// kernel.
    pub fn kernel_key(&self) -> String {
        let mut h = Fnv1a64::new();
        h.field("logic", self.kernel_logic_version.as_bytes());
        h.field("kernel_source", self.kernel_source.describe().as_bytes());
        h.field("kernel_fragment", &self.kernel_fragment);
        h.field("gcc", self.compiler.as_bytes());
        format!("{:016x}", h.finish())
    }

    /// The cache key: 16 lowercase hex digits of FNV-1a 64 over every input.
    pub fn key(&self) -> String {
        let mut h = Fnv1a64::new();
        h.field("logic", self.logic_version.as_bytes());
        h.field("kernel_logic", self.kernel_logic_version.as_bytes());
        h.field("kernel_source", self.kernel_source.describe().as_bytes());
        h.field("kernel_fragment", &self.kernel_fragment);
        h.field("init_script", &self.init_script);
        h.field("xfer_source", &self.xfer_source);
        h.field("busybox_static", self.busybox_version.as_bytes());
        h.field("gcc", self.compiler.as_bytes());
        h.field("libc6_dev", self.libc.as_bytes());
        format!("{:016x}", h.finish())
    }
}

/// The files of one finished build, inside `<root>/<key>/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Artifacts {
    /// The cache entry directory.
    pub dir: PathBuf,
}

impl Artifacts {
    /// File names inside the entry, in output order, with their output names.
    pub const FILES: [(&'static str, &'static str); 4] = [
        ("vmlinux", "vmlinux"),
        ("bzImage", "bzImage"),
        ("initramfs", "initramfs.cpio"),
        ("xfer", "keel-xfer"),
    ];

    /// The entry for `key` under `root`.
    pub fn new(root: &Path, key: &str) -> Self {
        Artifacts { dir: root.join(key) }
    }

    /// `true` if every artifact file exists (an entry only appears by an
    /// atomic rename of a finished build, so this is a sanity check).
    pub fn complete(&self) -> bool {
        Self::FILES.iter().all(|(_, f)| self.dir.join(f).is_file())
    }

    /// `name=path` pairs for stdout: vmlinux, bzImage, initramfs, cache,
    /// xfer (`xfer` came later and is last, so the first four lines keep
    /// their places).
    pub fn outputs(&self) -> Vec<(&'static str, PathBuf)> {
        let mut v: Vec<_> = Self::FILES
            .iter()
            .map(|(name, file)| (*name, self.dir.join(file)))
            .collect();
        v.insert(3, ("cache", self.dir.clone()));
        v
    }
}

/// Formats `name=path` lines, one per output, each ending in `\n`.
pub fn format_outputs(outputs: &[(&str, PathBuf)]) -> String {
    outputs
        .iter()
        .map(|(name, path)| format!("{name}={}\n", path.display()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> Option<OsString> {
        Some(OsString::from(s))
    }

    #[test]
    fn cache_root_precedence() {
        assert_eq!(
            guest_cache_root(os("/k"), os("/x"), os("/h")).unwrap(),
            PathBuf::from("/k/guest")
        );
        assert_eq!(
            guest_cache_root(None, os("/x"), os("/h")).unwrap(),
            PathBuf::from("/x/keel/guest")
        );
        assert_eq!(
            guest_cache_root(os(""), os(""), os("/h")).unwrap(),
            PathBuf::from("/h/.cache/keel/guest")
        );
        // A relative XDG_CACHE_HOME is invalid per the spec and ignored.
        assert_eq!(
            guest_cache_root(None, os("rel/cache"), os("/h")).unwrap(),
            PathBuf::from("/h/.cache/keel/guest")
        );
        assert!(guest_cache_root(None, None, None).is_err());
    }

    fn inputs() -> Inputs {
        Inputs {
            logic_version: BUILD_LOGIC_VERSION.into(),
            kernel_logic_version: KERNEL_LOGIC_VERSION.into(),
            kernel_fragment: b"CONFIG_64BIT=y\n".to_vec(),
            init_script: b"#!/bin/sh\necho hi\n".to_vec(),
            xfer_source: b"int main(void) { return 0; }\n".to_vec(),
            kernel_source: KernelSource::Debian {
                package: "linux-source-6.1".into(),
                version: "6.1.192-2".into(),
            },
            busybox_version: "1:1.35.0-4+deb12u1+b1".into(),
            compiler: "12.2.0".into(),
            libc: "2.36-9+deb12u13".into(),
        }
    }

    #[test]
    fn key_is_stable() {
        // Pinned: a change here means every cache entry on every machine is
        // invalidated. Only update it together with BUILD_LOGIC_VERSION or
        // a deliberate change of the key's layout.
        let mut i = inputs();
        i.logic_version = "pinned".into();
        assert_eq!(i.key(), "275c230e0d7f2316");
        // The kernel key hashes exactly what it hashed before the build
        // logic version was split in two (with "keel-guest-build-1" in the
        // `logic` field), so kernels cached then are still found.
        assert_eq!(KERNEL_LOGIC_VERSION, "keel-guest-build-1");
        assert_eq!(i.kernel_key(), "483bd075cf585f6d");
        assert_eq!(i.key(), i.clone().key());
        assert_eq!(i.key().len(), 16);
    }

    #[test]
    fn key_depends_on_every_input() {
        let base = inputs();
        let mut variants: Vec<Inputs> = Vec::new();
        let mut v = base.clone();
        v.logic_version.push('x');
        variants.push(v);
        let mut v = base.clone();
        v.kernel_fragment.extend_from_slice(b"CONFIG_SMP=y\n");
        variants.push(v);
        let mut v = base.clone();
        v.init_script.push(b' ');
        variants.push(v);
        let mut v = base.clone();
        v.kernel_source = KernelSource::Debian {
            package: "linux-source-6.1".into(),
            version: "6.1.193-1".into(),
        };
        variants.push(v);
        let mut v = base.clone();
        v.kernel_source = KernelSource::Tarball { content_hash: 1 };
        variants.push(v);
        let mut v = base.clone();
        v.kernel_source = KernelSource::Tree {
            path: "/src/linux".into(),
            version: "6.1.0".into(),
        };
        variants.push(v);
        let mut v = base.clone();
        v.busybox_version = "1:1.36.1-1".into();
        variants.push(v);
        let mut v = base.clone();
        v.compiler = "13.1.0".into();
        variants.push(v);
        let mut v = base.clone();
        v.kernel_logic_version.push('x');
        variants.push(v);
        let mut v = base.clone();
        v.xfer_source.push(b' ');
        variants.push(v);
        let mut v = base.clone();
        v.libc = "2.37-1".into();
        variants.push(v);

        let mut keys: Vec<String> = variants.iter().map(Inputs::key).collect();
        keys.push(base.key());
        let n = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), n, "two different inputs gave the same key");
    }

    #[test]
    fn kernel_key_ignores_user_space() {
        let base = inputs();
        assert_ne!(base.kernel_key(), base.key());
        let mut v = base.clone();
        v.init_script.extend_from_slice(b"echo more\n");
        v.xfer_source.extend_from_slice(b"/* more */\n");
        v.busybox_version = "1:1.36.1-1".into();
        v.libc = "2.37-1".into();
        v.logic_version.push('2');
        assert_eq!(v.kernel_key(), base.kernel_key());
        assert_ne!(v.key(), base.key());
        for change in [
            |i: &mut Inputs| i.kernel_fragment.push(b'#'),
            |i: &mut Inputs| i.compiler.push('1'),
            |i: &mut Inputs| i.kernel_logic_version.push('1'),
            |i: &mut Inputs| i.kernel_source = KernelSource::Tarball { content_hash: 7 },
        ] {
            let mut v = base.clone();
            change(&mut v);
            assert_ne!(v.kernel_key(), base.kernel_key());
            assert_ne!(v.key(), base.key());
        }
    }

    #[test]
    fn moving_bytes_between_inputs_changes_key() {
        let mut a = inputs();
        a.kernel_fragment = b"AB".to_vec();
        a.init_script = b"C".to_vec();
        let mut b = inputs();
        b.kernel_fragment = b"A".to_vec();
        b.init_script = b"BC".to_vec();
        assert_ne!(a.key(), b.key());
    }

    #[test]
    fn manifest_names_inputs() {
        let m = inputs().manifest();
        assert!(
            m.contains("kernel_source=debian:linux-source-6.1=6.1.192-2\n"),
            "{m}"
        );
        assert!(m.contains("busybox_static=1:1.35.0-4+deb12u1+b1\n"), "{m}");
    }

    #[test]
    fn outputs_format() {
        let a = Artifacts::new(Path::new("/c/keel/guest"), "0123456789abcdef");
        let text = format_outputs(&a.outputs());
        assert_eq!(
            text,
            "vmlinux=/c/keel/guest/0123456789abcdef/vmlinux\n\
             bzImage=/c/keel/guest/0123456789abcdef/bzImage\n\
             initramfs=/c/keel/guest/0123456789abcdef/initramfs.cpio\n\
             cache=/c/keel/guest/0123456789abcdef\n\
             xfer=/c/keel/guest/0123456789abcdef/keel-xfer\n"
        );
        assert_eq!(text.lines().count(), 5);
        for line in text.lines() {
            let (name, path) = line.split_once('=').unwrap();
            assert!(!name.is_empty() && !name.contains(' '));
            assert!(path.starts_with('/'));
        }
    }
}
