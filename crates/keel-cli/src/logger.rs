//! The process's logger: stderr by default (level from `--log-level` or
//! `RUST_LOG`), redirected and refiltered by the API's `PUT /logger`.

use std::io::Write;
use std::sync::{Arc, Mutex};

use keel_control::models::Logger;

struct State {
    level: log::LevelFilter,
    file: Option<std::fs::File>,
    show_level: bool,
    show_origin: bool,
    module: Option<String>,
}

/// A `log::Log` whose sink and filter can change at run time.
#[derive(Clone)]
pub struct ProcessLogger(Arc<Mutex<State>>);

impl ProcessLogger {
    /// Installs the logger with `level` ("warn", "info", …; `RUST_LOG`
    /// wins when set).
    pub fn install(level: &str) -> Self {
        // RUST_LOG is LEVEL or MODULE=LEVEL.
        let env = std::env::var("RUST_LOG").ok();
        let (module, env_level) = match env.as_deref().map(|e| e.split_once('=')) {
            Some(Some((module, level))) => (Some(module.to_string()), level.parse().ok()),
            _ => (None, env.as_deref().and_then(|l| l.parse().ok())),
        };
        let level = env_level
            .or_else(|| level.parse().ok())
            .unwrap_or(log::LevelFilter::Warn);
        let logger = ProcessLogger(Arc::new(Mutex::new(State {
            level,
            file: None,
            show_level: true,
            show_origin: false,
            module,
        })));
        if log::set_boxed_logger(Box::new(logger.clone())).is_ok() {
            log::set_max_level(log::LevelFilter::Trace);
        }
        logger
    }
}

impl log::Log for ProcessLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        let state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        metadata.level() <= state.level
            && state
                .module
                .as_deref()
                .is_none_or(|m| metadata.target().starts_with(m))
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut line = String::new();
        if state.show_level {
            line.push_str(&format!("[{}] ", record.level()));
        }
        if state.show_origin {
            line.push_str(&format!(
                "{}:{}: ",
                record.file().unwrap_or("?"),
                record.line().unwrap_or(0)
            ));
        }
        line.push_str(&format!("{}\n", record.args()));
        match state.file.as_mut() {
            Some(file) => {
                let _ = file.write_all(line.as_bytes());
            }
            None => {
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

impl keel_control::LogControl for ProcessLogger {
    fn configure(&self, logger: &Logger) -> Result<(), String> {
        let file = match &logger.log_path {
            Some(path) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| format!("log_path {path}: {e}"))?,
            ),
            None => None,
        };
        let level = match logger.level.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None => None,
            Some("warning") => Some(log::LevelFilter::Warn),
            Some(other) => Some(
                other
                    .parse()
                    .map_err(|_| format!("level {other:?}: not a log level"))?,
            ),
        };
        let mut state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if file.is_some() {
            state.file = file;
        }
        if let Some(level) = level {
            state.level = level;
        }
        if let Some(show) = logger.show_level {
            state.show_level = show;
        }
        if let Some(show) = logger.show_log_origin {
            state.show_origin = show;
        }
        if logger.module.is_some() {
            state.module = logger.module.clone();
        }
        Ok(())
    }
}
