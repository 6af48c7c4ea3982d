//! The operators' view, proven against the real thing: `turnpike serve` (relay, control plane
//! and signaling on Redis) carries a small load through every component — relayed packets from
//! coturn's test client, a joined call whose peers exchange an offer and report stats, wrong
//! join codes — while a real Prometheus scrapes its admin port and evaluates the shipped rules.
//! Then every PromQL expression of `dashboards/grafana/*.json` and `dashboards/prometheus/rules.yml`
//! goes through Prometheus's HTTP API and must evaluate without error and return data.
//!
//! Also here: the metric catalogue (`dashboards/README.md`) lists exactly what the binary exports,
//! `promtool check metrics` accepts `/metrics`, the rule unit tests pass, metrics are served on
//! the admin listener only, and the number of series does not grow with users, calls and names
//! (test plan L).
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;
#[path = "../control/tests/common/redis.rs"]
mod redis;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::serve::{http, raw_http, Serve, ADMIN, SECRET};
use common::ws::{connect, recv_type, send, Ws};
use serde_json::{json, Value};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// How long the whole Prometheus round may take: start, scrapes, rule evaluations, queries.
const PATIENCE: Duration = Duration::from_secs(60);

fn dashboards() -> PathBuf {
    Path::new(ROOT).join("dashboards")
}

/// `turnpike serve` with the relay on UDP and TCP and `store` (a `[store]` section or nothing).
fn config(name: &str, store: &str) -> PathBuf {
    common::serve::config_with(name, &["udp://127.0.0.1:0", "tcp://127.0.0.1:0"], store)
}

/// `name → (type, label names)` of every family in a Prometheus text exposition.
fn families(body: &str) -> BTreeMap<String, (String, BTreeSet<String>)> {
    let mut out: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            out.insert(name.to_owned(), (kind.to_owned(), BTreeSet::new()));
        }
    }
    for line in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let series = line.split_once(' ').unwrap().0;
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| out.get(*f).is_some_and(|(k, _)| k == "histogram"))
            })
            .unwrap_or(name);
        let entry = out
            .get_mut(family)
            .unwrap_or_else(|| panic!("{name} has no TYPE"));
        for pair in labels
            .trim_end_matches('}')
            .split(',')
            .filter(|p| !p.is_empty())
        {
            let label = pair.split_once('=').unwrap().0;
            if label != "le" {
                entry.1.insert(label.to_owned());
            }
        }
    }
    out
}

/// The catalogue table of `dashboards/README.md`: `name → (type, the row's text)`.
fn catalogue() -> BTreeMap<String, (String, String)> {
    let text = std::fs::read_to_string(dashboards().join("README.md")).unwrap();
    let header = "| metric | type | unit | labels | meaning | emitted by |";
    let start = text
        .lines()
        .position(|l| l.trim() == header)
        .expect("the catalogue table");
    let mut out = BTreeMap::new();
    for row in text.lines().skip(start + 2) {
        if !row.trim_start().starts_with('|') {
            break;
        }
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let name = cells[1].trim_matches('`').to_owned();
        let previous = out.insert(name.clone(), (cells[2].to_owned(), row.to_owned()));
        assert!(previous.is_none(), "{name} twice in the catalogue");
    }
    out
}

fn scrape(admin: SocketAddr) -> String {
    let (status, body) = raw_http(admin, "GET", "/metrics", None, None);
    assert_eq!(status, 200);
    body
}

/// An app, a call and `n` joins through the API: (app key, call id, join answers).
fn call_with(serve: &Serve, names: &[&str]) -> (String, String, Vec<Value>) {
    let (st, app) = serve.api("POST", "/v1/apps", Some(ADMIN), Some(json!({"name":"ops"})));
    assert_eq!(st, 201, "{app}");
    let key = app["key"].as_str().unwrap().to_owned();
    let (st, call) = serve.api("POST", "/v1/calls", Some(&key), Some(json!({})));
    assert_eq!(st, 201, "{call}");
    let code = call["join_code"].as_str().unwrap().to_owned();
    let joins = names
        .iter()
        .map(|name| {
            let (st, j) = serve.api(
                "POST",
                "/v1/join",
                None,
                Some(json!({"code":code,"name":name})),
            );
            assert_eq!(st, 200, "{j}");
            j
        })
        .collect();
    (key, call["id"].as_str().unwrap().to_owned(), joins)
}

/// Connects a joined participant to signaling: (socket, peer id).
async fn join_signal(serve: &Serve, join: &Value) -> (Ws, String) {
    let (ws, welcome) = connect(serve.control, join["signal_token"].as_str().unwrap()).await;
    (ws, welcome["peer_id"].as_str().unwrap().to_owned())
}

/// A call in which two peers exchange an offer and answer and report their quality, then one
/// leaves: signaling, call-quality and control-plane metrics all move.
async fn drive_a_call(serve: &Serve) {
    let (_, _, joins) = call_with(serve, &["Ada", "Bob"]);
    let (mut a, ida) = join_signal(serve, &joins[0]).await;
    let (mut b, idb) = join_signal(serve, &joins[1]).await;
    send(&mut a, json!({"v":1,"type":"offer","to":idb,"sdp":"v=0"})).await;
    recv_type(&mut b, "offer").await;
    send(&mut b, json!({"v":1,"type":"answer","to":ida,"sdp":"v=0"})).await;
    recv_type(&mut a, "answer").await;
    for (ws, rtt, kind, protocol) in [(&mut a, 40, "relay", "udp"), (&mut b, 90, "srflx", "none")] {
        send(
            ws,
            json!({"v":1,"type":"stats","rtt_ms":rtt,"jitter_ms":3,"packet_loss":0.01,
                "bitrate_kbps":800,"candidate_type":kind,"relay_protocol":protocol}),
        )
        .await;
        send(ws, json!({"v":1,"type":"ping"})).await;
        recv_type(ws, "pong").await;
    }
    send(&mut b, json!({"v":1,"type":"leave"})).await;
    recv_type(&mut a, "peer_left").await;
}

/// coturn's test client relays packets between two allocations of `user` (both directions
/// through Turnpike), over UDP or TCP.
fn relay_with_coturn_client(relay: SocketAddr, tcp: bool, user: &str) {
    let mut cmd = Command::new("turnutils_uclient");
    if tcp {
        cmd.arg("-t");
    }
    let out = cmd
        .args([
            "-c", "-y", "-s", "-m", "2", "-n", "50", "-l", "120", "-z", "2",
        ])
        .args(["-W", SECRET, "-u", user, "-p", &relay.port().to_string()])
        .arg(relay.ip().to_string())
        .stdin(Stdio::null())
        .output()
        .expect("turnutils_uclient (Debian package coturn; scripts/test.sh installs it)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    // Only traffic is needed here (loss is the relay tests' business): the run must complete.
    assert!(
        out.status.success() && text.contains("Total lost packets"),
        "uclient: {text}"
    );
}

/// A running Prometheus on a free port, scraping `target` every second with the shipped rules;
/// killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Prometheus {
    fn start(target: SocketAddr) -> Self {
        let dir = std::env::temp_dir().join(format!("turnpike-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let rules = dashboards().join("prometheus/rules.yml");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules}\n\
                 scrape_configs:\n  - job_name: turnpike\n    static_configs:\n      - targets: ['{target}']\n",
                rules = rules.display()
            ),
        )
        .unwrap();
        // A free port: bound and released just before Prometheus binds it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus (Debian package prometheus; scripts/test.sh installs it)");
        let p = Self {
            child,
            addr,
            _dir: TempDir(dir),
        };
        let deadline = Instant::now() + PATIENCE;
        while raw_http_ok(p.addr, "/-/ready") != Some(200) {
            assert!(Instant::now() < deadline, "Prometheus never became ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }

    /// An instant query: `(status, result)` of `/api/v1/query`.
    fn query(&self, expr: &str) -> (String, Vec<Value>) {
        let path = format!("/api/v1/query?query={}", urlencode(expr));
        let (_, body) = http(self.addr, "GET", &path, None, None);
        (
            body["status"].as_str().unwrap_or("?").to_owned() + &error_text(&body),
            body["data"]["result"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
        )
    }

    /// Waits until `expr` returns at least one series whose value is not NaN.
    fn wait_data(&self, expr: &str) -> Result<Vec<Value>, String> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let (status, result) = self.query(expr);
            if status != "success" {
                return Err(format!("{expr}: {status}"));
            }
            if result.iter().any(|r| r["value"][1] != "NaN") {
                return Ok(result);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{expr}: no data ({} series, all NaN or none)",
                    result.len()
                ));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn raw_http_ok(addr: SocketAddr, path: &str) -> Option<u16> {
    std::net::TcpStream::connect(addr).ok()?;
    Some(raw_http(addr, "GET", path, None, None).0)
}

fn error_text(body: &Value) -> String {
    match body["error"].as_str() {
        Some(e) => format!(" ({e})"),
        None => String::new(),
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every `expr` of a Grafana dashboard, wherever the panel (rows nest panels).
fn grafana_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(e)) = m.get("expr") {
                out.push(e.clone());
            }
            m.values().for_each(|v| grafana_exprs(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| grafana_exprs(v, out)),
        _ => {}
    }
}

/// Grafana's variables as Grafana would substitute them for a one-instance query.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("${__rate_interval}", "1m")
        .replace("$__interval", "1m")
        .replace("${__interval}", "1m")
        .replace("$__range", "5m")
        .replace("${__range}", "5m")
        .replace("${instance:regex}", ".*")
        .replace("${instance}", ".*")
        .replace("$instance", ".*")
        .replace("${job}", "turnpike")
        .replace("$job", "turnpike")
}

/// The metric names an expression selects (`turnpike_…`, recorded `turnpike:…`, and `up`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &expr[i..];
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if boundary && (rest.starts_with("turnpike_") || rest.starts_with("turnpike:")) {
            let len = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            names.insert(rest[..len].to_owned());
            i += len;
        } else {
            i += 1;
        }
    }
    names
}

fn promtool(args: &[&str], dir: &Path, stdin: Option<&str>) -> (bool, String) {
    use std::io::Write as _;
    let mut child = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/test.sh installs it)");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_panel_and_rule_has_data_in_a_real_prometheus() {
    let redis = redis::RedisServer::start();
    let store = format!("[store]\nredis-url = \"{}\"", redis.url);
    let serve = Serve::with_config(&config("live", &store));
    serve.wait_ready(200);
    let prometheus = Prometheus::start(serve.admin);
    // Counters must be scraped before they move, or their first sample already holds the
    // increase and `rate()` sees none.
    prometheus
        .wait_data(r#"count_over_time(up{job="turnpike"}[1m]) >= 2"#)
        .unwrap();

    // Load through every component: relayed packets over UDP and TCP (coturn's client, on a
    // blocking thread), a call with stats, wrong join codes, a request that fails.
    let relay = serve.udp;
    let tcp_relay = SocketAddr::from(([127, 0, 0, 1], tcp_port(&serve)));
    let udp = tokio::task::spawn_blocking(move || {
        relay_with_coturn_client(relay, false, "alice");
        relay_with_coturn_client(tcp_relay, true, "bob");
    });
    drive_a_call(&serve).await;
    for _ in 0..3 {
        let (st, _) = serve.api(
            "POST",
            "/v1/join",
            None,
            Some(json!({"code":"BCD-FGHJ-KLM","name":"x"})),
        );
        assert_eq!(st, 404);
    }
    udp.await.unwrap();
    // Per-route HTTP series are born with their first request: once Prometheus has them, a
    // second round of the same requests makes them move.
    prometheus
        .wait_data(
            r#"count(turnpike_control_http_request_duration_seconds_count{route="/v1/join"})"#,
        )
        .unwrap();
    drive_a_call(&serve).await;

    // Everything above is scraped, and the rules were evaluated on it.
    for expr in [
        "turnpike_relay_packets_total",
        "turnpike_call_mos_count",
        "turnpike_control_join_attempts_total",
    ] {
        let want = format!("sum(increase({expr}[1m])) > 0");
        prometheus.wait_data(&want).unwrap();
    }

    let mut failures = Vec::new();
    let mut checked = 0;
    // Every dashboard expression: no error, and data.
    let grafana = dashboards().join("grafana");
    let mut files: Vec<_> = std::fs::read_dir(&grafana)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "three dashboards: {files:?}");
    for file in &files {
        let dashboard: Value =
            serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
        let mut exprs = Vec::new();
        grafana_exprs(&dashboard, &mut exprs);
        assert!(!exprs.is_empty(), "{file:?} has no queries");
        for expr in exprs {
            checked += 1;
            if let Err(e) = prometheus.wait_data(&substitute(&expr)) {
                failures.push(format!(
                    "{}: {e}",
                    file.file_name().unwrap().to_string_lossy()
                ));
            }
        }
    }

    // Every rule as Prometheus loaded it: healthy, and evaluating without error. A recording
    // rule must produce data; an alert's condition is normally false on a healthy server, so
    // each series it selects must have data instead (a typo in a name fails here).
    let (_, rules) = http(prometheus.addr, "GET", "/api/v1/rules", None, None);
    let groups = rules["data"]["groups"].as_array().unwrap();
    assert!(
        !groups.is_empty(),
        "Prometheus loaded no rule group: {rules}"
    );
    let mut alerts = 0;
    for rule in groups.iter().flat_map(|g| g["rules"].as_array().unwrap()) {
        let (name, expr) = (
            rule["name"].as_str().unwrap(),
            rule["query"].as_str().unwrap(),
        );
        checked += 1;
        if rule["health"] == "err" {
            failures.push(format!("rule {name}: {}", rule["lastError"]));
        }
        if rule["type"] == "recording" {
            if let Err(e) = prometheus.wait_data(name) {
                failures.push(format!("recording rule {name}: {e}"));
            }
        } else {
            alerts += 1;
            let (status, _) = prometheus.query(expr);
            if status != "success" {
                failures.push(format!("alert {name}: {expr}: {status}"));
            }
            for metric in metric_names(expr) {
                if let Err(e) = prometheus.wait_data(&format!("count({metric})")) {
                    failures.push(format!("alert {name} selects {metric}: {e}"));
                }
            }
        }
    }
    assert!(alerts >= 6, "the alerts of issue 7: {alerts}");
    assert!(
        failures.is_empty(),
        "{} of {checked} expressions failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // No alert fires on a healthy server under a small load (`up` is 1, no errors).
    let (_, firing) = prometheus.query("ALERTS{alertstate=\"firing\"}");
    assert!(
        firing.is_empty(),
        "alerts firing on a healthy server: {firing:?}"
    );
    println!("{checked} expressions checked against Prometheus");
}

/// The TCP relay port of `serve` (printed as `tcp://…`).
fn tcp_port(serve: &Serve) -> u16 {
    serve
        .printed
        .iter()
        .find_map(|l| l.strip_prefix("turnpike: relay listening on tcp://"))
        .expect("a TCP relay listener")
        .parse::<SocketAddr>()
        .unwrap()
        .port()
}

#[test]
fn the_catalogue_lists_exactly_what_the_binary_exports() {
    let redis = redis::RedisServer::start();
    let store = format!("[store]\nredis-url = \"{}\"", redis.url);
    let serve = Serve::with_config(&config("catalogue", &store));
    serve.wait_ready(200);
    // One request, so the per-route HTTP families exist.
    let (st, _) = serve.api("GET", "/v1/calls", Some("tpk_wrong"), None);
    assert_eq!(st, 401);
    let exported = families(&scrape(serve.admin));
    let listed = catalogue();
    let missing: Vec<_> = exported
        .keys()
        .filter(|n| !listed.contains_key(*n))
        .collect();
    let stale: Vec<_> = listed
        .keys()
        .filter(|n| !exported.contains_key(*n))
        .collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "exported but not in dashboards/README.md: {missing:?}\n\
         in dashboards/README.md but not exported: {stale:?}"
    );
    for (name, (kind, labels)) in &exported {
        let (listed_kind, row) = &listed[name];
        assert_eq!(listed_kind, kind, "{name}: type in the catalogue");
        for label in labels {
            assert!(
                row.contains(&format!("`{label}`")),
                "{name}: label {label} not in the catalogue row: {row}"
            );
        }
        assert!(name.starts_with("turnpike_"), "{name}: prefix");
        if kind == "counter" {
            assert!(name.ends_with("_total"), "{name}: counters end in _total");
        }
    }
    assert_eq!(
        serve.metric(&format!(
            "turnpike_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );
}

#[test]
fn promtool_accepts_the_metrics_the_rules_and_their_unit_tests() {
    let serve = Serve::with_config(&config("promtool", ""));
    let body = scrape(serve.admin);
    let (ok, text) = promtool(&["check", "metrics"], &dashboards(), Some(&body));
    assert!(ok, "promtool check metrics: {text}");
    let rules = dashboards().join("prometheus");
    let (ok, text) = promtool(&["check", "rules", "rules.yml"], &rules, None);
    assert!(ok, "promtool check rules: {text}");
    let (ok, text) = promtool(&["test", "rules", "rules_test.yml"], &rules, None);
    assert!(ok, "promtool test rules: {text}");
    let (ok, text) = promtool(&["check", "config", "prometheus.yml"], &rules, None);
    assert!(ok, "promtool check config: {text}");
}

#[test]
fn metrics_are_served_on_the_admin_listener_only() {
    let serve = Serve::with_config(&config("admin-only", ""));
    assert!(scrape(serve.admin).contains("turnpike_relay_packets_total"));
    let (status, body) = raw_http(serve.control, "GET", "/metrics", None, None);
    assert_eq!(status, 404, "{body}");
    assert!(!body.contains("turnpike_"), "{body}");
}

/// Test plan L: many distinct users, calls and names add no series: labels come from fixed
/// sets only, never ids, names, codes or addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_do_not_grow_with_users_calls_and_names() {
    let serve = Serve::with_config(&config("bounded", ""));
    let relay = serve.udp;
    // One round of everything, so every route and result this load touches has its series.
    drive_a_call(&serve).await;
    tokio::task::spawn_blocking(move || {
        relay_with_coturn_client(relay, false, "user-0");
    })
    .await
    .unwrap();
    let before = scrape(serve.admin);
    let count = |body: &str| body.lines().filter(|l| !l.starts_with('#')).count();
    // Then many more, every one with new names, users and calls.
    for i in 0..10 {
        drive_a_call(&serve).await;
        if i % 5 == 0 {
            let user = format!("user-{i}-{}", "x".repeat(i));
            tokio::task::spawn_blocking(move || {
                relay_with_coturn_client(relay, false, &user);
            })
            .await
            .unwrap();
        }
    }
    let after = scrape(serve.admin);
    assert_eq!(
        count(&after),
        count(&before),
        "series grew with distinct users and calls"
    );
    for needle in ["Ada", "Bob", "user-", "127.0.0.1"] {
        assert!(!after.contains(needle), "{needle} in /metrics");
    }
}
