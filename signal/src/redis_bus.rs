//! The [`Bus`] on Redis: pub/sub per call, a presence hash per call, a heartbeat per node.
//!
//! | key / channel | type | what | TTL |
//! |---|---|---|---|
//! | `tp:{c:CALL}:sig` | pub/sub channel | [`Envelope`] JSON | — |
//! | `tp:{c:CALL}:peers` | hash | peer id → [`PeerInfo`] JSON | set on every write (the room's presence TTL) |
//! | `tp:revoke` | pub/sub channel | [`Revocation`] JSON, for every node's relay | — |
//! | `tp:node:NODE` | string | `1` while the node lives | `signal.node-timeout`, refreshed every third of it |
//!
//! A call's keys share the hash tag `{c:CALL}` with the control plane's call hash, so they live
//! in one Redis Cluster slot.
//!
//! Commands go through a [`ConnectionManager`] (reconnects by itself) with per-command
//! timeouts. Subscriptions live on one dedicated pub/sub connection owned by a task: it keeps
//! the wanted set of calls, (re)subscribes them on every new connection, forwards messages to
//! the rooms with `try_send`, and sends a room a [`BusEvent::Resync`] once its call is
//! subscribed, and every room after a reconnect: messages published before the `SUBSCRIBE`
//! took effect are lost, so rooms re-read presence. That closes the window of two peers joining
//! one call on two nodes at once: a peer's presence is written before its `peer_joined` is
//! published, so a peer whose announcement came too early is in the presence read after the
//! subscription.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{mpsc, watch, Notify, OnceCell};

use crate::bus::{Bus, BusError, BusEvent, Envelope, PeerInfo, Removal, Revocation};

/// Options of a [`RedisBus`].
#[derive(Debug, Clone)]
pub struct RedisBusOptions {
    /// A node whose heartbeat is older than this is dead (`signal.node-timeout`).
    pub node_timeout: Duration,
    /// How long one command may take; past it the bus answers [`BusError::Unavailable`]. Far
    /// below the HTTP request timeout, and below the heartbeat interval.
    pub command_timeout: Duration,
}

impl Default for RedisBusOptions {
    fn default() -> Self {
        Self {
            node_timeout: Duration::from_secs(15),
            command_timeout: Duration::from_secs(1),
        }
    }
}

/// Longest wait between two attempts at the pub/sub connection while Redis is down: short
/// enough that signaling across nodes comes back within seconds of Redis.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// First wait after a failed attempt.
const MIN_BACKOFF: Duration = Duration::from_millis(100);

/// Redis pub/sub, presence and heartbeats for several signaling nodes.
pub struct RedisBus {
    node: String,
    client: redis::Client,
    opts: RedisBusOptions,
    conn: OnceCell<ConnectionManager>,
    /// Calls wanted → their rooms' senders. A plain mutex: touched when a room starts or ends
    /// and by the pub/sub task per message (a map lookup), never across an await.
    subs: Mutex<HashMap<String, mpsc::Sender<Envelope>>>,
    /// Wakes the pub/sub task when `subs` changed.
    changed: Arc<Notify>,
    /// Calls subscribed on the current pub/sub connection (for [`RedisBus::wait_subscribed`]).
    active: watch::Sender<HashSet<String>>,
    /// Where revocations from other nodes go.
    revocations: Mutex<Option<mpsc::Sender<Revocation>>>,
    heartbeat: AtomicBool,
    stopped: AtomicBool,
    errors: AtomicU64,
    dropped: AtomicU64,
}

impl std::fmt::Debug for RedisBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the URL: it may carry a password.
        f.debug_struct("RedisBus")
            .field("node", &self.node)
            .field("errors", &self.errors.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn unavailable(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(e.to_string())
}

fn channel(call: &str) -> String {
    format!("tp:{{c:{call}}}:sig")
}

fn presence_key(call: &str) -> String {
    format!("tp:{{c:{call}}}:peers")
}

/// Deletes a presence entry only if node `ARGV[2]` wrote it: `{1, ""}` deleted, `{0, ""}` no
/// entry, `{2, entry}` another node's entry (left in place). An entry that is not JSON is
/// nobody's and is deleted.
const REMOVE_IF_NODE: &str = r"
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return {0, ''} end
local ok, p = pcall(cjson.decode, v)
if ok and type(p) == 'table' and p.node ~= ARGV[2] then return {2, v} end
redis.call('HDEL', KEYS[1], ARGV[1])
return {1, ''}
";

/// The channel every node listens on for revocations (not per call: a call's allocations may
/// be on relays of nodes that have no room of it).
const REVOKE_CHANNEL: &str = "tp:revoke";

fn node_key(node: &str) -> String {
    format!("tp:node:{node}")
}

/// The call id of a channel name `tp:{c:CALL}:sig`.
fn call_of(channel: &str) -> Option<&str> {
    channel.strip_prefix("tp:{c:")?.strip_suffix("}:sig")
}

impl RedisBus {
    /// A bus on `url` for node `node`. Redis need not be up: commands fail with
    /// [`BusError::Unavailable`] until it is, and the pub/sub task and the heartbeat keep trying.
    /// Spawns its tasks on the current tokio runtime.
    pub fn new(url: &str, node: String, opts: RedisBusOptions) -> Result<Arc<Self>, BusError> {
        let client = redis::Client::open(url).map_err(|e| BusError::Unavailable(e.to_string()))?;
        let bus = Arc::new(Self {
            node,
            client,
            opts,
            conn: OnceCell::new(),
            subs: Mutex::new(HashMap::new()),
            changed: Arc::new(Notify::new()),
            active: watch::channel(HashSet::new()).0,
            revocations: Mutex::new(None),
            heartbeat: AtomicBool::new(true),
            stopped: AtomicBool::new(false),
            errors: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        });
        tokio::spawn(pubsub_task(Arc::downgrade(&bus)));
        tokio::spawn(heartbeat_task(Arc::downgrade(&bus)));
        Ok(bus)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, mpsc::Sender<Envelope>>> {
        self.subs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Failed commands and connection attempts so far.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Envelopes dropped because a room's queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Resolves once `call_id` is subscribed on the current pub/sub connection.
    pub async fn wait_subscribed(&self, call_id: &str) {
        let mut rx = self.active.subscribe();
        let _ = rx.wait_for(|s| s.contains(call_id)).await;
    }

    /// Stops refreshing the heartbeat without removing it, as a crashed node would (tests).
    pub fn stop_heartbeat(&self) {
        self.heartbeat.store(false, Ordering::Relaxed);
    }

    /// Stops the tasks and deletes this node's heartbeat (a clean shutdown: the others report
    /// its peers at once on their next check rather than after the node timeout).
    pub async fn shutdown(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        self.heartbeat.store(false, Ordering::Relaxed);
        self.changed.notify_one();
        let key = node_key(&self.node);
        let _ =
            self.run(move |mut c| async move {
                redis::cmd("DEL").arg(key).query_async::<()>(&mut c).await
            })
            .await;
    }

    async fn manager(&self) -> Result<ConnectionManager, BusError> {
        let client = self.client.clone();
        let timeout = self.opts.command_timeout;
        let conn = tokio::time::timeout(
            timeout * 2,
            self.conn.get_or_try_init(|| async move {
                let config = ConnectionManagerConfig::new()
                    .set_response_timeout(timeout)
                    .set_connection_timeout(timeout);
                client.get_connection_manager_with_config(config).await
            }),
        )
        .await
        .map_err(|_| BusError::Unavailable("connect timed out".into()))?
        .map_err(unavailable)?;
        Ok(conn.clone())
    }

    /// Runs one command (or pipeline) with the bus's timeout, counting failures.
    async fn run<T, F, Fut>(&self, f: F) -> Result<T, BusError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let result = async {
            let conn = self.manager().await?;
            match tokio::time::timeout(self.opts.command_timeout, f(conn)).await {
                Ok(r) => r.map_err(unavailable),
                Err(_) => Err(BusError::Unavailable("command timed out".into())),
            }
        }
        .await;
        if result.is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn deliver(&self, call: &str, env: Envelope) {
        let mut subs = self.lock();
        let Some(tx) = subs.get(call) else { return };
        match tx.try_send(env) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                subs.remove(call);
                self.changed.notify_one();
            }
        }
    }
}

#[async_trait]
impl Bus for RedisBus {
    fn node_id(&self) -> &str {
        &self.node
    }

    fn subscribe(&self, call_id: &str, tx: mpsc::Sender<Envelope>) {
        self.lock().insert(call_id.to_owned(), tx);
        self.changed.notify_one();
    }

    fn unsubscribe(&self, call_id: &str) {
        self.lock().remove(call_id);
        self.changed.notify_one();
    }

    async fn publish(&self, call_id: &str, event: &BusEvent) -> Result<(), BusError> {
        let env = Envelope {
            node: self.node.clone(),
            event: event.clone(),
        };
        let payload = serde_json::to_string(&env).map_err(|e| BusError::Corrupt(e.to_string()))?;
        let ch = channel(call_id);
        self.run(move |mut c| async move {
            redis::cmd("PUBLISH")
                .arg(ch)
                .arg(payload)
                .query_async::<i64>(&mut c)
                .await
        })
        .await
        .map(|_| ())
    }

    async fn presence_put(
        &self,
        call_id: &str,
        peer: &PeerInfo,
        ttl_ms: u64,
    ) -> Result<(), BusError> {
        let json = serde_json::to_string(peer).map_err(|e| BusError::Corrupt(e.to_string()))?;
        let key = presence_key(call_id);
        let field = peer.peer_id.clone();
        self.run(move |mut c| async move {
            redis::pipe()
                .atomic()
                .hset(&key, field, json)
                .ignore()
                .pexpire(&key, ttl_ms as i64)
                .ignore()
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    async fn presence_remove(
        &self,
        call_id: &str,
        peer_id: &str,
        node: &str,
    ) -> Result<Removal, BusError> {
        let key = presence_key(call_id);
        let (field, node) = (peer_id.to_owned(), node.to_owned());
        let (code, entry): (i64, String) = self
            .run(move |mut c| async move {
                redis::Script::new(REMOVE_IF_NODE)
                    .key(key)
                    .arg(field)
                    .arg(node)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(match code {
            1 => Removal::Removed,
            2 => match serde_json::from_str(&entry) {
                Ok(p) => Removal::Elsewhere(p),
                Err(e) => return Err(BusError::Corrupt(e.to_string())),
            },
            _ => Removal::Absent,
        })
    }

    async fn presence(&self, call_id: &str) -> Result<Vec<PeerInfo>, BusError> {
        let key = presence_key(call_id);
        let all: HashMap<String, String> =
            self.run(move |mut c| async move {
                redis::cmd("HGETALL").arg(key).query_async(&mut c).await
            })
            .await?;
        let mut peers = Vec::with_capacity(all.len());
        for (id, json) in all {
            match serde_json::from_str::<PeerInfo>(&json) {
                Ok(p) if p.peer_id == id => peers.push(p),
                // Foreign or damaged data is skipped, never trusted.
                _ => tracing::warn!("unreadable presence entry skipped"),
            }
        }
        Ok(peers)
    }

    async fn publish_revocation(&self, group: &str, until_unix: u64) -> Result<(), BusError> {
        let r = Revocation {
            node: self.node.clone(),
            group: group.to_owned(),
            until_unix,
        };
        let payload = serde_json::to_string(&r).map_err(|e| BusError::Corrupt(e.to_string()))?;
        self.run(move |mut c| async move {
            redis::cmd("PUBLISH")
                .arg(REVOKE_CHANNEL)
                .arg(payload)
                .query_async::<i64>(&mut c)
                .await
        })
        .await
        .map(|_| ())
    }

    fn on_revocation(&self, tx: mpsc::Sender<Revocation>) {
        *self
            .revocations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tx);
    }

    async fn alive(&self, nodes: &[String]) -> Result<Vec<bool>, BusError> {
        if nodes.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = nodes.iter().map(|n| node_key(n)).collect();
        let values: Vec<Option<String>> = self
            .run(move |mut c| async move { redis::cmd("MGET").arg(keys).query_async(&mut c).await })
            .await?;
        Ok(values.into_iter().map(|v| v.is_some()).collect())
    }
}

/// Keeps this node's heartbeat: set for `node_timeout`, refreshed every third of it.
async fn heartbeat_task(bus: std::sync::Weak<RedisBus>) {
    loop {
        let Some(b) = bus.upgrade() else { return };
        if b.stopped.load(Ordering::Relaxed) {
            return;
        }
        let every = b.opts.node_timeout / 3;
        if b.heartbeat.load(Ordering::Relaxed) {
            let key = node_key(&b.node);
            let px = b.opts.node_timeout.as_millis() as u64;
            let r = b
                .run(move |mut c| async move {
                    redis::cmd("SET")
                        .arg(key)
                        .arg(1)
                        .arg("PX")
                        .arg(px)
                        .query_async::<()>(&mut c)
                        .await
                })
                .await;
            if let Err(e) = r {
                tracing::debug!(error = %e, "heartbeat failed");
            }
        }
        drop(b);
        tokio::time::sleep(every).await;
    }
}

/// Owns the pub/sub connection: connect, subscribe what is wanted, forward, and start over
/// when the connection drops. Holds the bus only weakly between turns, so dropping the bus
/// ends the task.
async fn pubsub_task(weak: std::sync::Weak<RedisBus>) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let Some(b) = weak.upgrade() else { return };
        if b.stopped.load(Ordering::Relaxed) {
            return;
        }
        let attempt = tokio::time::timeout(b.opts.command_timeout * 2, b.client.get_async_pubsub());
        let Ok(Ok(ps)) = attempt.await else {
            b.errors.fetch_add(1, Ordering::Relaxed);
            drop(b);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            continue;
        };
        drop(b);
        backoff = MIN_BACKOFF;
        serve_connection(&weak, ps).await;
        if let Some(b) = weak.upgrade() {
            b.active.send_replace(HashSet::new());
        }
    }
}

/// One pub/sub connection's life; returns when it is gone (or the bus is).
async fn serve_connection(weak: &std::sync::Weak<RedisBus>, ps: redis::aio::PubSub) {
    let (mut sink, mut stream) = ps.split();
    {
        let Some(b) = weak.upgrade() else { return };
        let r = tokio::time::timeout(b.opts.command_timeout, sink.subscribe(REVOKE_CHANNEL));
        if !matches!(r.await, Ok(Ok(()))) {
            b.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    let mut subscribed: HashSet<String> = HashSet::new();
    loop {
        let Some(b) = weak.upgrade() else { return };
        if b.stopped.load(Ordering::Relaxed) {
            return;
        }
        // Register for changes before reading the wanted set, so none is missed.
        let notify = Arc::clone(&b.changed);
        let changed = notify.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let wanted: HashSet<String> = b.lock().keys().cloned().collect();
        let mut newly = Vec::new();
        for call in wanted.difference(&subscribed).cloned().collect::<Vec<_>>() {
            let r = tokio::time::timeout(b.opts.command_timeout, sink.subscribe(channel(&call)));
            if !matches!(r.await, Ok(Ok(()))) {
                b.errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
            subscribed.insert(call.clone());
            newly.push(call);
        }
        for call in subscribed.difference(&wanted).cloned().collect::<Vec<_>>() {
            let r = tokio::time::timeout(b.opts.command_timeout, sink.unsubscribe(channel(&call)));
            if !matches!(r.await, Ok(Ok(()))) {
                b.errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
            subscribed.remove(&call);
        }
        b.active.send_replace(subscribed.clone());
        // What was published before a call's SUBSCRIBE took effect (on a new connection: every
        // call's, including while the last one was down) is lost: those rooms re-read presence.
        for call in &newly {
            let env = Envelope {
                node: b.node.clone(),
                event: BusEvent::Resync,
            };
            b.deliver(call, env);
        }
        drop(b);
        let next = tokio::select! {
            m = stream.next() => Some(m),
            _ = &mut changed => None,
        };
        let Some(b) = weak.upgrade() else { return };
        match next {
            // Subscriptions changed: the next turn applies them.
            None => {}
            Some(None) => {
                tracing::warn!("Redis pub/sub connection lost; reconnecting");
                b.errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Some(Some(msg)) if msg.get_channel_name() == REVOKE_CHANNEL => {
                match msg
                    .get_payload::<String>()
                    .ok()
                    .and_then(|p| serde_json::from_str::<Revocation>(&p).ok())
                {
                    Some(r) if r.node != b.node => {
                        let tx = b
                            .revocations
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .clone();
                        if let Some(tx) = tx {
                            if tx.try_send(r).is_err() {
                                b.dropped.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Some(_) => {}
                    None => tracing::warn!("unreadable revocation dropped"),
                }
            }
            Some(Some(msg)) => {
                let call = call_of(msg.get_channel_name()).map(str::to_owned);
                let payload = msg.get_payload::<String>();
                if let (Some(call), Ok(payload)) = (call, payload) {
                    match serde_json::from_str::<Envelope>(&payload) {
                        // Our own envelopes come back too: nothing to do with them.
                        Ok(env) if env.node != b.node => b.deliver(&call, env),
                        Ok(_) => {}
                        Err(_) => tracing::warn!("unreadable bus message dropped"),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_carry_the_call_id_in_the_hash_tag() {
        assert_eq!(channel("c_abc"), "tp:{c:c_abc}:sig");
        assert_eq!(call_of(&channel("c_abc")), Some("c_abc"));
        assert_eq!(call_of("tp:other"), None);
        assert_eq!(presence_key("c_x"), "tp:{c:c_x}:peers");
    }
}
