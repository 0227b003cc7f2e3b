//! KVM's split irqchip: the local APICs in the kernel, the IOAPIC here.
//!
//! With `KVM_CAP_SPLIT_IRQCHIP` KVM emulates only the local APICs; there is
//! no in-kernel PIC, IOAPIC or PIT, and VM teardown does not wait for the SRCU
//! grace period that tearing those down costs. The IOAPIC the guest programs
//! becomes [`Ioapic`], an MMIO device in the VMM. It never sits on the
//! interrupt path itself: every time the guest changes a redirection entry it
//! turns the 24 entries into a GSI routing table of MSI routes (GSI `n` → the
//! MSI that entry `n` describes) and hands it to an [`MsiRouter`], which for a
//! real VM is `KVM_SET_GSI_ROUTING`. Devices keep raising their GSIs through
//! [`crate::IrqfdLine`]s and KVM injects the resulting MSIs without exiting to
//! the VMM.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use kvm_bindings::{kvm_enable_cap, KVM_CAP_SPLIT_IRQCHIP};
use kvm_ioctls::VmFd;
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;

use crate::{Error, Result, IOAPIC_PINS};

/// Turns on KVM's split irqchip (`KVM_ENABLE_CAP(KVM_CAP_SPLIT_IRQCHIP)`),
/// reserving [`IOAPIC_PINS`] GSI routes for the userspace IOAPIC.
///
/// Call it once per VM, **before any vCPU is created** (KVM builds each
/// vCPU's local APIC only if an irqchip exists by then, and refuses the
/// capability afterwards), and instead of [`crate::create_in_kernel_irqchip`],
/// never together with it. Afterwards KVM's GSI routing table is empty, so
/// irqfds can be attached to any GSI but raise nothing until an [`Ioapic`]
/// routes them. There is no PIC and no PIT in this mode: the guest must not
/// depend on 8259 interrupts or on the PIT (Linux calibrates its TSC from
/// KVM's paravirtual clock or CPUID instead).
///
/// # Example
///
/// ```
/// let vm = kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap();
/// keel_irq::enable_split_irqchip(&vm).unwrap();
/// // An irqfd attaches as with the in-kernel irqchip:
/// let _line = keel_irq::IrqfdLine::new(&vm, 5).unwrap();
/// ```
pub fn enable_split_irqchip(vm: &VmFd) -> Result<()> {
    let cap = kvm_enable_cap {
        cap: KVM_CAP_SPLIT_IRQCHIP,
        args: [u64::from(IOAPIC_PINS), 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap).map_err(|source| Error::EnableSplitIrqchip {
        pins: IOAPIC_PINS,
        source,
    })?;
    log::debug!("enabled KVM split irqchip with {IOAPIC_PINS} IOAPIC routes");
    Ok(())
}

/// One MSI route: raising `gsi` sends the MSI (`address`, `data`).
///
/// `address` and `data` are in the Intel format (SDM vol. 3, "Message
/// Signalled Interrupts"): address `0xfee0_0000 | dest << 12 | RH << 3 | DM <<
/// 2`, data `vector | delivery mode << 8 | level << 14 | trigger mode << 15`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiRoute {
    /// The GSI that raises the MSI.
    pub gsi: u32,
    /// The MSI address.
    pub address: u64,
    /// The MSI data.
    pub data: u32,
}

impl MsiRoute {
    /// The route a redirection entry stands for on GSI `gsi`, or `None` if
    /// the entry is masked or has a reserved delivery mode.
    ///
    /// Address `0xfee0_0000 | dest << 12 | logical << 2` with `dest` the
    /// entry's bits 56–63; data `vector | delivery mode << 8`, always an edge
    /// (see [Edge and level](Ioapic#edge-and-level)).
    ///
    /// ```
    /// use keel_irq::MsiRoute;
    ///
    /// // Vector 0x30, lowest priority, logical, destination 0x0f, unmasked.
    /// let route = MsiRoute::from_redirection_entry(16, 0x0f00_0000_0000_0930);
    /// assert_eq!(route, Some(MsiRoute { gsi: 16, address: 0xfee0_f004, data: 0x130 }));
    /// // Masked: no route.
    /// assert_eq!(MsiRoute::from_redirection_entry(16, 0x0001_0030), None);
    /// ```
    pub fn from_redirection_entry(gsi: u32, entry: u64) -> Option<MsiRoute> {
        if entry & RTE_MASKED != 0 {
            return None;
        }
        let delivery_mode = delivery_mode(entry);
        if DM_RESERVED.contains(&delivery_mode) {
            return None;
        }
        let dest = (entry >> RTE_DEST_SHIFT) & 0xff;
        let logical = u64::from(entry & RTE_DEST_MODE_LOGICAL != 0);
        let address = MSI_ADDRESS_BASE | (dest << 12) | (logical << 2);
        let data = (entry & RTE_VECTOR) as u32 | (u32::from(delivery_mode) << 8);
        Some(MsiRoute { gsi, address, data })
    }
}

/// Something that installs a VM's GSI routing table.
///
/// The table is always given complete, like `KVM_SET_GSI_ROUTING`, which
/// replaces the whole table: a GSI not in `routes` has no route afterwards.
/// A VMM that has other MSI routes as well (MSI-X of a PCI device) implements
/// this trait on a type that merges the tables before calling KVM.
pub trait MsiRouter: Send {
    /// Replaces the routing table with `routes`.
    fn set_msi_routes(&self, routes: &[MsiRoute]) -> std::io::Result<()>;
}

/// `KVM_SET_GSI_ROUTING` with one `KVM_IRQ_ROUTING_MSI` entry per route.
/// (A VM with PCI devices gives its IOAPIC a [`crate::GsiRouting`] instead.)
impl MsiRouter for Arc<VmFd> {
    fn set_msi_routes(&self, routes: &[MsiRoute]) -> std::io::Result<()> {
        let routes: Vec<crate::GsiRoute> = routes.iter().copied().map(crate::GsiRoute::Msi).collect();
        crate::RouteInstaller::install(self, &routes)
    }
}

/// A test double for [`MsiRouter`]: remembers the last table and counts the
/// updates; can be told to fail. Clones share their records, so a test keeps
/// one clone and gives the other to the [`Ioapic`].
#[derive(Clone, Default, Debug)]
pub struct RecordingRouter {
    inner: Arc<Mutex<Recorded>>,
}

#[derive(Default, Debug)]
struct Recorded {
    routes: Vec<MsiRoute>,
    updates: usize,
    failing: bool,
}

impl RecordingRouter {
    /// A router with an empty table that has seen no update.
    pub fn new() -> Self {
        Self::default()
    }

    /// The last table successfully installed (empty before the first).
    pub fn routes(&self) -> Vec<MsiRoute> {
        self.recorded().routes.clone()
    }

    /// How many tables were successfully installed.
    pub fn updates(&self) -> usize {
        self.recorded().updates
    }

    /// From now on, make [`set_msi_routes`](MsiRouter::set_msi_routes) fail
    /// (`true`, without recording anything) or succeed again (`false`).
    pub fn set_failing(&self, failing: bool) {
        self.recorded().failing = failing;
    }

    fn recorded(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl MsiRouter for RecordingRouter {
    fn set_msi_routes(&self, routes: &[MsiRoute]) -> std::io::Result<()> {
        let mut recorded = self.recorded();
        if recorded.failing {
            return Err(std::io::Error::other(
                "RecordingRouter was set to fail (RecordingRouter::set_failing)",
            ));
        }
        recorded.routes = routes.to_vec();
        recorded.updates = recorded.updates.saturating_add(1);
        Ok(())
    }
}

// Register offsets in the IOAPIC's MMIO window.
const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;
const IOEOI: u64 = 0x40;

// Register indices (IOREGSEL values).
const REG_ID: u8 = 0x00;
const REG_VER: u8 = 0x01;
const REG_ARB: u8 = 0x02;
const REG_REDTBL: u8 = 0x10;

/// ID register: bits 24–27 hold the IOAPIC ID.
const ID_MASK: u32 = 0x0f00_0000;
/// 24 entries (maximum redirection entry 23 in bits 16–23), version 0x20
/// (the version with an EOI register).
const VERSION: u32 = ((IOAPIC_PINS - 1) << 16) | 0x20;

// Redirection entry bits (low dword).
const RTE_VECTOR: u64 = 0xff;
const RTE_DELIVERY_MODE_SHIFT: u32 = 8;
const RTE_DEST_MODE_LOGICAL: u64 = 1 << 11;
const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_TRIGGER_LEVEL: u64 = 1 << 15;
const RTE_MASKED: u64 = 1 << 16;
const RTE_DEST_SHIFT: u32 = 56;
/// Bits the guest may write: vector, delivery mode, destination mode,
/// polarity (13), trigger mode, mask, destination (56–63). Delivery status
/// (12) and remote IRR (14) are read-only; reserved bits read as 0. The
/// extended destination ID (bits 49–55) is not supported: Keel does not
/// advertise `KVM_FEATURE_MSI_EXT_DEST_ID`, so guests address at most 255
/// APIC IDs through the IOAPIC.
const RTE_WRITABLE: u64 = 0xff00_0000_0001_afff;

// Delivery modes.
const DM_FIXED: u8 = 0;
/// 3 and 6 are reserved in an IOAPIC entry (in KVM's local APIC they mean a
/// paravirtual unhalt and a start-up IPI).
const DM_RESERVED: [u8; 2] = [3, 6];

/// A redirection entry's delivery mode (bits 8–10).
fn delivery_mode(entry: u64) -> u8 {
    ((entry >> RTE_DELIVERY_MODE_SHIFT) & 0x7) as u8
}

/// Where an MSI address starts.
const MSI_ADDRESS_BASE: u64 = 0xfee0_0000;

/// A user-space 82093AA-style IOAPIC for KVM's split irqchip, whose
/// redirection entries become KVM MSI routes.
///
/// The guest programs it through the usual MMIO window at [`Ioapic::BASE`]:
/// `IOREGSEL` (offset 0x00) selects a register, `IOWIN` (0x10) reads or writes
/// it, and a write to the EOI register (0x40) ends a level-triggered
/// interrupt. Only 32-bit accesses at those offsets do anything; other
/// accesses are ignored and read as 0, so nothing a guest writes can panic
/// the VMM. The registers are ID (0, bits 24–27 writable), VER (1,
/// `0x0017_0020`: 24 entries, version 0x20), ARB (2, the ID, read-only) and
/// the redirection table at `0x10 + 2n` (low dword) / `0x11 + 2n` (high)
/// for `n` in `0..24`.
///
/// # Routing
///
/// Whenever a write changes what the entries mean, the IOAPIC installs the
/// complete table — one route per **unmasked** entry `n`, GSI `n` → the MSI
/// from [`MsiRoute::from_redirection_entry`] — through its [`MsiRouter`]. A masked entry gets
/// no route, so KVM drops an irqfd edge on its GSI, as a masked pin of a
/// real IOAPIC drops an edge. The router is only called when the table
/// really changes (Linux rewrites entries all the time, and masks and
/// unmasks them around every reprogramming); a failed call is logged, counted
/// in [`route_errors`](Ioapic::route_errors) and retried on the guest's next
/// register write.
///
/// [`new`](Ioapic::new) installs nothing: every entry starts masked, so the
/// table is empty, which is what KVM's table is right after
/// [`enable_split_irqchip`]. The first call comes with the first unmasked
/// entry.
///
/// # Edge and level
///
/// Every route is delivered **as an edge**: the MSI data never has the
/// trigger-mode (15) or level (14) bit set, whatever the guest programmed.
/// The guest still reads back the trigger mode it wrote. Why:
///
/// - devices raise GSIs through irqfds, which are pulses, and the VMM never
///   sees an assertion, so it cannot set remote IRR the way a real IOAPIC
///   does; there would be nothing for an EOI to clear;
/// - a level-triggered MSI makes KVM exit to the VMM
///   (`KVM_EXIT_IOAPIC_EOI`) on every EOI of that vector, one exit per
///   interrupt for no gain;
/// - edges lose nothing: with the in-kernel IOAPIC an irqfd pulse on a
///   level pin is also gone once the guest EOIs it, and pulses that arrive
///   while remote IRR is set are even dropped there, while an edge MSI just
///   sets the IRR bit in the local APIC again.
///
/// Remote IRR therefore always reads 0, which also keeps Linux from waiting
/// for a "stuck" level interrupt. Linux sees the local APIC's trigger-mode
/// bit clear for a level vector and writes the EOI register;
/// [`end_of_interrupt`](Ioapic::end_of_interrupt) accepts that (and
/// `KVM_EXIT_IOAPIC_EOI`) and changes nothing.
///
/// # Delivery modes and vectors
///
/// Fixed, lowest priority, SMI, NMI, INIT and ExtINT are passed through in
/// the MSI data (KVM ignores ExtINT, as there is no PIC). The reserved modes
/// 3 and 6 get no route (the entry behaves as masked, with a warning): in
/// KVM's local APIC they would mean a paravirtual unhalt and a start-up IPI.
/// A fixed entry with a vector below 16 is a guest bug (the local APIC
/// rejects such vectors as illegal); it is routed anyway, with a warning,
/// because it is the local APIC's business to reject it and the host is not
/// at risk.
///
/// # Example
///
/// ```
/// use keel_irq::{Ioapic, MsiRoute, RecordingRouter};
///
/// let router = RecordingRouter::default();
/// let mut ioapic = Ioapic::new(router.clone());
///
/// // The guest points entry 5 at APIC ID 1, vector 0x31, fixed, edge...
/// ioapic.write(0x00, &0x1bu32.to_le_bytes()); // IOREGSEL: high dword of entry 5
/// ioapic.write(0x10, &(1u32 << 24).to_le_bytes());
/// ioapic.write(0x00, &0x1au32.to_le_bytes()); // IOREGSEL: low dword of entry 5
/// ioapic.write(0x10, &0x31u32.to_le_bytes()); // unmasked
///
/// // ...and GSI 5 now sends that MSI.
/// assert_eq!(
///     router.routes(),
///     [MsiRoute { gsi: 5, address: 0xfee0_1000, data: 0x31 }]
/// );
///
/// let mut value = [0u8; 4];
/// ioapic.read(0x10, &mut value);
/// assert_eq!(u32::from_le_bytes(value), 0x31);
/// ```
pub struct Ioapic<R: MsiRouter> {
    router: R,
    id: u32,
    ioregsel: u8,
    entries: [u64; IOAPIC_PINS as usize],
    /// The table the router holds, or `None` if the last update failed and
    /// what it holds is unknown.
    installed: Option<Vec<MsiRoute>>,
    route_errors: u64,
    /// Paces routing-table rewrites (see [`ROUTE_UPDATE_LIMIT`]).
    route_limit: keel_ratelimit::TokenBucket,
    route_updates: u64,
    throttled_route_updates: u64,
}

/// How fast a guest may make an [`Ioapic`] rewrite KVM's routing table: a
/// burst of 64 rewrites, then 640 per second. Each rewrite is a
/// `KVM_SET_GSI_ROUTING`, which costs the host kernel an RCU grace period;
/// Linux rewrites a handful of entries at boot and on interrupt affinity
/// changes, far below this. A guest that asks for more waits on its own
/// vCPU thread for the next token, so the cost falls on the guest's time,
/// not the host's.
pub const ROUTE_UPDATE_LIMIT: keel_ratelimit::BucketConfig = keel_ratelimit::BucketConfig::new(64, 100);

impl<R: MsiRouter> Ioapic<R> {
    /// Where the IOAPIC's MMIO window sits in guest physical memory.
    pub const BASE: u64 = 0xfec0_0000;
    /// The size of the MMIO window.
    pub const SIZE: u64 = 0x1000;

    /// An IOAPIC with ID 0 and all 24 entries masked; installs no routes
    /// (see [Routing](Ioapic#routing)).
    pub fn new(router: R) -> Self {
        Self {
            router,
            id: 0,
            ioregsel: 0,
            entries: [RTE_MASKED; IOAPIC_PINS as usize],
            installed: Some(Vec::new()),
            route_errors: 0,
            route_limit: keel_ratelimit::TokenBucket::new(ROUTE_UPDATE_LIMIT),
            route_updates: 0,
            throttled_route_updates: 0,
        }
    }

    /// The same IOAPIC with another pace for routing-table rewrites than
    /// [`ROUTE_UPDATE_LIMIT`].
    pub fn with_route_limit(mut self, limit: keel_ratelimit::BucketConfig) -> Self {
        self.route_limit = keel_ratelimit::TokenBucket::new(limit);
        self
    }

    /// Routing-table rewrites handed to the router so far.
    pub fn route_updates(&self) -> u64 {
        self.route_updates
    }

    /// Rewrites that had to wait for the rate limit.
    pub fn throttled_route_updates(&self) -> u64 {
        self.throttled_route_updates
    }

    /// Reads `data.len()` bytes at `offset` in the MMIO window. Only 4-byte
    /// reads of `IOREGSEL` (0x00) and `IOWIN` (0x10) return something; every
    /// other read returns zeros.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (IOREGSEL, 4) => u32::from(self.ioregsel),
            (IOWIN, 4) => self.read_register(self.ioregsel),
            _ => {
                log::debug!("ignored IOAPIC read of {} bytes at {offset:#x}", data.len());
                data.fill(0);
                return;
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// Writes `data` at `offset` in the MMIO window. Only 4-byte writes of
    /// `IOREGSEL` (0x00), `IOWIN` (0x10) and EOI (0x40) do anything.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::debug!("ignored IOAPIC write of {} bytes at {offset:#x}", data.len());
            return;
        };
        let value = u32::from_le_bytes(bytes);
        match offset {
            IOREGSEL => self.ioregsel = value as u8,
            IOWIN => self.write_register(self.ioregsel, value),
            IOEOI => self.end_of_interrupt(value as u8),
            _ => log::debug!("ignored IOAPIC write of {value:#x} at {offset:#x}"),
        }
    }

    /// Ends a level-triggered interrupt with `vector`: clears remote IRR in
    /// the level-triggered entries with that vector. For the guest's writes
    /// to the EOI register and for `KVM_EXIT_IOAPIC_EOI`.
    ///
    /// As every route is delivered as an edge (see
    /// [Edge and level](Ioapic#edge-and-level)), remote IRR is never set and
    /// this changes nothing; it never calls the router.
    pub fn end_of_interrupt(&mut self, vector: u8) {
        for entry in &mut self.entries {
            if *entry & RTE_TRIGGER_LEVEL != 0 && *entry & RTE_VECTOR == u64::from(vector) {
                *entry &= !RTE_REMOTE_IRR;
            }
        }
    }

    /// How many times installing the routing table failed.
    pub fn route_errors(&self) -> u64 {
        self.route_errors
    }

    /// The routing table the router was last given successfully, or `None`
    /// if the last attempt failed.
    pub fn installed_routes(&self) -> Option<&[MsiRoute]> {
        self.installed.as_deref()
    }

    /// Redirection entry `pin` (both dwords, as the guest reads them), or
    /// `None` if there is no such pin.
    pub fn redirection_entry(&self, pin: usize) -> Option<u64> {
        self.entries.get(pin).copied()
    }

    /// For a snapshot: the registers (ID, `IOREGSEL`, the redirection
    /// table with its remote-IRR bits).
    pub fn save_state(&self) -> IoapicState {
        IoapicState {
            id: self.id,
            ioregsel: self.ioregsel,
            entries: self.entries.to_vec(),
        }
    }

    /// Puts saved registers back and installs the routes they stand for.
    /// A state of the wrong size is refused and nothing changes.
    pub fn restore_state(&mut self, state: &IoapicState) -> crate::Result<()> {
        let entries: [u64; IOAPIC_PINS as usize] = state.entries.as_slice().try_into().map_err(|_| {
            crate::Error::IoapicState(format!(
                "{} redirection entries saved, this IOAPIC has {IOAPIC_PINS}",
                state.entries.len()
            ))
        })?;
        self.id = state.id & ID_MASK;
        self.ioregsel = state.ioregsel;
        self.entries = entries;
        // Whatever the router holds now is replaced.
        self.installed = None;
        self.update_routes();
        match self.installed {
            Some(_) => Ok(()),
            None => Err(crate::Error::IoapicState(
                "KVM refused the restored redirection table's MSI routes".into(),
            )),
        }
    }

    fn read_register(&self, index: u8) -> u32 {
        match index {
            REG_ID | REG_ARB => self.id,
            REG_VER => VERSION,
            // redirection_index only names pins the table has; any other
            // index reads as 0, like an unknown register.
            _ => match redirection_index(index).and_then(|(pin, high)| Some((*self.entries.get(pin)?, high)))
            {
                Some((entry, true)) => (entry >> 32) as u32,
                Some((entry, false)) => entry as u32,
                None => 0,
            },
        }
    }

    fn write_register(&mut self, index: u8, value: u32) {
        match index {
            REG_ID => self.id = value & ID_MASK,
            _ => match redirection_index(index) {
                Some((pin, high)) => {
                    // redirection_index only names pins the table has.
                    let Some(slot) = self.entries.get_mut(pin) else {
                        return;
                    };
                    let old = *slot;
                    let written = if high {
                        (old & 0xffff_ffff) | (u64::from(value) << 32)
                    } else {
                        (old & !0xffff_ffff) | u64::from(value)
                    };
                    let entry = (written & RTE_WRITABLE) | (old & !RTE_WRITABLE);
                    *slot = entry;
                    if entry != old {
                        self.check_entry(pin, entry);
                    }
                    self.update_routes();
                }
                None => log::debug!("ignored write of {value:#x} to IOAPIC register {index:#x}"),
            },
        }
    }

    fn check_entry(&self, pin: usize, entry: u64) {
        if entry & RTE_MASKED != 0 {
            return;
        }
        let delivery_mode = delivery_mode(entry);
        if DM_RESERVED.contains(&delivery_mode) {
            keel_ratelimit::warn_limited!(
                "IOAPIC entry {pin} ({entry:#018x}) has reserved delivery mode {delivery_mode}: not routed"
            );
        } else if delivery_mode == DM_FIXED && entry & RTE_VECTOR < 16 {
            keel_ratelimit::warn_limited!(
                "IOAPIC entry {pin} ({entry:#018x}) sends fixed vector {}, which the local APIC rejects as illegal",
                entry & RTE_VECTOR
            );
        }
    }

    /// The routing table the entries stand for.
    fn routes(&self) -> Vec<MsiRoute> {
        self.entries
            .iter()
            .zip(0..)
            .filter_map(|(&entry, gsi)| MsiRoute::from_redirection_entry(gsi, entry))
            .collect()
    }

    fn update_routes(&mut self) {
        let routes = self.routes();
        if self.installed.as_ref() == Some(&routes) {
            return;
        }
        if !self.route_limit.reduce(1) {
            // The guest rewrites its routes faster than any OS needs to:
            // its vCPU waits for the next token (see ROUTE_UPDATE_LIMIT).
            self.throttled_route_updates = self.throttled_route_updates.saturating_add(1);
            let wait = self.route_limit.time_until_at(1, std::time::Instant::now());
            std::thread::sleep(wait);
            self.route_limit.reduce(1);
        }
        self.route_updates = self.route_updates.saturating_add(1);
        match self.router.set_msi_routes(&routes) {
            Ok(()) => {
                log::debug!("IOAPIC routes: {routes:x?}");
                self.installed = Some(routes);
            }
            Err(e) => {
                self.route_errors = self.route_errors.saturating_add(1);
                self.installed = None;
                keel_ratelimit::warn_limited!("cannot install {} IOAPIC MSI routes: {e}", routes.len());
            }
        }
    }
}

/// An [`Ioapic`]'s registers, as a snapshot keeps them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct IoapicState {
    /// The IOAPIC ID register.
    pub id: u32,
    /// `IOREGSEL`.
    pub ioregsel: u8,
    /// The 24 redirection entries, remote-IRR bits included.
    pub entries: Vec<u64>,
}

/// The redirection entry (pin) and dword (`true` for high) an `IOREGSEL`
/// value selects, if it selects one.
fn redirection_index(index: u8) -> Option<(usize, bool)> {
    let n = usize::from(index.checked_sub(REG_REDTBL)?);
    let pin = n / 2;
    (pin < IOAPIC_PINS as usize).then_some((pin, n % 2 == 1))
}

impl<R: MsiRouter> fmt::Debug for Ioapic<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ioapic")
            .field("id", &self.id)
            .field("ioregsel", &self.ioregsel)
            .field("entries", &format_args!("{:x?}", self.entries))
            .field("installed", &self.installed)
            .field("route_errors", &self.route_errors)
            .finish_non_exhaustive()
    }
}

impl<R: MsiRouter> MutDeviceMmio for Ioapic<R> {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        self.read(offset, data);
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        self.write(offset, data);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use kvm_ioctls::Kvm;

    use super::*;
    use crate::{InterruptLine, IrqfdLine};

    type TestIoapic = Ioapic<RecordingRouter>;

    fn ioapic() -> (TestIoapic, RecordingRouter) {
        let router = RecordingRouter::new();
        (Ioapic::new(router.clone()), router)
    }

    fn read_reg<R: MsiRouter>(ioapic: &mut Ioapic<R>, index: u8) -> u32 {
        ioapic.write(IOREGSEL, &u32::from(index).to_le_bytes());
        let mut data = [0xaa; 4];
        ioapic.read(IOWIN, &mut data);
        u32::from_le_bytes(data)
    }

    fn write_reg<R: MsiRouter>(ioapic: &mut Ioapic<R>, index: u8, value: u32) {
        ioapic.write(IOREGSEL, &u32::from(index).to_le_bytes());
        ioapic.write(IOWIN, &value.to_le_bytes());
    }

    /// Programs entry `pin` high dword first, then low, as Linux does.
    fn program<R: MsiRouter>(ioapic: &mut Ioapic<R>, pin: u8, low: u32, high: u32) {
        write_reg(ioapic, REG_REDTBL + 2 * pin + 1, high);
        write_reg(ioapic, REG_REDTBL + 2 * pin, low);
    }

    #[test]
    fn version_register_says_24_entries_version_0x20() {
        let (mut ioapic, _) = ioapic();
        assert_eq!(read_reg(&mut ioapic, REG_VER), 0x0017_0020);
        write_reg(&mut ioapic, REG_VER, 0xffff_ffff);
        assert_eq!(read_reg(&mut ioapic, REG_VER), 0x0017_0020);
    }

    #[test]
    fn id_register_keeps_bits_24_to_27_and_arb_follows() {
        let (mut ioapic, router) = ioapic();
        assert_eq!(read_reg(&mut ioapic, REG_ID), 0);
        write_reg(&mut ioapic, REG_ID, 0xffff_ffff);
        assert_eq!(read_reg(&mut ioapic, REG_ID), 0x0f00_0000);
        assert_eq!(read_reg(&mut ioapic, REG_ARB), 0x0f00_0000);
        write_reg(&mut ioapic, REG_ARB, 0);
        assert_eq!(read_reg(&mut ioapic, REG_ARB), 0x0f00_0000);
        assert_eq!(router.updates(), 0);
    }

    #[test]
    fn ioregsel_reads_back_and_unknown_registers_read_zero() {
        let (mut ioapic, router) = ioapic();
        ioapic.write(IOREGSEL, &0x1234_5640u32.to_le_bytes());
        let mut data = [0; 4];
        ioapic.read(IOREGSEL, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x40);
        for index in [0x03, 0x0f, 0x40, 0x41, 0xff] {
            write_reg(&mut ioapic, index, 0xffff_ffff);
            assert_eq!(read_reg(&mut ioapic, index), 0, "register {index:#x}");
        }
        assert_eq!(router.updates(), 0);
    }

    #[test]
    fn all_entries_start_masked_and_no_routes_are_installed() {
        let (mut ioapic, router) = ioapic();
        for pin in 0..24 {
            assert_eq!(read_reg(&mut ioapic, REG_REDTBL + 2 * pin), 0x0001_0000);
            assert_eq!(read_reg(&mut ioapic, REG_REDTBL + 2 * pin + 1), 0);
        }
        assert_eq!(router.updates(), 0);
        assert_eq!(ioapic.installed_routes(), Some(&[][..]));
    }

    #[test]
    fn redirection_entries_read_back_without_reserved_or_read_only_bits() {
        let (mut ioapic, _) = ioapic();
        write_reg(&mut ioapic, 0x10 + 2 * 7 + 1, 0xffff_ffff);
        write_reg(&mut ioapic, 0x10 + 2 * 7, 0xffff_ffff);
        // Delivery status (12), remote IRR (14) and reserved bits stay 0.
        assert_eq!(read_reg(&mut ioapic, 0x10 + 2 * 7), 0x0001_afff);
        assert_eq!(read_reg(&mut ioapic, 0x10 + 2 * 7 + 1), 0xff00_0000);
        assert_eq!(ioapic.redirection_entry(7), Some(0xff00_0000_0001_afff));
        assert_eq!(ioapic.redirection_entry(24), None);
        // The neighbours are untouched.
        assert_eq!(ioapic.redirection_entry(6), Some(RTE_MASKED));
        assert_eq!(ioapic.redirection_entry(8), Some(RTE_MASKED));
    }

    #[test]
    fn masked_entries_get_no_route() {
        let (mut ioapic, router) = ioapic();
        program(&mut ioapic, 3, 0x0001_0041, 0x0100_0000);
        assert_eq!(router.updates(), 0);
        assert!(router.routes().is_empty());
    }

    #[test]
    fn unmasked_entry_gets_an_intel_format_msi_route() {
        let (mut ioapic, router) = ioapic();
        // Vector 0x41, fixed, physical, edge, active high, to APIC ID 2.
        program(&mut ioapic, 9, 0x0000_0041, 0x0200_0000);
        let expected = MsiRoute {
            gsi: 9,
            // 0xfee, destination ID in bits 12–19, RH 0, DM 0.
            address: 0xfee0_2000,
            // Vector in 0–7, delivery mode 000 in 8–10, edge.
            data: 0x41,
        };
        assert_eq!(router.routes(), [expected]);
        assert_eq!(router.updates(), 1);
        assert_eq!(ioapic.installed_routes(), Some(&[expected][..]));
    }

    #[test]
    fn logical_destination_mode_sets_address_bit_2() {
        let (mut ioapic, router) = ioapic();
        // Vector 0x30, lowest priority (001), logical, destination mask 0x0f.
        program(&mut ioapic, 16, 0x0000_0930, 0x0f00_0000);
        assert_eq!(
            router.routes(),
            [MsiRoute {
                gsi: 16,
                address: 0xfee0_f004,
                data: 0x130
            }]
        );
    }

    #[test]
    fn destination_uses_all_eight_bits_and_ignores_extended_id() {
        let (mut ioapic, router) = ioapic();
        program(&mut ioapic, 1, 0x0000_0050, 0xff7f_0000);
        assert_eq!(router.routes()[0].address, 0xfeef_f000);
    }

    #[test]
    fn routes_cover_every_unmasked_entry_in_gsi_order() {
        let (mut ioapic, router) = ioapic();
        program(&mut ioapic, 20, 0x0000_0060, 0);
        program(&mut ioapic, 4, 0x0000_0024, 0);
        program(&mut ioapic, 11, 0x0001_0030, 0); // masked
        let gsis: Vec<u32> = router.routes().iter().map(|r| r.gsi).collect();
        assert_eq!(gsis, [4, 20]);

        // Masking 20 again withdraws its route.
        write_reg(&mut ioapic, REG_REDTBL + 40, 0x0001_0060);
        assert_eq!(
            router.routes(),
            [MsiRoute {
                gsi: 4,
                address: 0xfee0_0000,
                data: 0x24
            }]
        );
    }

    #[test]
    fn level_entries_are_delivered_as_edges_but_read_back_as_level() {
        let (mut ioapic, router) = ioapic();
        // Vector 0x42, fixed, level (15), active low (13).
        program(&mut ioapic, 10, 0x0000_a042, 0x0100_0000);
        assert_eq!(
            router.routes(),
            [MsiRoute {
                gsi: 10,
                address: 0xfee0_1000,
                data: 0x42 // neither trigger mode (15) nor level (14)
            }]
        );
        assert_eq!(read_reg(&mut ioapic, REG_REDTBL + 20), 0x0000_a042);

        // Switching the same entry between edge and level changes no route.
        write_reg(&mut ioapic, REG_REDTBL + 20, 0x0000_0042);
        assert_eq!(router.updates(), 1);
    }

    #[test]
    fn eoi_never_sets_anything_or_calls_the_router() {
        let (mut ioapic, router) = ioapic();
        program(&mut ioapic, 10, 0x0000_8042, 0);
        let entry = ioapic.redirection_entry(10);
        ioapic.write(IOEOI, &0x42u32.to_le_bytes());
        for vector in 0..=255 {
            ioapic.end_of_interrupt(vector);
        }
        assert_eq!(ioapic.redirection_entry(10), entry);
        assert_eq!(read_reg(&mut ioapic, REG_REDTBL + 20) & (1 << 14), 0);
        assert_eq!(router.updates(), 1);
        // The EOI register is write-only.
        let mut data = [0xaa; 4];
        ioapic.read(IOEOI, &mut data);
        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn end_of_interrupt_clears_remote_irr_of_matching_level_entries() {
        let (mut ioapic, _) = ioapic();
        program(&mut ioapic, 2, 0x0000_8042, 0);
        program(&mut ioapic, 3, 0x0000_8043, 0);
        // Remote IRR cannot be set from outside; set it by hand.
        ioapic.entries[2] |= RTE_REMOTE_IRR;
        ioapic.entries[3] |= RTE_REMOTE_IRR;
        ioapic.end_of_interrupt(0x42);
        assert_eq!(ioapic.entries[2] & RTE_REMOTE_IRR, 0);
        assert_ne!(ioapic.entries[3] & RTE_REMOTE_IRR, 0);
    }

    #[test]
    fn delivery_modes_pass_through_except_reserved_ones() {
        for (mode, routed) in [
            (0, true),  // fixed
            (1, true),  // lowest priority
            (2, true),  // SMI
            (3, false), // reserved
            (4, true),  // NMI
            (5, true),  // INIT
            (6, false), // reserved
            (7, true),  // ExtINT
        ] {
            let (mut ioapic, router) = ioapic();
            program(&mut ioapic, 5, 0x0000_0050 | (mode << 8), 0);
            let expected: Vec<MsiRoute> = if routed {
                vec![MsiRoute {
                    gsi: 5,
                    address: 0xfee0_0000,
                    data: 0x50 | (mode << 8),
                }]
            } else {
                vec![]
            };
            assert_eq!(router.routes(), expected, "delivery mode {mode}");
            assert_eq!(read_reg(&mut ioapic, REG_REDTBL + 10), 0x50 | (mode << 8));
        }
    }

    #[test]
    fn fixed_vector_below_16_is_routed_anyway() {
        let (mut ioapic, router) = ioapic();
        program(&mut ioapic, 6, 0x0000_0003, 0);
        assert_eq!(
            router.routes(),
            [MsiRoute {
                gsi: 6,
                address: 0xfee0_0000,
                data: 0x03
            }]
        );
    }

    #[test]
    fn router_is_called_only_when_the_table_changes() {
        let (mut ioapic, router) = ioapic();
        program(&mut ioapic, 9, 0x0000_0041, 0);
        assert_eq!(router.updates(), 1);

        // Rewriting the same values, writing the masked entries, changing
        // polarity or trigger mode: same table.
        program(&mut ioapic, 9, 0x0000_0041, 0);
        program(&mut ioapic, 12, 0x0001_0099, 0x0300_0000);
        write_reg(&mut ioapic, REG_REDTBL + 18, 0x0000_a041);
        assert_eq!(router.updates(), 1);

        // Linux's mask, reprogram, unmask: one update per table change.
        write_reg(&mut ioapic, REG_REDTBL + 18, 0x0001_0041);
        assert_eq!(router.updates(), 2);
        assert!(router.routes().is_empty());
        write_reg(&mut ioapic, REG_REDTBL + 19, 0x0100_0000);
        assert_eq!(router.updates(), 2);
        write_reg(&mut ioapic, REG_REDTBL + 18, 0x0000_0041);
        assert_eq!(router.updates(), 3);
        assert_eq!(router.routes()[0].address, 0xfee0_1000);
    }

    #[test]
    fn a_guest_flipping_a_mask_bit_cannot_rewrite_routes_faster_than_the_limit() {
        let router = RecordingRouter::new();
        // 10 rewrites at once, then 100 per second.
        let mut ioapic =
            Ioapic::new(router.clone()).with_route_limit(keel_ratelimit::BucketConfig::new(10, 100));
        write_reg(&mut ioapic, 0x10 + 2 * 5 + 1, 0);
        let started = std::time::Instant::now();
        for i in 0..40u32 {
            // Unmasked vector 0x31, then masked, and so on.
            write_reg(&mut ioapic, 0x10 + 2 * 5, 0x31 | ((i & 1) << 16));
        }
        let elapsed = started.elapsed();
        assert_eq!(router.updates(), 40, "every change is installed, none lost");
        assert_eq!(ioapic.route_updates(), 40);
        // Some rewrites had to wait. (How many depends on scheduling: a
        // wait that overshoots lets the next token accrue, so on a loaded
        // machine fewer than 30 wait; the rate bound below holds anyway.)
        assert!(ioapic.throttled_route_updates() > 0);
        // 30 rewrites past the burst at 100/s take at least 0.3 s.
        assert!(elapsed >= std::time::Duration::from_millis(290), "{elapsed:?}");
        // The table in force is the last one written (masked: no routes).
        assert_eq!(router.routes(), []);
    }

    #[test]
    fn router_failure_is_counted_and_retried_not_a_panic() {
        let (mut ioapic, router) = ioapic();
        router.set_failing(true);
        program(&mut ioapic, 9, 0x0000_0041, 0);
        assert_eq!(ioapic.route_errors(), 1);
        assert_eq!(ioapic.installed_routes(), None);
        assert_eq!(router.updates(), 0);
        // The guest's view is unaffected.
        assert_eq!(read_reg(&mut ioapic, REG_REDTBL + 18), 0x41);

        // The next register write retries, even if it changes nothing.
        write_reg(&mut ioapic, REG_REDTBL + 18, 0x41);
        assert_eq!(ioapic.route_errors(), 2);

        router.set_failing(false);
        write_reg(&mut ioapic, REG_REDTBL + 18, 0x41);
        assert_eq!(ioapic.route_errors(), 2);
        assert_eq!(router.updates(), 1);
        assert_eq!(router.routes().len(), 1);
        // And then it is quiet again.
        write_reg(&mut ioapic, REG_REDTBL + 18, 0x41);
        assert_eq!(router.updates(), 1);
    }

    #[test]
    fn accesses_of_other_widths_and_offsets_are_ignored() {
        let (mut ioapic, router) = ioapic();
        // Select entry 0's low dword (masked, vector 0x41).
        write_reg(&mut ioapic, REG_REDTBL, 0x0001_0041);
        // A one-byte IOREGSEL write selects nothing else.
        ioapic.write(IOREGSEL, &[0x01]);
        let mut selected = [0; 4];
        ioapic.read(IOREGSEL, &mut selected);
        assert_eq!(u32::from_le_bytes(selected), u32::from(REG_REDTBL));
        // 8-byte and 2-byte IOWIN writes (which would unmask entry 0), a
        // write inside IOWIN, and writes elsewhere.
        ioapic.write(IOWIN, &[0x41, 0, 0, 0, 0, 0, 0, 0]);
        ioapic.write(IOWIN, &[0x41, 0]);
        ioapic.write(IOWIN + 1, &0x41u32.to_le_bytes());
        ioapic.write(0x20, &0x41u32.to_le_bytes());
        ioapic.write(Ioapic::<RecordingRouter>::SIZE, &0x41u32.to_le_bytes());
        ioapic.write(u64::MAX, &0x41u32.to_le_bytes());
        ioapic.write(IOWIN, &[]);
        assert_eq!(router.updates(), 0);
        assert_eq!(ioapic.redirection_entry(0), Some(0x0001_0041));

        for (offset, len) in [
            (IOWIN, 1),
            (IOWIN, 2),
            (IOWIN, 8),
            (IOWIN + 2, 4),
            (0x20, 4),
            (u64::MAX, 4),
            (IOWIN, 0),
        ] {
            let mut data = vec![0xaa; len];
            ioapic.read(offset, &mut data);
            assert!(data.iter().all(|&b| b == 0), "{len} bytes at {offset:#x}");
        }
    }

    #[test]
    fn random_accesses_never_panic_and_version_stays() {
        let (mut ioapic, router) = ioapic();
        // xorshift64*, fixed seed: reproducible.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        for _ in 0..50_000 {
            let r = next();
            let offset = match r % 4 {
                0 => IOREGSEL,
                1 => IOWIN,
                2 => IOEOI,
                _ => next() % 0x2000,
            };
            let len = [0, 1, 2, 3, 4, 4, 4, 8, 16][(next() % 9) as usize];
            let mut data: Vec<u8> = next().to_le_bytes().iter().cycle().take(len).copied().collect();
            if next() % 2 == 0 {
                ioapic.write(offset, &data);
            } else {
                ioapic.read(offset, &mut data);
            }
            if next() % 1000 == 0 {
                router.set_failing(next() % 2 == 0);
            }
        }
        router.set_failing(false);
        assert_eq!(read_reg(&mut ioapic, REG_VER), VERSION);
        for pin in 0..24 {
            let entry = ioapic.redirection_entry(pin).unwrap();
            assert_eq!(entry & !RTE_WRITABLE, 0, "entry {pin}: {entry:#x}");
        }
        // Whatever the guest left, the table the router holds matches it
        // after the next write.
        write_reg(&mut ioapic, REG_ID, 0);
        let low = read_reg(&mut ioapic, REG_REDTBL);
        write_reg(&mut ioapic, REG_REDTBL, low);
        assert_eq!(router.routes(), ioapic.routes());
        assert!(router.routes().len() <= 24);
    }

    #[test]
    fn works_as_a_vm_device_mmio_device() {
        let (mut ioapic, router) = ioapic();
        let base = MmioAddress(TestIoapic::BASE);
        ioapic.mmio_write(base, IOREGSEL, &0x10u32.to_le_bytes());
        ioapic.mmio_write(base, IOWIN, &0x20u32.to_le_bytes());
        let mut data = [0; 4];
        ioapic.mmio_read(base, IOWIN, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x20);
        assert_eq!(router.routes().len(), 1);
    }

    #[test]
    fn split_irqchip_routes_reach_kvm() {
        let vm = Kvm::new().unwrap().create_vm().unwrap();
        enable_split_irqchip(&vm).unwrap();
        let vm = Arc::new(vm);
        let mut ioapic = Ioapic::new(vm.clone());
        program(&mut ioapic, 5, 0x0000_0041, 0);
        program(&mut ioapic, 17, 0x0000_0932, 0x0300_0000);
        assert_eq!(ioapic.route_errors(), 0);
        assert_eq!(ioapic.installed_routes().map(<[_]>::len), Some(2));
        // Masking everything again installs an empty table.
        write_reg(&mut ioapic, REG_REDTBL + 10, 0x0001_0041);
        write_reg(&mut ioapic, REG_REDTBL + 34, 0x0001_0932);
        assert_eq!(ioapic.route_errors(), 0);
        assert_eq!(ioapic.installed_routes(), Some(&[][..]));
    }

    /// The whole path: irqfd on GSI 5 → MSI route → vector 0x41 pending in
    /// vCPU 0's local APIC.
    #[test]
    fn irqfd_edge_reaches_the_local_apic_through_the_route() {
        const VECTOR: u32 = 0x41;
        let vm = Kvm::new().unwrap().create_vm().unwrap();
        enable_split_irqchip(&vm).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        // Software-enable the local APIC (spurious vector register, 0xf0).
        let mut lapic = vcpu.get_lapic().unwrap();
        for (reg, byte) in lapic.regs[0xf0..0xf4].iter_mut().zip(0x1ffu32.to_le_bytes()) {
            *reg = byte as i8;
        }
        vcpu.set_lapic(&lapic).unwrap();

        let vm = Arc::new(vm);
        let line = IrqfdLine::new(&vm, 5).unwrap();
        let mut ioapic = Ioapic::new(vm.clone());
        program(&mut ioapic, 5, VECTOR, 0); // fixed, physical, to APIC ID 0
        assert_eq!(ioapic.route_errors(), 0);

        let irr_bit = |vcpu: &kvm_ioctls::VcpuFd| {
            let lapic = vcpu.get_lapic().unwrap();
            let offset = 0x200 + (VECTOR as usize / 32) * 0x10;
            let irr = lapic.regs[offset..offset + 4]
                .iter()
                .rev()
                .fold(0u32, |irr, &byte| (irr << 8) | u32::from(byte as u8));
            irr & (1 << (VECTOR % 32)) != 0
        };
        assert!(!irr_bit(&vcpu));
        line.trigger().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !irr_bit(&vcpu) {
            assert!(
                Instant::now() < deadline,
                "vector {VECTOR:#x} never reached the local APIC"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn split_irqchip_after_a_vcpu_is_a_typed_error() {
        let vm = Kvm::new().unwrap().create_vm().unwrap();
        let _vcpu = vm.create_vcpu(0).unwrap();
        let err = enable_split_irqchip(&vm).unwrap_err();
        assert!(
            matches!(err, Error::EnableSplitIrqchip { pins: 24, .. }),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.contains("KVM_CAP_SPLIT_IRQCHIP"), "{message}");
        assert!(message.contains("before any vCPU"), "{message}");
    }

    #[test]
    fn split_irqchip_excludes_the_in_kernel_irqchip() {
        let vm = Kvm::new().unwrap().create_vm().unwrap();
        crate::create_in_kernel_irqchip(&vm).unwrap();
        assert!(matches!(
            enable_split_irqchip(&vm),
            Err(Error::EnableSplitIrqchip { .. })
        ));
    }

    #[test]
    fn a_saved_redirection_table_is_restored_with_its_routes() {
        let (mut original, _) = ioapic();
        write_reg(&mut original, REG_ID, 3 << 24);
        program(&mut original, 5, 0x31, 1 << 24);
        let state = original.save_state();
        let json = serde_json::to_string(&state).unwrap();
        let state: IoapicState = serde_json::from_str(&json).unwrap();

        let (mut restored, router) = ioapic();
        restored.restore_state(&state).unwrap();
        assert_eq!(read_reg(&mut restored, REG_ID), 3 << 24);
        assert_eq!(
            router.routes(),
            [MsiRoute {
                gsi: 5,
                address: 0xfee0_1000,
                data: 0x31
            }]
        );

        let short = IoapicState {
            entries: vec![0; 3],
            ..state
        };
        let err = restored.restore_state(&short).unwrap_err().to_string();
        assert_eq!(
            err,
            "IOAPIC state: 3 redirection entries saved, this IOAPIC has 24"
        );
    }
}
