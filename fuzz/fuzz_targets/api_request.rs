//! Bytes on the API socket: HTTP/1.1 requests (heads, bodies, keep-alive
//! sequences) served by `keel_api::serve_connection` against a VMM that
//! cannot boot anything (its KVM device does not exist). Inputs that name
//! the metrics endpoint are skipped: `PUT /metrics` creates the file it
//! is given, and a fuzzer must not write to the host's file system.
#![no_main]

use std::io::Write;
use std::sync::Mutex;

use keel_control::{Vmm, VmmOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.windows(7).any(|w| w.eq_ignore_ascii_case(b"metrics")) {
        return;
    }
    let mut options = VmmOptions::new("fuzz");
    options.kvm_device = "/nonexistent/kvm".into();
    let vmm = Mutex::new(Vmm::new(options));
    let (mut client, server) = std::os::unix::net::UnixStream::pair().unwrap();
    client.set_nonblocking(true).unwrap();
    let _ = client.write_all(data);
    let _ = client.shutdown(std::net::Shutdown::Write);
    // Responses go to the client's receive buffer; a thread drains it so
    // the server never blocks on a full socket.
    let drain = std::thread::spawn(move || {
        use std::io::Read;
        client.set_nonblocking(false).unwrap();
        let mut sink = Vec::new();
        let _ = client.read_to_end(&mut sink);
    });
    keel_api::serve_connection(server, &vmm);
    let _ = drain.join();
});
