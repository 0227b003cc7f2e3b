//! The VM's PCI bus: a host bridge reached through the ECAM window and
//! ports 0xCF8–0xCFF, BARs allocated from the 32-bit and 64-bit windows,
//! and virtio devices on it as virtio-pci functions with MSI-X.

use std::sync::{Arc, Mutex};

use keel_irq::{GsiRouting, IrqfdMsiVectors};
use keel_memory::{
    GuestLayout, GuestMemoryMmap, PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO32_END, PCI_MMIO32_START,
};
use keel_pci::{BarAllocator, PciAddress, PciBus, PciConfigPorts, PciEcam, PciMemoryWindow};
use keel_virtio::{PciTransport, VirtioDevice};
use kvm_ioctls::VmFd;
use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};

use crate::{Error, Result};

/// The bus while devices are added, then put on the VM's I/O buses.
pub(crate) struct PciWiring {
    bus: PciBus,
    bars: BarAllocator,
    windows: [(u64, u64); 2],
    routing: GsiRouting,
}

impl PciWiring {
    /// A bus with only the host bridge, BARs from `layout`'s windows, MSI
    /// routes in `routing` (shared with the IOAPIC).
    pub fn new(layout: &GuestLayout, routing: GsiRouting) -> Result<Self> {
        let low = (PCI_MMIO32_START, PCI_MMIO32_END - PCI_MMIO32_START);
        let high = layout.pci_mmio64_window();
        let bars =
            BarAllocator::new(low, high).map_err(|e| Error::DeviceRange(format!("PCI windows: {e}")))?;
        Ok(Self {
            bus: PciBus::new(PCI_ECAM_START, &[low, high]),
            bars,
            windows: [low, high],
            routing,
        })
    }

    /// Puts `device` on the bus as a virtio-pci function: MSI-X vectors on
    /// irqfds with routes in the VM's table, queue notifications on
    /// ioeventfds that follow its BAR.
    pub fn add_virtio(
        &mut self,
        what: &str,
        device: Arc<Mutex<dyn VirtioDevice>>,
        vm_fd: &Arc<VmFd>,
        mem: &GuestMemoryMmap,
    ) -> Result<(Arc<Mutex<PciTransport>>, PciAddress)> {
        let place = |e: String| Error::DeviceRange(format!("{what}: {e}"));
        let count = PciTransport::vectors_needed(&*device.lock().unwrap_or_else(|e| e.into_inner()));
        let vectors = IrqfdMsiVectors::new(vm_fd, &self.routing, count)?;
        let transport = PciTransport::new(device, mem.clone(), Arc::new(vectors), Box::new(vm_fd.clone()))
            .map_err(|e| place(e.to_string()))?;
        let transport = Arc::new(Mutex::new(transport));
        let address = self
            .bus
            .add_device(transport.clone(), &mut self.bars)
            .map_err(|e| place(e.to_string()))?;
        log::debug!("{what}: virtio-pci at {address}, {count} MSI-X vectors");
        Ok((transport, address))
    }

    /// Registers the ECAM window, the configuration ports and the memory
    /// windows on `io`; returns the bus.
    pub fn register(self, io: &mut IoManager) -> Result<Arc<PciBus>> {
        let bus = Arc::new(self.bus);
        let range = |base: u64, size: u64| {
            MmioRange::new(MmioAddress(base), size)
                .map_err(|e| Error::DeviceRange(format!("PCI window at {base:#x} ({size:#x} bytes): {e:?}")))
        };
        io.register_mmio(
            range(PCI_ECAM_START, PCI_ECAM_SIZE)?,
            Arc::new(PciEcam(bus.clone())),
        )
        .map_err(|e| Error::DeviceRange(format!("PCI ECAM window: {e}")))?;
        for (base, size) in self.windows {
            io.register_mmio(range(base, size)?, Arc::new(PciMemoryWindow(bus.clone())))
                .map_err(|e| Error::DeviceRange(format!("PCI memory window at {base:#x}: {e}")))?;
        }
        let ports = PioRange::new(PioAddress(keel_pci::CONFIG_ADDRESS_PORT), keel_pci::CONFIG_PORTS)
            .map_err(|e| Error::DeviceRange(format!("PCI configuration ports: {e:?}")))?;
        io.register_pio(ports, Arc::new(PciConfigPorts(bus.clone())))
            .map_err(|e| Error::DeviceRange(format!("PCI configuration ports: {e}")))?;
        Ok(bus)
    }
}
