//! The in-memory [`Store`]: one process, nothing survives a restart (the embedded default).
//!
//! Everything sits behind one `std::sync::Mutex` over plain maps. A blocking mutex is right
//! here: every critical section is a few map operations, never held across an `.await` (each
//! trait method locks, works and unlocks before returning), so contention costs less than an
//! async mutex's bookkeeping would, and holding it cannot stall the runtime.
//!
//! Expiry is by the caller's `now`: reads check it (an expired token, code or window is treated
//! as absent), and every write first sweeps a bounded batch of what has expired by its own
//! `now`, so memory stays proportional to what is live (plus [`HISTORY_MS`] of ended calls)
//! without a background task. Sweeping by the operation's own time, before its own change,
//! means a write never removes what it writes, and a caller whose clock is a little behind
//! another's (or a test stepping back in time) sees the same answers the lazy checks give.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;

use super::{
    Admission, App, Call, CallState, Cursor, Digest, Media, Millis, Page, Participant, Quality,
    Store, StoreError, TokenGrant, JOINS_PER_SEAT,
};

/// How long a call stays in history after it ended or expired: 7 days, long enough for a
/// consumer to look at last week's calls, short enough that history does not grow forever.
/// The Redis backend keeps the same value (`redis.rs`): both must agree for the contract suite.
pub(crate) const HISTORY_MS: u64 = 7 * 24 * 60 * 60 * 1000;

/// Most expired entries of each kind one write removes: bounds the time a write holds the lock
/// while still removing more than a write can add, so memory cannot grow without bound.
const SWEEP_BATCH: usize = 64;

type Key = [u8; 32];

/// The in-memory [`Store`].
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Sizes only: the contents are user data and key digests.
        let inner = self.lock();
        f.debug_struct("MemoryStore")
            .field("apps", &inner.apps.len())
            .field("calls", &inner.calls.len())
            .field("tokens", &inner.tokens.len())
            .field("windows", &inner.windows.len())
            .finish()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock would leave a half-done update at worst; the sections
        // are map operations that do not panic, so carrying on beats failing every request.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Default)]
struct Inner {
    /// By id (so `list_apps` is ordered).
    apps: BTreeMap<String, App>,
    /// App id → its key digests.
    app_keys: HashMap<String, HashSet<Key>>,
    /// Key digest → app id.
    keys: HashMap<Key, String>,

    /// Call id → the call and its join code (until it ends).
    calls: HashMap<String, Stored>,
    /// App id → `(created_at, call id)` of its calls: history, walked backwards.
    history: HashMap<String, BTreeSet<(Millis, String)>>,
    /// `(purge time, call id)`: when a call leaves history.
    purge: BTreeSet<(Millis, String)>,
    /// `(expires_at, call id)` of calls not ended: `live_calls` counts the unexpired ones.
    live: BTreeSet<(Millis, String)>,
    /// Join code digest → call id.
    codes: HashMap<Key, String>,

    /// Token digest → grant.
    tokens: HashMap<Key, TokenGrant>,
    /// `(expires_at, token digest)`.
    token_exp: BTreeSet<(Millis, Key)>,

    /// Rate-limit key → (hits, window end).
    windows: HashMap<String, (u64, Millis)>,
    /// `(window end, key)`.
    window_exp: BTreeSet<(Millis, String)>,

    /// The latest time seen in any call: the sweep time of `put_token`, which has no `now`.
    clock: Millis,
}

struct Stored {
    call: Call,
    code: Option<Key>,
}

/// When a call leaves history: [`HISTORY_MS`] after it ended or expired, whichever was first.
fn purge_at(call: &Call) -> Millis {
    let end = call
        .ended_at
        .map_or(call.expires_at, |e| e.min(call.expires_at));
    end.saturating_add(HISTORY_MS)
}

impl MemoryStore {
    /// Applies `change` to participant `peer_id` of call `call_id` under the lock (so it is
    /// atomic) and returns the participant as changed; `None` if either is unknown.
    fn update_participant(
        &self,
        call_id: &str,
        peer_id: &str,
        change: impl FnOnce(&mut Participant),
    ) -> Option<Participant> {
        let mut inner = self.lock();
        let stored = inner.calls.get_mut(call_id)?;
        // The first of that id, like `Call::participant` (and the Redis backend's index).
        let p = stored
            .call
            .participants
            .iter_mut()
            .find(|p| p.peer_id == peer_id)?;
        change(p);
        Some(p.clone())
    }
}

impl Inner {
    /// Adds a participant if the call is live and has a free seat.
    fn admit(&mut self, call_id: &str, participant: &Participant, now: Millis) -> Admission {
        let Some(stored) = self.calls.get_mut(call_id) else {
            return Admission::Gone;
        };
        let call = &mut stored.call;
        if call.state(now) == CallState::Ended {
            return Admission::Gone;
        }
        if call.participants.len() as u64 >= JOINS_PER_SEAT * u64::from(call.max_participants) {
            return Admission::JoinLimit;
        }
        if call.present(now) >= call.max_participants as usize {
            return Admission::Full;
        }
        call.participants.push(participant.clone());
        Admission::Admitted(call.clone())
    }

    /// Notes `now` and removes up to [`SWEEP_BATCH`] entries of each kind expired by then.
    fn sweep(&mut self, now: Millis) {
        self.clock = self.clock.max(now);
        for _ in 0..SWEEP_BATCH {
            match self.purge.first() {
                Some((at, _)) if *at <= now => {}
                _ => break,
            }
            if let Some((_, id)) = self.purge.pop_first() {
                self.remove_call(&id);
            }
        }
        for _ in 0..SWEEP_BATCH {
            match self.live.first() {
                Some((at, _)) if *at <= now => {}
                _ => break,
            }
            // Expired: no longer live. Its code goes too (it opens nothing any more).
            if let Some((_, id)) = self.live.pop_first() {
                if let Some(code) = self.calls.get_mut(&id).and_then(|s| s.code.take()) {
                    self.codes.remove(&code);
                }
            }
        }
        for _ in 0..SWEEP_BATCH {
            match self.token_exp.first() {
                Some((at, _)) if *at <= now => {}
                _ => break,
            }
            if let Some((_, token)) = self.token_exp.pop_first() {
                self.tokens.remove(&token);
            }
        }
        for _ in 0..SWEEP_BATCH {
            match self.window_exp.first() {
                Some((at, _)) if *at <= now => {}
                _ => break,
            }
            if let Some((_, key)) = self.window_exp.pop_first() {
                self.windows.remove(&key);
            }
        }
    }

    /// Forgets a call entirely (from every index).
    fn remove_call(&mut self, id: &str) {
        let Some(stored) = self.calls.remove(id) else {
            return;
        };
        let call = stored.call;
        if let Some(code) = stored.code {
            self.codes.remove(&code);
        }
        if let Some(set) = self.history.get_mut(&call.app_id) {
            set.remove(&(call.created_at, call.id.clone()));
            if set.is_empty() {
                self.history.remove(&call.app_id);
            }
        }
        self.purge.remove(&(purge_at(&call), call.id.clone()));
        self.live.remove(&(call.expires_at, call.id));
    }

    /// Gives key `key` to app `id`, taking it from any other app that had it.
    fn assign_key(&mut self, id: &str, key: Key) {
        if let Some(prev) = self.keys.insert(key, id.to_owned()) {
            if prev != id {
                if let Some(set) = self.app_keys.get_mut(&prev) {
                    set.remove(&key);
                }
            }
        }
        self.app_keys.entry(id.to_owned()).or_default().insert(key);
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn put_app(&self, app: &App, keys: &[Digest]) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        if inner.apps.contains_key(&app.id) {
            if !app.from_config {
                return Ok(false);
            }
            // Config is the source of truth for its apps: the old keys stop working.
            if let Some(old) = inner.app_keys.remove(&app.id) {
                for key in old {
                    if inner.keys.get(&key) == Some(&app.id) {
                        inner.keys.remove(&key);
                    }
                }
            }
        }
        inner.apps.insert(app.id.clone(), app.clone());
        inner.app_keys.entry(app.id.clone()).or_default();
        for key in keys {
            inner.assign_key(&app.id, key.0);
        }
        Ok(true)
    }

    async fn list_apps(&self) -> Result<Vec<App>, StoreError> {
        Ok(self.lock().apps.values().cloned().collect())
    }

    async fn get_app(&self, id: &str) -> Result<Option<App>, StoreError> {
        Ok(self.lock().apps.get(id).cloned())
    }

    async fn set_app_disabled(&self, id: &str, disabled: bool) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        match inner.apps.get_mut(id) {
            Some(app) => {
                app.disabled = disabled;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn add_app_key(&self, id: &str, key: Digest) -> Result<bool, StoreError> {
        let mut inner = self.lock();
        if !inner.apps.contains_key(id) {
            return Ok(false);
        }
        inner.assign_key(id, key.0);
        Ok(true)
    }

    async fn app_for_key(&self, key: Digest) -> Result<Option<App>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .keys
            .get(&key.0)
            .and_then(|id| inner.apps.get(id))
            .cloned())
    }

    async fn create_call(&self, call: &Call, code: Digest) -> Result<(), StoreError> {
        let mut inner = self.lock();
        inner.sweep(call.created_at);
        // Ids are random, so this only happens on a retried request: replace cleanly.
        inner.remove_call(&call.id);
        // Expiry is left to reads and sweeps (they know `now`); only an ended call has no code.
        let live = call.ended_at.is_none();
        if live {
            // A code from an earlier call with the same digest stops pointing at it.
            if let Some(prev) = inner.codes.insert(code.0, call.id.clone()) {
                if let Some(s) = inner.calls.get_mut(&prev) {
                    s.code = None;
                }
            }
            inner.live.insert((call.expires_at, call.id.clone()));
        }
        inner
            .history
            .entry(call.app_id.clone())
            .or_default()
            .insert((call.created_at, call.id.clone()));
        inner.purge.insert((purge_at(call), call.id.clone()));
        inner.calls.insert(
            call.id.clone(),
            Stored {
                call: call.clone(),
                code: live.then_some(code.0),
            },
        );
        Ok(())
    }

    async fn get_call(&self, id: &str) -> Result<Option<Call>, StoreError> {
        Ok(self.lock().calls.get(id).map(|s| s.call.clone()))
    }

    async fn list_calls(
        &self,
        app_id: &str,
        state: Option<CallState>,
        limit: usize,
        after: Option<&Cursor>,
        now: Millis,
    ) -> Result<Page, StoreError> {
        let inner = self.lock();
        let Some(set) = inner.history.get(app_id) else {
            return Ok(Page {
                calls: Vec::new(),
                next: None,
            });
        };
        let upper = match after {
            Some(c) => std::ops::Bound::Excluded((c.created_at, c.id.clone())),
            None => std::ops::Bound::Unbounded,
        };
        let mut calls = Vec::new();
        let mut more = false;
        for (_, id) in set.range((std::ops::Bound::Unbounded, upper)).rev() {
            let Some(stored) = inner.calls.get(id) else {
                continue;
            };
            let call = &stored.call;
            // Lazily dropped: out of history even if no sweep removed it yet.
            if purge_at(call) <= now {
                continue;
            }
            if state.is_some_and(|s| call.state(now) != s) {
                continue;
            }
            if calls.len() == limit {
                more = true;
                break;
            }
            calls.push(call.clone());
        }
        let next = match calls.last() {
            Some(last) if more => Some(Cursor {
                created_at: last.created_at,
                id: last.id.clone(),
            }),
            _ => None,
        };
        Ok(Page { calls, next })
    }

    async fn call_for_code(&self, code: Digest, now: Millis) -> Result<Option<String>, StoreError> {
        let inner = self.lock();
        let Some(id) = inner.codes.get(&code.0) else {
            return Ok(None);
        };
        Ok(inner
            .calls
            .get(id)
            .filter(|s| s.call.state(now) != CallState::Ended)
            .map(|s| s.call.id.clone()))
    }

    async fn end_call(
        &self,
        id: &str,
        reason: &str,
        now: Millis,
    ) -> Result<Option<Call>, StoreError> {
        let mut inner = self.lock();
        inner.sweep(now);
        let Some(stored) = inner.calls.get_mut(id) else {
            return Ok(None);
        };
        if stored.call.state(now) == CallState::Ended {
            return Ok(Some(stored.call.clone()));
        }
        let old_purge = purge_at(&stored.call);
        stored.call.ended_at = Some(now);
        stored.call.end_reason = Some(reason.to_owned());
        let code = stored.code.take();
        let call = stored.call.clone();
        if let Some(code) = code {
            inner.codes.remove(&code);
        }
        inner.live.remove(&(call.expires_at, call.id.clone()));
        inner.purge.remove(&(old_purge, call.id.clone()));
        inner.purge.insert((purge_at(&call), call.id.clone()));
        Ok(Some(call))
    }

    async fn put_token(&self, token: Digest, grant: &TokenGrant) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let latest = inner.clock;
        inner.sweep(latest);
        if let Some(old) = inner.tokens.insert(token.0, grant.clone()) {
            inner.token_exp.remove(&(old.expires_at, token.0));
        }
        inner.token_exp.insert((grant.expires_at, token.0));
        Ok(())
    }

    async fn redeem_token(
        &self,
        token: Digest,
        now: Millis,
    ) -> Result<Option<TokenGrant>, StoreError> {
        let mut inner = self.lock();
        inner.sweep(now);
        let grant = inner.tokens.remove(&token.0);
        if let Some(g) = &grant {
            inner.token_exp.remove(&(g.expires_at, token.0));
        }
        Ok(grant.filter(|g| now < g.expires_at))
    }

    async fn peek_token(
        &self,
        token: Digest,
        now: Millis,
    ) -> Result<Option<TokenGrant>, StoreError> {
        let mut inner = self.lock();
        inner.sweep(now);
        Ok(inner
            .tokens
            .get(&token.0)
            .filter(|g| now < g.expires_at)
            .cloned())
    }

    async fn admit(
        &self,
        call_id: &str,
        participant: &Participant,
        now: Millis,
    ) -> Result<Admission, StoreError> {
        let mut inner = self.lock();
        inner.sweep(now);
        Ok(inner.admit(call_id, participant, now))
    }

    async fn admit_with_token(
        &self,
        token: Digest,
        call_id: &str,
        participant: &Participant,
        now: Millis,
    ) -> Result<Admission, StoreError> {
        // One lock around the check, the seat and the removal: nothing between them.
        let mut inner = self.lock();
        inner.sweep(now);
        let usable = inner
            .tokens
            .get(&token.0)
            .is_some_and(|g| now < g.expires_at && g.call_id == call_id);
        if !usable {
            return Ok(Admission::Gone);
        }
        let admission = inner.admit(call_id, participant, now);
        if let Admission::Admitted(_) = admission {
            if let Some(g) = inner.tokens.remove(&token.0) {
                inner.token_exp.remove(&(g.expires_at, token.0));
            }
        }
        Ok(admission)
    }

    async fn set_left(
        &self,
        call_id: &str,
        peer_id: &str,
        left_at: Option<Millis>,
    ) -> Result<bool, StoreError> {
        Ok(self
            .update_participant(call_id, peer_id, |p| p.apply_left(left_at))
            .is_some())
    }

    async fn mark_connected(
        &self,
        call_id: &str,
        peer_id: &str,
        now: Millis,
    ) -> Result<Option<Participant>, StoreError> {
        Ok(self.update_participant(call_id, peer_id, |p| p.apply_connected(now)))
    }

    async fn mark_disconnected(
        &self,
        call_id: &str,
        peer_id: &str,
        seat_until: Millis,
    ) -> Result<bool, StoreError> {
        Ok(self
            .update_participant(call_id, peer_id, |p| p.apply_disconnected(seat_until))
            .is_some())
    }

    async fn set_media(
        &self,
        call_id: &str,
        peer_id: &str,
        media: Media,
    ) -> Result<bool, StoreError> {
        Ok(self
            .update_participant(call_id, peer_id, |p| p.media = media)
            .is_some())
    }

    async fn set_quality(
        &self,
        call_id: &str,
        peer_id: &str,
        quality: &Quality,
    ) -> Result<bool, StoreError> {
        Ok(self
            .update_participant(call_id, peer_id, |p| p.quality = Some(quality.clone()))
            .is_some())
    }

    async fn kick(
        &self,
        call_id: &str,
        peer_id: &str,
        now: Millis,
    ) -> Result<Option<Participant>, StoreError> {
        Ok(self.update_participant(call_id, peer_id, |p| p.apply_kick(now)))
    }

    async fn hit(&self, key: &str, window_ms: u64, now: Millis) -> Result<(u64, u64), StoreError> {
        let mut inner = self.lock();
        inner.sweep(now);
        let (count, end) = match inner.windows.get_mut(key) {
            Some((count, end)) if now < *end => {
                *count = count.saturating_add(1);
                (*count, *end)
            }
            _ => {
                let end = now.saturating_add(window_ms);
                if let Some((_, old_end)) = inner.windows.insert(key.to_owned(), (1, end)) {
                    inner.window_exp.remove(&(old_end, key.to_owned()));
                }
                inner.window_exp.insert((end, key.to_owned()));
                (1, end)
            }
        };
        Ok((count, end - now))
    }

    async fn peek(&self, key: &str, now: Millis) -> Result<(u64, u64), StoreError> {
        let inner = self.lock();
        Ok(match inner.windows.get(key) {
            Some(&(count, end)) if now < end => (count, end - now),
            _ => (0, 0),
        })
    }

    async fn live_calls(&self, now: Millis) -> Result<u64, StoreError> {
        let inner = self.lock();
        let Some(after) = now.checked_add(1) else {
            return Ok(0);
        };
        // Ended calls left `live` when they ended; expired ones are below `after`.
        Ok(inner.live.range((after, String::new())..).count() as u64)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
