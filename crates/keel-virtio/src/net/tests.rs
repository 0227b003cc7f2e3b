//! virtio-net against a pretend guest driver and an in-memory backend, and
//! a real tap inside a network namespace of its own.

use std::sync::{Arc, Mutex};

use crate::GuestMemoryMmap;
use event_manager::{EventManager, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::device::{RecordingInterrupt, StopSignal, VirtioSignal};
use crate::guest_driver::{memory, raw_desc, Buf, DriverQueue, DATA, MEM_SIZE};
use virtio_bindings::virtio_net::{VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_GSO_UDP};

const MRG: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;

struct Harness<'a> {
    rx: DriverQueue<'a>,
    tx: DriverQueue<'a>,
    net: Arc<Mutex<Net<MemoryNetBackend>>>,
    backend: MemoryNetBackend,
    interrupt: Arc<RecordingInterrupt>,
    rx_notify: EventFd,
    tx_notify: EventFd,
    event_loop: EventManager<Arc<Mutex<Net<MemoryNetBackend>>>>,
}

impl<'a> Harness<'a> {
    /// An active device whose driver accepted `acked`.
    fn new(mem: &'a GuestMemoryMmap, acked: u64) -> Self {
        let backend = MemoryNetBackend::new().unwrap();
        let net = Arc::new(Mutex::new(
            Net::new(backend.clone(), NetOptions::default()).unwrap(),
        ));
        let mut event_loop = EventManager::new().unwrap();
        event_loop.add_subscriber(net.clone());
        let h = Self {
            rx: DriverQueue::at(mem, GuestAddress(0x1000), 16).unwrap(),
            tx: DriverQueue::at(mem, GuestAddress(0x4000), 16).unwrap(),
            net,
            backend,
            interrupt: Arc::new(RecordingInterrupt::new()),
            rx_notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            tx_notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            event_loop,
        };
        {
            let mut net = h.net.lock().unwrap();
            net.ack_features(features::VERSION_1 | acked);
            // As a transport does when the driver accepted EVENT_IDX.
            let event_idx = acked & features::RING_EVENT_IDX != 0;
            let mut queues = vec![h.rx.queue().unwrap(), h.tx.queue().unwrap()];
            for queue in &mut queues {
                queue.set_event_idx(event_idx);
            }
            net.activate(Activation {
                mem: mem.clone(),
                queues,
                queue_events: vec![h.rx_notify.try_clone().unwrap(), h.tx_notify.try_clone().unwrap()],
                interrupt: h.interrupt.clone(),
                stop: StopSignal::new(),
            })
            .unwrap();
        }
        h
    }

    /// One epoll round; returns how many events were dispatched.
    fn run_once(&mut self) -> usize {
        self.event_loop.run_with_timeout(100).unwrap()
    }

    fn counters(&self) -> NetCounters {
        self.net.lock().unwrap().counters()
    }

    fn transmit(&mut self, bufs: &[Buf]) -> u16 {
        let head = self.tx.add(bufs).unwrap();
        self.tx_notify.write(1).unwrap();
        self.run_once();
        head
    }

    fn notify_rx(&mut self) {
        self.rx_notify.write(1).unwrap();
        self.run_once();
    }
}

/// A frame as the backend hands it over: a zeroed header with a marker in
/// `num_buffers` (which the device must overwrite), then `len` bytes.
fn incoming(len: usize, seed: u8) -> Vec<u8> {
    let mut frame = vec![0u8; VNET_HDR_LEN];
    frame[NUM_BUFFERS_OFFSET] = 0xee;
    frame.extend((0..len).map(|i| (i as u8).wrapping_add(seed)));
    frame
}

fn guest_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
    bytes
}

fn num_buffers(mem: &GuestMemoryMmap, addr: u64) -> u16 {
    mem.read_obj(GuestAddress(addr + NUM_BUFFERS_OFFSET as u64))
        .unwrap()
}

#[test]
fn tx_of_a_frame_spread_over_several_descriptors_is_one_backend_write() {
    let mem = memory().unwrap();
    let mut h = Harness::new(&mem, 0);
    let mut frame = vec![0u8; VNET_HDR_LEN];
    frame.extend((0..200u32).map(|i| i as u8));
    // Header alone, then the frame in two pieces at scattered addresses.
    mem.write_slice(&frame[..12], GuestAddress(DATA)).unwrap();
    mem.write_slice(&frame[12..112], GuestAddress(DATA + 0x1000))
        .unwrap();
    mem.write_slice(&frame[112..], GuestAddress(DATA + 0x3000))
        .unwrap();
    let head = h.transmit(&[
        Buf::readable(DATA, 12),
        Buf::readable(DATA + 0x1000, 100),
        Buf::readable(DATA + 0x3000, 100),
    ]);

    assert_eq!(h.backend.sent(), [frame]);
    assert_eq!(h.tx.used(), [(u32::from(head), 0)]);
    let counters = h.counters();
    assert_eq!((counters.tx_frames, counters.tx_bytes), (1, 200));
    assert_eq!(h.interrupt.signals(), [VirtioSignal::UsedQueue(1)]);
}

#[test]
fn tx_through_an_indirect_descriptor_table() {
    let mem = memory().unwrap();
    let mut h = Harness::new(&mem, features::RING_INDIRECT_DESC);
    let table = DATA + 0x8000;
    mem.write_obj(raw_desc(DATA, 12, 1, 1), GuestAddress(table))
        .unwrap(); // NEXT
    mem.write_obj(raw_desc(DATA + 0x100, 50, 0, 0), GuestAddress(table + 16))
        .unwrap();
    mem.write_slice(&[0xab; 50], GuestAddress(DATA + 0x100)).unwrap();
    h.tx.store(0, raw_desc(table, 32, 4, 0)).unwrap(); // INDIRECT
    h.tx.publish(0);
    h.tx_notify.write(1).unwrap();
    h.run_once();
    let sent = h.backend.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].len(), 62);
    assert_eq!(sent[0][12..], [0xab; 50]);
}

#[test]
fn tx_offloads_the_driver_did_not_accept_are_dropped() {
    let mem = memory().unwrap();
    let mut h = Harness::new(&mem, 0);
    let header = |flags: u32, gso: u32| {
        let mut frame = incoming(50, 0);
        frame[0] = flags as u8;
        frame[1] = gso as u8;
        frame[NUM_BUFFERS_OFFSET] = 0;
        frame
    };
    let cases = [
        header(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0),
        header(0, VIRTIO_NET_HDR_GSO_TCPV4),
        header(0, VIRTIO_NET_HDR_GSO_UDP),
        header(0, 0),
    ];
    for (i, frame) in cases.iter().enumerate() {
        let addr = DATA + 0x1000 * i as u64;
        mem.write_slice(frame, GuestAddress(addr)).unwrap();
        h.transmit(&[Buf::readable(addr, frame.len() as u32)]);
    }
    assert_eq!(h.counters().tx_dropped_malformed, 3);
    assert_eq!(h.backend.sent(), [cases[3].clone()]);
}

#[test]
fn tx_tso_frames_pass_when_the_driver_accepted_them() {
    let mem = memory().unwrap();
    let accepted = (1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_HOST_TSO4) | (1 << VIRTIO_NET_F_HOST_TSO6);
    let mut h = Harness::new(&mem, accepted);
    let mut frame = incoming(3000, 0);
    frame[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    frame[1] = VIRTIO_NET_HDR_GSO_TCPV6 as u8;
    mem.write_slice(&frame, GuestAddress(DATA)).unwrap();
    h.transmit(&[Buf::readable(DATA, frame.len() as u32)]);
    assert_eq!(h.backend.sent(), [frame]);
}

#[test]
fn tx_ufo_frames_pass_only_when_the_driver_accepted_host_ufo() {
    let mem = memory().unwrap();
    let mut frame = incoming(3000, 0);
    frame[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    frame[1] = VIRTIO_NET_HDR_GSO_UDP as u8;
    mem.write_slice(&frame, GuestAddress(DATA)).unwrap();
    let with_ufo = (1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_HOST_UFO);
    let mut h = Harness::new(&mem, with_ufo);
    h.transmit(&[Buf::readable(DATA, frame.len() as u32)]);
    assert_eq!(h.backend.sent(), [frame.clone()]);

    let without = (1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_HOST_TSO4);
    let mut h = Harness::new(&mem, without);
    h.transmit(&[Buf::readable(DATA, frame.len() as u32)]);
    assert!(h.backend.sent().is_empty());
    assert_eq!(h.counters().tx_dropped_malformed, 1);
}

#[test]
fn udp_fragmentation_offload_is_offered_and_follows_the_driver() {
    let mem = memory().unwrap();
    let guest_ufo = (1 << VIRTIO_NET_F_GUEST_CSUM) | (1 << VIRTIO_NET_F_GUEST_UFO);
    let h = Harness::new(&mem, MRG | guest_ufo);
    let offered = h.net.lock().unwrap().features();
    assert_eq!(offered & guest_ufo, guest_ufo);
    assert_ne!(offered & (1 << VIRTIO_NET_F_HOST_UFO), 0);
    assert_eq!(
        h.backend.offloads().last(),
        Some(&(net_offload::CSUM | net_offload::UFO))
    );
}

#[test]
fn a_backend_without_ufo_still_gets_checksum_and_tso_offloads() {
    let backend = MemoryNetBackend::new().unwrap();
    backend.refuse_offload_flags(net_offload::UFO);
    let net = Net::new(backend.clone(), NetOptions::default()).unwrap();
    let offered = net.features();
    assert_eq!(offered & (1 << VIRTIO_NET_F_GUEST_UFO), 0);
    assert_eq!(offered & (1 << VIRTIO_NET_F_HOST_UFO), 0);
    let tso =
        (1 << VIRTIO_NET_F_GUEST_CSUM) | (1 << VIRTIO_NET_F_GUEST_TSO4) | (1 << VIRTIO_NET_F_GUEST_TSO6);
    assert_eq!(offered & tso, tso);
    // Probed with UFO (refused), then without it, then cleared.
    assert_eq!(backend.offloads(), [PROBE_OFFLOADS_NO_UFO, 0]);
}

#[test]
fn nothing_is_read_from_the_backend_before_activation() {
    let backend = MemoryNetBackend::new().unwrap();
    let net = Arc::new(Mutex::new(
        Net::new(backend.clone(), NetOptions::default()).unwrap(),
    ));
    let mut event_loop = EventManager::new().unwrap();
    event_loop.add_subscriber(net.clone());
    backend.push_frame(incoming(60, 0));
    event_loop.run_with_timeout(50).unwrap();
    assert_eq!(event_loop.run_with_timeout(50).unwrap(), 0);
    assert_eq!(backend.reads(), 0);
    assert!(!net.lock().unwrap().is_watching_backend());
}

#[test]
fn tx_with_a_short_header_is_dropped_and_counted() {
    let mem = memory().unwrap();
    let mut h = Harness::new(&mem, 0);
    let head = h.transmit(&[Buf::readable(DATA, 8)]);
    // A header but no Ethernet header either.
    h.transmit(&[Buf::readable(DATA, VNET_HDR_LEN as u32 + 4)]);
    assert!(h.backend.sent().is_empty());
    assert_eq!(h.tx.used()[0], (u32::from(head), 0), "returned to the guest");
    assert_eq!(h.tx.used().len(), 2);
    assert_eq!(h.counters().tx_dropped_malformed, 2);
    assert_eq!(h.counters().tx_frames, 0);
}

#[test]
fn tx_of_an_oversized_frame_is_dropped_and_counted() {
    let mem = memory().unwrap();
    let mut h = Harness::new(&mem, 0);
    let too_long = (VNET_HDR_LEN + MAX_FRAME_LEN + 1) as u32;
    h.transmit(&[Buf::readable(DATA, too_long)]);
    // Exactly the limit still goes through.
    h.transmit(&[Buf::readable(DATA, too_long - 1)]);
    assert_eq!(h.counters().tx_dropped_oversized, 1);
    assert_eq!(h.backend.sent().len(), 1);
    assert_eq!(h.backend.sent()[0].len(), VNET_HDR_LEN + MAX_FRAME_LEN);
    assert_eq!(h.tx.used().len(), 2);
}

#[test]
fn tx_with_a_writable_descriptor_is_dropped_and_counted_and_not_written() {
    let mem = memory().unwrap();
    let mut h = Harness::new(&mem, 0);
    mem.write_slice(&[0x5a; 64], GuestAddress(DATA + 0x1000)).unwrap();
    h.transmit(&[Buf::readable(DATA, 100), Buf::writable(DATA + 0x1000, 64)]);
    assert!(h.backend.sent().is_empty());
    assert_eq!(h.counters().tx_dropped_malformed, 1);
    assert_eq!(h.tx.used()[0].1, 0);
    assert_eq!(guest_bytes(&mem, DATA + 0x1000, 64), [0x5a; 64]);
}

#[test]
fn rx_into_one_buffer() {
    let mem = memory().unwrap();
    let mut h = Harness::new(&mem, 0);
    let head = h.rx.add(&[Buf::writable(DATA, 1526)]).unwrap();
    h.notify_rx();
    let frame = incoming(100, 3);
    h.backend.push_frame(frame.clone());
    h.run_once();

    assert_eq!(h.rx.used(), [(u32::from(head), 112)]);
    assert_eq!(num_buffers(&mem, DATA), 1);
    assert_eq!(guest_bytes(&mem, DATA + 12, 100), frame[12..]);
    assert_eq!(guest_bytes(&mem, DATA + 112, 4), [0; 4], "nothing past the frame");
    let counters = h.counters();
    assert_eq!((counters.rx_frames, counters.rx_bytes), (1, 100));
    assert_eq!(h.interrupt.signals(), [VirtioSignal::UsedQueue(0)]);
}

#[test]
fn rx_with_mergeable_buffers_spreads_a_frame_across_chains() {
    let mem = memory().unwrap();
    let mut h = Harness::new(&mem, MRG);
    let heads: Vec<u16> = (0..4)
        .map(|i| h.rx.add(&[Buf::writable(DATA + 0x1000 * i, 100)]).unwrap())
        .collect();
    h.notify_rx();
    // 12 + 238 bytes: 100 + 100 + 50 over three chains.
    let frame = incoming(238, 9);
    h.backend.push_frame(frame.clone());
    h.run_once();

    assert_eq!(
        h.rx.used(),
        [
            (u32::from(heads[0]), 100),
            (u32::from(heads[1]), 100),
            (u32::from(heads[2]), 50)
        ]
    );
    assert_eq!(num_buffers(&mem, DATA), 3);
    let mut received = guest_bytes(&mem, DATA, 100);
    received.extend(guest_bytes(&mem, DATA + 0x1000, 100));
    received.extend(guest_bytes(&mem, DATA + 0x2000, 50));
    assert_eq!(received[12..], frame[12..]);
    assert_eq!(h.counters().rx_frames, 1);

    // The fourth chain is still the guest's, and takes the next frame.
    h.backend.push_frame(incoming(20, 1));
    h.run_once();
    assert_eq!(h.rx.used()[3], (u32::from(heads[3]), 32));
    assert_eq!(num_buffers(&mem, DATA + 0x3000), 1);
}

#[test]
fn rx_with_too_few_mergeable_buffers_waits_for_more_without_losing_the_frame() {
    let mem = memory().unwrap();
    let mut h = Harness::new(&mem, MRG);
    h.rx.add(&[Buf::writable(DATA, 100)]).unwrap();
    h.notify_rx();
    let frame = incoming(150, 4);
    h.backend.push_frame(frame.clone());
    h.run_once();
    assert!(h.rx.used().is_empty(), "one chain is not enough");
    assert!(h.net.lock().unwrap().is_rx_paused());

    h.rx.add(&[Buf::writable(DATA + 0x1000, 100)]).unwrap();
    h.notify_rx();
    assert_eq!(h.rx.used().len(), 2);
    assert_eq!(num_buffers(&mem, DATA), 2);
    let mut received = guest_bytes(&mem, DATA, 100);
    received.extend(guest_bytes(&mem, DATA + 0x1000, 62));
    assert_eq!(received, {
        let mut f = frame.clone();
        f[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&2u16.to_le_bytes());
        f
    });
}

#[test]
fn with_event_idx_a_partly_filled_rx_ring_asks_to_be_notified_of_the_next_buffer() {
    let mem = memory().unwrap();
    let mut h = Harness::new(&mem, MRG | features::RING_EVENT_IDX);
    h.rx.add(&[Buf::writable(DATA, 100)]).unwrap();
    h.rx.add(&[Buf::writable(DATA + 0x1000, 100)]).unwrap();
    h.notify_rx();
    h.backend.push_frame(incoming(250, 0));
    h.run_once();
    assert!(h.rx.used().is_empty(), "two chains are not enough");
    // The chains taken were put back, but the device asked to hear about
    // the third buffer (available index 2), not the ones it already saw.
    assert_eq!(h.rx.avail_event(), 2);

    h.rx.add(&[Buf::writable(DATA + 0x2000, 100)]).unwrap();
    h.notify_rx();
    assert_eq!(h.rx.used().len(), 3);
    assert_eq!(num_buffers(&mem, DATA), 3);
}

#[test]
fn rx_stops_at_its_budget_and_comes_back_for_the_rest() {
    let mem = memory().unwrap();
    let mut h = Harness::new(&mem, 0);
    h.run_once();
    // 20 frames that fit no buffer: each is read and dropped.
    h.rx.add(&[Buf::writable(DATA, 64)]).unwrap();
    for _ in 0..20 {
        h.backend.push_frame(incoming(100, 0));
    }
    h.run_once();
    assert_eq!(h.counters().rx_dropped_too_big, 16, "one queue's worth per round");
    h.run_once();
    h.run_once();
    assert_eq!(h.counters().rx_dropped_too_big, 20);
    assert_eq!(h.backend.queued_frames(), 0);
}

#[test]
fn rx_with_no_guest_buffers_stops_watching_the_backend_then_delivers_when_buffers_arrive() {
    let mem = memory().unwrap();
    let mut h = Harness::new(&mem, 0);
    h.run_once(); // activation
    assert!(h.net.lock().unwrap().is_watching_backend());

    let first = incoming(60, 1);
    let second = incoming(70, 2);
    h.backend.push_frame(first.clone());
    h.run_once();
    {
        let net = h.net.lock().unwrap();
        assert!(net.is_rx_paused(), "the frame is kept");
        assert!(!net.is_watching_backend(), "backpressure");
    }
    h.backend.push_frame(second.clone());
    let reads = h.backend.reads();
    // Nothing wakes the loop while the guest has no buffers: no busy loop.
    assert_eq!(h.event_loop.run_with_timeout(50).unwrap(), 0);
    assert_eq!(h.backend.reads(), reads);
    assert_eq!(h.backend.queued_frames(), 1, "the second waits in the backend");

    h.rx.add(&[Buf::writable(DATA, 1526)]).unwrap();
    h.rx.add(&[Buf::writable(DATA + 0x1000, 1526)]).unwrap();
    h.notify_rx();
    assert_eq!(h.rx.used(), [(0, 72), (1, 82)]);
    assert_eq!(guest_bytes(&mem, DATA + 12, 60), first[12..]);
    assert_eq!(guest_bytes(&mem, DATA + 0x1000 + 12, 70), second[12..]);
    let net = h.net.lock().unwrap();
    assert!(!net.is_rx_paused());
    assert!(net.is_watching_backend());
    assert_eq!(net.counters().rx_frames, 2);
    assert_eq!(net.counters().rx_dropped_too_big, 0);
}

#[test]
fn rx_frame_larger_than_a_single_buffer_without_mergeable_buffers_is_dropped() {
    let mem = memory().unwrap();
    let mut h = Harness::new(&mem, 0);
    let head = h.rx.add(&[Buf::writable(DATA, 100)]).unwrap();
    h.notify_rx();
    h.backend.push_frame(incoming(200, 0));
    h.backend.push_frame(incoming(50, 0));
    h.run_once();
    assert_eq!(h.counters().rx_dropped_too_big, 1);
    // The chain was kept for the next frame, which fits.
    assert_eq!(h.rx.used(), [(u32::from(head), 62)]);
}

#[test]
fn feature_negotiation_sets_the_backend_offloads() {
    let mem = memory().unwrap();
    let guest_csum = 1 << VIRTIO_NET_F_GUEST_CSUM;
    let guest_tso4 = 1 << VIRTIO_NET_F_GUEST_TSO4;
    let guest_tso6 = 1 << VIRTIO_NET_F_GUEST_TSO6;
    let h = Harness::new(&mem, MRG | guest_csum | guest_tso4);
    // Probe at creation (all, then none), then what the driver accepted.
    assert_eq!(
        h.backend.offloads(),
        [PROBE_OFFLOADS, 0, net_offload::CSUM | net_offload::TSO4]
    );
    assert_eq!(h.backend.vnet_hdr_len(), Some(VNET_HDR_LEN));

    let mut net = h.net.lock().unwrap();
    // TSO without checksum offload is not something a tap takes.
    net.ack_features(guest_tso4 | guest_tso6);
    assert_eq!(h.backend.offloads().last(), Some(&0));
    assert!(net.reset());
    assert_eq!(h.backend.offloads().last(), Some(&0));
    assert_eq!(net.acked_features(), 0);
}

#[test]
fn receive_offloads_are_not_offered_when_the_backend_refuses_them() {
    let backend = MemoryNetBackend::new().unwrap();
    backend.refuse_offloads(true);
    let net = Net::new(backend, NetOptions::default()).unwrap();
    let offered = net.features();
    assert_eq!(offered & (1 << VIRTIO_NET_F_GUEST_CSUM), 0);
    assert_eq!(offered & (1 << VIRTIO_NET_F_GUEST_TSO4), 0);
    assert_ne!(offered & MRG, 0);
    assert_ne!(offered & (1 << VIRTIO_NET_F_HOST_TSO4), 0);

    let backend = MemoryNetBackend::new().unwrap();
    let net = Net::new(backend, NetOptions::default()).unwrap();
    let all =
        (1 << VIRTIO_NET_F_GUEST_CSUM) | (1 << VIRTIO_NET_F_GUEST_TSO4) | (1 << VIRTIO_NET_F_GUEST_TSO6);
    assert_eq!(net.features() & all, all);
    assert_ne!(net.features() & features::VERSION_1, 0);
    assert_ne!(net.features() & features::RING_EVENT_IDX, 0);
    assert_ne!(net.features() & features::RING_INDIRECT_DESC, 0);
}

#[test]
fn config_space_holds_the_mac_and_link_up() {
    let options = NetOptions {
        mac: [2, 0, 0, 0xaa, 0xbb, 0xcc],
        ..NetOptions::default()
    };
    let net = Net::new(MemoryNetBackend::new().unwrap(), options).unwrap();
    assert_eq!(net.device_type(), 1);
    assert_eq!(net.queue_max_sizes(), [256, 256]);
    let mut config = [0xffu8; 12];
    net.read_config(0, &mut config);
    assert_eq!(config, [2, 0, 0, 0xaa, 0xbb, 0xcc, 1, 0, 1, 0, 0, 0]);
    let bad = NetOptions {
        queue_size: 100,
        ..NetOptions::default()
    };
    assert!(Net::new(MemoryNetBackend::new().unwrap(), bad).is_err());
}

#[test]
fn a_readable_descriptor_in_an_rx_chain_needs_reset_and_nothing_is_written() {
    let mem = memory().unwrap();
    let mut h = Harness::new(&mem, MRG);
    mem.write_slice(&[0x77; 64], GuestAddress(DATA)).unwrap();
    h.rx.add(&[Buf::readable(DATA, 64), Buf::writable(DATA + 0x1000, 1526)])
        .unwrap();
    h.notify_rx();
    h.backend.push_frame(incoming(100, 0));
    h.run_once();
    assert!(h.rx.used().is_empty());
    assert_eq!(h.interrupt.signals(), [VirtioSignal::NeedsReset]);
    assert_eq!(guest_bytes(&mem, DATA, 64), [0x77; 64]);
    assert_eq!(guest_bytes(&mem, DATA + 0x1000, 16), [0; 16]);
    let net = h.net.lock().unwrap();
    assert!(!net.is_watching_backend(), "a failed device reads nothing");
}

#[test]
fn an_rx_chain_outside_guest_memory_needs_reset() {
    let mem = memory().unwrap();
    let mut h = Harness::new(&mem, MRG);
    h.rx.add(&[Buf::writable(MEM_SIZE - 16, 64)]).unwrap();
    h.notify_rx();
    h.backend.push_frame(incoming(100, 0));
    h.run_once();
    assert!(h.rx.used().is_empty());
    assert_eq!(h.interrupt.signals(), [VirtioSignal::NeedsReset]);

    // The device no longer listens: no wake-ups, no reads, no work.
    h.rx.add(&[Buf::writable(DATA, 1526)]).unwrap();
    h.rx_notify.write(1).unwrap();
    h.backend.push_frame(incoming(100, 0));
    assert_eq!(h.event_loop.run_with_timeout(50).unwrap(), 0);
    assert!(h.rx.used().is_empty());
}

#[test]
fn an_rx_chain_shorter_than_the_header_needs_reset() {
    let mem = memory().unwrap();
    let mut h = Harness::new(&mem, MRG);
    h.rx.add(&[Buf::writable(DATA, 8)]).unwrap();
    h.notify_rx();
    h.backend.push_frame(incoming(100, 0));
    h.run_once();
    assert!(h.rx.used().is_empty());
    assert_eq!(h.interrupt.signals(), [VirtioSignal::NeedsReset]);
    assert_eq!(guest_bytes(&mem, DATA, 8), [0; 8]);
}

#[test]
fn a_looping_tx_chain_needs_reset() {
    let mem = memory().unwrap();
    let mut h = Harness::new(&mem, 0);
    // Descriptor 0 points at itself.
    h.tx.store(0, raw_desc(DATA, 64, 1, 0)).unwrap();
    h.tx.publish(0);
    h.tx_notify.write(1).unwrap();
    h.run_once();
    assert!(h.backend.sent().is_empty());
    assert_eq!(h.interrupt.signals(), [VirtioSignal::NeedsReset]);
}

#[test]
fn short_frames_from_the_backend_are_dropped_and_counted() {
    let mem = memory().unwrap();
    let mut h = Harness::new(&mem, 0);
    h.rx.add(&[Buf::writable(DATA, 1526)]).unwrap();
    h.notify_rx();
    h.backend.push_frame(vec![0; 5]);
    h.backend.push_frame(incoming(40, 0));
    h.run_once();
    assert_eq!(h.counters().rx_dropped_malformed, 1);
    assert_eq!(h.rx.used(), [(0, 52)]);
}

#[test]
fn rx_headers_carry_only_offloads_the_driver_accepted() {
    let mem = memory().unwrap();
    let mut h = Harness::new(&mem, 0);
    h.rx.add(&[Buf::writable(DATA, 1526)]).unwrap();
    h.notify_rx();
    // A "checksum valid" hint without GUEST_CSUM is cleared.
    let mut hinted = incoming(40, 0);
    hinted[0] = VIRTIO_NET_HDR_F_DATA_VALID as u8;
    // A partial checksum or a TSO frame cannot be handed over at all.
    let mut partial = incoming(40, 0);
    partial[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    let mut segmented = incoming(40, 0);
    segmented[1] = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
    h.backend.push_frame(partial);
    h.backend.push_frame(segmented);
    h.backend.push_frame(hinted);
    h.run_once();
    assert_eq!(h.counters().rx_dropped_malformed, 2);
    assert_eq!(h.rx.used(), [(0, 52)]);
    assert_eq!(guest_bytes(&mem, DATA, 2), [0, 0]);
}

#[test]
fn rx_tso_frames_reach_a_driver_that_accepted_them() {
    let mem = memory().unwrap();
    let accepted = MRG | (1 << VIRTIO_NET_F_GUEST_CSUM) | (1 << VIRTIO_NET_F_GUEST_TSO4);
    let mut h = Harness::new(&mem, accepted);
    h.rx.add(&[Buf::writable(DATA, 4096)]).unwrap();
    h.notify_rx();
    let mut segmented = incoming(3000, 0);
    segmented[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    segmented[1] = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
    h.backend.push_frame(segmented);
    h.run_once();
    assert_eq!(h.rx.used(), [(0, 3012)]);
    assert_eq!(
        guest_bytes(&mem, DATA, 2),
        [VIRTIO_NET_HDR_F_NEEDS_CSUM as u8, VIRTIO_NET_HDR_GSO_TCPV4 as u8]
    );
}

#[test]
fn rx_ufo_frames_reach_only_a_driver_that_accepted_guest_ufo() {
    let mem = memory().unwrap();
    let mut ufo = incoming(3000, 0);
    ufo[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    ufo[1] = VIRTIO_NET_HDR_GSO_UDP as u8;
    for (accepted, delivered) in [
        (
            MRG | (1 << VIRTIO_NET_F_GUEST_CSUM) | (1 << VIRTIO_NET_F_GUEST_UFO),
            true,
        ),
        (
            MRG | (1 << VIRTIO_NET_F_GUEST_CSUM) | (1 << VIRTIO_NET_F_GUEST_TSO4),
            false,
        ),
    ] {
        let mut h = Harness::new(&mem, accepted);
        h.rx.add(&[Buf::writable(DATA, 4096)]).unwrap();
        h.notify_rx();
        h.backend.push_frame(ufo.clone());
        h.run_once();
        if delivered {
            assert_eq!(h.rx.used(), [(0, 3012)]);
        } else {
            assert!(h.rx.used().is_empty());
            assert_eq!(h.counters().rx_dropped_malformed, 1);
        }
    }
}

#[test]
fn a_pending_frame_is_dropped_and_counted_on_reset() {
    let mem = memory().unwrap();
    let mut h = Harness::new(&mem, 0);
    h.run_once();
    h.backend.push_frame(incoming(60, 1));
    h.run_once();
    let mut net = h.net.lock().unwrap();
    assert!(net.is_rx_paused());
    assert!(net.reset());
    assert!(!net.is_rx_paused());
    assert_eq!(net.counters().rx_dropped_reset, 1);
}

/// Runs `f` on a thread of its own in a fresh network namespace, which
/// disappears with the thread: nothing it creates touches the host's
/// network. Returns `None` (and the test passes vacuously) where namespaces
/// or `/dev/net/tun` are unavailable.
fn in_private_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    std::thread::spawn(move || {
        // SAFETY: unshare takes no pointers; CLONE_NEWNET moves only this
        // thread into a new, empty network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "skipping: cannot create a network namespace: {}",
                std::io::Error::last_os_error()
            );
            return None;
        }
        if !std::path::Path::new("/dev/net/tun").exists() {
            eprintln!("skipping: no /dev/net/tun");
            return None;
        }
        Some(f())
    })
    .join()
    .unwrap()
}

#[test]
fn tap_backend_opens_a_tap_and_sets_offloads_inside_its_own_namespace() {
    let result = in_private_netns(|| {
        let mut tap = TapBackend::open("keeltap%d").unwrap();
        assert!(tap.name().starts_with("keeltap"), "{}", tap.name());
        tap.set_offload(net_offload::CSUM | net_offload::TSO4 | net_offload::TSO6)
            .unwrap();
        tap.set_offload(0).unwrap();
        tap.set_vnet_hdr_len(VNET_HDR_LEN).unwrap();
        // The interface is down and nothing sends: no frame to read.
        let mut buf = vec![0u8; VNET_HDR_LEN + MAX_FRAME_LEN];
        let err = tap.read_frame(&mut buf).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::WouldBlock);

        // The device on it offers the receive offloads the tap accepted.
        let name = tap.name().to_string();
        let net = Net::new(tap, NetOptions::default()).unwrap();
        assert_ne!(net.features() & (1 << VIRTIO_NET_F_GUEST_TSO4), 0);

        // An fd handed over is adopted; a non-tap fd is refused.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        assert!(matches!(
            TapBackend::from_fd(file.into()),
            Err(NetError::AdoptTap { .. })
        ));
        let second = TapBackend::open("keeltap%d").unwrap();
        let fd: std::os::fd::OwnedFd = second.file.try_clone().unwrap().into();
        drop(second);
        let adopted = TapBackend::from_fd(fd).unwrap();
        assert_ne!(adopted.name(), name);
        assert!(adopted.ready_fd() >= 0);
        drop(net);
    });
    if result.is_none() {
        eprintln!("tap test skipped");
    }
}

#[test]
fn tap_names_that_cannot_be_interface_names_are_refused() {
    for name in ["", "a-name-longer-than-15", "nul\0"] {
        let err = TapBackend::open(name).unwrap_err();
        assert!(matches!(err, NetError::OpenTap { .. }), "{name:?}: {err}");
    }
}

#[test]
fn rx_with_a_driver_racing_its_available_index_never_holds_the_device() {
    // A frame waits for buffers; a second "vCPU" flips the available index
    // back and forth as fast as it can, so re-arming notifications keeps
    // reporting new buffers that a pop then does not see. Each pass must
    // end within its budget whatever the interleaving.
    let mem = memory().unwrap();
    let mut h = Harness::new(&mem, MRG);
    h.run_once();
    h.backend.push_frame(incoming(1500, 3));
    h.run_once();
    assert!(h.net.lock().unwrap().is_rx_paused());
    let idx_addr = GuestAddress(h.rx.avail_addr() + 2);
    let base: u16 = mem.read_obj(idx_addr).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flipper = {
        let mem = mem.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut flips = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                mem.write_obj(base.wrapping_add((flips & 1) as u16), idx_addr)
                    .unwrap();
                flips += 1;
            }
            mem.write_obj(base, idx_addr).unwrap();
        })
    };
    let started = std::time::Instant::now();
    while started.elapsed() < std::time::Duration::from_millis(300) {
        let pass = std::time::Instant::now();
        h.rx_notify.write(1).unwrap();
        h.event_loop.run_with_timeout(10).unwrap();
        assert!(
            pass.elapsed() < std::time::Duration::from_secs(4),
            "one rx pass held the device for {:?}",
            pass.elapsed()
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flipper.join().unwrap();
    // Whatever the race did (the frame kept, or the device failed on the
    // empty chain it popped), the device answers its event loop.
    h.event_loop.run_with_timeout(10).unwrap();
}

mod rate_limiting {
    use std::time::{Duration, Instant};

    use keel_ratelimit::{BucketConfig, BucketUpdate};

    use super::*;

    /// A 112-byte transmit chain (header and 100 bytes) at `slot`.
    fn tx_frame(mem: &GuestMemoryMmap, slot: u64) -> [Buf; 1] {
        let addr = DATA + slot * 0x1000;
        mem.write_slice(&incoming(100, slot as u8), GuestAddress(addr))
            .unwrap();
        [Buf::readable(addr, 112)]
    }

    fn run_until(h: &mut Harness<'_>, mut done: impl FnMut(&Harness<'_>) -> bool) -> Duration {
        let start = Instant::now();
        while !done(h) && start.elapsed() < Duration::from_secs(5) {
            h.event_loop.run_with_timeout(10).unwrap();
        }
        start.elapsed()
    }

    #[test]
    fn tx_over_the_bandwidth_limit_stays_on_the_ring_until_the_timer_fires() {
        let mem = memory().unwrap();
        let mut h = Harness::new(&mem, 0);
        // 200 bytes per 100 ms: one 112-byte frame, then one per 56 ms.
        h.net
            .lock()
            .unwrap()
            .update_tx_rate_limiter(BucketUpdate::Set(BucketConfig::new(200, 100)), BucketUpdate::Keep);
        for slot in 0..3 {
            let frame = tx_frame(&mem, slot);
            h.tx.add(&frame).unwrap();
        }
        h.tx_notify.write(1).unwrap();
        let start = Instant::now();
        h.run_once();
        assert_eq!(h.tx.used().len(), 1);
        assert_eq!(h.backend.sent().len(), 1, "the refused frames were not sent");
        assert_eq!(h.counters().tx_throttled, 1);

        run_until(&mut h, |h| h.tx.used().len() == 3);
        assert_eq!(h.backend.sent().len(), 3);
        assert_eq!(h.backend.sent()[2][12..], incoming(100, 2)[12..], "in order");
        assert!(
            start.elapsed() >= Duration::from_millis(60),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn the_tx_ops_bucket_limits_frames_and_disabling_it_lifts_the_limit() {
        let mem = memory().unwrap();
        let mut h = Harness::new(&mem, 0);
        h.net.lock().unwrap().update_tx_rate_limiter(
            BucketUpdate::Keep,
            BucketUpdate::Set(BucketConfig::new(2, 60_000)),
        );
        for slot in 0..4 {
            let frame = tx_frame(&mem, slot);
            h.tx.add(&frame).unwrap();
        }
        h.tx_notify.write(1).unwrap();
        h.run_once();
        assert_eq!(h.backend.sent().len(), 2);
        h.net
            .lock()
            .unwrap()
            .update_tx_rate_limiter(BucketUpdate::Keep, BucketUpdate::Disable);
        let waited = run_until(&mut h, |h| h.tx.used().len() == 4);
        assert_eq!(h.backend.sent().len(), 4);
        // Not woken, the frames would wait for the old 60 s refill.
        assert!(waited < Duration::from_secs(4), "the update woke the device");
    }

    #[test]
    fn rx_over_the_limit_keeps_the_frame_and_leaves_the_backend_unwatched_until_the_timer() {
        let mem = memory().unwrap();
        let mut h = Harness::new(&mem, 0);
        // One 112-byte frame per 100 ms.
        h.net
            .lock()
            .unwrap()
            .update_rx_rate_limiter(BucketUpdate::Set(BucketConfig::new(112, 100)), BucketUpdate::Keep);
        h.rx.add(&[Buf::writable(DATA, 1526)]).unwrap();
        h.rx.add(&[Buf::writable(DATA + 0x1000, 1526)]).unwrap();
        h.notify_rx();
        h.backend.push_frame(incoming(100, 1));
        h.backend.push_frame(incoming(100, 2));
        h.backend.push_frame(incoming(100, 3));
        let start = Instant::now();
        h.run_once();
        assert_eq!(h.rx.used().len(), 1);
        {
            let net = h.net.lock().unwrap();
            assert!(net.is_rx_paused(), "the second frame is kept");
            assert!(!net.is_watching_backend(), "the third waits in the backend");
            assert_eq!(net.counters().rx_throttled, 1);
        }
        assert_eq!(h.backend.queued_frames(), 1);

        run_until(&mut h, |h| h.rx.used().len() == 2);
        assert!(
            start.elapsed() >= Duration::from_millis(90),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(guest_bytes(&mem, DATA + 0x1000 + 12, 100), incoming(100, 2)[12..]);
        assert_eq!(h.counters().rx_frames, 2);
    }

    #[test]
    fn an_rx_update_on_a_running_device_applies_at_once() {
        let mem = memory().unwrap();
        let mut h = Harness::new(&mem, 0);
        h.net.lock().unwrap().update_rx_rate_limiter(
            BucketUpdate::Keep,
            BucketUpdate::Set(BucketConfig::new(1, 60_000)),
        );
        h.rx.add(&[Buf::writable(DATA, 1526)]).unwrap();
        h.rx.add(&[Buf::writable(DATA + 0x1000, 1526)]).unwrap();
        h.notify_rx();
        h.backend.push_frame(incoming(100, 1));
        h.backend.push_frame(incoming(100, 2));
        h.run_once();
        assert_eq!(h.rx.used().len(), 1);
        h.net
            .lock()
            .unwrap()
            .update_rx_rate_limiter(BucketUpdate::Keep, BucketUpdate::Disable);
        let waited = run_until(&mut h, |h| h.rx.used().len() == 2);
        assert!(waited < Duration::from_secs(4), "{waited:?}");
        let net = h.net.lock().unwrap();
        assert!(!net.rx_rate_limiter().is_limiting());
        assert!(net.is_watching_backend());
    }
}

#[test]
fn a_failing_backend_takes_the_link_down_and_tells_the_guest_once() {
    let mem = memory().unwrap();
    let mut h = Harness::new(&mem, 0);
    assert!(h.net.lock().unwrap().link_up());
    h.rx.add(&[Buf::writable(DATA, 2048)]).unwrap();
    h.rx_notify.write(1).unwrap();
    h.run_once();
    // The tap vanishes: its reads fail.
    h.backend.fail_reads(libc::EIO);
    for _ in 0..3 {
        h.run_once();
    }
    let net = h.net.lock().unwrap();
    assert!(!net.link_up(), "the link is down");
    let mut status = [0u8; 2];
    net.read_config(6, &mut status);
    assert_eq!(u16::from_le_bytes(status) & VIRTIO_NET_S_LINK_UP as u16, 0);
    assert_eq!(net.counters().rx_backend_errors, 1);
    let changes = h
        .interrupt
        .signals()
        .iter()
        .filter(|s| **s == VirtioSignal::ConfigChange)
        .count();
    assert_eq!(changes, 1, "one configuration-change interrupt");
    drop(net);
    // The device no longer reads the failed backend.
    let reads = h.backend.reads();
    h.run_once();
    assert_eq!(h.backend.reads(), reads);
}
