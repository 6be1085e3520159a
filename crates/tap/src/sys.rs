//! The raw ioctls, kept in one place with their `unsafe`.

use std::ffi::CStr;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

pub(crate) const IFNAMSIZ: usize = libc::IFNAMSIZ;
pub(crate) const IFF_TAP: u32 = 0x0002;
pub(crate) const IFF_NO_PI: u32 = 0x1000;
pub(crate) const IFF_VNET_HDR: u32 = 0x4000;
pub(crate) const IFF_MULTI_QUEUE: u32 = 0x0100;

const SIOCBRADDIF: libc::c_ulong = 0x89a2;
const SIOCBRDELIF: libc::c_ulong = 0x89a3;

/// `struct ifreq` viewed through the members this crate uses.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; IFNAMSIZ],
    data: IfReqData,
}

#[repr(C)]
union IfReqData {
    flags: libc::c_short,
    ifindex: libc::c_int,
    // The kernel's union is 24 bytes on 64-bit (struct ifmap, struct sockaddr).
    _pad: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> io::Result<IfReq> {
        let bytes = name.as_bytes();
        if bytes.len() >= IFNAMSIZ || bytes.contains(&0) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            data: IfReqData { _pad: [0; 24] },
        };
        for (dst, src) in req.name.iter_mut().zip(bytes) {
            *dst = *src as libc::c_char;
        }
        Ok(req)
    }

    fn name(&self) -> String {
        // The kernel NUL-terminates names; the array is zeroed beyond them.
        let bytes: Vec<u8> = self
            .name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

fn tunsetiff() -> libc::c_ulong {
    nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()) as libc::c_ulong
}
fn tungetiff() -> libc::c_ulong {
    nix::request_code_read!(b'T', 210, std::mem::size_of::<libc::c_uint>()) as libc::c_ulong
}
fn tungetfeatures() -> libc::c_ulong {
    nix::request_code_read!(b'T', 207, std::mem::size_of::<libc::c_uint>()) as libc::c_ulong
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub(crate) fn tun_get_features(fd: RawFd) -> io::Result<u32> {
    let mut features: libc::c_uint = 0;
    // SAFETY: TUNGETFEATURES writes one unsigned int to the pointer.
    check(unsafe { libc::ioctl(fd, tungetfeatures() as _, &mut features) })?;
    Ok(features)
}

pub(crate) fn tun_set_iff(fd: RawFd, name: &str, flags: u32) -> io::Result<String> {
    let mut req = IfReq::new(name)?;
    req.data.flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `req` is.
    check(unsafe { libc::ioctl(fd, tunsetiff() as _, &mut req) })?;
    Ok(req.name())
}

pub(crate) fn tun_get_iff(fd: RawFd) -> io::Result<u32> {
    let mut req = IfReq::new("")?;
    // SAFETY: TUNGETIFF writes a struct ifreq, which `req` is.
    check(unsafe { libc::ioctl(fd, tungetiff() as _, &mut req) })?;
    // SAFETY: the kernel filled ifr_flags.
    Ok(u32::from(unsafe { req.data.flags } as u16))
}

pub(crate) fn if_index(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let c: &CStr = &c;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(index)
    }
}

fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(crate) fn set_up(name: &str) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let sock = control_socket()?;
    let mut req = IfReq::new(name)?;
    // SAFETY: SIOCGIFFLAGS fills ifr_flags of a struct ifreq.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) })?;
    // SAFETY: just filled by the kernel.
    let flags = unsafe { req.data.flags };
    if flags & libc::IFF_UP as libc::c_short != 0 {
        return Ok(());
    }
    req.data.flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads a struct ifreq.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &mut req) })
}

pub(crate) fn bridge_ctl(bridge: &str, ifindex: u32, add: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let sock = control_socket()?;
    let mut req = IfReq::new(bridge)?;
    req.data.ifindex = ifindex as libc::c_int;
    let op = if add { SIOCBRADDIF } else { SIOCBRDELIF };
    // SAFETY: SIOCBRADDIF/SIOCBRDELIF read a struct ifreq with ifr_ifindex.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), op as _, &mut req) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_matches_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        assert_eq!(tunsetiff(), 0x400454ca);
        assert_eq!(tungetiff(), 0x800454d2);
        assert_eq!(tungetfeatures(), 0x800454cf);
    }

    #[test]
    fn ifreq_name_round_trip() {
        assert_eq!(IfReq::new("gkvm%d").unwrap().name(), "gkvm%d");
        assert!(IfReq::new("0123456789abcdef").is_err());
    }
}
