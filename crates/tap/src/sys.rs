//! The raw ioctls, kept in one place with their `unsafe`. The kernel's
//! structures and request numbers come from `libc` (`ifreq`, `TUNSETIFF`,
//! ...); only the bridge requests, which `libc` has for Android alone, are
//! spelled out here.

use std::ffi::CStr;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

pub(crate) const IFNAMSIZ: usize = libc::IFNAMSIZ;

/// `IFF_*` bits as the unsigned flag set this crate exposes. The kernel's
/// values are small positive numbers, so the conversions are exact.
const fn flag(bit: libc::c_int) -> u32 {
    bit.unsigned_abs()
}
pub(crate) const IFF_TAP: u32 = flag(libc::IFF_TAP);
pub(crate) const IFF_NO_PI: u32 = flag(libc::IFF_NO_PI);
pub(crate) const IFF_VNET_HDR: u32 = flag(libc::IFF_VNET_HDR);
pub(crate) const IFF_MULTI_QUEUE: u32 = flag(libc::IFF_MULTI_QUEUE);

/// `linux/sockios.h`: add or remove a bridge port by interface index.
const SIOCBRADDIF: libc::Ioctl = 0x89a2;
const SIOCBRDELIF: libc::Ioctl = 0x89a3;

/// A zeroed `struct ifreq` carrying `name`.
fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.len() >= IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: `ifreq` is plain old data (a name array and a union of
    // integers, sockaddrs and a pointer); all-zero is a valid value of each.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    Ok(req)
}

/// The name the kernel wrote back into an `ifreq`.
fn ifreq_name(req: &libc::ifreq) -> String {
    // The kernel NUL-terminates names; the array is zeroed beyond them.
    let bytes: Vec<u8> = req
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c.to_ne_bytes()[0])
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The flags of an `ifreq` as the kernel's unsigned short.
fn ifreq_flags(req: &libc::ifreq) -> u16 {
    // SAFETY: every caller reads the flags member after the kernel filled
    // it (or after zeroing), and any bit pattern is a valid c_short.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    u16::from_ne_bytes(flags.to_ne_bytes())
}

fn set_ifreq_flags(req: &mut libc::ifreq, flags: u32) -> io::Result<()> {
    let flags = u16::try_from(flags).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    req.ifr_ifru.ifru_flags = libc::c_short::from_ne_bytes(flags.to_ne_bytes());
    Ok(())
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
    check(unsafe { libc::ioctl(fd, libc::TUNGETFEATURES, &mut features) })?;
    Ok(features)
}

pub(crate) fn tun_set_iff(fd: RawFd, name: &str, flags: u32) -> io::Result<String> {
    let mut req = ifreq(name)?;
    set_ifreq_flags(&mut req, flags)?;
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `req` is.
    check(unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut req) })?;
    Ok(ifreq_name(&req))
}

pub(crate) fn tun_get_iff(fd: RawFd) -> io::Result<u32> {
    let mut req = ifreq("")?;
    // SAFETY: TUNGETIFF writes a struct ifreq, which `req` is.
    check(unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut req) })?;
    Ok(u32::from(ifreq_flags(&req)))
}

pub(crate) fn if_index(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let c: &CStr = &c;
    // SAFETY: a valid NUL-terminated string that outlives the call.
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
    let mut req = ifreq(name)?;
    // SAFETY: SIOCGIFFLAGS fills ifr_flags of a struct ifreq.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
    let flags = u32::from(ifreq_flags(&req));
    let up = flag(libc::IFF_UP);
    if flags & up != 0 {
        return Ok(());
    }
    set_ifreq_flags(&mut req, flags | up)?;
    // SAFETY: SIOCSIFFLAGS reads a struct ifreq.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req) })
}

pub(crate) fn bridge_ctl(bridge: &str, ifindex: u32, add: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let sock = control_socket()?;
    let mut req = ifreq(bridge)?;
    req.ifr_ifru.ifru_ifindex =
        libc::c_int::try_from(ifindex).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let op = if add { SIOCBRADDIF } else { SIOCBRDELIF };
    // SAFETY: SIOCBRADDIF/SIOCBRDELIF read a struct ifreq with ifr_ifindex.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), op, &mut req) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_matches_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<libc::ifreq>(), 40);
        assert_eq!(libc::TUNSETIFF, 0x400454ca);
        assert_eq!(libc::TUNGETIFF, 0x800454d2);
        assert_eq!(libc::TUNGETFEATURES, 0x800454cf);
        assert_eq!((IFF_TAP, IFF_NO_PI, IFF_VNET_HDR), (0x2, 0x1000, 0x4000));
    }

    #[test]
    fn ifreq_name_round_trip() {
        assert_eq!(ifreq_name(&ifreq("gkvm%d").unwrap()), "gkvm%d");
        assert!(ifreq("0123456789abcdef").is_err());
    }
}
