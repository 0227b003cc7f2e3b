//! Firecracker's HTTP API on a Unix socket, for a Keel VM.
//!
//! [`ApiServer`] listens on a Unix socket, parses HTTP/1.1 requests with
//! `httparse` (no hand-written parser), and routes each to the
//! [`keel_control::Vmm`] it serves: same paths, bodies, status codes and
//! `{"fault_message": "…"}` errors as Firecracker, so a client written for
//! Firecracker (its Go SDK, Kata Containers' driver, `curl --unix-socket`)
//! drives Keel unchanged. Routing is a plain function
//! ([`handle_request`]), testable without a socket. See `docs/api.md` for
//! the endpoints and the deliberate differences.
//!
//! Requests are served one at a time (a connection per thread, the VMM
//! behind a mutex), as Firecracker does: each configuration change is
//! applied, or refused, before the next is looked at.

#![deny(missing_docs)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use keel_control::models;
use keel_control::{ControlError, MetricsRegistry, Vmm};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest request head (request line and headers) accepted.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Largest request body accepted (Firecracker's limit is 50 KiB too).
pub const MAX_BODY_BYTES: usize = 50 * 1024;
/// Most headers in one request.
const MAX_HEADERS: usize = 32;

/// Errors from setting up the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The socket could not be created.
    #[error("API socket {}: {source}{}", path.display(), if path.exists() { " (the path exists: remove it if no VMM is serving it)" } else { "" })]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// An HTTP response: status, and a JSON or text body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body (empty for 204).
    pub body: String,
    /// Its content type.
    pub content_type: &'static str,
}

impl Response {
    fn no_content() -> Self {
        Self {
            status: 204,
            body: String::new(),
            content_type: "application/json",
        }
    }

    fn json(value: &impl Serialize) -> Self {
        match serde_json::to_string(value) {
            Ok(body) => Self {
                status: 200,
                body,
                content_type: "application/json",
            },
            Err(e) => Self::fault(500, &format!("cannot encode the response: {e}")),
        }
    }

    fn text(body: String) -> Self {
        Self {
            status: 200,
            body,
            content_type: "text/plain; version=0.0.4",
        }
    }

    /// `{"fault_message": MESSAGE}` with `status`.
    pub fn fault(status: u16, message: &str) -> Self {
        Self {
            status,
            body: serde_json::json!({ "fault_message": message }).to_string(),
            content_type: "application/json",
        }
    }

    fn reason(&self) -> &'static str {
        match self.status {
            100 => "Continue",
            200 => "OK",
            204 => "No Content",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            413 => "Payload Too Large",
            431 => "Request Header Fields Too Large",
            500 => "Internal Server Error",
            _ => "Unknown",
        }
    }

    fn write_to(&self, out: &mut impl Write) -> std::io::Result<()> {
        let mut head = format!("HTTP/1.1 {} {}\r\nServer: Keel\r\n", self.status, self.reason());
        if self.status != 204 {
            head.push_str(&format!(
                "Content-Type: {}\r\nContent-Length: {}\r\n",
                self.content_type,
                self.body.len()
            ));
        }
        head.push_str("\r\n");
        out.write_all(head.as_bytes())?;
        out.write_all(self.body.as_bytes())?;
        out.flush()
    }
}

fn from_control(result: Result<(), ControlError>) -> Response {
    match result {
        Ok(()) => Response::no_content(),
        Err(e) => Response::fault(400, &e.to_string()),
    }
}

fn body<T: DeserializeOwned>(what: &str, body: &[u8]) -> Result<T, Response> {
    if body.is_empty() {
        return Err(Response::fault(
            400,
            &format!("{what}: the request needs a JSON body"),
        ));
    }
    serde_json::from_slice(body).map_err(|e| Response::fault(400, &format!("{what}: invalid body: {e}")))
}

/// Counts the request in the `{method}_api_requests` metrics group, as
/// `RESOURCE_count`, and failures as `RESOURCE_fails`.
fn count(metrics: &MetricsRegistry, method: &str, resource: &str, response: &Response) {
    let group = format!("{}_api_requests", method.to_ascii_lowercase());
    metrics.add(&group, &format!("{resource}_count"), 1);
    if response.status >= 400 {
        metrics.add(&group, &format!("{resource}_fails"), 1);
    }
}

/// Routes one request to `vmm` and says what to answer. `path` is the
/// request target without a query string.
pub fn handle_request(vmm: &mut Vmm, method: &str, path: &str, request_body: &[u8]) -> Response {
    let segments: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let metrics = vmm.metrics();
    let (resource, response) = route(vmm, method, &segments, request_body);
    count(&metrics, method, resource, &response);
    response
}

fn route(vmm: &mut Vmm, method: &str, segments: &[&str], request_body: &[u8]) -> (&'static str, Response) {
    macro_rules! with_body {
        ($what:expr, |$b:ident: $t:ty| $e:expr) => {
            match body::<$t>($what, request_body) {
                Ok($b) => from_control($e),
                Err(response) => response,
            }
        };
    }
    match (method, segments) {
        ("GET", []) => ("instance_info", Response::json(&vmm.instance_info())),
        ("GET", ["version"]) => ("vmm_version", Response::json(&vmm.version())),
        ("GET", ["machine-config"]) => ("machine_cfg", Response::json(&vmm.machine_config())),
        ("PUT", ["machine-config"]) => (
            "machine_cfg",
            with_body!("machine-config", |b: models::MachineConfig| vmm
                .put_machine_config(b)),
        ),
        ("PATCH", ["machine-config"]) => (
            "machine_cfg",
            with_body!("machine-config", |b: models::MachineConfigUpdate| vmm
                .patch_machine_config(b)),
        ),
        ("PUT", ["boot-source"]) => (
            "boot_source",
            with_body!("boot-source", |b: models::BootSource| vmm.put_boot_source(b)),
        ),
        ("PUT", ["drives", id]) => (
            "drive",
            with_body!("drives", |b: models::Drive| vmm.put_drive(id, b)),
        ),
        ("PATCH", ["drives", id]) => (
            "drive",
            with_body!("drives", |b: models::DriveUpdate| vmm.patch_drive(id, b)),
        ),
        ("PUT", ["network-interfaces", id]) => (
            "network",
            with_body!("network-interfaces", |b: models::NetworkInterface| vmm
                .put_network_interface(id, b)),
        ),
        ("PATCH", ["network-interfaces", id]) => (
            "network",
            with_body!("network-interfaces", |b: models::NetworkInterfaceUpdate| vmm
                .patch_network_interface(id, b)),
        ),
        ("PUT", ["vsock"]) => ("vsock", with_body!("vsock", |b: models::Vsock| vmm.put_vsock(b))),
        ("PUT", ["entropy"]) => (
            "entropy",
            with_body!("entropy", |b: models::Entropy| vmm.put_entropy(b)),
        ),
        ("PUT", ["balloon"]) => (
            "balloon",
            with_body!("balloon", |b: models::Balloon| vmm.put_balloon(b)),
        ),
        ("PATCH", ["balloon"]) => (
            "balloon",
            with_body!("balloon", |b: models::BalloonUpdate| vmm.patch_balloon(b)),
        ),
        ("GET", ["balloon"]) => (
            "balloon",
            match vmm.balloon() {
                Ok(b) => Response::json(&b),
                Err(e) => Response::fault(400, &e.to_string()),
            },
        ),
        ("GET", ["balloon", "statistics"]) => (
            "balloon_stats",
            match vmm.balloon_stats() {
                Ok(s) => Response::json(&s),
                Err(e) => Response::fault(400, &e.to_string()),
            },
        ),
        ("PATCH", ["balloon", "statistics"]) => (
            "balloon_stats",
            with_body!("balloon/statistics", |b: models::BalloonStatsUpdate| vmm
                .patch_balloon_stats(b)),
        ),
        ("PUT", ["actions"]) => (
            "actions",
            with_body!("actions", |b: models::InstanceActionInfo| vmm
                .action(b.action_type)),
        ),
        ("PATCH", ["vm"]) => (
            "vm",
            with_body!("vm", |b: models::VmState| vmm.set_vm_state(b.state)),
        ),
        ("GET", ["vm", "config"]) => ("vm_config", Response::json(&vmm.vm_config())),
        ("PUT", ["snapshot", "create"]) => (
            "create_snapshot",
            with_body!("snapshot/create", |b: models::SnapshotCreateParams| vmm
                .create_snapshot(b)
                .map(drop)),
        ),
        ("PUT", ["snapshot", "load"]) => (
            "load_snapshot",
            with_body!("snapshot/load", |b: models::SnapshotLoadParams| vmm
                .load_snapshot(b)),
        ),
        ("PUT", ["logger"]) => (
            "logger",
            with_body!("logger", |b: models::Logger| vmm.put_logger(b)),
        ),
        ("PUT", ["metrics"]) => (
            "metrics",
            with_body!("metrics", |b: models::Metrics| vmm.put_metrics(b)),
        ),
        ("GET", ["metrics"]) => ("metrics", Response::text(vmm.metrics_prometheus())),
        _ => (
            "invalid",
            Response::fault(
                400,
                &format!(
                    "Invalid request method and/or path: {method} /{}",
                    segments.join("/")
                ),
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::request_path;

    #[test]
    fn request_targets_in_origin_and_absolute_form_give_the_path() {
        assert_eq!(request_path("/drives/root"), "/drives/root");
        assert_eq!(request_path("/vm?x=1"), "/vm");
        assert_eq!(request_path("http://localhost/machine-config"), "/machine-config");
        assert_eq!(request_path("http://localhost"), "/");
    }
}

/// Serves [`Vmm`] on a Unix socket.
#[derive(Debug)]
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    vmm: Arc<Mutex<Vmm>>,
}

impl ApiServer {
    /// Listens at `path`, which must not exist (as Firecracker; remove a
    /// stale socket first).
    pub fn bind(path: impl AsRef<Path>, vmm: Arc<Mutex<Vmm>>) -> Result<Self, Error> {
        let path = path.as_ref().to_owned();
        let listener = UnixListener::bind(&path).map_err(|source| Error::Bind {
            path: path.clone(),
            source,
        })?;
        Ok(Self { listener, path, vmm })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts connections forever, each served on a thread of its own.
    pub fn serve(&self) {
        for stream in self.listener.incoming() {
            match stream {
                Ok(stream) => {
                    let vmm = self.vmm.clone();
                    let spawned = std::thread::Builder::new()
                        .name("keel-api-conn".into())
                        .spawn(move || serve_connection(stream, &vmm));
                    if let Err(e) = spawned {
                        log::error!("API: cannot start a connection thread: {e}");
                    }
                }
                Err(e) => log::warn!("API: accept failed: {e}"),
            }
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What reading one request gave.
enum Incoming {
    Request {
        method: String,
        path: String,
        body: Vec<u8>,
        close: bool,
    },
    /// The peer closed the connection between requests.
    Closed,
    /// A malformed request: answer and close.
    Bad(Response),
}

/// Serves requests on one connection until the peer closes it (HTTP/1.1
/// keep-alive) or sends something malformed.
pub fn serve_connection(mut stream: UnixStream, vmm: &Mutex<Vmm>) {
    let mut buffer: Vec<u8> = Vec::new();
    loop {
        match read_request(&mut stream, &mut buffer) {
            Incoming::Closed => return,
            Incoming::Bad(response) => {
                let _ = response.write_to(&mut stream);
                return;
            }
            Incoming::Request {
                method,
                path,
                body,
                close,
            } => {
                let response = {
                    let mut vmm = vmm.lock().unwrap_or_else(|e| e.into_inner());
                    handle_request(&mut vmm, &method, &path, &body)
                };
                log::debug!("API: {method} {path} -> {}", response.status);
                if response.write_to(&mut stream).is_err() || close {
                    return;
                }
            }
        }
    }
}

/// The path of a request target: origin-form (`/drives/a?x`) or
/// absolute-form (`http://localhost/drives/a`, which servers must accept),
/// without the query.
fn request_path(target: &str) -> &str {
    let without_scheme = target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"));
    let path = match without_scheme {
        Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    path.split('?').next().unwrap_or("/")
}

fn read_request(stream: &mut UnixStream, buffer: &mut Vec<u8>) -> Incoming {
    let mut chunk = [0u8; 4096];
    // The head.
    let (head_len, method, path, content_length, expect_continue, close) = loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(buffer) {
            Ok(httparse::Status::Complete(len)) => {
                let method = request.method.unwrap_or("").to_string();
                let path = request_path(request.path.unwrap_or("/")).to_string();
                let mut content_length = 0usize;
                let mut expect_continue = false;
                let mut close = request.version == Some(0);
                for h in request.headers.iter() {
                    let value = String::from_utf8_lossy(h.value);
                    if h.name.eq_ignore_ascii_case("content-length") {
                        match value.trim().parse() {
                            Ok(n) => content_length = n,
                            Err(_) => {
                                return Incoming::Bad(Response::fault(
                                    400,
                                    &format!("Content-Length {value:?}: not a number"),
                                ))
                            }
                        }
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        return Incoming::Bad(Response::fault(
                            400,
                            &format!("Transfer-Encoding {value:?}: send a Content-Length instead"),
                        ));
                    } else if h.name.eq_ignore_ascii_case("expect") {
                        expect_continue = value.eq_ignore_ascii_case("100-continue");
                    } else if h.name.eq_ignore_ascii_case("connection") {
                        close = value.eq_ignore_ascii_case("close");
                    }
                }
                break (len, method, path, content_length, expect_continue, close);
            }
            Ok(httparse::Status::Partial) if buffer.len() >= MAX_HEAD_BYTES => {
                return Incoming::Bad(Response::fault(
                    431,
                    &format!("the request head is larger than {MAX_HEAD_BYTES} bytes"),
                ));
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Incoming::Bad(Response::fault(400, &format!("malformed HTTP request: {e}"))),
        }
        match stream.read(&mut chunk) {
            Ok(0) if buffer.is_empty() => return Incoming::Closed,
            Ok(0) => return Incoming::Bad(Response::fault(400, "the connection closed mid-request")),
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            Err(_) => return Incoming::Closed,
        }
    };
    if content_length > MAX_BODY_BYTES {
        return Incoming::Bad(Response::fault(
            413,
            &format!("Content-Length {content_length}: bodies are at most {MAX_BODY_BYTES} bytes"),
        ));
    }
    if expect_continue && buffer.len() < head_len + content_length {
        let _ = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    while buffer.len() < head_len + content_length {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => {
                return Incoming::Bad(Response::fault(
                    400,
                    "the connection closed before the whole body arrived",
                ))
            }
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
    let body = buffer[head_len..head_len + content_length].to_vec();
    buffer.drain(..head_len + content_length);
    Incoming::Request {
        method,
        path,
        body,
        close,
    }
}
