//! `virtio-console`: a line out on port 0's transmitq, lines in on its
//! receiveq, each echoed back.

use super::{arg, check_interrupts, flag, virtio_devices, Context, Outcome};
use crate::dma::{self, Buffer};
use crate::println;
use crate::virtio::queue::{Chain, Virtqueue, Wait};
use crate::virtio::{device_id, init_device, submit_and_wait, Transport};

/// What the guest says first.
const HELLO: &[u8] = b"KEEL-HVC: hello from the guest\n";
/// Prefix of each echoed line.
const ECHO: &[u8] = b"KEEL-HVC: got ";
const RECEIVEQ: u16 = 0;
const TRANSMITQ: u16 = 1;
const RX_BUFFERS: usize = 4;
const RX_BUFFER_SIZE: usize = 64;
/// Longest line kept; the rest of a longer line is dropped.
const LINE_MAX: usize = 200;

struct Port {
    transport: Transport,
    rx: Virtqueue,
    tx: Virtqueue,
    /// Receive buffers and the head each is posted under.
    rx_buffers: [(Buffer, u16); RX_BUFFERS],
    tx_buffer: Buffer,
    /// Received bytes not yet returned as a line.
    pending: [u8; LINE_MAX + RX_BUFFER_SIZE],
    pending_len: usize,
}

impl Port {
    fn post(&mut self, i: usize) -> bool {
        let buffer = self.rx_buffers[i].0;
        match self.rx.add(&Chain::new().write_buf(buffer)) {
            Some(head) => {
                self.rx_buffers[i].1 = head;
                true
            }
            None => false,
        }
    }

    fn send(&mut self, parts: &[&[u8]]) -> Outcome {
        let mut len = 0;
        for part in parts {
            self.tx_buffer.write(len, part);
            len += part.len();
        }
        let chain = Chain::new().read_buf(self.tx_buffer.slice(0, len));
        match submit_and_wait(&mut self.transport, &mut self.tx, &chain, 2000) {
            Ok(_) => Ok(()),
            Err(e) => fail!("virtio-console: transmitq: {e}"),
        }
    }

    /// The next line (without its `\r\n`), waiting at most `timeout_ms`.
    fn read_line(
        &mut self,
        timeout_ms: u64,
        line: &mut [u8; LINE_MAX],
    ) -> Result<usize, super::Failure> {
        let start = crate::tsc::now();
        loop {
            if let Some(end) = self.pending[..self.pending_len]
                .iter()
                .position(|&b| b == b'\n')
            {
                let mut len = end.min(LINE_MAX);
                line[..len].copy_from_slice(&self.pending[..len]);
                if len > 0 && line[len - 1] == b'\r' {
                    len -= 1;
                }
                self.pending.copy_within(end + 1..self.pending_len, 0);
                self.pending_len -= end + 1;
                return Ok(len);
            }
            let spent = crate::tsc::now().wrapping_sub(start) / crate::tsc::ticks_per_ms(1);
            if spent >= timeout_ms {
                fail!("virtio-console: no complete line from the host within {timeout_ms} ms");
            }
            match self.rx.wait(&self.transport, timeout_ms - spent) {
                Wait::Used { id, len } => {
                    self.transport.note_completion();
                    let Some(i) = self.rx_buffers.iter().position(|&(_, head)| head == id) else {
                        fail!("virtio-console: receiveq returned head {id}, which was not posted");
                    };
                    let buffer = self.rx_buffers[i].0;
                    let len = (len as usize).min(RX_BUFFER_SIZE);
                    // An overlong line is cut where the buffer is full.
                    let keep = len.min(self.pending.len() - self.pending_len);
                    buffer.read(
                        0,
                        &mut self.pending[self.pending_len..self.pending_len + keep],
                    );
                    self.pending_len += keep;
                    let full = self.pending_len == self.pending.len();
                    if full && !self.pending.contains(&b'\n') {
                        self.pending[self.pending_len - 1] = b'\n';
                    }
                    if !self.post(i) {
                        fail!("virtio-console: cannot re-post a receive buffer");
                    }
                    self.rx.kick(&self.transport);
                }
                Wait::NeedsReset { status } => {
                    fail!("virtio-console: device needs reset (status {status:#x})")
                }
                Wait::Timeout(_) => {}
            }
        }
    }
}

/// `virtio-console [lines=N] [timeout-ms=N] [irq=0|1]`.
pub fn run(ctx: &Context<'_>) -> Outcome {
    let lines = arg(ctx.cmdline.number("lines"))?.unwrap_or(1);
    let timeout_ms = arg(ctx.cmdline.number("timeout-ms"))?.unwrap_or(10_000);
    let use_irq = flag(ctx, "irq", true)?;
    let devices = virtio_devices(ctx)?;
    let count = devices.of_type(device_id::CONSOLE).count();
    println!("virtio-console: {count} device(s)");
    let Some(found) = devices.of_type(device_id::CONSOLE).next() else {
        fail!("no virtio-console device on the command line (virtio_mmio.device=...)");
    };
    if count > 1 {
        println!("virtio-console: using the first one only");
    }
    let rx_memory = dma::alloc_or_panic(RX_BUFFERS * RX_BUFFER_SIZE, 64);
    let mut port = Port {
        transport: Transport::new(found, ctx.params, use_irq),
        rx: Virtqueue::new(RECEIVEQ, 16),
        tx: Virtqueue::new(TRANSMITQ, 16),
        rx_buffers: [(rx_memory, 0); RX_BUFFERS],
        tx_buffer: dma::alloc_or_panic(LINE_MAX + 64, 64),
        pending: [0; LINE_MAX + RX_BUFFER_SIZE],
        pending_len: 0,
    };
    for (i, entry) in port.rx_buffers.iter_mut().enumerate() {
        entry.0 = rx_memory.slice(i * RX_BUFFER_SIZE, RX_BUFFER_SIZE);
    }
    // Port 0 only: no MULTIPORT, SIZE or EMERG_WRITE.
    if let Err(e) = init_device(&port.transport, 0, &mut [&mut port.rx, &mut port.tx], 16) {
        fail!(
            "virtio-console at {}: initialisation: {e}",
            found.location
        );
    }
    println!(
        "virtio-console: port 0 at {}",
        found.location
    );
    for i in 0..RX_BUFFERS {
        if !port.post(i) {
            fail!("virtio-console: cannot post receive buffer {i}");
        }
    }
    port.rx.kick(&port.transport);

    port.send(&[HELLO])?;
    println!("virtio-console: sent \"KEEL-HVC: hello from the guest\"");
    let mut line = [0u8; LINE_MAX];
    for _ in 0..lines {
        let len = port.read_line(timeout_ms, &mut line)?;
        let text = core::str::from_utf8(&line[..len]).unwrap_or("<not UTF-8>");
        println!("virtio-console: received \"{text}\"");
        port.send(&[ECHO, &line[..len], b"\n"])?;
        println!("virtio-console: echoed \"KEEL-HVC: got {text}\"");
    }
    check_interrupts(format_args!("virtio-console"), &mut port.transport)?;
    let _ = port.transport.reset();
    Ok(())
}
