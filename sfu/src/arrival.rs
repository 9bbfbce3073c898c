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

/// The `SCM_TIMESTAMPNS` time among `control`'s messages, walked with libc's `CMSG_*`
/// helpers (the layout of a control message is the platform's business, not ours).
fn kernel_time(control: &[u8]) -> Option<SystemTime> {
    #[cfg(target_os = "linux")]
    {
        // An aligned copy: the helpers read `cmsghdr`s in place.
        let mut aligned = [0u64; CONTROL_LEN / 8];
        let len = control.len().min(CONTROL_LEN);
        // SAFETY: `aligned` has CONTROL_LEN bytes and `len` is at most that.
        unsafe {
            std::ptr::copy_nonoverlapping(control.as_ptr(), aligned.as_mut_ptr().cast(), len);
        }
        // SAFETY: a zeroed msghdr is valid; only its control fields are set and read.
        let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
        header.msg_control = aligned.as_mut_ptr().cast();
        header.msg_controllen = len as _;
        // SAFETY: the helpers stay within `msg_control..msg_control + msg_controllen`, and a
        // message's data is read only when it lies within what was received and its length
        // says it holds a whole `timespec`.
        unsafe {
            let mut message = libc::CMSG_FIRSTHDR(&header);
            while !message.is_null() {
                let m = &*message;
                let offset = message as usize - aligned.as_ptr() as usize;
                let within = offset + m.cmsg_len as usize <= len;
                let holds_timespec = within
                    && m.cmsg_len as usize
                        >= libc::CMSG_LEN(std::mem::size_of::<libc::timespec>() as u32) as usize;
                if m.cmsg_level == libc::SOL_SOCKET
                    && m.cmsg_type == libc::SCM_TIMESTAMPNS
                    && holds_timespec
                {
                    let at: libc::timespec =
                        std::ptr::read_unaligned(libc::CMSG_DATA(message).cast());
                    let since_epoch = Duration::new(
                        u64::try_from(at.tv_sec).ok()?,
                        u32::try_from(at.tv_nsec).ok()?,
                    );
                    return UNIX_EPOCH.checked_add(since_epoch);
                }
                message = libc::CMSG_NXTHDR(&header, message);
            }
        }
        None
    }
    #[cfg(not(target_os = "linux"))]
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

    /// Control messages as the kernel lays them out: each `(level, type, data)` in turn.
    #[cfg(target_os = "linux")]
    fn control_messages(messages: &[(i32, i32, &[u8])]) -> Vec<u8> {
        let mut buffer = [0u64; CONTROL_LEN / 8];
        // SAFETY: a zeroed msghdr is valid; the helpers write within `buffer`, which has room
        // for the messages the test gives (checked by the assertion).
        unsafe {
            let mut header: libc::msghdr = std::mem::zeroed();
            header.msg_control = buffer.as_mut_ptr().cast();
            let space: usize = messages
                .iter()
                .map(|(_, _, data)| libc::CMSG_SPACE(data.len() as u32) as usize)
                .sum();
            assert!(space <= CONTROL_LEN);
            header.msg_controllen = space as _;
            let mut message = libc::CMSG_FIRSTHDR(&header);
            for (level, kind, data) in messages {
                (*message).cmsg_level = *level;
                (*message).cmsg_type = *kind;
                (*message).cmsg_len = libc::CMSG_LEN(data.len() as u32) as _;
                std::ptr::copy_nonoverlapping(data.as_ptr(), libc::CMSG_DATA(message), data.len());
                message = libc::CMSG_NXTHDR(&header, message);
            }
            let bytes: &[u8] = std::slice::from_raw_parts(buffer.as_ptr().cast(), space);
            bytes.to_vec()
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_timestamp_is_found_among_control_messages() {
        let time = libc::timespec {
            tv_sec: 1_700_000_000,
            tv_nsec: 250_000_000,
        };
        // SAFETY: viewing a plain C struct as its bytes.
        let time_bytes: &[u8] = unsafe {
            std::slice::from_raw_parts(
                (&time as *const libc::timespec).cast(),
                std::mem::size_of::<libc::timespec>(),
            )
        };
        let control = control_messages(&[
            (libc::IPPROTO_IP, libc::IP_TOS, &[1, 2, 3, 4]),
            (libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS, time_bytes),
        ]);
        assert_eq!(
            kernel_time(&control),
            Some(UNIX_EPOCH + Duration::new(1_700_000_000, 250_000_000))
        );
        // Cut short, or without the timestamp: none.
        assert_eq!(kernel_time(&control[..control.len() - 8]), None);
        let other = control_messages(&[(libc::IPPROTO_IP, libc::IP_TOS, &[1, 2, 3, 4])]);
        assert_eq!(kernel_time(&other), None);
        assert_eq!(kernel_time(&[]), None);
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
