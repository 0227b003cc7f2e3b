//! virtio-console against a pretend guest driver and real host fds.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::io::FromRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::GuestMemoryMmap;
use event_manager::{EventManager, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::device::{RecordingInterrupt, StopSignal, VirtioSignal};
use crate::guest_driver::{memory, Buf, DriverQueue, DATA, MEM_SIZE};

/// Output collected in memory, readable by the test while the console owns
/// the writer.
#[derive(Clone, Default)]
struct SharedOutput(Arc<Mutex<Vec<u8>>>);

impl SharedOutput {
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

impl Write for SharedOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes, and the
    // return value is checked.
    let ret = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(ret, 0, "pipe2: {}", io::Error::last_os_error());
    // SAFETY: both descriptors were just created by pipe2 and are owned by
    // nothing else.
    unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

struct Harness<'a> {
    mem: &'a GuestMemoryMmap,
    rx: DriverQueue<'a>,
    tx: DriverQueue<'a>,
    console: Arc<Mutex<Console>>,
    interrupt: Arc<RecordingInterrupt>,
    rx_notify: EventFd,
    tx_notify: EventFd,
    event_loop: EventManager<Arc<Mutex<Console>>>,
}

impl<'a> Harness<'a> {
    fn new(mem: &'a GuestMemoryMmap, backend: Box<dyn ConsoleBackend>) -> Self {
        let mut h = Self::inactive(mem, backend);
        h.activate();
        h
    }

    fn inactive(mem: &'a GuestMemoryMmap, backend: Box<dyn ConsoleBackend>) -> Self {
        let console = Arc::new(Mutex::new(Console::new(backend).unwrap()));
        let mut event_loop = EventManager::new().unwrap();
        event_loop.add_subscriber(console.clone());
        Self {
            mem,
            rx: DriverQueue::at(mem, GuestAddress(0x1000), 16).unwrap(),
            tx: DriverQueue::at(mem, GuestAddress(0x4000), 16).unwrap(),
            console,
            interrupt: Arc::new(RecordingInterrupt::new()),
            rx_notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            tx_notify: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            event_loop,
        }
    }

    fn activate(&mut self) {
        self.console
            .lock()
            .unwrap()
            .activate(Activation {
                mem: self.mem.clone(),
                queues: vec![self.rx.queue().unwrap(), self.tx.queue().unwrap()],
                queue_events: vec![
                    self.rx_notify.try_clone().unwrap(),
                    self.tx_notify.try_clone().unwrap(),
                ],
                interrupt: self.interrupt.clone(),
                stop: StopSignal::new(),
            })
            .unwrap();
        self.run_once();
    }

    /// One epoll round; returns how many events were dispatched.
    fn run_once(&mut self) -> usize {
        self.event_loop.run_with_timeout(100).unwrap()
    }

    fn transmit(&mut self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
        self.tx.add(&[Buf::readable(addr, data.len() as u32)]).unwrap();
        self.tx_notify.write(1).unwrap();
        self.run_once();
    }

    fn add_rx_buffer(&mut self, addr: u64, len: u32) -> u16 {
        self.rx.add(&[Buf::writable(addr, len)]).unwrap()
    }

    fn paused(&self) -> bool {
        self.console.lock().unwrap().is_input_paused()
    }
}

fn guest_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
    bytes
}

#[test]
fn transmits_guest_output_to_the_backend() {
    let mem = memory().unwrap();
    let output = SharedOutput::default();
    let mut h = Harness::new(&mem, Box::new(StreamBackend::output_only(output.clone())));
    h.transmit(DATA, b"Linux version 6.");
    assert_eq!(output.take(), b"Linux version 6.");
    assert_eq!(h.tx.used(), [(0, 0)], "transmit buffers are returned unwritten");
    assert_eq!(h.interrupt.signals(), [VirtioSignal::UsedQueue(1)]);
}

#[test]
fn transmit_chain_spanning_descriptors_is_sent_in_order() {
    let mem = memory().unwrap();
    let output = SharedOutput::default();
    let mut h = Harness::new(&mem, Box::new(StreamBackend::output_only(output.clone())));
    mem.write_slice(b"hello ", GuestAddress(DATA)).unwrap();
    mem.write_slice(b"world", GuestAddress(DATA + 0x1000)).unwrap();
    h.tx.add(&[Buf::readable(DATA, 6), Buf::readable(DATA + 0x1000, 5)])
        .unwrap();
    h.tx_notify.write(1).unwrap();
    h.run_once();
    assert_eq!(output.take(), b"hello world");
}

#[test]
fn delivers_host_input_into_receive_buffers() {
    let mem = memory().unwrap();
    let (reader, mut writer) = pipe();
    let mut h = Harness::new(&mem, Box::new(StreamBackend::new(io::sink(), reader)));
    let head = h.add_rx_buffer(DATA, 64);
    h.rx_notify.write(1).unwrap();
    h.run_once();

    writer.write_all(b"ls -l\n").unwrap();
    h.run_once();
    assert_eq!(h.rx.used(), [(u32::from(head), 6)]);
    assert_eq!(guest_bytes(&mem, DATA, 6), b"ls -l\n");
    assert!(h.interrupt.signals().contains(&VirtioSignal::UsedQueue(0)));
}

#[test]
fn input_waits_without_busy_looping_until_the_guest_adds_receive_buffers() {
    let mem = memory().unwrap();
    let (reader, mut writer) = pipe();
    let mut h = Harness::new(&mem, Box::new(StreamBackend::new(io::sink(), reader)));

    writer.write_all(b"typed early").unwrap();
    assert_eq!(h.run_once(), 1, "the input is read once");
    assert!(h.paused());
    writer.write_all(b"; more").unwrap();
    // The input is readable but not watched: nothing wakes the loop.
    assert_eq!(h.run_once(), 0);
    assert_eq!(h.run_once(), 0);

    h.add_rx_buffer(DATA, 64);
    h.rx_notify.write(1).unwrap();
    h.run_once();
    assert!(!h.paused());
    assert_eq!(guest_bytes(&mem, DATA, 11), b"typed early");

    // Watching again, the rest arrives in the next buffer.
    h.add_rx_buffer(DATA + 0x100, 64);
    h.rx_notify.write(1).unwrap();
    h.run_once();
    h.run_once();
    assert_eq!(guest_bytes(&mem, DATA + 0x100, 6), b"; more");
}

#[test]
fn input_larger_than_one_buffer_fills_several_and_waits_for_more() {
    let mem = memory().unwrap();
    let (reader, mut writer) = pipe();
    let mut h = Harness::new(&mem, Box::new(StreamBackend::new(io::sink(), reader)));
    h.add_rx_buffer(DATA, 4);
    h.add_rx_buffer(DATA + 0x100, 4);
    h.rx_notify.write(1).unwrap();
    h.run_once();

    writer.write_all(b"0123456789").unwrap();
    h.run_once();
    assert_eq!(h.rx.used(), [(0, 4), (1, 4)]);
    assert_eq!(h.console.lock().unwrap().pending_input(), 2);
    assert!(h.paused());

    h.add_rx_buffer(DATA + 0x200, 4);
    h.rx_notify.write(1).unwrap();
    h.run_once();
    assert_eq!(h.rx.used()[2], (2, 2));
    assert_eq!(guest_bytes(&mem, DATA + 0x200, 2), b"89");
}

#[test]
fn receive_buffers_without_room_are_returned_empty() {
    let mem = memory().unwrap();
    let (reader, mut writer) = pipe();
    let mut h = Harness::new(&mem, Box::new(StreamBackend::new(io::sink(), reader)));
    mem.write_slice(b"keep", GuestAddress(DATA)).unwrap();
    h.rx.add(&[Buf::readable(DATA, 4)]).unwrap(); // a driver bug: readable
    h.add_rx_buffer(DATA + 0x100, 8);
    h.rx_notify.write(1).unwrap();
    h.run_once();
    writer.write_all(b"x").unwrap();
    h.run_once();
    assert_eq!(h.rx.used(), [(0, 0), (1, 1)]);
    assert_eq!(guest_bytes(&mem, DATA, 4), b"keep");
}

#[test]
fn input_is_not_read_before_activation() {
    let mem = memory().unwrap();
    let (reader, mut writer) = pipe();
    let mut h = Harness::inactive(&mem, Box::new(StreamBackend::new(io::sink(), reader)));
    writer.write_all(b"early").unwrap();
    assert_eq!(h.run_once(), 0);
    h.activate();
    assert_eq!(h.run_once(), 1, "read once active");
    assert_eq!(h.console.lock().unwrap().pending_input(), 5);
}

#[test]
fn end_of_input_stops_watching_it() {
    let mem = memory().unwrap();
    let (reader, writer) = pipe();
    let mut h = Harness::new(&mem, Box::new(StreamBackend::new(io::sink(), reader)));
    drop(writer);
    assert_eq!(h.run_once(), 1);
    assert_eq!(h.run_once(), 0, "a closed input does not wake the loop");
}

#[test]
fn an_unpollable_input_is_ignored_not_fatal() {
    let mem = memory().unwrap();
    let output = SharedOutput::default();
    let file = File::open(std::env::current_exe().unwrap()).unwrap();
    let mut h = Harness::new(&mem, Box::new(StreamBackend::new(output.clone(), file)));
    h.transmit(DATA, b"still works");
    assert_eq!(output.take(), b"still works");
}

#[test]
fn transmit_chain_outside_memory_puts_the_device_in_needs_reset() {
    let mem = memory().unwrap();
    let output = SharedOutput::default();
    let (reader, mut writer) = pipe();
    let mut h = Harness::new(&mem, Box::new(StreamBackend::new(output.clone(), reader)));
    h.tx.add(&[Buf::readable(MEM_SIZE - 2, 4)]).unwrap();
    h.tx_notify.write(1).unwrap();
    h.run_once();
    assert_eq!(h.interrupt.signals(), [VirtioSignal::NeedsReset]);
    assert!(output.take().is_empty());

    // Neither queues nor input are served until the driver resets it.
    writer.write_all(b"x").unwrap();
    h.tx_notify.write(1).unwrap();
    assert_eq!(h.run_once(), 0);
}

#[test]
fn pending_input_survives_a_reset() {
    let mem = memory().unwrap();
    let (reader, mut writer) = pipe();
    let mut h = Harness::new(&mem, Box::new(StreamBackend::new(io::sink(), reader)));
    writer.write_all(b"abc").unwrap();
    h.run_once();
    assert!(h.console.lock().unwrap().reset());
    h.run_once();
    h.rx = DriverQueue::at(&mem, GuestAddress(0x8000), 16).unwrap();
    h.tx = DriverQueue::at(&mem, GuestAddress(0xc000), 16).unwrap();
    h.add_rx_buffer(DATA, 8);
    h.activate();
    assert_eq!(guest_bytes(&mem, DATA, 3), b"abc");
}

fn socket_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("keel-virtio-{}-{name}.sock", std::process::id()))
}

#[test]
fn unix_listener_serves_one_client_at_a_time() {
    let mem = memory().unwrap();
    let path = socket_path("listen");
    let backend = UnixSocketBackend::listen(&path).unwrap();
    let mut h = Harness::new(&mem, Box::new(backend));
    h.add_rx_buffer(DATA, 64);
    h.add_rx_buffer(DATA + 0x100, 64);
    h.rx_notify.write(1).unwrap();
    h.run_once();

    // Output before anyone connects is dropped.
    h.transmit(DATA + 0x1000, b"nobody hears this");

    let mut first = UnixStream::connect(&path).unwrap();
    first.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    h.run_once(); // accept
    let mut second = UnixStream::connect(&path).unwrap();
    second.set_read_timeout(Some(Duration::from_millis(200))).unwrap();

    first.write_all(b"hi").unwrap();
    h.run_once();
    assert_eq!(guest_bytes(&mem, DATA, 2), b"hi");
    h.transmit(DATA + 0x1000, b"login: ");
    let mut got = [0u8; 7];
    first.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"login: ");
    assert!(second.read(&mut [0u8; 1]).is_err(), "the second client waits");

    // The first leaves; the second is accepted and served.
    drop(first);
    h.run_once(); // end of the first client
    h.run_once(); // accept the second
    second.write_all(b"yo").unwrap();
    h.run_once();
    assert_eq!(guest_bytes(&mem, DATA + 0x100, 2), b"yo");
    drop(h);
    assert!(!path.exists(), "the socket file is removed with the console");
}

#[test]
fn unix_connect_sends_output_to_the_server_and_reads_its_input() {
    let mem = memory().unwrap();
    let path = socket_path("connect");
    let _ = std::fs::remove_file(&path);
    let server = UnixListener::bind(&path).unwrap();
    let backend = UnixSocketBackend::connect(&path).unwrap();
    assert!(backend.is_connected());
    let (mut peer, _) = server.accept().unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    let mut h = Harness::new(&mem, Box::new(backend));
    h.transmit(DATA, b"boot ok");
    let mut got = [0u8; 7];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"boot ok");

    h.add_rx_buffer(DATA + 0x100, 16);
    h.rx_notify.write(1).unwrap();
    h.run_once();
    peer.write_all(b"cmd").unwrap();
    h.run_once();
    assert_eq!(guest_bytes(&mem, DATA + 0x100, 3), b"cmd");
    drop(peer);
    h.run_once();
    assert_eq!(h.run_once(), 0, "input ended with the server");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_client_that_stops_reading_loses_output_instead_of_stalling_the_vm() {
    let path = socket_path("stalled");
    let mut backend = UnixSocketBackend::listen(&path).unwrap();
    let _client = UnixStream::connect(&path).unwrap();
    assert!(matches!(
        backend.read_input(&mut [0u8; 1]),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock
    ));
    assert!(backend.is_connected());
    let chunk = vec![b'x'; 64 * 1024];
    let start = std::time::Instant::now();
    for _ in 0..64 {
        backend.write_output(&chunk).unwrap();
    }
    assert!(start.elapsed() < Duration::from_secs(4));
}

#[test]
fn file_console_appends_output() {
    let path = std::env::temp_dir().join(format!("keel-virtio-{}-console.log", std::process::id()));
    std::fs::write(&path, b"previous run\n").unwrap();
    let mem = memory().unwrap();
    let mut h = Harness::new(&mem, Box::new(StreamBackend::file(&path).unwrap()));
    h.transmit(DATA, b"new run\n");
    drop(h);
    assert_eq!(std::fs::read(&path).unwrap(), b"previous run\nnew run\n");
    let _ = std::fs::remove_file(&path);
}

#[test]
fn console_constructors_name_the_path_they_could_not_use() {
    let err = Console::file("/nonexistent/dir/console.log").unwrap_err();
    assert!(err.to_string().contains("/nonexistent/dir/console.log"), "{err}");
    let err = Console::unix_connect("/nonexistent/dir/console.sock").unwrap_err();
    assert!(err.to_string().contains("/nonexistent/dir/console.sock"), "{err}");
}

#[test]
fn offers_no_console_features_and_a_zeroed_config_space() {
    let console = Console::new(Box::new(StreamBackend::output_only(io::sink()))).unwrap();
    assert_eq!(
        console.features(),
        features::VERSION_1 | features::RING_INDIRECT_DESC | features::RING_EVENT_IDX
    );
    assert_eq!(console.queue_max_sizes(), [256, 256]);
    let mut config = [0xffu8; 12];
    console.read_config(0, &mut config);
    assert_eq!(config, [0; 12]);
}

/// Counts what reaches the backend without keeping it.
#[derive(Clone, Default)]
struct CountingOutput(Arc<std::sync::atomic::AtomicU64>);

impl CountingOutput {
    fn bytes(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Write for CountingOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The amplification the issue measured: a 256-entry transmit queue whose
/// every descriptor points at the same 32 KiB buffer, chained into one
/// 8 MiB request, and that one head published 256 times, then one notify.
/// The console, what reached its backend, the transmit queue's
/// notification eventfd and the event loop.
type Amplified = (
    Arc<Mutex<Console>>,
    CountingOutput,
    EventFd,
    EventManager<Arc<Mutex<Console>>>,
);

fn amplification_guest(mem: &GuestMemoryMmap, limit: Option<BucketConfig>) -> Amplified {
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
    const SIZE: u16 = 256;
    let output = CountingOutput::default();
    let console = Arc::new(Mutex::new(
        Console::new(Box::new(StreamBackend::output_only(output.clone()))).unwrap(),
    ));
    console.lock().unwrap().set_output_limit(limit);
    let mut event_loop = EventManager::new().unwrap();
    event_loop.add_subscriber(console.clone());
    let rx = DriverQueue::at(mem, GuestAddress(0x1000), 16).unwrap();
    let tx = DriverQueue::at(mem, GuestAddress(0x4000), SIZE).unwrap();
    for i in 0..SIZE {
        let last = i == SIZE - 1;
        let flags = if last { 0 } else { VRING_DESC_F_NEXT as u16 };
        tx.store(
            i,
            crate::guest_driver::raw_desc(DATA, 32 * 1024, flags, i.wrapping_add(1)),
        )
        .unwrap();
    }
    for _ in 0..SIZE {
        tx.publish(0);
    }
    let tx_notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    console
        .lock()
        .unwrap()
        .activate(Activation {
            mem: mem.clone(),
            queues: vec![rx.queue().unwrap(), tx.queue().unwrap()],
            queue_events: vec![
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                tx_notify.try_clone().unwrap(),
            ],
            interrupt: Arc::new(RecordingInterrupt::new()),
            stop: StopSignal::new(),
        })
        .unwrap();
    event_loop.run_with_timeout(100).unwrap();
    (console, output, tx_notify, event_loop)
}

#[test]
fn repeated_heads_of_huge_chains_cost_at_most_the_request_cap_each_and_a_pass_cap_per_pass() {
    let mem = memory().unwrap();
    let (console, output, tx_notify, mut event_loop) = amplification_guest(&mem, None);
    // Activation already ran one pass over what was published.
    assert_eq!(output.bytes(), MAX_OUTPUT_PASS_BYTES);
    tx_notify.write(1).unwrap();
    // One pass per round; each must stop at the pass cap and come back.
    let mut passes = 1u64;
    let mut last = output.bytes();
    loop {
        let started = std::time::Instant::now();
        event_loop.run_with_timeout(0).unwrap();
        let pass = output.bytes() - last;
        last = output.bytes();
        assert!(pass <= MAX_OUTPUT_PASS_BYTES, "{pass} bytes in one pass");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "a pass held the device for {:?}",
            started.elapsed()
        );
        if pass == 0 {
            break;
        }
        passes += 1;
    }
    // Every one of the 256 publications was served, each cut to the request cap.
    let expected = 256 * MAX_OUTPUT_REQUEST_BYTES;
    assert_eq!(output.bytes(), expected, "bytes written for one notify");
    assert_eq!(passes, expected / MAX_OUTPUT_PASS_BYTES);
    let counters = console.lock().unwrap().counters();
    assert_eq!(counters.tx_requests, 256);
    assert_eq!(
        counters.tx_truncated_bytes,
        256 * (8 * 1024 * 1024 - MAX_OUTPUT_REQUEST_BYTES)
    );
}

#[test]
fn an_output_limit_paces_a_flooding_guest_by_its_timer_without_polling() {
    let mem = memory().unwrap();
    // 1 MiB/s with 256 KiB bursts.
    let limit = BucketConfig::new(256 * 1024, 250);
    // The bucket starts filling when the device is made: the setup's own
    // event-loop pass may already send some of it.
    let limited_since = std::time::Instant::now();
    let (console, output, tx_notify, mut event_loop) = amplification_guest(&mem, Some(limit));
    tx_notify.write(1).unwrap();
    let started = std::time::Instant::now();
    let mut rounds = 0u64;
    while started.elapsed() < Duration::from_millis(500) {
        // A round only returns early when an event fired; a busy loop would
        // show up as thousands of rounds.
        event_loop.run_with_timeout(50).unwrap();
        rounds += 1;
    }
    let elapsed = limited_since.elapsed().as_secs_f64();
    let bytes = output.bytes() as f64;
    // The burst (256 KiB) plus 1 MiB/s since the bucket began, and one
    // request of slack.
    let allowed = 256.0 * 1024.0 + elapsed * 1024.0 * 1024.0 + MAX_OUTPUT_REQUEST_BYTES as f64;
    assert!(
        bytes <= allowed,
        "{bytes} bytes in {elapsed:.3} s (at most {allowed})"
    );
    assert!(bytes >= 256.0 * 1024.0, "the burst went out: {bytes}");
    assert!(rounds < 200, "{rounds} event-loop rounds in 0.5 s: polling?");
    assert!(console.lock().unwrap().counters().tx_throttled > 0);
}

#[test]
fn a_file_console_is_limited_by_default() {
    let dir = std::env::temp_dir().join(format!("keel-console-limit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let console = Console::file(dir.join("out.log")).unwrap();
    assert_eq!(console.output_limit(), Some(DEFAULT_FILE_OUTPUT_LIMIT));
    let mut console = console;
    console.set_output_limit(None);
    assert_eq!(console.output_limit(), None);
    std::fs::remove_dir_all(dir).unwrap();
}
