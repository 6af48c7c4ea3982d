//! Batched datagram I/O: one `recvmmsg` reads up to [`BATCH`] datagrams, one `sendmmsg` writes
//! up to [`BATCH`]. The safe wrappers of `nix` keep the crate free of `unsafe`.
//!
//! Receives also read the kernel's arrival time of every datagram (`SO_TIMESTAMPNS`, enabled
//! with [`timestamp_arrivals`]): the time the datagram reached the socket, not the time this
//! process got round to reading it, so the latency measured is the relay's, not the generator's.
//!
//! The headers hold raw pointers (they are not `Send`): build these inside the thread that uses
//! them.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::AsRawFd;

use nix::sys::socket::{
    recvmmsg, sendmmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
    MultiHeaders, SockaddrStorage,
};
use nix::sys::time::TimeSpec;

use crate::packet::Header;

/// Has the kernel stamp every datagram `sock` receives with its arrival time, read back by
/// [`RecvBatch::arrived_ns`].
pub(crate) fn timestamp_arrivals(sock: &impl std::os::fd::AsFd) -> io::Result<()> {
    setsockopt(sock, sockopt::ReceiveTimestampns, &true).map_err(io::Error::from)
}

/// Datagrams per system call.
pub(crate) const BATCH: usize = 64;

/// Buffers and headers for `recvmmsg`.
pub(crate) struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    headers: MultiHeaders<SockaddrStorage>,
    lens: Vec<usize>,
    addrs: Vec<Option<SockaddrStorage>>,
    /// The kernel's arrival time of each datagram ([`now_ns`]'s clock), when the socket has
    /// [`timestamp_arrivals`] on.
    arrived: Vec<Option<u64>>,
    /// Datagrams cut short by a too small buffer (not ours: ours fit).
    pub(crate) truncated: u64,
}

impl RecvBatch {
    pub(crate) fn new(buf_size: usize) -> Self {
        Self {
            bufs: (0..BATCH).map(|_| vec![0u8; buf_size]).collect(),
            headers: Self::headers(),
            lens: Vec::with_capacity(BATCH),
            addrs: Vec::with_capacity(BATCH),
            arrived: Vec::with_capacity(BATCH),
            truncated: 0,
        }
    }

    fn headers() -> MultiHeaders<SockaddrStorage> {
        MultiHeaders::preallocate(BATCH, Some(nix::cmsg_space!(TimeSpec)))
    }

    /// Reads what is queued on `sock`, up to [`BATCH`] datagrams, without waiting.
    /// `Err(WouldBlock)` when nothing is.
    pub(crate) fn recv(&mut self, sock: &impl AsRawFd) -> io::Result<usize> {
        self.lens.clear();
        self.addrs.clear();
        self.arrived.clear();
        let mut iovs: Vec<[IoSliceMut<'_>; 1]> =
            self.bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
        let got = recvmmsg(
            sock.as_raw_fd(),
            &mut self.headers,
            iovs.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        )
        .map_err(io::Error::from)?;
        let mut untimed = false;
        for m in got {
            if m.flags.contains(MsgFlags::MSG_TRUNC) {
                self.truncated += 1;
            }
            self.lens.push(m.bytes);
            self.addrs.push(m.address);
            let arrived = m.cmsgs().ok().and_then(|mut c| {
                c.find_map(|c| match c {
                    ControlMessageOwned::ScmTimestampns(t) => wall_ns(t),
                    _ => None,
                })
            });
            untimed |= arrived.is_none();
            self.arrived.push(arrived);
        }
        if untimed {
            // The kernel shrinks each header's control length to what it wrote, and `nix`
            // reuses the headers as they are: after a datagram without a timestamp, that slot
            // would never report one again. Fresh headers (rare: only sockets without
            // `timestamp_arrivals` get here).
            self.headers = Self::headers();
        }
        Ok(self.lens.len())
    }

    /// Datagram `i` of the last [`RecvBatch::recv`].
    pub(crate) fn datagram(&self, i: usize) -> &[u8] {
        let len = self.lens[i].min(self.bufs[i].len());
        &self.bufs[i][..len]
    }

    /// When datagram `i` of the last [`RecvBatch::recv`] reached the socket, by the kernel's
    /// clock; `None` if the socket does not have [`timestamp_arrivals`] on.
    pub(crate) fn arrived_ns(&self, i: usize) -> Option<u64> {
        self.arrived.get(i).copied().flatten()
    }

    /// How many datagrams the last [`RecvBatch::recv`] returned.
    pub(crate) fn len(&self) -> usize {
        self.lens.len()
    }

    /// Sends every datagram of the last receive back where it came from (the echo peer).
    /// Returns how many were sent. A test packet with a kernel arrival time first has its send
    /// time moved forward by the time it waited here ([`Header::hold`]), so the sender's latency
    /// counts the relay, not this echo peer's wake-ups and queueing.
    /// `now` is the time just before the send, [`now_ns`]'s clock.
    pub(crate) fn echo(
        &mut self,
        sock: &impl AsRawFd,
        out: &mut SendBatch,
        now: u64,
    ) -> io::Result<usize> {
        for (i, arrived) in self.arrived.iter().enumerate() {
            if let Some(at) = arrived {
                let len = self.lens[i].min(self.bufs[i].len());
                Header::hold(&mut self.bufs[i][..len], now.saturating_sub(*at));
            }
        }
        let frames: Vec<[IoSlice<'_>; 1]> = (0..self.len())
            .map(|i| [IoSlice::new(self.datagram(i))])
            .collect();
        out.send(sock, &frames, &self.addrs)
    }
}

/// A kernel timestamp as nanoseconds since the Unix epoch; `None` before it (never, for an
/// arrival time).
fn wall_ns(t: TimeSpec) -> Option<u64> {
    let secs = u64::try_from(t.tv_sec()).ok()?;
    let nanos = u64::try_from(t.tv_nsec()).ok()?;
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
}

/// Headers for `sendmmsg`.
pub(crate) struct SendBatch {
    headers: MultiHeaders<SockaddrStorage>,
    no_addrs: Vec<Option<SockaddrStorage>>,
}

impl SendBatch {
    pub(crate) fn new() -> Self {
        Self {
            headers: MultiHeaders::preallocate(BATCH, None),
            no_addrs: vec![None; BATCH],
        }
    }

    /// Sends `frames` (at most [`BATCH`]) to `addrs` (one per frame). Returns how many the kernel
    /// took: fewer than asked when the socket buffer is full.
    pub(crate) fn send(
        &mut self,
        sock: &impl AsRawFd,
        frames: &[[IoSlice<'_>; 1]],
        addrs: &[Option<SockaddrStorage>],
    ) -> io::Result<usize> {
        if frames.is_empty() {
            return Ok(0);
        }
        let cmsgs: [ControlMessage<'_>; 0] = [];
        let sent = sendmmsg(
            sock.as_raw_fd(),
            &mut self.headers,
            frames,
            addrs,
            cmsgs,
            MsgFlags::MSG_DONTWAIT,
        )
        .map_err(io::Error::from)?;
        Ok(sent.count())
    }

    /// Sends consecutive `frame_len`-byte frames of `arena` on a connected socket.
    pub(crate) fn send_connected(
        &mut self,
        sock: &impl AsRawFd,
        arena: &[u8],
        frame_len: usize,
    ) -> io::Result<usize> {
        let frames: Vec<[IoSlice<'_>; 1]> = arena
            .chunks_exact(frame_len)
            .take(BATCH)
            .map(|f| [IoSlice::new(f)])
            .collect();
        let n = frames.len();
        let addrs = std::mem::take(&mut self.no_addrs);
        let r = self.send(sock, &frames, &addrs[..n]);
        self.no_addrs = addrs;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::now_ns;
    use std::net::UdpSocket;
    use std::time::Duration;

    fn packet(sent_ns: u64) -> Vec<u8> {
        let mut p = vec![0u8; 100];
        let h = Header {
            flow: 1,
            seq: 2,
            sent_ns,
            step: 0,
        };
        assert!(h.encode(&mut p));
        p
    }

    /// Blocks until `sock` has a datagram, then reads the batch.
    fn recv_one(rx: &mut RecvBatch, sock: &UdpSocket) -> usize {
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut peek = [0u8; 1];
        sock.peek(&mut peek).expect("a datagram arrives");
        rx.recv(sock).expect("recvmmsg")
    }

    #[test]
    fn arrival_times_come_from_the_kernel_only_when_asked_for() {
        let a = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let b = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let mut rx = RecvBatch::new(2048);

        b.send_to(&packet(5), a.local_addr().expect("addr"))
            .expect("send");
        assert_eq!(recv_one(&mut rx, &a), 1);
        assert_eq!(rx.arrived_ns(0), None, "no timestamps unless enabled");

        timestamp_arrivals(&a).expect("SO_TIMESTAMPNS");
        let before = now_ns();
        b.send_to(&packet(5), a.local_addr().expect("addr"))
            .expect("send");
        assert_eq!(recv_one(&mut rx, &a), 1);
        let after = now_ns();
        let at = rx.arrived_ns(0).expect("a kernel timestamp");
        assert!(
            (before..=after).contains(&at),
            "{before} <= {at} <= {after}"
        );
        assert_eq!(rx.arrived_ns(1), None);
    }

    #[test]
    fn the_echo_takes_its_own_holding_time_out_of_the_round_trip() {
        let echo = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
        timestamp_arrivals(&echo).expect("SO_TIMESTAMPNS");
        let mut rx = RecvBatch::new(2048);
        let mut tx = SendBatch::new();

        let sent_ns = now_ns();
        client
            .send_to(&packet(sent_ns), echo.local_addr().expect("addr"))
            .expect("send");
        assert_eq!(recv_one(&mut rx, &echo), 1);
        let arrived = rx.arrived_ns(0).expect("a kernel timestamp");
        // However long the echo peer holds the packet is not the relay's doing.
        let held = 30_000_000;
        assert_eq!(rx.echo(&echo, &mut tx, arrived + held).expect("echo"), 1);

        let mut back = [0u8; 200];
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let (n, _) = client.recv_from(&mut back).expect("echoed");
        let h = Header::decode(&back[..n]).expect("still a test packet");
        assert_eq!(h.sent_ns, sent_ns + held, "send time moved by the hold");
        assert_eq!((h.flow, h.seq, n), (1, 2, 100), "nothing else changed");
    }
}
