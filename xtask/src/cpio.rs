//! A writer (and, for checking, a reader) for the `newc` cpio format that
//! the Linux kernel unpacks as an initramfs
//! (`Documentation/driver-api/early-userspace/buffer-format.rst`).
//!
//! Writing it here instead of running `cpio -o -H newc` keeps the archive
//! byte-for-byte reproducible (fixed inode numbers, owners and times), lets
//! it hold `/dev/console` without `mknod` on the host, and removes a host
//! tool from the dependency list.

/// One archive member. Paths are relative (`bin/sh`, not `/bin/sh`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// A directory.
    Dir {
        /// Path inside the archive.
        path: String,
        /// Permission bits, e.g. `0o755`.
        perm: u32,
    },
    /// A regular file.
    File {
        /// Path inside the archive.
        path: String,
        /// Permission bits, e.g. `0o755`.
        perm: u32,
        /// Contents.
        data: Vec<u8>,
    },
    /// A symbolic link.
    Symlink {
        /// Path inside the archive.
        path: String,
        /// Link target.
        target: String,
    },
    /// A character device node.
    CharDev {
        /// Path inside the archive.
        path: String,
        /// Permission bits, e.g. `0o600`.
        perm: u32,
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;
const MAGIC: &[u8; 6] = b"070701";
const TRAILER: &str = "TRAILER!!!";

impl Entry {
    /// The member's path.
    pub fn path(&self) -> &str {
        match self {
            Entry::Dir { path, .. }
            | Entry::File { path, .. }
            | Entry::Symlink { path, .. }
            | Entry::CharDev { path, .. } => path,
        }
    }
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

#[allow(clippy::too_many_arguments)]
fn header(out: &mut Vec<u8>, ino: u32, mode: u32, nlink: u32, filesize: usize, rdev: (u32, u32), name: &str) {
    let filesize = u32::try_from(filesize).expect("cpio member larger than 4 GiB");
    let namesize = u32::try_from(name.len() + 1).expect("cpio name too long");
    out.extend_from_slice(MAGIC);
    // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor
    // rdevminor namesize check
    for v in [
        ino, mode, 0, 0, nlink, 0, filesize, 0, 0, rdev.0, rdev.1, namesize, 0,
    ] {
        out.extend_from_slice(format!("{v:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
}

/// Serializes `entries` in order, followed by the trailer. Owners are root,
/// times are 0, inode numbers count from 1: the same entries always give the
/// same bytes.
pub fn write(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let ino = u32::try_from(i + 1).expect("too many cpio members");
        match e {
            Entry::Dir { path, perm } => {
                header(&mut out, ino, S_IFDIR | perm, 2, 0, (0, 0), path);
            }
            Entry::File { path, perm, data } => {
                header(&mut out, ino, S_IFREG | perm, 1, data.len(), (0, 0), path);
                out.extend_from_slice(data);
                pad4(&mut out);
            }
            Entry::Symlink { path, target } => {
                header(&mut out, ino, S_IFLNK | 0o777, 1, target.len(), (0, 0), path);
                out.extend_from_slice(target.as_bytes());
                pad4(&mut out);
            }
            Entry::CharDev {
                path,
                perm,
                major,
                minor,
            } => {
                header(&mut out, ino, S_IFCHR | perm, 1, 0, (*major, *minor), path);
            }
        }
    }
    header(&mut out, 0, 0, 1, 0, (0, 0), TRAILER);
    out
}

/// Parses a `newc` archive written by [`write()`] (or by `cpio -H newc`) back
/// into entries; used to sanity-check the initramfs after building it.
pub fn read(mut buf: &[u8]) -> Result<Vec<Entry>, String> {
    let start_len = buf.len();
    let mut out = Vec::new();
    loop {
        let off = start_len - buf.len();
        if buf.len() < 110 || &buf[..6] != MAGIC {
            return Err(format!("bad cpio header at offset {off}"));
        }
        let field = |i: usize| -> Result<u32, String> {
            let s = std::str::from_utf8(&buf[6 + 8 * i..14 + 8 * i])
                .map_err(|_| format!("bad header field at offset {off}"))?;
            u32::from_str_radix(s, 16).map_err(|_| format!("bad header field at offset {off}"))
        };
        let mode = field(1)?;
        let filesize = field(6)? as usize;
        let (rmaj, rmin) = (field(9)?, field(10)?);
        let namesize = field(11)? as usize;
        let name_end = 110 + namesize;
        if namesize == 0 || buf.len() < name_end {
            return Err(format!("truncated name at offset {off}"));
        }
        let name = std::str::from_utf8(&buf[110..name_end - 1])
            .map_err(|_| format!("non-UTF-8 name at offset {off}"))?
            .to_string();
        let data_start = name_end.div_ceil(4) * 4;
        let data_end = data_start + filesize;
        if buf.len() < data_end {
            return Err(format!("truncated data of `{name}`"));
        }
        let data = buf[data_start..data_end].to_vec();
        buf = &buf[(data_end.div_ceil(4) * 4).min(buf.len())..];
        if name == TRAILER {
            return Ok(out);
        }
        let perm = mode & 0o7777;
        out.push(match mode & 0o170000 {
            S_IFDIR => Entry::Dir { path: name, perm },
            S_IFREG => Entry::File {
                path: name,
                perm,
                data,
            },
            S_IFLNK => Entry::Symlink {
                path: name,
                target: String::from_utf8(data).map_err(|_| "non-UTF-8 link".to_string())?,
            },
            S_IFCHR => Entry::CharDev {
                path: name,
                perm,
                major: rmaj,
                minor: rmin,
            },
            other => return Err(format!("unsupported file type {other:o} for `{name}`")),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Entry> {
        vec![
            Entry::Dir {
                path: "dev".into(),
                perm: 0o755,
            },
            Entry::CharDev {
                path: "dev/console".into(),
                perm: 0o600,
                major: 5,
                minor: 1,
            },
            Entry::File {
                path: "init".into(),
                perm: 0o755,
                data: b"#!/bin/sh\n".to_vec(),
            },
            Entry::Symlink {
                path: "sh".into(),
                target: "/bin/busybox".into(),
            },
        ]
    }

    #[test]
    fn round_trip() {
        let bytes = write(&sample());
        assert_eq!(bytes.len() % 4, 0);
        assert_eq!(read(&bytes).unwrap(), sample());
    }

    #[test]
    fn deterministic() {
        assert_eq!(write(&sample()), write(&sample()));
    }

    #[test]
    fn header_layout() {
        let bytes = write(&sample()[1..2]);
        let h = std::str::from_utf8(&bytes[..110]).unwrap();
        assert_eq!(&h[..6], "070701");
        assert_eq!(&h[6..14], "00000001", "ino");
        assert_eq!(&h[14..22], "00002180", "mode: S_IFCHR | 0600");
        assert_eq!(&h[78..86], "00000005", "rdevmajor");
        assert_eq!(&h[86..94], "00000001", "rdevminor");
        assert_eq!(&h[94..102], "0000000c", "namesize incl. NUL");
        assert_eq!(&bytes[110..122], b"dev/console\0");
        // The trailer follows, 4-aligned.
        assert_eq!(&bytes[124..130], b"070701");
    }

    #[test]
    fn matches_gnu_cpio_if_available() {
        // Cross-check with GNU cpio where it is installed; skipped otherwise.
        use std::io::Write;
        use std::process::{Command, Stdio};
        let Ok(mut child) = Command::new("cpio")
            .args(["-i", "-t", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
        else {
            eprintln!("cpio not installed: skipping the cross-check");
            return;
        };
        child.stdin.take().unwrap().write_all(&write(&sample())).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            "dev\ndev/console\ninit\nsh\n"
        );
    }
}
