//! MSI-X: the capability, the vector table and the pending-bit array.

use std::sync::Arc;

use keel_irq::{MsiMessage, MsiVectors};

use crate::config::{capability_id, ConfigSpace};
use crate::Result;

/// Bytes per table entry: address low, address high, data, vector control.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Most vectors a function can have (the table size field is 11 bits).
pub const MSIX_MAX_VECTORS: u16 = 2048;

/// Message control bits.
mod control {
    pub const ENABLE: u16 = 1 << 15;
    pub const FUNCTION_MASK: u16 = 1 << 14;
}

/// Vector control: the entry is masked.
const VECTOR_MASKED: u32 = 1;

/// Where MSI addresses start: x86 interrupt messages go to
/// `0xfee0_0000..0xfef0_0000`; a message elsewhere would be a DMA write.
const MSI_ADDRESS_MASK: u64 = 0xffff_ffff_fff0_0000;
const MSI_ADDRESS_BASE: u64 = 0xfee0_0000;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Entry {
    address: u64,
    data: u32,
    control: u32,
}

impl Entry {
    const RESET: Entry = Entry {
        address: 0,
        data: 0,
        control: VECTOR_MASKED,
    };

    fn masked(&self) -> bool {
        self.control & VECTOR_MASKED != 0
    }
}

/// An [`Msix`]'s table, pending bits and control, as a snapshot keeps
/// them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub struct MsixState {
    /// Each vector's (message address, message data, vector control).
    pub entries: Vec<(u64, u32, u32)>,
    /// Each vector's pending bit.
    pub pending: Vec<bool>,
    /// MSI-X enable.
    pub enabled: bool,
    /// Function mask.
    pub function_masked: bool,
}

/// Where the table and the PBA live: a BAR and an offset in it each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixLayout {
    /// The table's BAR.
    pub table_bar: u8,
    /// The table's offset in that BAR (8-byte aligned).
    pub table_offset: u32,
    /// The pending-bit array's BAR.
    pub pba_bar: u8,
    /// Its offset in that BAR (8-byte aligned).
    pub pba_offset: u32,
}

/// A function's MSI-X: the capability in configuration space, the vector
/// table and the pending-bit array (PBA) in a BAR, and the delivery of
/// vectors through an [`MsiVectors`].
///
/// What a device does is [`signal`](Self::signal) a vector. Whether that
/// becomes an interrupt is the guest's choice, exactly as the PCI
/// specification has it:
///
/// - with MSI-X enabled, the function unmasked and the entry unmasked, the
///   vector's message is sent;
/// - otherwise its pending bit is set, and the message is sent as soon as
///   the guest unmasks the entry or the function (and the bit cleared);
/// - with MSI-X disabled nothing is sent (the function has no INTx pin),
///   and nothing is remembered either.
///
/// Routes follow the table lazily: a vector's message is handed to
/// [`MsiVectors::set_message`] when the entry becomes deliverable or is
/// rewritten while deliverable, not on every dword the guest writes while
/// the entry is masked. A message whose address is not an x86 interrupt
/// address (`0xfee0_0000..0xfef0_0000`) gets no route: a guest cannot turn
/// a vector into a write to memory.
///
/// Every access is checked: table and PBA accesses must be 4 or 8 bytes,
/// naturally aligned and inside the structure; others read as zeros and
/// write nothing. The PBA is read-only. Reserved bits of vector control
/// read as zero.
///
/// # Example
///
/// ```
/// use std::sync::Arc;
/// use keel_irq::{MsiMessage, RecordingMsiVectors};
/// use keel_pci::{ConfigSpace, HeaderType, Msix, MsixLayout, PciIds};
///
/// let vectors = Arc::new(RecordingMsiVectors::new(2));
/// let layout = MsixLayout { table_bar: 0, table_offset: 0x4000, pba_bar: 0, pba_offset: 0x5000 };
/// let mut config = ConfigSpace::new(HeaderType::Device, PciIds {
///     vendor: 0x1af4, device: 0x1042, revision: 1, class: 0x01_80_00,
///     subsystem_vendor: 0x1af4, subsystem: 0x40 });
/// let mut msix = Msix::new(2, layout, vectors.clone());
/// let cap = msix.add_capability(&mut config).unwrap();
///
/// // The guest programs entry 1 and enables MSI-X; the entry is still masked.
/// msix.write_table(16, &0xfee0_0000u32.to_le_bytes());
/// msix.write_table(24, &0x41u32.to_le_bytes());
/// config.write(cap + 2, &0x8000u16.to_le_bytes());
/// msix.update_control(&config);
/// msix.signal(1).unwrap();
/// assert!(vectors.triggers().is_empty()); // masked: pending instead
/// assert_eq!(msix.pending(1), Some(true));
///
/// // Unmasking delivers the pending message.
/// msix.write_table(28, &0u32.to_le_bytes());
/// assert_eq!(vectors.triggers(), [1]);
/// assert_eq!(vectors.message(1), Some(MsiMessage { address: 0xfee0_0000, data: 0x41 }));
/// ```
#[derive(Debug)]
pub struct Msix {
    vectors: Arc<dyn MsiVectors>,
    layout: MsixLayout,
    table: Vec<Entry>,
    pending: Vec<bool>,
    /// What each vector's route was last set to.
    routed: Vec<Option<MsiMessage>>,
    enabled: bool,
    function_masked: bool,
    /// Where the capability sits, once added.
    capability: Option<u16>,
}

impl Msix {
    /// `count` vectors (1..=[`MSIX_MAX_VECTORS`]; clamped) delivered through
    /// `vectors` (which should have at least as many), with the table and
    /// PBA at `layout`. Every entry starts masked, MSI-X disabled.
    pub fn new(count: u16, layout: MsixLayout, vectors: Arc<dyn MsiVectors>) -> Self {
        let count = usize::from(count.clamp(1, MSIX_MAX_VECTORS));
        Self {
            vectors,
            layout,
            table: vec![Entry::RESET; count],
            pending: vec![false; count],
            routed: vec![None; count],
            enabled: false,
            function_masked: false,
            capability: None,
        }
    }

    /// Adds the MSI-X capability to `config`: table size, the enable and
    /// function mask bits (the only writable ones), table and PBA
    /// locations. Returns its offset.
    pub fn add_capability(&mut self, config: &mut ConfigSpace) -> Result<u16> {
        // The table size field is N - 1; `new` keeps N in 1..=2048.
        let [s0, s1] = (self.table.len().saturating_sub(1) as u16).to_le_bytes();
        let [t0, t1, t2, t3] =
            (self.layout.table_offset | u32::from(self.layout.table_bar & 7)).to_le_bytes();
        let [p0, p1, p2, p3] = (self.layout.pba_offset | u32::from(self.layout.pba_bar & 7)).to_le_bytes();
        let body = [s0, s1, t0, t1, t2, t3, p0, p1, p2, p3];
        let [_, control_high] = (control::ENABLE | control::FUNCTION_MASK).to_le_bytes();
        let writable = [0, control_high, 0, 0, 0, 0, 0, 0, 0, 0];
        let offset = config.add_capability(capability_id::MSIX, &body, &writable)?;
        self.capability = Some(offset);
        Ok(offset)
    }

    /// The capability's offset in configuration space, once added.
    pub fn capability_offset(&self) -> Option<u16> {
        self.capability
    }

    /// Where the table and the PBA live.
    pub fn layout(&self) -> MsixLayout {
        self.layout
    }

    /// Size in bytes of the table.
    pub fn table_size(&self) -> u64 {
        (self.table.len() as u64).saturating_mul(MSIX_ENTRY_SIZE)
    }

    /// Size in bytes of the PBA (whole 64-bit words).
    pub fn pba_size(&self) -> u64 {
        (self.table.len().div_ceil(64) as u64).saturating_mul(8)
    }

    /// How many vectors the table has.
    pub fn vector_count(&self) -> u16 {
        self.table.len() as u16
    }

    /// Whether the guest enabled MSI-X.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether `vector` is pending (`None`: no such vector).
    pub fn pending(&self, vector: u16) -> Option<bool> {
        self.pending.get(usize::from(vector)).copied()
    }

    /// Whether `vector` is masked, by its entry or the function (`None`: no
    /// such vector).
    pub fn masked(&self, vector: u16) -> Option<bool> {
        let entry = self.table.get(usize::from(vector))?;
        Some(self.function_masked || entry.masked())
    }

    /// Picks up the message control register from `config` after the guest
    /// wrote configuration space: enabling MSI-X or unmasking the function
    /// routes and sends what is pending.
    pub fn update_control(&mut self, config: &ConfigSpace) {
        let Some(offset) = self.capability else {
            return;
        };
        let control = config.read_u16(offset.saturating_add(2));
        let enabled = control & control::ENABLE != 0;
        let function_masked = control & control::FUNCTION_MASK != 0;
        if (enabled, function_masked) == (self.enabled, self.function_masked) {
            return;
        }
        if enabled && !self.enabled {
            log::debug!("MSI-X enabled with {} vectors", self.table.len());
        }
        self.enabled = enabled;
        self.function_masked = function_masked;
        if !enabled {
            // Nothing is remembered without MSI-X (see the type's docs).
            self.pending.fill(false);
        }
        for vector in 0..self.table.len() {
            self.refresh(vector);
        }
    }

    /// The guest's read of the vector table.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some((index, field)) = self.table_field(offset, data.len()) else {
            log::debug!("MSI-X: {}-byte table read at {offset:#x} refused", data.len());
            return;
        };
        // table_field keeps the index inside the table.
        let Some(entry) = self.table.get(index) else {
            return;
        };
        let dwords = [
            entry.address as u32,
            (entry.address >> 32) as u32,
            entry.data,
            entry.control,
        ];
        for (chunk, dword) in data.chunks_mut(4).zip(dwords.iter().skip(field)) {
            chunk.copy_from_slice(&dword.to_le_bytes());
        }
    }

    /// The guest's write to the vector table. Rewriting an entry while it
    /// is deliverable moves its route at once ("vector changes while
    /// running"); unmasking an entry sends what is pending for it.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let Some((index, field)) = self.table_field(offset, data.len()) else {
            log::debug!("MSI-X: {}-byte table write at {offset:#x} refused", data.len());
            return;
        };
        // table_field keeps the index inside the table.
        let Some(entry) = self.table.get_mut(index) else {
            return;
        };
        // table_field only accepts 4- and 8-byte accesses: whole dwords.
        for (field, chunk) in (field..).zip(data.chunks_exact(4)) {
            let mut dword = [0u8; 4];
            dword.copy_from_slice(chunk);
            let value = u32::from_le_bytes(dword);
            match field {
                0 => entry.address = (entry.address & !0xffff_ffff) | u64::from(value),
                1 => entry.address = (entry.address & 0xffff_ffff) | (u64::from(value) << 32),
                2 => entry.data = value,
                _ => entry.control = value & VECTOR_MASKED,
            }
        }
        self.refresh(index);
    }

    /// The guest's read of the pending-bit array.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let aligned = matches!(data.len(), 4 | 8) && offset.is_multiple_of(data.len() as u64);
        if !aligned || offset.saturating_add(data.len() as u64) > self.pba_size() {
            log::debug!("MSI-X: {}-byte PBA read at {offset:#x} refused", data.len());
            return;
        }
        // Byte n of the PBA holds the pending bits of vectors 8n..8n+8.
        let Ok(first) = usize::try_from(offset) else {
            return;
        };
        for (byte, pending) in data.iter_mut().zip(self.pending.chunks(8).skip(first)) {
            for (bit, &pending) in pending.iter().enumerate() {
                *byte |= u8::from(pending) << bit;
            }
        }
    }

    /// The guest's write to the PBA: read-only, ignored.
    pub fn write_pba(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "MSI-X: {}-byte write to the read-only PBA at {offset:#x} ignored",
            data.len()
        );
    }

    /// For a snapshot: the table, the pending bits and the control bits.
    pub fn save_state(&self) -> MsixState {
        MsixState {
            entries: self
                .table
                .iter()
                .map(|e| (e.address, e.data, e.control))
                .collect(),
            pending: self.pending.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Puts a saved table back (same vector count) and routes every vector
    /// that is deliverable, as the guest had them.
    pub fn restore_state(&mut self, state: &MsixState) -> Result<()> {
        if state.entries.len() != self.table.len() || state.pending.len() != self.table.len() {
            return Err(crate::Error::State(format!(
                "{} MSI-X vectors saved, this function has {}",
                state.entries.len(),
                self.table.len()
            )));
        }
        for (entry, &(address, data, control)) in self.table.iter_mut().zip(&state.entries) {
            *entry = Entry {
                address,
                data,
                control,
            };
        }
        self.pending.copy_from_slice(&state.pending);
        self.enabled = state.enabled;
        self.function_masked = state.function_masked;
        for vector in 0..self.table.len() {
            self.refresh(vector);
        }
        Ok(())
    }

    /// The device wants `vector` sent: sends it if deliverable, else marks
    /// it pending (with MSI-X enabled). A vector the table does not have is
    /// an error of the device model, not of the guest.
    pub fn signal(&mut self, vector: u16) -> Result<()> {
        let index = usize::from(vector);
        let Some(entry) = self.table.get(index) else {
            return Err(crate::Error::NoSuchVector {
                vector,
                count: self.table.len() as u16,
            });
        };
        if !self.enabled {
            return Ok(());
        }
        if self.function_masked || entry.masked() {
            // The pending bits are as many as the table's entries.
            if let Some(pending) = self.pending.get_mut(index) {
                *pending = true;
            }
            return Ok(());
        }
        self.send(index)
    }

    /// Back to the power-on state: MSI-X disabled, every entry masked and
    /// zero, nothing pending; routes withdrawn. (A virtio reset does not do
    /// this; a function-level reset does.)
    pub fn reset(&mut self, config: &mut ConfigSpace) {
        if let Some(offset) = self.capability {
            let control_offset = offset.saturating_add(2);
            let control = config.read_u16(control_offset) & !(control::ENABLE | control::FUNCTION_MASK);
            config.set_u16(control_offset, control);
        }
        self.enabled = false;
        self.function_masked = false;
        self.table.fill(Entry::RESET);
        self.pending.fill(false);
        for vector in 0..self.table.len() {
            self.route(vector, None);
        }
    }

    /// The entry and the dword within it (0–3) an access reaches, if it is
    /// a 4- or 8-byte naturally aligned access inside the table.
    fn table_field(&self, offset: u64, len: usize) -> Option<(usize, usize)> {
        let aligned = matches!(len, 4 | 8) && offset.is_multiple_of(len as u64);
        if !aligned || offset.checked_add(len as u64)? > self.table_size() {
            return None;
        }
        Some((
            (offset / MSIX_ENTRY_SIZE) as usize,
            (offset % MSIX_ENTRY_SIZE / 4) as usize,
        ))
    }

    fn deliverable(&self, index: usize) -> bool {
        self.enabled && !self.function_masked && self.table.get(index).is_some_and(|entry| !entry.masked())
    }

    /// After a change to entry `index` or the function's state: moves its
    /// route if it is deliverable, and sends it if it was pending.
    fn refresh(&mut self, index: usize) {
        if !self.deliverable(index) {
            return;
        }
        let Some(&entry) = self.table.get(index) else {
            return;
        };
        let message = if entry.address & MSI_ADDRESS_MASK == MSI_ADDRESS_BASE {
            Some(MsiMessage {
                address: entry.address,
                data: entry.data,
            })
        } else {
            keel_ratelimit::warn_limited!(
                "MSI-X vector {index}: address {:#x} is not an interrupt address; the vector is dropped",
                entry.address
            );
            None
        };
        self.route(index, message);
        // Sends it if it was pending, clearing the bit.
        if self.pending.get_mut(index).is_some_and(std::mem::take) {
            if let Err(e) = self.send(index) {
                keel_ratelimit::warn_limited!("MSI-X vector {index}: cannot send the pending message: {e}");
            }
        }
    }

    fn route(&mut self, index: usize, message: Option<MsiMessage>) {
        let Some(routed) = self.routed.get_mut(index) else {
            return;
        };
        if *routed == message {
            return;
        }
        match self.vectors.set_message(index as u16, message) {
            Ok(()) => *routed = message,
            Err(e) => keel_ratelimit::warn_limited!("MSI-X vector {index}: cannot route it: {e}"),
        }
    }

    fn send(&self, index: usize) -> Result<()> {
        if self.routed.get(index).copied().flatten().is_none() {
            // No interrupt address: a message a real function would send
            // as a write to memory, which this model never does.
            return Ok(());
        }
        self.vectors.trigger(index as u16)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HeaderType, PciIds};
    use keel_irq::RecordingMsiVectors;

    const LAYOUT: MsixLayout = MsixLayout {
        table_bar: 2,
        table_offset: 0x2000,
        pba_bar: 2,
        pba_offset: 0x3000,
    };

    struct Setup {
        msix: Msix,
        config: ConfigSpace,
        cap: u16,
        vectors: Arc<RecordingMsiVectors>,
    }

    impl Setup {
        fn new(count: u16) -> Self {
            let vectors = Arc::new(RecordingMsiVectors::new(count));
            let mut config = ConfigSpace::new(
                HeaderType::Device,
                PciIds {
                    vendor: 0x1af4,
                    device: 0x1042,
                    revision: 1,
                    class: 0x01_80_00,
                    subsystem_vendor: 0x1af4,
                    subsystem: 0x40,
                },
            );
            let mut msix = Msix::new(count, LAYOUT, vectors.clone());
            let cap = msix.add_capability(&mut config).unwrap();
            Self {
                msix,
                config,
                cap,
                vectors,
            }
        }

        fn control(&mut self, value: u16) {
            self.config.write(self.cap + 2, &value.to_le_bytes());
            self.msix.update_control(&self.config);
        }

        fn program(&mut self, vector: u64, data: u32, masked: bool) {
            let base = vector * 16;
            self.msix.write_table(base, &0xfee0_0000u32.to_le_bytes());
            self.msix.write_table(base + 4, &0u32.to_le_bytes());
            self.msix.write_table(base + 8, &data.to_le_bytes());
            self.msix.write_table(base + 12, &u32::from(masked).to_le_bytes());
        }

        fn table_dword(&self, offset: u64) -> u32 {
            let mut data = [0xaa; 4];
            self.msix.read_table(offset, &mut data);
            u32::from_le_bytes(data)
        }
    }

    #[test]
    fn capability_announces_size_locations_and_only_two_writable_bits() {
        let mut s = Setup::new(3);
        assert_eq!(s.config.read_u32(s.cap) & 0xff, 0x11);
        assert_eq!(s.config.read_u16(s.cap + 2), 2, "table size - 1");
        assert_eq!(s.config.read_u32(s.cap + 4), 0x2002);
        assert_eq!(s.config.read_u32(s.cap + 8), 0x3002);
        s.config.write(s.cap + 2, &0xffffu16.to_le_bytes());
        assert_eq!(s.config.read_u16(s.cap + 2), 0xc002);
        s.config.write(s.cap + 4, &0u32.to_le_bytes());
        assert_eq!(s.config.read_u32(s.cap + 4), 0x2002);
    }

    #[test]
    fn entries_reset_masked_and_vector_control_keeps_only_the_mask_bit() {
        let mut s = Setup::new(2);
        assert_eq!(s.table_dword(12), 1);
        s.msix.write_table(12, &u32::MAX.to_le_bytes());
        assert_eq!(s.table_dword(12), 1);
        s.msix.write_table(28, &0xfffe_u32.to_le_bytes());
        assert_eq!(s.table_dword(28), 0);
    }

    #[test]
    fn eight_byte_accesses_cover_two_dwords() {
        let mut s = Setup::new(1);
        s.msix.write_table(0, &0x0000_0001_fee0_1000u64.to_le_bytes());
        let mut data = [0u8; 8];
        s.msix.read_table(0, &mut data);
        assert_eq!(u64::from_le_bytes(data), 0x0000_0001_fee0_1000);
    }

    #[test]
    fn unmasked_vector_is_routed_and_sent_at_once() {
        let mut s = Setup::new(2);
        s.control(0x8000);
        s.program(0, 0x41, false);
        s.msix.signal(0).unwrap();
        assert_eq!(s.vectors.triggers(), [0]);
        assert_eq!(
            s.vectors.message(0),
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x41
            })
        );
    }

    #[test]
    fn masked_vector_becomes_pending_and_is_sent_on_unmask() {
        let mut s = Setup::new(2);
        s.control(0x8000);
        s.program(1, 0x42, true);
        s.msix.signal(1).unwrap();
        s.msix.signal(1).unwrap();
        assert!(s.vectors.triggers().is_empty());
        let mut pba = [0u8; 8];
        s.msix.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0b10);
        s.msix.write_table(28, &0u32.to_le_bytes());
        assert_eq!(s.vectors.triggers(), [1], "one message for the pending bit");
        assert_eq!(s.msix.pending(1), Some(false));
    }

    #[test]
    fn function_mask_holds_every_vector_until_cleared() {
        let mut s = Setup::new(2);
        s.program(0, 0x41, false);
        s.program(1, 0x42, false);
        s.control(0xc000);
        s.msix.signal(0).unwrap();
        s.msix.signal(1).unwrap();
        assert!(s.vectors.triggers().is_empty());
        assert_eq!(s.msix.masked(0), Some(true));
        s.control(0x8000);
        assert_eq!(s.vectors.triggers(), [0, 1]);
    }

    #[test]
    fn disabled_msix_sends_nothing_and_remembers_nothing() {
        let mut s = Setup::new(1);
        s.program(0, 0x41, false);
        s.msix.signal(0).unwrap();
        assert_eq!(s.msix.pending(0), Some(false));
        s.control(0x8000);
        assert!(s.vectors.triggers().is_empty());
        assert_eq!(s.vectors.message(0).map(|m| m.data), Some(0x41));
    }

    #[test]
    fn rewriting_a_live_vector_moves_its_route() {
        let mut s = Setup::new(1);
        s.control(0x8000);
        s.program(0, 0x41, false);
        s.msix.write_table(8, &0x45u32.to_le_bytes());
        s.msix.signal(0).unwrap();
        assert_eq!(s.vectors.message(0).map(|m| m.data), Some(0x45));
        // While masked, rewrites do not touch the route.
        s.msix.write_table(12, &1u32.to_le_bytes());
        s.msix.write_table(8, &0x46u32.to_le_bytes());
        assert_eq!(s.vectors.message(0).map(|m| m.data), Some(0x45));
        s.msix.write_table(12, &0u32.to_le_bytes());
        assert_eq!(s.vectors.message(0).map(|m| m.data), Some(0x46));
    }

    #[test]
    fn a_message_outside_the_interrupt_range_gets_no_route_and_no_send() {
        let mut s = Setup::new(1);
        s.control(0x8000);
        s.program(0, 0x41, false);
        s.msix.write_table(0, &0x0010_0000u32.to_le_bytes()); // guest RAM
        s.msix.signal(0).unwrap();
        assert_eq!(s.vectors.message(0), None);
        assert!(s.vectors.triggers().is_empty());
    }

    #[test]
    fn out_of_range_and_malformed_accesses_are_ignored() {
        let mut s = Setup::new(2);
        let before = (s.table_dword(0), s.table_dword(12));
        for (offset, len) in [
            (32u64, 4usize),
            (28, 8),
            (2, 4),
            (4, 8),
            (0, 2),
            (0, 1),
            (0, 16),
            (u64::MAX - 3, 4),
            (u64::MAX, 8),
        ] {
            s.msix.write_table(offset, &vec![0xffu8; len]);
            let mut data = vec![0xaau8; len];
            s.msix.read_table(offset, &mut data);
            assert!(data.iter().all(|&b| b == 0), "{len} bytes at {offset:#x}");
        }
        assert_eq!((s.table_dword(0), s.table_dword(12)), before);
        for (offset, len) in [(8u64, 4usize), (4, 8), (1, 4), (u64::MAX, 4)] {
            let mut data = vec![0xaau8; len];
            s.msix.read_pba(offset, &mut data);
            assert!(data.iter().all(|&b| b == 0));
        }
        s.msix.write_pba(0, &[0xff; 8]);
        assert_eq!(s.msix.pending(0), Some(false));
    }

    #[test]
    fn signalling_a_vector_the_table_does_not_have_is_an_error() {
        let mut s = Setup::new(2);
        let err = s.msix.signal(2).unwrap_err();
        assert!(err.to_string().contains("vector 2"), "{err}");
    }

    #[test]
    fn reset_masks_everything_and_withdraws_routes() {
        let mut s = Setup::new(1);
        s.control(0x8000);
        s.program(0, 0x41, false);
        s.msix.signal(0).unwrap();
        s.msix.reset(&mut s.config);
        assert_eq!(s.config.read_u16(s.cap + 2) & 0xc000, 0);
        assert!(!s.msix.enabled());
        assert_eq!(s.table_dword(12), 1);
        assert_eq!(s.vectors.message(0), None);
    }

    #[test]
    fn table_and_pba_sizes_follow_the_vector_count() {
        let s = Setup::new(65);
        assert_eq!(s.msix.table_size(), 65 * 16);
        assert_eq!(s.msix.pba_size(), 16);
        let clamped = Msix::new(0, LAYOUT, Arc::new(RecordingMsiVectors::new(1)));
        assert_eq!(clamped.vector_count(), 1);
    }

    #[test]
    fn a_saved_table_is_restored_with_its_routes_and_config_space_with_its_identity() {
        let mut original = Setup::new(2);
        original.control(control::ENABLE);
        original.program(1, 0x41, false);
        let config_regs = original.config.save_registers();
        let state = original.msix.save_state();

        let mut restored = Setup::new(2);
        restored.config.restore_registers(&config_regs).unwrap();
        restored.msix.restore_state(&state).unwrap();
        assert!(restored.msix.enabled());
        assert_eq!(
            restored.vectors.message(1),
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x41
            }),
            "the deliverable vector is routed again"
        );
        restored.msix.signal(1).unwrap();
        assert_eq!(restored.vectors.triggers(), [1]);

        let mut other = Setup::new(3);
        let err = other.msix.restore_state(&state).unwrap_err().to_string();
        assert_eq!(err, "PCI state: 2 MSI-X vectors saved, this function has 3");
        let mut foreign = config_regs.clone();
        foreign[2] ^= 1;
        let err = other.config.restore_registers(&foreign).unwrap_err().to_string();
        assert!(err.contains("(vendor, device)"), "{err}");
        assert!(other.config.restore_registers(&config_regs[..64]).is_err());
    }
}
