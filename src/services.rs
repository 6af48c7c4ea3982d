//! Starting the services of one process from one configuration: the relay, the control plane
//! and the admin listener, wired to each other (the control plane revokes through the relay,
//! `/ready` reflects both) and stopped together.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use control::store::{self, Store};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// How often the store is pinged for `/ready` and the `calls_active` gauge is refreshed: often
/// enough that a load balancer sees a Redis outage within seconds, rarely enough to cost nothing.
const STORE_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// Between attempts to store the apps declared in the configuration while the store is down.
const APPS_RETRY: Duration = Duration::from_secs(2);

/// Which services to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Which {
    pub(crate) relay: bool,
    pub(crate) control: bool,
    /// With `control`: on the control listener at `/v1/signal`; alone: on `[signal] listen`.
    pub(crate) signal: bool,
}

/// The control plane's revocations, delivered to the relay in this process and, with Redis,
/// to the relays of every other node (a call's allocations may be on any of them).
#[derive(Debug)]
struct Revocations {
    relay: Option<relay_server::Revoker>,
    bus: Option<Arc<dyn signal::bus::Bus>>,
}

impl control::Revoker for Revocations {
    fn revoke(&self, group: &str, until_unix: u64) {
        if let Some(r) = &self.relay {
            r.revoke(group, until_unix);
        }
        if let Some(bus) = &self.bus {
            let (bus, group) = (Arc::clone(bus), group.to_owned());
            tokio::spawn(async move {
                if let Err(e) = bus.publish_revocation(&group, until_unix).await {
                    // The credentials still expire on their own; this node's relay has it.
                    tracing::warn!(error = %e, "cannot tell other nodes of a revocation");
                }
            });
        }
    }
}

/// Applies revocations published by other nodes to this process's relay.
async fn apply_revocations(
    relay: relay_server::Revoker,
    mut rx: tokio::sync::mpsc::Receiver<signal::bus::Revocation>,
) {
    while let Some(r) = rx.recv().await {
        relay.revoke(&r.group, r.until_unix);
    }
}

/// Longest the process waits at shutdown for its signaling sockets to close: each gets 1001 at
/// once and its closing handshake is bounded well below this.
const SIGNAL_DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// Revocations waiting for the relay: they come one per ended call or kick.
const REVOCATION_QUEUE: usize = 1024;

/// The control plane's call events on a node without signaling (`turnpike control` with
/// Redis): published on the bus, so the signaling nodes that hold the call's sockets close
/// them (a kicked peer, an ended call).
#[derive(Debug)]
struct BusEvents(Arc<dyn signal::bus::Bus>);

impl BusEvents {
    fn publish(&self, call_id: &str, event: signal::bus::BusEvent) {
        let (bus, call) = (Arc::clone(&self.0), call_id.to_owned());
        tokio::spawn(async move {
            if let Err(e) = bus.publish(&call, &event).await {
                // Tokens and TURN credentials are revoked regardless; only live sockets stay.
                tracing::warn!(error = %e, "cannot tell signaling nodes of a call event");
            }
        });
    }
}

impl control::CallEvents for BusEvents {
    fn call_ended(&self, call_id: &str, reason: &str) {
        let reason = reason.to_owned();
        self.publish(call_id, signal::bus::BusEvent::CallEnded { reason });
    }

    fn peer_kicked(&self, call_id: &str, peer_id: &str) {
        let event = signal::bus::BusEvent::Kick {
            peer_id: peer_id.to_owned(),
            reason: "kicked".to_owned(),
        };
        self.publish(call_id, event);
    }
}

/// Runs the chosen services until `shutdown` completes, then stops them: the control plane
/// finishes its requests in flight, the relay drains for its grace period.
pub(crate) async fn run(
    config: conf::Config,
    which: Which,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let hup = crate::Sighup::listen();
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let registry = prometheus::Registry::new();
    build_info(&registry)?;
    let admin = TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("admin listener {}", config.admin.listen))?;
    let admin_addr = admin.local_addr()?;
    let mut ready = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();

    let relay = if which.relay {
        let relay = relay_server::RelayServer::bind(&config.relay, Some(admin_addr), &registry)?;
        for l in relay.local_addrs() {
            // `l` prints as "udp://…", "tcp://…" or "tls://…".
            println!("turnpike: relay listening on {l}");
        }
        ready.push(relay.readiness());
        Some(relay)
    } else {
        None
    };
    tokio::spawn(hup.serve(relay.as_ref().and_then(|r| r.tls())));

    // With Redis, the nodes meet on it: signaling rooms, and revocations for every relay.
    let bus = open_bus(&config)?;
    if let (Some(bus), Some(relay)) = (&bus, &relay) {
        let (tx, rx) = tokio::sync::mpsc::channel(REVOCATION_QUEUE);
        bus.on_revocation(tx);
        tokio::spawn(apply_revocations(relay.revoker(), rx));
    }

    if which.control || which.signal {
        let Some(c) = config.control.as_ref() else {
            anyhow::bail!("the configuration has no [control] section");
        };
        // Signaling alone listens on its own address; otherwise it shares the control listener.
        let listen = if which.control {
            c.listen
        } else {
            config.signal.listen
        };
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("listener {listen}"))?;
        let bound = listener.local_addr()?;
        if !which.control && c.public_url_derived {
            // The tokens' issuer is the control plane's public URL: a signaling node on its own
            // cannot guess it.
            anyhow::bail!("control.public-url must be set to run signaling on its own");
        }
        let turn_urls = if c.turn_urls_derived {
            // Derived from the relay's listeners: use the bound ones (port 0 in tests).
            let listens = relay
                .as_ref()
                .map_or_else(|| config.relay.listen.clone(), |r| r.local_addrs().to_vec());
            conf::derive_turn_urls(&listens, &config.relay.external_ips)
                .context("control.turn-urls")?
        } else {
            c.turn_urls.clone()
        };
        let public_url = if c.public_url_derived {
            format!("http://{bound}")
        } else {
            c.public_url.clone()
        };
        let settings = settings(&config, c, public_url, turn_urls)?;
        let store = open_store(&config.store, &registry)?;
        if relay.is_none() && bus.is_none() {
            tracing::warn!(
                "no relay in this process and no Redis: ending a call stops its join code and \
                 tokens, but relays elsewhere keep its live allocations until their credentials \
                 expire"
            );
        }
        let revoker: Arc<dyn control::Revoker> = Arc::new(Revocations {
            relay: relay.as_ref().map(|r| r.revoker()),
            bus: bus.clone(),
        });
        // Filled in once signaling exists (it needs this state first). Without signaling in
        // this process, the events go to the signaling nodes over Redis, or nowhere.
        let events = Arc::new(signal::LateEvents::default());
        let call_events: Arc<dyn control::CallEvents> = match (&bus, which.signal) {
            (Some(bus), false) => Arc::new(BusEvents(Arc::clone(bus))),
            _ => Arc::clone(&events) as Arc<dyn control::CallEvents>,
        };
        let state = control::AppState {
            settings: Arc::new(settings),
            store: Arc::clone(&store),
            revoker,
            events: call_events,
            clock: Arc::new(control::api::SystemClock),
            metrics: control::api::ControlMetrics::new(&registry)
                .context("registering the control plane's metrics")?,
        };
        let store_ready = Arc::new(AtomicBool::new(false));
        ready.push(Arc::clone(&store_ready));
        tasks.spawn(watch_store(state.clone(), store_ready, stopped()));
        let hash_key = control::secrets::HashKey::new(c.hash_key.expose().as_bytes());
        let apps = c
            .apps
            .iter()
            .map(|app| {
                let record = store::App {
                    id: app.id.clone(),
                    name: app.name.clone(),
                    disabled: false,
                    from_config: true,
                    created_at: now_ms(),
                };
                let keys = app
                    .keys
                    .iter()
                    .map(|k| {
                        hash_key.digest(control::secrets::Domain::AppKey, k.expose().as_bytes())
                    })
                    .collect();
                (record, keys)
            })
            .collect();
        if which.control {
            tasks.spawn(put_config_apps(Arc::clone(&store), apps, stopped()));
        }
        let mut app = if which.control {
            control::router(state.clone())
        } else {
            axum::Router::new()
        };
        if which.signal {
            let signal = signal::Signal::new(
                state.clone(),
                signal_settings(&config.signal),
                bus.clone().unwrap_or_else(|| {
                    Arc::new(signal::bus::LocalBus::new(control::secrets::new_id("n_")))
                }),
                signal::metrics::SignalMetrics::new(&registry)
                    .context("registering signaling's metrics")?,
            );
            events.set(&signal);
            app = app.merge(signal.router());
            let stop = stopped();
            // Joined before the process exits, so every socket gets its 1001.
            tasks.spawn(async move {
                stop.await;
                signal.shutdown();
                signal.drained(SIGNAL_DRAIN_LIMIT).await;
                Ok(())
            });
        }
        if which.control {
            println!("turnpike: control listening on http://{bound}");
        } else {
            println!("turnpike: signal listening on http://{bound}");
        }
        // After the merge, so signaling's route and a signaling-only node answer JSON errors.
        let app = control::api::json_fallbacks(app);
        let stop = stopped();
        let head_timeout = c.request_timeout;
        let trusted = c.trusted_proxies.clone();
        tasks.spawn(async move {
            control::serve_app(listener, app, head_timeout, &trusted, stop)
                .await
                .context("control API")
        });
    }

    println!("turnpike: admin listening on http://{admin_addr}");
    // Not ready from the moment the stop begins, whatever else says (a load balancer takes the
    // node out while it drains).
    let up = Arc::new(AtomicBool::new(true));
    ready.push(Arc::clone(&up));
    let state = relay_server::admin::AdminState { registry, ready };
    // The admin listener outlives the relay's drain: `/ready` answers 503 and `/metrics` stays
    // scrapable (the drain's last counters included) until the relay has stopped.
    let (admin_stop_tx, admin_stop) = watch::channel(false);
    tasks.spawn(async move {
        let mut admin_stop = admin_stop;
        let stop = async move {
            let _ = admin_stop.wait_for(|s| *s).await;
        };
        relay_server::admin::serve(admin, state, stop)
            .await
            .context("admin listener")
    });
    let stopping = stopped();
    let stop = async move {
        stopping.await;
        up.store(false, Ordering::Relaxed);
    };
    let relay_result = match relay {
        Some(relay) => relay.run(stop).await,
        None => {
            stop.await;
            Ok(())
        }
    };
    let _ = admin_stop_tx.send(true);
    relay_result?;
    while let Some(r) = tasks.join_next().await {
        r.context("a service task panicked")??;
    }
    Ok(())
}

/// The control plane's settings from the configuration.
fn settings(
    config: &conf::Config,
    c: &conf::Control,
    public_url: String,
    turn_urls: Vec<String>,
) -> anyhow::Result<control::Settings> {
    // The control plane mints with the relay's signing (first) secret: the very credentials the
    // relay accepts.
    let secret =
        config.relay.secrets.first().context(
            "relay.secrets: the control plane needs the relay's secret to mint credentials",
        )?;
    let jwt = control::jwt::Keys::new(
        c.jwt_keys
            .iter()
            .map(|k| control::jwt::JwtKey {
                kid: k.kid.clone(),
                secret: k.secret.expose().as_bytes().to_vec(),
            })
            .collect(),
    )
    .context("control.jwt-keys: at least one key")?;
    Ok(control::Settings {
        public_url,
        admin_token: c.admin_token.as_ref().map(|t| t.expose().to_owned()),
        hash_key: control::secrets::HashKey::new(c.hash_key.expose().as_bytes()),
        jwt,
        token_ttl: c.token_ttl,
        minter: control::creds::Minter::new(
            secret.expose().as_bytes(),
            turn_urls,
            c.credential_ttl.as_secs(),
        ),
        max_body: c.max_body,
        request_timeout: c.request_timeout,
        limits: control::api::Limits::default(),
        join_origins: config.signal.allowed_origins.clone(),
        trusted_proxies: c.trusted_proxies.clone(),
    })
}

/// Signaling's settings from `[signal]`.
fn signal_settings(s: &conf::Signal) -> signal::Settings {
    signal::Settings {
        origins: s.allowed_origins.clone(),
        auth_timeout: s.auth_timeout,
        ping_interval: s.ping_interval,
        idle_timeout: s.idle_timeout,
        max_message: s.max_message,
        message_rate: s.message_rate,
        message_burst: s.message_burst,
        send_queue: s.send_queue,
        write_timeout: s.write_timeout,
        resume_window: s.resume_window,
        empty_timeout: s.empty_timeout,
        node_timeout: s.node_timeout,
        max_connections: s.max_connections as usize,
        max_unauthenticated_per_ip: s.max_unauthenticated_per_ip as usize,
    }
}

/// How this node meets the others: on the store's Redis, or not at all (`None`).
fn open_bus(config: &conf::Config) -> anyhow::Result<Option<Arc<dyn signal::bus::Bus>>> {
    // Random per process: a restarted node is a new node, its old peers are reported left.
    let node = control::secrets::new_id("n_");
    Ok(match &config.store.redis_url {
        None => None,
        Some(url) => {
            let opts = signal::redis_bus::RedisBusOptions {
                node_timeout: config.signal.node_timeout,
                ..Default::default()
            };
            let bus: Arc<dyn signal::bus::Bus> =
                signal::redis_bus::RedisBus::new(url.expose(), node, opts)
                    .context("store.redis-url for signaling")?;
            Some(bus)
        }
    })
}

/// The configured store: Redis when `[store] redis-url` is set (connecting in the background
/// while it is down), else memory.
fn open_store(s: &conf::Store, registry: &prometheus::Registry) -> anyhow::Result<Arc<dyn Store>> {
    // Registered with either backend, so /metrics exports the same families whatever the
    // config (dashboards and the metric catalogue rely on that); only Redis feeds them, the
    // memory store neither waits nor fails.
    let metrics = store::StoreMetrics::new(registry).context("registering the store's metrics")?;
    Ok(match &s.redis_url {
        None => Arc::new(store::MemoryStore::new()),
        Some(url) => {
            tracing::info!(url = %url, "using Redis");
            Arc::new(store::Reconnecting::new(url.expose().to_owned(), metrics))
        }
    })
}

/// Keeps `/ready` in step with the store and refreshes the control plane's gauges.
async fn watch_store(
    state: control::AppState,
    ready: Arc<AtomicBool>,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(stop);
    let mut was = None;
    loop {
        let ok = state.store.ping().await.is_ok();
        ready.store(ok, Ordering::Relaxed);
        if was != Some(ok) {
            if ok {
                tracing::info!("store reachable");
            } else {
                tracing::warn!(
                    "store unreachable: /ready answers 503, the API 503 where it needs it"
                );
            }
            was = Some(ok);
        }
        if ok {
            state.refresh_gauges().await;
        }
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tokio::time::sleep(STORE_CHECK_INTERVAL) => {}
        }
    }
}

/// Stores the apps declared in the configuration (re-applied at every start), retrying while
/// the store is down.
async fn put_config_apps(
    store: Arc<dyn Store>,
    apps: Vec<(store::App, Vec<store::Digest>)>,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(stop);
    for (record, keys) in apps {
        loop {
            match store.put_app(&record, &keys).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(app = %record.id, error = %e, "cannot store a configured app yet");
                    tokio::select! {
                        _ = &mut stop => return Ok(()),
                        _ = tokio::time::sleep(APPS_RETRY) => {}
                    }
                }
            }
        }
    }
    Ok(())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `turnpike_build_info{version} 1`: which build every node runs (joins on other metrics by
/// `instance`).
fn build_info(registry: &prometheus::Registry) -> anyhow::Result<()> {
    let info = prometheus::IntGaugeVec::new(
        prometheus::Opts::new(
            "turnpike_build_info",
            "Always 1; the version label tells which build this process runs.",
        ),
        &["version"],
    )?;
    registry.register(Box::new(info.clone()))?;
    info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    Ok(())
}
