//! The transport as a driver (honest or not) uses it: configuration space,
//! the common configuration structure, MSI-X, notifications and the PCI
//! configuration access capability.

use event_manager::{EventManager, SubscriberOps};
use keel_irq::{MsiMessage, RecordingMsiVectors};
use keel_pci::{BarAllocator, PciAddress, PciBus};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::device::Activation;
use crate::guest_driver::{Buf, DriverQueue, DATA};
use crate::{device_status, features, read_config_space, Block, BlockOptions, MemoryBackend};

const ACK: u8 = device_status::ACKNOWLEDGE as u8;
const DRIVER: u8 = device_status::DRIVER as u8;
const FEATURES_OK: u8 = device_status::FEATURES_OK as u8;
const DRIVER_OK: u8 = device_status::DRIVER_OK as u8;
const NEEDS_RESET: u8 = device_status::DEVICE_NEEDS_RESET as u8;

const WINDOW: (u64, u64) = (0xe000_0000, 0x1000_0000);
const BAR: u64 = 0xe000_0000;

/// A two-queue device that records activations and keeps its interrupt.
#[derive(Default)]
struct FakeDevice {
    activations: usize,
    resets: usize,
    config: [u8; 8],
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    queue_events: Vec<EventFd>,
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn features(&self) -> u64 {
        features::VERSION_1 | (1 << 40)
    }
    fn ack_features(&mut self, _acked: u64) {}
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() == 4 {
            self.config[..4].copy_from_slice(data);
        }
    }
    fn activate(&mut self, activation: Activation) -> Result<()> {
        self.activations += 1;
        self.interrupt = Some(activation.interrupt);
        self.queue_events = activation.queue_events;
        Ok(())
    }
    fn reset(&mut self) -> bool {
        self.resets += 1;
        self.interrupt = None;
        true
    }
}

/// A transport on a bus, as a guest finds it.
struct Bench {
    bus: PciBus,
    at: PciAddress,
    device: Arc<Mutex<FakeDevice>>,
    vectors: Arc<RecordingMsiVectors>,
    ioeventfds: RecordingRegistrar,
}

fn bench() -> Bench {
    let device = Arc::new(Mutex::new(FakeDevice::default()));
    let vectors = Arc::new(RecordingMsiVectors::new(3));
    let ioeventfds = RecordingRegistrar::new();
    let transport = PciTransport::new(
        device.clone(),
        crate::guest_driver::memory().unwrap(),
        vectors.clone(),
        Box::new(ioeventfds.clone()),
    )
    .unwrap();
    let mut bus = PciBus::new(0xc000_0000, &[WINDOW]);
    let mut bars = BarAllocator::new(WINDOW, (1 << 32, 1 << 32)).unwrap();
    let at = bus
        .add_device(Arc::new(Mutex::new(transport)), &mut bars)
        .unwrap();
    Bench {
        bus,
        at,
        device,
        vectors,
        ioeventfds,
    }
}

impl Bench {
    fn cfg_read(&self, register: u16, len: usize) -> u32 {
        let mut data = [0u8; 4];
        self.bus
            .read_ecam(self.at.ecam_offset() + u64::from(register), &mut data[..len]);
        u32::from_le_bytes(data)
    }

    fn cfg_write(&self, register: u16, bytes: &[u8]) {
        self.bus
            .write_ecam(self.at.ecam_offset() + u64::from(register), bytes);
    }

    fn read(&self, offset: u64, len: usize) -> u64 {
        let mut data = [0u8; 8];
        self.bus.read_memory(BAR + offset, &mut data[..len]);
        u64::from_le_bytes(data)
    }

    fn write(&self, offset: u64, len: usize, value: u64) {
        self.bus.write_memory(BAR + offset, &value.to_le_bytes()[..len]);
    }

    fn status(&self) -> u8 {
        self.read(common_cfg::DEVICE_STATUS, 1) as u8
    }

    fn set_status(&self, status: u8) {
        self.write(common_cfg::DEVICE_STATUS, 1, u64::from(status));
    }

    /// The virtio capabilities as `(cfg_type, bar, offset, length, cap)`.
    fn virtio_caps(&self) -> Vec<(u8, u8, u32, u32, u16)> {
        let mut caps = Vec::new();
        let mut next = self.cfg_read(0x34, 1) as u16;
        while next != 0 {
            let header = self.cfg_read(next, 4);
            if header & 0xff == 0x09 {
                caps.push((
                    (header >> 24) as u8,
                    self.cfg_read(next + 4, 1) as u8,
                    self.cfg_read(next + 8, 4),
                    self.cfg_read(next + 12, 4),
                    next,
                ));
            }
            next = ((header >> 8) & 0xff) as u16;
        }
        caps
    }

    fn msix_cap(&self) -> u16 {
        let mut next = self.cfg_read(0x34, 1) as u16;
        while next != 0 {
            let header = self.cfg_read(next, 4);
            if header & 0xff == 0x11 {
                return next;
            }
            next = ((header >> 8) & 0xff) as u16;
        }
        panic!("no MSI-X capability");
    }

    fn enable_msix(&self) {
        let cap = self.msix_cap();
        self.cfg_write(cap + 2, &0x8000u16.to_le_bytes());
    }

    /// Programs MSI-X entry `vector` unmasked with `data`.
    fn program_vector(&self, vector: u64, data: u32) {
        let entry = MSIX_TABLE_OFFSET + 16 * vector;
        self.write(entry, 4, 0xfee0_0000);
        self.write(entry + 4, 4, 0);
        self.write(entry + 8, 4, u64::from(data));
        self.write(entry + 12, 4, 0);
    }

    fn negotiate(&self) {
        self.set_status(ACK);
        self.set_status(ACK | DRIVER);
        self.write(common_cfg::DRIVER_FEATURE_SELECT, 4, 1);
        self.write(common_cfg::DRIVER_FEATURE, 4, 1); // VERSION_1
        self.set_status(ACK | DRIVER | FEATURES_OK);
    }

    fn setup_queue(&self, index: u16, size: u16, desc: u64, driver: u64, device: u64) {
        self.write(common_cfg::QUEUE_SELECT, 2, u64::from(index));
        self.write(common_cfg::QUEUE_SIZE, 2, u64::from(size));
        self.write(common_cfg::QUEUE_DESC, 8, desc);
        // 64-bit fields may also come as two halves, low first.
        self.write(common_cfg::QUEUE_DRIVER, 4, driver & 0xffff_ffff);
        self.write(common_cfg::QUEUE_DRIVER + 4, 4, driver >> 32);
        self.write(common_cfg::QUEUE_DEVICE, 4, device & 0xffff_ffff);
        self.write(common_cfg::QUEUE_DEVICE + 4, 4, device >> 32);
        self.write(common_cfg::QUEUE_ENABLE, 2, 1);
    }

    fn activate(&self) {
        self.negotiate();
        self.setup_queue(0, 16, 0x1000, 0x2000, 0x3000);
        self.setup_queue(1, 8, 0x4000, 0x5000, 0x6000);
        self.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    }

    fn interrupt(&self) -> Arc<dyn VirtioInterrupt> {
        self.device.lock().unwrap().interrupt.clone().expect("activated")
    }
}

#[test]
fn identifies_as_a_modern_virtio_function_with_one_64_bit_bar() {
    let b = bench();
    assert_eq!(b.cfg_read(0x00, 4), 0x1044_1af4);
    assert_eq!(b.cfg_read(0x08, 4), 0xff00_0001, "class, revision 1");
    assert_eq!(b.cfg_read(0x2c, 4), 0x0040_1af4);
    assert_eq!(b.cfg_read(0x3d, 1), 0, "no INTx pin");
    assert_eq!(b.cfg_read(0x10, 4), 0xe000_0004);
    b.cfg_write(0x10, &u32::MAX.to_le_bytes());
    assert_eq!(b.cfg_read(0x10, 4), !(BAR_SIZE as u32 - 1) | 4);
}

#[test]
fn capabilities_describe_every_structure_in_bar_0() {
    let b = bench();
    let caps: Vec<_> = b
        .virtio_caps()
        .iter()
        .map(|&(t, bar, o, l, _)| (t, bar, o, l))
        .collect();
    assert_eq!(
        caps,
        [
            (1, 0, 0x0000, 0x38),
            (2, 0, 0x3000, 8),
            (3, 0, 0x1000, 1),
            (4, 0, 0x2000, 0x1000),
            (5, 0, 0, 0),
        ]
    );
    let notify = b.virtio_caps()[1].4;
    assert_eq!(b.cfg_read(notify + 16, 4), NOTIFY_OFF_MULTIPLIER);
    let msix = b.msix_cap();
    assert_eq!(b.cfg_read(msix + 2, 2), 2, "3 vectors: 2 queues and config");
    assert_eq!(b.cfg_read(msix + 4, 4), 0x4000);
    assert_eq!(b.cfg_read(msix + 8, 4), 0x6000);
}

#[test]
fn common_config_reports_queues_and_feature_pages() {
    let b = bench();
    assert_eq!(b.read(common_cfg::NUM_QUEUES, 2), 2);
    b.write(common_cfg::DEVICE_FEATURE_SELECT, 4, 1);
    assert_eq!(b.read(common_cfg::DEVICE_FEATURE, 4), 0x101);
    b.write(common_cfg::QUEUE_SELECT, 2, 1);
    assert_eq!(b.read(common_cfg::QUEUE_SIZE, 2), 8);
    assert_eq!(b.read(common_cfg::QUEUE_NOTIFY_OFF, 2), 1);
    b.write(common_cfg::QUEUE_SELECT, 2, 2);
    assert_eq!(b.read(common_cfg::QUEUE_SIZE, 2), 0, "no such queue");
}

#[test]
fn driver_ok_activates_with_the_rings_written_whole_or_in_halves() {
    let b = bench();
    b.activate();
    assert_eq!(b.status(), ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(b.device.lock().unwrap().activations, 1);
    b.write(common_cfg::QUEUE_SELECT, 2, 0);
    assert_eq!(b.read(common_cfg::QUEUE_DRIVER, 8), 0x2000);
    assert_eq!(b.read(common_cfg::QUEUE_DEVICE + 4, 4), 0);
    assert_eq!(b.read(common_cfg::QUEUE_ENABLE, 2), 1);
}

#[test]
fn queue_setup_after_driver_ok_is_ignored() {
    let b = bench();
    b.activate();
    b.write(common_cfg::QUEUE_SELECT, 2, 0);
    b.write(common_cfg::QUEUE_DESC, 8, 0x8000);
    b.write(common_cfg::QUEUE_SIZE, 2, 4);
    assert_eq!(b.read(common_cfg::QUEUE_DESC, 8), 0x1000);
    assert_eq!(b.read(common_cfg::QUEUE_SIZE, 2), 16);
}

#[test]
fn a_queue_outside_ram_gets_needs_reset_at_driver_ok() {
    let b = bench();
    b.negotiate();
    b.setup_queue(0, 16, 0xffff_ffff_0000, 0x2000, 0x3000);
    b.setup_queue(1, 8, 0x4000, 0x5000, 0x6000);
    b.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_ne!(b.status() & NEEDS_RESET, 0);
    assert_eq!(b.device.lock().unwrap().activations, 0);
}

#[test]
fn queue_interrupts_go_to_the_assigned_msix_vectors() {
    let b = bench();
    b.enable_msix();
    b.program_vector(0, 0x40);
    b.program_vector(2, 0x42);
    b.write(common_cfg::CONFIG_MSIX_VECTOR, 2, 0);
    b.write(common_cfg::QUEUE_SELECT, 2, 1);
    b.write(common_cfg::QUEUE_MSIX_VECTOR, 2, 2);
    assert_eq!(b.read(common_cfg::QUEUE_MSIX_VECTOR, 2), 2);
    b.activate();
    let interrupt = b.interrupt();
    interrupt.signal_used_queue(1).unwrap();
    interrupt.signal_used_queue(0).unwrap(); // NO_VECTOR: nothing
    interrupt.signal_config_change().unwrap();
    assert_eq!(b.vectors.triggers(), [2, 0]);
    assert_eq!(
        b.vectors.message(2),
        Some(MsiMessage {
            address: 0xfee0_0000,
            data: 0x42
        })
    );
    // With MSI-X on, queue interrupts leave no ISR bit; config changes do.
    assert_eq!(b.read(ISR_OFFSET, 1), u64::from(isr::CONFIG));
}

#[test]
fn vectors_the_table_does_not_have_read_back_as_no_vector() {
    let b = bench();
    for vector in [3u64, 0x7fff, 0xfffe] {
        b.write(common_cfg::CONFIG_MSIX_VECTOR, 2, vector);
        assert_eq!(b.read(common_cfg::CONFIG_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
        b.write(common_cfg::QUEUE_MSIX_VECTOR, 2, vector);
        assert_eq!(b.read(common_cfg::QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    }
    // A vector for a queue that does not exist goes nowhere.
    b.write(common_cfg::QUEUE_SELECT, 2, 9);
    b.write(common_cfg::QUEUE_MSIX_VECTOR, 2, 1);
    assert_eq!(b.read(common_cfg::QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
}

#[test]
fn without_msix_interrupts_are_isr_bits_cleared_by_reading() {
    let b = bench();
    b.activate();
    let interrupt = b.interrupt();
    interrupt.signal_used_queue(0).unwrap();
    assert!(b.vectors.triggers().is_empty());
    assert_eq!(b.read(ISR_OFFSET, 1), u64::from(isr::QUEUE));
    assert_eq!(b.read(ISR_OFFSET, 1), 0);
    let generation = b.read(common_cfg::CONFIG_GENERATION, 1);
    interrupt.signal_config_change().unwrap();
    assert_eq!(b.read(common_cfg::CONFIG_GENERATION, 1), generation + 1);
}

#[test]
fn a_vector_masked_while_running_is_held_pending_until_unmasked() {
    let b = bench();
    b.enable_msix();
    b.program_vector(1, 0x41);
    b.write(common_cfg::QUEUE_SELECT, 2, 0);
    b.write(common_cfg::QUEUE_MSIX_VECTOR, 2, 1);
    b.activate();
    let interrupt = b.interrupt();
    b.write(MSIX_TABLE_OFFSET + 16 + 12, 4, 1); // mask entry 1
    interrupt.signal_used_queue(0).unwrap();
    assert!(b.vectors.triggers().is_empty());
    assert_eq!(b.read(MSIX_PBA_OFFSET, 8), 0b10);
    // The driver moves the vector while it is masked, then unmasks.
    b.write(MSIX_TABLE_OFFSET + 16 + 8, 4, 0x51);
    b.write(MSIX_TABLE_OFFSET + 16 + 12, 4, 0);
    assert_eq!(b.vectors.triggers(), [1]);
    assert_eq!(b.vectors.message(1).map(|m| m.data), Some(0x51));
}

#[test]
fn notifications_follow_the_bar_wherever_the_guest_moves_it() {
    let b = bench();
    assert_eq!(b.ioeventfds.addresses(), [BAR + 0x3000, BAR + 0x3004]);
    b.cfg_write(0x04, &0u16.to_le_bytes()); // memory decoding off
    assert!(b.ioeventfds.addresses().is_empty());
    b.cfg_write(0x10, &0xe800_0000u32.to_le_bytes());
    b.cfg_write(0x04, &2u16.to_le_bytes());
    assert_eq!(b.ioeventfds.addresses(), [0xe800_3000, 0xe800_3004]);
}

#[test]
fn a_bar_reported_at_the_top_of_the_address_space_does_not_panic() {
    let device = Arc::new(Mutex::new(FakeDevice::default()));
    let ioeventfds = RecordingRegistrar::new();
    let mut transport = PciTransport::new(
        device,
        crate::guest_driver::memory().unwrap(),
        Arc::new(RecordingMsiVectors::new(3)),
        Box::new(ioeventfds.clone()),
    )
    .unwrap();
    for address in [u64::MAX, u64::MAX - 0x3000, u64::MAX - 0x3003] {
        transport.bar_moved(BAR_INDEX, Some(address));
        // Queue 1's address would wrap: at most queue 0 got one.
        assert!(ioeventfds.addresses().len() <= 1, "{:?}", ioeventfds.addresses());
        transport.bar_moved(BAR_INDEX, None);
        assert!(ioeventfds.addresses().is_empty());
    }
    transport.bar_moved(5, Some(0xe000_0000));
    assert!(ioeventfds.addresses().is_empty());
}

#[test]
fn notification_writes_that_reach_the_transport_signal_the_queue() {
    let b = bench();
    b.activate();
    b.write(NOTIFY_OFFSET + 4, 2, 1);
    b.write(NOTIFY_OFFSET + 0xffc, 2, 0); // queue 1023: none, ignored
    let device = b.device.lock().unwrap();
    // Non-blocking eventfds: queue 1 holds one notification, queue 0 none.
    assert_eq!(device.queue_events[1].read().unwrap(), 1);
    assert!(device.queue_events[0].read().is_err());
}

#[test]
fn device_config_reads_and_writes_reach_the_device() {
    let b = bench();
    b.write(DEVICE_CFG_OFFSET, 4, 0x1234_5678);
    assert_eq!(b.read(DEVICE_CFG_OFFSET, 4), 0x1234_5678);
    assert_eq!(b.read(DEVICE_CFG_OFFSET + 2, 2), 0x1234);
    assert_eq!(b.read(DEVICE_CFG_OFFSET + 0xff8, 8), 0, "past the device's space");
}

#[test]
fn pci_cfg_capability_reaches_the_bar_through_configuration_cycles() {
    let b = bench();
    let cap = b.virtio_caps()[4].4;
    // Read num_queues (2 bytes at 0x12 of the common structure).
    b.cfg_write(cap + 4, &[0]);
    b.cfg_write(cap + 8, &(common_cfg::NUM_QUEUES as u32).to_le_bytes());
    b.cfg_write(cap + 12, &2u32.to_le_bytes());
    assert_eq!(b.cfg_read(cap + 16, 4) & 0xffff, 2);
    // Write device_status = ACKNOWLEDGE through it.
    b.cfg_write(cap + 8, &(common_cfg::DEVICE_STATUS as u32).to_le_bytes());
    b.cfg_write(cap + 12, &1u32.to_le_bytes());
    b.cfg_write(cap + 16, &[ACK]);
    assert_eq!(b.status(), ACK);
}

#[test]
fn pci_cfg_capability_refuses_bad_bars_lengths_and_offsets() {
    let b = bench();
    let cap = b.virtio_caps()[4].4;
    for (bar, offset, len) in [
        (1u8, 0x14u32, 1u32),
        (0, 0x14, 3),
        (0, 0x13, 2),
        (0, 0x7ffe, 4),
        (0, u32::MAX, 4),
        (0, 0x14, 0),
    ] {
        b.cfg_write(cap + 4, &[bar]);
        b.cfg_write(cap + 8, &offset.to_le_bytes());
        b.cfg_write(cap + 12, &len.to_le_bytes());
        b.cfg_write(cap + 16, &u32::MAX.to_le_bytes());
        assert_eq!(
            b.cfg_read(cap + 16, 4),
            0,
            "bar {bar} offset {offset:#x} len {len}"
        );
    }
    assert_eq!(b.status(), 0);
}

#[test]
fn reset_drops_vector_assignments_but_keeps_the_msix_table() {
    let b = bench();
    b.enable_msix();
    b.program_vector(0, 0x40);
    b.write(common_cfg::CONFIG_MSIX_VECTOR, 2, 0);
    b.activate();
    b.set_status(0);
    assert_eq!(b.status(), 0);
    assert_eq!(b.device.lock().unwrap().resets, 1);
    assert_eq!(b.read(common_cfg::CONFIG_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    assert_eq!(b.read(MSIX_TABLE_OFFSET + 8, 4), 0x40);
}

#[test]
fn accesses_of_the_wrong_width_or_offset_read_zero_and_write_nothing() {
    let b = bench();
    for (offset, len) in [
        (common_cfg::DEVICE_FEATURE_SELECT, 2),
        (common_cfg::NUM_QUEUES, 4),
        (common_cfg::DEVICE_STATUS, 2),
        (common_cfg::QUEUE_DESC + 2, 4),
        (common_cfg::QUEUE_DESC + 4, 8),
        (0x36, 2),
        (0x38, 4),
        (0x800, 4),
        (ISR_OFFSET + 1, 1),
    ] {
        assert_eq!(b.read(offset, len), 0, "{len} bytes at {offset:#x}");
        b.write(offset, len, u64::MAX);
    }
    assert_eq!(b.status(), 0);
    assert_eq!(b.read(common_cfg::DEVICE_FEATURE_SELECT, 4), 0);
}

#[test]
fn random_guest_traffic_never_panics_and_the_device_still_works_after_reset() {
    let b = bench();
    let mut state = 0xdead_beef_cafe_f00du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let cap_end = 0x100u64;
    for _ in 0..30_000 {
        let r = next();
        let len = [1usize, 2, 4, 8][(r % 4) as usize];
        let value = next();
        match (r >> 4) % 4 {
            0 => b.write(next() % BAR_SIZE, len, value),
            1 => {
                b.read(next() % BAR_SIZE, len);
            }
            2 => b.cfg_write(
                (0x40 + next() % (cap_end - 0x40)) as u16,
                &value.to_le_bytes()[..len.min(4)],
            ),
            _ => {
                b.cfg_read((next() % 0x1000) as u16 & !3, 4);
            }
        }
    }
    // Whatever state it is in, a reset and an honest driver bring it back.
    b.cfg_write(0x04, &2u16.to_le_bytes());
    b.cfg_write(0x10, &(BAR as u32 | 4).to_le_bytes());
    b.cfg_write(0x14, &0u32.to_le_bytes());
    b.set_status(0);
    b.activate();
    assert_eq!(b.status(), ACK | DRIVER | FEATURES_OK | DRIVER_OK);
}

/// The whole path with a real device: a virtio-blk read over virtio-pci,
/// completion signalled on the queue's MSI-X vector.
#[test]
fn block_read_completes_with_an_msix_interrupt() {
    let mem = crate::guest_driver::memory().unwrap();
    let mut image = vec![0u8; 64 * 1024];
    image[512..517].copy_from_slice(b"hello");
    let disk = Arc::new(Mutex::new(
        Block::new(MemoryBackend::from_bytes(image), BlockOptions::default()).unwrap(),
    ));
    let vectors = Arc::new(RecordingMsiVectors::new(PciTransport::vectors_needed(
        &*disk.lock().unwrap(),
    )));
    let transport =
        PciTransport::new(disk.clone(), mem.clone(), vectors.clone(), Box::new(NoIoeventfds)).unwrap();
    let mut bus = PciBus::new(0xc000_0000, &[WINDOW]);
    let mut bars = BarAllocator::new(WINDOW, (1 << 32, 1 << 32)).unwrap();
    let at = bus
        .add_device(Arc::new(Mutex::new(transport)), &mut bars)
        .unwrap();
    let b = Bench {
        bus,
        at,
        device: Arc::new(Mutex::new(FakeDevice::default())),
        vectors: vectors.clone(),
        ioeventfds: RecordingRegistrar::new(),
    };
    let mut event_loop = EventManager::new().unwrap();
    event_loop.add_subscriber(disk.clone());

    b.enable_msix();
    b.program_vector(1, 0x45);
    b.negotiate();
    let mut driver = DriverQueue::new(&mem, 16).unwrap();
    let (desc, avail, used) = (driver.desc_table_addr(), driver.avail_addr(), driver.used_addr());
    b.write(common_cfg::QUEUE_SELECT, 2, 0);
    b.write(common_cfg::QUEUE_MSIX_VECTOR, 2, 1);
    b.setup_queue(0, 16, desc, avail, used);
    b.set_status(ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_eq!(b.status(), ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    event_loop.run_with_timeout(100).unwrap();

    mem.write_obj(0u32, GuestAddress(DATA)).unwrap(); // VIRTIO_BLK_T_IN
    mem.write_obj(1u64, GuestAddress(DATA + 8)).unwrap(); // sector 1
    driver
        .add(&[
            Buf::readable(DATA, 16),
            Buf::writable(DATA + 0x100, 512),
            Buf::writable(DATA + 0x300, 1),
        ])
        .unwrap();
    b.write(NOTIFY_OFFSET, 2, 0);
    event_loop.run_with_timeout(100).unwrap();

    let mut data = [0u8; 5];
    mem.read_slice(&mut data, GuestAddress(DATA + 0x100)).unwrap();
    assert_eq!(&data, b"hello");
    assert_eq!(driver.used().len(), 1);
    assert_eq!(vectors.triggers(), [1]);
}
