//! The virtio-vsock packet header (virtio 1.2, section 5.10.6), as bytes in
//! guest memory: little-endian, 44 bytes, no padding.

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_SIZE: usize = 44;

/// The host's CID: packets from the guest must be addressed to it.
pub const HOST_CID: u64 = 2;

/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type this device supports.
pub const TYPE_STREAM: u16 = 1;

/// Packet operations (`op`).
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset (or refused).
    pub const RST: u16 = 3;
    /// The sender will not send and/or receive any more (see `flags`).
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// The sender's `buf_alloc`/`fwd_cnt` changed.
    pub const CREDIT_UPDATE: u16 = 6;
    /// The sender asks for a `CREDIT_UPDATE`.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// `SHUTDOWN` flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `SHUTDOWN` flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// A decoded `struct virtio_vsock_hdr`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source context ID.
    pub src_cid: u64,
    /// Destination context ID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length in bytes.
    pub len: u32,
    /// Socket type (`TYPE_STREAM`).
    pub type_: u16,
    /// Operation (see [`op`]).
    pub op: u16,
    /// Operation-specific flags (`SHUTDOWN_*`).
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer so far.
    pub fwd_cnt: u32,
}

impl Header {
    /// Decodes a header; `bytes` must hold at least [`HDR_SIZE`] bytes.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        // The fields in order, 8 + 8 + 4 + 4 + 4 + 2 + 2 + 4 + 4 + 4 bytes.
        let (src_cid, b) = bytes.split_first_chunk()?;
        let (dst_cid, b) = b.split_first_chunk()?;
        let (src_port, b) = b.split_first_chunk()?;
        let (dst_port, b) = b.split_first_chunk()?;
        let (len, b) = b.split_first_chunk()?;
        let (type_, b) = b.split_first_chunk()?;
        let (op, b) = b.split_first_chunk()?;
        let (flags, b) = b.split_first_chunk()?;
        let (buf_alloc, b) = b.split_first_chunk()?;
        let (fwd_cnt, _) = b.split_first_chunk()?;
        Some(Self {
            src_cid: u64::from_le_bytes(*src_cid),
            dst_cid: u64::from_le_bytes(*dst_cid),
            src_port: u32::from_le_bytes(*src_port),
            dst_port: u32::from_le_bytes(*dst_port),
            len: u32::from_le_bytes(*len),
            type_: u16::from_le_bytes(*type_),
            op: u16::from_le_bytes(*op),
            flags: u32::from_le_bytes(*flags),
            buf_alloc: u32::from_le_bytes(*buf_alloc),
            fwd_cnt: u32::from_le_bytes(*fwd_cnt),
        })
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_through_its_little_endian_layout() {
        let h = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 0x1234,
            dst_port: 52,
            len: 7,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: SHUTDOWN_SEND,
            buf_alloc: 65536,
            fwd_cnt: 9,
        };
        let bytes = h.encode();
        assert_eq!(&bytes[0..8], &3u64.to_le_bytes());
        assert_eq!(&bytes[30..32], &op::RW.to_le_bytes());
        assert_eq!(Header::decode(&bytes), Some(h));
    }

    #[test]
    fn a_short_header_does_not_decode() {
        assert_eq!(Header::decode(&[0u8; HDR_SIZE - 1]), None);
    }
}
