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
