//! The untimed part of a run: Allocate (with the 401 challenge), CreatePermission and
//! ChannelBind for every allocation, and a best-effort release (Refresh with LIFETIME 0) at the
//! end. Written as plain async request/response code on a current-thread tokio runtime, many
//! allocations at a time; only the data phase is hand-batched.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use relay_proto::stun::{self, attr, method, Class, Encoder, Message};
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::{Auth, Config, Framing, LoadError, SetupFailure};

/// REQUESTED-TRANSPORT: UDP.
const UDP: [u8; 4] = [17, 0, 0, 0];

/// Credentials and the server's current nonce for one allocation.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    pub(crate) index: usize,
    pub(crate) username: String,
    password: String,
    /// The realm to sign with: `--realm`, or the one of the first 401.
    realm: Option<Vec<u8>>,
    key: [u8; 16],
    nonce: Vec<u8>,
    requests: u64,
}

impl Session {
    pub(crate) fn new(cfg: &Config, index: usize) -> Self {
        let (username, password) = match &cfg.auth {
            Auth::Secret(secret) => {
                let expiry = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
                    + CREDENTIAL_TTL.as_secs();
                let user = format!("{}-{index}", cfg.user_prefix);
                relay_proto::rest_credentials(secret.as_bytes(), &user, expiry)
            }
            Auth::Static { user, password } => (user.clone(), password.clone()),
        };
        let mut s = Self {
            index,
            username,
            password,
            realm: cfg.realm.as_ref().map(|r| r.as_bytes().to_vec()),
            key: [0; 16],
            nonce: Vec::new(),
            requests: 0,
        };
        s.rekey();
        s
    }

    fn rekey(&mut self) {
        if let Some(realm) = &self.realm {
            self.key = relay_proto::auth::long_term_key(
                self.username.as_bytes(),
                realm,
                self.password.as_bytes(),
            );
        }
    }

    /// A transaction id unique within this allocation (and across allocations: the index is in it).
    fn next_tid(&mut self) -> [u8; 12] {
        self.requests += 1;
        let mut t = [0u8; 12];
        t[..4].copy_from_slice(&(self.index as u32).to_be_bytes());
        t[4..].copy_from_slice(&self.requests.to_be_bytes());
        t
    }
}

/// REST credentials are minted valid for this long: far beyond any run.
const CREDENTIAL_TTL: Duration = Duration::from_secs(24 * 3600);

/// One allocation's socket and state while setting up.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) sock: UdpSocket,
    pub(crate) session: Session,
    pub(crate) relayed: Option<SocketAddr>,
    rto: Duration,
    tries: u32,
}

fn refused(s: &Session, request: &'static str, failure: SetupFailure) -> LoadError {
    LoadError::Setup {
        index: s.index,
        username: s.username.clone(),
        request,
        failure,
    }
}

/// The ERROR-CODE of a response: (code, reason phrase).
fn error_code(msg: &Message<'_>) -> Option<(u16, String)> {
    let (_, v, _) = msg.attributes().find(|(t, _, _)| *t == attr::ERROR_CODE)?;
    let class = u16::from(*v.get(2)? & 0x07);
    let number = u16::from(*v.get(3)?);
    let reason = String::from_utf8_lossy(v.get(4..).unwrap_or_default()).into_owned();
    Some((class * 100 + number, reason))
}

fn text_attr(msg: &Message<'_>, typ: u16) -> Option<Vec<u8>> {
    msg.attributes()
        .find(|(t, _, _)| *t == typ)
        .map(|(_, v, _)| v.to_vec())
}

impl Conn {
    pub(crate) fn new(sock: UdpSocket, session: Session, cfg: &Config) -> Self {
        Self {
            sock,
            session,
            relayed: None,
            rto: cfg.rto,
            tries: cfg.tries,
        }
    }

    /// Sends `req` (retransmitting with a doubling timeout) until a response with `tid` arrives.
    async fn exchange(
        &self,
        request: &'static str,
        req: &[u8],
        tid: [u8; 12],
    ) -> Result<Vec<u8>, LoadError> {
        let mut buf = vec![0u8; 2048];
        let mut rto = self.rto;
        let started = Instant::now();
        for _ in 0..self.tries {
            self.sock
                .send(req)
                .await
                .map_err(|e| refused(&self.session, request, SetupFailure::Io(e)))?;
            let deadline = tokio::time::Instant::now() + rto;
            loop {
                match tokio::time::timeout_at(deadline, self.sock.recv(&mut buf)).await {
                    Err(_) => break,
                    Ok(Err(e)) => {
                        return Err(refused(&self.session, request, SetupFailure::Io(e)));
                    }
                    Ok(Ok(n)) => {
                        let Ok(msg) = Message::parse(&buf[..n]) else {
                            continue; // ChannelData or noise
                        };
                        if msg.transaction_id() == tid
                            && matches!(msg.class(), Class::Success | Class::Error)
                        {
                            return Ok(buf[..n].to_vec());
                        }
                    }
                }
            }
            rto *= 2;
        }
        Err(refused(
            &self.session,
            request,
            SetupFailure::Timeout {
                tries: self.tries,
                waited: started.elapsed(),
            },
        ))
    }

    /// One authenticated request: fetches the nonce (401) first if there is none yet, and
    /// retries once on 438 with the fresh nonce. Returns the success response and its id.
    pub(crate) async fn request(
        &mut self,
        request: &'static str,
        method: u16,
        build: &(dyn Fn(&mut Encoder<'_>) + Sync),
    ) -> Result<(Vec<u8>, [u8; 12]), LoadError> {
        let mut stale_retried = false;
        let mut buf = Vec::with_capacity(256);
        loop {
            let tid = self.session.next_tid();
            buf.clear();
            let mut e = Encoder::new(&mut buf, method, Class::Request, tid);
            build(&mut e);
            let signed = !self.session.nonce.is_empty() && self.session.realm.is_some();
            if signed {
                let s = &self.session;
                e.attr(attr::USERNAME, s.username.as_bytes())
                    .attr(attr::REALM, s.realm.as_deref().unwrap_or_default())
                    .attr(attr::NONCE, &s.nonce)
                    .integrity(&s.key);
            }
            e.fingerprint();
            e.finish();
            let raw = self.exchange(request, &buf, tid).await?;
            let malformed = |what: &str| {
                refused(
                    &self.session,
                    request,
                    SetupFailure::Malformed(what.to_owned()),
                )
            };
            let msg = Message::parse(&raw).map_err(|_| malformed("unparsable response"))?;
            if msg.class() == Class::Success {
                return Ok((raw, tid));
            }
            let (code, reason) =
                error_code(&msg).ok_or_else(|| malformed("error response without ERROR-CODE"))?;
            let nonce = text_attr(&msg, attr::NONCE);
            match code {
                stun::code::UNAUTHENTICATED if !signed => {
                    // The challenge: learn nonce (and realm unless given) and sign from now on.
                    let nonce = nonce.ok_or_else(|| malformed("401 without NONCE"))?;
                    if self.session.realm.is_none() {
                        let realm = text_attr(&msg, attr::REALM)
                            .ok_or_else(|| malformed("401 without REALM (pass --realm)"))?;
                        self.session.realm = Some(realm);
                        self.session.rekey();
                    }
                    self.session.nonce = nonce;
                }
                stun::code::STALE_NONCE if !stale_retried => {
                    stale_retried = true;
                    self.session.nonce = nonce.ok_or_else(|| malformed("438 without NONCE"))?;
                }
                _ => {
                    return Err(refused(
                        &self.session,
                        request,
                        SetupFailure::Refused { code, reason },
                    ))
                }
            }
        }
    }

    /// Allocate; stores the relayed address.
    pub(crate) async fn allocate(&mut self, ipv6: bool) -> Result<(), LoadError> {
        let build = move |e: &mut Encoder<'_>| {
            e.attr(attr::REQUESTED_TRANSPORT, &UDP);
            if ipv6 {
                e.attr(attr::REQUESTED_ADDRESS_FAMILY, &[0x02, 0, 0, 0]);
            }
        };
        let (raw, tid) = self.request("Allocate", method::ALLOCATE, &build).await?;
        let relayed = Message::parse(&raw).ok().and_then(|m| {
            m.attributes()
                .find(|(t, _, _)| *t == attr::XOR_RELAYED_ADDRESS)
                .and_then(|(_, v, _)| stun::decode_xor_address(v, &tid))
        });
        match relayed {
            Some(a) => {
                self.relayed = Some(a);
                Ok(())
            }
            None => Err(refused(
                &self.session,
                "Allocate",
                SetupFailure::Malformed("success without XOR-RELAYED-ADDRESS".into()),
            )),
        }
    }

    /// CreatePermission for `peer`, then (with channels) ChannelBind of [`stun::CHANNEL_MIN`].
    pub(crate) async fn bind(
        &mut self,
        peer: SocketAddr,
        framing: Framing,
    ) -> Result<(), LoadError> {
        let permit = move |e: &mut Encoder<'_>| {
            e.xor_address(attr::XOR_PEER_ADDRESS, peer);
        };
        self.request("CreatePermission", method::CREATE_PERMISSION, &permit)
            .await?;
        if framing == Framing::Channels {
            let channel = move |e: &mut Encoder<'_>| {
                let n = stun::CHANNEL_MIN.to_be_bytes();
                e.attr(attr::CHANNEL_NUMBER, &[n[0], n[1], 0, 0])
                    .xor_address(attr::XOR_PEER_ADDRESS, peer);
            };
            self.request("ChannelBind", method::CHANNEL_BIND, &channel)
                .await?;
        }
        Ok(())
    }

    /// Refresh with LIFETIME 0: releases the allocation on the server.
    pub(crate) async fn release(&mut self) -> Result<(), LoadError> {
        let build = |e: &mut Encoder<'_>| {
            e.u32_attr(attr::LIFETIME, 0);
        };
        self.request("Refresh", method::REFRESH, &build).await?;
        Ok(())
    }
}

/// Runs `op` on every connection, at most `concurrency` at a time. Returns the connections in
/// their original order, or the first error together with every connection that came back (so
/// their allocations can still be released).
pub(crate) async fn for_all<F, Fut>(
    conns: Vec<Conn>,
    concurrency: usize,
    op: F,
) -> Result<Vec<Conn>, (LoadError, Vec<Conn>)>
where
    F: Fn(Conn) -> Fut,
    Fut: std::future::Future<Output = (Conn, Result<(), LoadError>)> + Send + 'static,
{
    let n = conns.len();
    let limit = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut set = JoinSet::new();
    for conn in conns {
        let limit = limit.clone();
        let fut = op(conn);
        set.spawn(async move {
            let _permit = limit.acquire_owned().await;
            fut.await
        });
    }
    let mut done: Vec<Option<Conn>> = (0..n).map(|_| None).collect();
    let mut first_err: Option<LoadError> = None;
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((conn, result)) => {
                if let Err(e) = result {
                    // Keep the error of the lowest allocation: the most readable one.
                    let lower = match &first_err {
                        Some(LoadError::Setup { index, .. }) => conn.session.index < *index,
                        _ => true,
                    };
                    if lower {
                        first_err = Some(e);
                    }
                }
                let i = conn.session.index;
                if let Some(slot) = done.get_mut(i) {
                    *slot = Some(conn);
                }
            }
            Err(e) => {
                first_err.get_or_insert(LoadError::Internal(format!("setup task failed: {e}")));
            }
        }
    }
    let conns: Vec<Conn> = done.into_iter().flatten().collect();
    match first_err {
        Some(e) => Err((e, conns)),
        None if conns.len() == n => Ok(conns),
        None => Err((LoadError::Internal("a setup task vanished".into()), conns)),
    }
}

/// Releases every allocation that was made (best effort, one try each, errors ignored).
pub(crate) async fn release_all(conns: Vec<Conn>, concurrency: usize) -> usize {
    let with_alloc: Vec<Conn> = conns
        .into_iter()
        .filter(|c| c.relayed.is_some())
        .map(|mut c| {
            c.tries = 2;
            c
        })
        .collect();
    let released = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = released.clone();
    let _ = for_all(with_alloc, concurrency, move |mut c| {
        let counter = counter.clone();
        async move {
            if c.release().await.is_ok() {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            (c, Ok(()))
        }
    })
    .await;
    released.load(std::sync::atomic::Ordering::Relaxed)
}
