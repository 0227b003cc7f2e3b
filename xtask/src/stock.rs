//! `cargo xtask test --stock-kernel`: Debian's stock cloud kernel
//! (`linux-image-cloud-amd64`), unmodified, from its package, for the test
//! that boots it on Keel's ACPI platform.
//!
//! The package is fetched with `apt-get download` (no root needed), unpacked
//! with `dpkg-deb -x`, and its `vmlinuz` turned into an ELF `vmlinux` with
//! the kernel tree's own `scripts/extract-vmlinux` (the tree `cargo xtask
//! guest` unpacked; `lz4` decompresses Debian's payload). The result is
//! cached in `<cache>/../stock/<package>/vmlinux`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The metapackage whose dependency names the current cloud kernel.
pub const METAPACKAGE: &str = "linux-image-cloud-amd64";

/// The versioned package `apt-cache depends` names for the metapackage.
pub fn parse_depends(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-"))
        .map(str::to_string)
}

fn run(cmd: &mut Command, what: &str) -> Result<Vec<u8>, String> {
    let out = cmd.output().map_err(|e| format!("{what}: cannot run: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out.stdout)
}

/// The stock kernel's `vmlinux`, fetched and extracted if not cached.
/// `guest_root` is the guest cache (`~/.cache/keel/guest`), whose `src/`
/// holds the kernel tree.
pub fn stock_vmlinux(guest_root: &Path) -> Result<PathBuf, String> {
    let depends = run(
        Command::new("apt-cache").args(["depends", METAPACKAGE]),
        &format!("apt-cache depends {METAPACKAGE}"),
    )?;
    let package = parse_depends(&String::from_utf8_lossy(&depends))
        .ok_or_else(|| format!("apt-cache depends {METAPACKAGE}: no linux-image package named"))?;
    let dir = guest_root
        .parent()
        .unwrap_or(guest_root)
        .join("stock")
        .join(&package);
    let vmlinux = dir.join("vmlinux");
    if vmlinux.is_file() {
        return Ok(vmlinux);
    }
    let tmp = dir.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    eprintln!("xtask: downloading {package} (Debian's stock cloud kernel)");
    run(
        Command::new("apt-get")
            .args(["download", &package])
            .current_dir(&tmp),
        &format!("apt-get download {package}"),
    )?;
    let deb = std::fs::read_dir(&tmp)
        .map_err(|e| format!("{}: {e}", tmp.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| format!("apt-get download {package}: no .deb in {}", tmp.display()))?;
    run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(tmp.join("root")),
        &format!("dpkg-deb -x {}", deb.display()),
    )?;
    let vmlinuz = std::fs::read_dir(tmp.join("root/boot"))
        .map_err(|e| format!("{package}: no /boot: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| format!("{package}: no /boot/vmlinuz-*"))?;
    let extract = std::fs::read_dir(guest_root.join("src"))
        .map_err(|e| {
            format!(
                "no kernel tree in {}/src (run `cargo xtask guest` first): {e}",
                guest_root.display()
            )
        })?
        .filter_map(|e| {
            e.ok()
                .map(|e| e.path().join("linux-source-6.1/scripts/extract-vmlinux"))
        })
        .find(|p| p.is_file())
        .ok_or_else(|| format!("no scripts/extract-vmlinux under {}/src", guest_root.display()))?;
    let image = run(
        Command::new(&extract).arg(&vmlinuz),
        &format!("{} {}", extract.display(), vmlinuz.display()),
    )?;
    if !image.starts_with(b"\x7fELF") {
        return Err(format!(
            "{}: extract-vmlinux gave no ELF image",
            vmlinuz.display()
        ));
    }
    std::fs::write(tmp.join("vmlinux"), image).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let _ = std::fs::remove_dir_all(tmp.join("root"));
    let _ = std::fs::remove_file(&deb);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(|e| format!("{} -> {}: {e}", tmp.display(), dir.display()))?;
    Ok(vmlinux)
}

#[cfg(test)]
mod tests {
    use super::parse_depends;

    #[test]
    fn the_versioned_kernel_package_is_read_from_apt_cache_depends() {
        let text = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-57-cloud-amd64\n";
        assert_eq!(
            parse_depends(text).as_deref(),
            Some("linux-image-6.1.0-57-cloud-amd64")
        );
        assert_eq!(parse_depends("linux-image-cloud-amd64\n"), None);
    }
}
