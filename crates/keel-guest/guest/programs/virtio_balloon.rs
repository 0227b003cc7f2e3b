//! `virtio-balloon`: a balloon driver. Touches memory so the host has to
//! back it, inflates the balloon to the device's target with those pages,
//! answers statistics requests, reports free pages and deflates when the
//! target drops.
//!
//! The balloon's pages come from RAM above 16 MiB (the image and
//! everything the VMM writes lie below) and inside the identity map (the
//! first GiB): nothing else in the guest uses that memory.

use super::{arg, flag, virtio_devices, Context, Outcome};
use crate::boot_params::E820_RAM;
use crate::dma::{self, Buffer};
use crate::interrupts::irq_count;
use crate::println;
use crate::virtio::queue::{Chain, Virtqueue, Wait};
use crate::virtio::{device_id, feature, init_device, submit_and_wait, Transport};
use crate::tsc;

pub const KEYS: &[&str] = &[
    "touch-mib",
    "report-mib",
    "deflate",
    "stats-rounds",
    "wait-ms",
    "irq",
];

/// Feature bits (virtio 1.2, 5.5.3).
const F_STATS_VQ: u64 = 1 << 1;
const F_DEFLATE_ON_OOM: u64 = 1 << 2;
const F_REPORTING: u64 = 1 << 5;
/// Configuration fields.
const CONFIG_NUM_PAGES: u64 = 0;
const CONFIG_ACTUAL: u64 = 4;
/// Statistics tags.
const S_SWAP_IN: u16 = 0;
const S_SWAP_OUT: u16 = 1;
const S_MAJFLT: u16 = 2;
const S_MINFLT: u16 = 3;
const S_MEMFREE: u16 = 4;
const S_MEMTOT: u16 = 5;
const S_AVAIL: u16 = 6;
const STATS: [u16; 7] = [S_SWAP_IN, S_SWAP_OUT, S_MAJFLT, S_MINFLT, S_MEMFREE, S_MEMTOT, S_AVAIL];

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
/// Frame numbers per inflate or deflate request, as Linux sends them.
const PFNS_PER_REQUEST: usize = 256;
/// Bytes per free page report.
const REPORT_CHUNK: u64 = 2 * MIB;
/// Where the balloon's pages may come from.
const FREE_START: u64 = 16 * MIB;
const FREE_END_MAX: u64 = 1 << 30;
const REQUEST_TIMEOUT_MS: u64 = 2000;
const QUEUE_SIZE: u16 = 64;
/// Written to each touched page; a page the host released reads zero.
const TOUCH_PATTERN: u64 = 0x6b65_656c_6261_6c6c;

/// The driver's state.
struct Balloon {
    transport: Transport,
    inflate: Virtqueue,
    deflate: Virtqueue,
    stats: Option<Virtqueue>,
    reporting: Option<Virtqueue>,
    pfns: Buffer,
    stats_buffer: Buffer,
    ram: u64,
    /// Balloon pages are `[16 MiB, 16 MiB + inflated pages)`; this is
    /// where usable RAM ends.
    free_end: u64,
    touched: u64,
    inflated: u64,
    stats_answered: u64,
}

/// `virtio-balloon [touch-mib=N] [report-mib=N] [deflate=0|1]
/// [stats-rounds=N] [wait-ms=N] [irq=0|1]`.
pub fn run(ctx: &Context<'_>) -> Outcome {
    let touch_mib = arg(ctx.cmdline.number("touch-mib"))?.unwrap_or(0);
    let report_mib = arg(ctx.cmdline.number("report-mib"))?.unwrap_or(0);
    let deflate = flag(ctx, "deflate", false)?;
    let stats_rounds = arg(ctx.cmdline.number("stats-rounds"))?.unwrap_or(2);
    let wait_ms = arg(ctx.cmdline.number("wait-ms"))?.unwrap_or(10_000);
    let use_irq = flag(ctx, "irq", true)?;

    let (mut ram, mut free_end) = (0u64, FREE_START);
    for entry in ctx.params.e820() {
        if entry.kind == E820_RAM {
            ram += entry.size;
            let end = entry.addr.saturating_add(entry.size).min(FREE_END_MAX);
            if entry.addr <= FREE_START && end > free_end {
                free_end = end;
            }
        }
    }
    let free = free_end - FREE_START;
    if touch_mib * MIB > free {
        bad_args!(
            "touch-mib={touch_mib}: only {} MiB of RAM lie between 16 MiB and the end of RAM",
            free / MIB
        );
    }

    let devices = virtio_devices(ctx)?;
    let Some(found) = devices.of_type(device_id::BALLOON).next() else {
        fail!("no virtio-balloon device");
    };
    let transport = Transport::new(found, ctx.params, use_irq);
    let offered = transport.device_features();
    println!(
        "virtio-balloon: at {}: statistics {}, deflate-on-oom {}, free page reporting {}",
        found.location,
        yes(offered & F_STATS_VQ),
        yes(offered & F_DEFLATE_ON_OOM),
        yes(offered & F_REPORTING)
    );
    // Queues are numbered without gaps: stats, then reporting, if offered.
    let mut inflate = Virtqueue::new(0, QUEUE_SIZE);
    let mut deflate_q = Virtqueue::new(1, QUEUE_SIZE);
    let mut stats = (offered & F_STATS_VQ != 0).then(|| Virtqueue::new(2, QUEUE_SIZE));
    let reporting_index = if stats.is_some() { 3 } else { 2 };
    let mut reporting = (offered & F_REPORTING != 0).then(|| Virtqueue::new(reporting_index, QUEUE_SIZE));
    let wanted = feature::RING_EVENT_IDX | F_STATS_VQ | F_DEFLATE_ON_OOM | F_REPORTING;
    let init = match (&mut stats, &mut reporting) {
        (Some(s), Some(r)) => init_device(&transport, wanted, &mut [&mut inflate, &mut deflate_q, s, r], QUEUE_SIZE),
        (Some(q), None) | (None, Some(q)) => {
            init_device(&transport, wanted, &mut [&mut inflate, &mut deflate_q, q], QUEUE_SIZE)
        }
        (None, None) => init_device(&transport, wanted, &mut [&mut inflate, &mut deflate_q], QUEUE_SIZE),
    };
    if let Err(e) = init {
        fail!("virtio-balloon: initialisation: {e}");
    }
    let mut balloon = Balloon {
        transport,
        inflate,
        deflate: deflate_q,
        stats,
        reporting,
        pfns: dma::alloc_or_panic(PFNS_PER_REQUEST * 4, 64),
        stats_buffer: dma::alloc_or_panic(STATS.len() * 10, 64),
        ram,
        free_end,
        touched: 0,
        inflated: 0,
        stats_answered: 0,
    };
    // The driver hands the device its first statistics right away.
    balloon.post_stats()?;

    balloon.touch(touch_mib * MIB);
    let mut target = balloon.num_pages();
    if target == 0 {
        println!("virtio-balloon: waiting for a target");
        target = balloon.wait_for_target(|t| t != 0, wait_ms)?;
    }
    balloon.inflate_to(target)?;
    let rounds = if balloon.stats.is_some() { stats_rounds } else { 0 };
    for _ in 0..rounds {
        balloon.answer_stats_request(wait_ms)?;
    }
    if report_mib > 0 {
        balloon.report_free(report_mib * MIB)?;
    }
    if deflate {
        println!("virtio-balloon: waiting for a smaller target");
        let inflated = balloon.inflated;
        let target = balloon.wait_for_target(|t| u64::from(t) < inflated, wait_ms)?;
        balloon.deflate_to(target)?;
    }
    Ok(())
}

impl Balloon {
    fn num_pages(&self) -> u32 {
        self.transport.config(CONFIG_NUM_PAGES, 4) as u32
    }

    /// Writes one byte pattern word per page of `[16 MiB, 16 MiB + len)`,
    /// so the host has to back every page.
    fn touch(&mut self, len: u64) {
        let mut page = FREE_START;
        while page < FREE_START + len {
            // SAFETY: identity-mapped RAM between 16 MiB and the end of the
            // e820 RAM entry (at most 1 GiB), which nothing else in the
            // guest uses (see the module documentation).
            unsafe { (page as *mut u64).write_volatile(TOUCH_PATTERN ^ page) };
            page += PAGE;
        }
        self.touched = len / PAGE;
        println!(
            "virtio-balloon: touched {} MiB ({} pages) at {FREE_START:#x}",
            len / MIB,
            self.touched
        );
    }

    /// Polls `num_pages` until `ready` accepts it; notes the configuration
    /// change interrupt if one arrived.
    fn wait_for_target(&mut self, ready: impl Fn(u32) -> bool, wait_ms: u64) -> Result<u32, super::Failure> {
        let irq = self.transport.irq();
        let before = irq.map_or(0, irq_count);
        let start = tsc::now();
        let limit = tsc::ticks_per_ms(wait_ms);
        loop {
            let target = self.num_pages();
            if ready(target) {
                let ms = tsc::now().wrapping_sub(start) / tsc::ticks_per_ms(1).max(1);
                let interrupts = irq.map_or(0, irq_count) - before;
                println!(
                    "virtio-balloon: target {target} pages ({} MiB) after {ms} ms, {interrupts} interrupt(s) meanwhile",
                    u64::from(target) * PAGE / MIB
                );
                self.transport.catch_up_interrupts();
                return Ok(target);
            }
            if tsc::now().wrapping_sub(start) > limit {
                fail!("virtio-balloon: the target stayed at {target} pages for {wait_ms} ms");
            }
            core::hint::spin_loop();
        }
    }

    /// Posts frame numbers `first..first + count` on `queue`, 256 per
    /// request.
    fn post_pfns(&mut self, inflate: bool, first: u64, count: u64) -> Outcome {
        let mut done = 0;
        while done < count {
            let n = (count - done).min(PFNS_PER_REQUEST as u64);
            for i in 0..n {
                self.pfns.put_u32(4 * i as usize, (first + done + i) as u32);
            }
            let chain = Chain::new().read_buf(self.pfns.slice(0, 4 * n as usize));
            let queue = if inflate { &mut self.inflate } else { &mut self.deflate };
            if let Err(e) = submit_and_wait(&mut self.transport, queue, &chain, REQUEST_TIMEOUT_MS) {
                fail!(
                    "virtio-balloon: {} request for {n} pages: {e}",
                    if inflate { "inflate" } else { "deflate" }
                );
            }
            done += n;
        }
        Ok(())
    }

    fn inflate_to(&mut self, target: u32) -> Outcome {
        let available = (self.free_end - FREE_START) / PAGE;
        let want = u64::from(target).min(available);
        if want < u64::from(target) {
            println!("virtio-balloon: note: only {available} pages can go in the balloon, not {target}");
        }
        if want > self.inflated {
            let first = FREE_START / PAGE + self.inflated;
            self.post_pfns(true, first, want - self.inflated)?;
            self.inflated = want;
        }
        self.transport.write_config32(CONFIG_ACTUAL, self.inflated as u32);
        let actual = self.transport.config(CONFIG_ACTUAL, 4);
        println!(
            "virtio-balloon: inflated {} pages ({} MiB), actual {actual}",
            self.inflated,
            self.inflated * PAGE / MIB
        );
        if actual != self.inflated {
            fail!("virtio-balloon: actual reads back {actual}, wrote {}", self.inflated);
        }
        Ok(())
    }

    fn deflate_to(&mut self, target: u32) -> Outcome {
        let keep = u64::from(target);
        let count = self.inflated - keep;
        let first = FREE_START / PAGE + keep;
        self.post_pfns(false, first, count)?;
        self.inflated = keep;
        self.transport.write_config32(CONFIG_ACTUAL, keep as u32);
        // The host released these pages: they come back zero-filled.
        let mut nonzero = 0u64;
        for pfn in first..first + count {
            let page = pfn * PAGE;
            // SAFETY: as in `touch`; the pages are the driver's again.
            let word = unsafe { (page as *const u64).read_volatile() };
            if word != 0 {
                nonzero += 1;
            }
        }
        println!(
            "virtio-balloon: deflated {count} pages, actual {keep}; {} of them read back as zero",
            count - nonzero
        );
        if nonzero > 0 && count <= self.touched {
            fail!("virtio-balloon: {nonzero} deflated pages kept their contents: the host did not release them");
        }
        Ok(())
    }

    /// The statistics this driver can give: RAM, and what is neither
    /// in the balloon nor touched.
    fn fill_stats(&self) {
        let used_pages = self.touched.max(self.inflated);
        let free = (self.free_end - FREE_START) / PAGE - used_pages;
        let values = [0, 0, 0, self.touched, free * PAGE, self.ram, free * PAGE];
        for (i, (tag, value)) in STATS.iter().zip(values).enumerate() {
            let bytes = self.stats_buffer.bytes_mut();
            bytes[10 * i..10 * i + 2].copy_from_slice(&tag.to_le_bytes());
            bytes[10 * i + 2..10 * i + 10].copy_from_slice(&value.to_le_bytes());
        }
        dma::barrier();
    }

    /// Makes the statistics buffer available; the device keeps it until it
    /// wants fresh statistics.
    fn post_stats(&mut self) -> Outcome {
        self.fill_stats();
        let chain = Chain::new().read_buf(self.stats_buffer);
        let Some(queue) = self.stats.as_mut() else {
            return Ok(());
        };
        if queue.add(&chain).is_none() {
            fail!("virtio-balloon: no room for the statistics buffer");
        }
        queue.kick(&self.transport);
        Ok(())
    }

    /// Waits for the device to hand the statistics buffer back, then posts
    /// fresh statistics.
    fn answer_stats_request(&mut self, wait_ms: u64) -> Outcome {
        let Some(queue) = self.stats.as_mut() else {
            return Ok(());
        };
        match queue.wait(&self.transport, wait_ms) {
            Wait::Used { .. } => {}
            Wait::NeedsReset { status } => fail!("virtio-balloon: device needs reset (status {status:#x})"),
            Wait::Timeout(state) => fail!("virtio-balloon: no statistics request within {wait_ms} ms ({state})"),
        }
        self.transport.note_completion();
        self.stats_answered += 1;
        self.post_stats()?;
        println!(
            "virtio-balloon: answered statistics request {}: total {} MiB, free {} MiB",
            self.stats_answered,
            self.ram / MIB,
            ((self.free_end - FREE_START) / PAGE - self.touched.max(self.inflated)) * PAGE / MIB
        );
        Ok(())
    }

    /// Reports `len` bytes of touched memory past the balloon as free.
    fn report_free(&mut self, len: u64) -> Outcome {
        let start = FREE_START + self.inflated * PAGE;
        let end = FREE_START + self.touched * PAGE;
        if start + len > end {
            fail!(
                "virtio-balloon: cannot report {} MiB: only {} MiB are touched and outside the balloon",
                len / MIB,
                end.saturating_sub(start) / MIB
            );
        }
        let Some(queue) = self.reporting.as_mut() else {
            fail!("virtio-balloon: free page reporting was not offered");
        };
        let mut at = start;
        while at < start + len {
            let chunk = REPORT_CHUNK.min(start + len - at);
            let chain = Chain::new().writable(at, chunk as u32);
            if let Err(e) = submit_and_wait(&mut self.transport, queue, &chain, REQUEST_TIMEOUT_MS) {
                fail!("virtio-balloon: free page report at {at:#x}: {e}");
            }
            at += chunk;
        }
        println!("virtio-balloon: reported {} MiB of free pages at {start:#x}", len / MIB);
        Ok(())
    }
}

fn yes(bit: u64) -> &'static str {
    if bit != 0 {
        "offered"
    } else {
        "not offered"
    }
}
