//! The handle a device raises its interrupt through.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::{Error, Result};

/// An interrupt line a device can raise: what devices get instead of a
/// `VmFd`.
///
/// A device calls [`trigger`](Self::trigger) when it wants the guest's
/// attention (a 16550's transmitter became empty, a virtio queue has used
/// buffers). Who is behind the line — a KVM irqfd in a VMM, a
/// [`RecordingLine`] in a test — is not the device's business.
///
/// # Semantics
///
/// A trigger is an **edge**: one pulse on the line (asserted, then
/// deasserted), which is how the ISA devices on the PIC/IOAPIC path signal.
/// Triggering again before the guest has serviced the interrupt may be
/// coalesced into one interrupt by the interrupt controller, as on hardware;
/// devices keep their own "why did I interrupt" state (a 16550's IIR) for the
/// guest to read. Level-triggered lines with resampling (PCI INTx) and MSI
/// messages come later, as other implementations of this trait or siblings
/// of it.
///
/// Implementations must be cheap and non-blocking: devices trigger from vCPU
/// threads while holding their own lock.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use keel_irq::{InterruptLine, RecordingLine};
///
/// struct Doorbell {
///     irq: Arc<dyn InterruptLine>,
/// }
///
/// impl Doorbell {
///     fn ring(&self) -> keel_irq::Result<()> {
///         self.irq.trigger()
///     }
/// }
///
/// let line = Arc::new(RecordingLine::new());
/// let doorbell = Doorbell { irq: line.clone() };
/// doorbell.ring().unwrap();
/// assert_eq!(line.count(), 1);
/// ```
pub trait InterruptLine: Send + Sync + std::fmt::Debug {
    /// Raises the interrupt once (one edge).
    fn trigger(&self) -> Result<()>;

    /// The eventfd that raises this interrupt when written, if there is one.
    ///
    /// Lets a VMM hand the line to something outside its process — a vhost
    /// backend, another thread's `epoll` — that signals the guest directly.
    fn eventfd(&self) -> Option<&EventFd> {
        None
    }
}

/// An [`InterruptLine`] backed by a KVM irqfd: an eventfd that KVM watches
/// and turns into an edge on a GSI: a pin of the in-kernel IOAPIC
/// ([`crate::create_in_kernel_irqchip`]), or, with a split irqchip
/// ([`crate::enable_split_irqchip`]), the MSI route [`crate::Ioapic`]
/// installed for that pin (none while the guest keeps the pin masked: the
/// edge is then dropped, as a real IOAPIC drops an edge on a masked pin).
///
/// Triggering costs one `write(2)` and never involves a vCPU thread.
///
/// Dropping the line closes its eventfd, and KVM detaches the irqfd when that
/// happens; a copy of the fd made from [`eventfd`](InterruptLine::eventfd)
/// keeps it attached.
///
/// # Example
///
/// ```
/// use keel_irq::{create_in_kernel_irqchip, InterruptLine, IrqfdLine};
///
/// let vm = kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap();
/// create_in_kernel_irqchip(&vm).unwrap();
/// let line = IrqfdLine::new(&vm, 5).unwrap();
/// line.trigger().unwrap();
/// ```
#[derive(Debug)]
pub struct IrqfdLine {
    gsi: u32,
    eventfd: EventFd,
}

impl IrqfdLine {
    /// Creates a non-blocking eventfd and attaches it to `gsi` with
    /// `KVM_IRQFD`.
    pub fn new(vm: &VmFd, gsi: u32) -> Result<Self> {
        let eventfd =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|source| Error::CreateEventFd { gsi, source })?;
        vm.register_irqfd(&eventfd, gsi)
            .map_err(|source| Error::RegisterIrqfd { gsi, source })?;
        log::debug!("irqfd attached to GSI {gsi}");
        Ok(Self { gsi, eventfd })
    }

    /// The GSI this line raises.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }
}

impl InterruptLine for IrqfdLine {
    fn trigger(&self) -> Result<()> {
        self.eventfd.write(1).map_err(|source| Error::Trigger {
            gsi: self.gsi,
            source,
        })
    }

    fn eventfd(&self) -> Option<&EventFd> {
        Some(&self.eventfd)
    }
}

/// A test double for [`InterruptLine`]: counts triggers, and can be told to
/// fail so tests can check how a device copes.
///
/// # Example
///
/// ```
/// use keel_irq::{InterruptLine, RecordingLine};
///
/// let line = RecordingLine::new();
/// line.trigger().unwrap();
/// line.set_failing(true);
/// assert!(line.trigger().is_err());
/// assert_eq!(line.count(), 1); // failed triggers are not counted
/// ```
#[derive(Debug, Default)]
pub struct RecordingLine {
    triggers: AtomicU64,
    failing: AtomicBool,
}

impl RecordingLine {
    /// A line that has not been triggered and does not fail.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many triggers succeeded so far.
    pub fn count(&self) -> u64 {
        self.triggers.load(Ordering::SeqCst)
    }

    /// From now on, make [`trigger`](InterruptLine::trigger) fail with
    /// [`Error::InjectedFailure`] (`true`) or succeed again (`false`).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }
}

impl InterruptLine for RecordingLine {
    fn trigger(&self) -> Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(Error::InjectedFailure);
        }
        self.triggers.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use kvm_bindings::{kvm_irqchip, KVM_IRQCHIP_PIC_MASTER};
    use kvm_ioctls::Kvm;

    use super::*;
    use crate::{create_in_kernel_irqchip, GsiAllocator};

    fn vm_with_irqchip() -> VmFd {
        let vm = Kvm::new().unwrap().create_vm().unwrap();
        create_in_kernel_irqchip(&vm).unwrap();
        vm
    }

    fn master_pic_irr(vm: &VmFd) -> u8 {
        let mut chip = kvm_irqchip {
            chip_id: KVM_IRQCHIP_PIC_MASTER,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip).unwrap();
        // SAFETY: for KVM_IRQCHIP_PIC_MASTER, KVM fills the `pic` member of
        // the union, and every bit pattern is a valid `kvm_pic_state`.
        unsafe { chip.chip.pic.irr }
    }

    #[test]
    fn irqfd_line_trigger_raises_its_gsi_on_the_pic() {
        let vm = vm_with_irqchip();
        let gsi = GsiAllocator::new().allocate().unwrap();
        let line = IrqfdLine::new(&vm, gsi).unwrap();
        assert_eq!(master_pic_irr(&vm) & (1 << gsi), 0);

        line.trigger().unwrap();

        // KVM injects irqfd edges from a kernel worker, so give it a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        while master_pic_irr(&vm) & (1 << gsi) == 0 {
            assert!(Instant::now() < deadline, "GSI {gsi} never reached the PIC");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn irqfd_line_exposes_the_registered_eventfd() {
        let vm = vm_with_irqchip();
        let line = IrqfdLine::new(&vm, 9).unwrap();
        assert_eq!(line.gsi(), 9);

        // KVM knows this eventfd already: attaching it again is refused.
        let fd = line.eventfd().expect("an irqfd line has an eventfd");
        assert!(vm.register_irqfd(fd, 9).is_err());
    }

    #[test]
    fn irqfd_line_requires_an_in_kernel_irqchip() {
        let vm = Kvm::new().unwrap().create_vm().unwrap();
        let err = IrqfdLine::new(&vm, 5).unwrap_err();
        assert!(matches!(err, Error::RegisterIrqfd { gsi: 5, .. }), "{err:?}");
        assert!(err.to_string().contains("GSI 5"), "{err}");
    }

    #[test]
    fn irqfd_line_works_as_a_shared_trait_object() {
        let vm = vm_with_irqchip();
        let line: Arc<dyn InterruptLine> = Arc::new(IrqfdLine::new(&vm, 10).unwrap());
        let from_another_thread = line.clone();
        std::thread::spawn(move || from_another_thread.trigger().unwrap())
            .join()
            .unwrap();
        assert!(line.eventfd().is_some());
    }

    #[test]
    fn recording_line_counts_triggers() {
        let line = RecordingLine::new();
        assert_eq!(line.count(), 0);
        line.trigger().unwrap();
        line.trigger().unwrap();
        assert_eq!(line.count(), 2);
        assert!(line.eventfd().is_none());
    }

    #[test]
    fn recording_line_fails_on_request_and_recovers() {
        let line = RecordingLine::new();
        line.set_failing(true);
        let err = line.trigger().unwrap_err();
        assert!(matches!(err, Error::InjectedFailure), "{err:?}");
        assert_eq!(line.count(), 0);

        line.set_failing(false);
        line.trigger().unwrap();
        assert_eq!(line.count(), 1);
    }
}
