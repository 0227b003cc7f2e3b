//! Where a virtio-net device's frames go and come from: a Linux tap, or
//! memory for tests.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, PoisonError};

use vmm_sys_util::eventfd::EventFd;

use super::{NetError, VNET_HDR_LEN};

/// Offload flags for [`NetBackend::set_offload`]: Linux's `TUN_F_*` bits,
/// the kinds of partial frames the backend may hand the guest.
pub mod net_offload {
    /// Frames with a partial checksum (`VIRTIO_NET_HDR_F_NEEDS_CSUM`).
    pub const CSUM: u32 = libc::TUN_F_CSUM;
    /// TCP over IPv4 segmentation offload; needs [`CSUM`].
    pub const TSO4: u32 = libc::TUN_F_TSO4;
    /// TCP over IPv6 segmentation offload; needs [`CSUM`].
    pub const TSO6: u32 = libc::TUN_F_TSO6;
    /// TSO with ECN; needs [`TSO4`] or [`TSO6`].
    pub const TSO_ECN: u32 = libc::TUN_F_TSO_ECN;
    /// UDP fragmentation offload.
    pub const UFO: u32 = libc::TUN_F_UFO;
}

/// The host side of a [`Net`](super::Net) device.
///
/// Every frame crosses the backend with a `virtio_net_hdr_v1` in front of
/// it ([`VNET_HDR_LEN`] bytes), as the guest sees them. The device reads
/// only when [`ready_fd`](Self::ready_fd) is readable and the guest has
/// buffers for what it reads; it never blocks on the backend, so both
/// directions must be non-blocking.
pub trait NetBackend: Send {
    /// Reads one frame, header first, into `buf` (at least
    /// [`VNET_HDR_LEN`] + [`MAX_FRAME_LEN`](super::MAX_FRAME_LEN) bytes);
    /// returns its length. `ErrorKind::WouldBlock` when no frame waits.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;

    /// Writes one frame, header first, gathered from `bufs` in one go;
    /// returns the bytes written. A backend that cannot take it now fails
    /// with `ErrorKind::WouldBlock` and the device drops the frame.
    fn write_frame(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;

    /// An fd that is readable while a frame waits, for the event loop's
    /// epoll set. It must stay the same fd for the backend's lifetime.
    fn ready_fd(&self) -> RawFd;

    /// Which partial frames the backend may hand the guest ([`net_offload`]
    /// bits), from the features the driver accepted.
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;

    /// The length of the header in front of every frame.
    fn set_vnet_hdr_len(&mut self, len: usize) -> io::Result<()>;
}

/// Longest interface name a tap may have (`IFNAMSIZ` minus the NUL).
const MAX_IFNAME_LEN: usize = libc::IFNAMSIZ - 1;

/// `struct ifreq` as `TUNSETIFF` and `TUNGETIFF` use it: a name and the
/// flags, padded to the kernel's 40 bytes.
#[repr(C)]
#[derive(Default)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A Linux tap interface (`/dev/net/tun` with `IFF_TAP | IFF_NO_PI |
/// IFF_VNET_HDR`), non-blocking, with a [`VNET_HDR_LEN`]-byte
/// `virtio_net_hdr_v1` on every frame.
///
/// Creating a tap ([`open`](Self::open)) needs `CAP_NET_ADMIN`; a VMM that
/// runs without it can be handed an open tap fd instead
/// ([`from_fd`](Self::from_fd)), for instance over a Unix socket from a
/// privileged helper.
#[derive(Debug)]
pub struct TapBackend {
    pub(super) file: File,
    name: String,
}

impl TapBackend {
    /// Opens (creating it if needed) the tap interface `name`.
    pub fn open(name: &str) -> Result<Self, NetError> {
        let tap_error = |source| NetError::OpenTap {
            name: name.to_string(),
            source,
        };
        if name.is_empty() || name.len() > MAX_IFNAME_LEN || name.contains('\0') {
            return Err(tap_error(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("an interface name has 1 to {MAX_IFNAME_LEN} bytes and no NUL"),
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(tap_error)?;
        let mut req = IfReq::default();
        // At most MAX_IFNAME_LEN bytes (checked above): the name and its
        // NUL fit.
        for (dst, &src) in req.name.iter_mut().zip(name.as_bytes()) {
            *dst = src;
        }
        // The flags fit in a c_short: 0x0002 | 0x1000 | 0x4000.
        req.flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: `file` is an open /dev/net/tun fd and `req` a live ifreq
        // of the kernel's size, which TUNSETIFF reads and writes back.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) };
        if ret < 0 {
            return Err(tap_error(io::Error::last_os_error()));
        }
        let mut tap = Self {
            name: ifname(&req.name),
            file,
        };
        tap.set_vnet_hdr_len(VNET_HDR_LEN).map_err(tap_error)?;
        Ok(tap)
    }

    /// Adopts an open tap fd (made with `IFF_TAP | IFF_NO_PI |
    /// IFF_VNET_HDR`); makes it non-blocking and sets its header length.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, NetError> {
        let file = File::from(fd);
        let adopt_error = |source| NetError::AdoptTap { source };
        let mut req = IfReq::default();
        // SAFETY: `req` is a live ifreq of the kernel's size that TUNGETIFF
        // fills; on an fd that is not a tap the ioctl fails and is checked.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNGETIFF, &mut req as *mut IfReq) };
        if ret < 0 {
            return Err(adopt_error(io::Error::last_os_error()));
        }
        let wanted = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if i32::from(req.flags) & wanted != wanted {
            return Err(adopt_error(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the fd's flags {:#x} lack IFF_TAP, IFF_NO_PI or IFF_VNET_HDR",
                    req.flags
                ),
            )));
        }
        // SAFETY: F_GETFL on an fd we own; the result is checked.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 {
            return Err(adopt_error(io::Error::last_os_error()));
        }
        // SAFETY: F_SETFL with the fd's own flags plus O_NONBLOCK.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(adopt_error(io::Error::last_os_error()));
        }
        let mut tap = Self {
            name: ifname(&req.name),
            file,
        };
        tap.set_vnet_hdr_len(VNET_HDR_LEN).map_err(adopt_error)?;
        Ok(tap)
    }

    /// The interface's name, as the kernel reported it.
    pub fn name(&self) -> &str {
        &self.name
    }
}

fn ifname(raw: &[u8]) -> String {
    // Up to the first NUL, if any.
    let name = raw.split(|&b| b == 0).next().unwrap_or(raw);
    String::from_utf8_lossy(name).into_owned()
}

impl NetBackend for TapBackend {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    fn write_frame(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&self.file).write_vectored(bufs)
    }

    fn ready_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is our
        // open tap.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn set_vnet_hdr_len(&mut self, len: usize) -> io::Result<()> {
        let len = libc::c_int::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which
        // points at `len`, alive for the call.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETVNETHDRSZ,
                &len as *const libc::c_int,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct MemoryState {
    incoming: VecDeque<Vec<u8>>,
    sent: Vec<Vec<u8>>,
    offloads: Vec<u32>,
    vnet_hdr_len: Option<usize>,
    refuse_offloads: bool,
    refused_offload_flags: u32,
    reads: usize,
    /// Reads fail with this errno (a tap deleted under the VM).
    read_error: Option<i32>,
}

/// A [`NetBackend`] in memory, for tests: frames to hand the guest are
/// queued with [`push_frame`](Self::push_frame), frames the guest sent and
/// offload settings are recorded. Clones share the same state, so a test
/// keeps one while the device owns another.
#[derive(Debug, Clone)]
pub struct MemoryNetBackend {
    state: Arc<Mutex<MemoryState>>,
    ready: Arc<EventFd>,
}

impl MemoryNetBackend {
    /// An empty backend.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            state: Arc::default(),
            ready: Arc::new(EventFd::new(libc::EFD_NONBLOCK)?),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a frame (header first) for the device to read.
    pub fn push_frame(&self, frame: Vec<u8>) {
        self.state().incoming.push_back(frame);
        let _ = self.ready.write(1);
    }

    /// Frames queued and not read yet.
    pub fn queued_frames(&self) -> usize {
        self.state().incoming.len()
    }

    /// Every frame written so far, header first, oldest first.
    pub fn sent(&self) -> Vec<Vec<u8>> {
        self.state().sent.clone()
    }

    /// Every offload setting so far, oldest first.
    pub fn offloads(&self) -> Vec<u32> {
        self.state().offloads.clone()
    }

    /// The header length last set.
    pub fn vnet_hdr_len(&self) -> Option<usize> {
        self.state().vnet_hdr_len
    }

    /// Makes [`NetBackend::set_offload`] fail for anything but 0, as a tap
    /// without offload support would.
    pub fn refuse_offloads(&self, refuse: bool) {
        self.state().refuse_offloads = refuse;
    }

    /// Makes [`NetBackend::set_offload`] fail for any request that includes
    /// one of `flags` ([`net_offload`] bits), as a tap on a kernel without
    /// that offload would.
    pub fn refuse_offload_flags(&self, flags: u32) {
        self.state().refused_offload_flags = flags;
    }

    /// How many times the device called [`NetBackend::read_frame`].
    pub fn reads(&self) -> usize {
        self.state().reads
    }

    /// From now on every read fails with `errno`, as reads from a tap
    /// deleted under the VM do, and the backend reports itself readable
    /// so the device finds out.
    pub fn fail_reads(&self, errno: i32) {
        self.state().read_error = Some(errno);
        let _ = self.ready.write(1);
    }
}

impl NetBackend for MemoryNetBackend {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut state = self.state();
        state.reads = state.reads.saturating_add(1);
        if let Some(errno) = state.read_error {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let Some(frame) = state.incoming.pop_front() else {
            let _ = self.ready.read();
            return Err(io::ErrorKind::WouldBlock.into());
        };
        if state.incoming.is_empty() {
            let _ = self.ready.read();
        }
        // Like a read from a tap: a short buffer truncates the frame.
        let len = frame.len().min(buf.len());
        if let (Some(dst), Some(src)) = (buf.get_mut(..len), frame.get(..len)) {
            dst.copy_from_slice(src);
        }
        Ok(len)
    }

    fn write_frame(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let frame: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        let len = frame.len();
        self.state().sent.push(frame);
        Ok(len)
    }

    fn ready_fd(&self) -> RawFd {
        self.ready.as_raw_fd()
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        let mut state = self.state();
        if (state.refuse_offloads && flags != 0) || flags & state.refused_offload_flags != 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        state.offloads.push(flags);
        Ok(())
    }

    fn set_vnet_hdr_len(&mut self, len: usize) -> io::Result<()> {
        self.state().vnet_hdr_len = Some(len);
        Ok(())
    }
}
