use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::device::{RecordingInterrupt, StopSignal, VirtioSignal};
use crate::guest_driver::{memory, Buf, DriverQueue, DATA, MEM_SIZE};

/// Where the tests' balloon pages live: 4 MiB from 8 MiB.
const PAGES: u64 = 0x80_0000;
const PAGES_LEN: u64 = 0x40_0000;

struct Harness<'a> {
    balloon: Arc<Mutex<Balloon>>,
    handle: BalloonHandle,
    queues: Vec<DriverQueue<'a>>,
    notify: Vec<EventFd>,
    interrupt: Arc<RecordingInterrupt>,
    event_loop: EventManager<Arc<Mutex<Balloon>>>,
}

impl Harness<'_> {
    /// Notifies queue `index` and lets the device run.
    fn kick(&mut self, index: usize) {
        self.notify[index].write(1).unwrap();
        self.event_loop.run_with_timeout(100).unwrap();
    }

    /// Posts `pfns` as one request on queue `index` and lets the device run.
    fn post_pfns(&mut self, index: usize, pfns: &[u32], mem: &GuestMemoryMmap) -> u16 {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(DATA)).unwrap();
        let head = self.queues[index]
            .add(&[Buf::readable(DATA, bytes.len() as u32)])
            .unwrap();
        self.kick(index);
        head
    }
}

fn activated(mem: &GuestMemoryMmap, options: BalloonOptions) -> Harness<'_> {
    let balloon = Balloon::new(options).unwrap();
    let handle = balloon.handle();
    let count = balloon.queue_max_sizes().len();
    let balloon = Arc::new(Mutex::new(balloon));
    let queues: Vec<DriverQueue<'_>> = (0..count)
        .map(|i| DriverQueue::at(mem, GuestAddress(0x1000 * (i as u64 + 1)), 16).unwrap())
        .collect();
    let notify: Vec<EventFd> = (0..count)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    let interrupt = Arc::new(RecordingInterrupt::new());
    let mut event_loop = EventManager::new().unwrap();
    event_loop.add_subscriber(balloon.clone());
    balloon
        .lock()
        .unwrap()
        .activate(Activation {
            mem: mem.clone(),
            queues: queues.iter().map(|q| q.queue().unwrap()).collect(),
            queue_events: notify.iter().map(|e| e.try_clone().unwrap()).collect(),
            interrupt: interrupt.clone(),
            stop: StopSignal::new(),
        })
        .unwrap();
    event_loop.run_with_timeout(100).unwrap();
    Harness {
        balloon,
        handle,
        queues,
        notify,
        interrupt,
        event_loop,
    }
}

fn touch(mem: &GuestMemoryMmap, start: u64, len: u64) {
    for page in (start..start + len).step_by(4096) {
        mem.write_obj(0x5au8, GuestAddress(page)).unwrap();
    }
}

fn pfns(start: u64, len: u64) -> Vec<u32> {
    (start / 4096..(start + len) / 4096).map(|p| p as u32).collect()
}

fn stat(tag: u16, value: u64) -> Vec<u8> {
    let mut bytes = tag.to_le_bytes().to_vec();
    bytes.extend_from_slice(&value.to_le_bytes());
    bytes
}

fn config_u32(balloon: &Mutex<Balloon>, offset: u64) -> u32 {
    let mut bytes = [0u8; 4];
    balloon.lock().unwrap().read_config(offset, &mut bytes);
    u32::from_le_bytes(bytes)
}

#[test]
fn inflated_pages_leave_the_host_and_read_back_as_zero() {
    let mem = memory().unwrap();
    let mut h = activated(&mem, BalloonOptions::new(4));
    touch(&mem, PAGES, PAGES_LEN);
    touch(&mem, DATA, 0x1000); // where the frame numbers go
    let before = keel_memory::resident_bytes(&mem).unwrap();

    // Linux's way: 256 frame numbers per request.
    let all = pfns(PAGES, PAGES_LEN);
    for chunk in all.chunks(256) {
        h.post_pfns(0, chunk, &mem);
    }

    let after = keel_memory::resident_bytes(&mem).unwrap();
    assert!(
        before - after >= PAGES_LEN,
        "resident {before} -> {after}: {PAGES_LEN} bytes inflated"
    );
    assert_eq!(mem.read_obj::<u64>(GuestAddress(PAGES)).unwrap(), 0);
    assert_eq!(h.queues[0].used().len(), 4, "every request returned");
    assert!(h.queues[0].used().iter().all(|&(_, len)| len == 0));
    let counters = h.handle.counters();
    assert_eq!((counters.inflate_requests, counters.inflated_pages), (4, 1024));
    assert_eq!(counters.ignored_pages, 0);
    assert!(h.interrupt.signals().contains(&VirtioSignal::UsedQueue(0)));
}

#[test]
fn frame_numbers_outside_ram_are_ignored_and_the_device_keeps_working() {
    let mem = memory().unwrap();
    let mut h = activated(&mem, BalloonOptions::default());
    touch(&mem, PAGES, 0x1000);
    let end_pfn = (MEM_SIZE / 4096) as u32;
    h.post_pfns(
        0,
        &[u32::MAX, end_pfn, end_pfn - 1, 0xfff_ffff, (PAGES / 4096) as u32],
        &mem,
    );

    assert_eq!(h.queues[0].used().len(), 1);
    let counters = h.handle.counters();
    assert_eq!(
        counters.inflated_pages, 2,
        "the last page of RAM and the touched page"
    );
    assert_eq!(counters.ignored_pages, 3);
    assert!(!h.interrupt.signals().contains(&VirtioSignal::NeedsReset));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(PAGES)).unwrap(), 0);

    // A trailing partial frame number and an empty request are harmless.
    mem.write_slice(&[1, 2, 3], GuestAddress(DATA)).unwrap();
    h.queues[0].add(&[Buf::readable(DATA, 3)]).unwrap();
    h.queues[0].add(&[Buf::writable(DATA, 64)]).unwrap();
    h.kick(0);
    assert_eq!(h.queues[0].used().len(), 3);
    assert_eq!(h.handle.counters().inflate_requests, 3);
}

#[test]
fn deflated_pages_are_counted_and_nothing_is_released() {
    let mem = memory().unwrap();
    let mut h = activated(&mem, BalloonOptions::default());
    touch(&mem, PAGES, 0x2000);
    h.post_pfns(1, &pfns(PAGES, 0x2000), &mem);
    assert_eq!(h.queues[1].used().len(), 1);
    assert_eq!(h.handle.counters().deflated_pages, 2);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(PAGES)).unwrap(), 0x5a);
}

#[test]
fn features_and_queues_follow_the_options() {
    let base = features::VERSION_1 | features::RING_INDIRECT_DESC | features::RING_EVENT_IDX;
    let plain = Balloon::new(BalloonOptions::default()).unwrap();
    assert_eq!(plain.features(), base);
    assert_eq!(plain.queue_max_sizes().len(), 2);
    assert_eq!(plain.device_type(), 5);

    let mut options = BalloonOptions::new(0);
    options.deflate_on_oom = true;
    let oom = Balloon::new(options).unwrap();
    assert_eq!(oom.features(), base | BALLOON_F_DEFLATE_ON_OOM);
    assert_eq!(oom.queue_max_sizes().len(), 2);

    options.stats_polling_interval_s = 5;
    options.free_page_reporting = true;
    let all = Balloon::new(options).unwrap();
    assert_eq!(
        all.features(),
        base | BALLOON_F_DEFLATE_ON_OOM | BALLOON_F_STATS_VQ | BALLOON_F_REPORTING
    );
    assert_eq!(all.queue_max_sizes().len(), 4);
    assert_eq!((all.stats_queue, all.reporting_queue), (Some(2), Some(3)));

    let mut reporting_only = BalloonOptions::new(0);
    reporting_only.free_page_reporting = true;
    let reporting = Balloon::new(reporting_only).unwrap();
    assert_eq!(
        reporting.reporting_queue,
        Some(2),
        "queues are numbered without gaps"
    );
}

#[test]
fn free_page_reports_release_their_buffers() {
    let mem = memory().unwrap();
    let mut options = BalloonOptions::new(0);
    options.free_page_reporting = true;
    let mut h = activated(&mem, options);
    touch(&mem, PAGES, PAGES_LEN);
    let before = keel_memory::resident_bytes(&mem).unwrap();

    // Linux posts reports as device-writable buffers, 2 MiB or more each.
    let head = h.queues[2]
        .add(&[
            Buf::writable(PAGES, 0x20_0000),
            Buf::writable(PAGES + 0x20_0000, 0x20_0000),
        ])
        .unwrap();
    h.kick(2);

    let after = keel_memory::resident_bytes(&mem).unwrap();
    assert!(before - after >= PAGES_LEN, "resident {before} -> {after}");
    assert_eq!(h.queues[2].used(), [(u32::from(head), 0)]);
    let counters = h.handle.counters();
    assert_eq!((counters.reports, counters.reported_bytes), (1, PAGES_LEN));
}

#[test]
fn statistics_buffer_is_held_then_returned_each_interval() {
    let mem = memory().unwrap();
    let mut options = BalloonOptions::new(2);
    options.stats_polling_interval_s = 1;
    let mut h = activated(&mem, options);

    let mut report = stat(5, 16 << 20);
    report.extend(stat(4, 10 << 20));
    mem.write_slice(&report, GuestAddress(DATA)).unwrap();
    let head = h.queues[2]
        .add(&[Buf::readable(DATA, report.len() as u32)])
        .unwrap();
    h.kick(2);

    let stats = h.handle.statistics().unwrap();
    assert_eq!(stats.total_memory, Some(16 << 20));
    assert_eq!(stats.free_memory, Some(10 << 20));
    assert_eq!((stats.target_pages, stats.target_mib), (512, 2));
    assert!(h.queues[2].used().is_empty(), "the device keeps the buffer");

    // The timer fires after a second: the buffer comes back, asking for more.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while h.queues[2].used().is_empty() && std::time::Instant::now() < deadline {
        h.event_loop.run_with_timeout(200).unwrap();
    }
    assert_eq!(h.queues[2].used(), [(u32::from(head), 0)]);
    assert!(h.interrupt.signals().contains(&VirtioSignal::UsedQueue(2)));

    let report = stat(4, 3 << 20);
    mem.write_slice(&report, GuestAddress(DATA)).unwrap();
    h.queues[2]
        .add(&[Buf::readable(DATA, report.len() as u32)])
        .unwrap();
    h.kick(2);
    let stats = h.handle.statistics().unwrap();
    assert_eq!(stats.free_memory, Some(3 << 20));
    assert_eq!(stats.total_memory, None, "not in the latest report");
    assert_eq!(h.handle.counters().stats_updates, 2);
}

#[test]
fn statistics_cannot_be_switched_on_or_off_after_creation() {
    let plain = Balloon::new(BalloonOptions::default()).unwrap().handle();
    assert!(matches!(
        plain.statistics(),
        Err(BalloonError::StatisticsDisabled)
    ));
    let err = plain.update_stats_polling_interval(3).unwrap_err();
    assert_eq!(
        err.to_string(),
        "balloon stats_polling_interval_s 3: statistics cannot be enabled after the device is created (interval 0)"
    );

    let mut options = BalloonOptions::new(0);
    options.stats_polling_interval_s = 2;
    let with_stats = Balloon::new(options).unwrap().handle();
    assert!(matches!(
        with_stats.update_stats_polling_interval(0),
        Err(BalloonError::StatisticsToggle {
            requested: 0,
            current: 2
        })
    ));
    with_stats.update_stats_polling_interval(7).unwrap();
    assert_eq!(with_stats.options().stats_polling_interval_s, 7);
}

#[test]
fn a_new_target_reaches_the_config_space_with_a_config_change_interrupt() {
    let mem = memory().unwrap();
    let mut h = activated(&mem, BalloonOptions::new(1));
    assert_eq!(config_u32(&h.balloon, 0), 256);

    h.handle.update_target_mib(8).unwrap();
    h.event_loop.run_with_timeout(100).unwrap();
    assert_eq!(config_u32(&h.balloon, 0), 8 * 256);
    assert_eq!(h.interrupt.signals(), [VirtioSignal::ConfigChange]);
    assert_eq!(h.handle.target_mib(), 8);

    // 16 MiB of guest RAM: a 17 MiB balloon cannot be.
    let err = h.handle.update_target_mib(17).unwrap_err();
    assert_eq!(
        err.to_string(),
        "balloon amount_mib 17: at most 16 MiB (the guest's memory)"
    );
    assert_eq!(h.handle.target_mib(), 8);
}

#[test]
fn the_driver_writes_actual_and_nothing_else() {
    let balloon = Mutex::new(Balloon::new(BalloonOptions::new(4)).unwrap());
    let handle = balloon.lock().unwrap().handle();
    {
        let mut device = balloon.lock().unwrap();
        device.write_config(4, &768u32.to_le_bytes());
        device.write_config(0, &7u32.to_le_bytes()); // num_pages is the device's
        device.write_config(2, &[0xff; 3]); // straddles into actual's first byte
        for offset in [8, 100, u64::MAX - 1, u64::MAX] {
            device.write_config(offset, &[0xee; 8]);
        }
    }
    assert_eq!(config_u32(&balloon, 0), 1024);
    assert_eq!(config_u32(&balloon, 4), 768 | 0xff);
    assert_eq!(handle.actual_pages(), 768 | 0xff);
    assert_eq!(handle.actual_mib(), 3);

    // A reset driver holds no balloon.
    assert!(balloon.lock().unwrap().reset());
    assert_eq!(handle.actual_pages(), 0);
    assert_eq!(handle.target_mib(), 4);
}

#[test]
fn a_target_past_num_pages_is_refused_at_creation() {
    let err = Balloon::new(BalloonOptions::new(MAX_BALLOON_MIB + 1)).unwrap_err();
    assert!(matches!(err, BalloonError::TargetTooLarge { .. }), "{err}");
    Balloon::new(BalloonOptions::new(MAX_BALLOON_MIB)).unwrap();
}

#[test]
fn a_saved_balloon_comes_back_with_its_target_actual_and_held_buffer() {
    let mut original = Balloon::new(BalloonOptions::new(64)).unwrap();
    // The driver says it holds 100 pages.
    original.write_config(4, &100u32.to_le_bytes());
    original.held_stats = Some(7);
    let state = original.save_state().unwrap();
    assert_eq!(state.data.len(), 11);

    let mut restored = Balloon::new(BalloonOptions::new(16)).unwrap();
    restored.restore_state(&state.data).unwrap();
    let mut word = [0u8; 4];
    restored.read_config(0, &mut word);
    assert_eq!(u32::from_le_bytes(word), 64 * 256, "the snapshot's target");
    restored.read_config(4, &mut word);
    assert_eq!(u32::from_le_bytes(word), 100);
    assert_eq!(restored.held_stats, Some(7));
    let err = restored.restore_state(&[0; 3]).unwrap_err().to_string();
    assert!(err.contains("3 bytes of balloon state, expected 11"), "{err}");
}
