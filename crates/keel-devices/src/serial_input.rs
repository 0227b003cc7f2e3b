//! Forwarding host input (a terminal, a pipe, a socket) to a serial console.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::serial::SERIAL_FIFO_SIZE;
use crate::{Error, Result, SerialConsole};

/// An `event_manager` subscriber that reads host input from a file
/// descriptor and queues it for the guest on a [`SerialConsole`].
///
/// It applies backpressure instead of dropping input or spinning: it reads
/// only as much as the console's receive FIFO has room for, and when the FIFO
/// is full it stops watching the input altogether (the unread input waits in
/// the kernel's buffer, and a writer to a pipe eventually blocks). It watches
/// the input again once the guest has emptied the FIFO, which the console
/// signals through an eventfd from inside the guest's register read.
///
/// End of file, a hang-up or a read error on the input ends forwarding: the
/// subscriber stops watching the input and [`is_closed`](Self::is_closed)
/// becomes true. Bytes already read are still delivered.
///
/// The input must be pollable with `epoll` (a terminal, pipe, socket or
/// character device; not a regular file). It is read only when `epoll`
/// reports it readable, so it need not be in non-blocking mode.
///
/// # Example
///
/// ```
/// use std::io::Write;
/// use std::os::unix::net::UnixStream;
/// use std::sync::{Arc, Mutex};
/// use event_manager::{EventManager, SubscriberOps};
/// use keel_devices::{SerialConsole, SerialInput};
/// use keel_irq::RecordingLine;
/// use vm_device::bus::PioAddress;
/// use vm_device::MutDevicePio;
///
/// let console = Arc::new(Mutex::new(
///     SerialConsole::new(Arc::new(RecordingLine::new()), std::io::sink()).unwrap(),
/// ));
/// let (mut host_side, input) = UnixStream::pair().unwrap();
///
/// let mut event_loop = EventManager::new().unwrap();
/// event_loop.add_subscriber(SerialInput::new(input, console.clone()).unwrap());
///
/// host_side.write_all(b"hi").unwrap();
/// event_loop.run_with_timeout(1000).unwrap();
///
/// // The guest reads the receive register (offset 0) twice.
/// let mut byte = [0];
/// console.lock().unwrap().pio_read(PioAddress(0x3f8), 0, &mut byte);
/// assert_eq!(&byte, b"h");
/// console.lock().unwrap().pio_read(PioAddress(0x3f8), 0, &mut byte);
/// assert_eq!(&byte, b"i");
/// ```
pub struct SerialInput<R, W: Write + Send> {
    input: R,
    console: Arc<Mutex<SerialConsole<W>>>,
    /// Signalled by the console when the guest empties its receive FIFO.
    drained: EventFd,
    /// Bytes read from the input that the console has not taken yet.
    pending: Vec<u8>,
    watching_input: bool,
    input_closed: bool,
}

impl<R: Read + AsRawFd + Send, W: Write + Send> SerialInput<R, W> {
    /// Forwards what `input` yields to `console`, once registered with an
    /// `EventManager`.
    pub fn new(input: R, console: Arc<Mutex<SerialConsole<W>>>) -> Result<Self> {
        let drained = lock(&console)
            .clone_drained_eventfd()
            .map_err(Error::CloneEventFd)?;
        Ok(Self {
            input,
            console,
            drained,
            pending: Vec::new(),
            watching_input: false,
            input_closed: false,
        })
    }

    /// Whether forwarding is waiting for the guest to empty the receive FIFO
    /// (the input is open but not watched).
    pub fn is_paused(&self) -> bool {
        !self.input_closed && !self.watching_input
    }

    /// Whether the input has ended (end of file, hang-up or read error) and is
    /// no longer watched.
    pub fn is_closed(&self) -> bool {
        self.input_closed
    }

    fn on_input_ready(&mut self, ops: &mut EventOps) {
        let capacity = lock(&self.console).fifo_capacity();
        if capacity == 0 {
            // Only possible if the guest filled the FIFO itself (loopback).
            self.deliver_pending(ops);
            return;
        }
        let mut buffer = [0u8; SERIAL_FIFO_SIZE];
        // No more than the FIFO takes (never more than it holds).
        let Some(buffer) = buffer.get_mut(..capacity.min(SERIAL_FIFO_SIZE)) else {
            return;
        };
        match self.input.read(buffer) {
            Ok(0) => self.close_input(ops, "end of file"),
            Ok(read) => {
                // A reader claiming more than the buffer gave what it holds.
                self.pending
                    .extend_from_slice(buffer.get(..read).unwrap_or(buffer));
                self.deliver_pending(ops);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => self.close_input(ops, &format!("read error: {e}")),
        }
    }

    fn on_fifo_drained(&mut self, ops: &mut EventOps) {
        // Reset the eventfd; a spurious wake-up finds it empty, which is fine.
        let _ = self.drained.read();
        self.deliver_pending(ops);
    }

    /// Moves pending bytes into the console, then watches the input if the
    /// console has room for more, or asks to be told when it has.
    fn deliver_pending(&mut self, ops: &mut EventOps) {
        let full = {
            let mut console = lock(&self.console);
            if !self.pending.is_empty() {
                let queued = match console.enqueue_input(&self.pending) {
                    Ok(queued) => queued,
                    Err(Error::InputInterrupt { queued, source }) => {
                        log::warn!("serial input: queued {queued} bytes but the interrupt failed: {source}");
                        queued
                    }
                    Err(e) => {
                        log::warn!("serial input: cannot queue input: {e}");
                        0
                    }
                };
                self.pending.drain(..queued);
            }
            let full = !self.pending.is_empty() || console.fifo_capacity() == 0;
            if full {
                // Under the console's lock, so the guest cannot empty the
                // FIFO between our look and the request.
                console.notify_when_input_drained();
            }
            full
        };

        if full {
            self.stop_watching_input(ops);
        } else {
            self.watch_input(ops);
        }
        if self.input_closed && self.pending.is_empty() {
            self.stop_watching_drained(ops);
        }
    }

    fn watch_input(&mut self, ops: &mut EventOps) {
        if self.watching_input || self.input_closed {
            return;
        }
        match ops.add(Events::new(&self.input, EventSet::IN)) {
            Ok(()) => self.watching_input = true,
            Err(e) => {
                log::error!(
                    "serial input: cannot watch fd {} (is it pollable?): {e}",
                    self.input.as_raw_fd()
                );
                self.close_input(ops, "cannot be watched");
            }
        }
    }

    fn stop_watching_input(&mut self, ops: &mut EventOps) {
        if !self.watching_input {
            return;
        }
        if let Err(e) = ops.remove(Events::new(&self.input, EventSet::IN)) {
            log::warn!("serial input: cannot stop watching the input: {e}");
        }
        self.watching_input = false;
    }

    fn stop_watching_drained(&mut self, ops: &mut EventOps) {
        // Removing an fd that is not watched fails harmlessly.
        let _ = ops.remove(Events::new(&self.drained, EventSet::IN));
    }

    fn close_input(&mut self, ops: &mut EventOps, reason: &str) {
        log::info!("serial input: stopped forwarding to the guest: {reason}");
        self.stop_watching_input(ops);
        self.input_closed = true;
        if self.pending.is_empty() {
            self.stop_watching_drained(ops);
        }
    }
}

impl<R: Read + AsRawFd + Send, W: Write + Send> MutEventSubscriber for SerialInput<R, W> {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.drained, EventSet::IN)) {
            log::error!("serial input: cannot watch the console's drain eventfd: {e}");
        }
        self.watch_input(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.input.as_raw_fd() {
            self.on_input_ready(ops);
        } else if fd == self.drained.as_raw_fd() {
            self.on_fifo_drained(ops);
        } else {
            log::warn!("serial input: event on unknown fd {fd}");
        }
    }
}

fn lock<W: Write + Send>(console: &Mutex<SerialConsole<W>>) -> MutexGuard<'_, SerialConsole<W>> {
    // A panic elsewhere must not silence the console; its state is plain data.
    console.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::unix::io::FromRawFd;

    use event_manager::{EventManager, SubscriberOps};
    use keel_irq::RecordingLine;
    use vm_device::bus::PioAddress;
    use vm_device::MutDevicePio;

    use super::*;

    type Console = Arc<Mutex<SerialConsole<Vec<u8>>>>;

    const DATA: u16 = 0;
    const IER: u16 = 1;
    const IER_RDA: u8 = 0x01;

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes, and
        // the return value is checked.
        let ret = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(ret, 0, "pipe2: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors were just created by pipe2 and are owned
        // by nothing else.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    fn console() -> (Console, Arc<RecordingLine>) {
        let irq = Arc::new(RecordingLine::new());
        let console = SerialConsole::new(irq.clone(), Vec::new()).unwrap();
        (Arc::new(Mutex::new(console)), irq)
    }

    fn guest_reads(console: &Console, count: usize) -> Vec<u8> {
        let mut console = console.lock().unwrap();
        (0..count)
            .map(|_| {
                let mut byte = [0];
                console.pio_read(PioAddress(0x3f8), DATA, &mut byte);
                byte[0]
            })
            .collect()
    }

    /// One `epoll_wait` round; returns how many events were dispatched.
    fn run_once(event_loop: &mut EventManager<SerialInput<File, Vec<u8>>>) -> usize {
        event_loop.run_with_timeout(200).unwrap()
    }

    #[test]
    fn forwards_input_that_the_guest_can_read() {
        let (console, irq) = console();
        console
            .lock()
            .unwrap()
            .pio_write(PioAddress(0x3f8), IER, &[IER_RDA]);
        let (reader, mut writer) = pipe();
        let mut event_loop = EventManager::new().unwrap();
        event_loop.add_subscriber(SerialInput::new(reader, console.clone()).unwrap());

        writer.write_all(b"hello").unwrap();
        assert_eq!(run_once(&mut event_loop), 1);

        assert_eq!(irq.count(), 1, "the receive interrupt was raised");
        assert_eq!(guest_reads(&console, 5), b"hello");
    }

    #[test]
    fn stops_watching_input_while_the_fifo_is_full_and_resumes_when_drained() {
        let (console, _) = console();
        let (reader, mut writer) = pipe();
        let mut event_loop = EventManager::new().unwrap();
        let id = event_loop.add_subscriber(SerialInput::new(reader, console.clone()).unwrap());

        let input: Vec<u8> = (0..100u8).collect();
        writer.write_all(&input).unwrap();
        run_once(&mut event_loop);

        assert_eq!(console.lock().unwrap().fifo_capacity(), 0);
        assert!(event_loop.subscriber_mut(id).unwrap().is_paused());
        // 36 bytes are still readable in the pipe, yet nothing wakes the
        // loop: the input is not watched (no busy loop).
        assert_eq!(run_once(&mut event_loop), 0);

        let mut received = guest_reads(&console, SERIAL_FIFO_SIZE);
        assert_eq!(run_once(&mut event_loop), 1, "the drained signal");
        assert!(!event_loop.subscriber_mut(id).unwrap().is_paused());
        assert_eq!(run_once(&mut event_loop), 1, "the input again");

        received.extend(guest_reads(&console, 36));
        assert_eq!(received, input);
        assert_eq!(console.lock().unwrap().fifo_capacity(), SERIAL_FIFO_SIZE);
    }

    #[test]
    fn partial_drain_does_not_resume_input() {
        let (console, _) = console();
        let (reader, mut writer) = pipe();
        let mut event_loop = EventManager::new().unwrap();
        let id = event_loop.add_subscriber(SerialInput::new(reader, console.clone()).unwrap());

        writer.write_all(&[b'x'; SERIAL_FIFO_SIZE + 1]).unwrap();
        run_once(&mut event_loop);
        guest_reads(&console, 10);

        assert_eq!(run_once(&mut event_loop), 0);
        assert!(event_loop.subscriber_mut(id).unwrap().is_paused());
    }

    #[test]
    fn end_of_input_unregisters_it() {
        let (console, _) = console();
        let (reader, mut writer) = pipe();
        let mut event_loop = EventManager::new().unwrap();
        let id = event_loop.add_subscriber(SerialInput::new(reader, console.clone()).unwrap());

        writer.write_all(b"bye").unwrap();
        drop(writer);
        run_once(&mut event_loop);
        assert!(!event_loop.subscriber_mut(id).unwrap().is_closed());
        run_once(&mut event_loop);
        assert!(event_loop.subscriber_mut(id).unwrap().is_closed());

        // Nothing is watched any more, and what was sent is still there.
        assert_eq!(run_once(&mut event_loop), 0);
        assert_eq!(guest_reads(&console, 3), b"bye");
        assert_eq!(run_once(&mut event_loop), 0);
    }

    #[test]
    fn end_of_input_while_paused_is_noticed_after_the_drain() {
        let (console, _) = console();
        let (reader, mut writer) = pipe();
        let mut event_loop = EventManager::new().unwrap();
        let id = event_loop.add_subscriber(SerialInput::new(reader, console.clone()).unwrap());

        writer.write_all(&[b'y'; SERIAL_FIFO_SIZE]).unwrap();
        drop(writer);
        run_once(&mut event_loop);
        assert!(event_loop.subscriber_mut(id).unwrap().is_paused());

        guest_reads(&console, SERIAL_FIFO_SIZE);
        run_once(&mut event_loop); // drained: watch the input again
        run_once(&mut event_loop); // end of file
        assert!(event_loop.subscriber_mut(id).unwrap().is_closed());
    }

    #[test]
    fn an_unpollable_input_is_closed_not_fatal() {
        let (console, _) = console();
        // Regular files cannot be watched with epoll.
        let file = File::open(std::env::current_exe().unwrap()).unwrap();
        let mut event_loop = EventManager::new().unwrap();
        let id = event_loop.add_subscriber(SerialInput::new(file, console).unwrap());
        assert!(event_loop.subscriber_mut(id).unwrap().is_closed());
    }
}
