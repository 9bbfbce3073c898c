// peers.js — owns the two RTCPeerConnections of one session, named as in protocol.md:
//   Publisher  — the page offers; sendonly transceivers for mic, camera (three simulcast
//                layers) and screen share (one layer).
//   Subscriber — the server offers; the page answers every offer, even one with nothing to
//                receive, and maps each receiving m-section to (participant_id, track_id)
//                through its msid.
// Both trickle ICE and buffer server candidates that arrive before the remote description.

const ANSWER_TIMEOUT_MS = 15_000;

/**
 * Whether the camera goes out as simulcast layers unless the page URL says `?simulcast=0` (or
 * `?simulcast=1`). On: each viewer then gets the layer its tile needs (README, "What adapts,
 * and how"). A renegotiation of ours (starting or stopping a screen share) used to freeze a
 * simulcast camera for everyone; the server now keeps the browser naming its layers (it never
 * acknowledges them in receiver reports), so it recognises them again afterwards.
 */
export const SIMULCAST_BY_DEFAULT = true;

/**
 * The camera's simulcast layers, smallest first: a quarter, half and full size of the
 * 1280×720 capture (320×180, 640×360, 1280×720), capped at bitrates that look clean at those
 * sizes at 30 fps. The server ranks layers by their resolution, not by these rids; a screen
 * share stays one layer (its detail matters more than scaling it for small tiles).
 */
export const CAMERA_LAYERS = [
  { rid: 'q', scaleResolutionDownBy: 4, maxBitrate: 150_000 },
  { rid: 'h', scaleResolutionDownBy: 2, maxBitrate: 500_000 },
  { rid: 'f', scaleResolutionDownBy: 1, maxBitrate: 1_500_000 },
];

/** Adds a server candidate; `null` means end of candidates. Failures are not fatal. */
async function addCandidate(pc, init) {
  try {
    if (init === null) await pc.addIceCandidate();
    else await pc.addIceCandidate(init);
  } catch (err) {
    console.debug('[peers] candidate not added:', err?.message ?? err);
  }
}

function createPeerConnection(iceServers) {
  const config = { bundlePolicy: 'max-bundle', rtcpMuxPolicy: 'require' };
  try {
    return new RTCPeerConnection({ ...config, iceServers });
  } catch (err) {
    console.warn('[peers] the server sent unusable ice_servers; continuing without them', err);
    return new RTCPeerConnection(config);
  }
}

/** What both connections share: the pc, trickle ICE out, early-candidate buffering in. */
class Peer {
  /**
   * @param {'publisher'|'subscriber'} name the `pc` field of our messages
   * @param {{iceServers: RTCIceServer[], send: (msg: object) => void,
   *          onStateChange: (state: string) => void}} options
   */
  constructor(name, { iceServers, send, onStateChange }) {
    this.name = name;
    this.send = send;
    this.closed = false;
    this.pendingCandidates = [];
    this.pc = createPeerConnection(iceServers);
    this.pc.addEventListener('icecandidate', (event) => this.sendCandidate(event.candidate));
    this.pc.addEventListener('connectionstatechange', () => {
      if (!this.closed) onStateChange(this.state);
    });
  }

  get state() {
    return this.closed ? 'closed' : this.pc.connectionState;
  }

  sendCandidate(candidate) {
    // Firefox signals end-of-generation with an empty candidate before the final null.
    if (candidate && !candidate.candidate) return;
    this.send({ type: 'candidate', pc: this.name, candidate: candidate ? candidate.toJSON() : null });
  }

  /** A candidate from the server: applied now, or kept until the remote description is set. */
  addRemoteCandidate(init) {
    if (this.closed) return;
    if (!this.pc.remoteDescription) {
      this.pendingCandidates.push(init);
      return;
    }
    addCandidate(this.pc, init);
  }

  async flushCandidates() {
    const pending = this.pendingCandidates;
    this.pendingCandidates = [];
    for (const init of pending) await addCandidate(this.pc, init);
  }

  close() {
    this.closed = true;
    this.pendingCandidates = [];
    this.pc.close();
  }
}

/** Sends our media. Offers are serialised: one in flight, later requests coalesced. */
export class Publisher extends Peer {
  /** @param {object} options as for Peer, plus `simulcast` (send the camera as CAMERA_LAYERS) */
  constructor(options) {
    super('publisher', options);
    this.simulcast = Boolean(options.simulcast);
    /** @type {Map<RTCRtpTransceiver, 'mic'|'camera'|'screen'>} */
    this.roles = new Map();
    this.negotiating = false;
    this.negotiateAgain = false;
    this.answerWaiter = null;
  }

  addMicTransceiver(track, stream) {
    return this.addSendonly('mic', track, stream, {});
  }

  /**
   * The camera's transceiver, sent as three simulcast layers (CAMERA_LAYERS) when `simulcast`
   * is on, so the server can give each viewer the size its tile needs. A browser that refuses
   * `sendEncodings` with rids gets one plain encoding; one that accepts them but is answered
   * without simulcast (or whose camera is too small for three layers) sends fewer layers by
   * itself.
   */
  addCameraTransceiver(track, stream) {
    if (!this.simulcast) return this.addSendonly('camera', track, stream, {});
    try {
      return this.addSendonly('camera', track, stream, { sendEncodings: CAMERA_LAYERS.map((layer) => ({ ...layer })) });
    } catch (err) {
      console.warn('[peers] this browser cannot send simulcast; sending the camera as one layer', err);
      return this.addSendonly('camera', track, stream, {});
    }
  }

  addScreenTransceiver(track, stream) {
    return this.addSendonly('screen', track, stream, {});
  }

  /** Adds the transceiver for a role by name (used when (re)publishing local media). */
  addRole(role, track, stream) {
    if (role === 'mic') return this.addMicTransceiver(track, stream);
    if (role === 'camera') return this.addCameraTransceiver(track, stream);
    return this.addScreenTransceiver(track, stream);
  }

  addSendonly(role, track, stream, init) {
    const transceiver = this.pc.addTransceiver(track, { direction: 'sendonly', streams: [stream], ...init });
    this.roles.set(transceiver, role);
    return transceiver;
  }

  transceiverFor(role) {
    for (const [transceiver, r] of this.roles) if (r === role) return transceiver;
    return null;
  }

  /** Which of our roles the transceiver with this mid carries (from our own `track_published`). */
  roleOfMid(mid) {
    for (const [transceiver, role] of this.roles) if (transceiver.mid === mid) return role;
    return null;
  }

  /** Switches the device behind a role without renegotiating. */
  async replaceTrack(role, track) {
    const transceiver = this.transceiverFor(role);
    if (!transceiver) return false;
    await transceiver.sender.replaceTrack(track);
    return true;
  }

  /** Stops sending a role: removeTrack, direction inactive. The caller renegotiates. */
  removeRole(role) {
    const transceiver = this.transceiverFor(role);
    if (!transceiver) return false;
    this.roles.delete(transceiver);
    if (this.closed) return false;
    try {
      this.pc.removeTrack(transceiver.sender);
      transceiver.direction = 'inactive';
    } catch (err) {
      console.warn('[peers] could not remove the', role, 'track', err);
    }
    return true;
  }

  /** Sends an offer and waits for the answer; calls made meanwhile are folded into one more. */
  async negotiate() {
    if (this.negotiating) {
      this.negotiateAgain = true;
      return;
    }
    this.negotiating = true;
    try {
      do {
        this.negotiateAgain = false;
        await this.offerOnce();
      } while (this.negotiateAgain && !this.closed);
    } finally {
      this.negotiating = false;
    }
  }

  async offerOnce() {
    if (this.closed) return;
    const offer = await this.pc.createOffer();
    await this.pc.setLocalDescription(offer);
    const answered = this.expectAnswer();
    this.send({ type: 'offer', pc: 'publisher', sdp: this.pc.localDescription.sdp });
    await answered;
  }

  expectAnswer() {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.answerWaiter = null;
        reject(new Error('the server did not answer our offer'));
      }, ANSWER_TIMEOUT_MS);
      const settle = (fn) => (value) => {
        clearTimeout(timer);
        this.answerWaiter = null;
        fn(value);
      };
      this.answerWaiter = { resolve: settle(resolve), reject: settle(reject) };
    });
  }

  /** The server's `answer` (pc publisher). */
  async handleAnswer(sdp) {
    if (this.closed) return;
    if (this.pc.signalingState !== 'have-local-offer') {
      console.warn('[peers] ignoring a publisher answer while', this.pc.signalingState);
      return;
    }
    const waiter = this.answerWaiter;
    try {
      await this.pc.setRemoteDescription({ type: 'answer', sdp });
      await this.flushCandidates();
      waiter?.resolve();
    } catch (err) {
      if (waiter) waiter.reject(err);
      else throw err;
    }
  }

  close() {
    this.answerWaiter?.reject(new Error('publisher closed'));
    super.close();
  }
}

/**
 * Receives everyone else's media. `bindings` maps each receiving mid to
 * `{ mid, participantId, trackId, kind, track, receiver }`; `onBindings` fires when it changes.
 */
export class Subscriber extends Peer {
  /**
   * @param {object} options as for Peer, plus
   *   `onBindings(bindings)` and `onError(err)`
   */
  constructor(options) {
    super('subscriber', options);
    this.onBindings = options.onBindings;
    this.onError = options.onError;
    /** @type {Map<string, object>} mid → binding, for active receiving m-sections */
    this.bindings = new Map();
    /** mid → m-section facts of the latest offer (see parseMediaSections) */
    this.sections = new Map();
    /** mid → { streamId, trackId } as seen by `ontrack`, a fallback when SDP lacks msid */
    this.trackHints = new Map();
    this.queue = Promise.resolve();
    this.pc.addEventListener('track', (event) => {
      const mid = event.transceiver?.mid;
      if (mid == null) return;
      this.trackHints.set(mid, { streamId: event.streams[0]?.id ?? null, trackId: event.track.id });
    });
  }

  /** The server's `offer` (pc subscriber). Offers are applied strictly in order. */
  handleOffer(sdp) {
    this.queue = this.queue
      .then(() => this.answerOffer(sdp))
      .catch((err) => {
        if (!this.closed) this.onError(err);
      });
    return this.queue;
  }

  async answerOffer(sdp) {
    if (this.closed) return;
    await this.pc.setRemoteDescription({ type: 'offer', sdp });
    this.sections = parseMediaSections(sdp);
    await this.flushCandidates();
    this.reconcile();
    const answer = await this.pc.createAnswer();
    await this.pc.setLocalDescription(answer);
    if (this.closed) return;
    this.send({ type: 'answer', pc: 'subscriber', sdp: this.pc.localDescription.sdp });
    this.reconcile();
  }

  /** Recomputes which (participant, track) each receiving transceiver carries. */
  reconcile() {
    if (this.closed) return;
    const next = new Map();
    for (const transceiver of this.pc.getTransceivers()) {
      const binding = this.bindingOf(transceiver);
      if (binding) next.set(binding.mid, binding);
    }
    if (sameBindings(this.bindings, next)) return;
    this.bindings = next;
    this.onBindings(next);
  }

  bindingOf(transceiver) {
    const { mid, receiver } = transceiver;
    if (mid == null || transceiver.currentDirection === 'stopped') return null;
    const section = this.sections.get(mid);
    const active = section
      ? section.active
      : transceiver.currentDirection === 'recvonly' || transceiver.currentDirection === 'sendrecv';
    if (!active) return null;
    const hint = this.trackHints.get(mid);
    const participantId = section?.streamId ?? hint?.streamId ?? null;
    if (participantId === null) return null;
    return {
      mid,
      participantId,
      trackId: section?.trackId ?? hint?.trackId ?? receiver.track.id,
      kind: receiver.track.kind,
      track: receiver.track,
      receiver,
    };
  }
}

function sameBindings(a, b) {
  if (a.size !== b.size) return false;
  for (const [mid, x] of a) {
    const y = b.get(mid);
    if (!y || x.participantId !== y.participantId || x.trackId !== y.trackId || x.track !== y.track) return false;
  }
  return true;
}

const DIRECTIONS = new Set(['sendrecv', 'sendonly', 'recvonly', 'inactive']);

function directionOf(lines) {
  for (const line of lines) {
    const value = line.startsWith('a=') ? line.slice(2).trim() : '';
    if (DIRECTIONS.has(value)) return value;
  }
  return null;
}

function splitMsid(value) {
  const [streamId, trackId] = value.trim().split(/\s+/);
  return { streamId: streamId && streamId !== '-' ? streamId : null, trackId: trackId || null };
}

/**
 * Reads, per m-section of an offer, what the page needs to map a receiver to the server's ids:
 * `mid → { mid, kind, active, streamId, trackId }`. `active` means the server sends on it
 * (sendonly/sendrecv, port not 0). The msid comes from `a=msid`, else from `a=ssrc … msid:`.
 */
export function parseMediaSections(sdp) {
  const sections = new Map();
  if (typeof sdp !== 'string') return sections;
  const [session, ...media] = sdp.split(/\r?\n(?=m=)/);
  const sessionDirection = directionOf(session.split(/\r?\n/)) ?? 'sendrecv';
  for (const block of media) {
    const lines = block.split(/\r?\n/);
    const mline = /^m=(\S+) (\d+)/.exec(lines[0]);
    if (!mline) continue;
    let mid = null;
    let msid = null;
    let ssrcMsid = null;
    for (const line of lines) {
      if (line.startsWith('a=mid:')) mid = line.slice(6).trim();
      else if (line.startsWith('a=msid:')) msid ??= splitMsid(line.slice(7));
      else {
        const ssrc = /^a=ssrc:\d+ msid:(.+)$/.exec(line);
        if (ssrc) ssrcMsid ??= splitMsid(ssrc[1]);
      }
    }
    if (mid === null) continue;
    const direction = directionOf(lines) ?? sessionDirection;
    const ids = msid ?? ssrcMsid;
    sections.set(mid, {
      mid,
      kind: mline[1],
      active: mline[2] !== '0' && (direction === 'sendonly' || direction === 'sendrecv'),
      streamId: ids?.streamId ?? null,
      trackId: ids?.trackId ?? null,
    });
  }
  return sections;
}
