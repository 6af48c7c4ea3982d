//! The sans-IO TURN core of Turnpike: STUN Binding ([RFC 8489]) and TURN ([RFC 8656]) with
//! clients over UDP, TCP and TLS, relaying to UDP peers over IPv4 and IPv6 (dual allocations
//! included).
//!
//! [RFC 8489]: https://www.rfc-editor.org/rfc/rfc8489
//! [RFC 8656]: https://www.rfc-editor.org/rfc/rfc8656
//!
//! This crate performs no I/O and never reads a clock: the driver (`relay-server`) hands it
//! datagrams and the time, and drains what it wants done. That keeps every protocol decision
//! testable with a virtual clock, and keeps the driver free to batch system calls.
//!
//! # Driving a [`Server`]
//!
//! One `Server` per shard (thread). It owns the allocations whose client 5-tuples the kernel
//! sends to that shard, and their relay sockets. The contract:
//!
//! 1. Feed input with [`Server::handle_client`] (a datagram on a UDP listener, or one frame cut
//!    from a TCP/TLS stream with [`stun::stream_frame_len`]),
//!    [`Server::handle_connection_closed`] (a TCP/TLS connection ended),
//!    [`Server::handle_peer`] (a datagram on a relay socket) and [`Server::handle_timeout`]
//!    (when [`Server::poll_timeout`] is due).
//! 2. After any `handle_*` call, drain [`Server::poll_output`] until it returns `None`, doing what
//!    each [`Output`] says: send a [`Transmit`] (its bytes are [`Server::payload`]), bind a relay
//!    socket for a [`Output::BindRelay`] and report the result with
//!    [`Server::handle_relay_bound`] (the Allocate is answered only then), close the socket of a
//!    [`Output::ReleaseRelay`].
//! 3. Outputs' bytes live in a buffer inside the server, reused across calls: they stay valid
//!    until the next `handle_*` call that finds the output queue empty. A driver may therefore
//!    feed a whole batch of datagrams, then drain and send everything in one go.
//! 4. Call [`Server::handle_wall_clock`] now and then (the driver does it every timer tick) so
//!    REST expiry times and nonces, which are wall-clock, follow a stepped system clock.
//! 5. Hand it revocations with [`Server::handle_revocation`] (below), then drain as in 2.
//!
//! A panic in this crate is a bug: no input, however malformed, may cause one.
//!
//! # Revocation
//!
//! REST credentials are stateless HMACs, so the control plane cannot un-mint those of a call that
//! ended, nor those of a participant it kicked. It mints them as `EXPIRY:CALL.RANDOM` instead,
//! with one random credential group per call, or `EXPIRY:CALL.PEER.RANDOM` for a participant
//! joined through it, and revokes a group. Groups are hierarchical: a username belongs to every
//! dot-separated prefix of its user part but the whole (the last segment is the random part),
//! so `CALL.PEER.RANDOM` belongs to `CALL` and `CALL.PEER` ([`auth::rest_groups`];
//! [`auth::rest_group`] gives the widest, the call's). Revoking `CALL.PEER` kicks that
//! participant alone; revoking `CALL` ends the call for everyone in it. A group is 1 to
//! [`auth::MAX_GROUP_SEGMENTS`] segments of `[A-Za-z0-9_-]` ([`auth::is_valid_group`]); anything
//! else is ignored. [`Server::handle_revocation`] deletes the allocations with that group at
//! once (relay sockets released, quotas given back, counted as [`DeleteReason::Revoked`]) and
//! refuses new Allocates with it with 401 ([`AuthFailure::Revoked`]) until the given Unix time,
//! normally the credentials' expiry; an Allocate's check is one table lookup per group of its
//! username, and relaying never looks. Requests on a torn-down allocation get the usual 437.
//! Each shard keeps its own bounded table ([`Config::max_revoked_groups`]), forgets entries once
//! their time is over (on [`Server::handle_wall_clock`]), and must be told of every revocation:
//! an allocation may live on any shard. Usernames without a group (`expiry:user` with no `.`)
//! are never affected.
//!
//! # Why not the webrtc-rs `stun`/`turn` crates
//!
//! Their message type allocates a `Vec` per message and per attribute, and the `turn` crate's
//! server is a single-task Go port whose REST handler cannot parse `expiry:user` usernames. The
//! ChannelData fast path here touches no allocator, and decoding borrows from the datagram. The
//! `turn` crate's *client* is used in our end-to-end tests, so interoperability is still checked
//! against it.

mod alloc;
pub mod auth;
mod limit;
pub mod policy;
mod revoke;
mod server;
pub mod stun;

pub use auth::{rest_credentials, rest_password};
pub use policy::{DenyReason, PeerPolicy};
pub use server::{
    AllocResult, AuthFailure, BindError, BindRequest, Config, DeleteReason, Dest, Direction,
    DropReason, Event, Family, FiveTuple, Output, PerFamily, Quotas, RelayId, Server, Stats,
    Transmit, Transport,
};

/// Declares a fieldless enum used as a metric label: `COUNT`, `ALL`, `as_str` and an index, so
/// counters are plain arrays and label values come from a fixed, small set.
#[macro_export]
#[doc(hidden)]
macro_rules! label_enum {
    ($(#[$m:meta])* pub enum $name:ident { $($(#[$vm:meta])* $v:ident => $s:literal,)+ }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vm])* $v,)+ }
        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$v,)+];
            /// How many values there are.
            pub const COUNT: usize = Self::ALL.len();
            /// The metric label value.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$v => $s,)+ }
            }
            /// Position in [`Self::ALL`].
            pub fn index(self) -> usize {
                self as usize
            }
        }
    };
}
