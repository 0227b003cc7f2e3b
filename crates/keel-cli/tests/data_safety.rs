//! A flush the guest saw complete survives the VMM being killed.
//!
//! The built-in guest writes sectors 0–7 of its disk, FLUSHes, prints
//! `KEEL-FLUSHED`, and spins. The test kills `keel` with SIGKILL the moment
//! that line appears — no exit path, no destructors — and checks the image.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn flushed_data_is_in_the_image_after_sigkill() {
    let dir = std::env::temp_dir().join(format!("keel-data-safety-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("disk.img");
    let file = std::fs::File::create(&image).unwrap();
    file.set_len(16 << 20).unwrap();
    drop(file);

    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["--memory", "32M", "--disk"])
        .arg(&image)
        .args(["--cmdline", "virtio-blk-flush-wait pattern=0xa5"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut console = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let flushed = line.contains("KEEL-FLUSHED");
            console.push_str(&line);
            console.push('\n');
            if flushed {
                let _ = tx.send(Ok(console.clone()));
            }
        }
        let _ = tx.send(Err(console));
    });
    let start = Instant::now();
    let console = match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(Ok(console)) => console,
        Ok(Err(console)) => panic!("guest ended without flushing; console:\n{console}"),
        Err(_) => {
            let _ = child.kill();
            panic!("no KEEL-FLUSHED within 20 s");
        }
    };
    // SIGKILL, right after the guest saw its flush complete.
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(status.code().is_none(), "keel was killed by a signal: {status:?}");
    println!("killed {:.0} ms after start", start.elapsed().as_secs_f64() * 1e3);

    let bytes = std::fs::read(&image).unwrap();
    assert!(
        bytes[..4096].iter().all(|&b| b == 0xa5),
        "flushed sectors lost; console:\n{console}"
    );
    assert!(
        bytes[4096..].iter().all(|&b| b == 0),
        "bytes outside the write changed"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
