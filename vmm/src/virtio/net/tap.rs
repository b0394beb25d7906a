//! A tap device: the host end of a virtio-net device.
//!
//! Opened with `IFF_VNET_HDR`, so every frame read or written carries the same 12-byte header
//! the virtio-net driver uses (`struct virtio_net_hdr_v1`): the guest's checksum and
//! segmentation offload requests go straight to the host kernel and back, and frames move
//! between guest buffers and the tap without being copied in between (`readv`/`writev` on
//! the guest's own memory).
//!
//! The tap is not persistent: it disappears with the last file descriptor, so a VM that
//! ends, however it ends, leaves no tap behind.
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;

/// `TUNSETIFF`: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `TUNSETOFFLOAD`: `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `TUNSETVNETHDRSZ`: `_IOW('T', 216, int)`.
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// The host may hand the guest frames whose checksum is left to the guest.
pub const TUN_F_CSUM: u32 = 0x01;
/// The host may hand the guest TCPv4 segments larger than the MTU.
pub const TUN_F_TSO4: u32 = 0x02;
/// The same for TCPv6.
pub const TUN_F_TSO6: u32 = 0x04;
/// ... with the ECN bit set.
pub const TUN_F_TSO_ECN: u32 = 0x08;

/// Size of `struct virtio_net_hdr_v1`, the header in front of every frame.
pub const VNET_HDR_LEN: usize = 12;

/// Longest interface name the kernel takes (`IFNAMSIZ` less the NUL).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// Errors from opening a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("invalid tap name {0:?}: 1 to 15 characters, no '/', spaces or ':'")]
    Name(String),
    #[error("cannot open /dev/net/tun for tap {name}: {cause}")]
    OpenTun { name: String, cause: std::io::Error },
    #[error("cannot open tap {name}: {cause}")]
    Netns {
        name: String,
        cause: shoal_netlink::NetlinkError,
    },
    #[error("cannot {what} on tap {name}: {cause}")]
    Ioctl {
        what: &'static str,
        name: String,
        cause: std::io::Error,
    },
}

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags (the rest of the union
/// is unused).
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (creating it if needed) tap `name` in network namespace `netns`, or in the
    /// caller's when `None`. The file descriptor is non-blocking.
    pub fn open(name: &str, netns: Option<&Path>) -> Result<Tap, TapError> {
        let valid = !name.is_empty()
            && name.len() <= MAX_NAME_LEN
            && !name.contains(['/', ' ', ':', '\0'])
            && name != "."
            && name != "..";
        if !valid {
            return Err(TapError::Name(name.into()));
        }
        let Some(path) = netns else {
            return Self::open_here(name);
        };
        // The tap is created in the namespace of the thread that opens it; a short-lived
        // thread enters the namespace so that no other thread of the VMM changes namespace.
        shoal_netlink::in_netns(path, || Self::open_here(name)).map_err(|source| {
            TapError::Netns {
                name: name.into(),
                cause: source,
            }
        })?
    }

    fn open_here(name: &str) -> Result<Tap, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| TapError::OpenTun {
                name: name.into(),
                cause: source,
            })?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        for (slot, b) in req.name.iter_mut().zip(name.bytes()) {
            *slot = b as libc::c_char;
        }
        let tap = Tap {
            file,
            name: name.into(),
        };
        // SAFETY: TUNSETIFF reads a `struct ifreq`; `req` is one (name, flags, padding to
        // the kernel's 40 bytes) and lives across the call.
        let rc = unsafe { libc::ioctl(tap.file.as_raw_fd(), TUNSETIFF, &mut req) };
        tap.check(rc, "attach to the tap (TUNSETIFF)")?;
        let len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which is valid.
        let rc = unsafe { libc::ioctl(tap.file.as_raw_fd(), TUNSETVNETHDRSZ, &len) };
        tap.check(rc, "set the virtio-net header size")?;
        tap.set_offload(0)?;
        Ok(tap)
    }

    fn check(&self, rc: libc::c_int, what: &'static str) -> Result<(), TapError> {
        if rc < 0 {
            return Err(TapError::Ioctl {
                what,
                name: self.name.clone(),
                cause: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Tells the host kernel which offloads the guest accepts on received frames
    /// (`TUN_F_*`); frames it would otherwise hand over are segmented and checksummed first.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let rc =
            unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) };
        self.check(rc, "set offloads")
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (with its header) into the buffers `iovs` point to.
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for writes for its whole length and
    /// not otherwise borrowed during the call.
    pub unsafe fn readv(&self, iovs: &[libc::iovec]) -> std::io::Result<usize> {
        let n = iovs.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: the caller guarantees the buffers; the count is within `iovs`.
        let rc = unsafe { libc::readv(self.file.as_raw_fd(), iovs.as_ptr(), n) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(rc as usize)
    }

    /// Writes one frame (with its header) gathered from the buffers `iovs` point to.
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for reads for its whole length.
    pub unsafe fn writev(&self, iovs: &[libc::iovec]) -> std::io::Result<usize> {
        let n = iovs.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: the caller guarantees the buffers; the count is within `iovs`.
        let rc = unsafe { libc::writev(self.file.as_raw_fd(), iovs.as_ptr(), n) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(rc as usize)
    }
}

#[cfg(any(test, feature = "fuzzing"))]
impl Tap {
    /// A second descriptor of the same tap (the fuzz harness gives each input's device one).
    pub(crate) fn try_clone(&self) -> std::io::Result<Tap> {
        Ok(Tap {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
