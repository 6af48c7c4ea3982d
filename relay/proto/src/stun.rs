//! STUN message codec ([RFC 8489 §5–§14](https://www.rfc-editor.org/rfc/rfc8489#section-5)) and
//! TURN ChannelData framing ([RFC 8656 §12.4](https://www.rfc-editor.org/rfc/rfc8656#section-12.4)).
//!
//! Decoding borrows from the datagram and never allocates: [`Message::parse`] checks the framing,
//! [`Attrs::decode`] walks the attributes once into fixed-size fields. Encoding appends to a
//! caller-owned `Vec<u8>` so the core reuses one buffer for every response.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, Mac};
use sha1::Sha1;

/// RFC 8489 §5: the fixed value in bytes 4..8 of every STUN message.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Size of the STUN header.
pub const HEADER_LEN: usize = 20;
/// XOR constant of FINGERPRINT (RFC 8489 §14.7): "STUN" in ASCII.
const FINGERPRINT_XOR: u32 = 0x5354_554E;
/// Length of a MESSAGE-INTEGRITY value (HMAC-SHA1).
pub const INTEGRITY_LEN: usize = 20;

/// A decoded attribute walk stops with 400 past this many attributes: a real TURN request carries
/// fewer than 15, and a cap bounds the work an attacker can ask for with thousands of tiny ones.
pub const MAX_ATTRIBUTES: usize = 64;
/// At most this many distinct unknown comprehension-required attributes are listed in a 420.
pub const MAX_UNKNOWN: usize = 8;
/// RFC 8489 §14.3: USERNAME is at most 513 bytes (we keep the historic 512 of RFC 5389 + 1).
pub const MAX_USERNAME: usize = 513;
/// RFC 8489 §14.9/§14.10/§14.14: REALM, NONCE and SOFTWARE are fewer than 128 characters, up to
/// 763 bytes of UTF-8.
pub const MAX_TEXT: usize = 763;

/// STUN methods used by TURN ([RFC 8656 §17](https://www.rfc-editor.org/rfc/rfc8656#section-17)).
pub mod method {
    /// Binding (RFC 8489).
    pub const BINDING: u16 = 0x001;
    /// Allocate.
    pub const ALLOCATE: u16 = 0x003;
    /// Refresh.
    pub const REFRESH: u16 = 0x004;
    /// Send (indication only).
    pub const SEND: u16 = 0x006;
    /// Data (indication only).
    pub const DATA: u16 = 0x007;
    /// CreatePermission.
    pub const CREATE_PERMISSION: u16 = 0x008;
    /// ChannelBind.
    pub const CHANNEL_BIND: u16 = 0x009;
}

/// Attribute types (RFC 8489 §18.3, RFC 8656 §18).
pub mod attr {
    /// MAPPED-ADDRESS (ignored on input).
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    /// USERNAME.
    pub const USERNAME: u16 = 0x0006;
    /// MESSAGE-INTEGRITY (HMAC-SHA1).
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    /// ERROR-CODE.
    pub const ERROR_CODE: u16 = 0x0009;
    /// UNKNOWN-ATTRIBUTES.
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    /// CHANNEL-NUMBER.
    pub const CHANNEL_NUMBER: u16 = 0x000C;
    /// LIFETIME.
    pub const LIFETIME: u16 = 0x000D;
    /// XOR-PEER-ADDRESS.
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    /// DATA.
    pub const DATA: u16 = 0x0013;
    /// REALM.
    pub const REALM: u16 = 0x0014;
    /// NONCE.
    pub const NONCE: u16 = 0x0015;
    /// XOR-RELAYED-ADDRESS.
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    /// REQUESTED-ADDRESS-FAMILY.
    pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
    /// EVEN-PORT (an even port is granted; the R bit's reservation is not offered: 508).
    pub const EVEN_PORT: u16 = 0x0018;
    /// REQUESTED-TRANSPORT.
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
    /// DONT-FRAGMENT (not supported: answered with 420).
    pub const DONT_FRAGMENT: u16 = 0x001A;
    /// XOR-MAPPED-ADDRESS.
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    /// RESERVATION-TOKEN (not supported: answered with 420).
    pub const RESERVATION_TOKEN: u16 = 0x0022;
    /// ADDITIONAL-ADDRESS-FAMILY (asks for a dual allocation).
    pub const ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
    /// ADDRESS-ERROR-CODE (why one family of a dual allocation is missing).
    pub const ADDRESS_ERROR_CODE: u16 = 0x8001;
    /// SOFTWARE.
    pub const SOFTWARE: u16 = 0x8022;
    /// FINGERPRINT.
    pub const FINGERPRINT: u16 = 0x8028;
}

/// STUN error codes Turnpike sends ([RFC 8489 §14.8](https://www.rfc-editor.org/rfc/rfc8489#section-14.8),
/// [RFC 8656 §18.8](https://www.rfc-editor.org/rfc/rfc8656#section-18.8)).
pub mod code {
    /// Bad Request.
    pub const BAD_REQUEST: u16 = 400;
    /// Unauthenticated.
    pub const UNAUTHENTICATED: u16 = 401;
    /// Forbidden (peer address denied by policy).
    pub const FORBIDDEN: u16 = 403;
    /// Unknown (comprehension-required) Attribute.
    pub const UNKNOWN_ATTRIBUTE: u16 = 420;
    /// Allocation Mismatch.
    pub const ALLOCATION_MISMATCH: u16 = 437;
    /// Stale Nonce.
    pub const STALE_NONCE: u16 = 438;
    /// Address Family not Supported.
    pub const ADDRESS_FAMILY_NOT_SUPPORTED: u16 = 440;
    /// Wrong Credentials.
    pub const WRONG_CREDENTIALS: u16 = 441;
    /// Unsupported Transport Protocol.
    pub const UNSUPPORTED_TRANSPORT: u16 = 442;
    /// Peer Address Family Mismatch.
    pub const PEER_ADDRESS_FAMILY_MISMATCH: u16 = 443;
    /// Allocation Quota Reached.
    pub const ALLOCATION_QUOTA_REACHED: u16 = 486;
    /// Insufficient Capacity.
    pub const INSUFFICIENT_CAPACITY: u16 = 508;

    /// Reason phrase sent with a code: short, fixed, never built from input.
    pub fn reason(code: u16) -> &'static str {
        match code {
            BAD_REQUEST => "Bad Request",
            UNAUTHENTICATED => "Unauthenticated",
            FORBIDDEN => "Forbidden",
            UNKNOWN_ATTRIBUTE => "Unknown Attribute",
            ALLOCATION_MISMATCH => "Allocation Mismatch",
            STALE_NONCE => "Stale Nonce",
            ADDRESS_FAMILY_NOT_SUPPORTED => "Address Family not Supported",
            WRONG_CREDENTIALS => "Wrong Credentials",
            UNSUPPORTED_TRANSPORT => "Unsupported Transport Protocol",
            PEER_ADDRESS_FAMILY_MISMATCH => "Peer Address Family Mismatch",
            ALLOCATION_QUOTA_REACHED => "Allocation Quota Reached",
            INSUFFICIENT_CAPACITY => "Insufficient Capacity",
            _ => "Error",
        }
    }
}

/// The class bits of a STUN message type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// Request: expects a response.
    Request,
    /// Indication: no response.
    Indication,
    /// Success response.
    Success,
    /// Error response.
    Error,
}

/// Packs method and class into the 14-bit STUN message type (RFC 8489 §5, figure 3).
pub fn message_type(method: u16, class: Class) -> u16 {
    let c: u16 = match class {
        Class::Request => 0b00,
        Class::Indication => 0b01,
        Class::Success => 0b10,
        Class::Error => 0b11,
    };
    let m = method & 0x0FFF;
    (m & 0x000F) | ((m & 0x0070) << 1) | ((m & 0x0F80) << 2) | ((c & 1) << 4) | ((c & 2) << 7)
}

fn split_type(t: u16) -> (u16, Class) {
    let method = (t & 0x000F) | ((t >> 1) & 0x0070) | ((t >> 2) & 0x0F80);
    let class = match ((t >> 4) & 1) | ((t >> 7) & 2) {
        0 => Class::Request,
        1 => Class::Indication,
        2 => Class::Success,
        _ => Class::Error,
    };
    (method, class)
}

/// Why a datagram is not a STUN message at all. Such input is dropped and counted, never answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Fewer than 20 bytes.
    #[error("shorter than a STUN header")]
    Short,
    /// The two most significant bits are not zero.
    #[error("not a STUN message (top bits)")]
    NotStun,
    /// Bytes 4..8 are not the magic cookie (RFC 3489 clients are not served).
    #[error("wrong magic cookie")]
    BadCookie,
    /// The header length is not a multiple of 4, or disagrees with the datagram size.
    #[error("length field does not match the datagram")]
    BadLength,
    /// An attribute (or its padding) runs past the end of the message.
    #[error("attribute runs past the end")]
    Truncated,
    /// FINGERPRINT present but wrong, or not the last attribute.
    #[error("bad FINGERPRINT")]
    BadFingerprint,
}

/// A STUN message whose framing, attribute boundaries and FINGERPRINT have been checked.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    raw: &'a [u8],
    method: u16,
    class: Class,
    has_fingerprint: bool,
}

impl<'a> Message<'a> {
    /// Checks the framing of `buf`, which must hold exactly one message (as a UDP datagram does).
    pub fn parse(buf: &'a [u8]) -> Result<Self, FrameError> {
        if buf.len() < HEADER_LEN {
            return Err(FrameError::Short);
        }
        if buf[0] & 0xC0 != 0 {
            return Err(FrameError::NotStun);
        }
        if u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) != MAGIC_COOKIE {
            return Err(FrameError::BadCookie);
        }
        let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
        if len % 4 != 0 || HEADER_LEN + len != buf.len() {
            return Err(FrameError::BadLength);
        }
        let (method, class) = split_type(u16::from_be_bytes([buf[0], buf[1]]));
        // Walk the attribute boundaries once so later passes can index without checks failing.
        let mut off = HEADER_LEN;
        let mut has_fingerprint = false;
        while off < buf.len() {
            if has_fingerprint {
                // RFC 8489 §14.7: FINGERPRINT must be the last attribute.
                return Err(FrameError::BadFingerprint);
            }
            if off + 4 > buf.len() {
                return Err(FrameError::Truncated);
            }
            let typ = u16::from_be_bytes([buf[off], buf[off + 1]]);
            let alen = usize::from(u16::from_be_bytes([buf[off + 2], buf[off + 3]]));
            let padded = (alen + 3) & !3;
            if off + 4 + padded > buf.len() {
                return Err(FrameError::Truncated);
            }
            if typ == attr::FINGERPRINT {
                if alen != 4 {
                    return Err(FrameError::BadFingerprint);
                }
                let got =
                    u32::from_be_bytes([buf[off + 4], buf[off + 5], buf[off + 6], buf[off + 7]]);
                if crc32fast::hash(&buf[..off]) ^ FINGERPRINT_XOR != got {
                    return Err(FrameError::BadFingerprint);
                }
                has_fingerprint = true;
            }
            off += 4 + padded;
        }
        Ok(Self {
            raw: buf,
            method,
            class,
            has_fingerprint,
        })
    }

    /// The method (see [`method`]).
    pub fn method(&self) -> u16 {
        self.method
    }
    /// The class.
    pub fn class(&self) -> Class {
        self.class
    }
    /// The 96-bit transaction id.
    pub fn transaction_id(&self) -> [u8; 12] {
        let mut t = [0; 12];
        t.copy_from_slice(&self.raw[8..20]);
        t
    }
    /// Whether the message ended with a valid FINGERPRINT (responses then carry one too).
    pub fn has_fingerprint(&self) -> bool {
        self.has_fingerprint
    }
    /// The whole message.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.raw
    }
    /// Iterates `(type, value)` over all attributes, in order.
    pub fn attributes(&self) -> AttrIter<'a> {
        AttrIter {
            buf: self.raw,
            off: HEADER_LEN,
        }
    }
}

/// Iterator over `(type, value, offset)` of a checked message. Offsets point at the attribute header.
#[derive(Debug, Clone)]
pub struct AttrIter<'a> {
    buf: &'a [u8],
    off: usize,
}

impl<'a> Iterator for AttrIter<'a> {
    type Item = (u16, &'a [u8], usize);
    fn next(&mut self) -> Option<Self::Item> {
        // Boundaries were validated by `Message::parse`; `get` keeps this total anyway.
        let hdr = self.buf.get(self.off..self.off + 4)?;
        let typ = u16::from_be_bytes([hdr[0], hdr[1]]);
        let len = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
        let start = self.off + 4;
        let value = self.buf.get(start..start + len)?;
        let at = self.off;
        self.off = start + ((len + 3) & !3);
        Some((typ, value, at))
    }
}

/// Why a well-framed request cannot be processed: answered with 400 or 420.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttrError {
    /// A malformed or duplicated attribute (400).
    #[error("bad attribute {0:#06x}")]
    Bad(u16),
    /// More attributes than [`MAX_ATTRIBUTES`] (400).
    #[error("too many attributes")]
    TooMany,
    /// Unknown comprehension-required attributes (420 with UNKNOWN-ATTRIBUTES).
    #[error("unknown comprehension-required attributes")]
    Unknown(UnknownList),
}

/// A short list of attribute types for UNKNOWN-ATTRIBUTES.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UnknownList {
    types: [u16; MAX_UNKNOWN],
    len: usize,
}

impl UnknownList {
    fn push(&mut self, t: u16) {
        if self.len < MAX_UNKNOWN && !self.as_slice().contains(&t) {
            self.types[self.len] = t;
            self.len += 1;
        }
    }
    /// The listed types.
    pub fn as_slice(&self) -> &[u16] {
        &self.types[..self.len]
    }
}

/// MESSAGE-INTEGRITY as found: where it starts, and its value.
#[derive(Debug, Clone, Copy)]
pub struct Integrity<'a> {
    offset: usize,
    value: &'a [u8],
}

/// The attributes Turnpike understands, decoded in one pass.
///
/// Attributes after MESSAGE-INTEGRITY (except FINGERPRINT) are ignored, as RFC 8489 §14.5 requires:
/// they are not covered by the integrity check and so must not change what a request does.
#[derive(Debug, Clone, Default)]
pub struct Attrs<'a> {
    /// USERNAME.
    pub username: Option<&'a [u8]>,
    /// REALM.
    pub realm: Option<&'a [u8]>,
    /// NONCE.
    pub nonce: Option<&'a [u8]>,
    /// SOFTWARE.
    pub software: Option<&'a [u8]>,
    /// MESSAGE-INTEGRITY.
    pub integrity: Option<Integrity<'a>>,
    /// LIFETIME in seconds.
    pub lifetime: Option<u32>,
    /// CHANNEL-NUMBER.
    pub channel: Option<u16>,
    /// REQUESTED-TRANSPORT protocol number.
    pub requested_transport: Option<u8>,
    /// REQUESTED-ADDRESS-FAMILY (0x01 IPv4, 0x02 IPv6).
    pub requested_family: Option<u8>,
    /// ADDITIONAL-ADDRESS-FAMILY.
    pub additional_family: Option<u8>,
    /// EVEN-PORT, with its R bit (reserve the next port too).
    pub even_port: Option<bool>,
    /// DATA.
    pub data: Option<&'a [u8]>,
    /// The first XOR-PEER-ADDRESS (all of them: [`Attrs::peers`]).
    pub peer: Option<SocketAddr>,
    /// The message, for [`Attrs::peers`] to walk again: a CreatePermission may list as many
    /// peers as it has attributes (RFC 8656 §9.1; pion and webrtc-rs refresh every permission
    /// of an allocation in one request), and only it needs more than the first, so the others
    /// are not copied out on every decode.
    msg: Option<Message<'a>>,
    /// Unknown comprehension-required attributes seen.
    pub unknown: UnknownList,
}

impl<'a> Attrs<'a> {
    /// Decodes the attributes of `msg`. Unknown comprehension-required attributes are collected in
    /// [`Attrs::unknown`] rather than failing, so the caller decides when a 420 is due.
    pub fn decode(msg: &Message<'a>) -> Result<Self, AttrError> {
        let tid = msg.transaction_id();
        let mut a = Attrs {
            msg: Some(*msg),
            ..Attrs::default()
        };
        for (count, (typ, v, at)) in msg.attributes().enumerate() {
            if count >= MAX_ATTRIBUTES {
                return Err(AttrError::TooMany);
            }
            if a.integrity.is_some() {
                // Only FINGERPRINT may follow MESSAGE-INTEGRITY; anything else is ignored.
                continue;
            }
            match typ {
                attr::USERNAME => set(&mut a.username, text(v, MAX_USERNAME, typ)?, typ)?,
                attr::REALM => set(&mut a.realm, text(v, MAX_TEXT, typ)?, typ)?,
                attr::NONCE => set(&mut a.nonce, text(v, MAX_TEXT, typ)?, typ)?,
                attr::SOFTWARE => set(&mut a.software, text(v, MAX_TEXT, typ)?, typ)?,
                attr::MESSAGE_INTEGRITY => {
                    if v.len() != INTEGRITY_LEN {
                        return Err(AttrError::Bad(typ));
                    }
                    a.integrity = Some(Integrity {
                        offset: at,
                        value: v,
                    });
                }
                attr::LIFETIME => set(&mut a.lifetime, u32_value(v, typ)?, typ)?,
                attr::CHANNEL_NUMBER => {
                    if v.len() != 4 {
                        return Err(AttrError::Bad(typ));
                    }
                    set(&mut a.channel, u16::from_be_bytes([v[0], v[1]]), typ)?;
                }
                attr::REQUESTED_TRANSPORT => {
                    if v.len() != 4 {
                        return Err(AttrError::Bad(typ));
                    }
                    set(&mut a.requested_transport, v[0], typ)?;
                }
                attr::REQUESTED_ADDRESS_FAMILY => {
                    if v.len() != 4 {
                        return Err(AttrError::Bad(typ));
                    }
                    set(&mut a.requested_family, v[0], typ)?;
                }
                attr::ADDITIONAL_ADDRESS_FAMILY => {
                    if v.len() != 4 {
                        return Err(AttrError::Bad(typ));
                    }
                    set(&mut a.additional_family, v[0], typ)?;
                }
                attr::EVEN_PORT => {
                    if v.len() != 1 {
                        return Err(AttrError::Bad(typ));
                    }
                    set(&mut a.even_port, v[0] & 0x80 != 0, typ)?;
                }
                attr::DATA => set(&mut a.data, v, typ)?,
                attr::XOR_PEER_ADDRESS => {
                    // Every one is checked here, so `peers` can skip none.
                    let addr = decode_xor_address(v, &tid).ok_or(AttrError::Bad(typ))?;
                    a.peer.get_or_insert(addr);
                }
                attr::FINGERPRINT => {}
                // Known, harmless in requests, ignored.
                attr::MAPPED_ADDRESS | attr::XOR_MAPPED_ADDRESS | attr::ERROR_CODE => {}
                t if t < 0x8000 => a.unknown.push(t),
                _ => {} // comprehension-optional: ignored (RFC 8489 §15)
            }
        }
        Ok(a)
    }

    /// Every XOR-PEER-ADDRESS before MESSAGE-INTEGRITY, in order (at most [`MAX_ATTRIBUTES`]:
    /// a longer message does not decode).
    pub fn peers(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        let tid = self.msg.map(|m| m.transaction_id()).unwrap_or_default();
        self.msg
            .iter()
            .flat_map(Message::attributes)
            .take_while(|(typ, _, _)| *typ != attr::MESSAGE_INTEGRITY)
            .filter(|(typ, _, _)| *typ == attr::XOR_PEER_ADDRESS)
            .filter_map(move |(_, v, _)| decode_xor_address(v, &tid))
    }

    /// Whether `msg` carries a MESSAGE-INTEGRITY that verifies under `key`, compared in constant
    /// time (`Mac::verify_slice`).
    pub fn verify_integrity(&self, msg: &Message<'_>, key: &[u8]) -> bool {
        let Some(mi) = self.integrity else {
            return false;
        };
        let raw = msg.as_bytes();
        // The length field must count up to and including MESSAGE-INTEGRITY (RFC 8489 §14.5).
        let len = (mi.offset + 4 + INTEGRITY_LEN - HEADER_LEN) as u16;
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&raw[..HEADER_LEN]);
        header[2..4].copy_from_slice(&len.to_be_bytes());
        let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(key) else {
            return false;
        };
        mac.update(&header);
        mac.update(&raw[HEADER_LEN..mi.offset]);
        mac.verify_slice(mi.value).is_ok()
    }
}

fn set<T>(slot: &mut Option<T>, v: T, typ: u16) -> Result<(), AttrError> {
    // RFC 8489 §14: a singleton attribute twice is a malformed request, not "last one wins".
    if slot.is_some() {
        return Err(AttrError::Bad(typ));
    }
    *slot = Some(v);
    Ok(())
}

fn text(v: &[u8], max: usize, typ: u16) -> Result<&[u8], AttrError> {
    if v.len() > max || std::str::from_utf8(v).is_err() || v.contains(&0) {
        return Err(AttrError::Bad(typ));
    }
    Ok(v)
}

fn u32_value(v: &[u8], typ: u16) -> Result<u32, AttrError> {
    match v {
        [a, b, c, d] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => Err(AttrError::Bad(typ)),
    }
}

/// Decodes an XOR-*-ADDRESS value (RFC 8489 §14.2). `None` for a bad family or length.
pub fn decode_xor_address(v: &[u8], tid: &[u8; 12]) -> Option<SocketAddr> {
    if v.len() < 4 {
        return None;
    }
    let port = u16::from_be_bytes([v[2], v[3]]) ^ (MAGIC_COOKIE >> 16) as u16;
    match (v[1], v.len()) {
        (0x01, 8) => {
            let x = u32::from_be_bytes([v[4], v[5], v[6], v[7]]) ^ MAGIC_COOKIE;
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(x)), port))
        }
        (0x02, 20) => {
            let mut b = [0u8; 16];
            b.copy_from_slice(&v[4..20]);
            let key = xor_key(tid);
            for (x, k) in b.iter_mut().zip(key) {
                *x ^= k;
            }
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(b)), port))
        }
        _ => None,
    }
}

fn xor_key(tid: &[u8; 12]) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    k[4..].copy_from_slice(tid);
    k
}

/// Writes one STUN message at the end of a buffer. Call [`Encoder::finish`] (or one of the
/// integrity/fingerprint methods, then `finish`) to fix up the length field.
#[derive(Debug)]
pub struct Encoder<'b> {
    buf: &'b mut Vec<u8>,
    start: usize,
    tid: [u8; 12],
}

impl<'b> Encoder<'b> {
    /// Starts a message with the given method, class and transaction id.
    pub fn new(buf: &'b mut Vec<u8>, method: u16, class: Class, tid: [u8; 12]) -> Self {
        let start = buf.len();
        buf.extend_from_slice(&message_type(method, class).to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf.extend_from_slice(&tid);
        Self { buf, start, tid }
    }

    fn set_len(&mut self) {
        let len = (self.buf.len() - self.start - HEADER_LEN) as u16;
        self.buf[self.start + 2..self.start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// Appends an attribute with zero padding.
    pub fn attr(&mut self, typ: u16, value: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(&typ.to_be_bytes());
        self.buf
            .extend_from_slice(&(value.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(value);
        let pad = (4 - value.len() % 4) % 4;
        self.buf.extend_from_slice(&[0u8; 3][..pad]);
        self
    }

    /// Appends a 32-bit attribute (LIFETIME and similar).
    pub fn u32_attr(&mut self, typ: u16, v: u32) -> &mut Self {
        self.attr(typ, &v.to_be_bytes())
    }

    /// Appends an XOR-*-ADDRESS attribute.
    pub fn xor_address(&mut self, typ: u16, addr: SocketAddr) -> &mut Self {
        let port = addr.port() ^ (MAGIC_COOKIE >> 16) as u16;
        match addr.ip() {
            IpAddr::V4(ip) => {
                let mut v = [0u8; 8];
                v[1] = 0x01;
                v[2..4].copy_from_slice(&port.to_be_bytes());
                v[4..].copy_from_slice(&(u32::from(ip) ^ MAGIC_COOKIE).to_be_bytes());
                self.attr(typ, &v)
            }
            IpAddr::V6(ip) => {
                let mut v = [0u8; 20];
                v[1] = 0x02;
                v[2..4].copy_from_slice(&port.to_be_bytes());
                let key = xor_key(&self.tid);
                for (i, b) in ip.octets().iter().enumerate() {
                    v[4 + i] = b ^ key[i];
                }
                self.attr(typ, &v)
            }
        }
    }

    /// Appends ERROR-CODE with the standard reason phrase.
    pub fn error_code(&mut self, code: u16) -> &mut Self {
        let reason = code::reason(code).as_bytes();
        let mut v = Vec::with_capacity(4 + reason.len());
        v.extend_from_slice(&[0, 0, (code / 100) as u8, (code % 100) as u8]);
        v.extend_from_slice(reason);
        self.attr(attr::ERROR_CODE, &v)
    }

    /// Appends ADDRESS-ERROR-CODE (RFC 8656 §18.12) for `family` (0x01 IPv4, 0x02 IPv6).
    pub fn address_error_code(&mut self, family: u8, code: u16) -> &mut Self {
        let reason = code::reason(code).as_bytes();
        let mut v = Vec::with_capacity(4 + reason.len());
        v.extend_from_slice(&[family, 0, (code / 100) as u8, (code % 100) as u8]);
        v.extend_from_slice(reason);
        self.attr(attr::ADDRESS_ERROR_CODE, &v)
    }

    /// Appends UNKNOWN-ATTRIBUTES.
    pub fn unknown_attributes(&mut self, types: &[u16]) -> &mut Self {
        let mut v = [0u8; 2 * MAX_UNKNOWN];
        let n = types.len().min(MAX_UNKNOWN);
        for (i, t) in types[..n].iter().enumerate() {
            v[2 * i..2 * i + 2].copy_from_slice(&t.to_be_bytes());
        }
        self.attr(attr::UNKNOWN_ATTRIBUTES, &v[..2 * n])
    }

    /// Appends MESSAGE-INTEGRITY computed with `key` over everything written so far.
    pub fn integrity(&mut self, key: &[u8]) -> &mut Self {
        self.buf
            .extend_from_slice(&attr::MESSAGE_INTEGRITY.to_be_bytes());
        self.buf
            .extend_from_slice(&(INTEGRITY_LEN as u16).to_be_bytes());
        let mac_start = self.buf.len();
        self.buf.extend_from_slice(&[0u8; INTEGRITY_LEN]);
        self.set_len();
        let digest = match Hmac::<Sha1>::new_from_slice(key) {
            Ok(mut mac) => {
                mac.update(&self.buf[self.start..mac_start - 4]);
                mac.finalize().into_bytes()
            }
            // HMAC accepts keys of any length; this arm exists only to stay panic-free.
            Err(_) => return self,
        };
        self.buf[mac_start..mac_start + INTEGRITY_LEN].copy_from_slice(&digest);
        self
    }

    /// Appends FINGERPRINT; it must be the last attribute.
    pub fn fingerprint(&mut self) -> &mut Self {
        self.buf.extend_from_slice(&attr::FINGERPRINT.to_be_bytes());
        self.buf.extend_from_slice(&4u16.to_be_bytes());
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0u8; 4]);
        self.set_len();
        let crc = crc32fast::hash(&self.buf[self.start..at - 4]) ^ FINGERPRINT_XOR;
        self.buf[at..at + 4].copy_from_slice(&crc.to_be_bytes());
        self
    }

    /// Fixes the length field and returns where the message sits in the buffer.
    pub fn finish(mut self) -> std::ops::Range<usize> {
        self.set_len();
        self.start..self.buf.len()
    }
}

/// The header of a ChannelData message ([RFC 8656 §12.4](https://www.rfc-editor.org/rfc/rfc8656#section-12.4)).
pub const CHANNEL_HEADER_LEN: usize = 4;
/// First channel number a client may bind.
pub const CHANNEL_MIN: u16 = 0x4000;
/// Last channel number a client may bind (RFC 8656 §12: 0x5000–0x7FFF are reserved).
pub const CHANNEL_MAX: u16 = 0x4FFF;

/// Splits a ChannelData datagram into channel number and application data. Trailing padding is
/// allowed (RFC 8656 §12.5); a length field past the end is not.
pub fn parse_channel_data(buf: &[u8]) -> Option<(u16, &[u8])> {
    let hdr = buf.get(..CHANNEL_HEADER_LEN)?;
    let number = u16::from_be_bytes([hdr[0], hdr[1]]);
    let len = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
    let data = buf.get(CHANNEL_HEADER_LEN..CHANNEL_HEADER_LEN + len)?;
    // Padding to a multiple of four, at most; anything longer is not one ChannelData message.
    if buf.len() > CHANNEL_HEADER_LEN + ((len + 3) & !3) {
        return None;
    }
    Some((number, data))
}

/// Why a byte stream cannot be cut into TURN frames. The connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The next bytes are neither a STUN message nor ChannelData: the stream lost its framing.
    #[error("not a STUN message or ChannelData")]
    NotTurn,
    /// A STUN length that is not a multiple of four, or a wrong magic cookie.
    #[error("malformed STUN header")]
    BadHeader,
    /// The frame declares more than the configured maximum.
    #[error("frame of {0} bytes is over the limit")]
    TooLarge(usize),
}

/// The length of the frame at the start of a TCP/TLS stream buffer ([RFC 8656 §3.1]): a STUN
/// message (20-byte header plus its length) or ChannelData (4 bytes plus its length, padded to
/// a multiple of four on streams, §12.5). `Ok(None)` means more bytes are needed to know.
///
/// [RFC 8656 §3.1]: https://www.rfc-editor.org/rfc/rfc8656#section-3.1
pub fn stream_frame_len(buf: &[u8], max: usize) -> Result<Option<usize>, StreamError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let len = match first {
        0x00..=0x03 => {
            let Some(h) = buf.get(..8) else {
                // Judge the length as soon as it is known, before the cookie arrives.
                if let Some(l) = buf.get(2..4) {
                    let l = usize::from(u16::from_be_bytes([l[0], l[1]]));
                    if l % 4 != 0 {
                        return Err(StreamError::BadHeader);
                    }
                    if HEADER_LEN + l > max {
                        return Err(StreamError::TooLarge(HEADER_LEN + l));
                    }
                }
                return Ok(None);
            };
            let l = usize::from(u16::from_be_bytes([h[2], h[3]]));
            if l % 4 != 0 || u32::from_be_bytes([h[4], h[5], h[6], h[7]]) != MAGIC_COOKIE {
                return Err(StreamError::BadHeader);
            }
            HEADER_LEN + l
        }
        0x40..=0x4F => {
            let Some(h) = buf.get(..4) else {
                return Ok(None);
            };
            let l = usize::from(u16::from_be_bytes([h[2], h[3]]));
            CHANNEL_HEADER_LEN + ((l + 3) & !3)
        }
        _ => return Err(StreamError::NotTurn),
    };
    if len > max {
        return Err(StreamError::TooLarge(len));
    }
    Ok((buf.len() >= len).then_some(len))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn message_type_round_trips() {
        for method in [
            method::BINDING,
            method::ALLOCATE,
            method::CHANNEL_BIND,
            0xFFF,
        ] {
            for class in [
                Class::Request,
                Class::Indication,
                Class::Success,
                Class::Error,
            ] {
                assert_eq!(split_type(message_type(method, class)), (method, class));
            }
        }
        assert_eq!(message_type(method::BINDING, Class::Request), 0x0001);
        assert_eq!(message_type(method::BINDING, Class::Success), 0x0101);
        assert_eq!(message_type(method::ALLOCATE, Class::Error), 0x0113);
        assert_eq!(message_type(method::SEND, Class::Indication), 0x0016);
        assert_eq!(message_type(method::DATA, Class::Indication), 0x0017);
    }

    #[test]
    fn every_peer_before_integrity_and_none_after() {
        let tid = [3u8; 12];
        let mut buf = Vec::new();
        let mut e = Encoder::new(&mut buf, method::CREATE_PERMISSION, Class::Request, tid);
        let before: Vec<SocketAddr> = (1..=12)
            .map(|i| SocketAddr::from(([192, 0, 2, i], 1000 + u16::from(i))))
            .collect();
        for p in &before {
            e.xor_address(attr::XOR_PEER_ADDRESS, *p);
        }
        e.integrity(b"key");
        let r = e.finish();
        let mut msg_bytes = buf[r].to_vec();
        // A peer appended after MESSAGE-INTEGRITY is not covered by it: ignored.
        let mut tail = Vec::new();
        let mut t = Encoder::new(&mut tail, method::CREATE_PERMISSION, Class::Request, tid);
        t.xor_address(attr::XOR_PEER_ADDRESS, "[2001:db8::9]:9".parse().unwrap());
        let tr = t.finish();
        msg_bytes.extend_from_slice(&tail[tr][HEADER_LEN..]);
        let len = (msg_bytes.len() - HEADER_LEN) as u16;
        msg_bytes[2..4].copy_from_slice(&len.to_be_bytes());

        let msg = Message::parse(&msg_bytes).unwrap();
        let a = Attrs::decode(&msg).unwrap();
        assert_eq!(a.peers().collect::<Vec<_>>(), before);
        assert_eq!(a.peer, Some(before[0]));
    }

    #[test]
    fn encoder_output_parses_and_verifies() {
        let tid = [7u8; 12];
        let mut buf = vec![0xAA; 3]; // a message need not start at offset 0
        let mut e = Encoder::new(&mut buf, method::ALLOCATE, Class::Request, tid);
        e.u32_attr(attr::REQUESTED_TRANSPORT, 17 << 24)
            .attr(attr::USERNAME, b"1700000000:alice")
            .xor_address(
                attr::XOR_PEER_ADDRESS,
                "[2001:db8::1]:4242".parse().unwrap(),
            )
            .integrity(b"key")
            .fingerprint();
        let r = e.finish();
        let msg = Message::parse(&buf[r]).unwrap();
        assert!(msg.has_fingerprint());
        let a = Attrs::decode(&msg).unwrap();
        assert_eq!(a.requested_transport, Some(17));
        assert_eq!(a.username, Some(&b"1700000000:alice"[..]));
        assert_eq!(
            a.peers().collect::<Vec<_>>(),
            vec!["[2001:db8::1]:4242".parse().unwrap()]
        );
        assert!(a.verify_integrity(&msg, b"key"));
        assert!(!a.verify_integrity(&msg, b"other"));
    }

    #[test]
    fn stream_frames() {
        let mut stun = Vec::new();
        Encoder::new(&mut stun, method::BINDING, Class::Request, [1; 12]).finish();
        assert_eq!(stream_frame_len(&stun, 1000), Ok(Some(20)));
        assert_eq!(stream_frame_len(&stun[..19], 1000), Ok(None));
        assert_eq!(stream_frame_len(&[], 1000), Ok(None));
        // ChannelData with 5 bytes of data occupies 4 + 8 on a stream.
        let cd = [0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5, 0, 0, 0, 0x00];
        assert_eq!(stream_frame_len(&cd, 1000), Ok(Some(12)));
        assert_eq!(stream_frame_len(&cd[..11], 1000), Ok(None));
        assert_eq!(
            stream_frame_len(&[0x16, 3, 1], 1000),
            Err(StreamError::NotTurn)
        );
        assert_eq!(
            stream_frame_len(&[0x00, 0x01, 0xFF, 0xFC], 1000),
            Err(StreamError::TooLarge(20 + 0xFFFC))
        );
        assert_eq!(
            stream_frame_len(&[0x00, 0x01, 0x00, 0x03], 1000),
            Err(StreamError::BadHeader)
        );
        let mut bad_cookie = stun.clone();
        bad_cookie[4] = 0;
        assert_eq!(
            stream_frame_len(&bad_cookie, 1000),
            Err(StreamError::BadHeader)
        );
        assert_eq!(
            stream_frame_len(&[0x40, 0x00, 0xFF, 0xFF], 1000),
            Err(StreamError::TooLarge(4 + 65536))
        );
    }

    #[test]
    fn channel_data_padding_rules() {
        assert_eq!(
            parse_channel_data(&[0x40, 0, 0, 2, 1, 2]),
            Some((0x4000, &[1u8, 2][..]))
        );
        assert_eq!(
            parse_channel_data(&[0x40, 0, 0, 2, 1, 2, 0, 0]),
            Some((0x4000, &[1u8, 2][..]))
        );
        assert_eq!(parse_channel_data(&[0x40, 0, 0, 2, 1, 2, 0, 0, 0]), None);
        assert_eq!(parse_channel_data(&[0x40, 0, 0, 9, 1, 2]), None);
        assert_eq!(parse_channel_data(&[0x40, 0, 0]), None);
    }
}
