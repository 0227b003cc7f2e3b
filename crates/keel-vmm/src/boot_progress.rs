//! Watching the guest's console for boot milestones.

use std::io::Write;
use std::time::Instant;

/// The line Linux prints just before it executes init.
pub const RUN_INIT_MARKER: &[u8] = b"Run /init as init process";

/// Passes console output through and logs when the kernel reaches
/// `Run /init`, measured from `start`.
pub struct ConsoleWatcher<W: Write> {
    inner: W,
    start: Instant,
    matched: usize,
    seen: bool,
}

impl<W: Write> ConsoleWatcher<W> {
    /// Watches output going to `inner`.
    pub fn new(inner: W, start: Instant) -> Self {
        ConsoleWatcher {
            inner,
            start,
            matched: 0,
            seen: false,
        }
    }

    fn scan(&mut self, buf: &[u8]) {
        for &b in buf {
            if self.seen {
                return;
            }
            // The marker has no repeated prefix, so a mismatch restarts
            // the match at this byte.
            if b == RUN_INIT_MARKER[self.matched] {
                self.matched += 1;
            } else {
                self.matched = usize::from(b == RUN_INIT_MARKER[0]);
            }
            if self.matched == RUN_INIT_MARKER.len() {
                self.seen = true;
                log::info!(
                    "guest kernel reached `Run /init` {:.2} s after start",
                    self.start.elapsed().as_secs_f64()
                );
            }
        }
    }
}

impl<W: Write> Write for ConsoleWatcher<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.scan(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_marker_split_across_writes() {
        let mut w = ConsoleWatcher::new(Vec::new(), Instant::now());
        w.write_all(b"[  1.0] Run /in").unwrap();
        assert!(!w.seen);
        w.write_all(b"it as init process\n").unwrap();
        assert!(w.seen);
        assert_eq!(w.inner, b"[  1.0] Run /init as init process\n");
    }

    #[test]
    fn a_near_miss_does_not_match() {
        let mut w = ConsoleWatcher::new(Vec::new(), Instant::now());
        w.write_all(b"RRun /init as init proces\n").unwrap();
        assert!(!w.seen);
        w.write_all(b"RRun /init as init process").unwrap();
        assert!(w.seen);
    }
}
