// call.js — owns one call from join to leave: the signaling WebSocket (JSON frames, `join`,
// automatic reconnect with exponential backoff and a rejoin with fresh peer connections),
// the peer connections of each session (peers.js), the room model fed by server messages
// (room.js), the simulcast quality asked of the server per received track, and the user's
// actions: mute, screen share, chat, device switching, leave.
//
// The UI listens to its events:
//   'change'  something visible changed: re-render from the Call's state
//   'notice'  { key, text, level, action } a persistent message; a null text clears it
//   'toast'   { text, level } a short message
//   'chat'    { participant_id, name, text, ts, self } one chat line
//   'ended'   { error } the call is over; error is a sentence or null

import { Room, idOf } from './room.js';
import { Publisher, Subscriber } from './peers.js';
import { LocalMedia } from './media.js';

export const MAX_CHAT_CHARS = 4096;
const MAX_NAME_CHARS = 64;
const ROOM_PATTERN = /^[A-Za-z0-9_-]{1,64}$/;
const JOIN_TIMEOUT_MS = 10_000;
const MAX_CHAT_HISTORY = 500;
/** After these the server closes the socket, and trying again would fail the same way. */
const FATAL_CODES = new Set(['unauthorized', 'room_full']);
/** Answers to `join` that are worth another attempt; any other error there is final. */
const RETRYABLE_JOIN_CODES = new Set(['internal', 'rate_limited', 'too_large']);

/** Length in characters (Unicode scalar values), as the protocol counts it. */
export const charCount = (text) => [...text].length;

/** Checks join parameters as the server will. Returns a sentence, or null when valid. */
export function validateJoin({ room, name }) {
  if (!ROOM_PATTERN.test(room ?? '')) return 'A room name is 1–64 letters, digits, "_" or "-".';
  const length = charCount(name ?? '');
  if (length < 1 || length > MAX_NAME_CHARS) return 'A name is 1–64 characters.';
  return null;
}

/** Delay before reconnect attempt n (0-based): 1 s, 2 s, 4 s, … at most 15 s. */
export function backoffDelay(attempt) {
  return Math.min(1000 * 2 ** attempt, 15_000);
}

export function signalingUrl(loc = window.location) {
  return `${loc.protocol === 'https:' ? 'wss:' : 'ws:'}//${loc.host}/ws`;
}

/** A JSON object with a string `type`, or null (the frame is logged and ignored). */
function parseFrame(data) {
  if (typeof data !== 'string') return null;
  let msg;
  try {
    msg = JSON.parse(data);
  } catch {
    console.warn('[call] ignoring a frame that is not JSON');
    return null;
  }
  if (!msg || typeof msg !== 'object' || Array.isArray(msg) || typeof msg.type !== 'string') {
    console.warn('[call] ignoring a frame without a type', msg);
    return null;
  }
  return msg;
}

/**
 * Opens the signaling socket. `handlers.close` runs once, only when the socket closes on its
 * own (server, network); closing it ourselves with `close()` is silent.
 */
function openSocket(url, handlers) {
  let ws = null;
  let closed = false;
  const lost = (reason) => {
    if (closed) return;
    closed = true;
    handlers.close(reason);
  };
  try {
    ws = new WebSocket(url);
  } catch (err) {
    setTimeout(() => lost(String(err?.message ?? err)));
  }
  ws?.addEventListener('open', () => !closed && handlers.open());
  ws?.addEventListener('message', (event) => {
    const msg = closed ? null : parseFrame(event.data);
    if (msg) handlers.message(msg);
  });
  ws?.addEventListener('close', (event) => lost(event.reason || `code ${event.code}`));
  return {
    send(msg) {
      if (closed || ws?.readyState !== WebSocket.OPEN) return false;
      ws.send(JSON.stringify(msg));
      return true;
    },
    close() {
      if (closed) return;
      closed = true;
      try {
        ws?.close(1000);
      } catch {
        // already closing
      }
    },
  };
}

/** Keeps only the W3C RTCIceServer fields of what the server sent. */
function iceServersFrom(list) {
  if (!Array.isArray(list)) return [];
  return list
    .filter((server) => server && (typeof server.urls === 'string' || Array.isArray(server.urls)))
    .map(({ urls, username, credential }) => ({
      urls,
      ...(typeof username === 'string' && { username }),
      ...(typeof credential === 'string' && { credential }),
    }));
}

/** A Unix-milliseconds value that a Date can represent. */
function isTimestamp(value) {
  return Number.isFinite(value) && Math.abs(value) <= 8.64e15;
}

function isCandidateInit(value) {
  return value === null || (typeof value === 'object' && typeof value.candidate === 'string');
}

/** Server message type → handler method. */
const HANDLERS = new Map([
  ['joined', 'onJoined'],
  ['participant_joined', 'onParticipantJoined'],
  ['participant_left', 'onParticipantLeft'],
  ['track_published', 'onTrackPublished'],
  ['track_unpublished', 'onTrackUnpublished'],
  ['track_muted', 'onTrackMuted'],
  ['offer', 'onOffer'],
  ['answer', 'onAnswer'],
  ['candidate', 'onCandidate'],
  ['chat', 'onChat'],
  ['active_speakers', 'onActiveSpeakers'],
  ['error', 'onError'],
]);

export class Call extends EventTarget {
  constructor({ room, name, token = null, simulcast = false }) {
    super();
    this.roomName = room;
    this.name = name;
    this.token = token || null;
    /** Whether the camera is published as simulcast layers (peers.js CAMERA_LAYERS). */
    this.simulcast = simulcast;
    /** 'connecting' | 'joined' | 'reconnecting' | 'ended' */
    this.phase = 'connecting';
    this.media = new LocalMedia();
    this.room = new Room();
    /** @type {{participant_id: string, name: string, text: string, ts: number}[]} */
    this.chat = [];
    /** The current socket and its peer connections; replaced on every reconnect. */
    this.session = null;
    /** True once the first attempt to open camera and microphone has finished. */
    this.mediaReady = false;
    /** Consecutive connection attempts that did not reach `joined`, for the backoff. */
    this.attempt = 0;
    this.retryTimer = null;
    this.onOnline = () => this.reconnectNow();
    window.addEventListener('online', this.onOnline);
  }

  // ---- state for the UI and the test hook ----

  get joined() {
    return Boolean(this.session?.joined);
  }

  get participantId() {
    return this.session?.participantId ?? null;
  }

  /** Connection state of our two peer connections ('none' when there is none). */
  get pcStates() {
    const s = this.session;
    return {
      publisher: s?.publisher ? s.publisher.state : 'none',
      subscriber: s?.subscriber ? s.subscriber.state : 'none',
    };
  }

  /** @returns {Map<string, object>} mid → binding of received tracks (see peers.js) */
  get bindings() {
    return this.session?.subscriber?.bindings ?? new Map();
  }

  /** Our published tracks as the server named them, with the role each carries. */
  get ownTracks() {
    const s = this.session;
    if (!s) return [];
    return [...s.ownTracks.values()].map((own) => ({
      track_id: own.id,
      mid: own.mid,
      kind: own.kind,
      role: this.roleOfOwn(s, own),
      muted: own.muted,
    }));
  }

  /** The binding carrying a participant's video track (exact id first, else an unknown one). */
  videoFor(participantId, trackId, allowLoose) {
    let loose = null;
    for (const binding of this.bindings.values()) {
      if (binding.kind !== 'video' || binding.participantId !== participantId) continue;
      if (binding.trackId === trackId) return binding;
      if (allowLoose && !this.room.hasTrack(participantId, binding.trackId)) loose ??= binding;
    }
    return loose;
  }

  /**
   * Asks the server for the layer each received simulcast video track should arrive in.
   * `wanted` is a list of `{ participantId, trackId, quality }` (see quality.js). A
   * `set_quality` goes out only for a simulcast track this page receives (its transceiver is
   * bound to that track id) and only when the quality differs from what the server has: until
   * told otherwise it sends `high`, and it forgets what we asked when it stops sending a track.
   */
  setQualities(wanted) {
    const session = this.session;
    if (!session?.joined) return;
    const received = new Set([...this.bindings.values()].map((binding) => binding.trackId));
    for (const trackId of session.qualities.keys()) {
      if (!received.has(trackId)) session.qualities.delete(trackId);
    }
    for (const { participantId, trackId, quality } of wanted) {
      const track = this.room.participants.get(participantId)?.tracks.get(trackId);
      if (!track?.simulcast || !received.has(trackId)) continue;
      if ((session.qualities.get(trackId) ?? 'high') === quality) continue;
      if (session.socket.send({ type: 'set_quality', track_id: track.wireId, quality })) {
        session.qualities.set(trackId, quality);
      }
    }
  }

  /** The quality the server has for a received track (`high` unless we asked otherwise). */
  qualityOf(trackId) {
    return this.session?.qualities.get(trackId) ?? 'high';
  }

  // ---- lifecycle ----

  /** Joins at once and opens camera and microphone meanwhile (the prompt may take a while). */
  async start() {
    this.connect();
    const problem = await this.media.acquire();
    if (this.phase === 'ended') {
      this.media.stopAll(); // left while the permission prompt was open
      return;
    }
    this.mediaReady = true;
    this.notice('media', problem, 'warn');
    this.publish(this.session);
    this.changed();
  }

  connect() {
    const session = {
      socket: null,
      joined: false,
      participantId: null,
      iceServers: [],
      publisher: null,
      subscriber: null,
      /** track_id → { id, wireId, mid, kind, muted } for our own published tracks */
      ownTracks: new Map(),
      /**
       * track_id → the quality the server has for a received simulcast track, for those we
       * asked to differ from its default (`high`); forgotten when the track stops arriving.
       */
      qualities: new Map(),
      /** set by a fatal `error`; ends the call when the socket closes */
      fatal: null,
      joinTimer: null,
    };
    this.session = session;
    session.socket = openSocket(signalingUrl(), {
      open: () => this.sendJoin(session),
      message: (msg) => this.onMessage(session, msg),
      close: () => this.lose(session, 'The connection to the server was lost'),
    });
    session.joinTimer = setTimeout(() => {
      if (!session.joined) this.lose(session, 'The server did not answer');
    }, JOIN_TIMEOUT_MS);
    this.changed();
  }

  sendJoin(session) {
    const join = { type: 'join', room: this.roomName, name: this.name };
    if (this.token) join.token = this.token;
    session.socket.send(join);
  }

  /** Drops a session that broke, then either ends the call or schedules a rejoin. */
  lose(session, reason) {
    if (session !== this.session || this.phase === 'ended') return;
    const fatal = session.fatal;
    this.teardown(session);
    if (fatal) this.end(fatal);
    else this.scheduleReconnect(reason);
  }

  teardown(session) {
    clearTimeout(session.joinTimer);
    session.socket.close();
    session.publisher?.close();
    session.subscriber?.close();
    if (this.session === session) this.session = null;
    this.room.reset();
  }

  scheduleReconnect(reason) {
    const delay = backoffDelay(this.attempt);
    this.attempt += 1;
    this.phase = 'reconnecting';
    this.notice('connection', `${reason}. Reconnecting in ${Math.round(delay / 1000)} s…`, 'warn', {
      id: 'reconnect-now',
      label: 'Retry now',
      onClick: () => this.reconnectNow(),
    });
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => this.reconnectNow(), delay);
    this.changed();
  }

  reconnectNow() {
    if (this.phase !== 'reconnecting') return;
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.notice('connection', 'Reconnecting…', 'warn');
    this.connect();
  }

  /** Leaves on the user's request: tells the server, then closes everything. */
  leave() {
    const session = this.session;
    if (session?.joined) session.socket.send({ type: 'leave' });
    this.end(null);
  }

  end(error) {
    if (this.phase === 'ended') return;
    this.phase = 'ended';
    clearTimeout(this.retryTimer);
    window.removeEventListener('online', this.onOnline);
    if (this.session) this.teardown(this.session);
    this.media.stopAll();
    this.emit('ended', { error });
  }

  // ---- server messages ----

  onMessage(session, msg) {
    if (session !== this.session) return;
    const method = HANDLERS.get(msg.type);
    if (!method) {
      console.debug('[call] ignoring unknown message type', msg.type);
      return;
    }
    if (!session.joined && msg.type !== 'joined' && msg.type !== 'error') {
      console.debug('[call] ignoring', msg.type, 'before joined');
      return;
    }
    try {
      const result = this[method](session, msg);
      result?.catch?.((err) => console.warn(`[call] handling ${msg.type} failed`, err));
    } catch (err) {
      console.warn(`[call] handling ${msg.type} failed`, err);
    }
  }

  onJoined(session, msg) {
    const participantId = idOf(msg.participant_id);
    if (session.joined || participantId === null) return;
    clearTimeout(session.joinTimer);
    session.joined = true;
    session.participantId = participantId;
    session.iceServers = iceServersFrom(msg.ice_servers);
    this.attempt = 0;
    this.phase = 'joined';
    this.notice('connection', null);
    this.room.reset();
    for (const wire of Array.isArray(msg.participants) ? msg.participants : []) {
      if (idOf(wire?.participant_id) !== participantId) this.room.upsertParticipant(wire);
    }
    session.subscriber = new Subscriber({
      ...this.peerOptions(session, 'subscriber'),
      onBindings: () => this.changed(),
      onError: (err) => this.toast(`Could not receive the others' media: ${err.message}`, 'error'),
    });
    if (this.mediaReady) this.publish(session);
    this.changed();
  }

  peerOptions(session, name) {
    return {
      iceServers: session.iceServers,
      send: (msg) => session.socket.send(msg),
      onStateChange: (state) => this.onPeerState(session, name, state),
    };
  }

  onPeerState(session, name, state) {
    if (session !== this.session) return;
    if (state === 'failed') {
      this.lose(session, `The ${name === 'publisher' ? 'sending' : 'receiving'} media connection failed`);
      return;
    }
    this.changed();
  }

  onParticipantJoined(session, msg) {
    const id = idOf(msg.participant?.participant_id);
    if (id === null || id === session.participantId) return;
    const participant = this.room.upsertParticipant(msg.participant);
    if (participant) this.toast(`${participant.name || 'Someone'} joined`);
    this.changed();
  }

  onParticipantLeft(session, msg) {
    const id = idOf(msg.participant_id);
    const participant = this.room.participants.get(id);
    if (!participant) return;
    this.room.removeParticipant(id);
    this.toast(`${participant.name || 'Someone'} left`);
    this.changed();
  }

  onTrackPublished(session, msg) {
    const participantId = idOf(msg.participant_id);
    const trackId = idOf(msg.track?.track_id);
    if (participantId === null || trackId === null) return;
    if (participantId === session.participantId) {
      session.ownTracks.set(trackId, {
        id: trackId,
        wireId: msg.track.track_id,
        mid: idOf(msg.track.mid),
        kind: msg.track.kind,
        source: msg.track.source,
        muted: msg.track.muted === true,
      });
      this.syncOwnMute(session);
    } else {
      this.room.publishTrack(participantId, msg.track);
    }
    this.changed();
  }

  onTrackUnpublished(session, msg) {
    const participantId = idOf(msg.participant_id);
    const trackId = idOf(msg.track_id);
    if (participantId === session.participantId) session.ownTracks.delete(trackId);
    else this.room.unpublishTrack(participantId, trackId);
    this.changed();
  }

  onTrackMuted(session, msg) {
    const participantId = idOf(msg.participant_id);
    const trackId = idOf(msg.track_id);
    if (typeof msg.muted !== 'boolean') return;
    if (participantId === session.participantId) {
      const own = session.ownTracks.get(trackId);
      if (own) own.muted = msg.muted;
    } else {
      this.room.setMuted(participantId, trackId, msg.muted);
    }
    this.changed();
  }

  onOffer(session, msg) {
    if (msg.pc !== 'subscriber' || typeof msg.sdp !== 'string') {
      console.warn('[call] ignoring an offer for pc', msg.pc);
      return;
    }
    session.subscriber?.handleOffer(msg.sdp).then(() => this.changed());
  }

  onAnswer(session, msg) {
    if (msg.pc !== 'publisher' || typeof msg.sdp !== 'string') {
      console.warn('[call] ignoring an answer for pc', msg.pc);
      return;
    }
    return session.publisher?.handleAnswer(msg.sdp);
  }

  onCandidate(session, msg) {
    const peer = msg.pc === 'publisher' ? session.publisher : msg.pc === 'subscriber' ? session.subscriber : null;
    if (!peer || !isCandidateInit(msg.candidate)) return;
    peer.addRemoteCandidate(msg.candidate);
  }

  onChat(session, msg) {
    if (typeof msg.text !== 'string') return;
    const participantId = idOf(msg.participant_id) ?? '';
    const message = {
      participant_id: participantId,
      name: typeof msg.name === 'string' ? msg.name : this.room.participants.get(participantId)?.name ?? '',
      text: msg.text,
      ts: isTimestamp(msg.ts) ? msg.ts : Date.now(),
    };
    this.chat.push(message);
    if (this.chat.length > MAX_CHAT_HISTORY) this.chat.shift();
    this.emit('chat', { ...message, self: participantId === session.participantId });
  }

  onActiveSpeakers(session, msg) {
    this.room.setActiveSpeakers(msg.participant_ids);
    this.changed();
  }

  onError(session, msg) {
    const code = typeof msg.code === 'string' ? msg.code : 'unknown';
    const text = typeof msg.message === 'string' && msg.message ? msg.message : `The server reported an error (${code}).`;
    console.warn('[call] server error', code, text);
    const final = FATAL_CODES.has(code) || (!session.joined && !RETRYABLE_JOIN_CODES.has(code));
    if (final) {
      session.fatal = text;
      this.lose(session, text); // the server closes the socket anyway; do not wait for it
      return;
    }
    this.toast(text, 'error');
    if (!session.joined) this.lose(session, text);
  }

  // ---- publishing ----

  /**
   * Publishes local tracks that are not published yet: creates the publisher the first time
   * there is something to send, adds the missing transceivers, renegotiates.
   */
  publish(session) {
    if (!session?.joined) return;
    const missing = this.media.roles().filter((role) => !session.publisher?.transceiverFor(role));
    if (missing.length === 0) return;
    session.publisher ??= new Publisher({ ...this.peerOptions(session, 'publisher'), simulcast: this.simulcast });
    for (const role of missing) {
      const stream = role === 'screen' ? this.media.screenStream : this.media.stream;
      session.publisher.addRole(role, this.media[role], stream);
    }
    this.negotiate(session);
  }

  negotiate(session) {
    const publisher = session.publisher;
    publisher?.negotiate().catch((err) => {
      if (session === this.session && !publisher.closed) {
        this.toast(`Could not publish your media: ${err.message}`, 'error');
      }
    });
  }

  /** Which local role a published track carries: by its mid, else by kind. */
  roleOfOwn(session, own) {
    const byMid = own.mid !== null ? session.publisher?.roleOfMid(own.mid) : null;
    if (byMid) return byMid;
    if (own.kind === 'audio') return 'mic';
    return own.source === 'screen' ? 'screen' : 'camera';
  }

  /** Tells the server about every own track whose mute flag differs from the user's wish. */
  syncOwnMute(session) {
    if (!session?.joined) return;
    for (const own of session.ownTracks.values()) {
      const role = this.roleOfOwn(session, own);
      const wanted = role === 'mic' ? this.media.micMuted : role === 'camera' ? this.media.camMuted : false;
      if (own.muted === wanted) continue;
      if (session.socket.send({ type: 'mute', track_id: own.wireId, muted: wanted })) own.muted = wanted;
    }
  }

  // ---- user actions ----

  async toggleMic() {
    if (!this.media.mic) return this.enableDevice('mic');
    this.media.setMicMuted(!this.media.micMuted);
    this.syncOwnMute(this.session);
    this.changed();
  }

  async toggleCamera() {
    if (!this.media.camera) return this.enableDevice('camera');
    this.media.setCamMuted(!this.media.camMuted);
    this.syncOwnMute(this.session);
    this.changed();
  }

  /** Opens a device that was denied or missing at join time, then publishes it. */
  async enableDevice(role) {
    try {
      await this.media.enable(role);
    } catch (err) {
      this.toast(`${err.message}.`, 'error');
      return;
    }
    if (this.phase === 'ended') {
      this.media.stopAll();
      return;
    }
    if (this.media.mic && this.media.camera) this.notice('media', null);
    this.publish(this.session);
    this.changed();
  }

  async startShare() {
    if (this.media.screen || !this.media.screenSupported) return;
    try {
      await this.media.startScreen(() => this.stopShare());
    } catch (err) {
      // NotAllowedError: the user closed the picker. Nothing to report.
      if (err?.name !== 'NotAllowedError') this.toast(`Could not share your screen: ${err?.message ?? err}`, 'error');
      return;
    }
    if (this.phase === 'ended') {
      this.media.stopScreen();
      return;
    }
    this.publish(this.session);
    this.changed();
  }

  stopShare() {
    if (!this.media.screen) return;
    this.media.stopScreen();
    const session = this.session;
    if (session?.publisher?.removeRole('screen')) this.negotiate(session);
    this.changed();
  }

  async switchDevice(role, deviceId) {
    if (!deviceId || deviceId === this.media.deviceIdOf(role)) return;
    let result;
    try {
      result = await this.media.switchDevice(role, deviceId);
    } catch (err) {
      this.toast(`${err.message}.`, 'error');
      return;
    }
    const publisher = this.session?.publisher;
    try {
      const replaced = await publisher?.replaceTrack(role, result.track);
      if (!replaced) this.publish(this.session); // the role was not published yet
    } catch (err) {
      console.warn('[call] replaceTrack failed', err);
      this.toast(`Could not switch the ${role === 'mic' ? 'microphone' : 'camera'}.`, 'error');
    }
    result.old?.stop();
    this.changed();
  }

  /** Sends a chat line. Returns a sentence when it was not sent, else null. */
  sendChat(text) {
    const length = charCount(text);
    if (length < 1 || text.trim() === '') return 'Type a message first.';
    if (length > MAX_CHAT_CHARS) return `Messages are at most ${MAX_CHAT_CHARS} characters (this one has ${length}).`;
    const session = this.session;
    if (!session?.joined || !session.socket.send({ type: 'chat', text })) {
      return 'Not connected right now: your message was not sent.';
    }
    return null;
  }

  // ---- events ----

  emit(type, detail = null) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  changed() {
    this.emit('change');
  }

  notice(key, text, level = 'info', action = null) {
    this.emit('notice', { key, text, level, action });
  }

  toast(text, level = 'info') {
    this.emit('toast', { text, level });
  }
}
