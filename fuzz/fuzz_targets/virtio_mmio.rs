//! A hostile driver against Keel's virtio devices through the virtio-mmio
//! transport: the input picks a device (block, rng, net, console, vsock,
//! balloon) and a number of operations; the operations are a sequence of
//! register reads and writes — feature pages, queue setup, status,
//! notifications, config space — and guest memory writes, with the
//! device's event loop run between them; the rest of the input is guest
//! memory at 0x1000 (where it may build rings, descriptor tables and
//! chains). Nothing the driver does may panic the VMM.
#![no_main]

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use keel_irq::RecordingLine;
use keel_virtio::{
    Balloon, BalloonOptions, Block, BlockOptions, Console, GuestMemoryMmap, MemoryBackend, MemoryNetBackend,
    MmioSlot, MmioTransport, Net, NetOptions, Rng, StreamBackend, VirtioDevice, Vsock, VsockOptions,
};
use libfuzzer_sys::fuzz_target;
use vm_device::bus::MmioAddress;
use vm_device::MutDeviceMmio;
use vm_memory::{Bytes, GuestAddress};

const MEM: usize = 1 << 20;
const SLOT: MmioSlot = MmioSlot {
    base: 0xd000_0000,
    gsi: 5,
};

fn device(
    kind: u8,
    dir: &std::path::Path,
) -> Option<(
    Arc<Mutex<dyn VirtioDevice>>,
    Arc<Mutex<dyn MutEventSubscriber + Send>>,
)> {
    macro_rules! both {
        ($d:expr) => {{
            let d = Arc::new(Mutex::new($d));
            Some((
                d.clone() as Arc<Mutex<dyn VirtioDevice>>,
                d as Arc<Mutex<dyn MutEventSubscriber + Send>>,
            ))
        }};
    }
    match kind % 6 {
        0 => both!(Block::new(MemoryBackend::new(64 * 1024), BlockOptions::default()).ok()?),
        1 => both!(Rng::new().ok()?),
        2 => both!(Net::new(MemoryNetBackend::new().ok()?, NetOptions::default()).ok()?),
        3 => {
            let (reader, _writer) = std::os::unix::net::UnixStream::pair().ok()?;
            both!(Console::new(Box::new(StreamBackend::new(std::io::sink(), reader))).ok()?)
        }
        4 => both!(Vsock::new(3, dir.join("v.sock"), VsockOptions::default()).ok()?),
        _ => both!(Balloon::new(BalloonOptions::new(1)).ok()?),
    }
}

fuzz_target!(|data: &[u8]| {
    let [kind, count, rest @ ..] = data else {
        return;
    };
    let split = rest.len().min(usize::from(*count) * 7);
    let (ops, memory) = rest.split_at(split);
    let kind = *kind;
    let dir = std::env::temp_dir().join(format!("keel-fuzz-mmio-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::remove_file(dir.join("v.sock"));
    let Some((dev, sub)) = device(kind, &dir) else {
        return;
    };
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    mem.write_slice(memory, GuestAddress(0x1000)).unwrap();
    let Ok(mut transport) = MmioTransport::new(dev, mem.clone(), Arc::new(RecordingLine::new()), SLOT) else {
        return;
    };
    let mut events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> = EventManager::new().unwrap();
    events.add_subscriber(sub);
    // Each op: kind, offset (2 bytes), value (4 bytes).
    for op in ops.chunks_exact(7) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]])) % 0x200;
        let value = [op[3], op[4], op[5], op[6]];
        match op[0] % 8 {
            0 => {
                let mut data = [0u8; 4];
                transport.mmio_read(MmioAddress(SLOT.base), offset, &mut data);
            }
            1 => {
                let len = 1 << (op[3] % 4);
                let mut data = [0u8; 8];
                transport.mmio_read(MmioAddress(SLOT.base), offset, &mut data[..len]);
            }
            2 => transport.mmio_write(
                MmioAddress(SLOT.base),
                offset,
                &value[..1 + usize::from(op[4] % 4)],
            ),
            3 => {
                // Guest memory changes under the device.
                let at = 0x1000 + u64::from(u16::from_le_bytes([op[1], op[2]])) * 4;
                let _ = mem.write_slice(&value, GuestAddress(at));
            }
            4 => {
                let _ = events.run_with_timeout(0);
            }
            _ => transport.mmio_write(MmioAddress(SLOT.base), offset & !3, &value),
        }
    }
    let _ = events.run_with_timeout(0);
    let _ = transport.save_state();
});
