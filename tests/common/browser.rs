//! Headless Chromium (Debian's `chromium`, never a downloaded browser) driven over the Chrome
//! DevTools Protocol on one WebSocket: enough of it to open pages in separate browser contexts
//! (each like another person's browser), evaluate JavaScript in them, and take screenshots.
//!
//! Written on the WebSocket client the tests already use rather than a CDP crate: the five
//! methods needed here are plain JSON-RPC, and a full client would add hundreds of generated
//! types to the build.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// How long a page may take to reach a state: ICE over TURN on loopback takes well under a
/// second, but a loaded 2-core CI machine runs two browsers and the relay at once.
pub(crate) const PAGE_PATIENCE: Duration = Duration::from_secs(45);

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One Chromium process, killed on drop.
pub(crate) struct Browser {
    child: Child,
    ws: Ws,
    next_id: u64,
    profile: PathBuf,
}

/// A page (tab) attached to the browser's session.
#[derive(Debug, Clone)]
pub(crate) struct Page {
    session: String,
}

impl Browser {
    /// Starts headless Chromium with fake camera and microphone and no permission prompts.
    pub(crate) async fn launch(name: &str) -> Browser {
        let profile =
            std::env::temp_dir().join(format!("turnpike-chromium-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).unwrap();
        let mut child = Command::new("chromium")
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                // Background tabs keep their timers and WebRTC running at full speed.
                "--disable-background-timer-throttling",
                "--disable-renderer-backgrounding",
                "--disable-backgrounding-occluded-windows",
                "--use-fake-device-for-media-stream",
                "--use-fake-ui-for-media-stream",
                // The test relay's TLS certificate is self-signed.
                "--ignore-certificate-errors",
                // Host candidates as real addresses, not mDNS names nobody here resolves.
                "--disable-features=WebRtcHideLocalIpsWithMdns",
                "--window-size=1024,720",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium (Debian package chromium; scripts/test.sh installs it)");
        // Readiness: Chromium prints its DevTools address once it listens.
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in stderr.lines().map_while(Result::ok) {
                if !sent {
                    if let Some(url) = line.strip_prefix("DevTools listening on ") {
                        let _ = tx.send(url.to_owned());
                        sent = true;
                    }
                }
            }
        });
        let url = rx
            .recv_timeout(PAGE_PATIENCE)
            .expect("chromium prints its DevTools address");
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Browser {
            child,
            ws,
            next_id: 1,
            profile,
        }
    }

    /// Calls `method` (on a page's session when given) and returns its result; fails the test
    /// on a protocol error.
    pub(crate) async fn call(&mut self, page: Option<&Page>, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(p) = page {
            msg["sessionId"] = json!(p.session);
        }
        self.ws
            .send(Message::Text(msg.to_string().into()))
            .await
            .unwrap();
        loop {
            let m = tokio::time::timeout(PAGE_PATIENCE, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method}"))
                .expect("DevTools socket ended")
                .unwrap();
            let Message::Text(text) = m else { continue };
            let v: Value = serde_json::from_str(&text).unwrap();
            // Events (no id) and answers to other calls are not waited for.
            if v["id"] != id {
                continue;
            }
            if let Some(e) = v.get("error") {
                panic!("{method}: {e}");
            }
            return v["result"].clone();
        }
    }

    /// Opens `url` in a new browser context (own cookies, storage and media: another person).
    pub(crate) async fn open(&mut self, url: &str) -> Page {
        let ctx = self
            .call(None, "Target.createBrowserContext", json!({}))
            .await;
        let target = self
            .call(
                None,
                "Target.createTarget",
                json!({"url": "about:blank", "browserContextId": ctx["browserContextId"]}),
            )
            .await;
        let attached = self
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        let page = Page {
            session: attached["sessionId"].as_str().unwrap().to_owned(),
        };
        self.call(Some(&page), "Page.enable", json!({})).await;
        self.call(Some(&page), "Page.navigate", json!({"url": url}))
            .await;
        page
    }

    /// The value of a JavaScript expression in `page` (promises awaited).
    pub(crate) async fn eval(&mut self, page: &Page, expr: &str) -> Value {
        let r = self
            .call(
                Some(page),
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(e) = r.get("exceptionDetails") {
            return json!({"exception": e});
        }
        r["result"]["value"].clone()
    }

    /// Polls `expr` until it is truthy and returns it; fails with `what` and the last value
    /// of `explain` (a snapshot of the page) when it never is.
    pub(crate) async fn wait_for(
        &mut self,
        page: &Page,
        expr: &str,
        what: &str,
        explain: &str,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + PAGE_PATIENCE;
        loop {
            let v = self.eval(page, expr).await;
            let truthy = !matches!(v, Value::Null | Value::Bool(false))
                && v != json!("")
                && v != json!(0)
                && v.get("exception").is_none();
            if truthy {
                return v;
            }
            if tokio::time::Instant::now() > deadline {
                let state = self.eval(page, explain).await;
                panic!("{what}: never happened; page: {state}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Saves a PNG screenshot of `page` at `path`.
    pub(crate) async fn screenshot(&mut self, page: &Page, path: &Path) {
        let r = self
            .call(
                Some(page),
                "Page.captureScreenshot",
                json!({"format": "png"}),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
