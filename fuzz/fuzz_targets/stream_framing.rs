//! `stun::stream_frame_len` on arbitrary bytes delivered in arbitrary chunks, the way a TCP/TLS
//! driver sees a connection.
//!
//! Input: `[max_sel, max_byte, n, chunk_sizes[n], stream...]`. `max_sel % 4` picks the frame limit
//! (65 552, the largest STUN message; 4 + 65 536, the largest padded ChannelData; 1 500; or
//! `max_byte` itself, to exercise limits below a header). The stream is cut into chunks whose
//! sizes cycle through `chunk_sizes` (each byte + 1); with no sizes it arrives in one piece.
//!
//! Oracles, besides "no panic": the reassembly loop never yields an empty frame, a frame longer
//! than the limit or longer than what is buffered; the frames re-concatenate to a prefix of the
//! stream; a STUN frame has a 20-byte header with the magic cookie and a length that is a multiple
//! of four, and a ChannelData frame is padded to four bytes and parses; the result does not depend
//! on the chunking (the same frames, and an error either way or neither), and a verdict about a
//! buffer never changes when more bytes arrive (`Ok(Some(n))` stays, an error stays an error).
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::stun::{self, stream_frame_len, StreamError, HEADER_LEN, MAGIC_COOKIE};

/// What a reassembly loop made of a stream: its frames, what is left buffered, and the error that
/// closed the connection, if any.
struct Reassembled {
    frames: Vec<Vec<u8>>,
    rest: Vec<u8>,
    error: Option<StreamError>,
}

fn reassemble<'a>(chunks: impl Iterator<Item = &'a [u8]>, max: usize) -> Reassembled {
    let mut buf: Vec<u8> = Vec::new();
    let mut frames = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            match stream_frame_len(&buf, max) {
                Ok(None) => break,
                Ok(Some(n)) => {
                    assert!(n > 0, "empty frame: the loop would never end");
                    assert!(n <= max, "frame of {n} bytes over the limit {max}");
                    assert!(n <= buf.len(), "frame of {n} bytes, {} buffered", buf.len());
                    check_frame(&buf[..n]);
                    // More bytes never change a complete frame's length.
                    let mut longer = buf.clone();
                    longer.extend_from_slice(&[0xA5; 7]);
                    assert_eq!(stream_frame_len(&longer, max), Ok(Some(n)));
                    frames.push(buf.drain(..n).collect());
                }
                Err(e) => {
                    // Nor turn a broken stream into a good one.
                    let mut longer = buf.clone();
                    longer.extend_from_slice(&[0; 24]);
                    assert!(stream_frame_len(&longer, max).is_err(), "{e:?} recovered");
                    return Reassembled {
                        frames,
                        rest: buf,
                        error: Some(e),
                    };
                }
            }
        }
    }
    Reassembled {
        frames,
        rest: buf,
        error: None,
    }
}

fn check_frame(f: &[u8]) {
    match f[0] {
        0x00..=0x03 => {
            assert!(f.len() >= HEADER_LEN);
            let len = usize::from(u16::from_be_bytes([f[2], f[3]]));
            assert_eq!(f.len(), HEADER_LEN + len);
            assert_eq!(len % 4, 0);
            assert_eq!(u32::from_be_bytes([f[4], f[5], f[6], f[7]]), MAGIC_COOKIE);
        }
        0x40..=0x4F => {
            assert_eq!(f.len() % 4, 0, "ChannelData on a stream is padded");
            let (_, data) = stun::parse_channel_data(f).expect("ChannelData frame does not parse");
            assert!(f.len() - stun::CHANNEL_HEADER_LEN - data.len() < 4);
        }
        b => panic!("frame starting with {b:#04x}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let [max_sel, max_byte, n, rest @ ..] = data else {
        return;
    };
    let max = match max_sel % 4 {
        0 => HEADER_LEN + 0xFFFC,
        1 => stun::CHANNEL_HEADER_LEN + 0x1_0000,
        2 => 1500,
        _ => usize::from(*max_byte),
    };
    let n = usize::from(*n).min(rest.len());
    let (sizes, stream) = rest.split_at(n);

    let mut chunks: Vec<&[u8]> = Vec::new();
    let mut at = 0;
    let mut i = 0;
    while at < stream.len() {
        let size = sizes
            .get(i % sizes.len().max(1))
            .map_or(stream.len(), |s| usize::from(*s) + 1);
        let end = (at + size).min(stream.len());
        chunks.push(&stream[at..end]);
        at = end;
        i += 1;
    }

    let chunked = reassemble(chunks.iter().copied(), max);
    let consumed: Vec<u8> = chunked.frames.concat();
    assert!(
        stream.starts_with(&consumed),
        "frames are not a prefix of the stream"
    );
    assert!(stream[consumed.len()..].starts_with(&chunked.rest));
    if chunked.error.is_none() {
        assert_eq!(consumed.len() + chunked.rest.len(), stream.len());
    }

    // The same bytes in one piece: the same frames, and the same fate.
    let whole = reassemble(std::iter::once(stream), max);
    assert_eq!(
        chunked.frames, whole.frames,
        "framing depends on the chunking"
    );
    assert_eq!(chunked.error.is_some(), whole.error.is_some());
    if whole.error.is_none() {
        assert_eq!(chunked.rest, whole.rest);
    }
});
