//! One GSI routing table for the whole VM: the IOAPIC's routes and the MSI
//! routes of PCI devices, merged.
//!
//! `KVM_SET_GSI_ROUTING` replaces KVM's **whole** routing table. Two parts of
//! a VMM want routes in it: the interrupt controller (the in-kernel IOAPIC
//! and PIC, whose default routes KVM installs at `KVM_CREATE_IRQCHIP`, or
//! Keel's user-space [`crate::Ioapic`] with a split irqchip) and every MSI-X
//! vector of every PCI device. If each installed its own table, the last
//! one would silently drop the others' routes. [`GsiRouting`] keeps the
//! parts apart, merges them and installs the merged table whenever a part
//! changes:
//!
//! - the **base**: in kernel-irqchip mode, the default routes KVM made for
//!   its PIC and IOAPIC (GSI 0–15 to both, 16–23 to the IOAPIC); none with a
//!   split irqchip;
//! - the **IOAPIC's routes**, with a split irqchip: [`GsiRouting`] is the
//!   [`MsiRouter`] the [`crate::Ioapic`] installs through;
//! - **MSI routes**: one GSI per MSI-X vector, from
//!   [`allocate_msi_gsi`](GsiRouting::allocate_msi_gsi) (24 and up), pointed
//!   at a message with [`set_msi_route`](GsiRouting::set_msi_route).
//!
//! [`IrqfdMsiVectors`] puts an irqfd on each MSI GSI of a device, so a
//! device raises a vector with one `write(2)`, as an [`crate::IrqfdLine`]
//! raises a pin.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_irqchip, kvm_irq_routing_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::{Error, MsiRoute, MsiRouter, Result, IOAPIC_PINS};

/// The first GSI handed out for MSI routes: the ones below belong to the
/// IOAPIC's pins in both irqchip modes.
pub const FIRST_MSI_GSI: u32 = IOAPIC_PINS;

/// One past the last GSI handed out for MSI routes. KVM accepts up to
/// `KVM_MAX_IRQ_ROUTES` (4096) entries; 1024 MSI vectors is far more than a
/// VM with a few dozen devices needs, and keeps every table rewrite small.
pub const MSI_GSI_END: u32 = FIRST_MSI_GSI + 1024;

/// An MSI message: what a device writes, and where, to interrupt a CPU
/// (Intel format; see [`MsiRoute`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MsiMessage {
    /// The message address (`0xfee0_0000 | destination << 12 | ...`).
    pub address: u64,
    /// The message data (vector in bits 0–7, delivery mode in 8–10, ...).
    pub data: u32,
}

/// One entry of a GSI routing table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GsiRoute {
    /// Raising `gsi` asserts `pin` of an in-kernel interrupt controller
    /// (`KVM_IRQCHIP_PIC_MASTER`, `_PIC_SLAVE` or `_IOAPIC`).
    Irqchip {
        /// The GSI.
        gsi: u32,
        /// The in-kernel chip.
        chip: u32,
        /// The pin on that chip.
        pin: u32,
    },
    /// Raising the GSI sends an MSI.
    Msi(MsiRoute),
}

impl GsiRoute {
    /// The GSI this entry routes.
    pub fn gsi(&self) -> u32 {
        match self {
            GsiRoute::Irqchip { gsi, .. } => *gsi,
            GsiRoute::Msi(route) => route.gsi,
        }
    }
}

/// The routes KVM sets up for its in-kernel PIC and IOAPIC at
/// `KVM_CREATE_IRQCHIP` (`kvm_setup_default_irq_routing`): GSI 0–7 to the
/// master PIC, 8–15 to the slave, and 0–23 to the IOAPIC pin of the same
/// number.
pub fn default_irqchip_routes() -> Vec<GsiRoute> {
    let mut routes = Vec::with_capacity(40);
    for gsi in 0..IOAPIC_PINS {
        if gsi < 16 {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            routes.push(GsiRoute::Irqchip {
                gsi,
                chip,
                pin: gsi % 8,
            });
        }
        routes.push(GsiRoute::Irqchip {
            gsi,
            chip: KVM_IRQCHIP_IOAPIC,
            pin: gsi,
        });
    }
    routes
}

/// Something that installs a complete GSI routing table, replacing the one
/// before: `KVM_SET_GSI_ROUTING` for a real VM ([`Arc<VmFd>`]), a
/// [`RecordingRoutes`] in tests.
pub trait RouteInstaller: Send + Sync {
    /// Replaces the routing table with `routes`.
    fn install(&self, routes: &[GsiRoute]) -> std::io::Result<()>;
}

/// Builds `KVM_SET_GSI_ROUTING`'s argument from `routes`.
pub(crate) fn kvm_routing_table(routes: &[GsiRoute]) -> std::io::Result<KvmIrqRouting> {
    let mut table = KvmIrqRouting::new(routes.len()).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "cannot build a GSI routing table of {} routes: {e:?}",
                routes.len()
            ),
        )
    })?;
    for (entry, route) in table.as_mut_slice().iter_mut().zip(routes) {
        match *route {
            GsiRoute::Irqchip { gsi, chip, pin } => {
                *entry = kvm_irq_routing_entry {
                    gsi,
                    type_: KVM_IRQ_ROUTING_IRQCHIP,
                    ..Default::default()
                };
                entry.u.irqchip = kvm_irq_routing_irqchip { irqchip: chip, pin };
            }
            GsiRoute::Msi(msi) => {
                *entry = kvm_irq_routing_entry {
                    gsi: msi.gsi,
                    type_: KVM_IRQ_ROUTING_MSI,
                    ..Default::default()
                };
                entry.u.msi = kvm_irq_routing_msi {
                    address_lo: msi.address as u32,
                    address_hi: (msi.address >> 32) as u32,
                    data: msi.data,
                    ..Default::default()
                };
            }
        }
    }
    Ok(table)
}

/// `KVM_SET_GSI_ROUTING`.
impl RouteInstaller for Arc<VmFd> {
    fn install(&self, routes: &[GsiRoute]) -> std::io::Result<()> {
        self.set_gsi_routing(&kvm_routing_table(routes)?)?;
        Ok(())
    }
}

/// A test double for [`RouteInstaller`]: remembers the last table and
/// counts installs; can be told to fail. Clones share their records.
#[derive(Clone, Debug, Default)]
pub struct RecordingRoutes {
    inner: Arc<Mutex<RecordedRoutes>>,
}

#[derive(Debug, Default)]
struct RecordedRoutes {
    routes: Vec<GsiRoute>,
    installs: usize,
    failing: bool,
}

impl RecordingRoutes {
    /// An installer that has installed nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The last table successfully installed.
    pub fn routes(&self) -> Vec<GsiRoute> {
        lock(&self.inner).routes.clone()
    }

    /// How many tables were successfully installed.
    pub fn installs(&self) -> usize {
        lock(&self.inner).installs
    }

    /// From now on fail every install (`true`) or succeed again (`false`).
    pub fn set_failing(&self, failing: bool) {
        lock(&self.inner).failing = failing;
    }
}

impl RouteInstaller for RecordingRoutes {
    fn install(&self, routes: &[GsiRoute]) -> std::io::Result<()> {
        let mut recorded = lock(&self.inner);
        if recorded.failing {
            return Err(std::io::Error::other(
                "RecordingRoutes was set to fail (RecordingRoutes::set_failing)",
            ));
        }
        recorded.routes = routes.to_vec();
        recorded.installs = recorded.installs.saturating_add(1);
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

struct RoutingState {
    installer: Arc<dyn RouteInstaller>,
    base: Vec<GsiRoute>,
    ioapic: Vec<MsiRoute>,
    /// Indexed by `gsi - FIRST_MSI_GSI`; `None`: allocated, no route yet.
    msi: Vec<Option<MsiMessage>>,
    /// Whether the table KVM holds is the merge of the parts above (false
    /// after a failed install, so the next change retries).
    installed: bool,
    install_errors: u64,
}

impl RoutingState {
    fn merged(&self) -> Vec<GsiRoute> {
        let mut routes = self.base.clone();
        routes.extend(self.ioapic.iter().copied().map(GsiRoute::Msi));
        routes.extend(self.msi.iter().zip(FIRST_MSI_GSI..).filter_map(|(message, gsi)| {
            message.map(|m| {
                GsiRoute::Msi(MsiRoute {
                    gsi,
                    address: m.address,
                    data: m.data,
                })
            })
        }));
        routes
    }

    fn install(&mut self) -> std::io::Result<()> {
        let routes = self.merged();
        match self.installer.install(&routes) {
            Ok(()) => {
                self.installed = true;
                log::debug!("GSI routing: {} routes installed", routes.len());
                Ok(())
            }
            Err(e) => {
                self.installed = false;
                self.install_errors = self.install_errors.saturating_add(1);
                keel_ratelimit::warn_limited!("cannot install {} GSI routes: {e}", routes.len());
                Err(e)
            }
        }
    }
}

/// A VM's GSI routing table, merged from its parts: the base (the
/// in-kernel irqchip's default routes, in kernel mode), the IOAPIC's routes
/// (split mode) and MSI routes. Clones share the table: give one to the
/// [`crate::Ioapic`] as its [`MsiRouter`] and others to the PCI devices'
/// [`IrqfdMsiVectors`].
///
/// # Example
///
/// ```
/// use keel_irq::{GsiRoute, GsiRouting, Ioapic, MsiMessage, MsiRoute, RecordingRoutes};
///
/// let kvm = RecordingRoutes::new(); // KVM_SET_GSI_ROUTING in a real VMM
/// let routing = GsiRouting::split(kvm.clone());
/// let mut ioapic = Ioapic::new(routing.clone());
///
/// // A PCI device's MSI-X vector gets GSI 24 and the message its driver wrote.
/// let gsi = routing.allocate_msi_gsi().unwrap();
/// routing.set_msi_route(gsi, Some(MsiMessage { address: 0xfee0_0000, data: 0x41 })).unwrap();
/// // The guest unmasks IOAPIC pin 5 (vector 0x31): both routes stay.
/// ioapic.write(0x00, &0x1au32.to_le_bytes());
/// ioapic.write(0x10, &0x31u32.to_le_bytes());
/// assert_eq!(
///     kvm.routes(),
///     [
///         GsiRoute::Msi(MsiRoute { gsi: 5, address: 0xfee0_0000, data: 0x31 }),
///         GsiRoute::Msi(MsiRoute { gsi: 24, address: 0xfee0_0000, data: 0x41 }),
///     ]
/// );
/// ```
#[derive(Clone)]
pub struct GsiRouting {
    state: Arc<Mutex<RoutingState>>,
}

impl fmt::Debug for GsiRouting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = lock(&self.state);
        f.debug_struct("GsiRouting")
            .field("base", &state.base.len())
            .field("ioapic", &state.ioapic.len())
            .field("msi_gsis", &state.msi.len())
            .field("installed", &state.installed)
            .finish_non_exhaustive()
    }
}

impl GsiRouting {
    /// The table of a VM with a split irqchip
    /// ([`crate::enable_split_irqchip`]): no base routes, the IOAPIC's
    /// routes come from a [`crate::Ioapic`] using this as its router.
    /// Installs nothing yet (KVM's table starts empty in this mode).
    pub fn split(installer: impl RouteInstaller + 'static) -> Self {
        Self::with_base(Arc::new(installer), Vec::new(), true)
    }

    /// The table of a VM with KVM's in-kernel irqchip
    /// ([`crate::create_in_kernel_irqchip`]): its default PIC and IOAPIC
    /// routes ([`default_irqchip_routes`]) are the base and are kept in
    /// every table installed. Installs nothing yet: KVM already holds those
    /// routes.
    pub fn kernel(installer: impl RouteInstaller + 'static) -> Self {
        Self::with_base(Arc::new(installer), default_irqchip_routes(), true)
    }

    fn with_base(installer: Arc<dyn RouteInstaller>, base: Vec<GsiRoute>, installed: bool) -> Self {
        Self {
            state: Arc::new(Mutex::new(RoutingState {
                installer,
                base,
                ioapic: Vec::new(),
                msi: Vec::new(),
                installed,
                install_errors: 0,
            })),
        }
    }

    /// Takes the next free GSI for an MSI route, from [`FIRST_MSI_GSI`] up.
    /// It has no route until [`set_msi_route`](Self::set_msi_route).
    pub fn allocate_msi_gsi(&self) -> Result<u32> {
        let mut state = lock(&self.state);
        let Some(gsi) = u32::try_from(state.msi.len())
            .ok()
            .and_then(|n| FIRST_MSI_GSI.checked_add(n))
            .filter(|&gsi| gsi < MSI_GSI_END)
        else {
            return Err(Error::MsiGsiExhausted {
                first: FIRST_MSI_GSI,
                end: MSI_GSI_END,
            });
        };
        state.msi.push(None);
        Ok(gsi)
    }

    /// Points MSI GSI `gsi` at `message` (`None`: no route, KVM then drops
    /// what is raised on it) and installs the merged table if that changed
    /// anything or the last install failed.
    pub fn set_msi_route(&self, gsi: u32, message: Option<MsiMessage>) -> Result<()> {
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        let slot = gsi
            .checked_sub(FIRST_MSI_GSI)
            .and_then(|i| state.msi.get_mut(i as usize))
            .ok_or(Error::MsiGsiNotAllocated { gsi })?;
        if *slot == message && state.installed {
            return Ok(());
        }
        *slot = message;
        state
            .install()
            .map_err(|source| Error::SetGsiRouting { gsi, source })
    }

    /// The merged table, as last computed from the parts (what KVM holds
    /// unless [`install_errors`](Self::install_errors) grew since).
    pub fn routes(&self) -> Vec<GsiRoute> {
        lock(&self.state).merged()
    }

    /// How many installs failed so far.
    pub fn install_errors(&self) -> u64 {
        lock(&self.state).install_errors
    }
}

/// The IOAPIC's part of the table: replaces the IOAPIC's routes and
/// installs the merged table (the IOAPIC only calls when its routes
/// changed).
impl MsiRouter for GsiRouting {
    fn set_msi_routes(&self, routes: &[MsiRoute]) -> std::io::Result<()> {
        let mut state = lock(&self.state);
        state.ioapic = routes.to_vec();
        state.install()
    }
}

/// The MSI vectors of one device: what an MSI-X capability needs from the
/// interrupt layer, as an [`crate::InterruptLine`] is what a pin-based
/// device needs.
///
/// Vector `v` is raised with [`trigger`](Self::trigger)`(v)`; where it goes
/// is set with [`set_message`](Self::set_message) (`None`: nowhere). The
/// capability decides masking and pending bits itself and only triggers a
/// vector the guest left unmasked.
pub trait MsiVectors: Send + Sync + fmt::Debug {
    /// How many vectors there are (0..count).
    fn count(&self) -> u16;

    /// Points `vector` at `message`, or at nothing.
    fn set_message(&self, vector: u16, message: Option<MsiMessage>) -> Result<()>;

    /// Sends `vector`'s message once.
    fn trigger(&self, vector: u16) -> Result<()>;
}

/// [`MsiVectors`] on KVM: one MSI GSI of a [`GsiRouting`] per vector, with
/// an irqfd on it, so triggering costs one `write(2)` and KVM delivers the
/// message without a VMM thread in between.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use keel_irq::{enable_split_irqchip, GsiRouting, IrqfdMsiVectors, MsiMessage, MsiVectors};
///
/// let vm = kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap();
/// enable_split_irqchip(&vm).unwrap();
/// let vm = Arc::new(vm);
/// let routing = GsiRouting::split(vm.clone());
/// let vectors = IrqfdMsiVectors::new(&vm, &routing, 2).unwrap();
/// vectors.set_message(1, Some(MsiMessage { address: 0xfee0_0000, data: 0x45 })).unwrap();
/// vectors.trigger(1).unwrap(); // vector 0x45 to APIC ID 0
/// ```
pub struct IrqfdMsiVectors {
    routing: GsiRouting,
    /// (GSI, irqfd) per vector.
    vectors: Vec<(u32, EventFd)>,
}

impl fmt::Debug for IrqfdMsiVectors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IrqfdMsiVectors")
            .field(
                "gsis",
                &self.vectors.iter().map(|(gsi, _)| gsi).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl IrqfdMsiVectors {
    /// Allocates `count` MSI GSIs in `routing` and attaches an eventfd to
    /// each with `KVM_IRQFD`.
    pub fn new(vm: &VmFd, routing: &GsiRouting, count: u16) -> Result<Self> {
        let mut vectors = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let gsi = routing.allocate_msi_gsi()?;
            let eventfd =
                EventFd::new(libc::EFD_NONBLOCK).map_err(|source| Error::CreateEventFd { gsi, source })?;
            vm.register_irqfd(&eventfd, gsi)
                .map_err(|source| Error::RegisterIrqfd { gsi, source })?;
            vectors.push((gsi, eventfd));
        }
        log::debug!(
            "{count} MSI vectors on GSIs {:?}",
            vectors.first().map(|v| v.0)..vectors.last().map(|v| v.0.saturating_add(1))
        );
        Ok(Self {
            routing: routing.clone(),
            vectors,
        })
    }

    /// The GSI behind `vector`.
    pub fn gsi(&self, vector: u16) -> Option<u32> {
        self.vectors.get(usize::from(vector)).map(|v| v.0)
    }
}

impl MsiVectors for IrqfdMsiVectors {
    fn count(&self) -> u16 {
        // new() made at most u16::MAX.
        self.vectors.len() as u16
    }

    fn set_message(&self, vector: u16, message: Option<MsiMessage>) -> Result<()> {
        let (gsi, _) = self.vectors.get(usize::from(vector)).ok_or(Error::NoSuchVector {
            vector,
            count: self.count(),
        })?;
        self.routing.set_msi_route(*gsi, message)
    }

    fn trigger(&self, vector: u16) -> Result<()> {
        let (gsi, eventfd) = self.vectors.get(usize::from(vector)).ok_or(Error::NoSuchVector {
            vector,
            count: self.count(),
        })?;
        eventfd
            .write(1)
            .map_err(|source| Error::Trigger { gsi: *gsi, source })
    }
}

/// A test double for [`MsiVectors`]: remembers each vector's message and
/// every trigger, in order.
///
/// # Example
///
/// ```
/// use keel_irq::{MsiMessage, MsiVectors, RecordingMsiVectors};
///
/// let vectors = RecordingMsiVectors::new(2);
/// vectors.set_message(0, Some(MsiMessage { address: 0xfee0_0000, data: 0x30 })).unwrap();
/// vectors.trigger(0).unwrap();
/// assert_eq!(vectors.triggers(), [0]);
/// assert!(vectors.trigger(2).is_err()); // no such vector
/// ```
#[derive(Debug)]
pub struct RecordingMsiVectors {
    messages: Mutex<Vec<Option<MsiMessage>>>,
    triggers: Mutex<Vec<u16>>,
}

impl RecordingMsiVectors {
    /// `count` vectors, none pointed anywhere yet.
    pub fn new(count: u16) -> Self {
        Self {
            messages: Mutex::new(vec![None; usize::from(count)]),
            triggers: Mutex::new(Vec::new()),
        }
    }

    /// Where `vector` points (`None` also for a vector that does not exist).
    pub fn message(&self, vector: u16) -> Option<MsiMessage> {
        lock(&self.messages).get(usize::from(vector)).copied().flatten()
    }

    /// Every vector triggered so far, oldest first.
    pub fn triggers(&self) -> Vec<u16> {
        lock(&self.triggers).clone()
    }

    /// Forgets the triggers so far.
    pub fn clear_triggers(&self) {
        lock(&self.triggers).clear();
    }
}

impl MsiVectors for RecordingMsiVectors {
    fn count(&self) -> u16 {
        lock(&self.messages).len() as u16
    }

    fn set_message(&self, vector: u16, message: Option<MsiMessage>) -> Result<()> {
        let count = self.count();
        let mut messages = lock(&self.messages);
        let slot = messages
            .get_mut(usize::from(vector))
            .ok_or(Error::NoSuchVector { vector, count })?;
        *slot = message;
        Ok(())
    }

    fn trigger(&self, vector: u16) -> Result<()> {
        let count = self.count();
        if vector >= count {
            return Err(Error::NoSuchVector { vector, count });
        }
        lock(&self.triggers).push(vector);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use kvm_ioctls::Kvm;

    use super::*;
    use crate::Ioapic;

    const MESSAGE: MsiMessage = MsiMessage {
        address: 0xfee0_1000,
        data: 0x41,
    };

    fn msi(gsi: u32, message: MsiMessage) -> GsiRoute {
        GsiRoute::Msi(MsiRoute {
            gsi,
            address: message.address,
            data: message.data,
        })
    }

    /// Unmasks IOAPIC entry `pin` with `vector`, as a guest does.
    fn unmask_pin(ioapic: &mut Ioapic<GsiRouting>, pin: u8, vector: u32) {
        ioapic.write(0x00, &u32::from(0x10 + 2 * pin).to_le_bytes());
        ioapic.write(0x10, &vector.to_le_bytes());
    }

    #[test]
    fn msi_gsis_start_after_the_ioapic_pins_and_run_out_with_an_error() {
        let routing = GsiRouting::split(RecordingRoutes::new());
        assert_eq!(routing.allocate_msi_gsi().unwrap(), 24);
        assert_eq!(routing.allocate_msi_gsi().unwrap(), 25);
        for _ in 26..MSI_GSI_END {
            routing.allocate_msi_gsi().unwrap();
        }
        let err = routing.allocate_msi_gsi().unwrap_err();
        assert!(matches!(err, Error::MsiGsiExhausted { .. }), "{err:?}");
        assert!(err.to_string().contains("24..1048"), "{err}");
    }

    #[test]
    fn split_mode_merges_ioapic_and_msi_routes_whichever_changes() {
        let kvm = RecordingRoutes::new();
        let routing = GsiRouting::split(kvm.clone());
        let mut ioapic = Ioapic::new(routing.clone());
        let gsi = routing.allocate_msi_gsi().unwrap();
        routing.set_msi_route(gsi, Some(MESSAGE)).unwrap();
        assert_eq!(kvm.routes(), [msi(24, MESSAGE)]);

        unmask_pin(&mut ioapic, 5, 0x31);
        let pin5 = GsiRoute::Msi(MsiRoute {
            gsi: 5,
            address: 0xfee0_0000,
            data: 0x31,
        });
        assert_eq!(kvm.routes(), [pin5, msi(24, MESSAGE)]);

        // The vector's change keeps the IOAPIC's route, and vice versa.
        let moved = MsiMessage {
            data: 0x42,
            ..MESSAGE
        };
        routing.set_msi_route(gsi, Some(moved)).unwrap();
        assert_eq!(kvm.routes(), [pin5, msi(24, moved)]);
        unmask_pin(&mut ioapic, 5, 0x1_0031); // masked
        assert_eq!(kvm.routes(), [msi(24, moved)]);
    }

    #[test]
    fn kernel_mode_keeps_the_default_irqchip_routes() {
        let kvm = RecordingRoutes::new();
        let routing = GsiRouting::kernel(kvm.clone());
        let gsi = routing.allocate_msi_gsi().unwrap();
        routing.set_msi_route(gsi, Some(MESSAGE)).unwrap();
        let routes = kvm.routes();
        assert_eq!(routes.len(), 16 + 24 + 1);
        assert_eq!(routes.last(), Some(&msi(24, MESSAGE)));
        assert!(routes.contains(&GsiRoute::Irqchip {
            gsi: 9,
            chip: KVM_IRQCHIP_PIC_SLAVE,
            pin: 1
        }));
        assert!(routes.contains(&GsiRoute::Irqchip {
            gsi: 23,
            chip: KVM_IRQCHIP_IOAPIC,
            pin: 23
        }));
        assert!(!routes
            .iter()
            .any(|r| r.gsi() == 23
                && matches!(r, GsiRoute::Irqchip { chip, .. } if *chip != KVM_IRQCHIP_IOAPIC)));
    }

    #[test]
    fn unchanged_routes_install_nothing_and_none_withdraws_a_route() {
        let kvm = RecordingRoutes::new();
        let routing = GsiRouting::split(kvm.clone());
        let gsi = routing.allocate_msi_gsi().unwrap();
        routing.set_msi_route(gsi, Some(MESSAGE)).unwrap();
        routing.set_msi_route(gsi, Some(MESSAGE)).unwrap();
        assert_eq!(kvm.installs(), 1);
        routing.set_msi_route(gsi, None).unwrap();
        assert_eq!(kvm.installs(), 2);
        assert!(kvm.routes().is_empty());
    }

    #[test]
    fn a_failed_install_is_an_error_naming_the_gsi_and_is_retried() {
        let kvm = RecordingRoutes::new();
        let routing = GsiRouting::split(kvm.clone());
        let gsi = routing.allocate_msi_gsi().unwrap();
        kvm.set_failing(true);
        let err = routing.set_msi_route(gsi, Some(MESSAGE)).unwrap_err();
        assert!(err.to_string().contains("GSI 24"), "{err}");
        assert_eq!(routing.install_errors(), 1);
        kvm.set_failing(false);
        // Same message, but the table KVM holds is stale: installed again.
        routing.set_msi_route(gsi, Some(MESSAGE)).unwrap();
        assert_eq!(kvm.routes(), [msi(24, MESSAGE)]);
    }

    #[test]
    fn routes_for_gsis_never_allocated_are_refused() {
        let routing = GsiRouting::split(RecordingRoutes::new());
        for gsi in [0, 5, 23, 24, u32::MAX] {
            let err = routing.set_msi_route(gsi, Some(MESSAGE)).unwrap_err();
            assert!(
                matches!(err, Error::MsiGsiNotAllocated { gsi: g } if g == gsi),
                "{err:?}"
            );
        }
    }

    #[test]
    fn recording_vectors_refuse_vectors_past_the_count() {
        let vectors = RecordingMsiVectors::new(1);
        assert!(vectors.set_message(1, Some(MESSAGE)).is_err());
        assert!(vectors.trigger(u16::MAX).is_err());
        assert!(vectors.triggers().is_empty());
    }

    /// Sets up a vCPU whose local APIC is software-enabled, and returns a
    /// check for a vector's IRR bit.
    fn vcpu_with_enabled_lapic(vm: &VmFd) -> kvm_ioctls::VcpuFd {
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut lapic = vcpu.get_lapic().unwrap();
        for (reg, byte) in lapic.regs[0xf0..0xf4].iter_mut().zip(0x1ffu32.to_le_bytes()) {
            *reg = byte as i8;
        }
        vcpu.set_lapic(&lapic).unwrap();
        vcpu
    }

    fn wait_for_irr(vcpu: &kvm_ioctls::VcpuFd, vector: u32) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let lapic = vcpu.get_lapic().unwrap();
            let offset = 0x200 + (vector as usize / 32) * 0x10;
            let irr = lapic.regs[offset..offset + 4]
                .iter()
                .rev()
                .fold(0u32, |irr, &byte| (irr << 8) | u32::from(byte as u8));
            if irr & (1 << (vector % 32)) != 0 {
                return;
            }
            assert!(Instant::now() < deadline, "vector {vector:#x} never arrived");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn msi_vector_irqfd_reaches_the_local_apic_with_a_split_irqchip() {
        let vm = Kvm::new().unwrap().create_vm().unwrap();
        crate::enable_split_irqchip(&vm).unwrap();
        let vcpu = vcpu_with_enabled_lapic(&vm);
        let vm = Arc::new(vm);
        let routing = GsiRouting::split(vm.clone());
        let mut ioapic = Ioapic::new(routing.clone());
        unmask_pin(&mut ioapic, 5, 0x31);
        let vectors = IrqfdMsiVectors::new(&vm, &routing, 3).unwrap();
        assert_eq!(vectors.gsi(0), Some(24));
        vectors
            .set_message(
                2,
                Some(MsiMessage {
                    address: 0xfee0_0000,
                    data: 0x52,
                }),
            )
            .unwrap();
        vectors.trigger(2).unwrap();
        wait_for_irr(&vcpu, 0x52);
        // The IOAPIC's route survived the vector's install.
        assert_eq!(routing.routes().len(), 2);
        assert_eq!(routing.install_errors(), 0);
    }

    #[test]
    fn msi_vector_irqfd_reaches_the_local_apic_with_the_in_kernel_irqchip() {
        let vm = Kvm::new().unwrap().create_vm().unwrap();
        crate::create_in_kernel_irqchip(&vm).unwrap();
        let vcpu = vcpu_with_enabled_lapic(&vm);
        let vm = Arc::new(vm);
        let routing = GsiRouting::kernel(vm.clone());
        let vectors = IrqfdMsiVectors::new(&vm, &routing, 1).unwrap();
        vectors
            .set_message(
                0,
                Some(MsiMessage {
                    address: 0xfee0_0000,
                    data: 0x53,
                }),
            )
            .unwrap();
        vectors.trigger(0).unwrap();
        wait_for_irr(&vcpu, 0x53);
        // A pin of the in-kernel IOAPIC still works: GSI 5 keeps its route.
        let line = crate::IrqfdLine::new(&vm, 5).unwrap();
        crate::InterruptLine::trigger(&line).unwrap();
        assert_eq!(routing.install_errors(), 0);
    }
}
