//! A virtio device from a request handler: the embedder says what one
//! request gets as a reply, [`RequestDevice`] does the virtio part.

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::QueueT;

use crate::activation::{process_queue, ActivationState, Handled};
use crate::device::{check_queue_count, Activation, VirtioDevice};
use crate::{features, Result};

/// The largest request (device-readable bytes of one chain) and reply
/// (device-writable bytes used) a [`RequestDevice`] hands its handler.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// What a request/reply device does with one request; everything else
/// (feature negotiation, activation, queue processing, interrupts, resets,
/// hostile chains) is [`RequestDevice`]'s.
///
/// Every byte of `request` comes from the guest: a handler must not panic
/// on any of it.
pub trait RequestHandler: Send {
    /// The device type ID the guest sees (see [`crate::device_type`]; a
    /// device of your own takes an ID no guest driver claims).
    fn device_type(&self) -> u32;

    /// The maximum size of each queue, in queue index order (powers of two,
    /// at most [`crate::MAX_QUEUE_SIZE`]); its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Device-specific feature bits offered beyond `VERSION_1`, which is
    /// always offered.
    fn features(&self) -> u64 {
        0
    }

    /// The configuration space: fills `data` from `offset`. Default: none
    /// (reads as zero).
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    /// Writes to the configuration space. Default: ignored.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    /// Answers one request that arrived on `queue`: `request` holds the
    /// chain's device-readable bytes, `reply` is as long as its
    /// device-writable part (both capped at [`MAX_REQUEST_BYTES`]). Returns
    /// how many bytes of `reply` to hand back (clamped to `reply.len()`).
    fn handle(&mut self, queue: usize, request: &[u8], reply: &mut [u8]) -> usize;

    /// The driver reset the device. Default: nothing to forget.
    fn reset(&mut self) {}
}

/// A virtio device built from a [`RequestHandler`]: attach it to a transport
/// (or to `keel-vmm`'s `VmBuilder::add_virtio_device`) like any device of
/// this crate.
///
/// A chain whose readable part is larger than [`MAX_REQUEST_BYTES`] is
/// answered with nothing used (length 0); a chain that breaks the virtqueue
/// rules puts the device in `DEVICE_NEEDS_RESET`, as for every device here.
pub struct RequestDevice<H: RequestHandler> {
    handler: H,
    activation: ActivationState,
    request: Vec<u8>,
    reply: Vec<u8>,
    requests: u64,
}

impl<H: RequestHandler> std::fmt::Debug for RequestDevice<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestDevice")
            .field("device_type", &self.handler.device_type())
            .field("active", &self.activation.is_active())
            .field("requests", &self.requests)
            .finish_non_exhaustive()
    }
}

impl<H: RequestHandler> RequestDevice<H> {
    /// A device answering requests with `handler`.
    pub fn new(handler: H) -> Result<Self> {
        Ok(Self {
            handler,
            activation: ActivationState::new("virtio request device")?,
            request: Vec::new(),
            reply: Vec::new(),
            requests: 0,
        })
    }

    /// The handler.
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// The handler, mutably.
    pub fn handler_mut(&mut self) -> &mut H {
        &mut self.handler
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// Whether the driver has activated the device (and not reset it).
    pub fn is_active(&self) -> bool {
        self.activation.is_active()
    }

    fn process(&mut self, ops: &mut EventOps) {
        for queue in 0..self.handler.queue_max_sizes().len() {
            let Some(active) = self.activation.active_mut() else {
                return;
            };
            let Some(size) = active.queues.get(queue).map(|q| usize::from(q.size())) else {
                return;
            };
            let Self {
                handler,
                request,
                reply,
                requests,
                ..
            } = self;
            let result = process_queue(active, queue, size, |mem, chain| {
                let readable = chain.readable_len();
                if readable > MAX_REQUEST_BYTES as u64 {
                    keel_ratelimit::warn_limited!(
                        "virtio request device: a {readable}-byte request on queue {queue} is larger than {MAX_REQUEST_BYTES} bytes; answered with nothing"
                    );
                    return Handled::Used(0);
                }
                // Both lengths are at most MAX_REQUEST_BYTES here.
                request.resize(readable as usize, 0);
                if chain.reader(mem).read_exact(request).is_err() {
                    return Handled::Used(0);
                }
                let capacity = chain.writable_len().min(MAX_REQUEST_BYTES as u64) as usize;
                reply.clear();
                reply.resize(capacity, 0);
                let len = handler.handle(queue, request, reply).min(capacity);
                *requests = requests.saturating_add(1);
                let mut writer = chain.writer(mem, len as u64);
                reply.truncate(len);
                let _ = writer.write(reply);
                Handled::Used(writer.written() as u32)
            });
            self.activation.end_pass(ops, queue, result);
        }
    }
}

impl<H: RequestHandler> VirtioDevice for RequestDevice<H> {
    fn device_type(&self) -> u32 {
        self.handler.device_type()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.handler.queue_max_sizes()
    }

    fn features(&self) -> u64 {
        features::VERSION_1
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC
            | self.handler.features()
    }

    fn ack_features(&mut self, _acked: u64) {}

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.handler.read_config(offset, data)
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.handler.write_config(offset, data)
    }

    fn activate(&mut self, activation: Activation) -> Result<()> {
        check_queue_count(self, &activation)?;
        let device_type = self.handler.device_type();
        self.activation.activate(device_type, activation)
    }

    fn reset(&mut self) -> bool {
        self.activation.reset();
        self.handler.reset();
        true
    }

    fn save_state(&self) -> Option<crate::DeviceState> {
        Some(crate::DeviceState::new(
            self.activation.queue_progress(),
            Vec::new(),
        ))
    }
}

impl<H: RequestHandler> MutEventSubscriber for RequestDevice<H> {
    fn init(&mut self, ops: &mut EventOps) {
        self.activation.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.activation.queue_event(events.fd(), ops) {
            self.process(ops);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, SubscriberOps};
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::device::{RecordingInterrupt, StopSignal, VirtioSignal};
    use crate::guest_driver::{memory, Buf, DriverQueue, DATA};

    /// Replies with the request in upper case.
    struct Upper;

    impl RequestHandler for Upper {
        fn device_type(&self) -> u32 {
            0x3f
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn handle(&mut self, _queue: usize, request: &[u8], reply: &mut [u8]) -> usize {
            let n = request.len().min(reply.len());
            for (out, byte) in reply.iter_mut().zip(request) {
                *out = byte.to_ascii_uppercase();
            }
            n
        }
    }

    fn run_one(chain: &[Buf]) -> (Vec<(u32, u32)>, Vec<VirtioSignal>, GuestAddressBytes) {
        let mem = memory().unwrap();
        let device = Arc::new(Mutex::new(RequestDevice::new(Upper).unwrap()));
        let mut driver = DriverQueue::new(&mem, 16).unwrap();
        let interrupt = Arc::new(RecordingInterrupt::new());
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut event_loop = EventManager::new().unwrap();
        event_loop.add_subscriber(device.clone());
        device
            .lock()
            .unwrap()
            .activate(Activation {
                mem: mem.clone(),
                queues: vec![driver.queue().unwrap()],
                queue_events: vec![notify.try_clone().unwrap()],
                interrupt: interrupt.clone(),
                stop: StopSignal::new(),
            })
            .unwrap();
        event_loop.run_with_timeout(100).unwrap();
        mem.write_slice(b"hello", GuestAddress(DATA)).unwrap();
        driver.add(chain).unwrap();
        notify.write(1).unwrap();
        event_loop.run_with_timeout(100).unwrap();
        let mut reply = [0u8; 16];
        mem.read_slice(&mut reply, GuestAddress(DATA + 0x1000)).unwrap();
        (driver.used(), interrupt.signals(), reply)
    }

    type GuestAddressBytes = [u8; 16];

    #[test]
    fn the_handler_answers_a_request_and_the_guest_is_interrupted() {
        let (used, signals, reply) = run_one(&[Buf::readable(DATA, 5), Buf::writable(DATA + 0x1000, 16)]);
        assert_eq!(used[0].1, 5);
        assert_eq!(&reply[..6], b"HELLO\0");
        assert_eq!(signals, [VirtioSignal::UsedQueue(0)]);
    }

    #[test]
    fn the_reply_never_outgrows_the_writable_buffer() {
        let (used, _, reply) = run_one(&[Buf::readable(DATA, 5), Buf::writable(DATA + 0x1000, 3)]);
        assert_eq!(used[0].1, 3);
        assert_eq!(&reply[..4], b"HEL\0");
    }

    #[test]
    fn an_oversized_request_is_answered_with_nothing() {
        let (used, _, reply) = run_one(&[
            Buf::readable(DATA, MAX_REQUEST_BYTES as u32 + 1),
            Buf::writable(DATA + 0x1000, 16),
        ]);
        assert_eq!(used[0].1, 0);
        assert_eq!(reply, [0; 16]);
    }
}
