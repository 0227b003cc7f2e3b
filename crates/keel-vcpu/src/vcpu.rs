//! One virtual CPU and its run loop.

use std::sync::atomic::{AtomicBool, Ordering};

use keel_memory::GuestMemoryMmap;
use kvm_bindings::{CpuId, KVM_INTERNAL_ERROR_EMULATION, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};

use crate::boot_state::{
    boot_fpu, boot_msrs, lint_pins_as_pc, long_mode_regs, long_mode_sregs, pvh_regs, pvh_sregs,
};
use crate::kick::{install_kick_handler, RunningGuard};
use crate::{CpuidConfig, Error, ExitHandler, Result};

/// What one `KVM_RUN` ended with, after the vCPU handled what it could.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RunOutcome {
    /// An exit was handled (I/O dispatched, #BP injected, …); run again.
    Continue,
    /// `KVM_RUN` was interrupted by a kick or a signal; check why, then run
    /// again or stop.
    Interrupted,
    /// The guest executed `HLT` and KVM (no in-kernel irqchip) handed it
    /// back.
    Halted,
    /// The guest triple-faulted (`KVM_EXIT_SHUTDOWN`).
    TripleFault,
    /// The guest asked for a reset through a KVM system event (PSCI/ACPI).
    Reset,
    /// The guest asked to power off through a KVM system event.
    PowerOff,
}

/// Why [`Vcpu::run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum VcpuStop {
    /// The stop flag was set (by whoever decided the VM is done).
    Requested,
    /// The guest triple-faulted.
    TripleFault,
    /// The guest asked for a reset through a KVM system event.
    Reset,
    /// The guest asked to power off through a KVM system event.
    PowerOff,
}

/// A KVM virtual CPU.
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    pub(crate) id: u8,
    mem: GuestMemoryMmap,
    bp_injections: u64,
    emulated_fwaits: u64,
    completed_instructions: u64,
    counters: std::sync::Arc<crate::VcpuCounters>,
    /// The CPUID last set through [`Vcpu::configure_cpuid`]: what a saved
    /// state records (some hosts' `KVM_GET_CPUID2` does not give back
    /// what was set).
    pub(crate) cpuid: std::sync::Mutex<Option<CpuId>>,
}

impl Vcpu {
    /// Creates vCPU `id` of `vm`. `mem` is used to read the instruction at
    /// RIP when KVM cannot emulate it.
    pub fn new(vm: &VmFd, id: u8, mem: GuestMemoryMmap) -> Result<Self> {
        install_kick_handler()?;
        let fd = vm.create_vcpu(u64::from(id)).map_err(|source| Error::Kvm {
            op: "KVM_CREATE_VCPU",
            vcpu: id,
            source,
        })?;
        Ok(Vcpu {
            fd,
            id,
            mem,
            bp_injections: 0,
            emulated_fwaits: 0,
            completed_instructions: 0,
            counters: Default::default(),
            cpuid: std::sync::Mutex::new(None),
        })
    }

    /// The exit counters, to read from another thread while this vCPU runs.
    pub fn counters(&self) -> std::sync::Arc<crate::VcpuCounters> {
        self.counters.clone()
    }

    /// This vCPU's index (and APIC ID).
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The underlying `kvm-ioctls` handle, for what this crate does not wrap.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// How many `int3` emulation failures were turned into #BP injections.
    pub fn bp_injections(&self) -> u64 {
        self.bp_injections
    }

    pub(crate) fn kvm<T>(&self, op: &'static str, r: std::result::Result<T, kvm_ioctls::Error>) -> Result<T> {
        r.map_err(|source| Error::Kvm {
            op,
            vcpu: self.id,
            source,
        })
    }

    /// How many other instructions the host's KVM could not emulate were
    /// completed by the VMM (`ldmxcsr`, `fxrstor`, …; see
    /// `docs/host-kvm-notes.md`).
    pub fn completed_instructions(&self) -> u64 {
        self.completed_instructions
    }

    /// How many `fwait` emulation failures were completed by the VMM.
    pub fn emulated_fwaits(&self) -> u64 {
        self.emulated_fwaits
    }

    /// Sets CPUID: `supported` (from `KVM_GET_SUPPORTED_CPUID`) transformed
    /// by `config`.
    pub fn configure_cpuid(&self, supported: &CpuId, config: &CpuidConfig) -> Result<()> {
        let mut cpuid = supported.clone();
        config.apply(&mut cpuid);
        self.kvm("KVM_SET_CPUID2", self.fd.set_cpuid2(&cpuid))?;
        *self.cpuid.lock().unwrap_or_else(|e| e.into_inner()) = Some(cpuid);
        Ok(())
    }

    /// Sets the boot MSRs ([`crate::boot_msrs`]).
    pub fn configure_msrs(&self) -> Result<()> {
        let msrs = boot_msrs();
        let set = self.kvm("KVM_SET_MSRS", self.fd.set_msrs(&msrs))?;
        // KVM stops at the first MSR it refuses.
        match msrs.as_slice().get(set) {
            Some(refused) => Err(Error::MsrRejected {
                vcpu: self.id,
                index: refused.index,
            }),
            None => Ok(()),
        }
    }

    /// Routes LINT0 as ExtINT and LINT1 as NMI. Needs the in-kernel irqchip.
    pub fn configure_lapic(&self) -> Result<()> {
        let state = self.kvm("KVM_GET_LAPIC", self.fd.get_lapic())?;
        self.kvm("KVM_SET_LAPIC", self.fd.set_lapic(&lint_pins_as_pc(state)))
    }

    /// Sets registers for Linux's 64-bit entry at `entry`. The boot tables
    /// must be in memory ([`crate::write_boot_tables`]).
    pub fn configure_long_mode_entry(&self, entry: GuestAddress) -> Result<()> {
        let sregs = self.kvm("KVM_GET_SREGS", self.fd.get_sregs())?;
        self.kvm("KVM_SET_SREGS", self.fd.set_sregs(&long_mode_sregs(sregs)))?;
        self.kvm("KVM_SET_REGS", self.fd.set_regs(&long_mode_regs(entry)))?;
        self.kvm("KVM_SET_FPU", self.fd.set_fpu(&boot_fpu()))
    }

    /// Sets registers for a PVH entry at `entry`, `EBX` = `start_info`.
    pub fn configure_pvh_entry(&self, entry: GuestAddress, start_info: GuestAddress) -> Result<()> {
        let sregs = self.kvm("KVM_GET_SREGS", self.fd.get_sregs())?;
        self.kvm("KVM_SET_SREGS", self.fd.set_sregs(&pvh_sregs(sregs)))?;
        self.kvm("KVM_SET_REGS", self.fd.set_regs(&pvh_regs(entry, start_info)))?;
        self.kvm("KVM_SET_FPU", self.fd.set_fpu(&boot_fpu()))
    }

    /// Runs the guest until the next exit user space must see, handles it,
    /// and says what happened.
    pub fn run_once(&mut self, io: &dyn ExitHandler) -> Result<RunOutcome> {
        let _running = RunningGuard::new(self.fd.get_kvm_run());
        let id = self.id;
        let counters = &*self.counters;
        let count = |c: &std::sync::atomic::AtomicU64| crate::VcpuCounters::bump(c);
        let exit = self.fd.run();
        match &exit {
            Ok(VcpuExit::IoOut(..)) => count(&counters.io_out),
            Ok(VcpuExit::IoIn(..)) => count(&counters.io_in),
            Ok(VcpuExit::MmioRead(..)) => count(&counters.mmio_read),
            Ok(VcpuExit::MmioWrite(..)) => count(&counters.mmio_write),
            Ok(VcpuExit::IoapicEoi(..)) => count(&counters.ioapic_eoi),
            Ok(VcpuExit::Hlt) => count(&counters.hlt),
            Ok(VcpuExit::Shutdown) => count(&counters.shutdown),
            Ok(VcpuExit::SystemEvent(..)) => count(&counters.system_event),
            Ok(VcpuExit::InternalError) => count(&counters.internal_error),
            Ok(VcpuExit::Intr) => count(&counters.interrupted),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => count(&counters.interrupted),
            _ => count(&counters.failures),
        }
        let pio = match exit {
            Ok(VcpuExit::IoOut(port, _)) => Some((port, true)),
            Ok(VcpuExit::IoIn(port, _)) => Some((port, false)),
            Ok(VcpuExit::MmioRead(addr, data)) => {
                io.mmio_read(addr, data);
                return Ok(RunOutcome::Continue);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                io.mmio_write(addr, data);
                return Ok(RunOutcome::Continue);
            }
            Ok(VcpuExit::IoapicEoi(vector)) => {
                io.ioapic_eoi(vector);
                return Ok(RunOutcome::Continue);
            }
            Ok(VcpuExit::Hlt) => return Ok(RunOutcome::Halted),
            Ok(VcpuExit::Shutdown) => return Ok(RunOutcome::TripleFault),
            Ok(VcpuExit::Intr) => return Ok(self.interrupted()),
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                return match kind {
                    KVM_SYSTEM_EVENT_RESET => Ok(RunOutcome::Reset),
                    KVM_SYSTEM_EVENT_SHUTDOWN => Ok(RunOutcome::PowerOff),
                    other => Err(Error::UnexpectedExit {
                        vcpu: id,
                        exit: format!("system event {other}"),
                    }),
                };
            }
            Ok(VcpuExit::InternalError) => None,
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Err(Error::FailEntry {
                    vcpu: id,
                    reason,
                    cpu,
                });
            }
            Ok(other) => {
                return Err(Error::UnexpectedExit {
                    vcpu: id,
                    exit: format!("{other:?}"),
                })
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Ok(self.interrupted());
            }
            Err(source) => {
                return Err(Error::Kvm {
                    op: "KVM_RUN",
                    vcpu: id,
                    source,
                })
            }
        };
        match pio {
            Some((port, is_out)) => {
                self.dispatch_pio(io, port, is_out);
                Ok(RunOutcome::Continue)
            }
            None => self.internal_error(),
        }
    }

    fn interrupted(&mut self) -> RunOutcome {
        self.fd.set_kvm_immediate_exit(0);
        RunOutcome::Interrupted
    }

    /// String I/O (`rep outsb` and friends) arrives as `count` items of
    /// `size` bytes; each goes to the device separately, like on hardware.
    fn dispatch_pio(&mut self, io: &dyn ExitHandler, port: u16, is_out: bool) {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_IO (we just matched IoIn/IoOut),
        // so `io` is the active union member.
        let info = unsafe { run.__bindgen_anon_1.io };
        let size = usize::from(info.size);
        // KVM puts the data in the page after kvm_run (KVM_PIO_PAGE_OFFSET)
        // and never more than that page holds.
        let Some(total) = usize::try_from(info.count)
            .ok()
            .and_then(|count| size.checked_mul(count))
            .filter(|&total| size != 0 && total <= 4096)
        else {
            log::warn!(
                "vCPU {}: malformed port I/O exit (size {size}, count {})",
                self.id,
                info.count
            );
            return;
        };
        // SAFETY: KVM places the data `data_offset` bytes into the vCPU's
        // mapping (as kvm-ioctls also relies on), at most a page of it, and
        // the mapping outlives this borrow.
        let data = unsafe {
            std::slice::from_raw_parts_mut(
                (run as *mut kvm_bindings::kvm_run as *mut u8).add(info.data_offset as usize),
                total,
            )
        };
        for item in data.chunks_mut(size) {
            if is_out {
                io.pio_write(port, item);
            } else {
                io.pio_read(port, item);
            }
        }
    }

    /// Reads up to 15 bytes of the instruction at the guest's RIP.
    pub fn instruction_at_rip(&self) -> Result<(u64, Vec<u8>)> {
        let rip = self.kvm("KVM_GET_REGS", self.fd.get_regs())?.rip;
        let sregs = self.kvm("KVM_GET_SREGS", self.fd.get_sregs())?;
        let linear = sregs.cs.base.wrapping_add(rip);
        let mut translate_error = None;
        let bytes = fetch_instruction(
            linear,
            |addr| match self.fd.translate_gva(addr) {
                Ok(t) if t.valid != 0 => Some(t.physical_address),
                Ok(_) => None,
                Err(e) => {
                    translate_error = Some(e);
                    None
                }
            },
            |gpa, chunk| self.mem.read_slice(chunk, GuestAddress(gpa)).is_ok(),
        );
        if let Some(e) = translate_error {
            return self.kvm("KVM_TRANSLATE", Err(e));
        }
        Ok((rip, bytes))
    }

    fn internal_error(&mut self) -> Result<RunOutcome> {
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal`
        // is the active union member.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let (rip, bytes) = self.instruction_at_rip()?;
        if internal.suberror == KVM_INTERNAL_ERROR_EMULATION && bytes.first() == Some(&0xcc) {
            // A software-emulated ring 0 cannot emulate `int3`; do what the
            // CPU would: the trap's return address is past the instruction,
            // then deliver #BP.
            self.inject_breakpoint(rip)?;
            return Ok(RunOutcome::Continue);
        }
        if internal.suberror == KVM_INTERNAL_ERROR_EMULATION && bytes.first() == Some(&0x9b) {
            // Nor can it emulate `fwait`, which Linux runs when it drops a
            // task's FPU state. Do what the CPU does: raise #MF if an
            // unmasked x87 exception is pending (FSW.ES), else nothing.
            self.emulate_fwait(rip)?;
            return Ok(RunOutcome::Continue);
        }
        if internal.suberror == KVM_INTERNAL_ERROR_EMULATION && self.complete_instruction(rip, &bytes)? {
            return Ok(RunOutcome::Continue);
        }
        Err(Error::InternalError {
            vcpu: self.id,
            suberror: internal.suberror,
            rip,
            bytes,
        })
    }

    /// Completes an instruction the host's emulator lacks, if it is one
    /// Keel knows (see [`crate::complete`]); `false` if not.
    fn complete_instruction(&mut self, rip: u64, bytes: &[u8]) -> Result<bool> {
        let regs = self.kvm("KVM_GET_REGS", self.fd.get_regs())?;
        let mut sregs = self.kvm("KVM_GET_SREGS", self.fd.get_sregs())?;
        let fpu = self.kvm("KVM_GET_FPU", self.fd.get_fpu())?;
        let mut machine = GuestMachine {
            fd: &self.fd,
            mem: &self.mem,
            regs: &regs,
            sregs: &sregs,
            fpu,
        };
        let completion = crate::complete::complete(bytes, rip, &mut machine);
        let fpu = machine.fpu;
        let inject =
            |fd: &VcpuFd, nr: u8, error_code: Option<u32>| -> std::result::Result<(), kvm_ioctls::Error> {
                let mut events = fd.get_vcpu_events()?;
                events.exception.injected = 1;
                events.exception.nr = nr;
                events.exception.has_error_code = u8::from(error_code.is_some());
                events.exception.error_code = error_code.unwrap_or(0);
                fd.set_vcpu_events(&events)
            };
        match completion {
            crate::complete::Completion::Unsupported => return Ok(false),
            crate::complete::Completion::Done { len } => {
                self.kvm("KVM_SET_FPU", self.fd.set_fpu(&fpu))?;
                let mut regs = regs;
                regs.rip = rip.wrapping_add(len);
                self.kvm("KVM_SET_REGS", self.fd.set_regs(&regs))?;
            }
            crate::complete::Completion::GeneralProtection => {
                self.kvm("KVM_SET_VCPU_EVENTS", inject(&self.fd, 13, Some(0)))?;
            }
            crate::complete::Completion::PageFault { address, write } => {
                // Not present, in supervisor mode (the emulator only fails
                // in ring 0); a write sets bit 1.
                sregs.cr2 = address;
                self.kvm("KVM_SET_SREGS", self.fd.set_sregs(&sregs))?;
                let error_code = if write { 2 } else { 0 };
                self.kvm("KVM_SET_VCPU_EVENTS", inject(&self.fd, 14, Some(error_code)))?;
            }
        }
        self.completed_instructions = self.completed_instructions.saturating_add(1);
        crate::VcpuCounters::bump(&self.counters.completed_instructions);
        log::debug!(
            "vCPU {}: completed {:02x?} at {rip:#x} for the host's emulator: {completion:?}",
            self.id,
            bytes
        );
        Ok(true)
    }

    fn emulate_fwait(&mut self, rip: u64) -> Result<()> {
        const FSW_ES: u16 = 1 << 7;
        const MF_VECTOR: u8 = 16;
        let fpu = self.kvm("KVM_GET_FPU", self.fd.get_fpu())?;
        if fpu.fsw & FSW_ES != 0 {
            // #MF is a fault: it reports the fwait itself.
            let mut events = self.kvm("KVM_GET_VCPU_EVENTS", self.fd.get_vcpu_events())?;
            events.exception.injected = 1;
            events.exception.nr = MF_VECTOR;
            events.exception.has_error_code = 0;
            self.kvm("KVM_SET_VCPU_EVENTS", self.fd.set_vcpu_events(&events))?;
        } else {
            let mut regs = self.kvm("KVM_GET_REGS", self.fd.get_regs())?;
            regs.rip = rip.wrapping_add(1);
            self.kvm("KVM_SET_REGS", self.fd.set_regs(&regs))?;
        }
        self.emulated_fwaits = self.emulated_fwaits.saturating_add(1);
        Ok(())
    }

    fn inject_breakpoint(&mut self, rip: u64) -> Result<()> {
        let mut regs = self.kvm("KVM_GET_REGS", self.fd.get_regs())?;
        regs.rip = rip.wrapping_add(1);
        self.kvm("KVM_SET_REGS", self.fd.set_regs(&regs))?;
        let mut events = self.kvm("KVM_GET_VCPU_EVENTS", self.fd.get_vcpu_events())?;
        events.exception.injected = 1;
        events.exception.nr = 3;
        events.exception.has_error_code = 0;
        events.exception.error_code = 0;
        self.kvm("KVM_SET_VCPU_EVENTS", self.fd.set_vcpu_events(&events))?;
        self.bp_injections = self.bp_injections.saturating_add(1);
        Ok(())
    }

    /// Finishes a port or MMIO exit whose result KVM has not yet taken
    /// back (an `in`'s value reaches RAX only at the next `KVM_RUN`): enters
    /// KVM with `immediate_exit` set, which completes it without running
    /// guest code. Afterwards the registers are the guest's true state.
    fn complete_pending_exit(&mut self, io: &dyn ExitHandler) -> Result<()> {
        // A string instruction may need a few more exits to finish its
        // current item; each is handled like any other.
        for _ in 0..16 {
            self.fd.set_kvm_immediate_exit(1);
            match self.run_once(io)? {
                RunOutcome::Continue => continue,
                _ => break,
            }
        }
        self.fd.set_kvm_immediate_exit(0);
        Ok(())
    }

    /// Runs until `stop` is set (then kick the thread with a
    /// [`crate::VcpuKicker`]) or the guest ends its own life. When it
    /// returns [`VcpuStop::Requested`], no exit is left half-done: the
    /// vCPU's state can be saved ([`Vcpu::save_state`]).
    pub fn run(&mut self, io: &dyn ExitHandler, stop: &AtomicBool) -> Result<VcpuStop> {
        // Marked as running for the whole loop, so a kick that lands
        // between the flag check and KVM_RUN still sets immediate_exit.
        let _running = RunningGuard::new(self.fd.get_kvm_run());
        loop {
            if stop.load(Ordering::Acquire) {
                self.complete_pending_exit(io)?;
                return Ok(VcpuStop::Requested);
            }
            match self.run_once(io)? {
                RunOutcome::Continue | RunOutcome::Interrupted => {}
                // With the in-kernel irqchip KVM handles HLT itself; without
                // it there is nothing to wake us but a kick, so wait for one.
                RunOutcome::Halted => std::thread::park_timeout(std::time::Duration::from_millis(1)),
                RunOutcome::TripleFault => return Ok(VcpuStop::TripleFault),
                RunOutcome::Reset => return Ok(VcpuStop::Reset),
                RunOutcome::PowerOff => return Ok(VcpuStop::PowerOff),
            }
        }
    }
}

/// Up to 15 bytes of the instruction at linear address `linear`, page by
/// page: `translate` maps a linear address to a guest physical one (`None`
/// where unmapped), `read` fills a chunk from guest memory. Stops at the
/// first unmapped or unreadable page, and at the top of the address space
/// (the guest chooses RIP and CS.base; nothing here may overflow).
fn fetch_instruction(
    linear: u64,
    mut translate: impl FnMut(u64) -> Option<u64>,
    mut read: impl FnMut(u64, &mut [u8]) -> bool,
) -> Vec<u8> {
    const MAX_INSTRUCTION: usize = 15;
    let mut bytes = Vec::with_capacity(MAX_INSTRUCTION);
    let mut addr = Some(linear);
    while let Some(at) = addr {
        if bytes.len() >= MAX_INSTRUCTION {
            break;
        }
        let Some(gpa) = translate(at) else {
            break;
        };
        let len = left_in_page(at).min(MAX_INSTRUCTION.saturating_sub(bytes.len()));
        let mut chunk = [0u8; MAX_INSTRUCTION];
        let Some(chunk) = chunk.get_mut(..len) else {
            break;
        };
        if !read(gpa, chunk) {
            break;
        }
        bytes.extend_from_slice(chunk);
        addr = at.checked_add(len as u64);
    }
    bytes
}

/// Bytes from `at` to the end of its 4 KiB page: 1..=4096.
fn left_in_page(at: u64) -> usize {
    // `at & 0xfff` is at most 4095: the subtraction cannot wrap.
    0x1000usize.saturating_sub((at & 0xfff) as usize)
}

/// The guest as [`crate::complete`] sees it: registers, segment bases,
/// linear memory through the guest's page tables, and the FPU.
struct GuestMachine<'a> {
    fd: &'a VcpuFd,
    mem: &'a GuestMemoryMmap,
    regs: &'a kvm_bindings::kvm_regs,
    sregs: &'a kvm_bindings::kvm_sregs,
    fpu: kvm_bindings::kvm_fpu,
}

impl GuestMachine<'_> {
    /// Calls `access(gpa, range)` for each page-sized piece of `len` bytes
    /// at `linear`; `Err(addr)` at the first unmapped byte.
    fn each_page(
        &self,
        linear: u64,
        len: usize,
        mut access: impl FnMut(u64, std::ops::Range<usize>) -> bool,
    ) -> std::result::Result<(), u64> {
        let mut done = 0usize;
        while done < len {
            // Linear addresses wrap around the address space.
            let at = linear.wrapping_add(done as u64);
            let end = done.saturating_add(left_in_page(at)).min(len);
            let gpa = match self.fd.translate_gva(at) {
                Ok(t) if t.valid != 0 => t.physical_address,
                _ => return Err(at),
            };
            if !access(gpa, done..end) {
                return Err(at);
            }
            done = end;
        }
        Ok(())
    }
}

impl crate::complete::Machine for GuestMachine<'_> {
    fn gpr(&self, register: iced_x86::Register) -> u64 {
        use iced_x86::Register as R;
        let r = self.regs;
        match register.full_register() {
            R::RAX => r.rax,
            R::RBX => r.rbx,
            R::RCX => r.rcx,
            R::RDX => r.rdx,
            R::RSI => r.rsi,
            R::RDI => r.rdi,
            R::RSP => r.rsp,
            R::RBP => r.rbp,
            R::R8 => r.r8,
            R::R9 => r.r9,
            R::R10 => r.r10,
            R::R11 => r.r11,
            R::R12 => r.r12,
            R::R13 => r.r13,
            R::R14 => r.r14,
            R::R15 => r.r15,
            R::RIP => r.rip,
            _ => 0,
        }
    }

    fn segment_base(&self, register: iced_x86::Register) -> u64 {
        use iced_x86::Register as R;
        match register {
            R::FS => self.sregs.fs.base,
            R::GS => self.sregs.gs.base,
            R::CS => self.sregs.cs.base,
            R::DS => self.sregs.ds.base,
            R::ES => self.sregs.es.base,
            R::SS => self.sregs.ss.base,
            _ => 0,
        }
    }

    fn read(&mut self, linear: u64, buf: &mut [u8]) -> std::result::Result<(), u64> {
        let mem = self.mem;
        self.each_page(linear, buf.len(), |gpa, range| {
            buf.get_mut(range)
                .is_some_and(|piece| mem.read_slice(piece, GuestAddress(gpa)).is_ok())
        })
    }

    fn write(&mut self, linear: u64, data: &[u8]) -> std::result::Result<(), u64> {
        let mem = self.mem;
        // Check every page first, so a fault leaves memory untouched.
        self.each_page(linear, data.len(), |_, _| true)?;
        self.each_page(linear, data.len(), |gpa, range| {
            data.get(range)
                .is_some_and(|piece| mem.write_slice(piece, GuestAddress(gpa)).is_ok())
        })
    }

    fn fpu(&mut self) -> &mut kvm_bindings::kvm_fpu {
        &mut self.fpu
    }
}

#[cfg(test)]
mod fetch_tests {
    use super::fetch_instruction;

    #[test]
    fn an_instruction_at_the_top_of_the_address_space_stops_there() {
        // RIP at 2^64 - 3: three bytes exist, then the address would wrap.
        let bytes = fetch_instruction(u64::MAX - 2, Some, |gpa, chunk| {
            chunk.fill(gpa as u8);
            true
        });
        assert_eq!(bytes.len(), 3);
    }

    #[test]
    fn an_instruction_across_a_page_boundary_is_read_from_both_pages() {
        let bytes = fetch_instruction(
            0x1ffd,
            |addr| Some(addr + 0x10_0000),
            |gpa, chunk| {
                chunk.fill(if gpa < 0x10_2000 { 1 } else { 2 });
                true
            },
        );
        assert_eq!(bytes, [1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]);
    }

    #[test]
    fn an_unmapped_next_page_ends_the_bytes_there() {
        let bytes = fetch_instruction(0x1ffe, |addr| (addr < 0x2000).then_some(addr), |_, _| true);
        assert_eq!(bytes.len(), 2);
        assert!(fetch_instruction(0x5000, |_| None, |_, _| true).is_empty());
    }
}
