// The diagnostics page (/diagnostics): from this browser, can Turnpike's STUN server and TURN
// relay over UDP, TCP and TLS be reached?
//
// DOM contract (tests rely on it): each row [data-check="stun"|"turn-udp"|"turn-tcp"|"turn-tls"]
// gets data-result="ok"|"fail"|"skipped" (skipped: that kind of URL is not configured);
// #diagnostics gets data-status="running", then "done" once every check has finished (or
// "error" when no credentials could be had: #error[data-code] says why); #report holds a JSON
// report without the credentials; #copy-report copies it.

const CHECKS = ["stun", "turn-udp", "turn-tcp", "turn-tls"];
const TIMEOUT_MS = 10000;

const $ = (sel) => document.querySelector(sel);
const root = $("#diagnostics");
let report = null;
let running = false;

/** Which check a URL belongs to, or null (`stuns:` is not supported by browsers). */
export function checkOf(url) {
  const lower = String(url).toLowerCase();
  if (lower.startsWith("stun:")) return "stun";
  if (lower.startsWith("turns:")) return "turn-tls";
  if (lower.startsWith("turn:")) return /[?&]transport=tcp/.test(lower) ? "turn-tcp" : "turn-udp";
  return null;
}

/** For each check, the first configured URL and its credentials. */
function plan(iceServers) {
  const chosen = {};
  for (const server of iceServers || []) {
    const urls = Array.isArray(server.urls) ? server.urls : [server.urls];
    for (const url of urls) {
      const check = checkOf(url);
      if (check && !chosen[check]) {
        chosen[check] = { url, username: server.username, credential: server.credential };
      }
    }
  }
  return chosen;
}

/** `typ ADDRESS:PORT PROTOCOL` of a candidate line (what the report and the table show). */
function describe(c) {
  const parts = c.candidate.split(" ");
  const typ = c.type || parts[parts.indexOf("typ") + 1];
  const address = c.address || parts[4];
  const port = c.port || parts[5];
  const protocol = c.protocol || parts[2];
  let text = `${typ} ${address}:${port} ${protocol}`;
  if (typ === "relay" && c.relayProtocol) text += ` (to the relay over ${c.relayProtocol})`;
  return { type: typ, address, port: Number(port), protocol, relayProtocol: c.relayProtocol || null, text };
}

/** Gathers candidates against one server; resolves with what was found. */
function gather(check, server) {
  return new Promise((resolve) => {
    const started = performance.now();
    const found = [];
    const errors = [];
    let pc;
    let done = false;
    const finish = (how) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      try {
        pc.close();
      } catch (_) {
        // closed already
      }
      resolve({ found, errors, completed: how === "complete", ms: Math.round(performance.now() - started) });
    };
    const timer = setTimeout(() => finish("timeout"), TIMEOUT_MS);
    try {
      const ice = { urls: server.url };
      if (check !== "stun") {
        ice.username = server.username;
        ice.credential = server.credential;
      }
      pc = new RTCPeerConnection({
        iceServers: [ice],
        iceTransportPolicy: check === "stun" ? "all" : "relay",
      });
    } catch (e) {
      errors.push(String(e && e.message ? e.message : e));
      clearTimeout(timer);
      resolve({ found, errors, completed: false, ms: 0 });
      return;
    }
    pc.onicecandidate = (e) => {
      if (e.candidate && e.candidate.candidate) found.push(describe(e.candidate));
      else if (!e.candidate) finish("complete");
    };
    pc.onicegatheringstatechange = () => {
      if (pc.iceGatheringState === "complete") finish("complete");
    };
    pc.onicecandidateerror = (e) => {
      errors.push(`${e.errorCode || ""} ${e.errorText || ""}`.trim() || "error");
    };
    pc.createDataChannel("diagnostics");
    pc.createOffer()
      .then((offer) => pc.setLocalDescription(offer))
      .catch((e) => {
        errors.push(String(e && e.message ? e.message : e));
        finish("error");
      });
  });
}

/** ok / fail of a check from what gathering found. */
function judge(check, outcome) {
  if (check === "stun") {
    const srflx = outcome.found.find((c) => c.type === "srflx");
    if (srflx) return { result: "ok", shown: srflx };
    // A browser drops a server-reflexive candidate equal to a host one (no NAT between this
    // machine and the server): STUN answered when gathering completed without an error.
    if (outcome.completed && outcome.errors.length === 0 && outcome.found.length > 0) {
      return { result: "ok", shown: null, note: "answered (no address translation)" };
    }
    return { result: "fail", shown: null };
  }
  const relay = outcome.found.find((c) => c.type === "relay");
  return relay ? { result: "ok", shown: relay } : { result: "fail", shown: null };
}

function row(check) {
  return document.querySelector(`[data-check="${check}"]`);
}

function setRow(check, result, url, text) {
  const r = row(check);
  r.dataset.result = result;
  r.querySelector(".result").textContent = { ok: "✓ works", fail: "✗ blocked", skipped: "– not configured", running: "checking…" }[result] || result;
  r.querySelector(".url").textContent = url || "";
  r.querySelector(".candidate").textContent = text || "";
}

function render() {
  $("#report").textContent = JSON.stringify(report, null, 2);
}

function showError(code, message) {
  const el = $("#error");
  el.dataset.code = code;
  el.textContent = message;
  el.hidden = false;
}

async function credentials() {
  let res;
  try {
    res = await fetch("/v1/diagnostics/ice-servers", { method: "POST", credentials: "omit" });
  } catch (e) {
    throw Object.assign(new Error("Cannot reach Turnpike."), { code: "network_error" });
  }
  const json = await res.json().catch(() => null);
  if (!res.ok) {
    const err = (json && json.error) || {};
    const message =
      err.code === "rate_limited"
        ? `Too many runs from your network; try again in ${res.headers.get("Retry-After") || 60} s.`
        : err.message || `HTTP ${res.status}`;
    throw Object.assign(new Error(message), { code: err.code || `http_${res.status}` });
  }
  return json;
}

async function run() {
  if (running) return;
  running = true;
  $("#run-again").disabled = true;
  $("#error").hidden = true;
  $("#error").dataset.code = "";
  $("#copy-status").textContent = "";
  root.dataset.status = "running";
  $("#summary").textContent = "Checking…";
  for (const check of CHECKS) setRow(check, "running");
  report = {
    turnpike: location.origin,
    user_agent: navigator.userAgent,
    time: new Date().toISOString(),
    webrtc: typeof RTCPeerConnection === "function",
    checks: {},
  };

  let creds;
  try {
    if (!report.webrtc) throw Object.assign(new Error("This browser has no WebRTC."), { code: "not_supported" });
    creds = await credentials();
  } catch (e) {
    for (const check of CHECKS) setRow(check, "fail", "", "");
    report.error = { code: e.code || "error", message: e.message };
    showError(e.code || "error", e.message);
    $("#summary").textContent = "";
    render();
    root.dataset.status = "error";
    running = false;
    $("#run-again").disabled = false;
    return;
  }

  const chosen = plan(creds.ice_servers);
  await Promise.all(
    CHECKS.map(async (check) => {
      const server = chosen[check];
      if (!server) {
        setRow(check, "skipped");
        report.checks[check] = { result: "skipped" };
        return;
      }
      setRow(check, "running", server.url);
      const outcome = await gather(check, server);
      const verdict = judge(check, outcome);
      const text = verdict.shown ? verdict.shown.text : verdict.note || (outcome.errors[0] ? `error ${outcome.errors[0]}` : "no candidate");
      setRow(check, verdict.result, server.url, text);
      // The URL, never the username or password.
      report.checks[check] = {
        result: verdict.result,
        url: server.url,
        candidate: verdict.shown ? verdict.shown.text : null,
        note: verdict.note || null,
        candidates: outcome.found.map((c) => c.text),
        errors: outcome.errors,
        gathering: outcome.completed ? "complete" : "timeout",
        ms: outcome.ms,
      };
    }),
  );
  const results = CHECKS.map((c) => report.checks[c].result);
  const ok = results.filter((r) => r === "ok").length;
  const tested = results.filter((r) => r !== "skipped").length;
  $("#summary").textContent =
    ok === tested
      ? "Everything configured is reachable."
      : ok > 0
        ? "Some ways are blocked; calls can still connect through the ones that work."
        : "Nothing is reachable from this network: calls will not connect.";
  render();
  root.dataset.status = "done";
  running = false;
  $("#run-again").disabled = false;
}

async function copyReport() {
  const text = $("#report").textContent;
  try {
    await navigator.clipboard.writeText(text);
    $("#copy-status").textContent = "Copied.";
  } catch (_) {
    // No clipboard permission (or not a secure context): select it for a manual copy.
    const range = document.createRange();
    range.selectNodeContents($("#report"));
    const sel = getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
    $("#copy-status").textContent = "Selected: press Ctrl+C (or ⌘C) to copy.";
  }
}

$("#run-again").addEventListener("click", run);
$("#copy-report").addEventListener("click", copyReport);
run();
