//! TURN over TCP and TLS ([RFC 8656 §3.1](https://www.rfc-editor.org/rfc/rfc8656#section-3.1)).
//!
//! Every shard has its own `SO_REUSEPORT` listener on each stream address, so connections are
//! spread over shards by the kernel and a connection lives on the shard that accepted it. Its
//! task detects TLS by the first byte (a TLS handshake record starts with 0x16, which is neither
//! STUN nor ChannelData), cuts the byte stream into frames with
//! [`relay_proto::stun::stream_frame_len`], and hands them to the shard over a bounded queue. The
//! shard answers through the connection's own bounded egress queue; when a client does not read
//! and that queue is full, frames are dropped and counted (`stream_queue_full`), never buffered
//! without bound. When the connection ends, its allocation ends with it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use relay_proto::stun::{stream_frame_len, StreamError};
use relay_proto::{FiveTuple, Transport};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::shard::ShardRef;
use crate::tls::TlsHandle;
use crate::{DriverDrop, StreamClose, TLS_HANDSHAKE_BYTE};

/// Bytes read from a connection at a time. Larger than any media frame, so one read usually
/// yields whole frames; the buffer grows past it only for a frame that is itself larger.
const READ_CHUNK: usize = 16 * 1024;
/// Pause after a failed accept (out of file descriptors): keeps a full table from spinning the
/// shard while existing connections go on.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Limits of stream connections, from the `[relay]` configuration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamLimits {
    pub(crate) per_ip: u32,
    pub(crate) handshake_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) max_frame: usize,
    pub(crate) queue: usize,
    pub(crate) write_timeout: Duration,
}

/// What every shard's stream side shares: limits, TLS, and the per-source connection counts.
#[derive(Debug)]
pub(crate) struct StreamShared {
    pub(crate) limits: StreamLimits,
    pub(crate) tls: Option<TlsHandle>,
    per_ip: Mutex<HashMap<IpAddr, u32>>,
}

impl StreamShared {
    pub(crate) fn new(limits: StreamLimits, tls: Option<TlsHandle>) -> Arc<Self> {
        Arc::new(Self {
            limits,
            tls,
            per_ip: Mutex::new(HashMap::new()),
        })
    }

    /// Counts a connection from `ip` unless its source already has `per_ip`. Shared by shards
    /// (a source's connections hash to different shards) and touched only at accept and close.
    /// A source is an IPv4 address or an IPv6 /64 ([`relay_proto::policy::source_of`]).
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let ip = relay_proto::policy::source_of(ip);
        let mut map = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= self.limits.per_ip {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            shared: Arc::clone(self),
            ip,
        })
    }
}

/// One connection's place in the per-source count, given back when dropped.
struct IpSlot {
    shared: Arc<StreamShared>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut map = self.shared.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Bytes queued for one TCP/TLS client at most (besides the frame being written). The frame
/// count (`stream-queue`) alone would let a client that stops reading pin 256 × 64 KiB (a
/// peer's largest datagrams) until the write timeout; 512 KiB is a second of a 4 Mbit/s video
/// call, far more than a reading client ever has queued.
pub(crate) const EGRESS_BYTES: usize = 512 * 1024;

/// The shard's end of one connection's egress queue.
#[derive(Debug)]
pub(crate) struct Egress {
    tx: mpsc::Sender<Vec<u8>>,
    /// Bytes in the queue (the shard adds, the connection's writer takes away; one thread).
    queued: Rc<std::cell::Cell<usize>>,
}

impl Egress {
    /// Queues a copy of `frame` (the writer owns what it writes; the stream path is not the
    /// hot one), or says why it was dropped: the queue is full, by frames or by
    /// [`EGRESS_BYTES`], or the connection is gone.
    pub(crate) fn push(&self, frame: &[u8]) -> Result<(), DriverDrop> {
        let queued = self.queued.get();
        if queued + frame.len() > EGRESS_BYTES {
            return Err(DriverDrop::StreamQueueFull);
        }
        match self.tx.try_send(frame.to_vec()) {
            Ok(()) => {
                self.queued.set(queued + frame.len());
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(DriverDrop::StreamQueueFull),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(DriverDrop::SendError),
        }
    }
}

/// What connection tasks send to their shard.
#[derive(Debug)]
pub(crate) enum Ingress {
    /// One complete STUN message or ChannelData.
    Frame { five: FiveTuple, frame: Vec<u8> },
    /// The connection is gone: end its allocation.
    Closed { five: FiveTuple },
}

pub(crate) async fn accept_task(
    shard: ShardRef,
    listener: TcpListener,
    shared: Arc<StreamShared>,
    ingress: mpsc::Sender<Ingress>,
) {
    let Ok(local) = listener.local_addr() else {
        return;
    };
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                shard.borrow_mut().stats.closed[StreamClose::AcceptError.index()] += 1;
                warn!(error = %e, "accepting a stream connection failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Some(slot) = shared.admit(peer.ip()) else {
            shard.borrow_mut().stats.closed[StreamClose::PerIpLimit.index()] += 1;
            drop(sock);
            continue;
        };
        let panics = Rc::clone(&shard.borrow().panics);
        crate::shard::spawn_guarded(
            &panics,
            "connection",
            connection(
                Rc::clone(&shard),
                sock,
                local,
                peer,
                Arc::clone(&shared),
                ingress.clone(),
                slot,
            ),
        );
    }
}

async fn connection(
    shard: ShardRef,
    sock: TcpStream,
    local: SocketAddr,
    peer: SocketAddr,
    shared: Arc<StreamShared>,
    ingress: mpsc::Sender<Ingress>,
    _slot: IpSlot,
) {
    let _ = sock.set_nodelay(true);
    let deadline = Instant::now() + shared.limits.handshake_timeout;
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout_at(deadline, sock.peek(&mut first)).await;
    let reason = match peeked {
        Err(_) => StreamClose::HandshakeTimeout,
        Ok(Err(_)) | Ok(Ok(0)) => StreamClose::ClientClosed,
        Ok(Ok(_)) if first[0] == TLS_HANDSHAKE_BYTE => match &shared.tls {
            None => StreamClose::TlsUnavailable,
            Some(tls) => {
                let acceptor = tls.acceptor();
                match tokio::time::timeout_at(deadline, acceptor.accept(sock)).await {
                    Err(_) => StreamClose::HandshakeTimeout,
                    Ok(Err(e)) => {
                        debug!(error = %e, "TLS handshake failed");
                        StreamClose::TlsHandshakeFailed
                    }
                    Ok(Ok(tls)) => {
                        let five = FiveTuple {
                            client: peer,
                            server: local,
                            transport: Transport::Tls,
                        };
                        serve(&shard, tls, five, &shared, &ingress, deadline).await
                    }
                }
            }
        },
        Ok(Ok(_)) => {
            let five = FiveTuple {
                client: peer,
                server: local,
                transport: Transport::Tcp,
            };
            serve(&shard, sock, five, &shared, &ingress, deadline).await
        }
    };
    shard.borrow_mut().stats.closed[reason.index()] += 1;
}

/// Relays one established connection until it ends; returns why it ended.
async fn serve<S>(
    shard: &ShardRef,
    stream: S,
    five: FiveTuple,
    shared: &StreamShared,
    ingress: &mpsc::Sender<Ingress>,
    handshake_deadline: Instant,
) -> StreamClose
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (egress_tx, mut egress_rx) = mpsc::channel::<Vec<u8>>(shared.limits.queue);
    let queued = Rc::new(std::cell::Cell::new(0usize));
    {
        let mut sh = shard.borrow_mut();
        sh.streams.insert(
            five,
            Egress {
                tx: egress_tx,
                queued: Rc::clone(&queued),
            },
        );
        sh.stats.streams[five.transport.index()] += 1;
    }
    let coalesce = five.transport == Transport::Tcp;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let writer = async {
        while let Some(frame) = egress_rx.recv().await {
            queued.set(queued.get().saturating_sub(frame.len()));
            let mut batch = frame;
            // On TCP, coalesce what is already queued into one write. On TLS every frame gets its
            // own record, as coturn sends them: some clients (coturn's own) read one message
            // per record and would lose the rest.
            while coalesce && batch.len() < READ_CHUNK {
                match egress_rx.try_recv() {
                    Ok(more) => {
                        queued.set(queued.get().saturating_sub(more.len()));
                        batch.extend_from_slice(&more);
                    }
                    Err(_) => break,
                }
            }
            // TLS keeps records in its own buffer until flushed: flush every batch. A client
            // that reads nothing (its window and our send buffer full) would hold its queue
            // forever: past the write timeout it is closed.
            let write = async {
                wr.write_all(&batch).await?;
                wr.flush().await
            };
            match tokio::time::timeout(shared.limits.write_timeout, write).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return closed_by(&e),
                Err(_) => return StreamClose::SlowReader,
            }
        }
        // The shard dropped our queue: it is shutting down.
        let _ = wr.shutdown().await;
        StreamClose::Shutdown
    };
    let reader = read_frames(&mut rd, five, shared.limits, ingress, handshake_deadline);
    tokio::pin!(writer);
    let (reason, writing) = tokio::select! {
        r = reader => (r, true),
        r = &mut writer => (r, false),
    };
    // Ends the allocation; the shard also forgets our egress queue then. If the shard is gone
    // (shutdown), there is nobody left to tell.
    let _ = ingress.send(Ingress::Closed { five }).await;
    if writing && reason == StreamClose::ClientClosed {
        // The client may only have stopped sending (a half-close after its last request):
        // the answers to its last frames still go out. The shard sends them before it drops
        // our queue on `Closed`, which ends the writer; a client that is gone makes the next
        // write fail, and one that does not read is bounded by the write timeout.
        let _ = writer.await;
    }
    shard.borrow_mut().stats.streams[five.transport.index()] -= 1;
    reason
}

/// A read error that only means the client went away (most TLS clients close without
/// close_notify, which rustls reports as an unexpected EOF) is a close, not an I/O failure.
fn closed_by(e: &std::io::Error) -> StreamClose {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    match e.kind() {
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe => {
            StreamClose::ClientClosed
        }
        _ => StreamClose::IoError,
    }
}

async fn read_frames<R>(
    rd: &mut R,
    five: FiveTuple,
    limits: StreamLimits,
    ingress: &mpsc::Sender<Ingress>,
    handshake_deadline: Instant,
) -> StreamClose
where
    R: AsyncRead + Unpin,
{
    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    let mut got_frame = false;
    loop {
        // A client's first frame is a STUN request: ChannelData needs a channel, bound by an
        // earlier request. Checking this catches HTTP and other probes (0x40–0x4F covers "GET",
        // "HEAD", "OPTIONS") at once instead of at a timeout.
        if !got_frame && buf.first().is_some_and(|b| *b > 0x03) {
            return StreamClose::FramingError;
        }
        // Cut every complete frame out of what we have.
        let mut start = 0;
        loop {
            match stream_frame_len(&buf[start..], limits.max_frame) {
                Ok(Some(len)) => {
                    let frame = buf[start..start + len].to_vec();
                    start += len;
                    got_frame = true;
                    if ingress.send(Ingress::Frame { five, frame }).await.is_err() {
                        return StreamClose::Shutdown;
                    }
                }
                Ok(None) => break,
                Err(StreamError::TooLarge(_)) => return StreamClose::FrameTooLarge,
                Err(_) => return StreamClose::FramingError,
            }
        }
        buf.drain(..start);
        // Until the first frame, the handshake deadline applies; then the idle timeout.
        let deadline = if got_frame {
            Instant::now() + limits.idle_timeout
        } else {
            handshake_deadline
        };
        let old = buf.len();
        buf.resize(old + READ_CHUNK, 0);
        let n = match tokio::time::timeout_at(deadline, rd.read(&mut buf[old..])).await {
            Err(_) if got_frame => return StreamClose::IdleTimeout,
            Err(_) => return StreamClose::HandshakeTimeout,
            Ok(Err(e)) => return closed_by(&e),
            Ok(Ok(0)) => return StreamClose::ClientClosed,
            Ok(Ok(n)) => n,
        };
        buf.truncate(old + n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(per_ip: u32) -> Arc<StreamShared> {
        StreamShared::new(
            StreamLimits {
                per_ip,
                handshake_timeout: Duration::from_secs(1),
                idle_timeout: Duration::from_secs(1),
                max_frame: 1024,
                queue: 1,
                write_timeout: Duration::from_secs(1),
            },
            None,
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse()
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    }

    #[test]
    fn a_connections_queue_is_bounded_in_bytes_as_well_as_frames() {
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(256);
        let egress = Egress {
            tx,
            queued: Rc::new(std::cell::Cell::new(0)),
        };
        // Peer datagrams of 64 KiB: far fewer than 256 frames fill the byte budget.
        let big = vec![0u8; 64 * 1024];
        let fit = EGRESS_BYTES / big.len();
        for i in 0..fit {
            assert_eq!(egress.push(&big), Ok(()), "frame {i}");
        }
        assert_eq!(egress.push(&big), Err(DriverDrop::StreamQueueFull));
        // A small frame still fits in what is left (none here) only once the writer takes one.
        assert_eq!(egress.push(&[0u8; 100]), Err(DriverDrop::StreamQueueFull));
        let taken = rx.try_recv().unwrap_or_default();
        egress.queued.set(egress.queued.get() - taken.len());
        assert_eq!(egress.push(&[0u8; 100]), Ok(()));
        // And by frames: small frames stop at the channel's capacity.
        let (tx, _rx) = mpsc::channel::<Vec<u8>>(2);
        let egress = Egress {
            tx,
            queued: Rc::new(std::cell::Cell::new(0)),
        };
        assert_eq!(egress.push(b"a"), Ok(()));
        assert_eq!(egress.push(b"b"), Ok(()));
        assert_eq!(egress.push(b"c"), Err(DriverDrop::StreamQueueFull));
        // A connection that is gone is a send error, not a full queue.
        drop(_rx);
        let (tx, rx) = mpsc::channel::<Vec<u8>>(2);
        drop(rx);
        let gone = Egress {
            tx,
            queued: Rc::new(std::cell::Cell::new(0)),
        };
        assert_eq!(gone.push(b"x"), Err(DriverDrop::SendError));
    }

    #[test]
    fn the_per_source_cap_counts_an_ipv6_64_as_one_source() {
        let s = shared(2);
        // Two addresses of one /64 take its two places; a third address there is refused.
        let a = s.admit(ip("2001:db8:1:2::1"));
        let b = s.admit(ip("2001:db8:1:2:ffff::9"));
        assert!(a.is_some() && b.is_some());
        assert!(s.admit(ip("2001:db8:1:2::77")).is_none());
        // Another /64 and IPv4 sources are counted apart; IPv4-mapped is its IPv4 address.
        assert!(s.admit(ip("2001:db8:1:3::1")).is_some());
        let v4 = s.admit(ip("192.0.2.1"));
        let mapped = s.admit(ip("::ffff:192.0.2.1"));
        assert!(v4.is_some() && mapped.is_some());
        assert!(s.admit(ip("192.0.2.1")).is_none());
        // A place given back is free again.
        drop(a);
        assert!(s.admit(ip("2001:db8:1:2::77")).is_some());
    }
}
