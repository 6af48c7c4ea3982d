//! A store that holds one operation at a gate: [`GateStore`] delegates everything to a
//! [`MemoryStore`], except that an armed gate holds the next `mark_connected` until the test
//! releases it, so a test can act (kick, end) at a chosen moment inside a connection's
//! authentication.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use control::store::{
    Admission, App, Call, CallState, Cursor, Digest, Media, MemoryStore, Millis, Page, Participant,
    Quality, Store, StoreError, TokenGrant,
};
use tokio::sync::Notify;

/// See the module doc.
#[derive(Debug)]
pub struct GateStore {
    inner: MemoryStore,
    armed: AtomicBool,
    /// Told when a `mark_connected` is held.
    reached: Notify,
    /// Lets the held one go on.
    released: Notify,
}

impl GateStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: MemoryStore::new(),
            armed: AtomicBool::new(false),
            reached: Notify::new(),
            released: Notify::new(),
        })
    }

    /// Holds the next `mark_connected`.
    pub fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Waits until a `mark_connected` is held.
    pub async fn reached(&self) {
        self.reached.notified().await;
    }

    /// Lets the held `mark_connected` go on.
    pub fn release(&self) {
        self.released.notify_one();
    }
}

#[async_trait]
impl Store for GateStore {
    async fn put_app(&self, app: &App, keys: &[Digest]) -> Result<bool, StoreError> {
        self.inner.put_app(app, keys).await
    }
    async fn list_apps(&self) -> Result<Vec<App>, StoreError> {
        self.inner.list_apps().await
    }
    async fn get_app(&self, id: &str) -> Result<Option<App>, StoreError> {
        self.inner.get_app(id).await
    }
    async fn set_app_disabled(&self, id: &str, disabled: bool) -> Result<bool, StoreError> {
        self.inner.set_app_disabled(id, disabled).await
    }
    async fn add_app_key(&self, id: &str, key: Digest) -> Result<bool, StoreError> {
        self.inner.add_app_key(id, key).await
    }
    async fn app_for_key(&self, key: Digest) -> Result<Option<App>, StoreError> {
        self.inner.app_for_key(key).await
    }
    async fn create_call(&self, call: &Call, code: Digest) -> Result<(), StoreError> {
        self.inner.create_call(call, code).await
    }
    async fn get_call(&self, id: &str) -> Result<Option<Call>, StoreError> {
        self.inner.get_call(id).await
    }
    async fn list_calls(
        &self,
        app_id: &str,
        state: Option<CallState>,
        limit: usize,
        after: Option<&Cursor>,
        now: Millis,
    ) -> Result<Page, StoreError> {
        self.inner
            .list_calls(app_id, state, limit, after, now)
            .await
    }
    async fn call_for_code(&self, code: Digest, now: Millis) -> Result<Option<String>, StoreError> {
        self.inner.call_for_code(code, now).await
    }
    async fn end_call(
        &self,
        id: &str,
        reason: &str,
        now: Millis,
    ) -> Result<Option<Call>, StoreError> {
        self.inner.end_call(id, reason, now).await
    }
    async fn put_token(&self, token: Digest, grant: &TokenGrant) -> Result<(), StoreError> {
        self.inner.put_token(token, grant).await
    }
    async fn redeem_token(
        &self,
        token: Digest,
        now: Millis,
    ) -> Result<Option<TokenGrant>, StoreError> {
        self.inner.redeem_token(token, now).await
    }
    async fn peek_token(
        &self,
        token: Digest,
        now: Millis,
    ) -> Result<Option<TokenGrant>, StoreError> {
        self.inner.peek_token(token, now).await
    }
    async fn admit(
        &self,
        call_id: &str,
        participant: &Participant,
        now: Millis,
    ) -> Result<Admission, StoreError> {
        self.inner.admit(call_id, participant, now).await
    }
    async fn admit_with_token(
        &self,
        token: Digest,
        call_id: &str,
        participant: &Participant,
        now: Millis,
    ) -> Result<Admission, StoreError> {
        self.inner
            .admit_with_token(token, call_id, participant, now)
            .await
    }
    async fn set_left(
        &self,
        call_id: &str,
        peer_id: &str,
        left_at: Option<Millis>,
    ) -> Result<bool, StoreError> {
        self.inner.set_left(call_id, peer_id, left_at).await
    }
    async fn mark_connected(
        &self,
        call_id: &str,
        peer_id: &str,
        now: Millis,
    ) -> Result<Option<Participant>, StoreError> {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.reached.notify_one();
            self.released.notified().await;
        }
        self.inner.mark_connected(call_id, peer_id, now).await
    }
    async fn mark_disconnected(
        &self,
        call_id: &str,
        peer_id: &str,
        seat_until: Millis,
    ) -> Result<bool, StoreError> {
        self.inner
            .mark_disconnected(call_id, peer_id, seat_until)
            .await
    }
    async fn set_media(
        &self,
        call_id: &str,
        peer_id: &str,
        media: Media,
    ) -> Result<bool, StoreError> {
        self.inner.set_media(call_id, peer_id, media).await
    }
    async fn set_quality(
        &self,
        call_id: &str,
        peer_id: &str,
        quality: &Quality,
    ) -> Result<bool, StoreError> {
        self.inner.set_quality(call_id, peer_id, quality).await
    }
    async fn kick(
        &self,
        call_id: &str,
        peer_id: &str,
        now: Millis,
    ) -> Result<Option<Participant>, StoreError> {
        self.inner.kick(call_id, peer_id, now).await
    }
    async fn hit(&self, key: &str, window_ms: u64, now: Millis) -> Result<(u64, u64), StoreError> {
        self.inner.hit(key, window_ms, now).await
    }
    async fn peek(&self, key: &str, now: Millis) -> Result<(u64, u64), StoreError> {
        self.inner.peek(key, now).await
    }
    async fn live_calls(&self, now: Millis) -> Result<u64, StoreError> {
        self.inner.live_calls(now).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
}
