//! The devices registered on a `vm-device` `IoManager` at the PC's standard
//! ports, driven the way a vCPU's port I/O exits drive them.

use std::sync::{Arc, Mutex};

use keel_devices::{ports, ExitPort, I8042Reset, PowerRequest, RecordingPowerControl, SerialConsole};
use keel_irq::RecordingLine;
use vm_device::bus::{self, PioAddress};
use vm_device::device_manager::{IoManager, PioManager};

struct Machine {
    io: IoManager,
    console: Arc<Mutex<SerialConsole<Vec<u8>>>>,
    com1_irq: Arc<RecordingLine>,
    power: Arc<RecordingPowerControl>,
}

fn machine() -> Machine {
    let com1_irq = Arc::new(RecordingLine::new());
    let power = Arc::new(RecordingPowerControl::new());
    let console = Arc::new(Mutex::new(
        SerialConsole::new(com1_irq.clone(), Vec::new()).unwrap(),
    ));

    let mut io = IoManager::new();
    io.register_pio(ports::com1_range(), console.clone()).unwrap();
    io.register_pio(
        ports::i8042_range(),
        Arc::new(Mutex::new(I8042Reset::new(power.clone()))),
    )
    .unwrap();
    io.register_pio(
        ports::exit_port_range(),
        Arc::new(Mutex::new(ExitPort::new(power.clone()))),
    )
    .unwrap();

    Machine {
        io,
        console,
        com1_irq,
        power,
    }
}

fn inb(io: &IoManager, port: u16) -> u8 {
    let mut byte = [0];
    io.pio_read(PioAddress(port), &mut byte).unwrap();
    byte[0]
}

fn outb(io: &IoManager, port: u16, value: u8) {
    io.pio_write(PioAddress(port), &[value]).unwrap();
}

#[test]
fn guest_output_on_com1_reaches_the_console_writer() {
    let m = machine();
    for &byte in b"Linux version" {
        outb(&m.io, ports::COM1, byte);
    }
    assert_eq!(m.console.lock().unwrap().output(), b"Linux version");
}

#[test]
fn com1_registers_sit_at_their_absolute_ports() {
    let m = machine();
    // Scratch register, COM1 + 7.
    outb(&m.io, ports::COM1 + 7, 0xa5);
    assert_eq!(inb(&m.io, ports::COM1 + 7), 0xa5);
    // Line status, COM1 + 5: transmitter empty.
    assert_ne!(inb(&m.io, ports::COM1 + 5) & 0x20, 0);
}

#[test]
fn host_input_raises_the_com1_interrupt_and_is_read_from_the_data_port() {
    let m = machine();
    outb(&m.io, ports::COM1 + 1, 0x01); // IER: received data available

    assert_eq!(m.console.lock().unwrap().enqueue_input(b"k").unwrap(), 1);

    assert_eq!(m.com1_irq.count(), 1);
    assert_eq!(inb(&m.io, ports::COM1), b'k');
}

#[test]
fn reset_command_on_port_0x64_requests_a_reset() {
    let m = machine();
    outb(&m.io, 0x64, 0xfe);
    assert_eq!(m.power.requests(), [PowerRequest::Reset]);
}

#[test]
fn i8042_status_and_speaker_ports_read_as_documented() {
    let m = machine();
    assert_eq!(inb(&m.io, 0x64), I8042Reset::STATUS);
    assert_eq!(inb(&m.io, 0x61), 0);
}

#[test]
fn exit_port_passes_the_status_through() {
    let m = machine();
    outb(&m.io, ports::EXIT_PORT, 0x31);
    assert_eq!(m.power.last(), Some(PowerRequest::Exit(0x31)));
}

#[test]
fn wide_accesses_inside_a_device_do_not_panic() {
    let m = machine();
    let mut dword = [0u8; 4];
    m.io.pio_read(PioAddress(ports::COM1), &mut dword).unwrap();
    assert_eq!(dword, [0xff; 4]);
    m.io.pio_write(PioAddress(ports::COM1), &[1, 2]).unwrap();
    m.io.pio_write(PioAddress(0x60), &[0xfe, 0xfe, 0xfe, 0xfe])
        .unwrap();
    assert!(m.console.lock().unwrap().output().is_empty());
    assert_eq!(m.power.requests(), []);
}

#[test]
fn accesses_straddling_a_device_end_or_unclaimed_ports_are_bus_errors() {
    let m = machine();
    // 0x3fe..0x401 runs past COM1's last port.
    let mut dword = [0u8; 4];
    assert_eq!(
        m.io.pio_read(PioAddress(ports::COM1 + 6), &mut dword),
        Err(bus::Error::DeviceNotFound)
    );
    // Nobody is at COM2.
    assert_eq!(
        m.io.pio_write(PioAddress(ports::COM2), b"x"),
        Err(bus::Error::DeviceNotFound)
    );
    // Zero-length accesses are refused by the bus itself.
    assert!(m.io.pio_write(PioAddress(ports::COM1), &[]).is_err());
    assert!(m.console.lock().unwrap().output().is_empty());
}

#[test]
fn every_port_and_access_size_is_safe() {
    let m = machine();
    for port in 0..=u16::MAX {
        for len in [1, 2, 4] {
            let mut data = vec![0u8; len];
            let _ = m.io.pio_read(PioAddress(port), &mut data);
            // Skip the two ports whose 1-byte writes stop the machine; wide
            // writes to them must still do nothing.
            if len == 1 && (port == 0x64 || port == ports::EXIT_PORT) {
                continue;
            }
            let _ = m.io.pio_write(PioAddress(port), &data);
        }
    }
    assert_eq!(m.power.requests(), []);
}
