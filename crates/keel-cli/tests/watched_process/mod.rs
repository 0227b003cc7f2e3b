//! Processes an end-to-end test starts next to the VM — a DHCP server, a
//! `keel-xfer` server, any server — started, checked and watched so that
//! one that cannot start, never comes up or dies fails the test at once
//! with its own stderr, instead of the guest timing out minutes later
//! (a DHCP test once waited out a 232 s boot because `ip netns exec …
//! dnsmasq` had failed silently: dnsmasq was not installed).
//!
//! ```text
//! let mut dhcp = WatchedProcess::start("dnsmasq", cmd, Lifetime::UntilStopped,
//!     Ready::StderrContains("DHCP, IP range"), Duration::from_secs(10))
//!     .unwrap_or_else(|e| panic!("{e}"));
//! // ... while the VM runs, every poll:
//! dhcp.check()?;   // Err (with its stderr) once it has exited
//! ```
//!
//! A test crate of another package can use it with
//! `#[path = "../../keel-cli/tests/watched_process/mod.rs"] mod watched_process;`.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// When a started process counts as ready.
#[derive(Clone, Copy, Debug)]
pub enum Ready<'a> {
    /// It printed a line starting with this on stdout; the rest of that
    /// line is [`WatchedProcess::ready_text`] (say, the address it listens
    /// on).
    StdoutPrefix(&'a str),
    /// It printed a line containing this on stderr (say, dnsmasq's log).
    StderrContains(&'a str),
}

/// How long the process is meant to run, and so which exits are failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifetime {
    /// Runs until the test stops it (a DHCP server): any exit is a failure.
    UntilStopped,
    /// Does one job and exits 0 (a `keel-xfer serve`): only a non-zero
    /// exit or a signal is a failure.
    ExitsZeroWhenDone,
}

/// How a process ended, with everything it printed.
#[derive(Debug)]
pub struct ProcessEnd {
    /// `None`: killed (by a signal, or because it did not finish in time).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// One pipe read into memory on a thread of its own (so the process never
/// blocks on a full pipe and a watcher can look at what it said so far).
struct Captured {
    text: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
}

impl Captured {
    fn new(pipe: impl Read + Send + 'static) -> Captured {
        let text = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&text);
        let reader = std::thread::spawn(move || {
            let mut pipe = BufReader::new(pipe);
            let mut line = Vec::new();
            while matches!(pipe.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                let mut t = sink.lock().unwrap_or_else(|e| e.into_inner());
                t.push_str(&String::from_utf8_lossy(&line));
                line.clear();
            }
        });
        Captured {
            text,
            reader: Some(reader),
        }
    }

    fn text(&self) -> String {
        self.text.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits (a little) for the pipe's end, so the text is complete once the
    /// process has exited. A grandchild still holding the pipe open must not
    /// hang the test: after `limit`, what is there is what is reported.
    fn drain(&mut self, limit: Duration) {
        let start = Instant::now();
        while self.reader.as_ref().is_some_and(|r| !r.is_finished()) && start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.reader.as_ref().is_some_and(JoinHandle::is_finished) {
            let _ = self.reader.take().map(JoinHandle::join);
        }
    }
}

/// The last `n` lines of `text`, for messages.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(n);
    let mut s = String::new();
    if from > 0 {
        s.push_str(&format!("[... {from} earlier lines]\n"));
    }
    s.push_str(&lines[from..].join("\n"));
    s
}

/// A child process the test watches; killed and reaped on drop whatever
/// happens.
pub struct WatchedProcess {
    name: String,
    command: String,
    child: Child,
    lifetime: Lifetime,
    stdout: Captured,
    stderr: Captured,
    ready_text: String,
}

impl WatchedProcess {
    /// Starts `cmd` (stdin null, stdout and stderr captured) and waits up to
    /// `within` until it is `ready`. `Err` — naming it, its command line,
    /// how it ended and its stderr — if it cannot be started, exits before
    /// it is ready, or is not ready in time (then it is killed).
    pub fn start(
        name: &str,
        mut cmd: Command,
        lifetime: Lifetime,
        ready: Ready<'_>,
        within: Duration,
    ) -> Result<WatchedProcess, String> {
        let command = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{name} could not be started: {e}: {command}"))?;
        let stdout = Captured::new(child.stdout.take().expect("stdout is piped"));
        let stderr = Captured::new(child.stderr.take().expect("stderr is piped"));
        let mut p = WatchedProcess {
            name: name.to_string(),
            command,
            child,
            lifetime,
            stdout,
            stderr,
            ready_text: String::new(),
        };
        let waiting_for = match ready {
            Ready::StdoutPrefix(s) => format!("a stdout line starting with {s:?}"),
            Ready::StderrContains(s) => format!("a stderr line containing {s:?}"),
        };
        let start = Instant::now();
        loop {
            let exited = p
                .child
                .try_wait()
                .map_err(|e| p.failure(&format!("cannot be waited for ({e})")))?;
            if exited.is_some() {
                p.stdout.drain(Duration::from_secs(10));
                p.stderr.drain(Duration::from_secs(10));
            }
            let found = match ready {
                Ready::StdoutPrefix(prefix) => p
                    .stdout
                    .text()
                    .lines()
                    .find_map(|l| l.strip_prefix(prefix).map(str::to_string)),
                Ready::StderrContains(needle) => p
                    .stderr
                    .text()
                    .lines()
                    .find(|l| l.contains(needle))
                    .map(str::to_string),
            };
            if let Some(text) = found {
                p.ready_text = text;
                // Ready, but perhaps gone already: that is for `check`.
                p.check()?;
                return Ok(p);
            }
            if let Some(status) = exited {
                return Err(p.failure(&format!(
                    "exited ({status}) before it was ready (waiting for {waiting_for})"
                )));
            }
            if start.elapsed() > within {
                let _ = p.child.kill();
                let _ = p.child.wait();
                p.stdout.drain(Duration::from_secs(10));
                p.stderr.drain(Duration::from_secs(10));
                return Err(p.failure(&format!(
                    "was not ready within {within:?} (waiting for {waiting_for}); killed"
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The rest of the [`Ready::StdoutPrefix`] line, or the whole
    /// [`Ready::StderrContains`] line.
    pub fn ready_text(&self) -> &str {
        &self.ready_text
    }

    /// `Err` (with its stderr) once it has ended in a way its [`Lifetime`]
    /// does not allow; call it whenever the test polls.
    pub fn check(&mut self) -> Result<(), String> {
        let status: Option<ExitStatus> = self
            .child
            .try_wait()
            .map_err(|e| self.failure(&format!("cannot be waited for ({e})")))?;
        match (status, self.lifetime) {
            (None, _) => Ok(()),
            (Some(s), Lifetime::ExitsZeroWhenDone) if s.success() => Ok(()),
            (Some(s), _) => {
                self.stdout.drain(Duration::from_secs(10));
                self.stderr.drain(Duration::from_secs(10));
                Err(self.failure(&format!("exited ({s}) while the test still needed it")))
            }
        }
    }

    /// Waits up to `limit` for it to exit (then kills it); how it ended and
    /// everything it printed.
    pub fn finish(mut self, limit: Duration) -> ProcessEnd {
        let start = Instant::now();
        let code = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status.code(),
                Ok(None) if start.elapsed() <= limit => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break None;
                }
            }
        };
        self.stdout.drain(Duration::from_secs(10));
        self.stderr.drain(Duration::from_secs(10));
        ProcessEnd {
            code,
            stdout: self.stdout.text(),
            stderr: self.stderr.text(),
        }
    }

    fn failure(&self, what: &str) -> String {
        let stderr = self.stderr.text();
        let stdout = self.stdout.text();
        let mut msg = format!(
            "{} {what}: {}\n--- its stderr ---\n{}",
            self.name,
            self.command,
            if stderr.is_empty() {
                "(empty)".to_string()
            } else {
                tail(&stderr, 40)
            }
        );
        if !stdout.is_empty() {
            msg.push_str(&format!("\n--- its stdout ---\n{}", tail(&stdout, 20)));
        }
        msg
    }
}

impl Drop for WatchedProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    const LONG: Duration = Duration::from_secs(60);

    #[test]
    fn a_helper_that_exits_before_it_is_ready_fails_at_once_with_its_stderr() {
        let start = Instant::now();
        let err = WatchedProcess::start(
            "dnsmasq",
            sh("echo 'dnsmasq: failed to create listening socket: Address in use' >&2; exit 2"),
            Lifetime::UntilStopped,
            Ready::StderrContains("DHCP, IP range"),
            LONG,
        )
        .err()
        .expect("it exited");
        assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
        assert!(
            err.starts_with("dnsmasq exited (exit status: 2) before it was ready"),
            "{err}"
        );
        assert!(
            err.contains("a stderr line containing \"DHCP, IP range\""),
            "{err}"
        );
        assert!(
            err.contains("failed to create listening socket: Address in use"),
            "{err}"
        );
    }

    #[test]
    fn a_helper_that_cannot_be_executed_is_named_with_the_reason() {
        let err = WatchedProcess::start(
            "keel-xfer server",
            Command::new("/nonexistent/keel-xfer"),
            Lifetime::ExitsZeroWhenDone,
            Ready::StdoutPrefix("keel-xfer: listening on "),
            LONG,
        )
        .err()
        .expect("no such program");
        assert!(
            err.starts_with("keel-xfer server could not be started: "),
            "{err}"
        );
        assert!(err.contains("No such file or directory"), "{err}");
        assert!(err.contains("/nonexistent/keel-xfer"), "{err}");
    }

    #[test]
    fn a_helper_never_ready_is_killed_after_the_wait_and_reported() {
        let start = Instant::now();
        let err = WatchedProcess::start(
            "server",
            sh("echo 'binding 10.0.2.1' >&2; exec sleep 600"),
            Lifetime::UntilStopped,
            Ready::StdoutPrefix("listening on "),
            Duration::from_millis(500),
        )
        .err()
        .expect("never ready");
        assert!(start.elapsed() < Duration::from_secs(10), "{:?}", start.elapsed());
        assert!(err.starts_with("server was not ready within 500ms"), "{err}");
        assert!(err.contains("binding 10.0.2.1"), "{err}");
    }

    #[test]
    fn the_readiness_line_is_handed_back_and_the_output_kept() {
        let p = WatchedProcess::start(
            "keel-xfer server",
            sh("echo 'keel-xfer: listening on tcp:127.0.0.1:4321'; echo done; echo bye >&2"),
            Lifetime::ExitsZeroWhenDone,
            Ready::StdoutPrefix("keel-xfer: listening on "),
            LONG,
        )
        .unwrap();
        assert_eq!(p.ready_text(), "tcp:127.0.0.1:4321");
        let end = p.finish(LONG);
        assert_eq!(end.code, Some(0));
        assert_eq!(end.stdout, "keel-xfer: listening on tcp:127.0.0.1:4321\ndone\n");
        assert_eq!(end.stderr, "bye\n");
    }

    /// Polls `check` until it fails (as a test's boot loop does).
    fn first_failure(p: Result<WatchedProcess, String>) -> String {
        let mut p = match p {
            Ok(p) => p,
            // It may already be gone when `start` looks.
            Err(e) => return e,
        };
        let start = Instant::now();
        while start.elapsed() < LONG {
            if let Err(e) = p.check() {
                return e;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("still running after {LONG:?}");
    }

    #[test]
    fn a_server_that_must_stay_up_is_reported_once_it_exits() {
        let trigger = std::env::temp_dir().join(format!("keel-watched-{}", std::process::id()));
        let _ = std::fs::remove_file(&trigger);
        let mut p = WatchedProcess::start(
            "dnsmasq",
            sh(&format!(
                "echo 'dnsmasq-dhcp: DHCP, IP range 10.0.2.10 -- 10.0.2.20' >&2; \
                 while [ ! -e {0} ]; do sleep 0.05; done; echo 'lost the tap' >&2; exit 3",
                trigger.display()
            )),
            Lifetime::UntilStopped,
            Ready::StderrContains("DHCP, IP range"),
            LONG,
        )
        .unwrap();
        assert_eq!(
            p.ready_text(),
            "dnsmasq-dhcp: DHCP, IP range 10.0.2.10 -- 10.0.2.20"
        );
        assert_eq!(p.check(), Ok(()));
        std::fs::write(&trigger, b"").unwrap();
        let err = first_failure(Ok(p));
        let _ = std::fs::remove_file(&trigger);
        assert!(
            err.starts_with("dnsmasq exited (exit status: 3) while the test still needed it"),
            "{err}"
        );
        assert!(err.contains("lost the tap"), "{err}");
    }

    #[test]
    fn a_one_shot_server_may_exit_zero_but_not_otherwise() {
        let mut ok = WatchedProcess::start(
            "done",
            sh("echo 'ready'; exit 0"),
            Lifetime::ExitsZeroWhenDone,
            Ready::StdoutPrefix("ready"),
            LONG,
        )
        .unwrap();
        let start = Instant::now();
        while ok.child.try_wait().unwrap().is_none() && start.elapsed() < LONG {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(ok.check(), Ok(()), "exit 0 is a job done");
        let err = first_failure(WatchedProcess::start(
            "keel-xfer server",
            sh("echo 'keel-xfer: listening on unix:/x'; echo 'keel-xfer: MISMATCH at byte 0' >&2; exit 1"),
            Lifetime::ExitsZeroWhenDone,
            Ready::StdoutPrefix("keel-xfer: listening on "),
            LONG,
        ));
        assert!(
            err.contains("exited (exit status: 1) while the test still needed it"),
            "{err}"
        );
        assert!(err.contains("MISMATCH at byte 0"), "{err}");
    }
}
