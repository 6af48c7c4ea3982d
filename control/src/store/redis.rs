//! The Redis [`Store`]: several control-plane nodes share apps, calls, codes, tokens and rate
//! limits through one Redis (7.0 or later).
//!
//! # Layout
//!
//! Every key starts with `tp:`; the prefixes below are chosen so that no key of one kind can be
//! spelled as a key of another, whatever id an attacker puts in a URL.
//!
//! | key | type | what | TTL |
//! |---|---|---|---|
//! | `tp:{c:ID}:call` | hash | the call (below) | until it ended or expired + [`HISTORY_MS`] |
//! | `tp:code:HEX` | string | join code digest → call id | until the call expires; deleted when it ends |
//! | `tp:token:HEX` | string | participant token digest → [`TokenGrant`] JSON | until the grant expires; deleted once it admitted someone |
//! | `tp:app:ID` | hash | `rec` ([`App`] JSON), `disabled` (`0`/`1`) | [`APP_TTL_MS`], refreshed |
//! | `tp:appkeys:ID` | set | the app's key digests (hex) | [`APP_TTL_MS`], refreshed |
//! | `tp:key:HEX` | string | app key digest → app id | [`APP_TTL_MS`], refreshed |
//! | `tp:apps` | set | all app ids (for `list_apps`) | [`APP_TTL_MS`], refreshed |
//! | `tp:calls:APP` | sorted set | call ids by `created_at`: the app's history | its calls' latest purge time |
//! | `tp:live` | sorted set | call ids by `expires_at`, not ended: `live_calls` | its calls' latest expiry |
//! | `tp:rl:KEY` | hash | rate-limit window: `n` hits, `end` (Unix ms) | the window |
//!
//! The call hash holds `rec` (the [`Call`] as created, without participants or end), `exp`
//! (`expires_at`), `max` (`max_participants`), `code` (the join code digest, hex), `np` (the
//! number of participants), `p:1` … `p:NP` (each participant's JSON, in join order), `pi:PEER`
//! (the `N` of the first `p:N` with that peer id), `pix` (`1`: every participant is in the
//! `pi:` index; calls stored before the index have none and are searched instead), `t:HEX`
//! for each participant token that admitted someone (the admission and this mark are one
//! script, so a token is used up exactly when it admits: a full call leaves it usable), and,
//! once ended, `ended_at` and `end_reason`. It is a hash rather than one JSON string because the
//! atomic operations run as Lua scripts, and Lua's `cjson` cannot write a call back unchanged:
//! it turns empty arrays into objects and rounds numbers to 14 digits, which would corrupt the
//! consumer's `metadata` (and a participant's quality figures). So the scripts only write fields
//! serialized by Rust (`serde_json`) and read the few values they need from their own fields.
//!
//! A participant changes (left, media, quality, kicked, connected) by compare-and-set of its
//! one `p:N` field: Rust reads the field (`FIND`), decodes, changes and re-encodes it, and
//! `CAS` writes it only if the field still holds what was read, else Rust reads again. Two
//! concurrent changes of one participant thus never lose each other's fields, no script edits
//! JSON, and the hash keeps its TTL (`HSET` on an existing key does not touch it).
//!
//! All keys of one call share the hash tag `{c:ID}`, so each call lives in one Redis Cluster
//! slot and the scripts touching it (`admit`, `end`, `find`, `cas`) only take keys of that slot. Where an
//! operation spans slots (ending a call deletes its code key and removes it from `tp:live`),
//! the slot-local script runs first and marks the call ended; the rest follows as separate
//! commands. A crash in between leaves a code key pointing at an ended call, which grants
//! nothing: [`Store::call_for_code`] checks the call's state.
//!
//! # Every key expires
//!
//! The spec requires every key to expire: nothing is kept forever, nobody has to clean Redis by
//! hand. Absolute deadlines (a call's purge time, a code's or token's expiry) are set with
//! `PEXPIREAT` on the caller's Unix milliseconds. Redis's clock and the nodes' are NTP-synced,
//! and a skew only moves this housekeeping: every read also checks the caller's `now`, so
//! nothing is honoured past its deadline (a key may vanish up to the skew early). Rate-limit
//! windows use a relative TTL. Apps and their keys live [`APP_TTL_MS`] and are refreshed on
//! every successful key lookup and on every write: an app in use never expires, one nobody used
//! for over a year is gone.
//!
//! # Failures
//!
//! Connection errors and timeouts become [`StoreError::Unavailable`] (the API answers 503),
//! data this code cannot read becomes [`StoreError::Corrupt`]; nothing Redis returns can make it
//! panic. The connection is a [`ConnectionManager`], which reconnects by itself.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, Script};

use super::{
    Admission, App, Call, CallState, Cursor, Digest, Media, Millis, Page, Participant, Quality,
    Store, StoreError, StoreMetrics, TokenGrant,
};

/// How long a call stays in history after it ended or expired: 7 days. The same value as the
/// memory backend's (`memory.rs`): the contract suite expects both to agree.
pub(crate) const HISTORY_MS: u64 = 7 * 24 * 60 * 60 * 1000;

/// How long an app record and its keys live without use: 400 days, refreshed on every
/// successful key lookup and every write. Longer than a year, so a yearly job still finds its
/// app; finite, because every key in Redis must expire.
const APP_TTL_MS: u64 = 400 * 24 * 60 * 60 * 1000;

/// Limit on one Redis command's reply and on one connection attempt: 2 s, well below the API's
/// 10 s request timeout, so a paused or unreachable Redis turns into a 503 in time instead of
/// a request timeout.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// Limit on one whole store operation (up to three round trips, or waiting for a reconnection
/// in progress, which the per-command timeout does not cover): still well below 10 s.
const OP_TIMEOUT: Duration = Duration::from_secs(4);

/// Call-history entries one `list_calls` examines at most: a filtered listing over a long
/// history returns a short page with a cursor rather than reading the whole history at once.
const LIST_SCAN_BUDGET: usize = 1000;

/// History entries fetched per round trip while listing.
const LIST_BATCH: usize = 100;

/// Oldest history entries `create_call` checks for purged calls: more than the one entry it
/// adds, so an app's history index shrinks back to what is still in history.
const HISTORY_CLEANUP: isize = 2;

/// Rounds of read and compare-and-set one participant change tries before giving up. Only
/// signaling (one node per peer) and the API's kick write a participant, so two rounds almost
/// always do; the bound keeps a pathological race from spinning, answering 503 instead.
const CAS_ATTEMPTS: usize = 16;

/// Appends a participant (JSON ARGV[2], peer id ARGV[3]) if the call is live and not full,
/// indexing its peer id unless an earlier participant has it. With a participant token's
/// digest (hex ARGV[4], else empty), only if no one was admitted with it yet, and marks it
/// used (`t:HEX`) in the same step. At most ARGV[5] (joins per seat) × `max` participants over
/// the call's life ('limit'). Returns `{status, HGETALL}`.
const ADMIT: &str = r"
local f = redis.call('HMGET', KEYS[1], 'exp', 'max', 'ended_at', 'np')
if not f[1] then
  if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone', {}} end
  return {'corrupt', {}}
end
local now = tonumber(ARGV[1])
local exp = tonumber(f[1])
local max = tonumber(f[2])
local np = tonumber(f[4] or '0')
if not now or not exp or not max or not np then return {'corrupt', {}} end
if f[3] or now >= exp then return {'gone', {}} end
if ARGV[4] ~= '' and redis.call('HEXISTS', KEYS[1], 't:' .. ARGV[4]) == 1 then
  return {'gone', {}}
end
if np >= tonumber(ARGV[5]) * max then return {'limit', {}} end
local present = 0
for i = 1, np do
  local p = redis.call('HGET', KEYS[1], 'p:' .. i)
  if p then
    local ok, v = pcall(cjson.decode, p)
    -- Unreadable counts as present: never admit past the limit on doubt. A kicked one has
    -- left too, but is not counted even if its left_at were missing (`Call::present`). So is
    -- one that never connected to signaling once its join token can no longer authenticate
    -- (`Participant::seat_lapsed`): `connected` exactly false (absent in older records means
    -- connected) and `now` at or past a numeric `seat_until`.
    if not ok or type(v) ~= 'table' then
      present = present + 1
    elseif (v['left_at'] == nil or v['left_at'] == cjson.null) and v['kicked'] ~= true then
      local su = v['seat_until']
      if not (v['connected'] == false and type(su) == 'number' and now >= su) then
        present = present + 1
      end
    end
  end
end
if present >= max then return {'full', {}} end
np = np + 1
redis.call('HSET', KEYS[1], 'p:' .. np, ARGV[2], 'np', tostring(np))
redis.call('HSETNX', KEYS[1], 'pi:' .. ARGV[3], tostring(np))
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 't:' .. ARGV[4], '1') end
return {'ok', redis.call('HGETALL', KEYS[1])}
";

/// Finds participant ARGV[1] (peer id): `{field, JSON}` of its `p:N`, or `{}` when the call or
/// the peer is unknown. By the `pi:` index; a call stored before the index (no `pix`) is
/// searched, decoding only to compare the peer id (nothing is written back).
const FIND: &str = r"
local i = redis.call('HGET', KEYS[1], 'pi:' .. ARGV[1])
if i then
  local p = redis.call('HGET', KEYS[1], 'p:' .. i)
  if p then return {'p:' .. i, p} end
end
if redis.call('HEXISTS', KEYS[1], 'pix') == 1 then return {} end
local np = tonumber(redis.call('HGET', KEYS[1], 'np') or '0') or 0
for j = 1, np do
  local p = redis.call('HGET', KEYS[1], 'p:' .. j)
  if p then
    local ok, v = pcall(cjson.decode, p)
    if ok and type(v) == 'table' and v['peer_id'] == ARGV[1] then return {'p:' .. j, p} end
  end
end
return {}
";

/// Compare-and-set of one field: writes ARGV[3] to field ARGV[1] if it holds exactly ARGV[2]
/// (so a missing field or call is never created). Returns 1 if written, 0 if not.
const CAS: &str = r"
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
";

/// Ends a live call at `now` (ARGV[1]) with a reason (ARGV[2]) and moves its expiry to its
/// purge time (ARGV[3]). Returns `{status, HGETALL}`.
const END: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone', {}} end
local f = redis.call('HMGET', KEYS[1], 'exp', 'ended_at')
local now = tonumber(ARGV[1])
local exp = tonumber(f[1])
if not now or not exp then return {'corrupt', {}} end
if not f[2] and now < exp then
  redis.call('HSET', KEYS[1], 'ended_at', ARGV[1], 'end_reason', ARGV[2])
  redis.call('PEXPIREAT', KEYS[1], ARGV[3])
end
return {'ok', redis.call('HGETALL', KEYS[1])}
";

/// Deletes KEYS[1] if it holds ARGV[1] (a code or key mapping that still points where we think).
const DEL_IF_EQ: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Counts a hit at `now` (ARGV[1]); a new window (TTL ARGV[2] ms) ends at ARGV[3]. The window
/// is measured in the caller's time, like every expiry in the contract. Returns
/// `{hits, ms left}`.
const HIT: &str = r"
local now = tonumber(ARGV[1])
local raw = redis.call('HGET', KEYS[1], 'end')
local e = raw and tonumber(raw)
if not e or now >= e then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'n', '1', 'end', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, tonumber(ARGV[3]) - now}
end
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
if redis.call('PTTL', KEYS[1]) < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return {n, e - now}
";

/// Stores an app (ARGV: JSON, disabled, from_config, TTL); a non-config app only if absent.
const PUT_APP: &str = r"
if ARGV[3] ~= '1' and redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'rec', ARGV[1], 'disabled', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
";

/// Sets an existing app's `disabled` (ARGV[1]) and refreshes its TTL (ARGV[2]).
const SET_DISABLED: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'disabled', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
";

/// The Redis [`Store`].
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    metrics: StoreMetrics,
    admit: Script,
    end: Script,
    find: Script,
    cas: Script,
    del_if_eq: Script,
    hit: Script,
    put_app: Script,
    set_disabled: Script,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // No URL: it may carry a password.
        f.debug_struct("RedisStore").finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to `url` (`redis://…` or `rediss://…`) and checks that Redis answers. Every
    /// operation is timed and every failure counted in `metrics`; so is a failed connection
    /// attempt (as `unavailable`): while Redis is down, [`super::Reconnecting`] retries on every
    /// request, and each of those failures must show in the error rate.
    pub async fn connect(url: &str, metrics: StoreMetrics) -> Result<RedisStore, StoreError> {
        let result = Self::connect_uncounted(url, metrics.clone()).await;
        if let Err(e) = &result {
            metrics.error(e);
        }
        result
    }

    async fn connect_uncounted(url: &str, metrics: StoreMetrics) -> Result<RedisStore, StoreError> {
        // Not the error's text: it could quote the URL, password included.
        let client = redis::Client::open(url)
            .map_err(|_| StoreError::Unavailable("invalid Redis URL".to_owned()))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(COMMAND_TIMEOUT)
            .set_connection_timeout(COMMAND_TIMEOUT)
            // One attempt per reconnection, no backoff schedule: while Redis is down each
            // request fails fast (503) and the next one tries again, so service resumes with
            // the first request after Redis is back instead of after a backoff sleep.
            .set_number_of_retries(0);
        let conn = bounded(async {
            ConnectionManager::new_with_config(client, config)
                .await
                .map_err(map_err)
        })
        .await?;
        let store = RedisStore {
            conn,
            metrics,
            admit: Script::new(ADMIT),
            end: Script::new(END),
            find: Script::new(FIND),
            cas: Script::new(CAS),
            del_if_eq: Script::new(DEL_IF_EQ),
            hit: Script::new(HIT),
            put_app: Script::new(PUT_APP),
            set_disabled: Script::new(SET_DISABLED),
        };
        // Not `ping()`: a failure here is counted once, by `connect`, as a failed connection.
        bounded(store.ping_op()).await?;
        Ok(store)
    }

    fn conn(&self) -> ConnectionManager {
        // A cheap handle on the one shared, multiplexed connection.
        self.conn.clone()
    }
}

/// Bounds a whole operation by [`OP_TIMEOUT`].
async fn bounded<T>(op: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
    tokio::time::timeout(OP_TIMEOUT, op)
        .await
        .unwrap_or_else(|_| Err(StoreError::Unavailable("Redis timed out".to_owned())))
}

impl RedisStore {
    /// One store operation: bounded by [`OP_TIMEOUT`], its duration observed (timeouts and
    /// failures included: a slow failing Redis must show in the latency too) and its failure
    /// counted by kind. Every [`Store`] method goes through here, so the metrics cover them all.
    async fn timed<T>(
        &self,
        op: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let start = std::time::Instant::now();
        let result = bounded(op).await;
        self.metrics.observe(start.elapsed().as_secs_f64());
        if let Err(e) = &result {
            self.metrics.error(e);
        }
        result
    }
}

fn map_err(e: RedisError) -> StoreError {
    match e.kind() {
        // The reply did not have the shape we asked for.
        ErrorKind::TypeError | ErrorKind::ParseError => StoreError::Corrupt(e.to_string()),
        _ if e.code() == Some("WRONGTYPE") => StoreError::Corrupt(e.to_string()),
        _ => StoreError::Unavailable(e.to_string()),
    }
}

fn corrupt(what: impl fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

fn call_key(id: &str) -> String {
    format!("tp:{{c:{id}}}:call")
}
fn code_key(hex: &str) -> String {
    format!("tp:code:{hex}")
}
fn token_key(token: Digest) -> String {
    format!("tp:token:{}", token.to_hex())
}
fn app_key(id: &str) -> String {
    format!("tp:app:{id}")
}
fn appkeys_key(id: &str) -> String {
    format!("tp:appkeys:{id}")
}
fn key_key(hex: &str) -> String {
    format!("tp:key:{hex}")
}
const APPS: &str = "tp:apps";
fn history_key(app_id: &str) -> String {
    format!("tp:calls:{app_id}")
}
const LIVE: &str = "tp:live";
fn rl_key(key: &str) -> String {
    format!("tp:rl:{key}")
}

/// An absolute expiry Redis accepts: at least 1 (0 and below are refused) and small enough that
/// Redis's own arithmetic on it cannot overflow (2^53 ms is 285 000 years).
fn at(ms: Millis) -> u64 {
    ms.clamp(1, 1 << 53)
}

/// When a call leaves history: [`HISTORY_MS`] after it ended or expired, whichever was first.
fn purge_at(call: &Call) -> Millis {
    let end = call
        .ended_at
        .map_or(call.expires_at, |e| e.min(call.expires_at));
    end.saturating_add(HISTORY_MS)
}

/// A flat `[field, value, …]` reply as a map.
fn pairs(flat: Vec<Vec<u8>>) -> Result<HashMap<String, Vec<u8>>, StoreError> {
    if flat.len() % 2 != 0 {
        return Err(corrupt("odd field list"));
    }
    let mut map = HashMap::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        let k = String::from_utf8(k).map_err(|_| corrupt("non-UTF-8 field name"))?;
        map.insert(k, v);
    }
    Ok(map)
}

fn parse_num<T: std::str::FromStr>(raw: &[u8], what: &str) -> Result<T, StoreError> {
    std::str::from_utf8(raw)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| corrupt(format_args!("bad {what}")))
}

fn json<T: serde::de::DeserializeOwned>(raw: &[u8], what: &str) -> Result<T, StoreError> {
    serde_json::from_slice(raw).map_err(|e| corrupt(format_args!("{what}: {e}")))
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    // Our own types always serialize; should that ever change it is a bug, not an outage.
    serde_json::to_vec(value).map_err(|e| corrupt(format_args!("encoding: {e}")))
}

/// A call from its hash; `None` if the hash is empty (no such call).
fn decode_call(fields: &HashMap<String, Vec<u8>>) -> Result<Option<Call>, StoreError> {
    if fields.is_empty() {
        return Ok(None);
    }
    let rec = fields
        .get("rec")
        .ok_or_else(|| corrupt("call without rec"))?;
    let mut call: Call = json(rec, "call")?;
    let np: u32 = match fields.get("np") {
        Some(raw) => parse_num(raw, "participant count")?,
        None => 0,
    };
    let mut participants = Vec::new();
    for i in 1..=np {
        let raw = fields
            .get(&format!("p:{i}"))
            .ok_or_else(|| corrupt("participant missing"))?;
        participants.push(json::<Participant>(raw, "participant")?);
    }
    call.participants = participants;
    call.ended_at = fields
        .get("ended_at")
        .map(|raw| parse_num(raw, "ended_at"))
        .transpose()?;
    call.end_reason = fields
        .get("end_reason")
        .map(|raw| String::from_utf8(raw.clone()).map_err(|_| corrupt("bad end_reason")))
        .transpose()?;
    Ok(Some(call))
}

/// An app from its hash fields `rec` and `disabled`.
fn decode_app(rec: Option<Vec<u8>>, disabled: Option<Vec<u8>>) -> Result<Option<App>, StoreError> {
    let Some(rec) = rec else {
        return Ok(None);
    };
    let mut app: App = json(&rec, "app")?;
    app.disabled = disabled.as_deref() == Some(b"1");
    Ok(Some(app))
}

fn flag(b: bool) -> &'static str {
    if b {
        "1"
    } else {
        "0"
    }
}

/// An app hash's `rec` and `disabled`.
type AppFields = (Option<Vec<u8>>, Option<Vec<u8>>);

/// The status and fields a call script returns.
type ScriptReply = (String, Vec<Vec<u8>>);

impl RedisStore {
    async fn put_app_op(&self, app: &App, keys: &[Digest]) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let stored: i64 = self
            .put_app
            .key(app_key(&app.id))
            .arg(to_json(app)?)
            .arg(flag(app.disabled))
            .arg(flag(app.from_config))
            .arg(APP_TTL_MS)
            .invoke_async(&mut conn)
            .await
            .map_err(map_err)?;
        if stored == 0 {
            return Ok(false);
        }
        let new: BTreeSet<String> = keys.iter().map(Digest::to_hex).collect();
        let set = appkeys_key(&app.id);
        // New keys first, old ones last: a key that stays never stops working meanwhile.
        let mut pipe = redis::pipe();
        for hex in &new {
            // Set membership before the mapping: a lookup that finds the mapping must find it
            // in the set, or it removes the mapping as left over.
            pipe.cmd("SADD").arg(&set).arg(hex).ignore();
            pipe.cmd("SET")
                .arg(key_key(hex))
                .arg(&app.id)
                .arg("PX")
                .arg(APP_TTL_MS)
                .ignore();
        }
        pipe.cmd("PEXPIRE").arg(&set).arg(APP_TTL_MS).ignore();
        pipe.cmd("SADD").arg(APPS).arg(&app.id).ignore();
        pipe.cmd("PEXPIRE").arg(APPS).arg(APP_TTL_MS).ignore();
        pipe.exec_async(&mut conn).await.map_err(map_err)?;
        if app.from_config {
            // Config is the source of truth for its apps: keys no longer listed stop working.
            let old: Vec<String> = redis::cmd("SMEMBERS")
                .arg(&set)
                .query_async(&mut conn)
                .await
                .map_err(map_err)?;
            for hex in old.iter().filter(|h| !new.contains(*h)) {
                redis::cmd("SREM")
                    .arg(&set)
                    .arg(hex)
                    .exec_async(&mut conn)
                    .await
                    .map_err(map_err)?;
                let _: i64 = self
                    .del_if_eq
                    .key(key_key(hex))
                    .arg(&app.id)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(map_err)?;
            }
        }
        Ok(true)
    }

    async fn list_apps_op(&self) -> Result<Vec<App>, StoreError> {
        let mut conn = self.conn();
        let mut ids: Vec<String> = redis::cmd("SMEMBERS")
            .arg(APPS)
            .query_async(&mut conn)
            .await
            .map_err(map_err)?;
        ids.sort();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HMGET")
                .arg(app_key(id))
                .arg("rec")
                .arg("disabled");
        }
        let recs: Vec<AppFields> = pipe.query_async(&mut conn).await.map_err(map_err)?;
        let mut apps = Vec::with_capacity(ids.len());
        let mut gone = Vec::new();
        for (id, (rec, disabled)) in ids.iter().zip(recs) {
            match decode_app(rec, disabled)? {
                Some(app) => apps.push(app),
                // Its record expired: drop it from the index too.
                None => gone.push(id),
            }
        }
        if !gone.is_empty() {
            redis::cmd("SREM")
                .arg(APPS)
                .arg(gone)
                .exec_async(&mut conn)
                .await
                .map_err(map_err)?;
        }
        Ok(apps)
    }

    async fn get_app_op(&self, id: &str) -> Result<Option<App>, StoreError> {
        let mut conn = self.conn();
        let (rec, disabled): AppFields = redis::cmd("HMGET")
            .arg(app_key(id))
            .arg("rec")
            .arg("disabled")
            .query_async(&mut conn)
            .await
            .map_err(map_err)?;
        decode_app(rec, disabled)
    }

    async fn set_app_disabled_op(&self, id: &str, disabled: bool) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let done: i64 = self
            .set_disabled
            .key(app_key(id))
            .arg(flag(disabled))
            .arg(APP_TTL_MS)
            .invoke_async(&mut conn)
            .await
            .map_err(map_err)?;
        Ok(done == 1)
    }

    async fn add_app_key_op(&self, id: &str, key: Digest) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let exists: bool = redis::cmd("EXISTS")
            .arg(app_key(id))
            .query_async(&mut conn)
            .await
            .map_err(map_err)?;
        if !exists {
            return Ok(false);
        }
        let hex = key.to_hex();
        let set = appkeys_key(id);
        // Membership before the mapping (see `put_app_op`).
        redis::pipe()
            .cmd("SADD")
            .arg(&set)
            .arg(&hex)
            .ignore()
            .cmd("SET")
            .arg(key_key(&hex))
            .arg(id)
            .arg("PX")
            .arg(APP_TTL_MS)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&set)
            .arg(APP_TTL_MS)
            .ignore()
            .cmd("PEXPIRE")
            .arg(app_key(id))
            .arg(APP_TTL_MS)
            .ignore()
            .exec_async(&mut conn)
            .await
            .map_err(map_err)?;
        Ok(true)
    }

    async fn app_for_key_op(&self, key: Digest) -> Result<Option<App>, StoreError> {
        let mut conn = self.conn();
        let hex = key.to_hex();
        let id: Option<String> = redis::cmd("GET")
            .arg(key_key(&hex))
            .query_async(&mut conn)
            .await
            .map_err(map_err)?;
        let Some(id) = id else {
            return Ok(None);
        };
        // Read and refresh together: refreshing a key that does not exist is a no-op.
        let ((rec, disabled), member): (AppFields, bool) = redis::pipe()
            .cmd("HMGET")
            .arg(app_key(&id))
            .arg("rec")
            .arg("disabled")
            .cmd("SISMEMBER")
            .arg(appkeys_key(&id))
            .arg(&hex)
            .cmd("PEXPIRE")
            .arg(app_key(&id))
            .arg(APP_TTL_MS)
            .ignore()
            .cmd("PEXPIRE")
            .arg(appkeys_key(&id))
            .arg(APP_TTL_MS)
            .ignore()
            .cmd("PEXPIRE")
            .arg(APPS)
            .arg(APP_TTL_MS)
            .ignore()
            .cmd("PEXPIRE")
            .arg(key_key(&hex))
            .arg(APP_TTL_MS)
            .ignore()
            .query_async(&mut conn)
            .await
            .map_err(map_err)?;
        let app = decode_app(rec, disabled)?;
        if app.is_none() || !member {
            // A mapping left behind (its app expired, or a crash while config replaced the
            // app's keys): remove it rather than keep refreshing it.
            let _: i64 = self
                .del_if_eq
                .key(key_key(&hex))
                .arg(&id)
                .invoke_async(&mut conn)
                .await
                .map_err(map_err)?;
            return Ok(None);
        }
        Ok(app)
    }

    async fn create_call_op(&self, call: &Call, code: Digest) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let key = call_key(&call.id);
        let code_hex = code.to_hex();
        let purge = at(purge_at(call));
        let rec = Call {
            participants: Vec::new(),
            ended_at: None,
            end_reason: None,
            ..call.clone()
        };
        let mut fields: Vec<(String, Vec<u8>)> = vec![
            ("rec".to_owned(), to_json(&rec)?),
            ("exp".to_owned(), call.expires_at.to_string().into_bytes()),
            (
                "max".to_owned(),
                call.max_participants.to_string().into_bytes(),
            ),
            ("code".to_owned(), code_hex.clone().into_bytes()),
            (
                "np".to_owned(),
                call.participants.len().to_string().into_bytes(),
            ),
        ];
        // The index points at the first participant of each id, as `admit`'s HSETNX does.
        let mut indexed = HashSet::new();
        for (i, p) in call.participants.iter().enumerate() {
            fields.push((format!("p:{}", i + 1), to_json(p)?));
            if indexed.insert(p.peer_id.as_str()) {
                fields.push((
                    format!("pi:{}", p.peer_id),
                    (i + 1).to_string().into_bytes(),
                ));
            }
        }
        fields.push(("pix".to_owned(), b"1".to_vec()));
        if let Some(ended_at) = call.ended_at {
            fields.push(("ended_at".to_owned(), ended_at.to_string().into_bytes()));
            let reason = call.end_reason.clone().unwrap_or_default();
            fields.push(("end_reason".to_owned(), reason.into_bytes()));
        }
        let history = history_key(&call.app_id);
        let mut pipe = redis::pipe();
        // MULTI/EXEC, not a plain pipeline: a pipeline's commands run one by one, so a dropped
        // connection, a crash or a refused command (ACL, OOM) part-way through would leave a
        // call without its history entry or a code without a live entry. Redis runs a
        // transaction whole or, if the connection drops before EXEC or a queued command is
        // refused, not at all. (This store talks to one Redis, not a Cluster: the transaction
        // spans the call's slot and the shared indexes, which only one node can do.)
        pipe.atomic();
        // The call first, then what points at it (the order still matters if Redis dies
        // mid-EXEC without an AOF).
        pipe.cmd("DEL").arg(&key).ignore();
        pipe.cmd("HSET").arg(&key).arg(fields).ignore();
        pipe.cmd("PEXPIREAT").arg(&key).arg(purge).ignore();
        if call.ended_at.is_none() {
            pipe.cmd("SET")
                .arg(code_key(&code_hex))
                .arg(&call.id)
                .arg("PXAT")
                .arg(at(call.expires_at))
                .ignore();
            pipe.cmd("ZADD")
                .arg(LIVE)
                .arg(call.expires_at)
                .arg(&call.id)
                .ignore();
            // NX sets a TTL on a new set, GT only ever lengthens it (GT alone would never set
            // one: it treats a key without TTL as living forever).
            for opt in ["NX", "GT"] {
                pipe.cmd("PEXPIREAT")
                    .arg(LIVE)
                    .arg(at(call.expires_at))
                    .arg(opt)
                    .ignore();
            }
        }
        pipe.cmd("ZADD")
            .arg(&history)
            .arg(call.created_at)
            .arg(&call.id)
            .ignore();
        for opt in ["NX", "GT"] {
            pipe.cmd("PEXPIREAT")
                .arg(&history)
                .arg(purge)
                .arg(opt)
                .ignore();
        }
        pipe.cmd("ZRANGE")
            .arg(&history)
            .arg(0)
            .arg(HISTORY_CLEANUP - 1)
            .arg("WITHSCORES");
        let (oldest,): (Vec<(String, f64)>,) =
            pipe.query_async(&mut conn).await.map_err(map_err)?;
        // Keep the history index from growing: its oldest entries whose call can be purged by
        // now (created over HISTORY_MS ago) and is gone from Redis are removed.
        let due: Vec<String> = oldest
            .into_iter()
            .filter(|(_, created)| (*created as u64).saturating_add(HISTORY_MS) <= call.created_at)
            .map(|(id, _)| id)
            .collect();
        if !due.is_empty() {
            let mut pipe = redis::pipe();
            for id in &due {
                pipe.cmd("EXISTS").arg(call_key(id));
            }
            let exists: Vec<bool> = pipe.query_async(&mut conn).await.map_err(map_err)?;
            let gone: Vec<&String> = due
                .iter()
                .zip(exists)
                .filter(|(_, e)| !e)
                .map(|(id, _)| id)
                .collect();
            if !gone.is_empty() {
                redis::cmd("ZREM")
                    .arg(&history)
                    .arg(gone)
                    .exec_async(&mut conn)
                    .await
                    .map_err(map_err)?;
            }
        }
        Ok(())
    }

    async fn get_call_op(&self, id: &str) -> Result<Option<Call>, StoreError> {
        let mut conn = self.conn();
        let flat: Vec<Vec<u8>> = redis::cmd("HGETALL")
            .arg(call_key(id))
            .query_async(&mut conn)
            .await
            .map_err(map_err)?;
        decode_call(&pairs(flat)?)
    }

    async fn list_calls_op(
        &self,
        app_id: &str,
        state: Option<CallState>,
        limit: usize,
        after: Option<&Cursor>,
        now: Millis,
    ) -> Result<Page, StoreError> {
        let mut conn = self.conn();
        let history = history_key(app_id);
        let mut scan = ListScan {
            state,
            limit,
            now,
            calls: Vec::new(),
            next: None,
            scanned: 0,
            last_seen: None,
            stale: Vec::new(),
        };
        // Entries are (created_at, id), newest first, ties by id descending (Redis orders
        // equal scores by member, byte-wise, like `String`'s `Ord`).
        let mut max = "+inf".to_owned();
        let mut done = false;
        if let Some(c) = after {
            // The cursor's own tie group first, below its id; then strictly older entries.
            let ties: Vec<String> = redis::cmd("ZREVRANGEBYSCORE")
                .arg(&history)
                .arg(c.created_at)
                .arg(c.created_at)
                .query_async(&mut conn)
                .await
                .map_err(map_err)?;
            let batch = ties
                .into_iter()
                .filter(|id| *id < c.id)
                .map(|id| (id, c.created_at))
                .collect();
            done = scan.examine(&mut conn, batch).await?;
            max = format!("({}", c.created_at);
        }
        while !done {
            let mut batch: Vec<(String, f64)> = redis::cmd("ZREVRANGEBYSCORE")
                .arg(&history)
                .arg(&max)
                .arg("-inf")
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(0)
                .arg(LIST_BATCH)
                .query_async(&mut conn)
                .await
                .map_err(map_err)?;
            let Some(&(_, last)) = batch.last() else {
                break;
            };
            let full = batch.len() == LIST_BATCH;
            if full {
                // The batch may have cut a group of equal scores: take that group whole.
                batch.retain(|(_, s)| *s != last);
                let ties: Vec<String> = redis::cmd("ZREVRANGEBYSCORE")
                    .arg(&history)
                    .arg(last)
                    .arg(last)
                    .query_async(&mut conn)
                    .await
                    .map_err(map_err)?;
                batch.extend(ties.into_iter().map(|id| (id, last)));
            }
            max = format!("({last}");
            let batch = batch.into_iter().map(|(id, s)| (id, s as u64)).collect();
            done = scan.examine(&mut conn, batch).await? || !full;
        }
        if !scan.stale.is_empty() {
            // Entries whose call Redis already expired.
            redis::cmd("ZREM")
                .arg(&history)
                .arg(&scan.stale)
                .exec_async(&mut conn)
                .await
                .map_err(map_err)?;
        }
        Ok(Page {
            calls: scan.calls,
            next: scan.next,
        })
    }
}

/// One `list_calls` in progress.
struct ListScan {
    state: Option<CallState>,
    limit: usize,
    now: Millis,
    calls: Vec<Call>,
    next: Option<Cursor>,
    scanned: usize,
    /// The last entry looked at.
    last_seen: Option<Cursor>,
    /// History entries whose call is gone.
    stale: Vec<String>,
}

impl ListScan {
    /// Looks at a batch of history entries `(id, created_at)` in order; `true` when the page is
    /// complete or the scan budget is spent (`next` is then set if more may follow).
    async fn examine(
        &mut self,
        conn: &mut ConnectionManager,
        batch: Vec<(String, Millis)>,
    ) -> Result<bool, StoreError> {
        if batch.is_empty() {
            return Ok(false);
        }
        let mut pipe = redis::pipe();
        for (id, _) in &batch {
            pipe.cmd("HGETALL").arg(call_key(id));
        }
        let replies: Vec<Vec<Vec<u8>>> = pipe.query_async(conn).await.map_err(map_err)?;
        for ((id, created_at), flat) in batch.into_iter().zip(replies) {
            if self.scanned == LIST_SCAN_BUDGET {
                // A short page whose cursor continues after the last entry looked at.
                self.next = self.last_seen.take();
                return Ok(true);
            }
            self.scanned += 1;
            self.last_seen = Some(Cursor {
                created_at,
                id: id.clone(),
            });
            let Some(call) = decode_call(&pairs(flat)?)? else {
                self.stale.push(id);
                continue;
            };
            // Lazily dropped: out of history even if Redis has not expired it yet.
            let now = self.now;
            if purge_at(&call) <= now || self.state.is_some_and(|s| call.state(now) != s) {
                continue;
            }
            if self.calls.len() == self.limit {
                // One more follows this full page.
                self.next = self.calls.last().map(|last| Cursor {
                    created_at: last.created_at,
                    id: last.id.clone(),
                });
                return Ok(true);
            }
            self.calls.push(call);
        }
        Ok(false)
    }
}

impl RedisStore {
    async fn call_for_code_op(
        &self,
        code: Digest,
        now: Millis,
    ) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn();
        let id: Option<String> = redis::cmd("GET")
            .arg(code_key(&code.to_hex()))
            .query_async(&mut conn)
            .await
            .map_err(map_err)?;
        let Some(id) = id else {
            return Ok(None);
        };
        // The code key may outlive the call's end (see the module doc): the call decides.
        let (exp, ended): (Option<Vec<u8>>, Option<Vec<u8>>) = redis::cmd("HMGET")
            .arg(call_key(&id))
            .arg("exp")
            .arg("ended_at")
            .query_async(&mut conn)
            .await
            .map_err(map_err)?;
        let Some(exp) = exp else {
            return Ok(None);
        };
        let exp: Millis = parse_num(&exp, "exp")?;
        Ok((ended.is_none() && now < exp).then_some(id))
    }

    async fn end_call_op(
        &self,
        id: &str,
        reason: &str,
        now: Millis,
    ) -> Result<Option<Call>, StoreError> {
        let mut conn = self.conn();
        let (status, flat): ScriptReply = self
            .end
            .key(call_key(id))
            .arg(now)
            .arg(reason)
            .arg(at(now.saturating_add(HISTORY_MS)))
            .invoke_async(&mut conn)
            .await
            .map_err(map_err)?;
        match status.as_str() {
            "ok" => {}
            "gone" => return Ok(None),
            _ => return Err(corrupt("call record unreadable")),
        }
        let fields = pairs(flat)?;
        let Some(call) = decode_call(&fields)? else {
            return Ok(None);
        };
        if call.state(now) == CallState::Ended {
            // The cross-slot rest, after the call is marked ended; idempotent, so ending again
            // finishes what a crash may have left.
            let mut pipe = redis::pipe();
            pipe.cmd("ZREM").arg(LIVE).arg(id).ignore();
            pipe.exec_async(&mut conn).await.map_err(map_err)?;
            if let Some(code) = fields.get("code") {
                let code = String::from_utf8_lossy(code);
                let _: i64 = self
                    .del_if_eq
                    .key(code_key(&code))
                    .arg(id)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(map_err)?;
            }
        }
        Ok(Some(call))
    }

    async fn put_token_op(&self, token: Digest, grant: &TokenGrant) -> Result<(), StoreError> {
        let mut conn = self.conn();
        redis::cmd("SET")
            .arg(token_key(token))
            .arg(to_json(grant)?)
            .arg("PXAT")
            .arg(at(grant.expires_at))
            .exec_async(&mut conn)
            .await
            .map_err(map_err)
    }

    async fn redeem_token_op(
        &self,
        token: Digest,
        now: Millis,
    ) -> Result<Option<TokenGrant>, StoreError> {
        // GETDEL is atomic: of concurrent redemptions exactly one gets the value.
        self.read_token("GETDEL", token, now).await
    }

    async fn peek_token_op(
        &self,
        token: Digest,
        now: Millis,
    ) -> Result<Option<TokenGrant>, StoreError> {
        self.read_token("GET", token, now).await
    }

    /// The grant of `token` read with `command` (`GET`, or `GETDEL` to use it up); `None` when
    /// absent or expired at `now`.
    async fn read_token(
        &self,
        command: &str,
        token: Digest,
        now: Millis,
    ) -> Result<Option<TokenGrant>, StoreError> {
        let mut conn = self.conn();
        let raw: Option<Vec<u8>> = redis::cmd(command)
            .arg(token_key(token))
            .query_async(&mut conn)
            .await
            .map_err(map_err)?;
        let Some(raw) = raw else {
            return Ok(None);
        };
        let grant: TokenGrant = json(&raw, "token grant")?;
        Ok((now < grant.expires_at).then_some(grant))
    }

    async fn admit_op(
        &self,
        call_id: &str,
        participant: &Participant,
        token: Option<Digest>,
        now: Millis,
    ) -> Result<Admission, StoreError> {
        let mut conn = self.conn();
        let (status, flat): ScriptReply = self
            .admit
            .key(call_key(call_id))
            .arg(now)
            .arg(to_json(participant)?)
            .arg(&participant.peer_id)
            .arg(token.map(|t| t.to_hex()).unwrap_or_default())
            .arg(super::JOINS_PER_SEAT)
            .invoke_async(&mut conn)
            .await
            .map_err(map_err)?;
        let admission = match status.as_str() {
            "ok" => match decode_call(&pairs(flat)?)? {
                Some(call) => Admission::Admitted(call),
                None => return Err(corrupt("admitted to an empty call")),
            },
            "full" => Admission::Full,
            "limit" => Admission::JoinLimit,
            "gone" => Admission::Gone,
            _ => return Err(corrupt("call record unreadable")),
        };
        if let (Admission::Admitted(_), Some(token)) = (&admission, token) {
            // The token key is in another slot, so it goes after the script (like ending a
            // call's code). The call's `t:` mark already refuses the token a second time; this
            // only tidies up, so a failure here must not turn an admission into a 503 (whose
            // retry would then find the token used).
            let deleted: Result<(), _> = redis::cmd("DEL")
                .arg(token_key(token))
                .exec_async(&mut conn)
                .await;
            if let Err(e) = deleted {
                tracing::warn!(error = %e, "used participant token left to expire");
            }
        }
        Ok(admission)
    }

    /// Applies `change` to participant `peer_id` of call `call_id` by compare-and-set (see the
    /// module doc) and returns it as changed; `None` if the call or peer is unknown.
    async fn update_participant_op(
        &self,
        call_id: &str,
        peer_id: &str,
        change: impl Fn(&mut Participant),
    ) -> Result<Option<Participant>, StoreError> {
        let mut conn = self.conn();
        let key = call_key(call_id);
        for _ in 0..CAS_ATTEMPTS {
            let found: Vec<Vec<u8>> = self
                .find
                .key(&key)
                .arg(peer_id)
                .invoke_async(&mut conn)
                .await
                .map_err(map_err)?;
            let mut found = found.into_iter();
            let (field, raw) = match (found.next(), found.next(), found.next()) {
                (None, _, _) => return Ok(None),
                (Some(field), Some(raw), None) => (field, raw),
                _ => return Err(corrupt("participant lookup answered something else")),
            };
            let mut participant: Participant = json(&raw, "participant")?;
            change(&mut participant);
            let new = to_json(&participant)?;
            if new == raw {
                // Nothing to write (a repeated kick, the same media again).
                return Ok(Some(participant));
            }
            let written: i64 = self
                .cas
                .key(&key)
                .arg(field)
                .arg(raw)
                .arg(new)
                .invoke_async(&mut conn)
                .await
                .map_err(map_err)?;
            if written == 1 {
                return Ok(Some(participant));
            }
            // Someone changed it since we read it: read their version and apply ours to it.
        }
        Err(StoreError::Unavailable(
            "participant update kept conflicting".to_owned(),
        ))
    }

    async fn hit_op(
        &self,
        key: &str,
        window_ms: u64,
        now: Millis,
    ) -> Result<(u64, u64), StoreError> {
        let mut conn = self.conn();
        // PEXPIRE refuses 0 and Redis's arithmetic must not overflow; the window's end itself
        // is exact (a 0 ms window ends at once, as in memory).
        let ttl = window_ms.clamp(1, 1 << 53);
        let (hits, left): (i64, i64) = self
            .hit
            .key(rl_key(key))
            .arg(now)
            .arg(ttl)
            .arg(now.saturating_add(window_ms))
            .invoke_async(&mut conn)
            .await
            .map_err(map_err)?;
        Ok((hits.max(0) as u64, (left.max(0) as u64).min(window_ms)))
    }

    async fn peek_op(&self, key: &str, now: Millis) -> Result<(u64, u64), StoreError> {
        let mut conn = self.conn();
        // One HMGET reads both fields at once; a window past its end counts nothing, as in
        // `HIT` (the key may outlive it by the PEXPIRE clamp).
        let (n, end): (Option<u64>, Option<u64>) = redis::cmd("HMGET")
            .arg(rl_key(key))
            .arg("n")
            .arg("end")
            .query_async(&mut conn)
            .await
            .map_err(map_err)?;
        Ok(match (n, end) {
            (Some(n), Some(end)) if now < end => (n, end - now),
            _ => (0, 0),
        })
    }

    async fn live_calls_op(&self, now: Millis) -> Result<u64, StoreError> {
        let mut conn = self.conn();
        // Expired entries go (ended ones left when they ended); the rest are live.
        let (count,): (u64,) = redis::pipe()
            .cmd("ZREMRANGEBYSCORE")
            .arg(LIVE)
            .arg("-inf")
            .arg(now)
            .ignore()
            .cmd("ZCOUNT")
            .arg(LIVE)
            .arg(format!("({now}"))
            .arg("+inf")
            .query_async(&mut conn)
            .await
            .map_err(map_err)?;
        Ok(count)
    }

    async fn ping_op(&self) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let pong: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(map_err)?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(corrupt("PING answered something else"))
        }
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn put_app(&self, app: &App, keys: &[Digest]) -> Result<bool, StoreError> {
        self.timed(self.put_app_op(app, keys)).await
    }

    async fn list_apps(&self) -> Result<Vec<App>, StoreError> {
        self.timed(self.list_apps_op()).await
    }

    async fn get_app(&self, id: &str) -> Result<Option<App>, StoreError> {
        self.timed(self.get_app_op(id)).await
    }

    async fn set_app_disabled(&self, id: &str, disabled: bool) -> Result<bool, StoreError> {
        self.timed(self.set_app_disabled_op(id, disabled)).await
    }

    async fn add_app_key(&self, id: &str, key: Digest) -> Result<bool, StoreError> {
        self.timed(self.add_app_key_op(id, key)).await
    }

    async fn app_for_key(&self, key: Digest) -> Result<Option<App>, StoreError> {
        self.timed(self.app_for_key_op(key)).await
    }

    async fn create_call(&self, call: &Call, code: Digest) -> Result<(), StoreError> {
        self.timed(self.create_call_op(call, code)).await
    }

    async fn get_call(&self, id: &str) -> Result<Option<Call>, StoreError> {
        self.timed(self.get_call_op(id)).await
    }

    async fn list_calls(
        &self,
        app_id: &str,
        state: Option<CallState>,
        limit: usize,
        after: Option<&Cursor>,
        now: Millis,
    ) -> Result<Page, StoreError> {
        self.timed(self.list_calls_op(app_id, state, limit, after, now))
            .await
    }

    async fn call_for_code(&self, code: Digest, now: Millis) -> Result<Option<String>, StoreError> {
        self.timed(self.call_for_code_op(code, now)).await
    }

    async fn end_call(
        &self,
        id: &str,
        reason: &str,
        now: Millis,
    ) -> Result<Option<Call>, StoreError> {
        self.timed(self.end_call_op(id, reason, now)).await
    }

    async fn put_token(&self, token: Digest, grant: &TokenGrant) -> Result<(), StoreError> {
        self.timed(self.put_token_op(token, grant)).await
    }

    async fn redeem_token(
        &self,
        token: Digest,
        now: Millis,
    ) -> Result<Option<TokenGrant>, StoreError> {
        self.timed(self.redeem_token_op(token, now)).await
    }

    async fn admit(
        &self,
        call_id: &str,
        participant: &Participant,
        now: Millis,
    ) -> Result<Admission, StoreError> {
        self.timed(self.admit_op(call_id, participant, None, now))
            .await
    }

    async fn peek_token(
        &self,
        token: Digest,
        now: Millis,
    ) -> Result<Option<TokenGrant>, StoreError> {
        self.timed(self.peek_token_op(token, now)).await
    }

    async fn admit_with_token(
        &self,
        token: Digest,
        call_id: &str,
        participant: &Participant,
        now: Millis,
    ) -> Result<Admission, StoreError> {
        self.timed(self.admit_op(call_id, participant, Some(token), now))
            .await
    }

    async fn set_left(
        &self,
        call_id: &str,
        peer_id: &str,
        left_at: Option<Millis>,
    ) -> Result<bool, StoreError> {
        let op = self.update_participant_op(call_id, peer_id, |p| p.apply_left(left_at));
        Ok(self.timed(op).await?.is_some())
    }

    async fn mark_connected(
        &self,
        call_id: &str,
        peer_id: &str,
        now: Millis,
    ) -> Result<Option<Participant>, StoreError> {
        // Compare-and-set of the one participant, like the other changes: the lapse check and
        // the mark see the same version of the record.
        self.timed(self.update_participant_op(call_id, peer_id, |p| p.apply_connected(now)))
            .await
    }

    async fn mark_disconnected(
        &self,
        call_id: &str,
        peer_id: &str,
        seat_until: Millis,
    ) -> Result<bool, StoreError> {
        let op = self.update_participant_op(call_id, peer_id, |p| {
            p.apply_disconnected(seat_until);
        });
        Ok(self.timed(op).await?.is_some())
    }

    async fn set_media(
        &self,
        call_id: &str,
        peer_id: &str,
        media: Media,
    ) -> Result<bool, StoreError> {
        let op = self.update_participant_op(call_id, peer_id, |p| p.media = media);
        Ok(self.timed(op).await?.is_some())
    }

    async fn set_quality(
        &self,
        call_id: &str,
        peer_id: &str,
        quality: &Quality,
    ) -> Result<bool, StoreError> {
        let op =
            self.update_participant_op(call_id, peer_id, |p| p.quality = Some(quality.clone()));
        Ok(self.timed(op).await?.is_some())
    }

    async fn kick(
        &self,
        call_id: &str,
        peer_id: &str,
        now: Millis,
    ) -> Result<Option<Participant>, StoreError> {
        self.timed(self.update_participant_op(call_id, peer_id, |p| p.apply_kick(now)))
            .await
    }

    async fn hit(&self, key: &str, window_ms: u64, now: Millis) -> Result<(u64, u64), StoreError> {
        self.timed(self.hit_op(key, window_ms, now)).await
    }

    async fn peek(&self, key: &str, now: Millis) -> Result<(u64, u64), StoreError> {
        self.timed(self.peek_op(key, now)).await
    }

    async fn live_calls(&self, now: Millis) -> Result<u64, StoreError> {
        self.timed(self.live_calls_op(now)).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.timed(self.ping_op()).await
    }
}
