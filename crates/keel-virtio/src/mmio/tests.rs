//! The transport's register interface, as a driver (honest or not) uses it.

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use keel_irq::RecordingLine;
use virtio_queue::QueueState;
use vm_memory::Bytes;

use super::*;
use crate::guest_driver::{Buf, DriverQueue, DATA};
use crate::{device_status, features, Activation};
use crate::{read_config_space, Block, BlockBackend, BlockOptions, MemoryBackend};
use virtio_queue::Queue;
use vm_memory::GuestAddress;

const ACK: u32 = device_status::ACKNOWLEDGE;
const DRIVER: u32 = device_status::DRIVER;
const FEATURES_OK: u32 = device_status::FEATURES_OK;
const DRIVER_OK: u32 = device_status::DRIVER_OK;
const NEEDS_RESET: u32 = device_status::DEVICE_NEEDS_RESET;
const FAILED: u32 = device_status::FAILED;

const LOW_FEATURE: u64 = 1 << 3;
const HIGH_FEATURE: u64 = 1 << 40;
const OFFERED: u64 = features::VERSION_1 | features::RING_EVENT_IDX | LOW_FEATURE | HIGH_FEATURE;
const SLOT: MmioSlot = MmioSlot {
    base: 0xd000_0000,
    gsi: 5,
};

/// A device that records what the transport does to it.
#[derive(Default)]
struct FakeDevice {
    acked: Option<u64>,
    activations: Vec<(Vec<QueueState>, usize)>,
    resets: usize,
    config: [u8; 16],
    refuse_activation: bool,
    refuse_reset: bool,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        crate::device_type::RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn features(&self) -> u64 {
        OFFERED
    }
    fn ack_features(&mut self, acked: u64) {
        self.acked = Some(acked);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if let Some(dst) = usize::try_from(offset)
            .ok()
            .and_then(|o| self.config.get_mut(o..o + data.len()))
        {
            dst.copy_from_slice(data);
        }
    }
    fn activate(&mut self, activation: Activation) -> Result<()> {
        if self.refuse_activation {
            return Err(Error::AlreadyActive { device_type: 4 });
        }
        self.activations.push((
            activation.queues.iter().map(Queue::state).collect(),
            activation.queue_events.len(),
        ));
        self.interrupt = Some(activation.interrupt);
        Ok(())
    }
    fn reset(&mut self) -> bool {
        self.resets += 1;
        self.interrupt = None;
        !self.refuse_reset
    }
}

struct Bench {
    transport: MmioTransport,
    device: Arc<Mutex<FakeDevice>>,
    line: Arc<RecordingLine>,
}

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

fn bench() -> Bench {
    let device = Arc::new(Mutex::new(FakeDevice::default()));
    let line = Arc::new(RecordingLine::new());
    let transport = MmioTransport::new(device.clone(), memory(), line.clone(), SLOT).unwrap();
    Bench {
        transport,
        device,
        line,
    }
}

fn read(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut data = [0xffu8; 4];
    t.mmio_read(MmioAddress(SLOT.base), offset, &mut data);
    u32::from_le_bytes(data)
}

fn write(t: &mut MmioTransport, offset: u64, value: u32) {
    t.mmio_write(MmioAddress(SLOT.base), offset, &value.to_le_bytes());
}

/// Writes `features` in both pages during DRIVER and sets FEATURES_OK;
/// returns the status read back.
fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
    write(t, reg::STATUS, ACK);
    write(t, reg::STATUS, ACK | DRIVER);
    for page in 0..2 {
        write(t, reg::DRIVER_FEATURES_SEL, page);
        write(t, reg::DRIVER_FEATURES, (features >> (32 * page)) as u32);
    }
    write(t, reg::STATUS, ACK | DRIVER | FEATURES_OK);
    read(t, reg::STATUS)
}

fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, desc: u64, driver: u64, device: u64) {
    write(t, reg::QUEUE_SEL, index);
    write(t, reg::QUEUE_NUM, size);
    write(t, reg::QUEUE_DESC_LOW, desc as u32);
    write(t, reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
    write(t, reg::QUEUE_DRIVER_LOW, driver as u32);
    write(t, reg::QUEUE_DRIVER_HIGH, (driver >> 32) as u32);
    write(t, reg::QUEUE_DEVICE_LOW, device as u32);
    write(t, reg::QUEUE_DEVICE_HIGH, (device >> 32) as u32);
    write(t, reg::QUEUE_READY, 1);
}

fn setup_valid_queues(t: &mut MmioTransport) {
    setup_queue(t, 0, 16, 0x1000, 0x2000, 0x3000);
    setup_queue(t, 1, 8, 0x4000, 0x5000, 0x6000);
}

/// Negotiates VERSION_1 | EVENT_IDX, sets up valid queues, sets DRIVER_OK.
fn activate(t: &mut MmioTransport) {
    negotiate(t, features::VERSION_1 | features::RING_EVENT_IDX);
    setup_valid_queues(t);
    write(t, reg::STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
}

#[test]
fn identifies_as_a_version_2_virtio_mmio_device() {
    let mut b = bench();
    let t = &mut b.transport;
    assert_eq!(read(t, reg::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(read(t, reg::VERSION), 2);
    assert_eq!(read(t, reg::DEVICE_ID), crate::device_type::RNG);
    assert_eq!(read(t, reg::VENDOR_ID), MMIO_VENDOR_ID);
    assert_eq!(read(t, reg::STATUS), 0);
}

#[test]
fn offers_device_features_in_32_bit_pages() {
    let mut b = bench();
    let t = &mut b.transport;
    write(t, reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(read(t, reg::DEVICE_FEATURES), OFFERED as u32);
    write(t, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(read(t, reg::DEVICE_FEATURES), (OFFERED >> 32) as u32);
    write(t, reg::DEVICE_FEATURES_SEL, 2);
    assert_eq!(read(t, reg::DEVICE_FEATURES), 0);
    write(t, reg::DEVICE_FEATURES_SEL, u32::MAX);
    assert_eq!(read(t, reg::DEVICE_FEATURES), 0);
}

#[test]
fn accepts_features_written_in_pages_and_acks_them_at_features_ok() {
    let mut b = bench();
    let wanted = features::VERSION_1 | LOW_FEATURE | HIGH_FEATURE;
    let status = negotiate(&mut b.transport, wanted);
    assert_eq!(status, ACK | DRIVER | FEATURES_OK);
    assert_eq!(b.transport.driver_features(), wanted);
    assert_eq!(b.device.lock().unwrap().acked, Some(wanted));
}

#[test]
fn refuses_features_ok_when_the_driver_accepted_unoffered_bits() {
    let mut b = bench();
    let status = negotiate(&mut b.transport, features::VERSION_1 | (1 << 7));
    assert_eq!(status & FEATURES_OK, 0);
    assert_eq!(status, ACK | DRIVER);
    assert_eq!(b.device.lock().unwrap().acked, None);
}

#[test]
fn refuses_features_ok_when_the_driver_sets_bits_in_pages_beyond_64() {
    let mut b = bench();
    let t = &mut b.transport;
    write(t, reg::STATUS, ACK);
    write(t, reg::STATUS, ACK | DRIVER);
    write(t, reg::DRIVER_FEATURES_SEL, 1);
    write(t, reg::DRIVER_FEATURES, 1); // VERSION_1
    write(t, reg::DRIVER_FEATURES_SEL, 2);
    write(t, reg::DRIVER_FEATURES, 1);
    write(t, reg::STATUS, ACK | DRIVER | FEATURES_OK);
    assert_eq!(read(t, reg::STATUS) & FEATURES_OK, 0);
}

#[test]
fn refuses_features_ok_without_version_1() {
    let mut b = bench();
    let status = negotiate(&mut b.transport, LOW_FEATURE);
    assert_eq!(status & FEATURES_OK, 0);
}

#[test]
fn a_refused_driver_may_renegotiate_after_a_reset() {
    let mut b = bench();
    assert_eq!(negotiate(&mut b.transport, 1 << 7) & FEATURES_OK, 0);
    write(&mut b.transport, reg::STATUS, 0);
    assert_ne!(negotiate(&mut b.transport, features::VERSION_1) & FEATURES_OK, 0);
}

#[test]
fn ignores_driver_features_written_outside_negotiation() {
    let mut b = bench();
    let t = &mut b.transport;
    // Before DRIVER.
    write(t, reg::DRIVER_FEATURES_SEL, 1);
    write(t, reg::DRIVER_FEATURES, 1);
    assert_eq!(t.driver_features(), 0);
    // After FEATURES_OK.
    negotiate(t, features::VERSION_1);
    write(t, reg::DRIVER_FEATURES_SEL, 0);
    write(t, reg::DRIVER_FEATURES, LOW_FEATURE as u32);
    assert_eq!(t.driver_features(), features::VERSION_1);
}

#[test]
fn status_bits_must_be_set_in_order_and_never_cleared() {
    let mut b = bench();
    let t = &mut b.transport;
    write(t, reg::STATUS, DRIVER); // without ACKNOWLEDGE
    assert_eq!(read(t, reg::STATUS), 0);
    write(t, reg::STATUS, ACK);
    write(t, reg::STATUS, ACK | DRIVER | DRIVER_OK); // skips FEATURES_OK
    assert_eq!(read(t, reg::STATUS), ACK);
    write(t, reg::STATUS, ACK | DRIVER);
    write(t, reg::STATUS, ACK); // clears DRIVER
    assert_eq!(read(t, reg::STATUS), ACK | DRIVER);
    write(t, reg::STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK); // no features yet
    assert_eq!(read(t, reg::STATUS), ACK | DRIVER);
    assert!(b.device.lock().unwrap().activations.is_empty());
}

#[test]
fn driver_ok_activates_the_device_with_the_queues_as_configured() {
    let mut b = bench();
    activate(&mut b.transport);
    assert_eq!(
        read(&mut b.transport, reg::STATUS),
        ACK | DRIVER | FEATURES_OK | DRIVER_OK
    );
    assert!(b.transport.is_activated());

    let device = b.device.lock().unwrap();
    assert_eq!(device.activations.len(), 1);
    let (queues, events) = &device.activations[0];
    assert_eq!(*events, 2);
    assert_eq!(
        (
            queues[0].size,
            queues[0].desc_table,
            queues[0].avail_ring,
            queues[0].used_ring
        ),
        (16, 0x1000, 0x2000, 0x3000)
    );
    assert_eq!((queues[1].size, queues[1].max_size), (8, 8));
    assert!(queues.iter().all(|q| q.ready && q.event_idx_enabled));
}

#[test]
fn event_idx_stays_off_unless_negotiated() {
    let mut b = bench();
    negotiate(&mut b.transport, features::VERSION_1);
    setup_valid_queues(&mut b.transport);
    write(
        &mut b.transport,
        reg::STATUS,
        ACK | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    let device = b.device.lock().unwrap();
    assert!(device.activations[0].0.iter().all(|q| !q.event_idx_enabled));
}

#[test]
fn queue_num_max_is_zero_for_a_queue_the_device_does_not_have() {
    let mut b = bench();
    let t = &mut b.transport;
    write(t, reg::QUEUE_SEL, 0);
    assert_eq!(read(t, reg::QUEUE_NUM_MAX), 16);
    write(t, reg::QUEUE_SEL, 1);
    assert_eq!(read(t, reg::QUEUE_NUM_MAX), 8);
    write(t, reg::QUEUE_SEL, 2);
    assert_eq!(read(t, reg::QUEUE_NUM_MAX), 0);
    assert_eq!(read(t, reg::QUEUE_READY), 0);
    // Setup of a missing queue goes nowhere.
    setup_queue(t, 7, 4, 0x1000, 0x2000, 0x3000);
    assert_eq!(read(t, reg::QUEUE_READY), 0);
}

/// Sets up queue 0 as given (queue 1 valid) and sets DRIVER_OK.
fn activate_with_queue0(size: u32, desc: u64, driver: u64, device: u64) -> Bench {
    let mut b = bench();
    negotiate(&mut b.transport, features::VERSION_1);
    setup_queue(&mut b.transport, 0, size, desc, driver, device);
    setup_queue(&mut b.transport, 1, 8, 0x4000, 0x5000, 0x6000);
    write(
        &mut b.transport,
        reg::STATUS,
        ACK | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    b
}

fn assert_needs_reset_instead_of_activation(b: &mut Bench) {
    let status = read(&mut b.transport, reg::STATUS);
    assert_ne!(status & NEEDS_RESET, 0, "status {status:#x}");
    assert!(!b.transport.is_activated());
    assert!(b.device.lock().unwrap().activations.is_empty());
    assert_eq!(
        read(&mut b.transport, reg::INTERRUPT_STATUS),
        interrupt_status::CONFIG_CHANGE
    );
    assert_eq!(b.line.count(), 1);
}

#[test]
fn rejects_queue_size_that_is_not_a_power_of_two_with_needs_reset() {
    let mut b = activate_with_queue0(12, 0x1000, 0x2000, 0x3000);
    assert_needs_reset_instead_of_activation(&mut b);
}

#[test]
fn rejects_queue_larger_than_its_maximum_with_needs_reset() {
    let mut b = activate_with_queue0(32, 0x1000, 0x2000, 0x3000);
    assert_needs_reset_instead_of_activation(&mut b);
    let mut b = activate_with_queue0(0x1_0000, 0x1000, 0x2000, 0x3000);
    assert_needs_reset_instead_of_activation(&mut b);
}

#[test]
fn rejects_queue_of_size_zero_with_needs_reset() {
    let mut b = activate_with_queue0(0, 0x1000, 0x2000, 0x3000);
    assert_needs_reset_instead_of_activation(&mut b);
}

#[test]
fn rejects_queue_address_not_in_ram_with_needs_reset() {
    for (desc, driver, device) in [
        (0x10_0000, 0x2000, 0x3000),             // descriptor table past RAM
        (0x1000, 0xf_fff0, 0x3000),              // available ring straddles the end
        (0x1000, 0x2000, 0x1_0000_0000_0000),    // used ring far away
        (0xffff_ffff_ffff_fff0, 0x2000, 0x3000), // wraps the address space
    ] {
        let mut b = activate_with_queue0(16, desc, driver, device);
        assert_needs_reset_instead_of_activation(&mut b);
    }
}

#[test]
fn rejects_misaligned_queue_rings_with_needs_reset() {
    for (desc, driver, device) in [
        (0x1008, 0x2000, 0x3000),
        (0x1000, 0x2001, 0x3000),
        (0x1000, 0x2000, 0x3002),
    ] {
        let mut b = activate_with_queue0(16, desc, driver, device);
        assert_needs_reset_instead_of_activation(&mut b);
    }
}

#[test]
fn rejects_available_ring_at_address_zero_with_needs_reset() {
    let mut b = activate_with_queue0(16, 0x1000, 0, 0x3000);
    assert_needs_reset_instead_of_activation(&mut b);
}

#[test]
fn rejects_activation_while_a_queue_is_not_ready() {
    let mut b = bench();
    negotiate(&mut b.transport, features::VERSION_1);
    setup_queue(&mut b.transport, 0, 16, 0x1000, 0x2000, 0x3000);
    write(
        &mut b.transport,
        reg::STATUS,
        ACK | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    assert_needs_reset_instead_of_activation(&mut b);
}

#[test]
fn a_device_refusing_activation_gets_needs_reset() {
    let mut b = bench();
    b.device.lock().unwrap().refuse_activation = true;
    activate(&mut b.transport);
    let status = read(&mut b.transport, reg::STATUS);
    assert_ne!(status & NEEDS_RESET, 0);
    assert!(!b.transport.is_activated());
}

#[test]
fn status_writes_while_the_device_needs_reset_are_ignored_until_reset() {
    let mut b = activate_with_queue0(12, 0x1000, 0x2000, 0x3000);
    let before = read(&mut b.transport, reg::STATUS);
    write(
        &mut b.transport,
        reg::STATUS,
        ACK | DRIVER | FEATURES_OK | DRIVER_OK,
    );
    assert_eq!(read(&mut b.transport, reg::STATUS), before);

    write(&mut b.transport, reg::STATUS, 0);
    assert_eq!(read(&mut b.transport, reg::STATUS), 0);
    activate(&mut b.transport);
    assert!(b.transport.is_activated());
}

#[test]
fn the_failed_bit_is_recorded_and_holds_until_reset() {
    let mut b = bench();
    write(&mut b.transport, reg::STATUS, ACK);
    write(&mut b.transport, reg::STATUS, ACK | FAILED);
    assert_eq!(read(&mut b.transport, reg::STATUS), ACK | FAILED);
    // A driver that gave up must reset before trying again.
    write(&mut b.transport, reg::STATUS, ACK | DRIVER);
    assert_eq!(read(&mut b.transport, reg::STATUS), ACK | FAILED);
    write(&mut b.transport, reg::STATUS, 0);
    write(&mut b.transport, reg::STATUS, ACK);
    assert_eq!(read(&mut b.transport, reg::STATUS), ACK);
}

#[test]
fn queue_setup_is_frozen_once_the_queue_is_ready() {
    let mut b = bench();
    activate(&mut b.transport);
    let t = &mut b.transport;
    // After DRIVER_OK neither setup nor readiness may change.
    write(t, reg::QUEUE_SEL, 0);
    write(t, reg::QUEUE_NUM, 2);
    write(t, reg::QUEUE_READY, 0);
    assert_eq!(read(t, reg::QUEUE_READY), 1);

    // Before DRIVER_OK, a ready queue's setup is ignored until it is
    // marked not ready.
    let mut b = bench();
    let t = &mut b.transport;
    negotiate(t, features::VERSION_1);
    setup_valid_queues(t);
    write(t, reg::QUEUE_SEL, 0);
    write(t, reg::QUEUE_DESC_LOW, 0x9000);
    write(t, reg::STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    let device = b.device.lock().unwrap();
    assert_eq!(device.activations[0].0[0].desc_table, 0x1000);
}

#[test]
fn writing_zero_to_status_resets_the_device_and_every_register() {
    let mut b = bench();
    activate(&mut b.transport);
    let interrupt = b.device.lock().unwrap().interrupt.clone().unwrap();
    interrupt.signal_used_queue(0).unwrap();

    write(&mut b.transport, reg::STATUS, 0);

    let t = &mut b.transport;
    assert_eq!(read(t, reg::STATUS), 0);
    assert_eq!(read(t, reg::INTERRUPT_STATUS), 0);
    assert_eq!(t.driver_features(), 0);
    for q in 0..2 {
        write(t, reg::QUEUE_SEL, q);
        assert_eq!(read(t, reg::QUEUE_READY), 0, "queue {q}");
    }
    assert!(!t.is_activated());
    let device = b.device.lock().unwrap();
    assert_eq!(device.resets, 1);
    assert!(device.interrupt.is_none());
}

#[test]
fn a_device_that_cannot_reset_stays_out_of_service() {
    let mut b = bench();
    activate(&mut b.transport);
    b.device.lock().unwrap().refuse_reset = true;
    write(&mut b.transport, reg::STATUS, 0);
    activate(&mut b.transport);
    assert_ne!(read(&mut b.transport, reg::STATUS) & NEEDS_RESET, 0);
    assert_eq!(b.device.lock().unwrap().activations.len(), 1);
}

#[test]
fn interrupt_status_bits_stay_set_until_acknowledged() {
    let mut b = bench();
    activate(&mut b.transport);
    let interrupt = b.device.lock().unwrap().interrupt.clone().unwrap();

    interrupt.signal_used_queue(1).unwrap();
    interrupt.signal_config_change().unwrap();
    assert_eq!(b.line.count(), 2);
    let t = &mut b.transport;
    assert_eq!(read(t, reg::INTERRUPT_STATUS), 0b11);

    write(t, reg::INTERRUPT_ACK, interrupt_status::USED_BUFFER);
    assert_eq!(read(t, reg::INTERRUPT_STATUS), interrupt_status::CONFIG_CHANGE);
    write(t, reg::INTERRUPT_ACK, 0xffff_fffc); // undefined bits: no effect
    assert_eq!(read(t, reg::INTERRUPT_STATUS), interrupt_status::CONFIG_CHANGE);
    write(t, reg::INTERRUPT_ACK, interrupt_status::CONFIG_CHANGE);
    assert_eq!(read(t, reg::INTERRUPT_STATUS), 0);
}

#[test]
fn a_failing_interrupt_line_is_reported_to_the_device() {
    let mut b = bench();
    activate(&mut b.transport);
    let interrupt = b.device.lock().unwrap().interrupt.clone().unwrap();
    b.line.set_failing(true);
    assert!(matches!(interrupt.signal_used_queue(0), Err(Error::Interrupt(_))));
}

#[test]
fn config_generation_changes_with_each_config_change() {
    let mut b = bench();
    activate(&mut b.transport);
    let interrupt = b.device.lock().unwrap().interrupt.clone().unwrap();
    let first = read(&mut b.transport, reg::CONFIG_GENERATION);
    assert_eq!(read(&mut b.transport, reg::CONFIG_GENERATION), first);
    interrupt.signal_config_change().unwrap();
    let second = read(&mut b.transport, reg::CONFIG_GENERATION);
    assert_ne!(second, first);
    interrupt.signal_config_change().unwrap();
    assert_ne!(read(&mut b.transport, reg::CONFIG_GENERATION), second);
}

#[test]
fn device_needs_reset_from_the_device_sets_the_status_bit_and_a_config_interrupt() {
    let mut b = bench();
    activate(&mut b.transport);
    let interrupt = b.device.lock().unwrap().interrupt.clone().unwrap();
    interrupt.signal_needs_reset().unwrap();
    assert_ne!(read(&mut b.transport, reg::STATUS) & NEEDS_RESET, 0);
    assert_eq!(
        read(&mut b.transport, reg::INTERRUPT_STATUS),
        interrupt_status::CONFIG_CHANGE
    );
    write(&mut b.transport, reg::STATUS, 0);
    assert_eq!(read(&mut b.transport, reg::STATUS), 0);
}

#[test]
fn config_space_accepts_1_2_4_and_8_byte_accesses_at_0x100() {
    let mut b = bench();
    b.device.lock().unwrap().config = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];
    let base = MmioAddress(SLOT.base);
    let t = &mut b.transport;
    let mut byte = [0u8; 1];
    t.mmio_read(base, 0x103, &mut byte);
    assert_eq!(byte, [4]);
    let mut half = [0u8; 2];
    t.mmio_read(base, 0x101, &mut half);
    assert_eq!(half, [2, 3]);
    let mut quad = [0u8; 8];
    t.mmio_read(base, 0x108, &mut quad);
    assert_eq!(quad, [9, 10, 11, 12, 13, 14, 15, 16]);
    // Past the end reads zeros.
    let mut word = [0xffu8; 4];
    t.mmio_read(base, 0x1fc, &mut word);
    assert_eq!(word, [0; 4]);

    t.mmio_write(base, 0x104, &[0xaa, 0xbb]);
    assert_eq!(b.device.lock().unwrap().config[4..6], [0xaa, 0xbb]);
    // A 3-byte access is not a valid width.
    let mut odd = [0xffu8; 3];
    t.mmio_read(base, 0x100, &mut odd);
    assert_eq!(odd, [0; 3]);
    t.mmio_write(base, 0x100, &[9, 9, 9]);
    assert_eq!(b.device.lock().unwrap().config[..3], [1, 2, 3]);
}

#[test]
fn ignores_register_accesses_that_are_not_32_bit_and_aligned() {
    let mut b = bench();
    let base = MmioAddress(SLOT.base);
    let t = &mut b.transport;
    let mut half = [0xffu8; 2];
    t.mmio_read(base, reg::MAGIC_VALUE, &mut half);
    assert_eq!(half, [0, 0]);
    let mut word = [0xffu8; 4];
    t.mmio_read(base, reg::MAGIC_VALUE + 1, &mut word);
    assert_eq!(word, [0; 4]);
    let mut quad = [0xffu8; 8];
    t.mmio_read(base, reg::MAGIC_VALUE, &mut quad);
    assert_eq!(quad, [0; 8]);

    t.mmio_write(base, reg::STATUS, &[ACK as u8]);
    t.mmio_write(base, reg::STATUS + 2, &ACK.to_le_bytes());
    t.mmio_write(base, reg::STATUS, &u64::from(ACK).to_le_bytes());
    assert_eq!(read(t, reg::STATUS), 0);
}

#[test]
fn write_only_and_unknown_registers_read_as_zero_and_shm_as_absent() {
    let mut b = bench();
    let t = &mut b.transport;
    for offset in [
        reg::QUEUE_NOTIFY,
        reg::INTERRUPT_ACK,
        reg::QUEUE_SEL,
        0x0c0,
        0x0f8,
    ] {
        assert_eq!(read(t, offset), 0, "offset {offset:#x}");
    }
    assert_eq!(read(t, reg::SHM_LEN_LOW), u32::MAX);
    assert_eq!(read(t, reg::SHM_BASE_HIGH), u32::MAX);
    // Writes to read-only registers change nothing.
    write(t, reg::MAGIC_VALUE, 0);
    write(t, reg::INTERRUPT_STATUS, 3);
    assert_eq!(read(t, reg::MAGIC_VALUE), MMIO_MAGIC_VALUE);
}

#[test]
fn queue_notify_write_signals_that_queues_eventfd() {
    let mut b = bench();
    let t = &mut b.transport;
    write(t, reg::QUEUE_NOTIFY, 1);
    write(t, reg::QUEUE_NOTIFY, 1);
    write(t, reg::QUEUE_NOTIFY, 9); // no such queue: ignored
    let notifiers = t.queue_notifiers();
    assert!(notifiers[0].event.read().is_err(), "queue 0 was not notified");
    assert_eq!(notifiers[1].event.read().unwrap(), 2);
}

#[test]
fn queue_notifiers_give_the_ioeventfd_address_and_datamatch() {
    let b = bench();
    let notifiers = b.transport.queue_notifiers();
    assert_eq!(notifiers.len(), 2);
    for (index, n) in notifiers.iter().enumerate() {
        assert_eq!(n.address, 0xd000_0050);
        assert_eq!(n.datamatch, index as u32);
    }
}

#[test]
fn slot_gives_the_bus_range_and_kernel_command_line_entry() {
    let range = SLOT.range().unwrap();
    assert_eq!(range.base(), MmioAddress(0xd000_0000));
    assert_eq!(range.size(), 0x1000);
    assert_eq!(SLOT.cmdline_entry(), "virtio_mmio.device=4K@0xd0000000:5");
    let err = MmioSlot {
        base: u64::MAX - 0x10,
        gsi: 5,
    }
    .range()
    .unwrap_err();
    assert!(err.to_string().contains("0xffffffffffffffef"), "{err}");
}

#[test]
fn hostile_register_writes_in_any_order_never_panic() {
    let mut b = bench();
    let base = MmioAddress(SLOT.base);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..20_000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let offset = (seed % 0x140) & !3;
        let value = (seed >> 32) as u32;
        let value = match seed % 7 {
            0 => value & 0xff,
            1 => 1,
            2 => 0,
            _ => value,
        };
        b.transport.mmio_write(base, offset, &value.to_le_bytes());
        let mut data = [0u8; 4];
        b.transport.mmio_read(base, offset, &mut data);
    }
}

// ---------------------------------------------------------------------------
// With a real device on the event loop.

/// A disk whose writes wait at a gate the test opens.
struct GatedDisk {
    disk: MemoryBackend,
    entered: mpsc::Sender<()>,
    release: mpsc::Receiver<()>,
    writes: Arc<Mutex<u32>>,
}

impl BlockBackend for GatedDisk {
    fn capacity(&self) -> u64 {
        self.disk.capacity()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.disk.read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        *self.writes.lock().unwrap() += 1;
        let _ = self.entered.send(());
        let _ = self.release.recv_timeout(Duration::from_secs(10));
        self.disk.write_at(offset, buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Drives a block device through the transport, as in the crate example.
fn activate_block(t: &mut MmioTransport, driver: &DriverQueue<'_>) {
    negotiate(t, features::VERSION_1 | (1 << 9)); // FLUSH
    setup_queue(
        t,
        0,
        16,
        driver.desc_table_addr(),
        driver.avail_addr(),
        driver.used_addr(),
    );
    write(t, reg::STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
}

/// Adds an OUT request of one sector at `sector`.
fn add_write(mem: &GuestMemoryMmap, driver: &mut DriverQueue<'_>, slot: u64, sector: u64) -> u16 {
    let base = DATA + slot * 0x1000;
    mem.write_obj(1u32, GuestAddress(base)).unwrap();
    mem.write_obj(sector, GuestAddress(base + 8)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(base + 0x800)).unwrap();
    driver
        .add(&[
            Buf::readable(base, 16),
            Buf::readable(base + 0x200, 512),
            Buf::writable(base + 0x800, 1),
        ])
        .unwrap()
}

#[test]
fn reset_mid_io_waits_for_the_request_in_flight_and_starts_no_other() {
    let mem = crate::guest_driver::memory().unwrap();
    let mut driver = DriverQueue::new(&mem, 16).unwrap();
    let (entered_tx, entered_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    let writes = Arc::new(Mutex::new(0));
    let disk = GatedDisk {
        disk: MemoryBackend::new(64 * 1024),
        entered: entered_tx,
        release: release_rx,
        writes: writes.clone(),
    };
    let block = Arc::new(Mutex::new(Block::new(disk, BlockOptions::default()).unwrap()));
    let line = Arc::new(RecordingLine::new());
    let transport = Arc::new(Mutex::new(
        MmioTransport::new(block.clone(), mem.clone(), line, SLOT).unwrap(),
    ));
    let mut event_loop = EventManager::new().unwrap();
    event_loop.add_subscriber(block.clone());

    activate_block(&mut transport.lock().unwrap(), &driver);
    event_loop.run_with_timeout(100).unwrap();
    for slot in 0..3 {
        add_write(&mem, &mut driver, slot, slot);
    }
    write(&mut transport.lock().unwrap(), reg::QUEUE_NOTIFY, 0);

    let io_thread = thread::spawn(move || {
        event_loop.run_with_timeout(1000).unwrap();
        event_loop
    });
    entered_rx.recv_timeout(Duration::from_secs(10)).unwrap();

    // A vCPU resets the device while the first write is in the backend.
    let stop = transport.lock().unwrap().state.stop.clone();
    let vcpu_transport = transport.clone();
    let reset_thread = thread::spawn(move || {
        write(&mut vcpu_transport.lock().unwrap(), reg::STATUS, 0);
    });
    // Wait until the reset has asked the device to stop and waits for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stop.is_raised() {
        assert!(
            Instant::now() < deadline,
            "the reset never raised the stop signal"
        );
        thread::sleep(Duration::from_millis(1));
    }
    thread::sleep(Duration::from_millis(50));
    assert!(
        !reset_thread.is_finished(),
        "reset waits for the request in flight"
    );

    release_tx.send(()).unwrap();
    reset_thread.join().unwrap();
    let mut event_loop = io_thread.join().unwrap();

    // The request in flight completed; the two behind it never started.
    assert_eq!(*writes.lock().unwrap(), 1);
    assert_eq!(driver.used().len(), 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA + 0x800)).unwrap(), 0);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA + 0x1800)).unwrap(), 0xff);
    assert_eq!(read(&mut transport.lock().unwrap(), reg::STATUS), 0);
    assert!(!block.lock().unwrap().is_active());

    // Nothing more happens after the reset, notifications or not.
    write(&mut transport.lock().unwrap(), reg::QUEUE_NOTIFY, 0);
    event_loop.run_with_timeout(50).unwrap();
    event_loop.run_with_timeout(50).unwrap();
    assert_eq!(*writes.lock().unwrap(), 1);
    assert_eq!(driver.used().len(), 1);
}

#[test]
fn a_driver_reads_the_capacity_while_a_request_is_stuck_in_the_backend() {
    let mem = crate::guest_driver::memory().unwrap();
    let mut driver = DriverQueue::new(&mem, 16).unwrap();
    let (entered_tx, entered_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    let disk = GatedDisk {
        disk: MemoryBackend::new(64 * 1024),
        entered: entered_tx,
        release: release_rx,
        writes: Arc::new(Mutex::new(0)),
    };
    let block = Arc::new(Mutex::new(Block::new(disk, BlockOptions::default()).unwrap()));
    let transport = Arc::new(Mutex::new(
        MmioTransport::new(block.clone(), mem.clone(), Arc::new(RecordingLine::new()), SLOT).unwrap(),
    ));
    let mut event_loop = EventManager::new().unwrap();
    event_loop.add_subscriber(block);
    activate_block(&mut transport.lock().unwrap(), &driver);
    event_loop.run_with_timeout(100).unwrap();
    add_write(&mem, &mut driver, 0, 0);
    write(&mut transport.lock().unwrap(), reg::QUEUE_NOTIFY, 0);

    // The event loop serves the write and stops inside the backend, holding
    // the device's lock.
    let io_thread = thread::spawn(move || {
        event_loop.run_with_timeout(1000).unwrap();
    });
    entered_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    // A vCPU reading the capacity (config offset 0) gets it now, not when
    // the backend returns.
    let (read_tx, read_rx) = mpsc::channel();
    let vcpu_transport = transport.clone();
    let reader = thread::spawn(move || {
        let mut capacity = [0u8; 8];
        vcpu_transport
            .lock()
            .unwrap()
            .mmio_read(MmioAddress(SLOT.base), CONFIG_SPACE_OFFSET, &mut capacity);
        let _ = read_tx.send(u64::from_le_bytes(capacity));
    });
    let capacity = read_rx.recv_timeout(Duration::from_secs(5));
    release_tx.send(()).unwrap();
    io_thread.join().unwrap();
    reader.join().unwrap();
    assert_eq!(
        capacity,
        Ok(64 * 1024 / 512),
        "the config read waited for the stuck request"
    );
    assert_eq!(driver.used().len(), 1, "the write completed once released");
}

#[test]
fn reset_before_the_event_loop_runs_drops_pending_requests() {
    let mem = crate::guest_driver::memory().unwrap();
    let mut driver = DriverQueue::new(&mem, 16).unwrap();
    let block = Arc::new(Mutex::new(
        Block::new(MemoryBackend::new(64 * 1024), BlockOptions::default()).unwrap(),
    ));
    let mut transport =
        MmioTransport::new(block.clone(), mem.clone(), Arc::new(RecordingLine::new()), SLOT).unwrap();
    let mut event_loop = EventManager::new().unwrap();
    event_loop.add_subscriber(block.clone());

    activate_block(&mut transport, &driver);
    add_write(&mem, &mut driver, 0, 0);
    write(&mut transport, reg::QUEUE_NOTIFY, 0);
    write(&mut transport, reg::STATUS, 0);
    for _ in 0..3 {
        event_loop.run_with_timeout(20).unwrap();
    }
    assert!(driver.used().is_empty());
    assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA + 0x800)).unwrap(), 0xff);

    // And the device comes back after a fresh initialisation.
    let mut driver = DriverQueue::at(&mem, GuestAddress(0x8000), 16).unwrap();
    activate_block(&mut transport, &driver);
    add_write(&mem, &mut driver, 1, 1);
    write(&mut transport, reg::QUEUE_NOTIFY, 0);
    for _ in 0..3 {
        event_loop.run_with_timeout(20).unwrap();
    }
    assert_eq!(driver.used().len(), 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(DATA + 0x1800)).unwrap(), 0);
}

#[test]
fn a_saved_transport_continues_in_a_new_one_where_the_queue_left_off() {
    let mem = crate::guest_driver::memory().unwrap();
    let mut driver = DriverQueue::new(&mem, 16).unwrap();
    let block = Arc::new(Mutex::new(
        Block::new(MemoryBackend::new(64 * 1024), BlockOptions::default()).unwrap(),
    ));
    let mut transport =
        MmioTransport::new(block.clone(), mem.clone(), Arc::new(RecordingLine::new()), SLOT).unwrap();
    let mut event_loop = EventManager::new().unwrap();
    event_loop.add_subscriber(block.clone());
    activate_block(&mut transport, &driver);
    for slot in 0..2 {
        add_write(&mem, &mut driver, slot, slot);
    }
    write(&mut transport, reg::QUEUE_NOTIFY, 0);
    for _ in 0..3 {
        event_loop.run_with_timeout(20).unwrap();
    }
    assert_eq!(driver.used().len(), 2);
    // A third request the device has not seen yet when the VM is paused.
    add_write(&mem, &mut driver, 2, 2);

    let state = transport.save_state().unwrap();
    assert_eq!(state.device.queues, vec![crate::QueueProgress::new(2, 2)]);
    assert_eq!(state.status, ACK | DRIVER | FEATURES_OK | DRIVER_OK);

    // A new device and transport over the same guest memory (a restore).
    let block2 = Arc::new(Mutex::new(
        Block::new(MemoryBackend::new(64 * 1024), BlockOptions::default()).unwrap(),
    ));
    let mut transport2 =
        MmioTransport::new(block2.clone(), mem.clone(), Arc::new(RecordingLine::new()), SLOT).unwrap();
    let mut event_loop2 = EventManager::new().unwrap();
    event_loop2.add_subscriber(block2.clone());
    transport2.restore_state(&state).unwrap();
    assert_eq!(
        read(&mut transport2, reg::STATUS),
        ACK | DRIVER | FEATURES_OK | DRIVER_OK
    );
    assert!(block2.lock().unwrap().is_active());
    for _ in 0..3 {
        event_loop2.run_with_timeout(20).unwrap();
    }
    // The pending request completed after the restore, no earlier one again.
    assert_eq!(driver.used().len(), 3);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(DATA + 2 * 0x1000 + 0x800))
            .unwrap(),
        0
    );
    assert_eq!(
        transport2.save_state().unwrap().device.queues,
        vec![crate::QueueProgress::new(3, 3)]
    );
}

#[test]
fn restoring_into_another_device_type_or_saving_an_unsaveable_device_is_refused_by_name() {
    let mut b = bench();
    activate(&mut b.transport);
    // FakeDevice keeps the default: it cannot be saved.
    let err = b.transport.save_state().unwrap_err().to_string();
    assert_eq!(
        err,
        "device type 4 (virtio-mmio 0xd0000000) cannot be saved in a snapshot"
    );

    let mem = crate::guest_driver::memory().unwrap();
    let block = Arc::new(Mutex::new(
        Block::new(MemoryBackend::new(4096), BlockOptions::default()).unwrap(),
    ));
    let transport = MmioTransport::new(block, mem.clone(), Arc::new(RecordingLine::new()), SLOT).unwrap();
    let mut state = transport.save_state().unwrap();
    state.device_type = crate::device_type::NET;
    let rng = Arc::new(Mutex::new(crate::Rng::new().unwrap()));
    let mut other = MmioTransport::new(rng, mem, Arc::new(RecordingLine::new()), SLOT).unwrap();
    let err = other.restore_state(&state).unwrap_err().to_string();
    assert_eq!(
        err,
        "virtio-mmio 0xd0000000: cannot restore the saved state: the state is a type-1 device's, this is a type-4 device"
    );
    assert_eq!(read(&mut other, reg::STATUS), 0, "nothing changed");
}
