//! Cgroup limits, on cgroup v2 where the host's unified hierarchy has the
//! controller and on the controller's v1 hierarchy otherwise (hosts that
//! still mount v1, as many container hosts do). Limits are written in
//! v2's vocabulary and translated for v1.

use std::path::{Path, PathBuf};

use crate::Error;

/// A cgroup the jail created, removed when the jail ends.
#[derive(Debug)]
pub(crate) struct Cgroup {
    /// Each hierarchy's directory for this jail, with the file the child
    /// writes itself into.
    pub(crate) dirs: Vec<PathBuf>,
}

/// Where each cgroup hierarchy is mounted.
struct Mounts {
    unified: Option<PathBuf>,
    /// (controller, mount point) for v1 hierarchies.
    v1: Vec<(String, PathBuf)>,
}

fn mounts() -> Result<Mounts, Error> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| Error::Cgroup {
        what: "/proc/self/mountinfo".into(),
        source: e,
    })?;
    let mut found = Mounts {
        unified: None,
        v1: Vec::new(),
    };
    for line in text.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount_point) = left.split(' ').nth(4) else {
            continue;
        };
        let mut right = right.split(' ');
        let fstype = right.next().unwrap_or_default();
        let super_options = right.nth(1).unwrap_or_default();
        match fstype {
            "cgroup2" if found.unified.is_none() => found.unified = Some(PathBuf::from(mount_point)),
            "cgroup" => {
                for option in super_options.split(',') {
                    if matches!(option, "cpu" | "memory" | "pids" | "cpuset" | "blkio" | "io") {
                        found.v1.push((option.to_owned(), PathBuf::from(mount_point)));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(found)
}

/// A limit as v1 spells it: (file, value).
fn to_v1(file: &str, value: &str) -> Vec<(String, String)> {
    match file {
        "cpu.max" => {
            let mut parts = value.split_whitespace();
            let quota = parts.next().unwrap_or("max");
            let period = parts.next().unwrap_or("100000");
            let quota = if quota == "max" { "-1" } else { quota };
            vec![
                ("cpu.cfs_period_us".into(), period.into()),
                ("cpu.cfs_quota_us".into(), quota.into()),
            ]
        }
        "memory.max" => {
            let value = if value == "max" { "-1" } else { value };
            vec![("memory.limit_in_bytes".into(), value.into())]
        }
        other => vec![(other.into(), value.into())],
    }
}

fn write(path: &Path, value: &str) -> Result<(), Error> {
    std::fs::write(path, value).map_err(|e| Error::Cgroup {
        what: format!("writing {value:?} to {}", path.display()),
        source: e,
    })
}

/// Creates `parent/id` in every hierarchy a limit needs and writes the
/// limits (`file=value`, v2's names: `cpu.max`, `memory.max`, `pids.max`,
/// or any other file of the controller).
pub(crate) fn create(parent: &str, id: &str, limits: &[(String, String)]) -> Result<Cgroup, Error> {
    let mounts = mounts()?;
    let unified_controllers = mounts
        .unified
        .as_ref()
        .and_then(|u| std::fs::read_to_string(u.join("cgroup.controllers")).ok())
        .unwrap_or_default();
    let mut cgroup = Cgroup { dirs: Vec::new() };
    let mut result = Ok(());
    for (file, value) in limits {
        let controller = file.split('.').next().unwrap_or_default();
        let v2 = unified_controllers.split_whitespace().any(|c| c == controller);
        let (mount, writes) = if v2 {
            (mounts.unified.clone(), vec![(file.clone(), value.clone())])
        } else {
            let mount = mounts
                .v1
                .iter()
                .find(|(c, _)| c == controller)
                .map(|(_, m)| m.clone());
            (mount, to_v1(file, value))
        };
        let Some(mount) = mount else {
            result = Err(Error::Cgroup {
                what: format!("{file}={value}: the host mounts no {controller} controller"),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
            break;
        };
        if v2 {
            // The controller must be enabled for the jail's parent group.
            let enable = format!("+{controller}");
            let _ = std::fs::write(mount.join("cgroup.subtree_control"), &enable);
            let _ = std::fs::create_dir_all(mount.join(parent));
            let _ = std::fs::write(mount.join(parent).join("cgroup.subtree_control"), &enable);
        }
        let dir = mount.join(parent).join(id);
        if !cgroup.dirs.contains(&dir) {
            if let Err(e) = std::fs::create_dir_all(&dir) {
                result = Err(Error::Cgroup {
                    what: format!("creating {}", dir.display()),
                    source: e,
                });
                break;
            }
            cgroup.dirs.push(dir.clone());
        }
        for (file, value) in writes {
            if let Err(e) = write(&dir.join(file), &value) {
                result = Err(e);
                break;
            }
        }
        if result.is_err() {
            break;
        }
    }
    match result {
        Ok(()) => Ok(cgroup),
        Err(e) => {
            cgroup.remove();
            Err(e)
        }
    }
}

impl Cgroup {
    /// Removes the jail's groups (once their processes have ended).
    pub(crate) fn remove(&self) {
        for dir in &self.dirs {
            // A group is removable a moment after its last process is
            // reaped; on a loaded host that moment can be long. Up to 5 s.
            for _ in 0..500 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}
