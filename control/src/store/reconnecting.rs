//! A Redis store that connects on first use and keeps trying while Redis is down.
//!
//! [`RedisStore::connect`] fails when Redis cannot be reached, but a node must start (and stay
//! live, `/ready` answering 503) while Redis is down, then serve as soon as it is back. Once
//! connected, the connection manager inside [`RedisStore`] reconnects by itself; this wrapper
//! only covers the time before the first successful connection.

use async_trait::async_trait;
use tokio::sync::OnceCell;

use super::{
    Admission, App, Call, CallState, Cursor, Digest, Media, Millis, Page, Participant, Quality,
    RedisStore, Store, StoreError, StoreMetrics, TokenGrant,
};

/// [`RedisStore`], connected on first use; every operation before that tries to connect once
/// (bounded by the store's command timeout) and answers [`StoreError::Unavailable`] if it can't.
pub struct Reconnecting {
    url: String,
    metrics: StoreMetrics,
    store: OnceCell<RedisStore>,
}

impl std::fmt::Debug for Reconnecting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the URL: it may carry a password.
        f.debug_struct("Reconnecting")
            .field("connected", &self.store.initialized())
            .finish_non_exhaustive()
    }
}

impl Reconnecting {
    /// A store for `url` that has not connected yet, reporting to `metrics`. Each failed
    /// connection attempt counts as an `unavailable` error there ([`RedisStore::connect`] counts
    /// it), so a Redis that was never reachable shows in the error rate like one that went away.
    pub fn new(url: String, metrics: StoreMetrics) -> Self {
        Self {
            url,
            metrics,
            store: OnceCell::new(),
        }
    }

    async fn get(&self) -> Result<&RedisStore, StoreError> {
        // Concurrent callers wait for one attempt; a failed attempt leaves the cell empty, so
        // the next call tries again.
        self.store
            .get_or_try_init(|| RedisStore::connect(&self.url, self.metrics.clone()))
            .await
    }
}

#[async_trait]
impl Store for Reconnecting {
    async fn put_app(&self, app: &App, keys: &[Digest]) -> Result<bool, StoreError> {
        self.get().await?.put_app(app, keys).await
    }
    async fn list_apps(&self) -> Result<Vec<App>, StoreError> {
        self.get().await?.list_apps().await
    }
    async fn get_app(&self, id: &str) -> Result<Option<App>, StoreError> {
        self.get().await?.get_app(id).await
    }
    async fn set_app_disabled(&self, id: &str, disabled: bool) -> Result<bool, StoreError> {
        self.get().await?.set_app_disabled(id, disabled).await
    }
    async fn add_app_key(&self, id: &str, key: Digest) -> Result<bool, StoreError> {
        self.get().await?.add_app_key(id, key).await
    }
    async fn app_for_key(&self, key: Digest) -> Result<Option<App>, StoreError> {
        self.get().await?.app_for_key(key).await
    }
    async fn create_call(&self, call: &Call, code: Digest) -> Result<(), StoreError> {
        self.get().await?.create_call(call, code).await
    }
    async fn get_call(&self, id: &str) -> Result<Option<Call>, StoreError> {
        self.get().await?.get_call(id).await
    }
    async fn list_calls(
        &self,
        app_id: &str,
        state: Option<CallState>,
        limit: usize,
        after: Option<&Cursor>,
        now: Millis,
    ) -> Result<Page, StoreError> {
        self.get()
            .await?
            .list_calls(app_id, state, limit, after, now)
            .await
    }
    async fn call_for_code(&self, code: Digest, now: Millis) -> Result<Option<String>, StoreError> {
        self.get().await?.call_for_code(code, now).await
    }
    async fn end_call(
        &self,
        id: &str,
        reason: &str,
        now: Millis,
    ) -> Result<Option<Call>, StoreError> {
        self.get().await?.end_call(id, reason, now).await
    }
    async fn put_token(&self, token: Digest, grant: &TokenGrant) -> Result<(), StoreError> {
        self.get().await?.put_token(token, grant).await
    }
    async fn redeem_token(
        &self,
        token: Digest,
        now: Millis,
    ) -> Result<Option<TokenGrant>, StoreError> {
        self.get().await?.redeem_token(token, now).await
    }
    async fn peek_token(
        &self,
        token: Digest,
        now: Millis,
    ) -> Result<Option<TokenGrant>, StoreError> {
        self.get().await?.peek_token(token, now).await
    }
    async fn admit_with_token(
        &self,
        token: Digest,
        call_id: &str,
        participant: &Participant,
        now: Millis,
    ) -> Result<Admission, StoreError> {
        self.get()
            .await?
            .admit_with_token(token, call_id, participant, now)
            .await
    }
    async fn admit(
        &self,
        call_id: &str,
        participant: &Participant,
        now: Millis,
    ) -> Result<Admission, StoreError> {
        self.get().await?.admit(call_id, participant, now).await
    }
    async fn set_left(
        &self,
        call_id: &str,
        peer_id: &str,
        left_at: Option<Millis>,
    ) -> Result<bool, StoreError> {
        self.get().await?.set_left(call_id, peer_id, left_at).await
    }
    async fn mark_connected(
        &self,
        call_id: &str,
        peer_id: &str,
        now: Millis,
    ) -> Result<Option<Participant>, StoreError> {
        self.get()
            .await?
            .mark_connected(call_id, peer_id, now)
            .await
    }
    async fn mark_disconnected(
        &self,
        call_id: &str,
        peer_id: &str,
        seat_until: Millis,
    ) -> Result<bool, StoreError> {
        self.get()
            .await?
            .mark_disconnected(call_id, peer_id, seat_until)
            .await
    }
    async fn set_media(
        &self,
        call_id: &str,
        peer_id: &str,
        media: Media,
    ) -> Result<bool, StoreError> {
        self.get().await?.set_media(call_id, peer_id, media).await
    }
    async fn set_quality(
        &self,
        call_id: &str,
        peer_id: &str,
        quality: &Quality,
    ) -> Result<bool, StoreError> {
        self.get()
            .await?
            .set_quality(call_id, peer_id, quality)
            .await
    }
    async fn kick(
        &self,
        call_id: &str,
        peer_id: &str,
        now: Millis,
    ) -> Result<Option<Participant>, StoreError> {
        self.get().await?.kick(call_id, peer_id, now).await
    }
    async fn hit(&self, key: &str, window_ms: u64, now: Millis) -> Result<(u64, u64), StoreError> {
        self.get().await?.hit(key, window_ms, now).await
    }
    async fn peek(&self, key: &str, now: Millis) -> Result<(u64, u64), StoreError> {
        self.get().await?.peek(key, now).await
    }
    async fn live_calls(&self, now: Millis) -> Result<u64, StoreError> {
        self.get().await?.live_calls(now).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.get().await?.ping().await
    }
}
