//! One vsock stream connection as a pure state machine: no sockets, no guest
//! memory. The muxer feeds it the guest's packets and the host socket's
//! bytes, and asks it for the next packet to put in the guest's rx queue.
//!
//! Credit (virtio 1.2, section 5.10.6.3) runs both ways:
//!
//! - towards the guest, we never send more than
//!   `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)` bytes, the free space the
//!   guest last told us about;
//! - from the guest, we advertise `buf_alloc` (what we are prepared to
//!   buffer for the host socket) and `fwd_cnt` (bytes written to the socket
//!   so far); a guest that sends past that credit is reset.

use std::collections::VecDeque;

use super::packet::{op, Header, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST queued or sent, waiting for the guest's
    /// RESPONSE.
    Connecting,
    /// Both sides may exchange data (subject to shutdowns).
    Established,
    /// The host side ended (socket EOF): SHUTDOWN queued or sent, waiting
    /// for the guest's RST.
    Closing,
    /// Over: RST sent or received. The muxer drops it.
    Closed,
}

/// What a guest packet did to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing the muxer needs to act on beyond the usual.
    Ok,
    /// A host-initiated connection was accepted by the guest.
    Established,
    /// The guest reset the connection: drop it, send nothing.
    Reset,
    /// The guest broke the protocol: an RST is queued; drop the connection
    /// once it is sent.
    ProtocolError,
}

const PENDING_REQUEST: u8 = 1;
const PENDING_RESPONSE: u8 = 2;
const PENDING_CREDIT_UPDATE: u8 = 4;
const PENDING_SHUTDOWN: u8 = 8;
const PENDING_RST: u8 = 16;

/// A stream connection between a guest port and a host endpoint.
#[derive(Debug)]
pub struct Connection {
    guest_cid: u64,
    local_port: u32,
    peer_port: u32,
    state: State,
    /// SHUTDOWN flags the guest has sent.
    peer_shutdown: u32,
    // The guest's receive buffer, as it last described it.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest so far.
    tx_cnt: u32,
    // Our receive buffer for guest data.
    buf_alloc: u32,
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// Guest bytes not written to the host socket yet.
    to_host: VecDeque<u8>,
    /// Host socket bytes not sent to the guest yet.
    to_guest: VecDeque<u8>,
    to_guest_cap: usize,
    pending: u8,
}

impl Connection {
    /// A connection the host opens: REQUEST goes to the guest first.
    pub fn host_initiated(
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        buf_alloc: u32,
        to_guest_cap: usize,
    ) -> Self {
        let mut c = Self::blank(guest_cid, local_port, peer_port, buf_alloc, to_guest_cap);
        c.state = State::Connecting;
        c.pending = PENDING_REQUEST;
        c
    }

    /// A connection the guest asked for with `request` (already checked by
    /// [`check_guest_header`]): accepted, RESPONSE queued.
    pub fn guest_initiated(guest_cid: u64, request: &Header, buf_alloc: u32, to_guest_cap: usize) -> Self {
        let mut c = Self::blank(
            guest_cid,
            request.dst_port,
            request.src_port,
            buf_alloc,
            to_guest_cap,
        );
        c.peer_buf_alloc = request.buf_alloc;
        c.peer_fwd_cnt = request.fwd_cnt;
        c.state = State::Established;
        c.pending = PENDING_RESPONSE;
        c
    }

    fn blank(guest_cid: u64, local_port: u32, peer_port: u32, buf_alloc: u32, to_guest_cap: usize) -> Self {
        Self {
            guest_cid,
            local_port,
            peer_port,
            state: State::Connecting,
            peer_shutdown: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            buf_alloc,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            to_host: VecDeque::new(),
            to_guest: VecDeque::new(),
            to_guest_cap,
            pending: 0,
        }
    }

    /// The host-side port.
    pub fn local_port(&self) -> u32 {
        self.local_port
    }

    /// The guest-side port.
    #[cfg(test)]
    pub fn peer_port(&self) -> u32 {
        self.peer_port
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Bytes we may still send the guest.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Handles one packet from the guest for this connection. `payload` is
    /// the RW data (empty for other ops).
    pub fn on_guest_packet(&mut self, hdr: &Header, payload: &[u8]) -> Outcome {
        if self.state == State::Closed {
            return Outcome::Reset;
        }
        if hdr.op == op::RST {
            self.state = State::Closed;
            self.pending = 0;
            return Outcome::Reset;
        }
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
        match hdr.op {
            op::RESPONSE if self.state == State::Connecting => {
                self.state = State::Established;
                Outcome::Established
            }
            op::RW if self.state == State::Established || self.state == State::Closing => {
                if self.peer_shutdown & SHUTDOWN_SEND != 0 {
                    return self.protocol_error();
                }
                let buffered = (self.to_host.len() as u64).saturating_add(payload.len() as u64);
                if buffered > u64::from(self.buf_alloc) {
                    // Past the credit we gave: a broken or hostile guest.
                    return self.protocol_error();
                }
                self.to_host.extend(payload);
                Outcome::Ok
            }
            op::CREDIT_UPDATE => Outcome::Ok,
            op::CREDIT_REQUEST => {
                self.pending |= PENDING_CREDIT_UPDATE;
                Outcome::Ok
            }
            op::SHUTDOWN => {
                self.peer_shutdown |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    // Both directions over: end it with an RST.
                    self.pending = PENDING_RST;
                }
                Outcome::Ok
            }
            _ => self.protocol_error(),
        }
    }

    fn protocol_error(&mut self) -> Outcome {
        self.pending = PENDING_RST;
        Outcome::ProtocolError
    }

    /// Whether the muxer should read the host socket now: the connection
    /// is open both ways and there is room to stage the bytes.
    pub fn wants_host_data(&self) -> bool {
        self.state == State::Established
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && self.pending & PENDING_RST == 0
            && self.to_guest.len() < self.to_guest_cap
    }

    /// Room for host bytes.
    pub fn host_data_room(&self) -> usize {
        self.to_guest_cap.saturating_sub(self.to_guest.len())
    }

    /// Stages bytes read from the host socket (at most
    /// [`Self::host_data_room`] are kept).
    pub fn push_host_data(&mut self, data: &[u8]) {
        let n = data.len().min(self.host_data_room());
        if let Some(kept) = data.get(..n) {
            self.to_guest.extend(kept);
        }
    }

    /// The host socket reached end of file: once staged data is out, tell
    /// the guest with SHUTDOWN and wait for its RST.
    pub fn host_eof(&mut self) {
        if matches!(self.state, State::Established | State::Connecting) {
            self.state = State::Closing;
            self.pending |= PENDING_SHUTDOWN;
        }
    }

    /// The host side failed: reset the connection. Buffered bytes either
    /// way are dropped.
    pub fn host_error(&mut self) {
        if self.state != State::Closed {
            self.pending = PENDING_RST;
            self.to_host.clear();
            self.to_guest.clear();
        }
    }

    /// Whether an RST is queued: the connection only waits for it to go out.
    pub fn is_resetting(&self) -> bool {
        self.pending & PENDING_RST != 0
    }

    /// Guest bytes waiting for the host socket (the first contiguous part).
    pub fn host_bytes(&self) -> &[u8] {
        self.to_host.as_slices().0
    }

    /// Whether guest bytes wait for the host socket.
    pub fn has_host_bytes(&self) -> bool {
        !self.to_host.is_empty()
    }

    /// `n` guest bytes reached the host socket: they count as forwarded,
    /// and the guest hears about the new space if its view got low.
    pub fn host_bytes_written(&mut self, n: usize) {
        let n = n.min(self.to_host.len());
        self.to_host.drain(..n);
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
        let unannounced = self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent);
        let guest_view_used = (self.to_host.len() as u64).saturating_add(u64::from(unannounced));
        let guest_view_free = u64::from(self.buf_alloc).saturating_sub(guest_view_used);
        if unannounced > 0 && guest_view_free < u64::from(self.buf_alloc) / 2 {
            self.pending |= PENDING_CREDIT_UPDATE;
        }
    }

    /// Whether the muxer should write guest bytes before the guest's
    /// shutdown of its send side is passed on.
    pub fn wants_host_shutdown_write(&self) -> bool {
        self.peer_shutdown & SHUTDOWN_SEND != 0 && self.to_host.is_empty()
    }

    fn data_ready(&self) -> bool {
        matches!(self.state, State::Established | State::Closing)
            && !self.to_guest.is_empty()
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    /// Whether [`Self::next_packet`] has something.
    pub fn has_packet(&self) -> bool {
        self.state != State::Closed
            && (self.pending & !PENDING_SHUTDOWN != 0
                || self.data_ready()
                || (self.pending & PENDING_SHUTDOWN != 0 && !self.data_ready_or_blocked()))
    }

    fn data_ready_or_blocked(&self) -> bool {
        // Staged data goes before SHUTDOWN, unless the guest will not take it.
        !self.to_guest.is_empty() && self.peer_shutdown & SHUTDOWN_RCV == 0
    }

    /// The next packet for the guest, with at most `max_payload` bytes of
    /// data appended to `payload` (cleared first).
    pub fn next_packet(&mut self, max_payload: usize, payload: &mut Vec<u8>) -> Option<Header> {
        payload.clear();
        if self.state == State::Closed {
            return None;
        }
        let op = if self.pending & PENDING_RST != 0 {
            self.pending = 0;
            self.state = State::Closed;
            op::RST
        } else if self.pending & PENDING_REQUEST != 0 {
            self.pending &= !PENDING_REQUEST;
            op::REQUEST
        } else if self.pending & PENDING_RESPONSE != 0 {
            self.pending &= !PENDING_RESPONSE;
            op::RESPONSE
        } else if self.data_ready() && max_payload > 0 {
            let n = self
                .to_guest
                .len()
                .min(self.peer_credit() as usize)
                .min(max_payload);
            payload.extend(self.to_guest.drain(..n));
            self.tx_cnt = self.tx_cnt.wrapping_add(n as u32);
            op::RW
        } else if self.pending & PENDING_SHUTDOWN != 0 && !self.data_ready_or_blocked() {
            self.pending &= !PENDING_SHUTDOWN;
            op::SHUTDOWN
        } else if self.pending & PENDING_CREDIT_UPDATE != 0 {
            op::CREDIT_UPDATE
        } else {
            return None;
        };
        // Every packet carries our credit.
        self.pending &= !PENDING_CREDIT_UPDATE;
        self.last_fwd_cnt_sent = self.fwd_cnt;
        Some(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: payload.len() as u32,
            type_: TYPE_STREAM,
            op,
            flags: if op == op::SHUTDOWN {
                SHUTDOWN_RCV | SHUTDOWN_SEND
            } else {
                0
            },
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
        })
    }
}

/// Why a packet from the guest's tx queue is refused before it reaches a
/// connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Not addressed from the guest to the host: dropped silently (an RST
    /// would go to an address the guest does not own).
    Drop,
    /// Answer with an RST to the sender's port.
    Reset,
}

/// Checks a guest packet's header against the device's rules. `payload_len`
/// is how many bytes actually follow the header in the chain.
pub fn check_guest_header(
    hdr: &Header,
    guest_cid: u64,
    payload_len: u64,
    max_payload: u32,
) -> Result<(), Reject> {
    if hdr.src_cid != guest_cid || hdr.dst_cid != HOST_CID {
        return Err(Reject::Drop);
    }
    if hdr.op == op::RST {
        // Never answer an RST with an RST.
        return if hdr.type_ == TYPE_STREAM {
            Ok(())
        } else {
            Err(Reject::Drop)
        };
    }
    if hdr.type_ != TYPE_STREAM || !(op::REQUEST..=op::CREDIT_REQUEST).contains(&hdr.op) {
        return Err(Reject::Reset);
    }
    if hdr.op == op::RW {
        if hdr.len > max_payload || u64::from(hdr.len) > payload_len {
            return Err(Reject::Reset);
        }
    } else if hdr.len != 0 {
        return Err(Reject::Reset);
    }
    Ok(())
}

/// The RST answering `hdr` (a packet for no connection, or a bad one).
pub fn reset_for(hdr: &Header) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: hdr.src_cid,
        src_port: hdr.dst_port,
        dst_port: hdr.src_port,
        type_: TYPE_STREAM,
        op: op::RST,
        ..Header::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: u64 = 3;

    fn guest(op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 1000,
            ..Header::default()
        }
    }

    fn next(c: &mut Connection, max: usize) -> Option<(Header, Vec<u8>)> {
        let mut data = Vec::new();
        c.next_packet(max, &mut data).map(|h| (h, data))
    }

    #[test]
    fn host_initiated_handshake_sends_request_and_establishes_on_response() {
        let mut c = Connection::host_initiated(CID, 1 << 30, 52, 4096, 4096);
        assert_eq!(c.state(), State::Connecting);
        let (h, data) = next(&mut c, 100).unwrap();
        assert_eq!(
            (h.op, h.src_port, h.dst_port, h.dst_cid),
            (op::REQUEST, 1 << 30, 52, CID)
        );
        assert_eq!(h.buf_alloc, 4096);
        assert!(data.is_empty());
        assert!(!c.has_packet());
        assert!(!c.wants_host_data(), "no reading before the guest accepts");
        assert_eq!(
            c.on_guest_packet(&guest(op::RESPONSE, 52, 1 << 30), &[]),
            Outcome::Established
        );
        assert_eq!(c.state(), State::Established);
        assert_eq!(c.peer_credit(), 1000);
        assert!(c.wants_host_data());
    }

    #[test]
    fn guest_initiated_connection_is_answered_with_response() {
        let mut c = Connection::guest_initiated(CID, &guest(op::REQUEST, 1234, 80), 4096, 4096);
        assert_eq!((c.local_port(), c.peer_port()), (80, 1234));
        let (h, _) = next(&mut c, 100).unwrap();
        assert_eq!((h.op, h.src_port, h.dst_port), (op::RESPONSE, 80, 1234));
        assert_eq!(c.state(), State::Established);
    }

    #[test]
    fn data_to_the_guest_never_exceeds_its_credit() {
        let mut c = Connection::guest_initiated(CID, &guest(op::REQUEST, 1, 2), 4096, 4096);
        next(&mut c, 0).unwrap(); // RESPONSE
        c.push_host_data(&[7; 1500]);
        let (h, data) = next(&mut c, 600).unwrap();
        assert_eq!((h.op, h.len, data.len()), (op::RW, 600, 600));
        let (_, data) = next(&mut c, 4096).unwrap();
        assert_eq!(data.len(), 400, "credit of 1000 is spent");
        assert_eq!(c.peer_credit(), 0);
        assert!(!c.has_packet());
        assert!(next(&mut c, 4096).is_none());
        // The guest consumed 1000 bytes.
        let mut update = guest(op::CREDIT_UPDATE, 1, 2);
        update.fwd_cnt = 1000;
        assert_eq!(c.on_guest_packet(&update, &[]), Outcome::Ok);
        let (_, data) = next(&mut c, 4096).unwrap();
        assert_eq!(data.len(), 500);
    }

    #[test]
    fn data_from_the_guest_is_bounded_by_our_credit_and_counted_when_forwarded() {
        let mut c = Connection::guest_initiated(CID, &guest(op::REQUEST, 1, 2), 100, 4096);
        next(&mut c, 0).unwrap();
        let mut rw = guest(op::RW, 1, 2);
        rw.len = 60;
        assert_eq!(c.on_guest_packet(&rw, &[1; 60]), Outcome::Ok);
        assert_eq!(c.host_bytes(), &[1; 60][..]);
        c.host_bytes_written(60);
        assert!(!c.has_host_bytes());
        // 60 of 100 forwarded and unannounced: the guest's view is low.
        let (h, _) = next(&mut c, 0).unwrap();
        assert_eq!((h.op, h.fwd_cnt, h.buf_alloc), (op::CREDIT_UPDATE, 60, 100));
        assert!(!c.has_packet());
        // Overrunning the credit resets the connection.
        assert_eq!(c.on_guest_packet(&rw, &[1; 60]), Outcome::Ok);
        assert_eq!(c.on_guest_packet(&rw, &[1; 60]), Outcome::ProtocolError);
        let (h, _) = next(&mut c, 0).unwrap();
        assert_eq!(h.op, op::RST);
        assert_eq!(c.state(), State::Closed);
    }

    #[test]
    fn credit_request_is_answered_with_credit_update() {
        let mut c = Connection::guest_initiated(CID, &guest(op::REQUEST, 1, 2), 100, 4096);
        next(&mut c, 0).unwrap();
        assert!(!c.has_packet());
        c.on_guest_packet(&guest(op::CREDIT_REQUEST, 1, 2), &[]);
        let (h, _) = next(&mut c, 0).unwrap();
        assert_eq!(h.op, op::CREDIT_UPDATE);
    }

    #[test]
    fn host_eof_sends_shutdown_after_staged_data_and_guest_rst_closes() {
        let mut c = Connection::guest_initiated(CID, &guest(op::REQUEST, 1, 2), 100, 4096);
        next(&mut c, 0).unwrap();
        c.push_host_data(b"bye");
        c.host_eof();
        assert!(!c.wants_host_data());
        let (h, data) = next(&mut c, 100).unwrap();
        assert_eq!((h.op, data.as_slice()), (op::RW, &b"bye"[..]));
        let (h, _) = next(&mut c, 100).unwrap();
        assert_eq!((h.op, h.flags), (op::SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND));
        assert_eq!(c.on_guest_packet(&guest(op::RST, 1, 2), &[]), Outcome::Reset);
        assert_eq!(c.state(), State::Closed);
    }

    #[test]
    fn guest_shutdown_each_way_then_both_ends_in_rst() {
        let mut c = Connection::guest_initiated(CID, &guest(op::REQUEST, 1, 2), 100, 4096);
        next(&mut c, 0).unwrap();
        let mut sd = guest(op::SHUTDOWN, 1, 2);
        sd.flags = SHUTDOWN_RCV;
        c.on_guest_packet(&sd, &[]);
        assert!(!c.wants_host_data(), "the guest will not receive");
        c.push_host_data(b"x");
        assert!(!c.has_packet());
        sd.flags = SHUTDOWN_SEND;
        c.on_guest_packet(&sd, &[]);
        let (h, _) = next(&mut c, 100).unwrap();
        assert_eq!(h.op, op::RST);
        assert_eq!(c.state(), State::Closed);

        let mut c = Connection::guest_initiated(CID, &guest(op::REQUEST, 1, 2), 100, 4096);
        next(&mut c, 0).unwrap();
        c.on_guest_packet(&sd, &[]);
        assert!(c.wants_host_shutdown_write());
        let mut rw = guest(op::RW, 1, 2);
        rw.len = 1;
        assert_eq!(
            c.on_guest_packet(&rw, &[0]),
            Outcome::ProtocolError,
            "data after SHUTDOWN_SEND"
        );
    }

    #[test]
    fn reset_from_the_guest_closes_without_answer() {
        let mut c = Connection::host_initiated(CID, 5, 6, 100, 100);
        assert_eq!(c.on_guest_packet(&guest(op::RST, 6, 5), &[]), Outcome::Reset);
        assert!(!c.has_packet());
        assert!(next(&mut c, 10).is_none());
    }

    #[test]
    fn unexpected_ops_for_the_state_are_protocol_errors() {
        let mut c = Connection::host_initiated(CID, 5, 6, 100, 100);
        let mut rw = guest(op::RW, 6, 5);
        rw.len = 1;
        assert_eq!(
            c.on_guest_packet(&rw, &[0]),
            Outcome::ProtocolError,
            "data before RESPONSE"
        );
        let mut c = Connection::guest_initiated(CID, &guest(op::REQUEST, 6, 5), 100, 100);
        assert_eq!(
            c.on_guest_packet(&guest(op::REQUEST, 6, 5), &[]),
            Outcome::ProtocolError
        );
        assert_eq!(
            c.on_guest_packet(&guest(op::RESPONSE, 6, 5), &[]),
            Outcome::ProtocolError
        );
    }

    #[test]
    fn hostile_headers_are_dropped_or_reset() {
        let ok = guest(op::REQUEST, 1, 2);
        assert_eq!(check_guest_header(&ok, CID, 0, 4096), Ok(()));
        let mut h = ok;
        h.src_cid = 7;
        assert_eq!(
            check_guest_header(&h, CID, 0, 4096),
            Err(Reject::Drop),
            "spoofed source"
        );
        let mut h = ok;
        h.dst_cid = 9;
        assert_eq!(
            check_guest_header(&h, CID, 0, 4096),
            Err(Reject::Drop),
            "not for the host"
        );
        let mut h = ok;
        h.type_ = 2;
        assert_eq!(
            check_guest_header(&h, CID, 0, 4096),
            Err(Reject::Reset),
            "SEQPACKET"
        );
        let mut h = ok;
        h.op = 0;
        assert_eq!(check_guest_header(&h, CID, 0, 4096), Err(Reject::Reset));
        h.op = 99;
        assert_eq!(check_guest_header(&h, CID, 0, 4096), Err(Reject::Reset));
        let mut h = guest(op::RW, 1, 2);
        h.len = 100;
        assert_eq!(
            check_guest_header(&h, CID, 99, 4096),
            Err(Reject::Reset),
            "len past the chain"
        );
        assert_eq!(check_guest_header(&h, CID, 100, 4096), Ok(()));
        assert_eq!(
            check_guest_header(&h, CID, 100, 50),
            Err(Reject::Reset),
            "len past the limit"
        );
        let mut h = ok;
        h.len = 4;
        assert_eq!(
            check_guest_header(&h, CID, 4, 4096),
            Err(Reject::Reset),
            "payload on a REQUEST"
        );
        let mut h = guest(op::RST, 1, 2);
        h.type_ = 2;
        assert_eq!(
            check_guest_header(&h, CID, 0, 4096),
            Err(Reject::Drop),
            "no RST for an RST"
        );
        let rst = reset_for(&ok);
        assert_eq!(
            (rst.op, rst.dst_cid, rst.dst_port, rst.src_port),
            (op::RST, CID, 1, 2)
        );
    }
}
