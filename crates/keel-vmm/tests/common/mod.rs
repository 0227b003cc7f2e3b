//! What the KVM tests of this crate share.

use std::io::Write;
use std::sync::{Arc, Mutex};

/// Serial output captured in memory; clones share the buffer.
#[derive(Clone, Default)]
pub struct Serial(Arc<Mutex<Vec<u8>>>);

impl Write for Serial {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Serial {
    /// Everything written so far, as text, without carriage returns.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).replace('\r', "")
    }
}

/// Runs `builder`'s guest with `cmdline` to its end with its serial
/// console captured; returns how it ended and what it printed. A guest
/// still running after `timeout` is stopped and fails the test.
// Not every test binary that shares this module runs guests this way.
#[allow(dead_code)]
pub fn run_guest(
    builder: keel_vmm::VmBuilder,
    cmdline: &str,
    timeout: std::time::Duration,
) -> (keel_vmm::Result<keel_vmm::ExitReason>, String) {
    let console = Serial::default();
    let handle = builder
        .cmdline(cmdline)
        .serial_output(console.clone())
        .build()
        .unwrap()
        .start()
        .unwrap();
    match handle.wait_timeout(timeout) {
        Ok(result) => (result, console.text()),
        Err(handle) => {
            handle.stop_handle().stop();
            panic!("guest `{cmdline}` hung; console:\n{}", console.text());
        }
    }
}

/// Turns each listed function `NAME(transport: VirtioTransport)` into two
/// tests, `NAME::mmio` and `NAME::pci`: every device test runs over both
/// virtio transports.
#[macro_export]
macro_rules! over_both_transports {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn mmio() {
                super::$name(keel_vmm::VirtioTransport::Mmio)
            }
            #[test]
            fn pci() {
                super::$name(keel_vmm::VirtioTransport::Pci)
            }
        }
    )*};
}
