// The join page (served at /join/{code} and /join#token=…), built on the SDK.
//
// DOM contract (tests rely on it): #call[data-status] is idle | joining | joined | reconnecting
// (the signaling socket dropped; the SDK is getting it back) | ended | error;
// each remote peer is a .peer-tile with data-peer-id, data-state (the RTCPeerConnection's
// connectionState) and data-candidate (direct | relay-udp | relay-tcp | relay-tls, "" until
// known); errors show in #error with data-code (the API's error code).

import { Turnpike, candidateLabel } from "/sdk/turnpike.js";

const $ = (sel) => document.querySelector(sel);

const MESSAGES = {
  call_full: "This call is full.",
  call_join_limit: "This call cannot admit anyone else. Ask the host for a new call.",
  invalid_or_expired: "This join link is invalid or has expired, or the call has ended.",
  call_ended: "The call has ended.",
  rate_limited: "Too many attempts. Please wait a minute and try again.",
  unavailable: "Turnpike is temporarily unavailable. Please try again in a moment.",
  timeout: "Turnpike took too long to answer. Please try again.",
  network_error: "Cannot reach Turnpike. Check your connection and try again.",
  signal_unreachable: "Cannot reach the call's signaling server.",
  unauthorized: "This link can no longer be used. Ask for a new one.",
  kicked: "You were removed from the call.",
  replaced: "You joined this call from another tab or device.",
  no_code: "This link has no join code. Enter the code you were given.",
  not_supported: "This browser cannot make calls (no WebRTC).",
};

const ENDED = {
  left: "You left the call.",
  api: "The call was ended by the host.",
  empty: "The call has ended.",
  expired: "The call has expired.",
  kicked: MESSAGES.kicked,
  replaced: MESSAGES.replaced,
  unauthorized: MESSAGES.unauthorized,
  call_ended: "The call has ended.",
  disconnected: "Lost the connection to the call.",
  timeout: "Lost the connection to the call.",
  shutdown: "The server restarted. Please join again.",
};

const STATE_TEXT = {
  new: "waiting",
  connecting: "connecting…",
  connected: "connected",
  disconnected: "reconnecting…",
  failed: "failed",
  closed: "closed",
};

const CANDIDATE_TEXT = {
  direct: "direct",
  "relay-udp": "relay · UDP",
  "relay-tcp": "relay · TCP",
  "relay-tls": "relay · TLS",
};

// Parameters come from the query string; a personal link's token from the fragment. Links are
// often pasted with parameters after the fragment (`/join#token=…?name=Ada`) or inside it
// (`#token=…&name=Ada`): both are read too, the query string winning.
const [fragmentPart, fragmentQuery] = location.hash.replace(/^#/, "").split("?", 2);
const fragment = new URLSearchParams(fragmentPart);
const params = new URLSearchParams(location.search);
for (const extra of [new URLSearchParams(fragmentQuery || ""), fragment]) {
  for (const [k, v] of extra) if (k !== "token" && !params.has(k)) params.set(k, v);
}
const root = $("#call");
let call = null;

/** The join code from /join/{code}, or null. */
function codeFromPath() {
  const m = location.pathname.match(/^\/join\/([^/]+)\/?$/);
  if (!m) return null;
  try {
    return decodeURIComponent(m[1]);
  } catch (_) {
    return m[1];
  }
}

function setStatus(status) {
  root.dataset.status = status;
}

function showError(code, message) {
  const el = $("#error");
  el.dataset.code = code || "error";
  el.textContent = MESSAGES[code] || message || "Something went wrong.";
  el.hidden = false;
}

function clearError() {
  const el = $("#error");
  el.dataset.code = "";
  el.textContent = "";
  el.hidden = true;
}

function notice(text) {
  const el = $("#notice");
  el.textContent = text || "";
  el.hidden = !text;
}

function tileOf(peerId) {
  for (const t of document.querySelectorAll(".peer-tile")) {
    if (t.dataset.peerId === peerId) return t;
  }
  return null;
}

function ensureTile(peerId, name) {
  let tile = tileOf(peerId);
  if (!tile) {
    tile = $("#peer-template").content.firstElementChild.cloneNode(true);
    tile.dataset.peerId = peerId;
    tile.dataset.state = "new";
    tile.dataset.candidate = "";
    tile.querySelector(".tile-state").textContent = STATE_TEXT.new;
    const unmute = tile.querySelector(".unmute");
    unmute.addEventListener("click", () => {
      const v = tile.querySelector("video");
      v.muted = false;
      v.play().catch(() => {});
      unmute.hidden = true;
    });
    $("#tiles").appendChild(tile);
    layout();
  }
  if (name) tile.querySelector(".tile-name").textContent = name;
  return tile;
}

function layout() {
  const n = document.querySelectorAll(".tile:not([hidden])").length;
  $("#tiles").dataset.count = String(n);
}

function setCandidate(tile, label) {
  if (label === undefined || label === null) return;
  tile.dataset.candidate = label;
  tile.querySelector(".tile-candidate").textContent = CANDIDATE_TEXT[label] || "";
}

function setMediaBadge(el, media) {
  const parts = [];
  if (!media.audio) parts.push("muted");
  if (!media.video) parts.push("camera off");
  el.textContent = parts.join(" · ");
  el.hidden = parts.length === 0;
}

function playVideo(tile, stream) {
  const v = tile.querySelector("video");
  if (v.srcObject !== stream) v.srcObject = stream;
  v.play().catch(() => {
    // Autoplay with sound refused (no user gesture, e.g. autojoin): play muted, offer a tap.
    v.muted = true;
    v.play().catch(() => {});
    tile.querySelector(".unmute").hidden = false;
  });
}

function updateControls() {
  if (!call) return;
  const stream = call.localStream;
  const has = (kind) => !!stream && stream.getTracks().some((t) => t.kind === kind);
  const media = call.media;
  const a = $("#toggle-audio");
  const v = $("#toggle-video");
  a.disabled = !has("audio");
  v.disabled = !has("video");
  a.textContent = has("audio") ? (media.audio ? "Mute" : "Unmute") : "No microphone";
  v.textContent = has("video") ? (media.video ? "Camera off" : "Camera on") : "No camera";
  a.setAttribute("aria-pressed", String(has("audio") && !media.audio));
  v.setAttribute("aria-pressed", String(has("video") && !media.video));
  setMediaBadge($("#local-media"), media);
  $("#local-tile").classList.toggle("video-off", !media.video);
}

function wire(c) {
  c.on("peer-joined", ({ peerId, name, media }) => {
    const tile = ensureTile(peerId, name);
    setMediaBadge(tile.querySelector(".tile-media"), media);
  });
  c.on("peer-left", ({ peerId }) => {
    const tile = tileOf(peerId);
    if (tile) tile.remove();
    layout();
  });
  c.on("track", ({ peerId, stream }) => playVideo(ensureTile(peerId), stream));
  c.on("state", ({ peerId, state }) => {
    const tile = tileOf(peerId);
    if (!tile) return;
    tile.dataset.state = state;
    tile.querySelector(".tile-state").textContent = STATE_TEXT[state] || state;
  });
  c.on("quality", (q) => {
    const tile = tileOf(q.peerId);
    if (!tile) return;
    setCandidate(tile, candidateLabel(q));
    if (q.rtt_ms != null) tile.title = `RTT ${Math.round(q.rtt_ms)} ms`;
  });
  c.on("media", ({ peerId, audio, video, screen }) => {
    const tile = tileOf(peerId);
    if (!tile) return;
    setMediaBadge(tile.querySelector(".tile-media"), { audio, video, screen });
    tile.classList.toggle("video-off", !video);
  });
  c.on("ice-servers", () => {
    // How many credential refreshes were applied (for tests and whoever debugs).
    root.dataset.iceRefreshes = String(Number(root.dataset.iceRefreshes || 0) + 1);
  });
  c.on("reconnecting", () => {
    // The media may well go on meanwhile (the peer connections do not need signaling).
    setStatus("reconnecting");
    notice("Reconnecting…");
  });
  c.on("reconnected", () => {
    setStatus("joined");
    notice("");
  });
  c.on("error", ({ code, message }) => {
    // Signaling refused one message: the call goes on; log it for whoever debugs.
    console.warn("turnpike:", code, message);
  });
  c.on("ended", ({ reason }) => {
    setStatus("ended");
    for (const t of document.querySelectorAll(".peer-tile")) t.remove();
    $("#local-tile").hidden = true;
    $("#controls").hidden = true;
    layout();
    notice(ENDED[reason] || "The call has ended.");
    if (reason === "call_full") showError("call_full");
    call = null;
    window.__turnpikeCall = null;
    // Join again (a code admits again; a personal token was used up and will say so).
    $("#join-form").hidden = false;
    $("#join-button").disabled = false;
  });
}

async function join(ev) {
  if (ev) ev.preventDefault();
  if (call || root.dataset.status === "joining") return;
  clearError();
  notice("");
  const name = $("#name").value.trim();
  if (!name) {
    $("#name").focus();
    return;
  }
  const token = fragment.get("token");
  const code = token ? null : codeFromPath() || params.get("code") || $("#code").value.trim();
  if (!token && !code) {
    $("#code-field").hidden = false;
    showError("no_code");
    return;
  }
  if (!globalThis.RTCPeerConnection) {
    setStatus("error");
    showError("not_supported");
    return;
  }
  setStatus("joining");
  $("#join-button").disabled = true;
  notice("Joining…");
  try {
    const opts = { name, relayOnly: $("#relay-only").checked };
    if (token) opts.token = token;
    else opts.code = code;
    call = await Turnpike.join(opts);
  } catch (e) {
    call = null;
    setStatus("error");
    notice("");
    showError(e.code, e.message);
    $("#join-button").disabled = false;
    return;
  }
  wire(call);
  // The SDK's call object, for tests and whoever debugs from the console (e.g. a browser test
  // drops its signaling socket to check the reconnect). Not an API.
  window.__turnpikeCall = call;
  setStatus("joined");
  notice("");
  $("#join-form").hidden = true;
  $("#controls").hidden = false;
  $("#local-name").textContent = name;
  const local = $("#local-tile");
  local.hidden = false;
  if (call.localStream) {
    $("#local-video").srcObject = call.localStream;
    $("#local-video").play().catch(() => {});
  }
  updateControls();
  layout();
  // Peers already there (set up right after join resolves) get their tiles from the events.
}

function init() {
  const code = codeFromPath() || params.get("code");
  const token = fragment.get("token");
  if (code) $("#call-label").textContent = code.toUpperCase();
  else if (token) $("#call-label").textContent = "personal link";
  else $("#code-field").hidden = false;
  const name = params.get("name");
  if (name) $("#name").value = name;
  $("#relay-only").checked = params.get("relay") === "1";

  $("#join-form").addEventListener("submit", join);
  $("#toggle-audio").addEventListener("click", () => {
    if (!call) return;
    call.setAudio(!call.media.audio);
    updateControls();
  });
  $("#toggle-video").addEventListener("click", () => {
    if (!call) return;
    call.setVideo(!call.media.video);
    updateControls();
  });
  $("#leave").addEventListener("click", () => {
    if (call) call.leave();
  });
  window.addEventListener("pagehide", () => {
    if (call) call.leave();
  });

  setStatus("idle");
  if (params.get("autojoin") === "1") {
    if ($("#name").value.trim()) join();
    else $("#name").focus();
  }
}

init();
