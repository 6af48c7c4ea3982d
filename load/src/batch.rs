//! Batched datagram I/O: one `recvmmsg` reads up to [`BATCH`] datagrams, one `sendmmsg` writes
//! up to [`BATCH`]. The safe wrappers of `nix` keep the crate free of `unsafe`.
//!
//! The headers hold raw pointers (they are not `Send`): build these inside the thread that uses
//! them.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::AsRawFd;

use nix::sys::socket::{
    recvmmsg, sendmmsg, ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage,
};

/// Datagrams per system call.
pub(crate) const BATCH: usize = 64;

/// Buffers and headers for `recvmmsg`.
pub(crate) struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    headers: MultiHeaders<SockaddrStorage>,
    lens: Vec<usize>,
    addrs: Vec<Option<SockaddrStorage>>,
    /// Datagrams cut short by a too small buffer (not ours: ours fit).
    pub(crate) truncated: u64,
}

impl RecvBatch {
    pub(crate) fn new(buf_size: usize) -> Self {
        Self {
            bufs: (0..BATCH).map(|_| vec![0u8; buf_size]).collect(),
            headers: MultiHeaders::preallocate(BATCH, None),
            lens: Vec::with_capacity(BATCH),
            addrs: Vec::with_capacity(BATCH),
            truncated: 0,
        }
    }

    /// Reads what is queued on `sock`, up to [`BATCH`] datagrams, without waiting.
    /// `Err(WouldBlock)` when nothing is.
    pub(crate) fn recv(&mut self, sock: &impl AsRawFd) -> io::Result<usize> {
        self.lens.clear();
        self.addrs.clear();
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
        for m in got {
            if m.flags.contains(MsgFlags::MSG_TRUNC) {
                self.truncated += 1;
            }
            self.lens.push(m.bytes);
            self.addrs.push(m.address);
        }
        Ok(self.lens.len())
    }

    /// Datagram `i` of the last [`RecvBatch::recv`].
    pub(crate) fn datagram(&self, i: usize) -> &[u8] {
        let len = self.lens[i].min(self.bufs[i].len());
        &self.bufs[i][..len]
    }

    /// How many datagrams the last [`RecvBatch::recv`] returned.
    pub(crate) fn len(&self) -> usize {
        self.lens.len()
    }

    /// Sends every datagram of the last receive back where it came from (the echo peer).
    /// Returns how many were sent.
    pub(crate) fn echo(&self, sock: &impl AsRawFd, out: &mut SendBatch) -> io::Result<usize> {
        let frames: Vec<[IoSlice<'_>; 1]> = (0..self.len())
            .map(|i| [IoSlice::new(self.datagram(i))])
            .collect();
        out.send(sock, &frames, &self.addrs)
    }
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
