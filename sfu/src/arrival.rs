//! Reading a datagram together with the instant the kernel received it (`SO_TIMESTAMPNS`).
//!
//! The media loop reads its socket between forwarding passes, so a packet that arrived while
//! the loop was busy is read late. Stamped when read, that lateness looks like network delay to
//! the transport-wide congestion feedback a publisher's browser estimates its uplink from, and
//! a busy server would talk its publishers down to their lowest simulcast layer. The kernel's
//! own receive time does not move with the loop's load. Linux only; elsewhere, and whenever
//! the kernel gives no time, the read instant stands in.

use bytes::BytesMut;
use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Asks the kernel to stamp each datagram `socket` receives.
pub(crate) fn enable(socket: &socket2::Socket) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let on: libc::c_int = 1;
        // SAFETY: a valid socket descriptor, and a pointer to a c_int with its true length.
        let result = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPNS,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if result != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = socket;
    Ok(())
}

/// Room for the control messages a stamped datagram comes with.
const CONTROL_LEN: usize = 64;

/// Reads one datagram into `buffer`'s spare capacity (the caller reserves room); returns who
/// sent it and when it arrived. `WouldBlock` when nothing is waiting.
pub(crate) fn recv(
    udp: &tokio::net::UdpSocket,
    buffer: &mut BytesMut,
) -> io::Result<(SocketAddr, Instant)> {
    udp.try_io(tokio::io::Interest::READABLE, || {
        let socket = socket2::SockRef::from(udp);
        let mut addr = socket2::SockAddr::from(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)));
        let mut control = [MaybeUninit::new(0u8); CONTROL_LEN];
        let mut buffers = [socket2::MaybeUninitSlice::new(buffer.spare_capacity_mut())];
        let (len, control_len) = {
            let mut message = socket2::MsgHdrMut::new()
                .with_addr(&mut addr)
                .with_buffers(&mut buffers)
                .with_control(&mut control);
            let len = socket.recvmsg(&mut message, 0)?;
            (len, message.control_len())
        };
        // SAFETY: recvmsg wrote `len` bytes at the start of the spare capacity.
        unsafe { buffer.set_len(buffer.len() + len) };
        let from = addr
            .as_socket()
            .ok_or_else(|| io::Error::other("datagram from a non-IP address"))?;
        // SAFETY: every byte of `control` was initialised (to zero) before the call.
        let control: [u8; CONTROL_LEN] = control.map(|b| unsafe { b.assume_init() });
        let read_at = Instant::now();
        let arrived = kernel_time(&control[..control_len.min(CONTROL_LEN)])
            .map_or(read_at, |at| to_instant(at, read_at, SystemTime::now()));
        Ok((from, arrived))
    })
}

/// The `SCM_TIMESTAMPNS` time among `control`'s messages (a `cmsghdr` of 64-bit Linux: length
/// as usize, level and type as i32, then the data 8-byte aligned; the data a `timespec`).
fn kernel_time(control: &[u8]) -> Option<SystemTime> {
    #[cfg(all(target_os = "linux", target_pointer_width = "64"))]
    {
        const HEADER: usize = 16;
        let mut at = 0;
        while at + HEADER <= control.len() {
            let len = usize::from_ne_bytes(control[at..at + 8].try_into().ok()?);
            let level = i32::from_ne_bytes(control[at + 8..at + 12].try_into().ok()?);
            let kind = i32::from_ne_bytes(control[at + 12..at + 16].try_into().ok()?);
            if len < HEADER {
                return None;
            }
            if level == libc::SOL_SOCKET && kind == libc::SCM_TIMESTAMPNS && len >= HEADER + 16 {
                let data = control.get(at + HEADER..at + HEADER + 16)?;
                let seconds = i64::from_ne_bytes(data[..8].try_into().ok()?);
                let nanos = i64::from_ne_bytes(data[8..].try_into().ok()?);
                let since_epoch =
                    Duration::new(u64::try_from(seconds).ok()?, u32::try_from(nanos).ok()?);
                return UNIX_EPOCH.checked_add(since_epoch);
            }
            at += len.div_ceil(8) * 8;
        }
        None
    }
    #[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
    {
        let _ = control;
        None
    }
}

/// Maps the kernel's wall-clock arrival time onto the monotonic clock, given both clocks'
/// readings now. A time in the future, or implausibly old (the wall clock was stepped), gives
/// the read instant instead.
fn to_instant(arrived: SystemTime, read_at: Instant, wall_now: SystemTime) -> Instant {
    const MAX_AGE: Duration = Duration::from_secs(1);
    match wall_now.duration_since(arrived) {
        Ok(age) if age <= MAX_AGE => read_at.checked_sub(age).unwrap_or(read_at),
        _ => read_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datagram_read_late_keeps_its_arrival_time() {
        let read_at = Instant::now();
        let wall = SystemTime::now();
        let arrived = wall - Duration::from_millis(7);
        assert_eq!(
            to_instant(arrived, read_at, wall),
            read_at - Duration::from_millis(7)
        );
        // A stepped clock is not believed.
        assert_eq!(
            to_instant(wall + Duration::from_secs(3), read_at, wall),
            read_at
        );
        assert_eq!(
            to_instant(wall - Duration::from_secs(30), read_at, wall),
            read_at
        );
    }

    #[cfg(all(target_os = "linux", target_pointer_width = "64"))]
    #[test]
    fn the_timestamp_is_found_among_control_messages() {
        let mut control = Vec::new();
        // Some other control message first (8-byte data), then the timestamp.
        control.extend_from_slice(&20usize.to_ne_bytes());
        control.extend_from_slice(&libc::IPPROTO_IP.to_ne_bytes());
        control.extend_from_slice(&8i32.to_ne_bytes());
        control.extend_from_slice(&[1, 2, 3, 4, 0, 0, 0, 0]);
        control.extend_from_slice(&32usize.to_ne_bytes());
        control.extend_from_slice(&libc::SOL_SOCKET.to_ne_bytes());
        control.extend_from_slice(&libc::SCM_TIMESTAMPNS.to_ne_bytes());
        control.extend_from_slice(&1_700_000_000i64.to_ne_bytes());
        control.extend_from_slice(&250_000_000i64.to_ne_bytes());
        assert_eq!(
            kernel_time(&control),
            Some(UNIX_EPOCH + Duration::new(1_700_000_000, 250_000_000))
        );
        assert_eq!(kernel_time(&control[..24]), None);
        assert_eq!(kernel_time(&[0; 16]), None);
    }

    #[tokio::test]
    async fn a_real_datagram_arrives_stamped_before_it_is_read() {
        let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        std_socket.set_nonblocking(true).unwrap();
        let socket = socket2::Socket::from(std_socket);
        enable(&socket).unwrap();
        let udp = tokio::net::UdpSocket::from_std(socket.into()).unwrap();
        let to = udp.local_addr().unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.send_to(b"hello", to).unwrap();
        let sent_at = Instant::now();
        std::thread::sleep(Duration::from_millis(20));
        udp.readable().await.unwrap();
        let mut buffer = BytesMut::with_capacity(2048);
        let (from, arrived) = recv(&udp, &mut buffer).unwrap();
        assert_eq!(from, sender.local_addr().unwrap());
        assert_eq!(&buffer[..], b"hello");
        // Stamped by the kernel on arrival, not 20 ms later when read.
        assert!(
            arrived < sent_at + Duration::from_millis(10),
            "{:?} after sending",
            arrived.saturating_duration_since(sent_at)
        );
    }
}
