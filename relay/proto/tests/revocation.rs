//! Credential-group revocation with a virtual clock: `Server::handle_revocation` tears down the
//! group's allocations like an expiry would, and refuses the group's new Allocates until the
//! revocation ends. Usernames are the control plane's `EXPIRY:CALL.RANDOM`, and
//! `EXPIRY:CALL.PEER.RANDOM` for a participant, which has both groups `CALL` and `CALL.PEER`.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use relay_proto::stun::{method, Class};
use relay_proto::{AllocResult, AuthFailure, DeleteReason, Dest, Event, Family, Transport};

use common::*;

/// Valid for an hour from `t0`, like the credentials the control plane hands out.
const EXPIRY: u64 = WALL_SECS + 3600;

/// REST credentials for the user part `user` (`GROUP.RANDOM`, or anything else).
fn creds(user: &str) -> Creds {
    Creds::rest(SECRET_ONE, user, EXPIRY)
}

/// A fresh client on `port` sends an authenticated Allocate at `t0 + secs`; the response.
fn try_allocate(h: &mut Harness, secs: u64, port: u16, user: &str) -> Vec<u8> {
    let now = h.at(secs);
    let mut c = Client::new(port, creds(user));
    h.fetch_nonce(now, &mut c);
    h.transact(
        now,
        c.five,
        &c.req(method::ALLOCATE).transport(UDP).encode(),
    )
}

fn revoked_failures(h: &Harness) -> u64 {
    h.stats().auth_failures[AuthFailure::Revoked.index()]
}

/// Peer data at `t0 + secs` reaches the client: the allocation relays.
fn relays(h: &mut Harness, secs: u64, c: &Client) -> bool {
    let now = h.at(secs);
    let outs = h.peer_sends(now, c.relay(), PEER_A, b"media");
    transmits(&outs)
        .iter()
        .any(|(dest, _)| *dest == Dest::Client(c.five))
}

/// A client on `port` allocated as `user` at `t0` with a permission for `PEER_A`, so
/// [`relays`] tells whether its allocation still stands.
fn relaying(h: &mut Harness, port: u16, user: &str) -> Client {
    let c = h.allocated_as(h.t0, port, creds(user));
    assert_eq!(
        class_of(&h.create_permission(h.t0, &c, &[PEER_A])),
        Class::Success
    );
    assert!(relays(h, 0, &c));
    c
}

#[test]
fn revocation_tears_down_the_groups_allocations_and_spares_the_others() {
    let mut h = Harness::new();
    let a1 = h.allocated_as(h.t0, 41000, creds("gA.one"));
    let a2 = h.allocated_as(h.t0, 41001, creds("gA.two"));
    let b = h.allocated_as(h.t0, 41002, creds("gB.one"));
    let plain = h.allocated(41003);
    for c in [&a1, &a2, &b, &plain] {
        assert_eq!(
            class_of(&h.create_permission(h.t0, c, &[PEER_A])),
            Class::Success
        );
    }
    let quotas = h.quotas();
    assert_eq!(quotas.total(), 4);

    let outs = h.revoke(h.at(10), "gA", EXPIRY);

    let mut released = releases(&outs);
    released.sort();
    let mut want = vec![a1.relay(), a2.relay()];
    want.sort();
    assert_eq!(released, want, "{outs:?}");
    let mut deleted = events(&outs);
    deleted.sort_by_key(|e| match e {
        Event::AllocationDeleted { client, .. } => client.port(),
        Event::AllocationCreated { client, .. } => client.port(),
    });
    assert_eq!(
        deleted,
        [&a1, &a2]
            .iter()
            .map(|c| Event::AllocationDeleted {
                client: c.five.client,
                reason: DeleteReason::Revoked
            })
            .collect::<Vec<_>>()
    );
    assert!(transmits(&outs).is_empty(), "nobody is told: {outs:?}");
    assert_eq!(h.stats().deleted[DeleteReason::Revoked.index()], 2);
    assert_eq!(h.stats().revocations, 1);
    assert_eq!(h.server.allocations(), 2);
    // Quotas given back once each.
    assert_eq!(quotas.total(), 2);
    assert_eq!(quotas.user("gA.one"), 0);
    assert_eq!(quotas.user("gA.two"), 0);
    assert_eq!(quotas.user("gB.one"), 1);

    // The torn-down clients learn it from a 437, on every request that needs the allocation.
    assert_eq!(error_code(&h.refresh(h.at(11), &a1, None)), Some(437));
    assert_eq!(
        error_code(&h.create_permission(h.at(11), &a2, &[PEER_B])),
        Some(437)
    );
    assert_eq!(
        error_code(&h.channel_bind(h.at(11), &a2, 0x4000, PEER_B)),
        Some(437)
    );
    assert!(!relays(&mut h, 11, &a1));

    // Another group and a username without a group relay and refresh as before.
    for c in [&b, &plain] {
        assert!(relays(&mut h, 12, c));
        assert_eq!(class_of(&h.refresh(h.at(12), c, None)), Class::Success);
    }
    assert_eq!(revoked_failures(&h), 0);
}

#[test]
fn allocate_of_a_revoked_group_gets_401_until_the_revocation_ends() {
    let mut h = Harness::new();
    let until = WALL_SECS + 100;
    h.revoke(h.t0, "gA", until);
    assert_eq!(h.server.revoked_groups(), 1);

    let resp = try_allocate(&mut h, 1, 42000, "gA.fresh");
    assert_eq!(error_code(&resp), Some(401));
    // Answered like a wrong password: a fresh challenge, no MESSAGE-INTEGRITY.
    assert!(nonce_of(&resp).is_some());
    assert!(!verifies(&resp, &creds("gA.fresh").key));
    assert_eq!(revoked_failures(&h), 1);
    assert_eq!(
        h.stats().allocations[Transport::Udp.index()][AllocResult::Unauthenticated.index()],
        2,
        "the nonce round trip and the refusal"
    );
    assert_eq!(h.server.allocations(), 0);
    assert_eq!(h.quotas().total(), 0);

    // The revocation holds through its last second, like a credential expiry.
    let resp = try_allocate(&mut h, 100, 42001, "gA.fresh");
    assert_eq!(error_code(&resp), Some(401));
    assert_eq!(revoked_failures(&h), 2);

    // Then the group's credentials (still unexpired) allocate again.
    let c = h.allocated_as(h.at(101), 42002, creds("gA.fresh"));
    assert!(c.relay.is_some());
    assert_eq!(revoked_failures(&h), 2);
}

#[test]
fn a_revocation_for_a_group_without_allocations_still_refuses_later_ones() {
    let mut h = Harness::new();
    let _b = h.allocated_as(h.t0, 41000, creds("gB.one"));
    let outs = h.revoke(h.at(1), "gNobody", EXPIRY);
    assert!(outs.is_empty(), "{outs:?}");
    assert_eq!(h.stats().deleted[DeleteReason::Revoked.index()], 0);
    assert_eq!(h.server.allocations(), 1);

    let resp = try_allocate(&mut h, 2, 41001, "gNobody.late");
    assert_eq!(error_code(&resp), Some(401));
    assert_eq!(revoked_failures(&h), 1);
    // Other groups are not refused.
    h.allocated_as(h.at(3), 41002, creds("gB.two"));
}

#[test]
fn usernames_without_a_group_are_never_affected() {
    let mut h = Harness::new();
    // `EXPIRY:alice`: no dot, so no group, whatever is revoked.
    let alice = h.allocated(41000);
    // Neither a prefix nor a username equal to the group matches.
    let longer = h.allocated_as(h.t0, 41001, creds("aliceX.r"));
    let outs = h.revoke(h.at(1), "alice", EXPIRY);
    assert!(outs.is_empty(), "{outs:?}");
    assert_eq!(h.server.allocations(), 2);
    for c in [&alice, &longer] {
        assert_eq!(class_of(&h.refresh(h.at(2), c, None)), Class::Success);
    }
    h.allocated_as(h.at(3), 41002, creds("alice"));
    h.allocated_as(h.at(3), 41003, creds("aliceX.s"));
    // The group itself is refused.
    let resp = try_allocate(&mut h, 4, 41004, "alice.r");
    assert_eq!(error_code(&resp), Some(401));
    assert_eq!(revoked_failures(&h), 1);
}

#[test]
fn stream_allocations_are_torn_down_and_their_connection_closing_later_changes_nothing() {
    let mut h = Harness::new();
    let mut tcp = Client::on(five_on(41000, Transport::Tcp), creds("gA.tcp"));
    h.allocate(h.t0, &mut tcp);
    let mut tls = Client::on(five_on(41001, Transport::Tls), creds("gA.tls"));
    h.allocate(h.t0, &mut tls);
    assert_eq!(h.server.allocations_by_transport(), [0, 1, 1]);

    let outs = h.revoke(h.at(1), "gA", EXPIRY);
    assert_eq!(releases(&outs).len(), 2, "{outs:?}");
    assert_eq!(h.server.allocations_by_transport(), [0, 0, 0]);
    assert_eq!(h.quotas().total(), 0);

    // The connections outlive their allocations; their end deletes nothing twice.
    assert!(h.connection_closed(h.at(2), tcp.five).is_empty());
    assert!(h.connection_closed(h.at(2), tls.five).is_empty());
    assert_eq!(h.stats().deleted[DeleteReason::Revoked.index()], 2);
    assert_eq!(h.stats().deleted.iter().sum::<u64>(), 2);
    assert_eq!(h.quotas().total(), 0);
}

#[test]
fn dual_allocations_release_both_relays() {
    let mut h = Harness::with(|c| {
        c.relay_ips.v6 = Some(RELAY_IP6);
    });
    let mut c = Client::new(41000, creds("gA.dual"));
    h.allocate_with(h.t0, &mut c, |r| r.additional_family(FAMILY_V6));
    assert_eq!(c.relays.len(), 2);
    let mut released = releases(&h.revoke(h.at(1), "gA", EXPIRY));
    released.sort();
    let mut want = vec![c.relay_of(Family::V4), c.relay_of(Family::V6)];
    want.sort();
    assert_eq!(released, want);
    assert_eq!(h.server.allocations(), 0);
}

#[test]
fn an_allocation_still_binding_its_relay_is_torn_down_and_its_socket_given_back_once_bound() {
    let mut h = Harness::new();
    h.bind_mode = BindMode::Manual;
    let mut c = Client::new(41000, creds("gA.slow"));
    h.fetch_nonce(h.t0, &mut c);
    let req = c.req(method::ALLOCATE).transport(UDP).encode();
    let outs = h.client_sends(h.t0, c.five, &req);
    let relay = binds(&outs)[0].relay;
    assert_eq!(h.quotas().total(), 1);

    let outs = h.revoke(h.at(1), "gA", EXPIRY);
    assert!(releases(&outs).is_empty(), "not bound yet: {outs:?}");
    assert_eq!(h.server.allocations(), 0);
    assert_eq!(h.quotas().total(), 0);

    // The socket the driver binds afterwards goes straight back; nobody is answered.
    let outs = h.relay_bound(h.at(2), relay, Ok(h.next_relay_addr()));
    assert_eq!(releases(&outs), vec![relay]);
    assert!(transmits(&outs).is_empty(), "{outs:?}");
    assert_eq!(h.quotas().total(), 0);
}

#[test]
fn the_later_until_is_kept() {
    let mut h = Harness::new();
    h.revoke(h.t0, "gA", WALL_SECS + 1000);
    h.revoke(h.t0, "gA", WALL_SECS + 10);
    assert_eq!(h.server.revoked_groups(), 1);
    assert_eq!(h.stats().revocations, 2);
    let resp = try_allocate(&mut h, 500, 41000, "gA.x");
    assert_eq!(error_code(&resp), Some(401));
    h.allocated_as(h.at(1001), 41001, creds("gA.x"));
}

#[test]
fn revocations_are_forgotten_on_the_wall_clock_tick_after_they_end() {
    let mut h = Harness::new();
    h.revoke(h.t0, "gA", WALL_SECS + 10);
    h.revoke(h.t0, "gB", WALL_SECS + 20);
    h.wall_clock(h.at(10));
    assert_eq!(
        h.server.revoked_groups(),
        2,
        "gA holds through its last second"
    );
    h.wall_clock(h.at(11));
    assert_eq!(h.server.revoked_groups(), 1);
    h.wall_clock(h.at(21));
    assert_eq!(h.server.revoked_groups(), 0);
}

#[test]
fn a_stepped_wall_clock_moves_the_end_of_a_revocation() {
    // Revocations are wall-clock times: a system clock stepped forward ends them early.
    let mut h = Harness::new();
    h.revoke(h.t0, "gA", WALL_SECS + 1000);
    let now = h.at(5);
    h.server
        .handle_wall_clock(now, wall() + Duration::from_secs(1001));
    assert_eq!(h.server.revoked_groups(), 0);
}

#[test]
fn a_revocation_already_over_tears_down_but_is_not_remembered() {
    let mut h = Harness::new();
    let a = h.allocated_as(h.t0, 41000, creds("gA.one"));
    let outs = h.revoke(h.at(1), "gA", WALL_SECS - 1);
    assert_eq!(releases(&outs), vec![a.relay()]);
    assert_eq!(h.server.revoked_groups(), 0);
    h.allocated_as(h.at(2), 41001, creds("gA.two"));
}

#[test]
fn invalid_groups_change_nothing() {
    let mut h = Harness::new();
    let dotted = relaying(&mut h, 41000, "a.b.c.d");
    let participant = relaying(&mut h, 41001, "call.p_x.r");
    let long = "g".repeat(relay_proto::auth::MAX_GROUP_LEN + 1);
    let long_pair = format!("call.{}", "p".repeat(relay_proto::auth::MAX_GROUP_LEN - 4));
    let groups = [
        "",
        // More segments than a group may have.
        "a.b.c",
        "a.b.c.d",
        "call.p_x.r",
        // An empty segment.
        "a..b",
        "call..p_x",
        "a.",
        ".a",
        "call.",
        ".",
        // Characters outside [A-Za-z0-9_-].
        "a:b",
        "a b",
        "call.p_x:r",
        "call.p$x",
        "cäll.p_x",
        "call.p_x\n",
        long.as_str(),
        long_pair.as_str(),
    ];
    for group in groups {
        assert!(!relay_proto::auth::is_valid_group(group), "{group:?}");
        let outs = h.revoke(h.at(1), group, EXPIRY);
        assert!(outs.is_empty(), "{group:?}: {outs:?}");
    }
    assert_eq!(h.stats().revocations, groups.len() as u64);
    assert_eq!(h.server.revoked_groups(), 0);
    assert_eq!(h.stats().deleted[DeleteReason::Revoked.index()], 0);
    for c in [&dotted, &participant] {
        assert_eq!(class_of(&h.refresh(h.at(2), c, None)), Class::Success);
        assert!(relays(&mut h, 2, c));
    }
    h.allocated_as(h.at(3), 41002, creds("call.p_x.again"));
    assert_eq!(revoked_failures(&h), 0);
}

#[test]
fn usernames_with_many_dots_are_handled_and_only_their_first_groups_count() {
    let mut h = Harness::new();
    // Close to the longest USERNAME (513 bytes): groups `call` and `call.p_x`, then dots only.
    let user = format!("call.p_x.{}", ".".repeat(400));
    let dots = relaying(&mut h, 41000, &user);
    let only_dots = relaying(&mut h, 41001, &".".repeat(480));
    let segments = relaying(&mut h, 41002, &"a.".repeat(240));
    assert_eq!(
        relay_proto::auth::rest_groups(creds(&user).username.as_bytes()).collect::<Vec<_>>(),
        ["call", "call.p_x"]
    );
    // Something is revoked, so every Allocate walks its username's groups.
    h.revoke(h.at(1), "zzz", EXPIRY);
    h.allocated_as(
        h.at(1),
        41003,
        creds(&format!("call.p_y.{}", "a.".repeat(200))),
    );
    h.allocated_as(h.at(1), 41004, creds(&"..".repeat(240)));
    // `a.a` is a group of "a.a.a.…" but "a.a.a" is not even a group.
    let outs = h.revoke(h.at(2), "a.a.a", EXPIRY);
    assert!(outs.is_empty(), "{outs:?}");
    let outs = h.revoke(h.at(2), "a.a", EXPIRY);
    assert_eq!(releases(&outs), vec![segments.relay()]);
    let outs = h.revoke(h.at(3), "call.p_x", EXPIRY);
    assert_eq!(releases(&outs), vec![dots.relay()]);
    let resp = try_allocate(&mut h, 4, 41005, &user);
    assert_eq!(error_code(&resp), Some(401));
    assert!(relays(&mut h, 4, &only_dots));
}

#[test]
fn a_sibling_or_the_call_wide_username_is_never_covered_by_a_participant_revocation() {
    let mut h = Harness::new();
    let call_wide = relaying(&mut h, 41000, "call.r1");
    let peer = relaying(&mut h, 41001, "call.p_a.r2");
    // Neither a revoked sibling, nor one whose id the revoked one is a prefix of, nor another
    // call with the same participant id.
    let longer = relaying(&mut h, 41002, "call.p_ab.r3");
    let elsewhere = relaying(&mut h, 41003, "other.p_b.r4");
    for group in ["call.p_b", "call.p", "call.r1", "other.p_a", "call.p_a.r2"] {
        let outs = h.revoke(h.at(1), group, EXPIRY);
        assert!(outs.is_empty(), "{group}: {outs:?}");
    }
    assert_eq!(h.server.allocations(), 4);
    for c in [&call_wide, &peer, &longer, &elsewhere] {
        assert!(relays(&mut h, 2, c));
    }
    // The participant's own group takes it alone; a fresh one of the call still allocates.
    let outs = h.revoke(h.at(3), "call.p_a", EXPIRY);
    assert_eq!(releases(&outs), vec![peer.relay()]);
    for c in [&call_wide, &longer, &elsewhere] {
        assert!(relays(&mut h, 4, c));
        assert_eq!(class_of(&h.refresh(h.at(4), c, None)), Class::Success);
    }
    h.allocated_as(h.at(5), 41004, creds("call.p_c.r5"));
    h.allocated_as(h.at(5), 41005, creds("call.r6"));
    assert_eq!(
        error_code(&try_allocate(&mut h, 5, 41006, "call.p_a.r7")),
        Some(401)
    );
    // Ending the call leaves the other call alone.
    let mut gone = releases(&h.revoke(h.at(6), "call", EXPIRY));
    gone.sort();
    assert_eq!(gone.len(), 4, "{gone:?}");
    assert!(gone.contains(&call_wide.relay()) && gone.contains(&longer.relay()));
    assert!(relays(&mut h, 7, &elsewhere));
}

#[test]
fn a_participant_is_revoked_alone_and_the_call_group_covers_every_participant() {
    let mut h = Harness::new();
    let kicked = h.allocated_as(h.t0, 41000, creds("call.p_kicked.r1"));
    let sibling = h.allocated_as(h.t0, 41001, creds("call.p_other.r2"));
    let plain = h.allocated_as(h.t0, 41002, creds("call.r3"));
    for c in [&kicked, &sibling, &plain] {
        assert_eq!(
            class_of(&h.create_permission(h.t0, c, &[PEER_A])),
            Class::Success
        );
    }
    // Kick one participant: only its allocation goes, and it cannot allocate again.
    let outs = h.revoke(h.at(1), "call.p_kicked", EXPIRY);
    assert_eq!(releases(&outs), vec![kicked.relay()]);
    let resp = try_allocate(&mut h, 2, 41003, "call.p_kicked.r4");
    assert_eq!(error_code(&resp), Some(401));
    assert!(relays(&mut h, 3, &sibling), "a sibling keeps relaying");
    assert!(relays(&mut h, 3, &plain));
    h.allocated_as(h.at(4), 41004, creds("call.p_new.r5"));
    // End the call: every participant's allocation and the plain one go.
    let outs = h.revoke(h.at(5), "call", EXPIRY);
    let mut gone = releases(&outs);
    gone.sort();
    assert_eq!(gone.len(), 3, "{gone:?}");
    assert!(gone.contains(&sibling.relay()) && gone.contains(&plain.relay()));
    let resp = try_allocate(&mut h, 6, 41005, "call.p_other.r6");
    assert_eq!(error_code(&resp), Some(401));
}

#[test]
fn a_full_table_forgets_the_revocation_that_ends_first_and_counts_it() {
    let mut h = Harness::with(|c| c.max_revoked_groups = 2);
    h.revoke(h.t0, "g1", WALL_SECS + 100);
    h.revoke(h.t0, "g2", WALL_SECS + 200);
    h.revoke(h.t0, "g3", WALL_SECS + 300);
    assert_eq!(h.server.revoked_groups(), 2);
    assert_eq!(h.stats().revocations_evicted, 1);
    h.allocated_as(h.at(1), 41000, creds("g1.x"));
    for (port, user) in [(41001, "g2.x"), (41002, "g3.x")] {
        let resp = try_allocate(&mut h, 1, port, user);
        assert_eq!(error_code(&resp), Some(401), "{user}");
    }
    // Entries that are over make room before anything is evicted.
    h.revoke(h.at(250), "g4", WALL_SECS + 400);
    assert_eq!(h.stats().revocations_evicted, 1);
    assert_eq!(h.server.revoked_groups(), 2);
}

#[test]
fn revocation_fires_even_while_allocations_have_pending_timers() {
    // The allocation's timer entry stays in the heap; firing later must not touch anything.
    let mut h = Harness::new();
    let a = h.allocated_as(h.t0, 41000, creds("gA.one"));
    h.channel_bind(h.t0, &a, 0x4000, PEER_A);
    h.revoke(h.at(1), "gA", EXPIRY);
    let b = h.allocated_as(h.at(2), 41001, creds("gB.one"));
    // b reuses a's slot under a new generation: a's timers (permission, channel, lifetime)
    // find nothing, b's lifetime ends at 602.
    assert!(releases(&h.timeout(h.at(601))).is_empty());
    let outs = h.timeout(h.at(602));
    assert_eq!(releases(&outs), vec![b.relay()], "only b's own expiry");
    assert_eq!(h.stats().deleted[DeleteReason::Expired.index()], 1);
    assert_eq!(h.stats().deleted[DeleteReason::Revoked.index()], 1);
}
