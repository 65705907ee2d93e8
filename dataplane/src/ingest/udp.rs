//! UDP sockets for the receive path: batched `recvmmsg` into reusable
//! buffers, and receive-buffer sizing that reports what the kernel granted.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};


/// Largest datagram kept; larger ones are truncated by the kernel and
/// discarded by the caller (`MSG_TRUNC` is reported).
pub const MAX_DATAGRAM: usize = 2048;

/// Binds a non-blocking UDP socket with the requested receive buffer. Returns
/// the socket and the buffer size the kernel actually granted (Linux doubles
/// the request and caps it at `net.core.rmem_max` unless we are privileged).
pub fn bind(addr: SocketAddr, receive_buffer: usize) -> io::Result<(UdpSocket, usize)> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // No SO_REUSEADDR: a second receiver on the same port must fail loudly,
    // not share (and steal) the stream.
    if receive_buffer > 0 {
        socket.set_recv_buffer_size(receive_buffer)?;
        if socket.recv_buffer_size()? < receive_buffer {
            // Beyond rmem_max: SO_RCVBUFFORCE works with CAP_NET_ADMIN.
            let size = receive_buffer as libc::c_int;
            // SAFETY: valid fd and a c_int option value of the right size.
            unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }
    socket.bind(&SockAddr::from(addr))?;
    socket.set_nonblocking(true)?;
    let granted = socket.recv_buffer_size()?;
    Ok((socket.into(), granted))
}

/// One batch of received datagrams, in buffers that are swapped out for
/// fresh ones as the caller keeps them.
pub struct RecvBatch {
    pub bufs: Vec<Vec<u8>>,
    pub lens: Vec<usize>,
    pub truncated: Vec<bool>,
    pub sources: Vec<Option<SocketAddr>>,
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    names: Vec<libc::sockaddr_storage>,
}

// SAFETY: the raw pointers in `hdrs`/`iovs` only ever point into buffers this
// batch owns, and are rewritten before each `recvmmsg`; moving the batch to
// another thread moves those buffers with it.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    pub fn new(size: usize) -> Self {
        // SAFETY: all-zero is a valid value for these plain C structs.
        let zeroed_hdr: libc::mmsghdr = unsafe { std::mem::zeroed() };
        let zeroed_name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        RecvBatch {
            bufs: (0..size).map(|_| vec![0; MAX_DATAGRAM]).collect(),
            lens: vec![0; size],
            truncated: vec![false; size],
            sources: vec![None; size],
            hdrs: vec![zeroed_hdr; size],
            iovs: vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; size],
            names: vec![zeroed_name; size],
        }
    }

    /// Datagrams one `recv` can return.
    pub fn capacity(&self) -> usize {
        self.bufs.len()
    }

    /// Receives up to a batch of datagrams without blocking. Returns how many
    /// arrived (0 when none were waiting).
    pub fn recv(&mut self, socket: &impl AsRawFd) -> io::Result<usize> {
        let n = self.bufs.len();
        for i in 0..n {
            if self.bufs[i].len() != MAX_DATAGRAM {
                self.bufs[i].resize(MAX_DATAGRAM, 0);
            }
            self.iovs[i] = libc::iovec { iov_base: self.bufs[i].as_mut_ptr().cast(), iov_len: MAX_DATAGRAM };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: every header points at live buffers owned by `self` that
        // outlive the call; the count matches the array length.
        let got = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if got < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(err),
            };
        }
        let got = got as usize;
        for i in 0..got {
            self.lens[i] = (self.hdrs[i].msg_len as usize).min(MAX_DATAGRAM);
            self.truncated[i] = self.hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            self.sources[i] = sockaddr_to_std(&self.names[i]);
        }
        Ok(got)
    }

    /// Takes buffer `i` (its datagram is the first `lens[i]` bytes; the
    /// buffer keeps its full length, so handing it back costs no zero-fill),
    /// leaving `replacement` in its place.
    pub fn take(&mut self, i: usize, mut replacement: Vec<u8>) -> Vec<u8> {
        if replacement.len() < MAX_DATAGRAM {
            replacement.resize(MAX_DATAGRAM, 0);
        }
        std::mem::replace(&mut self.bufs[i], replacement)
    }

    pub fn datagram(&self, i: usize) -> &[u8] {
        &self.bufs[i][..self.lens[i]]
    }
}

/// Reads an IPv4 or IPv6 address the kernel wrote into a `sockaddr_storage`.
fn sockaddr_to_std(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: ss_family says the storage holds a sockaddr_in.
            let a: &libc::sockaddr_in = unsafe { &*(storage as *const libc::sockaddr_storage).cast() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::new(ip.into(), u16::from_be(a.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: ss_family says the storage holds a sockaddr_in6.
            let a: &libc::sockaddr_in6 = unsafe { &*(storage as *const libc::sockaddr_storage).cast() };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(ip, u16::from_be(a.sin6_port), a.sin6_flowinfo, a.sin6_scope_id)))
        }
        _ => None,
    }
}

/// Waits until one of the sockets is readable or the timeout passes.
/// Returns which were readable.
pub fn wait_readable(sockets: &[&UdpSocket], timeout: Duration) -> io::Result<Vec<bool>> {
    let mut fds: Vec<libc::pollfd> =
        sockets.iter().map(|s| libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: fds is a valid array of pollfd for the duration of the call.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if r < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; sockets.len()]);
        }
        return Err(err);
    }
    Ok(fds.iter().map(|f| f.revents & (libc::POLLIN | libc::POLLERR) != 0).collect())
}

/// The unspecified address of `ip`'s family.
pub fn unspecified(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

/// `addr` with its port moved by `offset` (wrapping, for RTCP = RTP + 1).
pub fn with_port_offset(addr: SocketAddr, offset: u16) -> SocketAddr {
    SocketAddr::new(addr.ip(), addr.port().wrapping_add(offset))
}

/// Binds one non-blocking UDP socket with a large receive buffer.
pub fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    // Bursts of a keyframe's packets must not overflow the default buffer.
    let (socket, _) = bind(addr, 4 << 20)?;
    let _ = socket2::SockRef::from(&socket).set_send_buffer_size(4 << 20);
    Ok(socket)
}

/// Binds an RTP socket at `rtp` and its RTCP socket at port + `offset`. With
/// port 0 it picks an ephemeral even RTP port whose RTCP neighbour is free,
/// so peers that assume "RTCP = RTP + 1" find it.
pub fn bind_rtp_rtcp_pair(rtp: SocketAddr, offset: u16) -> io::Result<(UdpSocket, UdpSocket)> {
    if rtp.port() != 0 {
        let a = bind_udp(rtp)?;
        let b = bind_udp(with_port_offset(rtp, offset))?;
        return Ok((a, b));
    }
    let mut last_err = None;
    for _ in 0..64 {
        let a = bind_udp(rtp)?;
        let port = a.local_addr()?.port();
        if port % 2 == 1 || port.checked_add(offset).is_none() {
            continue;
        }
        match bind_udp(SocketAddr::new(rtp.ip(), port + offset)) {
            Ok(b) => return Ok((a, b)),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| io::Error::new(io::ErrorKind::AddrInUse, "no free RTP/RTCP port pair found")))
}

/// Sends on a non-blocking socket, waiting up to 100 ms for buffer space so a
/// burst (a keyframe's packets) is not lost on our own side.
pub fn send_to_waiting(socket: &UdpSocket, data: &[u8], dest: SocketAddr) -> io::Result<usize> {
    let deadline = Instant::now() + Duration::from_millis(100);
    loop {
        match socket.send_to(data, dest) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                let mut fd = libc::pollfd { fd: socket.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut fd, 1, 10) };
            }
            result => return result,
        }
    }
}

/// Errors after which a socket is still usable: nothing to read, a signal, or
/// an ICMP error (port unreachable) reported on a later call.
pub fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
            | io::ErrorKind::Interrupted
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_receive_reads_several_datagrams_with_sources() {
        let (rx, granted) = bind("127.0.0.1:0".parse().unwrap(), 1 << 20).unwrap();
        assert!(granted >= 1 << 20, "granted {granted}");
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        for i in 0..5u8 {
            tx.send_to(&[i; 10], to).unwrap();
        }
        let mut batch = RecvBatch::new(8);
        let mut got = 0;
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while got < 5 && std::time::Instant::now() < deadline {
            wait_readable(&[&rx], Duration::from_millis(100)).unwrap();
            let n = batch.recv(&rx).unwrap();
            for i in 0..n {
                assert_eq!(batch.datagram(i), &[got as u8; 10]);
                assert_eq!(batch.sources[i], Some(tx.local_addr().unwrap()));
                got += 1;
            }
        }
        assert_eq!(got, 5);
        let kept = batch.take(0, Vec::new());
        assert_eq!(&kept[..batch.lens[0]], &[0u8; 10]);
    }
}
