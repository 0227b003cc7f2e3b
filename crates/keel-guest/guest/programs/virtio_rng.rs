//! `virtio-rng`: buffers of several sizes filled by every entropy device.

use super::{check_interrupts, flag, virtio_devices, Context, Failure, Outcome};
use crate::dma::{self, Buffer};
use crate::println;
use crate::virtio::queue::{Chain, Virtqueue};
use crate::virtio::{device_id, feature, init_device, submit_and_wait, Transport};

/// Request sizes, in bytes; the device may fill less than asked.
const SIZES: [usize; 6] = [1, 16, 100, 512, 4096, 65536];
/// Bytes past each request checked to stay untouched.
const GUARD: usize = 64;
const CANARY: u8 = 0xa5;
const TIMEOUT_MS: u64 = 2000;

/// An initialised entropy device.
pub struct Rng {
    pub transport: Transport,
    pub queue: Virtqueue,
}

impl Rng {
    /// Brings up the device with a queue of `size` entries.
    pub fn init(transport: Transport, size: u16) -> Result<Self, crate::virtio::InitError> {
        let mut rng = Self {
            transport,
            queue: Virtqueue::new(0, size),
        };
        rng.reinit()?;
        Ok(rng)
    }

    pub fn reinit(&mut self) -> Result<(), crate::virtio::InitError> {
        let wanted = feature::RING_EVENT_IDX | feature::RING_INDIRECT_DESC;
        let size = self.queue.size();
        init_device(&self.transport, wanted, &mut [&mut self.queue], size).map(|_| ())
    }

    /// One request for `buffer`; returns the bytes filled.
    pub fn fill(&mut self, buffer: Buffer) -> Result<u32, crate::virtio::RequestError> {
        let chain = Chain::new().write_buf(buffer);
        submit_and_wait(&mut self.transport, &mut self.queue, &chain, TIMEOUT_MS)
    }
}

/// Whether `bytes` look random: not all zero and not all one value (only
/// checked from 16 bytes on).
pub fn looks_random(bytes: &[u8]) -> bool {
    bytes.len() < 16 || bytes.iter().any(|&b| b != bytes[0])
}

/// `virtio-rng [irq=0|1]`.
pub fn run(ctx: &Context<'_>) -> Outcome {
    let use_irq = flag(ctx, "irq", true)?;
    let devices = virtio_devices(ctx)?;
    let count = devices.of_type(device_id::RNG).count();
    println!("virtio-rng: {count} device(s)");
    if count == 0 {
        fail!("no virtio-rng device on the command line (virtio_mmio.device=...)");
    }
    let buffer = dma::alloc_or_panic(SIZES[SIZES.len() - 1] + GUARD, 4096);
    let mut result = Ok(());
    for (i, found) in devices.of_type(device_id::RNG).enumerate() {
        let transport = Transport::new(found, ctx.params, use_irq);
        let mut rng = match Rng::init(transport, 16) {
            Ok(rng) => rng,
            Err(e) => {
                println!(
                    "FAIL: virtio-rng: rng{i} at {}: initialisation: {e}",
                    found.location
                );
                result = Err(Failure::Test);
                continue;
            }
        };
        println!(
            "virtio-rng: rng{i} at {}",
            found.location
        );
        if let Err(e) = check(&mut rng, i, buffer) {
            result = Err(e);
        }
        let _ = rng.transport.reset();
    }
    result
}

fn check(rng: &mut Rng, i: usize, buffer: Buffer) -> Outcome {
    let mut total = 0u64;
    for size in SIZES {
        buffer.fill(CANARY);
        let filled = match rng.fill(buffer.slice(0, size)) {
            Ok(len) => len as usize,
            Err(e) => fail!("virtio-rng: rng{i}: request of {size} bytes: {e}"),
        };
        println!("virtio-rng: rng{i}: {size} bytes requested, {filled} filled");
        if filled == 0 || filled > size {
            fail!("virtio-rng: rng{i}: {filled} bytes filled for a {size}-byte buffer");
        }
        let bytes = buffer.bytes();
        if let Some(at) = bytes[size..size + GUARD].iter().position(|&b| b != CANARY) {
            fail!(
                "virtio-rng: rng{i}: byte {} past the {size}-byte buffer was written",
                at
            );
        }
        if !looks_random(&bytes[..filled]) {
            fail!(
                "virtio-rng: rng{i}: the {filled} bytes filled are all {:#04x}",
                bytes[0]
            );
        }
        total += filled as u64;
    }

    // Two buffers in one chain; and two requests that must differ.
    buffer.fill(CANARY);
    let chain = Chain::new()
        .write_buf(buffer.slice(0, 256))
        .write_buf(buffer.slice(1024, 256));
    let filled = match submit_and_wait(&mut rng.transport, &mut rng.queue, &chain, TIMEOUT_MS) {
        Ok(len) => len as usize,
        Err(e) => fail!("virtio-rng: rng{i}: two-buffer request: {e}"),
    };
    let bytes = buffer.bytes();
    println!("virtio-rng: rng{i}: 2 buffers of 256 bytes in one chain, {filled} filled");
    if filled != 512 || !looks_random(&bytes[..256]) || !looks_random(&bytes[1024..1280]) {
        fail!("virtio-rng: rng{i}: two-buffer request filled {filled} bytes, expected 512 random ones");
    }
    if bytes[256..1024].iter().any(|&b| b != CANARY) {
        fail!("virtio-rng: rng{i}: bytes between the two buffers were written");
    }
    let (first, second) = (buffer.slice(0, 64), buffer.slice(64, 64));
    if rng.fill(first).is_err() || rng.fill(second).is_err() || first.bytes() == second.bytes() {
        fail!("virtio-rng: rng{i}: two 64-byte reads came back identical (or failed)");
    }
    total += 512 + 128;
    println!("virtio-rng: rng{i}: {total} bytes in all");
    check_interrupts(format_args!("virtio-rng: rng{i}"), &mut rng.transport)
}
