// Turnpike browser SDK: join a call by join code or participant token, run a full mesh of
// RTCPeerConnections through Turnpike's signaling and relay, and report call quality.
//
//   import { Turnpike } from "/sdk/turnpike.js";
//   const call = await Turnpike.join({ code: "BCD-FGHJ-KLM", name: "Ada" });
//   call.on("track", ({ peerId, stream }) => { video.srcObject = stream; });
//
// Plain ES module, no dependencies, no build step. See docs/sdk.md.

const STATS_INTERVAL_MS = 5000;
const DEFAULT_PING_MS = 15000;
const PROTOCOL = 1;
/**
 * The wait before each repeat of an unanswered offer. It is repeated for a resume window and
 * one more try: an answerer whose signaling is away gets it when it is back.
 */
const OFFER_RETRY_MS = 8000;
/**
 * Reconnecting a dropped signaling socket: the first try after RECONNECT_FIRST_MS, each next
 * one after twice as long (at most RECONNECT_MAX_MS), for as long as the server keeps the seat
 * (`signal.resume-window`, 30 s unless told otherwise with `resumeWindowMs`).
 */
const RECONNECT_FIRST_MS = 500;
const RECONNECT_MAX_MS = 8000;
const DEFAULT_RESUME_WINDOW_MS = 30000;
/** A try that has no `welcome` by then is given up (the server's auth deadline is 5 s). */
const RECONNECT_ATTEMPT_MS = 10000;
/**
 * Reasons (from a close code or an `error` before `welcome`) after which trying again cannot
 * help: the call is over, this peer was removed or refused, or another tab took its place.
 */
const FINAL = new Set(["call_ended", "unauthorized", "kicked", "replaced", "call_full"]);

/** An error from the API, signaling or the browser, with a stable `code`. */
export class TurnpikeError extends Error {
  constructor(code, message, status) {
    super(message || code);
    this.name = "TurnpikeError";
    this.code = code;
    this.status = status;
  }
}

/** `direct`, `relay-udp`, `relay-tcp` or `relay-tls` of a quality report ("" when unknown). */
export function candidateLabel(q) {
  if (!q || !q.candidate_type) return "";
  if (q.candidate_type === "relay") {
    return "relay-" + (q.relay_protocol && q.relay_protocol !== "none" ? q.relay_protocol : "udp");
  }
  return "direct";
}

/** The transport to a TURN server from its URL (`turns:` is TLS; else `?transport=`). */
function protocolOfUrl(url) {
  if (typeof url !== "string") return null;
  const lower = url.toLowerCase();
  if (lower.startsWith("turns:")) return "tls";
  if (!lower.startsWith("turn:")) return null;
  return /[?&]transport=tcp/.test(lower) ? "tcp" : "udp";
}

function finite(x) {
  return typeof x === "number" && Number.isFinite(x) ? x : null;
}

function clamp(x, lo, hi) {
  return Math.min(hi, Math.max(lo, x));
}

/** Local media, falling back to less and finally to none (receive only). */
async function getLocalStream() {
  const md = globalThis.navigator && navigator.mediaDevices;
  if (!md || !md.getUserMedia) return null;
  for (const constraints of [{ audio: true, video: true }, { audio: true }, { video: true }]) {
    try {
      return await md.getUserMedia(constraints);
    } catch (_) {
      // No such device or no permission: try with less.
    }
  }
  return null;
}

/** A call in progress: an EventTarget with `on(type, fn)` (fn gets the event's detail). */
class Call extends EventTarget {
  constructor(opts, joined, localStream) {
    super();
    this._opts = opts;
    this._joined = joined;
    this.localStream = localStream;
    this.peerId = joined.peer_id;
    this.callId = joined.call_id;
    this.role = joined.role;
    this.name = opts.name;
    this._iceServers = joined.ice_servers || [];
    // The latest signaling token: the join's, then each one the server pushes (`token`), so
    // that a reconnect after the join's token expired can still resume.
    this._token = joined.signal_token;
    this._resumeWindowMs = finite(opts.resumeWindowMs) ?? DEFAULT_RESUME_WINDOW_MS;
    this._connectTimeoutMs = finite(opts.connectTimeoutMs) ?? RECONNECT_ATTEMPT_MS;
    this._offerRetries = Math.ceil(Math.max(this._resumeWindowMs, 0) / OFFER_RETRY_MS) + 1;
    this._autoReconnect = opts.reconnect !== false;
    /** While reconnecting: `{deadline, attempt, timer, reason}`. */
    this._reconnect = null;
    this._relayOnly = !!opts.relayOnly;
    this._peers = new Map();
    this._ws = null;
    this._pingTimer = null;
    this._statsTimer = null;
    this._ended = false;
    this._backlog = [];
    this._media = {
      audio: this._hasTrack("audio"),
      video: this._hasTrack("video"),
      screen: false,
    };
  }

  /** Listens to `type`; returns a function that stops listening. */
  on(type, fn) {
    const listener = (e) => fn(e.detail);
    this.addEventListener(type, listener);
    return () => this.removeEventListener(type, listener);
  }

  /** The remote peers: `[{peerId, name, role, media, state, quality, stream}]`. */
  get peers() {
    return [...this._peers.values()].map((p) => ({
      peerId: p.id,
      name: p.name,
      role: p.role,
      media: { ...p.media },
      state: p.pc ? p.pc.connectionState : "new",
      quality: p.quality,
      stream: p.stream,
    }));
  }

  /** What this participant sends: `{audio, video, screen}`. */
  get media() {
    return { ...this._media };
  }

  get ended() {
    return this._ended;
  }

  setAudio(on) {
    this._setKind("audio", on);
  }

  setVideo(on) {
    this._setKind("video", on);
  }

  /** Leaves the call for good: closes every connection and stops the local media. */
  leave() {
    if (this._ended) return;
    this._send({ type: "leave" });
    this._end("left");
  }

  // --- internals -------------------------------------------------------------------------

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _error(err) {
    const e = err instanceof TurnpikeError ? err : new TurnpikeError("client_error", String(err && err.message || err));
    this._emit("error", { code: e.code, message: e.message, error: e });
  }

  _hasTrack(kind) {
    return !!this.localStream && this.localStream.getTracks().some((t) => t.kind === kind && t.enabled);
  }

  _setKind(kind, on) {
    on = !!on;
    if (this.localStream) {
      for (const t of this.localStream.getTracks()) if (t.kind === kind) t.enabled = on;
    }
    const has = !!this.localStream && this.localStream.getTracks().some((t) => t.kind === kind);
    this._media[kind] = on && has;
    this._send({ type: "media", ...this._media });
  }

  _send(msg) {
    if (this._ws && this._ws.readyState === WebSocket.OPEN) {
      this._ws.send(JSON.stringify({ v: PROTOCOL, ...msg }));
    }
  }

  _pcConfig() {
    return {
      iceServers: this._iceServers,
      iceTransportPolicy: this._relayOnly ? "relay" : "all",
    };
  }

  /** Opens signaling and resolves on `welcome`. */
  _connect() {
    return new Promise((resolve, reject) => {
      let giveUp = null;
      const ws = this._openSocket({
        welcome: (msg) => {
          clearTimeout(giveUp);
          this._welcome(msg);
          resolve(this);
          // Peers are set up on the next task, once the caller has its listeners attached
          // (`await Turnpike.join(…)` resumes in a microtask, before this runs).
          setTimeout(() => this._start(msg), 0);
        },
        refused: (err) => {
          clearTimeout(giveUp);
          reject(err);
        },
      });
      // A socket that never opens or never answers (a half-dead network path, a proxy that
      // accepts and holds) must not leave `join()` pending until TCP gives up, minutes later:
      // the same bound as one reconnect try.
      giveUp = setTimeout(() => {
        if (this._ws !== ws) return;
        this._ws = null;
        try {
          ws.close();
        } catch (_) {
          // closing anyway
        }
        reject(new TurnpikeError("signal_unreachable", "Signaling did not answer in time."));
      }, this._connectTimeoutMs);
    });
  }

  /**
   * Opens one signaling socket and authenticates with the latest token. Before `welcome`,
   * calls `handlers.welcome(msg)` or, once, `handlers.refused(TurnpikeError)`; after it,
   * messages go to the call and a close to `_onSocketClosed`. Events of a socket that is no
   * longer the call's (`this._ws`) are ignored. Returns the socket.
   */
  _openSocket(handlers) {
    let welcomed = false;
    let settled = false;
    const ws = new WebSocket(this._joined.signal_url);
    this._ws = ws;
    const refuse = (err) => {
      if (settled) return;
      settled = true;
      handlers.refused(err);
    };
    ws.onopen = () => {
      if (this._ws !== ws) return;
      ws.send(JSON.stringify({ v: PROTOCOL, type: "auth", token: this._token }));
    };
    ws.onmessage = (ev) => {
      if (this._ws !== ws) return;
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch (_) {
        return;
      }
      this._heardAt = performance.now();
      if (!welcomed) {
        if (msg.type === "welcome") {
          welcomed = true;
          settled = true;
          handlers.welcome(msg);
        } else if (msg.type === "error") {
          // `full` from signaling means what the API's 409 `call_full` means: one code.
          const code = msg.code === "full" ? "call_full" : msg.code || "signal_error";
          refuse(new TurnpikeError(code, msg.message));
        } else if (msg.type === "call_ended") {
          refuse(new TurnpikeError("call_ended", "The call has ended."));
        }
        return;
      }
      if (this._backlog) this._backlog.push(msg);
      else this._onMessage(msg);
    };
    ws.onerror = () => {
      if (this._ws === ws && !welcomed) refuse(new TurnpikeError("signal_unreachable", "Cannot reach signaling."));
    };
    ws.onclose = (ev) => {
      if (this._ws !== ws) return;
      if (!welcomed) {
        refuse(new TurnpikeError(closeCode(ev.code) || "signal_closed", ev.reason || "Signaling closed the connection."));
        return;
      }
      this._onSocketClosed(ev);
    };
    return ws;
  }

  /** The call's socket closed after `welcome`: the end, or a reconnect within the window. */
  _onSocketClosed(ev) {
    if (this._ended) return;
    const reason = closeCode(ev.code);
    if (FINAL.has(reason) || !this._autoReconnect || this._resumeWindowMs <= 0) {
      this._end(reason || "disconnected");
      return;
    }
    clearInterval(this._pingTimer);
    this._pingTimer = null;
    this._reconnect = {
      deadline: performance.now() + this._resumeWindowMs,
      attempt: 0,
      timer: null,
      reason: reason || "disconnected",
    };
    this._scheduleAttempt();
  }

  /** The next try, after the backoff; the end when the resume window has passed. */
  _scheduleAttempt() {
    const r = this._reconnect;
    if (!r || this._ended) return;
    const left = r.deadline - performance.now();
    if (left <= 0) {
      this._end("disconnected");
      return;
    }
    const delay = Math.min(RECONNECT_FIRST_MS * 2 ** r.attempt, RECONNECT_MAX_MS, left);
    r.attempt += 1;
    this._emit("reconnecting", { attempt: r.attempt, delayMs: Math.round(delay), reason: r.reason });
    r.timer = setTimeout(() => this._attempt(), delay);
  }

  _attempt() {
    const r = this._reconnect;
    if (!r || this._ended) return;
    let giveUp = null;
    const ws = this._openSocket({
      welcome: (msg) => {
        clearTimeout(giveUp);
        this._resumed(msg);
      },
      refused: (err) => {
        clearTimeout(giveUp);
        if (this._ended || this._reconnect !== r) return;
        if (ws.readyState === WebSocket.CONNECTING || ws.readyState === WebSocket.OPEN) {
          try {
            ws.close();
          } catch (_) {
            // closing anyway
          }
        }
        // Refused for good (the token too old, the peer gone from the call, kicked meanwhile)
        // ends the call; anything else (no network yet, `unavailable`) tries again.
        if (err.code === "call_ended") this._end("call_ended");
        else if (FINAL.has(err.code)) this._end("disconnected");
        else this._scheduleAttempt();
      },
    });
    // A socket that never opens or never answers (a half-dead network) must not stall the
    // tries: closing it counts as a failed try.
    giveUp = setTimeout(() => {
      try {
        ws.close();
      } catch (_) {
        // closing anyway
      }
    }, RECONNECT_ATTEMPT_MS);
  }

  /** `welcome` on a reconnect. */
  _resumed(msg) {
    const r = this._reconnect;
    this._reconnect = null;
    if (Array.isArray(msg.ice_servers)) this._applyIceServers(msg.ice_servers, msg.ice_servers_expire_at);
    this._startPing(msg);
    this._send({ type: "media", ...this._media });
    if (msg.resumed) {
      // The others saw nothing: the peer connections go on. What happened while away was not
      // sent to us: peers who left are dropped, newcomers met, media states taken from the
      // welcome's list.
      const present = new Map((msg.peers || []).map((p) => [p.peer_id, p]));
      for (const id of [...this._peers.keys()]) {
        if (!present.has(id)) this._removePeer(id, "left");
      }
      for (const info of present.values()) {
        const peer = this._peers.get(info.peer_id);
        if (!peer) {
          this._meet(info);
        } else if (info.media) {
          const media = { audio: !!info.media.audio, video: !!info.media.video, screen: !!info.media.screen };
          if (JSON.stringify(media) !== JSON.stringify(peer.media)) {
            peer.media = media;
            this._emit("media", { peerId: peer.id, ...media });
          }
        }
      }
      // Offers or answers sent to us while away were lost; repeat ours where a pair is still
      // waiting.
      for (const peer of this._peers.values()) {
        if (!peer.offerer) continue;
        const pc = peer.pc;
        if (pc.signalingState === "have-local-offer" && pc.localDescription) {
          this._send({ type: "offer", to: peer.id, sdp: pc.localDescription.sdp });
        } else if (pc.connectionState === "failed") {
          this._inOrder(peer.id, (p) => this._offer(p, true));
        }
      }
    } else {
      // Admitted as a newcomer (the server no longer held this socket's place, e.g. its node
      // restarted): the others start over with us, so do we.
      for (const id of [...this._peers.keys()]) this._removePeer(id, "disconnected");
      this._start(msg);
    }
    this._emit("reconnected", { resumed: !!msg.resumed, attempts: r ? r.attempt : 0 });
  }

  _welcome(msg) {
    this.peerId = msg.peer_id;
    this.callId = msg.call_id;
    if (Array.isArray(msg.ice_servers)) this._iceServers = msg.ice_servers;
    this._startPing(msg);
    this._statsTimer = setInterval(() => this._statsTick(), STATS_INTERVAL_MS);
    this._send({ type: "media", ...this._media });
  }

  /**
   * Pings every `ping_interval_ms`, and gives up on a socket that has heard nothing for two
   * intervals (every ping is answered): a dead path (a NAT that forgot the connection, a
   * captive network) may not close the socket for minutes, while the server already counts
   * the silence against the resume window.
   */
  _startPing(welcome) {
    clearInterval(this._pingTimer);
    const interval = finite(welcome.ping_interval_ms) || DEFAULT_PING_MS;
    this._heardAt = performance.now();
    this._pingTimer = setInterval(() => {
      const ws = this._ws;
      if (performance.now() - this._heardAt > 2 * interval + interval / 2) {
        clearInterval(this._pingTimer);
        this._pingTimer = null;
        this._ws = null;
        try {
          ws.close(4008, "timeout");
        } catch (_) {
          // closing anyway
        }
        this._onSocketClosed({ code: 4008 });
        return;
      }
      this._send({ type: "ping" });
    }, interval);
  }

  _applyIceServers(iceServers, expiresAt) {
    this._iceServers = iceServers;
    for (const peer of this._peers.values()) {
      try {
        peer.pc.setConfiguration(this._pcConfig());
      } catch (e) {
        this._error(e);
      }
    }
    this._emit("ice-servers", { iceServers, expiresAt });
  }

  _start(welcome) {
    const backlog = this._backlog || [];
    this._backlog = null;
    if (this._ended) return;
    for (const info of welcome.peers || []) this._meet(info);
    for (const msg of backlog) this._onMessage(msg);
  }

  _onMessage(msg) {
    switch (msg.type) {
      case "peer_joined":
        if (msg.peer) this._meet(msg.peer);
        break;
      case "peer_left":
        this._removePeer(msg.peer_id, msg.reason);
        break;
      case "offer":
        this._inOrder(msg.from, (peer) => this._onOffer(peer, msg.sdp));
        break;
      case "answer":
        this._inOrder(msg.from, (peer) => this._onAnswer(peer, msg.sdp));
        break;
      case "candidate":
        this._inOrder(msg.from, (peer) => this._onCandidate(peer, msg.candidate));
        break;
      case "media": {
        const peer = this._peers.get(msg.from);
        if (peer) {
          peer.media = { audio: !!msg.audio, video: !!msg.video, screen: !!msg.screen };
          this._emit("media", { peerId: peer.id, ...peer.media });
        }
        break;
      }
      case "ice_servers":
        if (Array.isArray(msg.ice_servers)) this._applyIceServers(msg.ice_servers, msg.ice_servers_expire_at);
        break;
      case "token":
        // Kept for the next `auth` (a reconnect): the join's token expires mid-call.
        if (typeof msg.token === "string" && msg.token) this._token = msg.token;
        break;
      case "call_ended":
        this._end(msg.reason || "ended");
        break;
      case "error":
        this._emit("error", { code: msg.code, message: msg.message });
        break;
      default:
        // pong and anything newer: nothing to do.
        break;
    }
  }

  /**
   * A peer of the call, from `welcome` or `peer_joined`. Of each pair the side with the smaller
   * peer id offers, however each learned of the other: with several signaling nodes two peers
   * joining at once can both learn of the other by `peer_joined`, and a rule by arrival would
   * leave both waiting. One offerer per pair, so offers never cross. A peer known already sent
   * its offer first: it is the offerer.
   */
  _meet(info) {
    const known = this._peers.has(info.peer_id);
    const peer = this._addPeer(info);
    if (!known && this.peerId < peer.id) this._negotiate(peer);
  }

  _addPeer(info) {
    const id = info.peer_id;
    let peer = this._peers.get(id);
    if (peer) {
      // Known already (its offer came first): now with its name and role.
      if (info.name && info.name !== peer.name) {
        peer.name = info.name;
        peer.role = info.role || peer.role;
        if (info.media) peer.media = { ...peer.media, ...info.media };
        this._emit("peer-joined", { peerId: id, name: peer.name, role: peer.role, media: { ...peer.media } });
      }
      return peer;
    }
    const pc = new RTCPeerConnection(this._pcConfig());
    peer = {
      id,
      name: info.name || "",
      role: info.role || "guest",
      media: { audio: false, video: false, screen: false, ...(info.media || {}) },
      pc,
      stream: new MediaStream(),
      queue: Promise.resolve(),
      pending: [],
      quality: null,
      prev: null,
      offerer: false,
    };
    this._peers.set(id, peer);
    if (this.localStream) {
      for (const track of this.localStream.getTracks()) pc.addTrack(track, this.localStream);
    }
    pc.onicecandidate = (e) => {
      this._send({ type: "candidate", to: id, candidate: e.candidate ? e.candidate.toJSON() : null });
    };
    pc.ontrack = (e) => {
      if (!peer.stream.getTracks().includes(e.track)) peer.stream.addTrack(e.track);
      this._emit("track", { peerId: id, stream: peer.stream, track: e.track });
      e.track.onunmute = () => this._emit("track", { peerId: id, stream: peer.stream, track: e.track });
    };
    pc.onconnectionstatechange = () => {
      const state = pc.connectionState;
      this._emit("state", { peerId: id, state });
      if (state === "connected") {
        this._peerStats(peer, false);
      } else if (state === "failed" && peer.offerer && !this._ended) {
        // Try again with fresh candidates (and the latest credentials).
        this._inOrder(id, (p) => this._offer(p, true));
      }
    };
    this._emit("peer-joined", { peerId: id, name: peer.name, role: peer.role, media: { ...peer.media } });
    this._emit("state", { peerId: id, state: pc.connectionState });
    return peer;
  }

  _removePeer(id, reason) {
    const peer = this._peers.get(id);
    if (!peer) return;
    this._peers.delete(id);
    try {
      peer.pc.close();
    } catch (_) {
      // already closed
    }
    this._emit("state", { peerId: id, state: "closed" });
    this._emit("peer-left", { peerId: id, reason: reason || "left" });
  }

  /** Runs `fn(peer)` after the peer's earlier signaling messages (SDP steps are async). */
  _inOrder(id, fn) {
    if (this._ended) return;
    const peer = this._peers.get(id) || this._addPeer({ peer_id: id });
    peer.queue = peer.queue.then(() => (this._peers.get(id) === peer ? fn(peer) : null)).catch((e) => this._error(e));
  }

  _negotiate(peer) {
    peer.offerer = true;
    // Receive what we do not send (no camera, no microphone): one recvonly transceiver per kind.
    for (const kind of ["audio", "video"]) {
      const sends = !!this.localStream && this.localStream.getTracks().some((t) => t.kind === kind);
      if (!sends) peer.pc.addTransceiver(kind, { direction: "recvonly" });
    }
    this._inOrder(peer.id, (p) => this._offer(p, false));
  }

  async _offer(peer, iceRestart) {
    const offer = await peer.pc.createOffer(iceRestart ? { iceRestart: true } : undefined);
    await peer.pc.setLocalDescription(offer);
    this._send({ type: "offer", to: peer.id, sdp: peer.pc.localDescription.sdp });
    this._awaitAnswer(peer, 0);
  }

  /**
   * Sends the offer again (now with the candidates gathered so far) while no answer came: a
   * message lost on a socket that dropped and resumed must not leave a pair unconnected. The
   * answerer takes a repeated offer like any other, so this cannot cross with anything.
   */
  _awaitAnswer(peer, tries) {
    if (tries >= this._offerRetries) return;
    setTimeout(() => {
      if (this._ended || this._peers.get(peer.id) !== peer) return;
      const pc = peer.pc;
      if (pc.signalingState !== "have-local-offer" || !pc.localDescription) return;
      this._send({ type: "offer", to: peer.id, sdp: pc.localDescription.sdp });
      this._awaitAnswer(peer, tries + 1);
    }, OFFER_RETRY_MS);
  }

  async _onOffer(peer, sdp) {
    await peer.pc.setRemoteDescription({ type: "offer", sdp });
    await this._flush(peer);
    const answer = await peer.pc.createAnswer();
    await peer.pc.setLocalDescription(answer);
    this._send({ type: "answer", to: peer.id, sdp: peer.pc.localDescription.sdp });
  }

  async _onAnswer(peer, sdp) {
    if (peer.pc.signalingState !== "have-local-offer") return;
    await peer.pc.setRemoteDescription({ type: "answer", sdp });
    await this._flush(peer);
  }

  async _onCandidate(peer, candidate) {
    if (!candidate || !candidate.candidate) return; // end of candidates
    if (!peer.pc.remoteDescription) {
      peer.pending.push(candidate);
      return;
    }
    await peer.pc.addIceCandidate(candidate).catch(() => {});
  }

  async _flush(peer) {
    const pending = peer.pending.splice(0);
    for (const c of pending) await peer.pc.addIceCandidate(c).catch(() => {});
  }

  _statsTick() {
    for (const peer of this._peers.values()) this._peerStats(peer, true);
  }

  /** Reads one peer connection's stats; emits `quality`; sends `stats` when `report`. */
  async _peerStats(peer, report) {
    let q;
    try {
      q = await collectStats(peer);
    } catch (_) {
      return;
    }
    if (!q || this._ended || this._peers.get(peer.id) !== peer) return;
    peer.quality = q;
    this._emit("quality", { peerId: peer.id, ...q });
    if (report && q.candidate_type) {
      const msg = {
        type: "stats",
        rtt_ms: clamp(q.rtt_ms ?? 0, 0, 60000),
        jitter_ms: clamp(q.jitter_ms ?? 0, 0, 60000),
        packet_loss: clamp(q.packet_loss ?? 0, 0, 1),
        candidate_type: q.candidate_type,
        relay_protocol: q.candidate_type === "relay" ? q.relay_protocol || "udp" : "none",
      };
      if (q.bitrate_kbps != null) msg.bitrate_kbps = clamp(q.bitrate_kbps, 0, 100000);
      this._send(msg);
    }
  }

  _end(reason) {
    if (this._ended) return;
    this._ended = true;
    if (this._reconnect) clearTimeout(this._reconnect.timer);
    this._reconnect = null;
    clearInterval(this._pingTimer);
    clearInterval(this._statsTimer);
    for (const id of [...this._peers.keys()]) this._removePeer(id, "ended");
    if (this._ws) {
      try {
        this._ws.close(1000, "leave");
      } catch (_) {
        // closing anyway
      }
    }
    if (this.localStream && !this._opts.keepLocalStream) {
      for (const t of this.localStream.getTracks()) t.stop();
    }
    this._emit("ended", { reason });
  }
}

/** Signaling close codes (docs/signaling.md) as reasons. */
function closeCode(code) {
  return (
    {
      4000: "call_ended",
      4001: "unauthorized",
      4003: "kicked",
      4004: "replaced",
      4008: "timeout",
      4009: "call_full", // the same meaning as the API's 409
      1001: "shutdown",
      1013: "unavailable",
    }[code] || null
  );
}

/**
 * One peer connection's quality: `{rtt_ms, jitter_ms, packet_loss, bitrate_kbps,
 * candidate_type, relay_protocol}` (`null` fields when not known yet).
 */
async function collectStats(peer) {
  const stats = await peer.pc.getStats();
  let pair = null;
  stats.forEach((s) => {
    if (s.type === "transport" && s.selectedCandidatePairId && !pair) pair = stats.get(s.selectedCandidatePairId) || null;
  });
  if (!pair) {
    stats.forEach((s) => {
      if (s.type === "candidate-pair" && (s.selected || (s.nominated && s.state === "succeeded")) && !pair) pair = s;
    });
  }
  const local = pair ? stats.get(pair.localCandidateId) : null;
  let jitterSum = 0;
  let jitterN = 0;
  let lost = 0;
  let received = 0;
  let bytesSent = 0;
  stats.forEach((s) => {
    if (s.type === "inbound-rtp") {
      if (finite(s.jitter) != null) {
        jitterSum += s.jitter;
        jitterN += 1;
      }
      lost += Math.max(0, finite(s.packetsLost) || 0);
      received += finite(s.packetsReceived) || 0;
    } else if (s.type === "outbound-rtp") {
      bytesSent += finite(s.bytesSent) || 0;
    }
  });
  const now = performance.now();
  const prev = peer.prev;
  peer.prev = { lost, received, bytesSent, at: now };
  // Loss and bitrate over the last interval (the counters are cumulative).
  let packetLoss = null;
  let bitrate = null;
  if (prev) {
    const dl = lost - prev.lost;
    const dr = received - prev.received;
    packetLoss = dl + dr > 0 ? clamp(dl / (dl + dr), 0, 1) : 0;
    const dt = (now - prev.at) / 1000;
    if (dt > 0) bitrate = Math.max(0, ((bytesSent - prev.bytesSent) * 8) / 1000 / dt);
  } else if (lost + received > 0) {
    packetLoss = clamp(lost / (lost + received), 0, 1);
  }
  let candidateType = local ? local.candidateType || null : null;
  let relayProtocol = null;
  if (candidateType === "relay") {
    relayProtocol = local.relayProtocol || protocolOfUrl(local.url) || "udp";
  }
  const rtt = pair && finite(pair.currentRoundTripTime) != null ? pair.currentRoundTripTime * 1000 : null;
  return {
    rtt_ms: rtt,
    jitter_ms: jitterN ? (jitterSum / jitterN) * 1000 : null,
    packet_loss: packetLoss,
    bitrate_kbps: bitrate,
    candidate_type: candidateType,
    relay_protocol: candidateType === "relay" ? relayProtocol : candidateType ? "none" : null,
  };
}

async function postJoin(baseUrl, body) {
  let res;
  try {
    res = await fetch(baseUrl + "/v1/join", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      credentials: "omit",
      referrerPolicy: "no-referrer",
    });
  } catch (e) {
    throw new TurnpikeError("network_error", "Cannot reach Turnpike: " + (e && e.message ? e.message : e));
  }
  let json = null;
  try {
    json = await res.json();
  } catch (_) {
    // not JSON: handled below
  }
  if (!res.ok) {
    const err = json && json.error ? json.error : {};
    const e = new TurnpikeError(err.code || "http_" + res.status, err.message || "HTTP " + res.status, res.status);
    const retry = res.headers.get("Retry-After");
    if (retry) e.retryAfter = Number(retry);
    throw e;
  }
  return json;
}

export const Turnpike = {
  /**
   * Joins a call. Options: `code` or `token` (one of them), `name`, `relayOnly` (only relay
   * candidates), `baseUrl` (Turnpike's public URL; default: this page's origin),
   * `localStream` (a MediaStream to send; `null` to only receive; default: camera and
   * microphone, or receive only when there are none).
   */
  async join(opts) {
    opts = { ...(opts || {}) };
    if (!!opts.code === !!opts.token) throw new TurnpikeError("invalid_request", "Give exactly one of code and token.");
    const name = typeof opts.name === "string" ? opts.name.trim() : "";
    if (!name) throw new TurnpikeError("invalid_request", "A display name is needed.");
    const baseUrl = (opts.baseUrl || globalThis.location.origin).replace(/\/+$/, "");
    const body = opts.code ? { code: String(opts.code), name } : { token: String(opts.token), name };
    const joined = await postJoin(baseUrl, body);
    let stream = opts.localStream;
    if (stream === undefined) stream = await getLocalStream();
    const call = new Call({ ...opts, name }, joined, stream || null);
    try {
      await call._connect();
    } catch (e) {
      call._ended = true;
      if (stream && opts.localStream === undefined) for (const t of stream.getTracks()) t.stop();
      throw e;
    }
    return call;
  },
  candidateLabel,
  TurnpikeError,
};

export default Turnpike;
