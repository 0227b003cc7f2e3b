//! A 16550 UART as the guest's console.

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use keel_irq::InterruptLine;
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::serial::{Error as UartError, SerialEvents};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::{Error, Result, UNDECODED_READ};

/// Bytes the 16550's receive FIFO holds.
pub const SERIAL_FIFO_SIZE: usize = 64;

/// A [`SerialConsole`]'s registers and receive FIFO, as a snapshot keeps
/// them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct SerialConsoleState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes the guest has not read.
    pub in_buffer: Vec<u8>,
}

/// A 16550 UART (on `vm_superio::Serial`) whose output goes to any
/// [`Write`] and whose interrupt goes through an [`InterruptLine`].
///
/// Register it on a PIO bus over its eight ports
/// ([`ports::com1_range`](crate::ports::com1_range)); the offset into the
/// range is the register number. Host input is queued with
/// [`enqueue_input`](Self::enqueue_input), or forwarded from a file
/// descriptor by a [`SerialInput`](crate::SerialInput).
///
/// # What the guest cannot do
///
/// - **Odd accesses**: the UART's registers are one byte wide. Reads of any
///   other size, or at an offset past the eight registers, return all ones
///   (`0xff`, as from an unclaimed ISA port); such writes are dropped. Both
///   are counted in [`ignored_accesses`](Self::ignored_accesses).
/// - **Stop itself on a broken output**: a failed write to the output drops
///   the byte and is counted in
///   [`lost_output_bytes`](Self::lost_output_bytes); the transmitter still
///   reports itself empty and raises its interrupt, so the guest's driver
///   carries on.
/// - **Stop itself on a broken interrupt line**: a failed trigger is logged
///   and counted in [`interrupt_failures`](Self::interrupt_failures).
///
/// Each byte the guest transmits is written and flushed to the output while
/// the vCPU waits, as on a real UART: give it an output that does not block
/// for long (a file, a pipe that is drained, a `Vec`).
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use keel_devices::SerialConsole;
/// use keel_irq::RecordingLine;
/// use vm_device::bus::PioAddress;
/// use vm_device::MutDevicePio;
///
/// let irq = Arc::new(RecordingLine::new());
/// let mut console = SerialConsole::new(irq.clone(), Vec::new()).unwrap();
///
/// // The guest writes 'A' to the transmit register (offset 0).
/// console.pio_write(PioAddress(0x3f8), 0, b"A");
/// assert_eq!(console.output(), b"A");
///
/// // The host types 'z'; the guest reads it from the receive register.
/// assert_eq!(console.enqueue_input(b"z").unwrap(), 1);
/// let mut byte = [0];
/// console.pio_read(PioAddress(0x3f8), 0, &mut byte);
/// assert_eq!(&byte, b"z");
/// ```
pub struct SerialConsole<W: Write + Send> {
    uart: Serial<LineTrigger, ConsoleEvents, W>,
    interrupt_failures: u64,
    ignored_accesses: u64,
}

impl<W: Write + Send> SerialConsole<W> {
    /// A UART in its power-on state, writing the guest's output to `out` and
    /// raising `interrupt` when the guest has enabled and earned one.
    pub fn new(interrupt: Arc<dyn InterruptLine>, out: W) -> Result<Self> {
        let events = ConsoleEvents {
            lost_output_bytes: AtomicU64::new(0),
            drain_wanted: AtomicBool::new(false),
            drained: EventFd::new(libc::EFD_NONBLOCK).map_err(Error::CreateEventFd)?,
        };
        Ok(Self {
            uart: Serial::with_events(LineTrigger(interrupt), events, out),
            interrupt_failures: 0,
            ignored_accesses: 0,
        })
    }

    /// A UART with the registers and receive FIFO of a saved state (see
    /// [`save_state`](Self::save_state)), otherwise like [`new`](Self::new).
    pub fn from_state(interrupt: Arc<dyn InterruptLine>, out: W, state: &SerialConsoleState) -> Result<Self> {
        let events = ConsoleEvents {
            lost_output_bytes: AtomicU64::new(0),
            drain_wanted: AtomicBool::new(false),
            drained: EventFd::new(libc::EFD_NONBLOCK).map_err(Error::CreateEventFd)?,
        };
        let uart_state = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Serial::from_state(&uart_state, LineTrigger(interrupt), events, out).map_err(|e| {
            Error::State {
                device: "serial",
                reason: format!(
                    "{} bytes in the receive FIFO (at most {SERIAL_FIFO_SIZE}): {e:?}",
                    state.in_buffer.len()
                ),
            }
        })?;
        Ok(Self {
            uart,
            interrupt_failures: 0,
            ignored_accesses: 0,
        })
    }

    /// For a snapshot: the UART's registers and the input the guest has
    /// not read yet.
    pub fn save_state(&self) -> SerialConsoleState {
        let s = self.uart.state();
        SerialConsoleState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Queues host input for the guest to read, as much as fits in the
    /// receive FIFO; returns how many bytes were queued.
    ///
    /// Returns `Ok(0)` when the FIFO is full, and also while the guest has
    /// the UART in loopback mode (the line is then disconnected from the
    /// host). If bytes were queued but the receive interrupt could not be
    /// raised, returns [`Error::InputInterrupt`] with the number queued.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> Result<usize> {
        let capacity_before = self.uart.fifo_capacity();
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(queued) => Ok(queued),
            Err(UartError::FullFifo) => Ok(0),
            Err(UartError::Trigger(source)) => {
                self.interrupt_failures = self.interrupt_failures.saturating_add(1);
                Err(Error::InputInterrupt {
                    queued: capacity_before.saturating_sub(self.uart.fifo_capacity()),
                    source,
                })
            }
            // Queueing input does no I/O; should vm-superio ever report
            // some, the bytes it took are still the ones queued.
            Err(UartError::IOError(e)) => {
                log::warn!("serial: unexpected I/O error while queueing input: {e}");
                Ok(capacity_before.saturating_sub(self.uart.fifo_capacity()))
            }
        }
    }

    /// Free space in the receive FIFO, in bytes (at most
    /// [`SERIAL_FIFO_SIZE`]).
    pub fn fifo_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// The output the guest's bytes are written to.
    pub fn output(&self) -> &W {
        self.uart.writer()
    }

    /// The output, mutably (to drain a buffer, for example).
    pub fn output_mut(&mut self) -> &mut W {
        self.uart.writer_mut()
    }

    /// Consumes the console and returns its output.
    pub fn into_output(self) -> W {
        self.uart.into_writer()
    }

    /// Bytes the guest transmitted that could not be written to the output.
    pub fn lost_output_bytes(&self) -> u64 {
        self.uart.events().lost_output_bytes.load(Ordering::Relaxed)
    }

    /// Interrupts that could not be raised because the line failed.
    pub fn interrupt_failures(&self) -> u64 {
        self.interrupt_failures
    }

    /// Guest accesses of a size or at an offset the UART does not decode.
    pub fn ignored_accesses(&self) -> u64 {
        self.ignored_accesses
    }

    /// Asks to be told, through the eventfd from
    /// [`clone_drained_eventfd`](Self::clone_drained_eventfd), the next time
    /// the guest empties the receive FIFO. Call it while holding the same
    /// lock the guest's accesses go through, after finding the FIFO full, so
    /// the notification cannot be missed.
    pub(crate) fn notify_when_input_drained(&self) {
        self.uart.events().drain_wanted.store(true, Ordering::SeqCst);
    }

    /// A handle on the eventfd that
    /// [`notify_when_input_drained`](Self::notify_when_input_drained) signals.
    pub(crate) fn clone_drained_eventfd(&self) -> io::Result<EventFd> {
        self.uart.events().drained.try_clone()
    }

    fn ignore(&mut self, access: &str, offset: PioAddressOffset, len: usize) {
        self.ignored_accesses = self.ignored_accesses.saturating_add(1);
        log::debug!("serial: ignored {len}-byte {access} at offset {offset}");
    }

    fn note_uart_error(&mut self, error: UartError<keel_irq::Error>) {
        match error {
            UartError::Trigger(e) => {
                self.interrupt_failures = self.interrupt_failures.saturating_add(1);
                keel_ratelimit::warn_limited!("serial: cannot raise the interrupt: {e}");
            }
            UartError::IOError(e) => {
                // Already counted by `ConsoleEvents::tx_lost_byte`.
                keel_ratelimit::warn_limited!("serial: output byte lost: {e}");
            }
            UartError::FullFifo => {}
        }
    }
}

impl<W: Write + Send> MutDevicePio for SerialConsole<W> {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        match (register(offset), data) {
            (Some(register), [byte]) => *byte = self.uart.read(register),
            (_, data) => {
                data.fill(UNDECODED_READ);
                self.ignore("read", offset, data.len());
            }
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        match (register(offset), data) {
            (Some(register), [value]) => {
                if let Err(e) = self.uart.write(register, *value) {
                    self.note_uart_error(e);
                }
            }
            _ => self.ignore("write", offset, data.len()),
        }
    }
}

impl<W: Write + Send> fmt::Debug for SerialConsole<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SerialConsole")
            .field("fifo_capacity", &self.fifo_capacity())
            .field("lost_output_bytes", &self.lost_output_bytes())
            .field("interrupt_failures", &self.interrupt_failures)
            .field("ignored_accesses", &self.ignored_accesses)
            .finish_non_exhaustive()
    }
}

/// The UART register an offset selects, if it selects one.
fn register(offset: PioAddressOffset) -> Option<u8> {
    u8::try_from(offset)
        .ok()
        .filter(|&register| u16::from(register) < crate::ports::SERIAL_PORT_COUNT)
}

/// Adapts an [`InterruptLine`] to what `vm_superio::Serial` triggers.
struct LineTrigger(Arc<dyn InterruptLine>);

impl Trigger for LineTrigger {
    type E = keel_irq::Error;

    fn trigger(&self) -> std::result::Result<(), keel_irq::Error> {
        self.0.trigger()
    }
}

/// What the console learns from `vm_superio::Serial` as it runs.
struct ConsoleEvents {
    lost_output_bytes: AtomicU64,
    /// Set when someone waits for the guest to empty the receive FIFO.
    drain_wanted: AtomicBool,
    /// Signalled once when the guest empties the FIFO while `drain_wanted`.
    drained: EventFd,
}

impl SerialEvents for ConsoleEvents {
    fn buffer_read(&self) {}

    fn out_byte(&self) {}

    fn tx_lost_byte(&self) {
        self.lost_output_bytes.fetch_add(1, Ordering::Relaxed);
    }

    fn in_buffer_empty(&self) {
        if self.drain_wanted.swap(false, Ordering::SeqCst) {
            if let Err(e) = self.drained.write(1) {
                log::warn!("serial: cannot signal that the input FIFO drained: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_irq::RecordingLine;

    // Register offsets and bits of the 16550, as a guest driver uses them.
    const DATA: u16 = 0;
    const IER: u16 = 1;
    const IIR: u16 = 2;
    const LCR: u16 = 3;
    const MCR: u16 = 4;
    const LSR: u16 = 5;
    const SCR: u16 = 7;
    const IER_RDA: u8 = 0x01;
    const IER_THRE: u8 = 0x02;
    const IIR_NO_INTERRUPT: u8 = 0x01;
    const IIR_THRE: u8 = 0x02;
    const IIR_RDA: u8 = 0x04;
    const LSR_DATA_READY: u8 = 0x01;
    const LSR_THR_EMPTY: u8 = 0x20;
    const MCR_LOOPBACK: u8 = 0x10;

    const BASE: PioAddress = PioAddress(0x3f8);

    fn console() -> (SerialConsole<Vec<u8>>, Arc<RecordingLine>) {
        let irq = Arc::new(RecordingLine::new());
        (SerialConsole::new(irq.clone(), Vec::new()).unwrap(), irq)
    }

    fn read(console: &mut SerialConsole<impl Write + Send>, offset: u16) -> u8 {
        let mut byte = [0];
        console.pio_read(BASE, offset, &mut byte);
        byte[0]
    }

    fn write(console: &mut SerialConsole<impl Write + Send>, offset: u16, value: u8) {
        console.pio_write(BASE, offset, &[value]);
    }

    /// An output that refuses every write.
    struct BrokenOutput;

    impl Write for BrokenOutput {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("output is broken"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::other("output is broken"))
        }
    }

    #[test]
    fn transmitted_bytes_reach_the_output() {
        let (mut console, _) = console();
        for &byte in b"hello\n" {
            write(&mut console, DATA, byte);
        }
        assert_eq!(console.output(), b"hello\n");
        assert_eq!(console.into_output(), b"hello\n");
    }

    #[test]
    fn transmitter_always_reports_itself_empty() {
        let (mut console, _) = console();
        write(&mut console, DATA, b'x');
        assert_ne!(read(&mut console, LSR) & LSR_THR_EMPTY, 0);
    }

    #[test]
    fn transmitting_raises_the_thre_interrupt_once_enabled() {
        let (mut console, irq) = console();
        write(&mut console, DATA, b'a');
        assert_eq!(irq.count(), 0, "interrupts are disabled at power-on");

        write(&mut console, IER, IER_THRE);
        let after_enable = irq.count();
        assert_eq!(after_enable, 1, "enabling THRE with an empty THR interrupts");
        assert_eq!(read(&mut console, IIR) & 0x0f, IIR_THRE);

        write(&mut console, DATA, b'b');
        assert_eq!(irq.count(), after_enable + 1);
    }

    #[test]
    fn input_is_readable_by_the_guest_in_order() {
        let (mut console, _) = console();
        assert_eq!(console.enqueue_input(b"ok").unwrap(), 2);

        assert_ne!(read(&mut console, LSR) & LSR_DATA_READY, 0);
        assert_eq!(read(&mut console, DATA), b'o');
        assert_eq!(read(&mut console, DATA), b'k');
        assert_eq!(read(&mut console, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn input_raises_the_rda_interrupt_when_enabled() {
        let (mut console, irq) = console();
        console.enqueue_input(b"x").unwrap();
        assert_eq!(irq.count(), 0, "RDA is disabled at power-on");
        read(&mut console, DATA);

        write(&mut console, IER, IER_RDA);
        let before = irq.count();
        console.enqueue_input(b"y").unwrap();
        assert_eq!(irq.count(), before + 1);
        assert_eq!(read(&mut console, IIR) & 0x0f, IIR_RDA);
        assert_eq!(read(&mut console, DATA), b'y');
        assert_eq!(read(&mut console, IIR) & 0x0f, IIR_NO_INTERRUPT);
    }

    #[test]
    fn input_beyond_the_fifo_is_refused_and_counted_out() {
        let (mut console, _) = console();
        assert_eq!(console.fifo_capacity(), SERIAL_FIFO_SIZE);

        let input = [b'.'; SERIAL_FIFO_SIZE + 10];
        assert_eq!(console.enqueue_input(&input).unwrap(), SERIAL_FIFO_SIZE);
        assert_eq!(console.fifo_capacity(), 0);
        assert_eq!(console.enqueue_input(b"more").unwrap(), 0);

        read(&mut console, DATA);
        assert_eq!(console.fifo_capacity(), 1);
        assert_eq!(console.enqueue_input(b"more").unwrap(), 1);
    }

    #[test]
    fn empty_input_queues_nothing() {
        let (mut console, irq) = console();
        write(&mut console, IER, IER_RDA);
        assert_eq!(console.enqueue_input(b"").unwrap(), 0);
        assert_eq!(irq.count(), 0);
    }

    #[test]
    fn input_is_not_accepted_in_loopback_mode() {
        let (mut console, _) = console();
        write(&mut console, MCR, MCR_LOOPBACK);
        assert_eq!(console.enqueue_input(b"x").unwrap(), 0);

        // What the guest transmits comes back to it instead of the output.
        write(&mut console, DATA, b'l');
        assert_eq!(read(&mut console, DATA), b'l');
        assert!(console.output().is_empty());
    }

    #[test]
    fn a_broken_output_loses_bytes_but_keeps_the_guest_going() {
        let irq = Arc::new(RecordingLine::new());
        let mut console = SerialConsole::new(irq.clone(), BrokenOutput).unwrap();
        write(&mut console, IER, IER_THRE);
        read(&mut console, IIR); // the driver acknowledges the first THRE
        let before = irq.count();

        for &byte in b"ab" {
            write(&mut console, DATA, byte);
            assert_eq!(
                read(&mut console, IIR) & 0x0f,
                IIR_THRE,
                "THRE is raised regardless"
            );
        }

        assert_eq!(console.lost_output_bytes(), 2);
        assert_ne!(read(&mut console, LSR) & LSR_THR_EMPTY, 0);
        assert_eq!(irq.count(), before + 2);
    }

    #[test]
    fn a_failing_interrupt_line_is_counted_not_fatal() {
        let (mut console, irq) = console();
        irq.set_failing(true);
        write(&mut console, IER, IER_THRE | IER_RDA);
        write(&mut console, DATA, b'a');
        assert!(console.interrupt_failures() >= 1);
        assert_eq!(console.output(), b"a");

        let failures = console.interrupt_failures();
        let err = console.enqueue_input(b"in").unwrap_err();
        assert!(matches!(err, Error::InputInterrupt { queued: 2, .. }), "{err:?}");
        assert_eq!(console.interrupt_failures(), failures + 1);
        assert_eq!(read(&mut console, DATA), b'i', "the input was queued anyway");
    }

    #[test]
    fn scratch_and_line_control_registers_keep_what_the_guest_wrote() {
        let (mut console, _) = console();
        write(&mut console, SCR, 0x5a);
        assert_eq!(read(&mut console, SCR), 0x5a);
        write(&mut console, LCR, 0x03);
        assert_eq!(read(&mut console, LCR), 0x03);
    }

    #[test]
    fn wide_reads_return_all_ones_and_are_counted() {
        let (mut console, _) = console();
        console.enqueue_input(b"x").unwrap();
        for len in [0, 2, 4, 8] {
            let mut data = vec![0u8; len];
            console.pio_read(BASE, DATA, &mut data);
            assert!(data.iter().all(|&b| b == 0xff), "{len}-byte read: {data:?}");
        }
        assert_eq!(console.ignored_accesses(), 4);
        assert_eq!(read(&mut console, DATA), b'x', "ignored reads consume nothing");
    }

    #[test]
    fn wide_writes_are_dropped_and_counted() {
        let (mut console, _) = console();
        console.pio_write(BASE, DATA, b"");
        console.pio_write(BASE, DATA, b"ab");
        console.pio_write(BASE, DATA, &[b'c'; 4]);
        assert!(console.output().is_empty());
        assert_eq!(console.ignored_accesses(), 3);
    }

    #[test]
    fn accesses_past_the_eight_registers_are_ignored() {
        let (mut console, _) = console();
        for offset in [8, 255, 256, u16::MAX] {
            console.pio_write(BASE, offset, b"x");
            let mut byte = [0];
            console.pio_read(BASE, offset, &mut byte);
            assert_eq!(byte, [0xff], "offset {offset}");
        }
        assert!(console.output().is_empty());
        assert_eq!(console.ignored_accesses(), 8);
    }

    #[test]
    fn every_register_and_value_is_safe_to_write() {
        let (mut console, _) = console();
        for offset in 0..crate::ports::SERIAL_PORT_COUNT {
            for value in 0..=u8::MAX {
                write(&mut console, offset, value);
                read(&mut console, offset);
            }
        }
        console.enqueue_input(&[0; 100]).unwrap();
    }

    #[test]
    fn emptying_the_fifo_signals_only_when_asked() {
        let (mut console, _) = console();
        let drained = console.clone_drained_eventfd().unwrap();

        console.enqueue_input(b"a").unwrap();
        read(&mut console, DATA);
        assert!(drained.read().is_err(), "nobody asked: no signal");

        console.enqueue_input(b"bc").unwrap();
        console.notify_when_input_drained();
        read(&mut console, DATA);
        assert!(drained.read().is_err(), "not empty yet");
        read(&mut console, DATA);
        assert_eq!(drained.read().unwrap(), 1);

        console.enqueue_input(b"d").unwrap();
        read(&mut console, DATA);
        assert!(drained.read().is_err(), "one notification per request");
    }

    #[test]
    fn a_saved_uart_comes_back_with_its_registers_and_unread_input() {
        let (mut original, _) = console();
        original.pio_write(BASE, LCR, &[0x03]);
        original.pio_write(BASE, SCR, &[0x5a]);
        original.pio_write(BASE, IER, &[IER_RDA]);
        assert_eq!(original.enqueue_input(b"hi").unwrap(), 2);
        let state = original.save_state();

        let irq = Arc::new(RecordingLine::new());
        let mut restored = SerialConsole::from_state(irq, Vec::new(), &state).unwrap();
        assert_eq!(read(&mut restored, LCR), 0x03);
        assert_eq!(read(&mut restored, SCR), 0x5a);
        assert_eq!(read(&mut restored, IER), IER_RDA);
        assert_eq!(read(&mut restored, IIR) & 0x0f, IIR_RDA);
        assert_eq!(read(&mut restored, DATA), b'h');
        assert_eq!(read(&mut restored, DATA), b'i');
        assert_eq!(read(&mut restored, LSR) & LSR_DATA_READY, 0);

        let overfull = SerialConsoleState {
            in_buffer: vec![0; SERIAL_FIFO_SIZE + 1],
            ..state
        };
        let err = SerialConsole::from_state(Arc::new(RecordingLine::new()), Vec::new(), &overfull)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("serial state: 65 bytes in the receive FIFO (at most 64)"),
            "{err}"
        );
    }
}
