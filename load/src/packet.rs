//! What every test packet carries, and how loss is counted from it.
//!
//! A packet's application data starts with a fixed [`Header`] (flow, sequence number, send time,
//! step of the run) and is padded with zeros to the requested size. The receiver of a flow keeps
//! a [`FlowRx`]: a sliding window of sequence numbers that tells new packets from duplicates, so
//! reordering never counts as loss and a duplicate never hides one.

use std::time::{SystemTime, UNIX_EPOCH};

/// The first bytes of every test packet: anything else arriving on a socket is not ours.
pub const MAGIC: [u8; 4] = *b"TPLD";
/// Bytes of the header; `--size` may not be smaller.
pub const HEADER_LEN: usize = 28;

/// The clock send times are read from: the system's wall clock (`CLOCK_REALTIME`), in
/// nanoseconds since the Unix epoch, because that is the clock of the kernel's receive timestamps
/// (`SO_TIMESTAMPNS`), which say when a datagram reached the generator's socket rather than when
/// the generator got round to reading it (see [`Header::hold`]). Every thread reads the same
/// clock. A step of the wall clock during a run (NTP stepping it) skews the samples around it;
/// a negative difference is recorded as the smallest latency, never as a wrap-around.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The header at the start of a test packet (big-endian on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The flow: the index of the allocation that sent the packet.
    pub flow: u32,
    /// Sequence number within the flow, from 0, without gaps on the sending side.
    pub seq: u64,
    /// Send time, [`now_ns`].
    pub sent_ns: u64,
    /// The step of the run (always 0 at a fixed rate; one per rate in find-max).
    pub step: u32,
}

impl Header {
    /// Writes the header into the first [`HEADER_LEN`] bytes of `out`; `false` if it is shorter.
    pub fn encode(&self, out: &mut [u8]) -> bool {
        let Some(out) = out.get_mut(..HEADER_LEN) else {
            return false;
        };
        out[0..4].copy_from_slice(&MAGIC);
        out[4..8].copy_from_slice(&self.flow.to_be_bytes());
        out[8..16].copy_from_slice(&self.seq.to_be_bytes());
        out[16..24].copy_from_slice(&self.sent_ns.to_be_bytes());
        out[24..28].copy_from_slice(&self.step.to_be_bytes());
        true
    }

    /// The echo peer's part of measuring the latency the relay adds: moves the send time of the
    /// test packet in `buf` forward by `held_ns`, the time the echo peer held it (from the
    /// kernel's arrival time to just before sending it back). The sender then subtracts a send
    /// time that excludes the echo peer, so a round trip counts only the two passes through the
    /// relay. Returns `false` (and leaves `buf` alone) if `buf` is not a test packet.
    pub fn hold(buf: &mut [u8], held_ns: u64) -> bool {
        let Some(h) = Self::decode(buf) else {
            return false;
        };
        buf[16..24].copy_from_slice(&h.sent_ns.saturating_add(held_ns).to_be_bytes());
        true
    }

    /// Reads the header at the start of `buf`; `None` if it is too short or not a test packet.
    pub fn decode(buf: &[u8]) -> Option<Self> {
        let h = buf.get(..HEADER_LEN)?;
        if h[0..4] != MAGIC {
            return None;
        }
        let u32_at = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let u64_at = |i: usize| (u64::from(u32_at(i)) << 32) | u64::from(u32_at(i + 4));
        Some(Self {
            flow: u32_at(4),
            seq: u64_at(8),
            sent_ns: u64_at(16),
            step: u32_at(24),
        })
    }
}

/// How far behind the newest sequence number of a flow a packet may arrive and still be told
/// apart from a duplicate. Later than that it counts as lost (no relay reorders this much).
pub const WINDOW: u64 = 4096;
const WORDS: usize = (WINDOW / 64) as usize;

/// What a received sequence number turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Seen for the first time: counts as received.
    New,
    /// Already seen: not counted again.
    Duplicate,
    /// Older than the window: cannot be told from a duplicate, so it is not counted (lost).
    TooLate,
}

/// Receive state of one flow: a bitmap of the last [`WINDOW`] sequence numbers.
#[derive(Debug, Clone)]
pub struct FlowRx {
    /// One past the highest sequence number seen (0: nothing yet).
    top: u64,
    bits: Box<[u64; WORDS]>,
    /// Packets counted as received (unique).
    pub received: u64,
    /// Copies of packets already received.
    pub duplicates: u64,
    /// Packets that arrived more than [`WINDOW`] behind the newest one.
    pub too_late: u64,
}

impl Default for FlowRx {
    fn default() -> Self {
        Self {
            top: 0,
            bits: Box::new([0; WORDS]),
            received: 0,
            duplicates: 0,
            too_late: 0,
        }
    }
}

impl FlowRx {
    /// Records sequence number `seq` and says whether it is new.
    pub fn record(&mut self, seq: u64) -> Arrival {
        if seq >= self.top {
            // Slide the window forward: the slots of the numbers in top..=seq are reused, clear
            // them (all of them when the jump is a whole window or more).
            let advance = seq + 1 - self.top;
            if advance >= WINDOW {
                self.bits.fill(0);
            } else {
                for s in self.top..=seq {
                    self.clear(s);
                }
            }
            self.top = seq + 1;
        } else if self.top - seq > WINDOW {
            self.too_late += 1;
            return Arrival::TooLate;
        }
        let (w, b) = Self::slot(seq);
        if self.bits[w] & b != 0 {
            self.duplicates += 1;
            return Arrival::Duplicate;
        }
        self.bits[w] |= b;
        self.received += 1;
        Arrival::New
    }

    fn slot(seq: u64) -> (usize, u64) {
        let i = seq % WINDOW;
        ((i / 64) as usize, 1u64 << (i % 64))
    }

    fn clear(&mut self, seq: u64) {
        let (w, b) = Self::slot(seq);
        self.bits[w] &= !b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = Header {
            flow: 0xDEAD_BEEF,
            seq: 0x0123_4567_89AB_CDEF,
            sent_ns: u64::MAX - 7,
            step: 3,
        };
        let mut buf = [0xFFu8; 200];
        assert!(h.encode(&mut buf));
        assert_eq!(&buf[..4], b"TPLD");
        assert_eq!(Header::decode(&buf), Some(h));
        // Padding after the header does not matter; a short or foreign buffer is refused.
        assert_eq!(Header::decode(&buf[..HEADER_LEN]), Some(h));
        assert_eq!(Header::decode(&buf[..HEADER_LEN - 1]), None);
        assert!(!h.encode(&mut [0u8; HEADER_LEN - 1]));
        buf[0] = b'X';
        assert_eq!(Header::decode(&buf), None);
    }

    #[test]
    fn the_echo_moves_the_send_time_by_what_it_held_and_leaves_the_rest() {
        let h = Header {
            flow: 7,
            seq: 9,
            sent_ns: 1_000,
            step: 2,
        };
        let mut buf = [0xAAu8; 64];
        assert!(h.encode(&mut buf));
        assert!(Header::hold(&mut buf, 250));
        let moved = Header::decode(&buf);
        assert_eq!(
            moved,
            Some(Header {
                sent_ns: 1_250,
                ..h
            })
        );
        assert!(buf[HEADER_LEN..].iter().all(|&b| b == 0xAA));
        // Saturates rather than wrapping; a datagram that is not a test packet is left as it is.
        let mut late = [0u8; HEADER_LEN];
        assert!(Header {
            sent_ns: u64::MAX - 1,
            ..h
        }
        .encode(&mut late));
        assert!(Header::hold(&mut late, 10));
        assert_eq!(Header::decode(&late).map(|h| h.sent_ns), Some(u64::MAX));
        let mut foreign = *b"not a test packet, just some bytes";
        assert!(!Header::hold(&mut foreign, 10));
        assert_eq!(&foreign, b"not a test packet, just some bytes");
    }

    #[test]
    fn clock_is_the_wall_clock() {
        // The kernel's receive timestamps are wall-clock times: a send time must be comparable.
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let a = now_ns();
        assert!(a.abs_diff(wall) < 60_000_000_000, "{a} vs {wall}");
    }

    #[test]
    fn reordering_is_not_loss_and_duplicates_are_not_received() {
        let mut rx = FlowRx::default();
        for seq in [0, 2, 1, 5, 3, 4] {
            assert_eq!(rx.record(seq), Arrival::New, "seq {seq}");
        }
        assert_eq!(rx.record(2), Arrival::Duplicate);
        assert_eq!(rx.record(5), Arrival::Duplicate);
        // 6 and 8 arrive, 7 never does: sent 9, received 8 unique → 1 lost.
        assert_eq!(rx.record(8), Arrival::New);
        assert_eq!(rx.record(6), Arrival::New);
        assert_eq!(rx.record(8), Arrival::Duplicate);
        assert_eq!((rx.received, rx.duplicates, rx.too_late), (8, 3, 0));
        let sent = 9;
        assert_eq!(sent - rx.received, 1);
    }

    #[test]
    fn window_slides_and_late_packets_count_as_lost() {
        let mut rx = FlowRx::default();
        assert_eq!(rx.record(0), Arrival::New);
        // A jump of more than a window clears every slot: 0's slot is reused by WINDOW.
        assert_eq!(rx.record(WINDOW), Arrival::New);
        assert_eq!(rx.record(WINDOW), Arrival::Duplicate);
        // Exactly WINDOW behind the newest is still inside (top = WINDOW + 1).
        assert_eq!(rx.record(1), Arrival::New);
        assert_eq!(rx.record(0), Arrival::TooLate);
        // A long run in order, then a straggler from far behind and one from just behind.
        for seq in WINDOW + 1..3 * WINDOW {
            assert_eq!(rx.record(seq), Arrival::New);
        }
        assert_eq!(rx.record(WINDOW + 5), Arrival::TooLate);
        assert_eq!(rx.record(3 * WINDOW - 10), Arrival::Duplicate);
        assert_eq!(rx.received, 3 + (2 * WINDOW - 1));
        assert_eq!(rx.too_late, 2);
        // Slots reused after a slide start empty: the number WINDOW behind a new top is new.
        let mut rx = FlowRx::default();
        for seq in 0..10 {
            rx.record(seq);
        }
        assert_eq!(rx.record(WINDOW + 3), Arrival::New);
        assert_eq!(
            rx.record(4),
            Arrival::Duplicate,
            "4 is still inside the window"
        );
        assert_eq!(
            rx.record(3),
            Arrival::TooLate,
            "3's slot now belongs to WINDOW + 3"
        );
    }
}
