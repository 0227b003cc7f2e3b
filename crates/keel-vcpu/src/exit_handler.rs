//! Where a vCPU sends the port and MMIO accesses KVM hands back to user
//! space.

use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};

/// Handles the I/O exits of a vCPU. Implementations are shared by all vCPUs
/// of a VM, so they take `&self`.
///
/// Reads of addresses nobody decodes should return all ones, as an
/// unclaimed bus does on a PC.
pub trait ExitHandler {
    /// An `in` from `port`; fill `data`.
    fn pio_read(&self, port: u16, data: &mut [u8]);
    /// An `out` of `data` to `port`.
    fn pio_write(&self, port: u16, data: &[u8]);
    /// A read at guest physical `addr` outside RAM; fill `data`.
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    /// A write at guest physical `addr` outside RAM.
    fn mmio_write(&self, addr: u64, data: &[u8]);
    /// With a split irqchip (IOAPIC in user space), the guest's local APIC
    /// acknowledged `vector`, which KVM was told is a level-triggered IOAPIC
    /// vector (`KVM_EXIT_IOAPIC_EOI`): the user-space IOAPIC clears its
    /// remote IRR. Nothing to do for a VM without one.
    fn ioapic_eoi(&self, vector: u8) {
        let _ = vector;
    }
}

/// `vm-device`'s bus manager routes exits to the device registered for the
/// address.
impl ExitHandler for IoManager {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        if PioManager::pio_read(self, PioAddress(port), data).is_err() {
            log::trace!("unclaimed port read {port:#x} ({} bytes)", data.len());
            data.fill(0xff);
        }
    }

    fn pio_write(&self, port: u16, data: &[u8]) {
        if PioManager::pio_write(self, PioAddress(port), data).is_err() {
            log::trace!("unclaimed port write {port:#x} ({} bytes)", data.len());
        }
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if MmioManager::mmio_read(self, MmioAddress(addr), data).is_err() {
            log::trace!("unclaimed MMIO read {addr:#x} ({} bytes)", data.len());
            data.fill(0xff);
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if MmioManager::mmio_write(self, MmioAddress(addr), data).is_err() {
            log::trace!("unclaimed MMIO write {addr:#x} ({} bytes)", data.len());
        }
    }
}

impl<T: ExitHandler + ?Sized> ExitHandler for std::sync::Arc<T> {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        (**self).pio_read(port, data)
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        (**self).pio_write(port, data)
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        (**self).mmio_read(addr, data)
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        (**self).mmio_write(addr, data)
    }
    fn ioapic_eoi(&self, vector: u8) {
        (**self).ioapic_eoi(vector)
    }
}
