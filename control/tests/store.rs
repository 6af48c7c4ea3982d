//! The store contract: the same tests run on [`MemoryStore`] and on [`RedisStore`] against a
//! real `redis-server` (one per test, on its own port), plus Redis-only failure tests.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use control::store::{
    Admission, App, Call, CallState, Cursor, Digest, Media, MemoryStore, Millis, Participant,
    Quality, Reconnecting, RedisStore, Role, Store, StoreError, StoreMetrics, TokenGrant,
};
use serde_json::json;
use tokio::sync::Barrier;

use common::redis::RedisServer;

/// Mirrors the backends' `HISTORY_MS` (7 days).
const HISTORY_MS: u64 = 7 * 24 * 60 * 60 * 1000;

/// A bound on anything that must not hang: generous, so a slow machine never fails a test, but
/// far below "forever" (which is what a hang would be).
const NO_HANG: Duration = Duration::from_secs(60);

type S = Arc<dyn Store>;

/// Times near the real clock: Redis expires keys by its own clock, so a test's "now" must be
/// close to it (the contract itself only ever compares the times it is given).
fn base() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as Millis
}

fn digest(n: u32) -> Digest {
    let mut d = [0u8; 32];
    d[..4].copy_from_slice(&n.to_be_bytes());
    d[31] = 0xa5;
    Digest(d)
}

fn app(id: &str, name: &str, from_config: bool) -> App {
    App {
        id: id.to_owned(),
        name: name.to_owned(),
        disabled: false,
        from_config,
        created_at: 1_700_000_000_000,
    }
}

fn call(id: &str, app_id: &str, created_at: Millis, ttl: Millis, max: u32) -> Call {
    Call {
        id: id.to_owned(),
        app_id: app_id.to_owned(),
        name: Some(format!("call {id}")),
        max_participants: max,
        metadata: Some(json!({"room": id, "n": [1, 2.5, -3], "empty": [], "obj": {}})),
        created_at,
        expires_at: created_at + ttl,
        ended_at: None,
        end_reason: None,
        cred_group: format!("g{id}"),
        participants: Vec::new(),
    }
}

fn participant(peer: &str, now: Millis) -> Participant {
    Participant {
        peer_id: peer.to_owned(),
        role: Role::Guest,
        name: format!("name of {peer}"),
        user_id: None,
        joined_at: now,
        left_at: None,
        media: Media::default(),
        jti: format!("j_{peer}"),
        kicked: false,
        quality: None,
        // Connected, as most tests want: their seat is held until they leave.
        connected: true,
        seat_until: None,
    }
}

/// A quality summary whose floats do not survive rounding to 14 digits (Lua's `cjson`): the
/// store must give them back exactly. Fifteen significant digits, which `serde_json`'s default
/// (not `float_roundtrip`) parser reads back exactly; seventeen could come back one ulp off.
fn quality(n: u64, now: Millis) -> Quality {
    Quality {
        rtt_ms: 12.345_678_901_234_5,
        jitter_ms: 0.1,
        packet_loss: 0.333_333_333_333_333,
        bitrate_kbps: (n % 2 == 0).then_some(1_234.567_890_123_45),
        mos: 4.123_456_789_012_34,
        candidate_type: "relay".to_owned(),
        relay_protocol: "udp".to_owned(),
        reports: n,
        updated_at: now,
    }
}

fn grant(call_id: &str, expires_at: Millis) -> TokenGrant {
    TokenGrant {
        call_id: call_id.to_owned(),
        role: Role::Host,
        name: Some("Host".to_owned()),
        user_id: Some("user-1".to_owned()),
        expires_at,
    }
}

// ---------------------------------------------------------------------------------------------
// The contract, generic over the backend.

async fn apps(s: S) {
    let a = app("app_a", "A", false);
    assert!(s.put_app(&a, &[digest(1)]).await.unwrap());
    assert!(
        !s.put_app(&app("app_a", "other", false), &[digest(9)])
            .await
            .unwrap(),
        "a second put of the same id must not replace it"
    );
    assert_eq!(s.get_app("app_a").await.unwrap(), Some(a.clone()));
    assert_eq!(s.app_for_key(digest(9)).await.unwrap(), None);
    assert_eq!(s.app_for_key(digest(1)).await.unwrap(), Some(a.clone()));
    assert_eq!(s.get_app("app_missing").await.unwrap(), None);
    assert_eq!(s.app_for_key(digest(2)).await.unwrap(), None);

    let b = app("app_0b", "B", false);
    assert!(s.put_app(&b, &[]).await.unwrap());
    assert_eq!(s.list_apps().await.unwrap(), vec![b.clone(), a.clone()]);

    // Keys.
    assert!(s.add_app_key("app_a", digest(2)).await.unwrap());
    assert_eq!(s.app_for_key(digest(2)).await.unwrap(), Some(a.clone()));
    assert_eq!(s.app_for_key(digest(1)).await.unwrap(), Some(a.clone()));
    assert!(!s.add_app_key("app_missing", digest(3)).await.unwrap());
    assert_eq!(s.app_for_key(digest(3)).await.unwrap(), None);

    // Disabled: still found by key (the caller refuses it).
    assert!(s.set_app_disabled("app_a", true).await.unwrap());
    let disabled = App {
        disabled: true,
        ..a.clone()
    };
    assert_eq!(s.get_app("app_a").await.unwrap(), Some(disabled.clone()));
    assert_eq!(s.app_for_key(digest(1)).await.unwrap(), Some(disabled));
    assert!(s.set_app_disabled("app_a", false).await.unwrap());
    assert_eq!(s.get_app("app_a").await.unwrap(), Some(a.clone()));
    assert!(!s.set_app_disabled("app_missing", true).await.unwrap());
    assert_eq!(s.get_app("app_missing").await.unwrap(), None);

    // Config apps replace, keys included.
    let c = app("dev", "Development", true);
    assert!(s.put_app(&c, &[digest(10), digest(11)]).await.unwrap());
    assert_eq!(s.app_for_key(digest(10)).await.unwrap(), Some(c.clone()));
    let c2 = App {
        name: "Renamed".to_owned(),
        ..c.clone()
    };
    assert!(s.put_app(&c2, &[digest(11), digest(12)]).await.unwrap());
    assert_eq!(s.get_app("dev").await.unwrap(), Some(c2.clone()));
    assert_eq!(
        s.app_for_key(digest(10)).await.unwrap(),
        None,
        "dropped key"
    );
    assert_eq!(s.app_for_key(digest(11)).await.unwrap(), Some(c2.clone()));
    assert_eq!(s.app_for_key(digest(12)).await.unwrap(), Some(c2.clone()));
    // A config app also replaces one created through the API with the same id.
    let a_conf = App {
        name: "A from config".to_owned(),
        from_config: true,
        ..a.clone()
    };
    assert!(s.put_app(&a_conf, &[digest(20)]).await.unwrap());
    assert_eq!(s.get_app("app_a").await.unwrap(), Some(a_conf.clone()));
    assert_eq!(s.app_for_key(digest(1)).await.unwrap(), None);
    assert_eq!(s.app_for_key(digest(2)).await.unwrap(), None);
    assert_eq!(
        s.app_for_key(digest(20)).await.unwrap(),
        Some(a_conf.clone())
    );
    assert_eq!(s.list_apps().await.unwrap(), vec![b, a_conf, c2]);
}

async fn calls(s: S) {
    let t = base();
    let c = call("c_one", "app_a", t, 3_600_000, 4);
    s.create_call(&c, digest(100)).await.unwrap();
    assert_eq!(s.get_call("c_one").await.unwrap(), Some(c.clone()));
    assert_eq!(c.state(t), CallState::Waiting);
    assert_eq!(s.get_call("c_missing").await.unwrap(), None);

    // The code opens the call while it is live.
    assert_eq!(
        s.call_for_code(digest(100), t + 1).await.unwrap(),
        Some("c_one".to_owned())
    );
    assert_eq!(s.call_for_code(digest(101), t + 1).await.unwrap(), None);
    // Expiry is by `now`.
    assert_eq!(
        s.call_for_code(digest(100), c.expires_at - 1)
            .await
            .unwrap(),
        Some("c_one".to_owned())
    );
    assert_eq!(
        s.call_for_code(digest(100), c.expires_at).await.unwrap(),
        None
    );
    // Asking about a later time changed nothing for an earlier one.
    assert_eq!(
        s.call_for_code(digest(100), t + 2).await.unwrap(),
        Some("c_one".to_owned())
    );
    // Still readable as history after expiry.
    let got = s.get_call("c_one").await.unwrap().unwrap();
    assert_eq!(got.state(c.expires_at), CallState::Ended);
}

async fn end_call(s: S) {
    let t = base();
    let c = call("c_end", "app_a", t, 3_600_000, 4);
    s.create_call(&c, digest(200)).await.unwrap();
    s.create_call(&call("c_other", "app_a", t, 3_600_000, 4), digest(201))
        .await
        .unwrap();
    assert_eq!(s.live_calls(t + 1).await.unwrap(), 2);

    let ended = s.end_call("c_end", "api", t + 10).await.unwrap().unwrap();
    assert_eq!(ended.ended_at, Some(t + 10));
    assert_eq!(ended.end_reason.as_deref(), Some("api"));
    assert_eq!(ended.state(t + 10), CallState::Ended);
    assert_eq!(
        Call {
            ended_at: None,
            end_reason: None,
            ..ended.clone()
        },
        c,
        "nothing else changes"
    );
    assert_eq!(s.get_call("c_end").await.unwrap(), Some(ended.clone()));
    assert_eq!(s.call_for_code(digest(200), t + 11).await.unwrap(), None);
    assert_eq!(
        s.call_for_code(digest(201), t + 11).await.unwrap(),
        Some("c_other".to_owned())
    );
    assert_eq!(s.live_calls(t + 11).await.unwrap(), 1);

    // Ending again changes nothing.
    let again = s.end_call("c_end", "other", t + 20).await.unwrap().unwrap();
    assert_eq!(again, ended);
    assert_eq!(s.get_call("c_end").await.unwrap(), Some(ended));
    assert_eq!(s.end_call("c_missing", "api", t + 20).await.unwrap(), None);
    let p = participant("p_late", t + 21);
    assert_eq!(s.admit("c_end", &p, t + 21).await.unwrap(), Admission::Gone);

    // An expired call ended by time stays as it was.
    let expired = s
        .end_call("c_other", "api", t + 3_600_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(expired.ended_at, None);
    assert_eq!(expired.state(t + 3_600_000), CallState::Ended);
}

async fn list_calls(s: S) {
    let t = base();
    // 25 calls of app A, created two per millisecond (ties on created_at), 3 of app B.
    let mut all = Vec::new();
    for i in 0..25u64 {
        let c = call(&format!("c_a{i:02}"), "app_a", t + i / 2, 3_600_000, 4);
        s.create_call(&c, digest(300 + i as u32)).await.unwrap();
        all.push(c);
    }
    for i in 0..3u64 {
        let c = call(&format!("c_b{i}"), "app_b", t + i, 3_600_000, 4);
        s.create_call(&c, digest(400 + i as u32)).await.unwrap();
    }
    // Newest first, ties by id descending.
    all.sort_by(|x, y| (y.created_at, &y.id).cmp(&(x.created_at, &x.id)));
    let now = t + 100;

    let pages = collect_pages(&s, "app_a", None, 10, now).await;
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![10, 10, 5]
    );
    let listed: Vec<Call> = pages.concat();
    assert_eq!(listed, all);
    let whole = s.list_calls("app_a", None, 100, None, now).await.unwrap();
    assert_eq!(whole.calls, all);
    assert_eq!(whole.next, None);
    // Exactly a page: no cursor to an empty page.
    let exact = s.list_calls("app_b", None, 3, None, now).await.unwrap();
    assert_eq!(exact.calls.len(), 3);
    assert_eq!(exact.next, None);
    assert_eq!(
        s.list_calls("app_none", None, 10, None, now).await.unwrap(),
        control::store::Page {
            calls: Vec::new(),
            next: None
        }
    );

    // States: end three, admit into two (active), the rest waiting.
    for c in &all[..3] {
        s.end_call(&c.id, "api", now).await.unwrap().unwrap();
    }
    for c in &all[10..12] {
        let p = participant("p_x", now);
        assert!(matches!(
            s.admit(&c.id, &p, now).await.unwrap(),
            Admission::Admitted(_)
        ));
    }
    let ids = |v: Vec<Vec<Call>>| v.concat().into_iter().map(|c| c.id).collect::<Vec<_>>();
    let ended = ids(collect_pages(&s, "app_a", Some(CallState::Ended), 2, now + 1).await);
    assert_eq!(
        ended,
        all[..3].iter().map(|c| c.id.clone()).collect::<Vec<_>>()
    );
    let active = ids(collect_pages(&s, "app_a", Some(CallState::Active), 1, now + 1).await);
    assert_eq!(
        active,
        all[10..12].iter().map(|c| c.id.clone()).collect::<Vec<_>>()
    );
    let waiting = ids(collect_pages(&s, "app_a", Some(CallState::Waiting), 7, now + 1).await);
    assert_eq!(waiting.len(), 20);
    assert!(waiting
        .iter()
        .all(|id| !ended.contains(id) && !active.contains(id)));
    // Once they expire, all are ended.
    let later = t + 3_600_000 + 100;
    let ended = collect_pages(&s, "app_a", Some(CallState::Ended), 10, later).await;
    assert_eq!(ended.concat().len(), 25);
    // And once out of history, none is listed.
    let gone = s
        .list_calls("app_a", None, 10, None, later + HISTORY_MS)
        .await
        .unwrap();
    assert_eq!(gone.calls, Vec::new());
    assert_eq!(gone.next, None);

    // A cursor whose call is gone still places the page.
    let cursor = Cursor {
        created_at: all[4].created_at,
        id: format!("{}~", all[4].id),
    };
    let page = s
        .list_calls("app_a", None, 2, Some(&cursor), now + 1)
        .await
        .unwrap();
    assert_eq!(
        page.calls.iter().map(|c| &c.id).collect::<Vec<_>>(),
        vec![&all[4].id, &all[5].id]
    );
}

/// Pages through an app's calls; fails on a loop or an empty page with a cursor.
async fn collect_pages(
    s: &S,
    app_id: &str,
    state: Option<CallState>,
    limit: usize,
    now: Millis,
) -> Vec<Vec<Call>> {
    let mut pages = Vec::new();
    let mut after: Option<Cursor> = None;
    loop {
        let page = s
            .list_calls(app_id, state, limit, after.as_ref(), now)
            .await
            .unwrap();
        assert!(page.calls.len() <= limit);
        assert!(pages.len() < 1_000, "pagination does not end");
        let next = page.next.clone();
        if let Some(next) = &next {
            assert!(!page.calls.is_empty(), "an empty page with a cursor");
            let last = page.calls.last().unwrap();
            assert_eq!(
                next,
                &Cursor {
                    created_at: last.created_at,
                    id: last.id.clone()
                }
            );
        }
        pages.push(page.calls);
        match next {
            Some(c) => after = Some(c),
            None => return pages,
        }
    }
}

async fn tokens(s: S) {
    let t = base();
    let g = grant("c_tok", t + 60_000);
    s.put_token(digest(500), &g).await.unwrap();
    assert_eq!(s.redeem_token(digest(501), t).await.unwrap(), None);
    assert_eq!(s.redeem_token(digest(500), t).await.unwrap(), Some(g));
    assert_eq!(s.redeem_token(digest(500), t).await.unwrap(), None, "once");

    // Expired: refused like an unknown one, even before any sweep.
    let g = grant("c_tok", t + 60_000);
    s.put_token(digest(502), &g).await.unwrap();
    assert_eq!(s.redeem_token(digest(502), t + 60_000).await.unwrap(), None);
    s.put_token(digest(503), &g).await.unwrap();
    assert_eq!(
        s.redeem_token(digest(503), t + 59_999).await.unwrap(),
        Some(g)
    );
}

async fn admit_race(s: S) {
    let t = base();
    s.create_call(&call("c_race", "app_a", t, 3_600_000, 5), digest(600))
        .await
        .unwrap();
    let barrier = Arc::new(Barrier::new(20));
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let s = s.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let p = participant(&format!("p_{i}"), t + 1);
                barrier.wait().await;
                s.admit("c_race", &p, t + 1).await.unwrap()
            })
        })
        .collect();
    let mut admitted = 0;
    let mut full = 0;
    for task in tasks {
        match task.await.unwrap() {
            Admission::Admitted(c) => {
                admitted += 1;
                assert!(c.present(t) <= 5);
            }
            Admission::Full => full += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((admitted, full), (5, 15));
    let c = s.get_call("c_race").await.unwrap().unwrap();
    assert_eq!(c.participants.len(), 5);
    let peers: HashSet<_> = c.participants.iter().map(|p| &p.peer_id).collect();
    assert_eq!(peers.len(), 5);
    assert_eq!(c.state(t + 1), CallState::Active);
}

/// A participant let go by a stopping node holds the seat only until its resume deadline,
/// unless it authenticates again before; one who left or was kicked is not changed.
async fn disconnected_seats(s: S) {
    let t = base();
    let mut c = call("c_drop", "app_a", t, 3_600_000, 2);
    let mut kicked = participant("p_k", t);
    kicked.kicked = true;
    kicked.left_at = Some(t);
    c.participants.push(participant("p_a", t));
    c.participants.push(participant("p_b", t));
    c.participants.push(kicked.clone());
    s.create_call(&c, digest(791)).await.unwrap();
    let until = t + 30_000;
    assert!(s.mark_disconnected("c_drop", "p_a", until).await.unwrap());
    assert!(s.mark_disconnected("c_drop", "p_b", until).await.unwrap());
    assert!(s.mark_disconnected("c_drop", "p_k", until).await.unwrap());
    assert!(!s.mark_disconnected("c_drop", "p_x", until).await.unwrap());
    assert!(!s.mark_disconnected("c_x", "p_a", until).await.unwrap());
    let got = s.get_call("c_drop").await.unwrap().unwrap();
    assert_eq!(
        got.participant("p_k"),
        Some(&kicked),
        "a kicked one is left alone"
    );
    // Until the deadline both seats are held: the call is full.
    assert_eq!(
        s.admit("c_drop", &participant("p_c", t + 1), t + 1)
            .await
            .unwrap(),
        Admission::Full
    );
    // p_a comes back (another node, or this one restarted) before the deadline: held again,
    // for good.
    let back = s
        .mark_connected("c_drop", "p_a", until - 1)
        .await
        .unwrap()
        .unwrap();
    assert!(back.connected);
    // p_b never does: past the deadline its seat is free for someone else, p_a's is not.
    let Admission::Admitted(after) = s
        .admit("c_drop", &participant("p_c", until), until)
        .await
        .unwrap()
    else {
        panic!("p_b's seat should be free");
    };
    assert_eq!(after.present(until), 2);
    assert!(!after.participant("p_b").unwrap().connected);
}

/// A guest looping join and leave cannot grow a call's participant records without end: after
/// `JOINS_PER_SEAT` per seat, a join is refused even with the seat free.
async fn join_limit(s: S) {
    let t = base();
    s.create_call(&call("c_loop", "app_a", t, 3_600_000, 1), digest(790))
        .await
        .unwrap();
    let limit = control::store::JOINS_PER_SEAT;
    for i in 0..limit {
        let p = participant(&format!("p_{i}"), t + i);
        let Admission::Admitted(_) = s.admit("c_loop", &p, t + i).await.unwrap() else {
            panic!("join {i} refused");
        };
        assert!(s.set_left("c_loop", &p.peer_id, Some(t + i)).await.unwrap());
    }
    // The one seat is free, but the call has admitted all it can.
    let next = participant("p_next", t + limit);
    assert_eq!(
        s.admit("c_loop", &next, t + limit).await.unwrap(),
        Admission::JoinLimit
    );
    let c = s.get_call("c_loop").await.unwrap().unwrap();
    assert_eq!(c.participants.len() as u64, limit);
    assert_eq!(c.present(t + limit), 0);
}

async fn admit_rules(s: S) {
    let t = base();
    // Participants who left free their seat.
    let mut c = call("c_seats", "app_a", t, 3_600_000, 2);
    let mut gone = participant("p_left", t);
    gone.left_at = Some(t + 1);
    c.participants.push(gone);
    s.create_call(&c, digest(700)).await.unwrap();
    assert_eq!(s.get_call("c_seats").await.unwrap(), Some(c.clone()));
    let p1 = participant("p_1", t + 2);
    let Admission::Admitted(after) = s.admit("c_seats", &p1, t + 2).await.unwrap() else {
        panic!("not admitted");
    };
    assert_eq!(after.participants.len(), 2);
    assert_eq!(after.participants[1], p1);
    let p2 = participant("p_2", t + 3);
    let Admission::Admitted(after) = s.admit("c_seats", &p2, t + 3).await.unwrap() else {
        panic!("not admitted");
    };
    assert_eq!(after.present(t), 2);
    assert_eq!(
        s.admit("c_seats", &participant("p_3", t + 4), t + 4)
            .await
            .unwrap(),
        Admission::Full
    );
    assert_eq!(s.get_call("c_seats").await.unwrap(), Some(after));

    // Unknown and expired calls are gone.
    let p = participant("p_9", t);
    assert_eq!(s.admit("c_missing", &p, t).await.unwrap(), Admission::Gone);
    s.create_call(&call("c_short", "app_a", t, 1_000, 2), digest(701))
        .await
        .unwrap();
    assert!(matches!(
        s.admit("c_short", &p, t + 999).await.unwrap(),
        Admission::Admitted(_)
    ));
    assert_eq!(
        s.admit("c_short", &p, t + 1_000).await.unwrap(),
        Admission::Gone
    );
}

async fn redeem_race(s: S) {
    let t = base();
    s.put_token(digest(800), &grant("c_x", t + 60_000))
        .await
        .unwrap();
    let barrier = Arc::new(Barrier::new(10));
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let s = s.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                s.redeem_token(digest(800), t + 1).await.unwrap()
            })
        })
        .collect();
    let mut grants = 0;
    for task in tasks {
        if task.await.unwrap().is_some() {
            grants += 1;
        }
    }
    assert_eq!(grants, 1);
}

/// A token is used up by the admission it grants, and only by it: looking does not use it, a
/// full call leaves it usable, and once it admitted someone it admits nobody else.
async fn token_admission(s: S) {
    let t = base();
    s.create_call(&call("c_ta", "app_a", t, 3_600_000, 1), digest(900))
        .await
        .unwrap();
    let g = grant("c_ta", t + 60_000);
    s.put_token(digest(901), &g).await.unwrap();
    assert_eq!(s.peek_token(digest(902), t).await.unwrap(), None);
    assert_eq!(s.peek_token(digest(901), t).await.unwrap(), Some(g.clone()));
    assert_eq!(
        s.peek_token(digest(901), t).await.unwrap(),
        Some(g.clone()),
        "looking again"
    );

    // The only seat taken: full, twice, and the token is untouched.
    let Admission::Admitted(_) = s.admit("c_ta", &participant("p_a", t), t).await.unwrap() else {
        panic!("not admitted");
    };
    for n in 0..2 {
        let p = participant("p_tok", t + 1);
        assert_eq!(
            s.admit_with_token(digest(901), "c_ta", &p, t + 1)
                .await
                .unwrap(),
            Admission::Full,
            "{n}"
        );
        assert_eq!(
            s.peek_token(digest(901), t + 1).await.unwrap(),
            Some(g.clone())
        );
    }
    assert_eq!(
        s.get_call("c_ta")
            .await
            .unwrap()
            .unwrap()
            .participants
            .len(),
        1
    );

    // The seat frees up: admitted, and the token is used up.
    s.set_left("c_ta", "p_a", Some(t + 2)).await.unwrap();
    let p = participant("p_tok", t + 3);
    let Admission::Admitted(after) = s
        .admit_with_token(digest(901), "c_ta", &p, t + 3)
        .await
        .unwrap()
    else {
        panic!("not admitted");
    };
    assert_eq!(after.participants[1], p);
    assert_eq!(s.peek_token(digest(901), t + 3).await.unwrap(), None);
    // Used: gone, even with a seat free again.
    s.set_left("c_ta", "p_tok", Some(t + 4)).await.unwrap();
    assert_eq!(
        s.admit_with_token(digest(901), "c_ta", &participant("p_again", t + 5), t + 5)
            .await
            .unwrap(),
        Admission::Gone
    );
    assert_eq!(
        s.get_call("c_ta")
            .await
            .unwrap()
            .unwrap()
            .participants
            .len(),
        2
    );

    // An ended call: gone, whatever the token.
    s.put_token(digest(903), &grant("c_ta", t + 60_000))
        .await
        .unwrap();
    s.end_call("c_ta", "api", t + 6).await.unwrap();
    assert_eq!(
        s.admit_with_token(digest(903), "c_ta", &participant("p_end", t + 7), t + 7)
            .await
            .unwrap(),
        Admission::Gone
    );
    // Expired (checked last: the memory store forgets what expired, and time only goes on).
    s.put_token(digest(904), &grant("c_ta", t + 60_000))
        .await
        .unwrap();
    assert_eq!(
        s.peek_token(digest(904), t + 60_000).await.unwrap(),
        None,
        "expired"
    );
}

/// Many uses of one token at once, with seats for all: exactly one is admitted.
async fn token_admission_race(s: S) {
    let t = base();
    s.create_call(&call("c_tr", "app_a", t, 3_600_000, 32), digest(910))
        .await
        .unwrap();
    s.put_token(digest(911), &grant("c_tr", t + 60_000))
        .await
        .unwrap();
    let barrier = Arc::new(Barrier::new(10));
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let s = s.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                // Each has looked at the token before any of them uses it.
                assert!(s.peek_token(digest(911), t + 1).await.unwrap().is_some());
                barrier.wait().await;
                let p = participant(&format!("p_{i}"), t + 1);
                s.admit_with_token(digest(911), "c_tr", &p, t + 1)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut admitted = 0;
    for task in tasks {
        match task.await.unwrap() {
            Admission::Admitted(_) => admitted += 1,
            Admission::Gone => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(admitted, 1);
    let c = s.get_call("c_tr").await.unwrap().unwrap();
    assert_eq!(c.participants.len(), 1);
}

async fn hits(s: S) {
    let t = base();
    assert_eq!(s.hit("join:a", 60_000, t).await.unwrap(), (1, 60_000));
    assert_eq!(s.hit("join:a", 60_000, t + 10).await.unwrap(), (2, 59_990));
    assert_eq!(s.hit("join:b", 60_000, t + 10).await.unwrap(), (1, 60_000));
    assert_eq!(s.hit("join:a", 60_000, t + 59_999).await.unwrap(), (3, 1));
    // The window started at the first hit; the next one starts a new window.
    assert_eq!(
        s.hit("join:a", 60_000, t + 60_000).await.unwrap(),
        (1, 60_000)
    );
    assert_eq!(
        s.hit("join:a", 60_000, t + 60_001).await.unwrap(),
        (2, 59_999)
    );

    // A zero window ends at once: every hit starts a new one.
    assert_eq!(s.hit("zero", 0, t).await.unwrap(), (1, 0));
    assert_eq!(s.hit("zero", 0, t).await.unwrap(), (1, 0));

    // Concurrent hits are all counted.
    let barrier = Arc::new(Barrier::new(30));
    let tasks: Vec<_> = (0..30)
        .map(|_| {
            let s = s.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                s.hit("create:x", 60_000, t).await.unwrap().0
            })
        })
        .collect();
    let mut counts = Vec::new();
    for task in tasks {
        counts.push(task.await.unwrap());
    }
    counts.sort_unstable();
    assert_eq!(counts, (1..=30).collect::<Vec<u64>>());
}

async fn peeks(s: S) {
    let t = base();
    // Nothing counted yet: no window.
    assert_eq!(s.peek("fail:a", t).await.unwrap(), (0, 0));
    s.hit("fail:a", 60_000, t).await.unwrap();
    s.hit("fail:a", 60_000, t + 5).await.unwrap();
    // A peek counts nothing: the same answer twice, then the next hit is the third.
    assert_eq!(s.peek("fail:a", t + 10).await.unwrap(), (2, 59_990));
    assert_eq!(s.peek("fail:a", t + 10).await.unwrap(), (2, 59_990));
    assert_eq!(s.hit("fail:a", 60_000, t + 10).await.unwrap(), (3, 59_990));
    assert_eq!(s.peek("fail:a", t + 59_999).await.unwrap(), (3, 1));
    // Other keys are apart.
    assert_eq!(s.peek("fail:b", t + 10).await.unwrap(), (0, 0));
    // Once the window has ended (even before Redis drops the key), nothing is counted, and
    // the next hit opens a new window.
    assert_eq!(s.peek("fail:a", t + 60_000).await.unwrap(), (0, 0));
    assert_eq!(
        s.hit("fail:a", 60_000, t + 60_000).await.unwrap(),
        (1, 60_000)
    );
    assert_eq!(s.peek("fail:a", t + 60_000).await.unwrap(), (1, 60_000));
}

async fn live_calls(s: S) {
    let t = base();
    assert_eq!(s.live_calls(t).await.unwrap(), 0);
    s.create_call(&call("c_l1", "app_a", t, 10_000, 2), digest(900))
        .await
        .unwrap();
    s.create_call(&call("c_l2", "app_b", t, 20_000, 2), digest(901))
        .await
        .unwrap();
    s.create_call(&call("c_l3", "app_a", t, 3_600_000, 2), digest(902))
        .await
        .unwrap();
    assert_eq!(s.live_calls(t).await.unwrap(), 3);
    s.end_call("c_l3", "api", t + 1).await.unwrap().unwrap();
    assert_eq!(s.live_calls(t + 1).await.unwrap(), 2);
    assert_eq!(s.live_calls(t + 9_999).await.unwrap(), 2);
    assert_eq!(s.live_calls(t + 10_000).await.unwrap(), 1);
    assert_eq!(s.live_calls(t + 20_000).await.unwrap(), 0);
}

/// What an attacker types into names and ids comes back byte for byte.
async fn hostile_strings(s: S) {
    let t = base();
    let nasty = "%s%n %x {c:x} }{ \r\n\t\"quoted\" 'single' \\back\\ \u{0} 😀 ü \u{202e}rtl";
    let mut a = app("app_nasty", nasty, false);
    a.name = nasty.to_owned();
    assert!(s.put_app(&a, &[digest(1000)]).await.unwrap());
    assert_eq!(s.get_app("app_nasty").await.unwrap(), Some(a.clone()));
    assert_eq!(s.app_for_key(digest(1000)).await.unwrap(), Some(a));

    let id = format!("c_{nasty}");
    let mut c = call(&id, "app_nasty", t, 3_600_000, 4);
    c.name = Some(nasty.to_owned());
    c.metadata = Some(json!({
        nasty: nasty,
        "big": u64::MAX,
        "neg": i64::MIN,
        "float": 0.1_f64,
        "precise": 1.234_567_890_123_456_7_f64,
        "empty_array": [],
        "empty_object": {},
        "nested": [[], {}, null, true, "ended_at\":null,"],
    }));
    s.create_call(&c, digest(1001)).await.unwrap();
    assert_eq!(s.get_call(&id).await.unwrap(), Some(c.clone()));
    let mut p = participant(nasty, t + 1);
    p.name = nasty.to_owned();
    p.user_id = Some(nasty.to_owned());
    let Admission::Admitted(after) = s.admit(&id, &p, t + 1).await.unwrap() else {
        panic!("not admitted");
    };
    assert_eq!(after.participants, vec![p.clone()]);
    assert_eq!(after.metadata, c.metadata);
    // Participant changes find the peer by its id, byte for byte, and keep everything else.
    let media = Media {
        audio: true,
        video: true,
        screen: true,
    };
    assert!(s.set_media(&id, nasty, media).await.unwrap());
    let mut q = quality(1, t + 1);
    q.candidate_type = nasty.to_owned();
    assert!(s.set_quality(&id, nasty, &q).await.unwrap());
    assert!(!s.set_media(&id, &nasty[1..], media).await.unwrap());
    assert!(!s.set_media(&id, "p:1", media).await.unwrap());
    assert!(!s.set_media(&id, "1", media).await.unwrap());
    let after = s.get_call(&id).await.unwrap().unwrap();
    let p = Participant {
        media,
        quality: Some(q),
        ..p
    };
    assert_eq!(after.participants, vec![p]);
    assert_eq!(after.metadata, c.metadata);
    let page = s
        .list_calls("app_nasty", None, 10, None, t + 2)
        .await
        .unwrap();
    assert_eq!(page.calls, vec![after.clone()]);
    let ended = s.end_call(&id, nasty, t + 3).await.unwrap().unwrap();
    assert_eq!(ended.end_reason.as_deref(), Some(nasty));
    assert_eq!(s.get_call(&id).await.unwrap(), Some(ended));

    let mut g = grant(&id, t + 60_000);
    g.name = Some(nasty.to_owned());
    g.user_id = Some(nasty.to_owned());
    s.put_token(digest(1002), &g).await.unwrap();
    assert_eq!(s.redeem_token(digest(1002), t).await.unwrap(), Some(g));

    assert_eq!(s.hit(nasty, 1_000, t).await.unwrap(), (1, 1_000));
    // Ids that look like other keys find nothing and break nothing.
    for probe in [
        "",
        "}",
        "{c:c_x}",
        "x}:call",
        "keys:app_nasty",
        "*",
        "\r\nPING",
    ] {
        assert_eq!(s.get_call(probe).await.unwrap(), None);
        assert_eq!(s.get_app(probe).await.unwrap(), None);
        assert_eq!(s.end_call(probe, "api", t).await.unwrap(), None);
        assert_eq!(
            s.admit(probe, &participant("p", t), t).await.unwrap(),
            Admission::Gone
        );
        assert!(!s.set_app_disabled(probe, true).await.unwrap());
        assert!(!s.add_app_key(probe, digest(1003)).await.unwrap());
        assert!(!s.set_media(probe, probe, Media::default()).await.unwrap());
        assert!(!s.set_media(&id, probe, Media::default()).await.unwrap());
        assert_eq!(s.kick(probe, probe, t).await.unwrap(), None);
        assert_eq!(s.kick(&id, probe, t).await.unwrap(), None);
    }
}

async fn ping(s: S) {
    s.ping().await.unwrap();
}

/// `set_left`, `set_media`, `set_quality` and `kick`: each changes its fields only, on known
/// calls and peers only, and seats follow.
async fn participant_updates(s: S) {
    let t = base();
    s.create_call(&call("c_pu", "app_a", t, 3_600_000, 2), digest(1100))
        .await
        .unwrap();
    let a = participant("p_a", t);
    let b = participant("p_b", t);
    for p in [&a, &b] {
        assert!(matches!(
            s.admit("c_pu", p, t).await.unwrap(),
            Admission::Admitted(_)
        ));
    }
    let get = |id: &'static str| {
        let s = s.clone();
        async move { s.get_call(id).await.unwrap().unwrap() }
    };

    // Media.
    let media = Media {
        audio: true,
        video: false,
        screen: true,
    };
    assert!(s.set_media("c_pu", "p_a", media).await.unwrap());
    let mut want_a = Participant { media, ..a.clone() };
    assert_eq!(
        get("c_pu").await.participants,
        vec![want_a.clone(), b.clone()]
    );

    // Quality, floats exact.
    let q = quality(3, t + 5);
    assert!(s.set_quality("c_pu", "p_a", &q).await.unwrap());
    want_a.quality = Some(q.clone());
    assert_eq!(get("c_pu").await.participants[0], want_a);
    let q2 = quality(4, t + 6);
    assert!(s.set_quality("c_pu", "p_a", &q2).await.unwrap());
    want_a.quality = Some(q2);
    assert_eq!(get("c_pu").await.participants[0], want_a);

    // Leaving frees the seat; coming back (a resumed session) takes it again.
    assert!(s.set_left("c_pu", "p_b", Some(t + 10)).await.unwrap());
    let c = get("c_pu").await;
    assert_eq!(c.participants[1].left_at, Some(t + 10));
    assert_eq!(c.present(t), 1);
    assert!(s.set_left("c_pu", "p_b", None).await.unwrap());
    let c = get("c_pu").await;
    assert_eq!(c.participants[1], b);
    assert_eq!(c.present(t), 2);
    assert_eq!(
        s.admit("c_pu", &participant("p_c", t + 11), t + 11)
            .await
            .unwrap(),
        Admission::Full
    );

    // A kick: kicked, left now, everything else kept; the seat is free.
    let kicked = s.kick("c_pu", "p_a", t + 20).await.unwrap().unwrap();
    want_a.kicked = true;
    want_a.left_at = Some(t + 20);
    assert_eq!(kicked, want_a);
    assert_eq!(
        kicked.jti, "j_p_a",
        "the caller learns which token to refuse"
    );
    let c = get("c_pu").await;
    assert_eq!(c.participants[0], want_a);
    assert_eq!(c.present(t), 1);
    // Kicking again changes nothing, the kick's time included.
    assert_eq!(
        s.kick("c_pu", "p_a", t + 30).await.unwrap(),
        Some(want_a.clone())
    );
    // A kicked participant stays left at the kick's time, whatever signaling reports later.
    assert!(s.set_left("c_pu", "p_a", None).await.unwrap());
    assert!(s.set_left("c_pu", "p_a", Some(t + 40)).await.unwrap());
    assert_eq!(get("c_pu").await.participants[0], want_a);
    assert_eq!(get("c_pu").await.present(t), 1);
    // Its seat went to someone else.
    let c_p = participant("p_c", t + 41);
    let Admission::Admitted(after) = s.admit("c_pu", &c_p, t + 41).await.unwrap() else {
        panic!("the kicked participant's seat is not free");
    };
    assert_eq!(
        after.participants,
        vec![want_a.clone(), b.clone(), c_p.clone()]
    );
    assert_eq!(
        s.admit("c_pu", &participant("p_d", t + 42), t + 42)
            .await
            .unwrap(),
        Admission::Full
    );

    // Kicking someone who had left already keeps their leaving time.
    assert!(s.set_left("c_pu", "p_c", Some(t + 50)).await.unwrap());
    let k = s.kick("c_pu", "p_c", t + 60).await.unwrap().unwrap();
    assert!(k.kicked);
    assert_eq!(k.left_at, Some(t + 50));

    // Unknown call or peer: nothing happens, nothing is created.
    let before = get("c_pu").await;
    for (call_id, peer_id) in [("c_pu", "p_zz"), ("c_missing", "p_a"), ("c_missing", "")] {
        assert!(!s.set_left(call_id, peer_id, Some(t)).await.unwrap());
        assert!(!s.set_left(call_id, peer_id, None).await.unwrap());
        assert!(!s.set_media(call_id, peer_id, media).await.unwrap());
        assert!(!s.set_quality(call_id, peer_id, &q).await.unwrap());
        assert_eq!(s.kick(call_id, peer_id, t).await.unwrap(), None);
    }
    assert_eq!(get("c_pu").await, before);
    assert_eq!(s.get_call("c_missing").await.unwrap(), None);

    // Ended calls still take the last changes (signaling records the leaves), and the
    // listing shows what `get_call` shows.
    let ended = s.end_call("c_pu", "api", t + 70).await.unwrap().unwrap();
    assert!(s.set_left("c_pu", "p_b", Some(t + 71)).await.unwrap());
    let c = get("c_pu").await;
    assert_eq!(c.participants[1].left_at, Some(t + 71));
    assert_eq!(c.ended_at, ended.ended_at);
    let page = s.list_calls("app_a", None, 10, None, t + 72).await.unwrap();
    assert_eq!(page.calls, vec![c]);

    // Participants stored with the call at creation are found too.
    let mut pre = call("c_pre", "app_a", t, 3_600_000, 4);
    pre.participants = vec![participant("p_x", t), participant("p_y", t)];
    s.create_call(&pre, digest(1101)).await.unwrap();
    assert!(s.set_media("c_pre", "p_y", media).await.unwrap());
    let k = s.kick("c_pre", "p_x", t + 1).await.unwrap().unwrap();
    assert_eq!(k.left_at, Some(t + 1));
    let c = get("c_pre").await;
    assert!(c.participants[0].kicked);
    assert_eq!(c.participants[1].media, media);
    assert_eq!(c.present(t), 1);
}

/// Concurrent changes of one participant's different fields never lose one another.
async fn participant_races(s: S) {
    let t = base();
    s.create_call(&call("c_pr", "app_a", t, 3_600_000, 20), digest(1200))
        .await
        .unwrap();
    let rounds = 20usize;
    for i in 0..rounds {
        let peer = format!("p_{i}");
        assert!(matches!(
            s.admit("c_pr", &participant(&peer, t), t).await.unwrap(),
            Admission::Admitted(_)
        ));
    }
    let media = Media {
        audio: true,
        video: true,
        screen: false,
    };
    // Per participant: a set_media, a kick and a set_quality at once; and other participants'
    // changes at the same time.
    let barrier = Arc::new(Barrier::new(rounds * 3));
    let mut tasks = Vec::new();
    for i in 0..rounds {
        let peer = format!("p_{i}");
        for what in 0..3 {
            let (s, barrier, peer) = (s.clone(), barrier.clone(), peer.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                match what {
                    0 => assert!(s.set_media("c_pr", &peer, media).await.unwrap()),
                    1 => assert!(s.kick("c_pr", &peer, t + 5).await.unwrap().is_some()),
                    _ => assert!(s
                        .set_quality("c_pr", &peer, &quality(i as u64, t + 6))
                        .await
                        .unwrap()),
                }
            }));
        }
    }
    for task in tasks {
        tokio::time::timeout(NO_HANG, task)
            .await
            .expect("a participant change hangs")
            .unwrap();
    }
    let c = s.get_call("c_pr").await.unwrap().unwrap();
    assert_eq!(c.participants.len(), rounds);
    for (i, p) in c.participants.iter().enumerate() {
        let want = Participant {
            media,
            kicked: true,
            left_at: Some(t + 5),
            quality: Some(quality(i as u64, t + 6)),
            ..participant(&format!("p_{i}"), t)
        };
        assert_eq!(p, &want, "participant {i}");
    }
    assert_eq!(c.present(t), 0);

    // Many changes of one field race too: the last one written wins, and none is half-applied.
    let barrier = Arc::new(Barrier::new(10));
    let tasks: Vec<_> = (0..10u64)
        .map(|n| {
            let (s, barrier) = (s.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                s.set_quality("c_pr", "p_0", &quality(n, t + n))
                    .await
                    .unwrap()
            })
        })
        .collect();
    for task in tasks {
        assert!(task.await.unwrap());
    }
    let c = s.get_call("c_pr").await.unwrap().unwrap();
    let q = c.participants[0].quality.clone().unwrap();
    assert_eq!(q, quality(q.reports, t + q.reports));
    assert!(c.participants[0].kicked && c.participants[0].media == media);
}

/// A participant who never connected to signaling holds its seat only before `seat_until` (when
/// its join token can no longer authenticate); one who connected holds it until it leaves. Both
/// backends count seats alike (memory in Rust, Redis in the admission script).
async fn unconnected_seats_lapse(s: S) {
    let t = base();
    let until = t + 60_000;
    let unconnected = |peer: &str, now: Millis, seat_until: Millis| Participant {
        connected: false,
        seat_until: Some(seat_until),
        ..participant(peer, now)
    };
    s.create_call(&call("c_lapse", "app_a", t, 3_600_000, 2), digest(720))
        .await
        .unwrap();
    let a = unconnected("p_a", t, until);
    let b = unconnected("p_b", t + 1, until);
    assert!(matches!(
        s.admit("c_lapse", &a, t).await.unwrap(),
        Admission::Admitted(_)
    ));
    assert!(matches!(
        s.admit("c_lapse", &b, t + 1).await.unwrap(),
        Admission::Admitted(_)
    ));
    // Stored as given (Redis round-trips the new fields).
    let got = s.get_call("c_lapse").await.unwrap().unwrap();
    assert_eq!(got.participants, vec![a.clone(), b.clone()]);

    // b connects; a never does.
    let b_connected = Participant {
        connected: true,
        ..b.clone()
    };
    assert_eq!(
        s.mark_connected("c_lapse", "p_b", t + 2).await.unwrap(),
        Some(b_connected.clone())
    );
    assert_eq!(
        s.mark_connected("c_lapse", "p_x", t + 2).await.unwrap(),
        None
    );
    assert_eq!(s.mark_connected("c_x", "p_b", t + 2).await.unwrap(), None);

    // Before `seat_until` both seats are held.
    let c = unconnected("p_c", until - 1, until + 60_000);
    assert_eq!(
        s.admit("c_lapse", &c, until - 1).await.unwrap(),
        Admission::Full
    );
    let got = s.get_call("c_lapse").await.unwrap().unwrap();
    assert_eq!(got.present(until - 1), 2);
    assert_eq!(got.present(until), 1);

    // From `seat_until` on, a's seat is free and a newcomer takes it; b's (connected) is not.
    let c = unconnected("p_c", until, until + 60_000);
    let Admission::Admitted(after) = s.admit("c_lapse", &c, until).await.unwrap() else {
        panic!("the unconnected participant's lapsed seat was not freed");
    };
    assert_eq!(
        after.participants,
        vec![a.clone(), b_connected.clone(), c.clone()]
    );
    assert_eq!(after.present(until), 2);
    assert_eq!(
        s.admit("c_lapse", &participant("p_d", until + 1), until + 1)
            .await
            .unwrap(),
        Admission::Full
    );

    // A lapsed participant cannot take its seat back by connecting late: it stays unconnected.
    assert_eq!(
        s.mark_connected("c_lapse", "p_a", until).await.unwrap(),
        Some(a.clone())
    );
    // Marking a connected one again changes nothing.
    assert_eq!(
        s.mark_connected("c_lapse", "p_b", until + 5).await.unwrap(),
        Some(b_connected.clone())
    );
    // c connects in time, so both seats stay taken long after every `seat_until`.
    let c_connected = Participant {
        connected: true,
        ..c.clone()
    };
    assert_eq!(
        s.mark_connected("c_lapse", "p_c", until + 59_999)
            .await
            .unwrap(),
        Some(c_connected.clone())
    );
    let late = until + 600_000;
    assert_eq!(
        s.admit("c_lapse", &participant("p_d", late), late)
            .await
            .unwrap(),
        Admission::Full
    );
    let got = s.get_call("c_lapse").await.unwrap().unwrap();
    assert_eq!(got.participants, vec![a, b_connected, c_connected]);
    assert_eq!(got.present(late), 2);
}

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(std::sync::Arc::new(control::store::MemoryStore::new())).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let server = super::RedisServer::start();
                    let store = control::store::RedisStore::connect(&server.url, super::metrics()).await.unwrap();
                    super::$name(std::sync::Arc::new(store)).await;
                }
            )*
        }
    };
}

contract!(
    apps,
    calls,
    end_call,
    list_calls,
    tokens,
    admit_race,
    admit_rules,
    join_limit,
    disconnected_seats,
    redeem_race,
    token_admission,
    token_admission_race,
    hits,
    peeks,
    live_calls,
    hostile_strings,
    ping,
    participant_updates,
    participant_races,
    unconnected_seats_lapse,
);

// ---------------------------------------------------------------------------------------------
// Backend-specific.

/// History ends: the memory store forgets a call once its history time has passed.
#[tokio::test]
async fn memory_forgets_old_history() {
    let s = MemoryStore::new();
    let t = base();
    let c = call("c_old", "app_a", t, 1_000, 2);
    s.create_call(&c, digest(1)).await.unwrap();
    s.put_token(digest(2), &grant("c_old", t + 1_000))
        .await
        .unwrap();
    s.end_call("c_old", "api", t + 10).await.unwrap().unwrap();
    assert!(s.get_call("c_old").await.unwrap().is_some());
    // Any write at a later time sweeps what expired by then.
    s.hit("k", 1_000, t + 10 + HISTORY_MS).await.unwrap();
    assert_eq!(s.get_call("c_old").await.unwrap(), None);
    assert_eq!(
        s.list_calls("app_a", None, 10, None, t + 10)
            .await
            .unwrap()
            .calls,
        Vec::new()
    );
}

/// `Debug` (which may end up in logs) shows no user data, digests or URL.
#[tokio::test]
async fn debug_output_shows_no_contents() {
    let t = base();
    let m = MemoryStore::new();
    let mut c = call("c_dbg", "app_dbg", t, 60_000, 2);
    c.name = Some("Secret Meeting".to_owned());
    m.create_call(&c, digest(7)).await.unwrap();
    m.put_app(&app("app_dbg", "Private Name", false), &[digest(8)])
        .await
        .unwrap();
    let shown = format!("{m:?}");
    for hidden in [
        "Secret Meeting",
        "Private Name",
        "c_dbg",
        &digest(8).to_hex()[..8],
    ] {
        assert!(!shown.contains(hidden), "{shown}");
    }
    let server = RedisServer::start();
    let r = RedisStore::connect(&server.url, metrics()).await.unwrap();
    let shown = format!("{r:?}");
    assert!(!shown.contains(&server.port.to_string()), "{shown}");
}

/// Store metrics in a registry of their own, for tests that do not look at them.
fn metrics() -> StoreMetrics {
    StoreMetrics::new(&prometheus::Registry::new()).unwrap()
}

async fn redis_store(server: &RedisServer) -> S {
    Arc::new(RedisStore::connect(&server.url, metrics()).await.unwrap())
}

/// A raw connection for looking at what the store wrote.
async fn raw(server: &RedisServer) -> ::redis::aio::MultiplexedConnection {
    ::redis::Client::open(server.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Runs every operation once; `Err` results are returned, not unwrapped.
async fn every_op(s: &S, t: Millis) -> Vec<Result<(), StoreError>> {
    let c = call("c_any", "app_a", t, 60_000, 2);
    vec![
        s.put_app(&app("app_x", "X", false), &[digest(1)])
            .await
            .map(drop),
        s.list_apps().await.map(drop),
        s.get_app("app_x").await.map(drop),
        s.set_app_disabled("app_x", true).await.map(drop),
        s.add_app_key("app_x", digest(2)).await.map(drop),
        s.app_for_key(digest(1)).await.map(drop),
        s.create_call(&c, digest(3)).await,
        s.get_call("c_any").await.map(drop),
        s.list_calls("app_a", None, 10, None, t).await.map(drop),
        s.call_for_code(digest(3), t).await.map(drop),
        s.admit("c_any", &participant("p", t), t).await.map(drop),
        s.admit_with_token(digest(4), "c_any", &participant("p_t", t), t)
            .await
            .map(drop),
        s.set_left("c_any", "p", Some(t)).await.map(drop),
        s.set_media("c_any", "p", Media::default()).await.map(drop),
        s.set_quality("c_any", "p", &quality(1, t)).await.map(drop),
        s.kick("c_any", "p", t).await.map(drop),
        s.end_call("c_any", "api", t).await.map(drop),
        s.put_token(digest(4), &grant("c_any", t + 1_000))
            .await
            .map(drop),
        s.peek_token(digest(4), t).await.map(drop),
        s.redeem_token(digest(4), t).await.map(drop),
        s.hit("k", 1_000, t).await.map(drop),
        s.live_calls(t).await.map(drop),
        s.ping().await,
    ]
}

/// Waits (polling, with a deadline) until the store answers again.
async fn until_up(s: &S) {
    tokio::time::timeout(NO_HANG, async {
        while s.ping().await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("store never came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_is_unavailable_then_recovers() {
    let mut server = RedisServer::start();
    let s = redis_store(&server).await;
    let t = base();
    assert!(every_op(&s, t).await.iter().all(Result::is_ok));

    server.kill();
    let results = tokio::time::timeout(NO_HANG, every_op(&s, t))
        .await
        .expect("operations hang while Redis is down");
    for (i, r) in results.iter().enumerate() {
        assert!(
            matches!(r, Err(StoreError::Unavailable(_))),
            "operation {i}: {r:?}"
        );
    }

    server.restart();
    until_up(&s).await;
    // Restarted empty: everything reads as absent, nothing fails.
    assert_eq!(s.get_app("app_x").await.unwrap(), None);
    assert_eq!(s.list_apps().await.unwrap(), Vec::new());
    assert_eq!(s.app_for_key(digest(1)).await.unwrap(), None);
    assert_eq!(s.get_call("c_any").await.unwrap(), None);
    let page = s.list_calls("app_a", None, 10, None, t).await.unwrap();
    assert_eq!((page.calls.len(), page.next), (0, None));
    assert_eq!(s.call_for_code(digest(3), t).await.unwrap(), None);
    assert_eq!(
        s.admit("c_any", &participant("p", t), t).await.unwrap(),
        Admission::Gone
    );
    assert_eq!(s.end_call("c_any", "api", t).await.unwrap(), None);
    assert_eq!(s.kick("c_any", "p", t).await.unwrap(), None);
    assert!(!s.set_media("c_any", "p", Media::default()).await.unwrap());
    assert_eq!(s.redeem_token(digest(4), t).await.unwrap(), None);
    assert_eq!(s.live_calls(t).await.unwrap(), 0);
    assert_eq!(s.hit("k", 1_000, t).await.unwrap(), (1, 1_000));
    // And works again, scripts included (Redis lost them with the restart).
    let results = every_op(&s, t).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert!(s.get_call("c_any").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_times_out_then_recovers() {
    let server = RedisServer::start();
    let s = redis_store(&server).await;
    let t = base();
    s.put_app(&app("app_p", "P", false), &[digest(1)])
        .await
        .unwrap();

    server.pause();
    let r = tokio::time::timeout(NO_HANG, s.app_for_key(digest(1)))
        .await
        .expect("hangs while Redis is paused");
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
    let r = tokio::time::timeout(NO_HANG, s.admit("c_x", &participant("p", t), t))
        .await
        .expect("hangs while Redis is paused");
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");

    server.resume();
    until_up(&s).await;
    // Nothing was lost: a pause is not a restart.
    assert_eq!(
        s.app_for_key(digest(1)).await.unwrap().map(|a| a.id),
        Some("app_p".to_owned())
    );
}

/// Redis stops answering while a token admits someone: the operation fails (503), and
/// afterwards the token and the call agree — either the participant is in and the token used
/// up, or neither. Never a token burned without a seat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_token_admission_cut_off_is_all_or_nothing() {
    let server = RedisServer::start();
    let s = redis_store(&server).await;
    let t = base();
    s.create_call(&call("c_cut", "app_a", t, 3_600_000, 4), digest(1))
        .await
        .unwrap();
    s.put_token(digest(2), &grant("c_cut", t + 60_000))
        .await
        .unwrap();
    server.pause();
    let r = tokio::time::timeout(
        NO_HANG,
        s.admit_with_token(digest(2), "c_cut", &participant("p_1", t), t),
    )
    .await
    .expect("hangs while Redis is paused");
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
    server.resume();
    until_up(&s).await;
    let admitted = s
        .get_call("c_cut")
        .await
        .unwrap()
        .unwrap()
        .participants
        .len();
    let again = s
        .admit_with_token(digest(2), "c_cut", &participant("p_2", t + 1), t + 1)
        .await
        .unwrap();
    match admitted {
        0 => assert!(matches!(again, Admission::Admitted(_)), "{again:?}"),
        1 => assert_eq!(again, Admission::Gone),
        n => panic!("{n} participants"),
    }
    assert_eq!(
        s.get_call("c_cut")
            .await
            .unwrap()
            .unwrap()
            .participants
            .len(),
        1
    );
}

#[tokio::test]
async fn redis_unreachable_at_connect_is_unavailable() {
    let mut server = RedisServer::start();
    let url = server.url.clone();
    server.kill();
    let r = tokio::time::timeout(NO_HANG, RedisStore::connect(&url, metrics()))
        .await
        .expect("connect hangs");
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
    let r = RedisStore::connect("not a url", metrics()).await;
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_every_key_has_a_ttl() {
    let server = RedisServer::start();
    let s = redis_store(&server).await;
    let t = base();
    // A workload that writes every kind of key.
    assert!(s
        .put_app(&app("app_a", "A", false), &[digest(1)])
        .await
        .unwrap());
    assert!(s
        .put_app(&app("dev", "Dev", true), &[digest(2), digest(3)])
        .await
        .unwrap());
    assert!(s
        .put_app(&app("dev", "Dev", true), &[digest(3)])
        .await
        .unwrap());
    assert!(s.add_app_key("app_a", digest(4)).await.unwrap());
    assert!(s.set_app_disabled("app_a", true).await.unwrap());
    assert!(s.app_for_key(digest(1)).await.unwrap().is_some());
    for i in 0..5u32 {
        let c = call(&format!("c_{i}"), "app_a", t + u64::from(i), 600_000, 3);
        s.create_call(&c, digest(100 + i)).await.unwrap();
        s.admit(&c.id, &participant("p_1", t), t + 10)
            .await
            .unwrap();
    }
    let ttl_before: i64 = ::redis::cmd("PTTL")
        .arg("tp:{c:c_1}:call")
        .query_async(&mut raw(&server).await)
        .await
        .unwrap();
    // Participant changes rewrite a field of the call hash, which keeps its TTL.
    assert!(s.set_media("c_1", "p_1", Media::default()).await.unwrap());
    assert!(s.set_quality("c_1", "p_1", &quality(1, t)).await.unwrap());
    assert!(s.set_left("c_1", "p_1", Some(t + 11)).await.unwrap());
    assert!(s.kick("c_1", "p_1", t + 12).await.unwrap().is_some());
    s.end_call("c_0", "api", t + 20).await.unwrap().unwrap();
    s.put_token(digest(200), &grant("c_1", t + 60_000))
        .await
        .unwrap();
    s.put_token(digest(201), &grant("c_1", t + 60_000))
        .await
        .unwrap();
    s.redeem_token(digest(201), t + 30).await.unwrap();
    s.hit("join:x", 60_000, t).await.unwrap();
    s.hit("join:x", 60_000, t + 1).await.unwrap();
    s.live_calls(t + 40).await.unwrap();
    s.list_calls("app_a", None, 2, None, t + 40).await.unwrap();

    let mut conn = raw(&server).await;
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    // apps ×2, appkeys ×2, key ×3 (one dropped by config), apps index, calls ×5, codes ×4
    // (one ended), token ×1, history, live, rate limit.
    assert!(keys.len() >= 20, "workload wrote too little: {keys:?}");
    for key in &keys {
        let pttl: i64 = ::redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(pttl > 0, "{key} has no TTL ({pttl})");
    }
    // Call keys live until their purge time: expiry (or end) + history.
    let pttl: i64 = ::redis::cmd("PTTL")
        .arg("tp:{c:c_1}:call")
        .query_async(&mut conn)
        .await
        .unwrap();
    let expected = (t + 1 + 600_000 + HISTORY_MS) as i64 - base() as i64;
    assert!(
        (expected - 60_000..=expected + 1_000).contains(&pttl),
        "{pttl} vs {expected}"
    );
    assert!(
        (ttl_before - 60_000..=ttl_before).contains(&pttl),
        "{pttl} vs {ttl_before} before the participant changes"
    );
    // No secret in clear: keys hold digests only.
    assert!(keys
        .iter()
        .all(|k| !k.contains("tpk_") && !k.contains("tpt_")));
}

/// What the store reads but cannot decode is `Corrupt`, never a panic.
#[tokio::test]
async fn redis_foreign_data_is_corrupt() {
    let server = RedisServer::start();
    let s = redis_store(&server).await;
    let t = base();
    let mut conn = raw(&server).await;
    ::redis::pipe()
        .cmd("HSET")
        .arg("tp:{c:c_bad}:call")
        .arg("rec")
        .arg("{not json")
        .arg("exp")
        .arg("soon")
        .ignore()
        .cmd("SET")
        .arg("tp:app:app_str")
        .arg("a string, not a hash")
        .ignore()
        .cmd("SET")
        .arg(format!("tp:token:{}", digest(1).to_hex()))
        .arg("\u{0}\u{1}")
        .ignore()
        .cmd("SET")
        .arg(format!("tp:code:{}", digest(2).to_hex()))
        .arg("c_bad")
        .ignore()
        .exec_async(&mut conn)
        .await
        .unwrap();
    let corrupt = |r: &Result<_, StoreError>| matches!(r, Err(StoreError::Corrupt(_)));
    assert!(corrupt(&s.get_call("c_bad").await.map(drop)));
    assert!(corrupt(
        &s.admit("c_bad", &participant("p", t), t).await.map(drop)
    ));
    assert!(corrupt(&s.end_call("c_bad", "api", t).await.map(drop)));
    assert!(corrupt(&s.call_for_code(digest(2), t).await.map(drop)));
    assert!(corrupt(&s.get_app("app_str").await.map(drop)));
    assert!(corrupt(&s.redeem_token(digest(1), t).await.map(drop)));
    // A participant record that is not one: its changes are refused, nothing is written.
    ::redis::cmd("HSET")
        .arg("tp:{c:c_bad}:call")
        .arg("np")
        .arg("1")
        .arg("p:1")
        .arg("[1, 2]")
        .arg("pi:p_bad")
        .arg("1")
        .exec_async(&mut conn)
        .await
        .unwrap();
    assert!(corrupt(
        &s.set_media("c_bad", "p_bad", Media::default())
            .await
            .map(drop)
    ));
    assert!(corrupt(&s.kick("c_bad", "p_bad", t).await.map(drop)));
    let left: String = ::redis::cmd("HGET")
        .arg("tp:{c:c_bad}:call")
        .arg("p:1")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, "[1, 2]");
    // The store still works for everything else.
    s.ping().await.unwrap();
    assert_eq!(s.get_call("c_good").await.unwrap(), None);
}

/// A long history on Redis: pages cross its internal batches and groups of equal `created_at`
/// without skipping or repeating, and a sparse filter returns short pages (bounded work per
/// request) whose cursors still lead to every match.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_long_history_pages() {
    let server = RedisServer::start();
    let s = redis_store(&server).await;
    let t = base();
    let n = 1_050u64;
    let mut tasks = Vec::new();
    for chunk in 0..10u64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            for i in (chunk..n).step_by(10) {
                // Groups of three share a millisecond.
                let c = call(&format!("c_{i:04}"), "app_l", t + i / 3, 3_600_000, 2);
                s.create_call(&c, digest(i as u32)).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let now = t + 1_000;
    let oldest = "c_0000";
    assert!(matches!(
        s.admit(oldest, &participant("p", now), now).await.unwrap(),
        Admission::Admitted(_)
    ));

    let listed: Vec<String> = collect_pages(&s, "app_l", None, 7, now)
        .await
        .concat()
        .into_iter()
        .map(|c| c.id)
        .collect();
    // Newest first, ties by id descending: with ids in creation order, simply reversed.
    let expected: Vec<String> = (0..n).rev().map(|i| format!("c_{i:04}")).collect();
    assert_eq!(listed, expected);
    // Pages longer than one internal batch.
    let listed: Vec<String> = collect_pages(&s, "app_l", None, 500, now)
        .await
        .concat()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(listed, expected);

    // One active call at the very end of the history.
    let mut found = Vec::new();
    let mut after: Option<Cursor> = None;
    for _ in 0..10 {
        let page = s
            .list_calls("app_l", Some(CallState::Active), 10, after.as_ref(), now)
            .await
            .unwrap();
        found.extend(page.calls.into_iter().map(|c| c.id));
        match page.next {
            Some(c) => after = Some(c),
            None => break,
        }
    }
    assert_eq!(found, vec![oldest.to_owned()]);
    assert!(after.is_some(), "the first page should have stopped short");
}

/// Participant records stored before `jti`, `kicked`, `quality`, `connected` and `seat_until`
/// existed still read, with their defaults.
#[test]
fn old_participant_records_read_with_defaults() {
    let old = r#"{"peer_id":"p_old","role":"guest","name":"Old","user_id":null,
        "joined_at":5,"left_at":null,"media":{"audio":true,"video":false,"screen":false}}"#;
    let p: Participant = serde_json::from_str(old).unwrap();
    let want = Participant {
        peer_id: "p_old".to_owned(),
        role: Role::Guest,
        name: "Old".to_owned(),
        user_id: None,
        joined_at: 5,
        left_at: None,
        media: Media {
            audio: true,
            ..Media::default()
        },
        jti: String::new(),
        kicked: false,
        quality: None,
        // Counted as connected: an old participant holds its seat as it always did.
        connected: true,
        seat_until: None,
    };
    assert_eq!(p, want);
    assert!(p.is_present(u64::MAX));
}

/// A call Redis holds from before the peer-id index (no `pi:` fields, no `pix`, participants
/// without the new fields): read, admitted to and changed like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_calls_from_before_the_index_still_work() {
    let server = RedisServer::start();
    let s = redis_store(&server).await;
    let t = base();
    let c = call("c_v1", "app_a", t, 3_600_000, 2);
    let rec = serde_json::to_string(&c).unwrap();
    let old = |peer: &str| {
        format!(
            r#"{{"peer_id":"{peer}","role":"guest","name":"name of {peer}","user_id":null,"joined_at":{t},"left_at":null,"media":{{"audio":false,"video":false,"screen":false}}}}"#
        )
    };
    let mut conn = raw(&server).await;
    ::redis::cmd("HSET")
        .arg("tp:{c:c_v1}:call")
        .arg("rec")
        .arg(rec)
        .arg("exp")
        .arg(c.expires_at.to_string())
        .arg("max")
        .arg("2")
        .arg("code")
        .arg(digest(1).to_hex())
        .arg("np")
        .arg("2")
        .arg("p:1")
        .arg(old("p_1"))
        .arg("p:2")
        .arg(old("p_2"))
        .exec_async(&mut conn)
        .await
        .unwrap();
    let no_jti = |peer: &str| Participant {
        jti: String::new(),
        ..participant(peer, t)
    };
    let got = s.get_call("c_v1").await.unwrap().unwrap();
    assert_eq!(got.participants, vec![no_jti("p_1"), no_jti("p_2")]);

    let media = Media {
        audio: true,
        video: true,
        screen: false,
    };
    assert!(s.set_media("c_v1", "p_2", media).await.unwrap());
    assert!(!s.set_media("c_v1", "p_3", media).await.unwrap());
    let k = s.kick("c_v1", "p_1", t + 1).await.unwrap().unwrap();
    assert!(k.kicked);
    let got = s.get_call("c_v1").await.unwrap().unwrap();
    assert_eq!(got.participants[1].media, media);
    assert_eq!(got.present(t), 1);
    // The kicked one's seat is free; the newcomer is indexed and found.
    let p3 = participant("p_3", t + 2);
    assert!(matches!(
        s.admit("c_v1", &p3, t + 2).await.unwrap(),
        Admission::Admitted(_)
    ));
    assert!(s.set_left("c_v1", "p_3", Some(t + 3)).await.unwrap());
    let got = s.get_call("c_v1").await.unwrap().unwrap();
    assert_eq!(got.participants[2].left_at, Some(t + 3));
}

/// The value of `name` (a counter with `label` = `value`, or a histogram's sample count) in
/// `registry`; `None` if no such series is registered.
fn sample(registry: &prometheus::Registry, name: &str, label: Option<(&str, &str)>) -> Option<u64> {
    let family = registry.gather().into_iter().find(|f| f.name() == name)?;
    let metric = family.get_metric().iter().find(|m| match label {
        None => true,
        Some((k, v)) => m
            .get_label()
            .iter()
            .any(|l| l.name() == k && l.value() == v),
    })?;
    Some(match family.get_field_type() {
        prometheus::proto::MetricType::HISTOGRAM => metric.get_histogram().get_sample_count(),
        _ => metric.get_counter().get_value() as u64,
    })
}

const DURATION: &str = "turnpike_control_store_operation_duration_seconds";
const ERRORS: &str = "turnpike_control_store_errors_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_operations_are_timed_and_errors_exist_at_zero() {
    let registry = prometheus::Registry::new();
    let metrics = StoreMetrics::new(&registry).unwrap();
    // Both kinds are exported before anything failed, so an alert's rate() has a series.
    for kind in ["unavailable", "corrupt"] {
        assert_eq!(
            sample(&registry, ERRORS, Some(("kind", kind))),
            Some(0),
            "{kind}"
        );
    }
    assert_eq!(sample(&registry, DURATION, None), Some(0));
    let server = RedisServer::start();
    let s = RedisStore::connect(&server.url, metrics).await.unwrap();
    // Connecting is not an operation: nothing observed yet.
    assert_eq!(sample(&registry, DURATION, None), Some(0));
    s.ping().await.unwrap();
    assert_eq!(sample(&registry, DURATION, None), Some(1));
    s.get_call("c_none").await.unwrap();
    s.hit("rl", 1000, base()).await.unwrap();
    assert_eq!(sample(&registry, DURATION, None), Some(3));
    for kind in ["unavailable", "corrupt"] {
        assert_eq!(
            sample(&registry, ERRORS, Some(("kind", kind))),
            Some(0),
            "{kind}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_failures_are_counted_by_kind() {
    let registry = prometheus::Registry::new();
    let server = RedisServer::start();
    let s = RedisStore::connect(&server.url, StoreMetrics::new(&registry).unwrap())
        .await
        .unwrap();
    // Foreign data where a call should be: corrupt, and timed like any operation.
    let mut conn = raw(&server).await;
    let _: () = ::redis::cmd("SET")
        .arg("tp:{c:c_bad}:call")
        .arg("not a hash")
        .query_async(&mut conn)
        .await
        .unwrap();
    let r = s.get_call("c_bad").await;
    assert!(matches!(r, Err(StoreError::Corrupt(_))), "{r:?}");
    assert_eq!(
        sample(&registry, ERRORS, Some(("kind", "corrupt"))),
        Some(1)
    );
    assert_eq!(
        sample(&registry, ERRORS, Some(("kind", "unavailable"))),
        Some(0)
    );
    assert_eq!(sample(&registry, DURATION, None), Some(1));
    // Redis gone: the failing operation is counted as unavailable (and still timed).
    drop(server);
    let r = tokio::time::timeout(NO_HANG, s.ping())
        .await
        .expect("ping hangs");
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
    assert_eq!(
        sample(&registry, ERRORS, Some(("kind", "unavailable"))),
        Some(1)
    );
    assert_eq!(sample(&registry, DURATION, None), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dead_port_counts_unavailable() {
    let mut server = RedisServer::start();
    let url = server.url.clone();
    server.kill();
    // Connecting directly: one failed attempt, one error.
    let registry = prometheus::Registry::new();
    let r = tokio::time::timeout(
        NO_HANG,
        RedisStore::connect(&url, StoreMetrics::new(&registry).unwrap()),
    )
    .await
    .expect("connect hangs");
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
    assert_eq!(
        sample(&registry, ERRORS, Some(("kind", "unavailable"))),
        Some(1)
    );
    // Through Reconnecting: every operation retries the connection, and each failure counts.
    let registry = prometheus::Registry::new();
    let s = Reconnecting::new(url, StoreMetrics::new(&registry).unwrap());
    for n in 1..=2 {
        let r = tokio::time::timeout(NO_HANG, s.ping())
            .await
            .expect("ping hangs");
        assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
        assert_eq!(
            sample(&registry, ERRORS, Some(("kind", "unavailable"))),
            Some(n)
        );
    }
    assert_eq!(
        sample(&registry, ERRORS, Some(("kind", "corrupt"))),
        Some(0)
    );
}

/// Redis refuses one write of `create_call` (an ACL keeps the store's user off the app's
/// history index): the call must not exist half-written — no call hash and no join code
/// pointing at it — because the writes are one MULTI/EXEC transaction, which Redis aborts as a
/// whole when a queued command is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_create_call_is_all_or_nothing() {
    let server = RedisServer::start();
    let mut conn = raw(&server).await;
    // Every command, every key but `tp:calls:*` (the history index create_call writes last
    // but one).
    let _: () = ::redis::cmd("ACL")
        .arg("SETUSER")
        .arg("nohistory")
        .arg("on")
        .arg(">pw")
        .arg("+@all")
        .arg("~tp:{c:*")
        .arg("~tp:code:*")
        .arg("~tp:live")
        .query_async(&mut conn)
        .await
        .unwrap();
    let url = format!("redis://nohistory:pw@127.0.0.1:{}/", server.port);
    let s = RedisStore::connect(&url, metrics()).await.unwrap();
    let t = base();
    let r = s
        .create_call(&call("c_half", "app_a", t, 3_600_000, 2), digest(1))
        .await;
    assert!(r.is_err(), "{r:?}");
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys, Vec::<String>::new(), "half-written: {keys:?}");
    assert_eq!(s.get_call("c_half").await.unwrap(), None);
    assert_eq!(s.call_for_code(digest(1), t).await.unwrap(), None);
}
