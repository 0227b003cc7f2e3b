//! `virtio-request`: a generic request/reply driver for a device type the
//! guest does not otherwise know, so that an embedder's own virtio device
//! can be tested without writing guest code.

use super::{check_interrupts, flag, virtio_devices, Context, Outcome};
use crate::cmdline::ArgError;
use crate::dma;
use crate::println;
use crate::virtio::queue::{Chain, Virtqueue};
use crate::virtio::{init_device, submit_and_wait, Transport};

pub const KEYS: &[&str] = &["type", "send", "reply-bytes", "count", "irq"];

const TIMEOUT_MS: u64 = 5000;
/// Longest `send=` text and `reply-bytes=`: one page each.
const MAX_BYTES: u64 = 4096;

/// `virtio-request type=N [send=TEXT] [reply-bytes=N] [count=N] [irq=0|1]`.
pub fn run(ctx: &Context<'_>) -> Outcome {
    let device_type = super::arg(ctx.cmdline.required_number("type"))?;
    let send = ctx.cmdline.value("send").unwrap_or("hello");
    let reply_bytes = super::arg(ctx.cmdline.number("reply-bytes"))?.unwrap_or(256);
    let count = super::arg(ctx.cmdline.number("count"))?.unwrap_or(1);
    let use_irq = flag(ctx, "irq", true)?;
    if send.is_empty() || send.len() as u64 > MAX_BYTES {
        return super::arg(Err(ArgError::OutOfRange("send", send.len() as u64)));
    }
    if reply_bytes == 0 || reply_bytes > MAX_BYTES {
        return super::arg(Err(ArgError::OutOfRange("reply-bytes", reply_bytes)));
    }
    let Ok(device_type) = u32::try_from(device_type) else {
        return super::arg(Err(ArgError::OutOfRange("type", device_type)));
    };
    let devices = virtio_devices(ctx)?;
    let Some(found) = devices.of_type(device_type).next() else {
        fail!("virtio-request: no device of type {device_type}");
    };
    let mut transport = Transport::new(found, ctx.params, use_irq);
    let mut queue = Virtqueue::new(0, 16);
    if let Err(e) = init_device(&transport, 0, &mut [&mut queue], 16) {
        fail!("virtio-request: device at {}: initialisation: {e}", found.location);
    }
    let out = dma::alloc_or_panic(MAX_BYTES as usize, 4096);
    let reply = dma::alloc_or_panic(MAX_BYTES as usize, 4096);
    out.write(0, send.as_bytes());
    for n in 0..count {
        reply.fill(0);
        let chain = Chain::new()
            .read_buf(out.slice(0, send.len()))
            .write_buf(reply.slice(0, reply_bytes as usize));
        let used = match submit_and_wait(&mut transport, &mut queue, &chain, TIMEOUT_MS) {
            Ok(used) => used as usize,
            Err(e) => fail!("virtio-request: request {n}: {e}"),
        };
        if used > reply_bytes as usize {
            fail!("virtio-request: request {n}: the device used {used} bytes of a {reply_bytes}-byte reply buffer");
        }
        let mut text = [0u8; MAX_BYTES as usize];
        reply.read(0, &mut text[..used]);
        match core::str::from_utf8(&text[..used]) {
            Ok(s) if s.bytes().all(|b| b.is_ascii_graphic() || b == b' ') => {
                println!("virtio-request: reply {n}: {used} bytes: \"{s}\"")
            }
            _ => println!("virtio-request: reply {n}: {used} bytes (not printable text)"),
        }
    }
    let result = check_interrupts(format_args!("virtio-request"), &mut transport);
    let _ = transport.reset();
    result
}
