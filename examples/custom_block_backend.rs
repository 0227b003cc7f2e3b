//! A block backend of your own: a copy-on-write disk over a read-only base
//! image, attached through `VmBuilder::add_disk` and exercised by the
//! built-in guest's `virtio-blk` program.
//!
//! ```text
//! cargo run --release --example custom_block_backend
//! ```
//!
//! Writes land in an overlay of 512-byte sectors kept in memory; reads come
//! from the overlay where a sector was written, from the base otherwise.
//! After the guest has written, flushed, discarded and zeroed sectors and
//! read them all back, the example checks that the base is untouched and
//! that the overlay holds exactly the guest's pattern.

use std::collections::BTreeMap;
use std::io;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use keel_virtio::{BlockBackend, BlockOptions, SECTOR_SIZE};
use keel_vmm::{ExitReason, VmBuilder, VmConfig};

const SECTOR: usize = SECTOR_SIZE as usize;

/// A read-only base with a sector overlay on top.
#[derive(Debug)]
struct CopyOnWrite {
    base: Arc<Vec<u8>>,
    overlay: BTreeMap<u64, [u8; SECTOR]>,
}

impl CopyOnWrite {
    fn sector(&self, index: u64) -> [u8; SECTOR] {
        if let Some(sector) = self.overlay.get(&index) {
            return *sector;
        }
        let mut sector = [0u8; SECTOR];
        let start = index as usize * SECTOR;
        sector.copy_from_slice(&self.base[start..start + SECTOR]);
        sector
    }
}

impl BlockBackend for CopyOnWrite {
    fn capacity(&self) -> u64 {
        self.base.len() as u64
    }

    // The device only calls with sector-aligned offsets and lengths inside
    // the capacity (see the trait's contract).
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        for (i, chunk) in buf.chunks_mut(SECTOR).enumerate() {
            chunk.copy_from_slice(&self.sector(offset / SECTOR_SIZE + i as u64)[..chunk.len()]);
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        for (i, chunk) in buf.chunks(SECTOR).enumerate() {
            let index = offset / SECTOR_SIZE + i as u64;
            let mut sector = self.sector(index);
            sector[..chunk.len()].copy_from_slice(chunk);
            self.overlay.insert(index, sector);
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The serial console, kept for checking.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn main() -> ExitCode {
    // A 1 MiB base whose bytes the guest must never change.
    let base: Arc<Vec<u8>> = Arc::new((0..1 << 20).map(|i: u32| (i % 251) as u8).collect());
    let backend = CopyOnWrite {
        base: base.clone(),
        overlay: BTreeMap::new(),
    };
    let serial = Capture::default();
    let mut config = VmConfig::default();
    config.memory_mib = 64;
    let mut disk = None;
    let result = VmBuilder::new(config).and_then(|builder| {
        let mut builder = builder
            .serial_output(serial.clone())
            .cmdline("virtio-blk pattern=7");
        disk = Some(builder.add_disk(backend, BlockOptions::default())?);
        builder.build()?.run()
    });
    let text = String::from_utf8_lossy(&serial.0.lock().unwrap()).into_owned();
    let Some(disk) = disk else {
        eprintln!("custom_block_backend: {result:?}");
        return ExitCode::FAILURE;
    };
    let disk = disk.lock().unwrap();
    let overlay = &disk.backend().overlay;
    let base_intact = base.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8);
    // Sector 0 holds the guest's pattern (pattern 7, disk 0, sector 0).
    let mut expected = [0u8; SECTOR];
    keel_guest::blk_pattern_sector(7, 0, 0, &mut expected);
    let pattern_landed = overlay.get(&0) == Some(&expected);
    match result {
        Ok(ExitReason::GuestExit(0)) if base_intact && pattern_landed => {
            println!(
                "custom_block_backend: the guest passed; {} sectors copied on write, the base is untouched",
                overlay.len()
            );
            ExitCode::SUCCESS
        }
        other => {
            eprintln!(
                "custom_block_backend: guest ended with {other:?}; base intact: {base_intact}, pattern in the overlay: {pattern_landed}; serial console:\n{text}"
            );
            ExitCode::FAILURE
        }
    }
}
