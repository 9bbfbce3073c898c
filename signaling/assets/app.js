// app.js — entry point of the call page. Reads the URL (`?room=R&name=N` joins at once,
// `?token=…` is passed on, `?simulcast=0` sends the camera as one layer instead of the
// default simulcast layers), shows the join form or the call view, wires the controls to the
// Call (call.js), renders the Call's state through view.js, turns tile sizes and focus into
// the simulcast quality asked for each received video (quality.js), and exposes the
// end-to-end test hook `window.sfuTest`.

import { Call, validateJoin } from './call.js';
import { AudioSinks, ChatView, Notices, TileGrid, toast } from './view.js';
import { QUALITIES, wantedQualities } from './quality.js';
import { SIMULCAST_BY_DEFAULT } from './peers.js';

const $ = (id) => document.getElementById(id);
const NAME_KEY = 'sfu-call.name';
const MAX_RECORDED_ERRORS = 20;

const ui = {
  grid: new TileGrid($('grid'), $('tile-template'), () => updateQualities()),
  audio: new AudioSinks($('audio-sinks'), () => showAudioBlocked()),
  chat: new ChatView($('chat-messages')),
  notices: new Notices($('notices')),
};

/** @type {Call|null} the call in progress, null while the join form shows */
let call = null;
/** `?token=` from the page URL, sent with every join */
let token = null;
/** `?simulcast=` from the page URL: true or false overrides SIMULCAST_BY_DEFAULT, null keeps it. */
let simulcastParam = null;
/** The tile specs last rendered (the test hook reads them for stats). */
let lastSpecs = [];
let renderQueued = false;
let unreadChat = 0;
let audioBlocked = false;
/** Error sentences shown to the user, newest last (for the test hook). */
const shownErrors = [];
/** participant id → quality forced for their camera by the test hook (`sfuTest.setQuality`). */
const qualityOverrides = new Map();
/** tile key → the quality that tile wants now (for the test hook's stats). */
let wantedByKey = new Map();

function boot() {
  const params = new URLSearchParams(window.location.search);
  token = params.get('token');
  simulcastParam = { 1: true, on: true, 0: false, off: false }[params.get('simulcast') ?? ''] ?? null;
  const room = params.get('room') ?? '';
  const name = (params.get('name') ?? storedName()).trim();
  $('room').value = room;
  $('name').value = name;
  wireJoinForm();
  wireControls();
  installTestHook();
  if (params.has('room') && params.has('name')) {
    const problem = validateJoin({ room, name });
    if (!problem) {
      startCall({ room, name });
      return;
    }
    showJoin(problem);
    return;
  }
  showJoin(null);
}

// ---- join form and call lifecycle ----

function wireJoinForm() {
  $('join-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const room = $('room').value.trim();
    const name = $('name').value.trim();
    const problem = validateJoin({ room, name });
    if (problem) {
      showJoin(problem);
      return;
    }
    window.history.replaceState(null, '', shareUrl(room, true));
    startCall({ room, name });
  });
}

function showJoin(error) {
  $('call-view').hidden = true;
  $('join-view').hidden = false;
  document.title = 'Join a call';
  const errorLine = $('join-error');
  errorLine.textContent = error ?? '';
  errorLine.hidden = !error;
  if (error) recordError(error);
  ($('room').value ? $('name') : $('room')).focus();
}

function startCall({ room, name }) {
  rememberName(name);
  $('join-view').hidden = true;
  $('call-view').hidden = false;
  document.title = `${room} · Call`;
  setChatOpen(window.innerWidth >= 900);
  call = new Call({ room, name, token, simulcast: simulcastParam ?? SIMULCAST_BY_DEFAULT });
  call.addEventListener('change', scheduleRender);
  call.addEventListener('notice', ({ detail }) => {
    ui.notices.set(detail.key, detail.text, detail.level, detail.action);
    if (detail.text && detail.level === 'error') recordError(detail.text);
  });
  call.addEventListener('toast', ({ detail }) => {
    toast(detail.text, detail.level);
    if (detail.level === 'error') recordError(detail.text);
  });
  call.addEventListener('chat', ({ detail }) => onChatMessage(detail));
  call.addEventListener('ended', ({ detail }) => onEnded(detail.error));
  scheduleRender();
  call.start();
}

function onEnded(error) {
  call = null;
  lastSpecs = [];
  wantedByKey = new Map();
  ui.grid.clear();
  ui.audio.clear();
  ui.chat.clear();
  ui.notices.clear();
  audioBlocked = false;
  setDevicePanelOpen(false);
  setUnread(0);
  showJoin(error);
}

// ---- rendering ----

function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  queueMicrotask(render);
}

function render() {
  renderQueued = false;
  if (!call) return;
  try {
    lastSpecs = tileSpecs(call);
    ui.grid.sync(lastSpecs);
    updateQualities();
    ui.audio.sync(audioSinks(call));
    renderStatus(call);
    renderControls(call);
  } catch (err) {
    console.error('[app] render failed', err); // keep the page alive; the next change re-renders
  }
}

/** What the grid should show: own camera, own screen, then each participant's tiles. */
function tileSpecs(current) {
  const { media, room } = current;
  const self = current.participantId ?? '';
  const speaker = room.activeSpeaker;
  const specs = [
    {
      key: 'local:camera',
      participantId: self,
      kind: 'camera',
      local: true,
      name: current.name,
      label: `${current.name} (you)`,
      videoTrack: media.camera,
      hasVideo: Boolean(media.camera) || !current.mediaReady, // 'starting camera…' meanwhile
      audioMuted: !media.mic || media.micMuted,
      videoMuted: Boolean(media.camera) && media.camMuted,
      speaking: speaker !== null && speaker === self,
      trackId: null,
      binding: null,
    },
  ];
  if (media.screen) {
    specs.push({
      ...specs[0],
      key: 'local:screen',
      kind: 'screen',
      label: `${current.name} (screen)`,
      videoTrack: media.screen,
      hasVideo: true,
      audioMuted: false,
      videoMuted: false,
      speaking: false,
    });
  }
  for (const participant of room.participants.values()) specs.push(...remoteSpecs(current, participant, speaker));
  return specs;
}

function remoteSpecs(current, participant, speaker) {
  const { room } = current;
  const name = participant.name || 'Guest';
  const [audio] = room.tracksWithRole(participant, 'audio');
  const [camera] = room.tracksWithRole(participant, 'camera');
  const cameraBinding = camera ? current.videoFor(participant.id, camera.id, true) : null;
  const base = { participantId: participant.id, local: false, name };
  const specs = [
    {
      ...base,
      key: JSON.stringify(['camera', participant.id]),
      kind: 'camera',
      label: name,
      videoTrack: cameraBinding?.track ?? null,
      hasVideo: Boolean(camera),
      audioMuted: audio?.muted ?? false,
      videoMuted: camera?.muted ?? false,
      speaking: speaker === participant.id,
      trackId: camera?.id ?? null,
      binding: cameraBinding,
    },
  ];
  for (const screen of room.tracksWithRole(participant, 'screen')) {
    const binding = current.videoFor(participant.id, screen.id, false);
    specs.push({
      ...base,
      key: JSON.stringify(['screen', participant.id, screen.id]),
      kind: 'screen',
      label: `${name} (screen)`,
      videoTrack: binding?.track ?? null,
      hasVideo: true,
      audioMuted: false,
      videoMuted: screen.muted,
      speaking: false,
      trackId: screen.id,
      binding,
    });
  }
  return specs;
}

/**
 * Recomputes the quality each remote video tile wants (from its width in device pixels and
 * the focus) and lets the Call tell the server about the ones that changed.
 */
function updateQualities() {
  if (!call) return;
  const scale = window.devicePixelRatio || 1;
  const tiles = lastSpecs
    .filter((spec) => !spec.local && spec.trackId !== null)
    .map((spec) => ({
      key: spec.key,
      participantId: spec.participantId,
      kind: spec.kind,
      trackId: spec.trackId,
      width: ui.grid.widthOf(spec.key) * scale,
    }));
  const wanted = wantedQualities(tiles, ui.grid.focusKey, qualityOverrides);
  wantedByKey = new Map(wanted.map((entry) => [entry.key, entry.quality]));
  call.setQualities(wanted);
}

/** One audio player per received audio track of a participant still in the room. */
function audioSinks(current) {
  return [...current.bindings.values()]
    .filter((binding) => binding.kind === 'audio' && current.room.participants.has(binding.participantId))
    .map((binding) => ({ key: binding.mid, track: binding.track }));
}

const PHASE_LABELS = {
  connecting: 'Connecting…',
  joined: 'Connected',
  reconnecting: 'Reconnecting…',
  ended: 'Left',
};

function renderStatus(current) {
  $('room-label').textContent = current.roomName;
  const count = current.room.participants.size + 1;
  $('participant-count').textContent = current.joined ? `${count} ${count === 1 ? 'person' : 'people'}` : '';
  const phase = $('phase-label');
  phase.dataset.phase = current.phase;
  phase.textContent = PHASE_LABELS[current.phase] ?? current.phase;
  const states = current.pcStates;
  setPcState($('pub-state'), states.publisher);
  setPcState($('sub-state'), states.subscriber);
}

function setPcState(node, state) {
  node.dataset.state = state;
  node.querySelector('b').textContent = state === 'none' ? '–' : state;
}

function renderControls(current) {
  const { media } = current;
  setToggle($('mute-mic'), {
    pressed: !media.mic || media.micMuted,
    label: !media.mic ? 'Turn on microphone' : media.micMuted ? 'Unmute microphone' : 'Mute microphone',
    disabled: !media.supported,
  });
  setToggle($('mute-cam'), {
    pressed: !media.camera || media.camMuted,
    label: !media.camera ? 'Turn on camera' : media.camMuted ? 'Turn camera on' : 'Turn camera off',
    disabled: !media.supported,
  });
  const share = $('share-screen');
  share.hidden = !media.screenSupported;
  setToggle(share, {
    pressed: Boolean(media.screen),
    label: media.screen ? 'Stop sharing your screen' : 'Share your screen',
    disabled: false,
  });
  $('toggle-devices').disabled = !media.supported;
}

function setToggle(button, { pressed, label, disabled }) {
  button.setAttribute('aria-pressed', String(pressed));
  button.setAttribute('aria-label', label);
  button.title = label;
  button.disabled = disabled;
}

// ---- controls ----

function wireControls() {
  $('mute-mic').addEventListener('click', () => call?.toggleMic());
  $('mute-cam').addEventListener('click', () => call?.toggleCamera());
  $('share-screen').addEventListener('click', () => {
    if (!call) return;
    if (call.media.screen) call.stopShare();
    else call.startShare();
  });
  $('leave').addEventListener('click', () => call?.leave());
  $('copy-link').addEventListener('click', copyLink);
  $('toggle-chat').addEventListener('click', () => setChatOpen($('chat-panel').hidden, true));
  $('close-chat').addEventListener('click', () => setChatOpen(false));
  $('chat-form').addEventListener('submit', (event) => {
    event.preventDefault();
    sendChat();
  });
  $('toggle-devices').addEventListener('click', () => setDevicePanelOpen($('device-panel').hidden));
  $('camera-select').addEventListener('change', (event) => switchDevice('camera', event.target.value));
  $('mic-select').addEventListener('change', (event) => switchDevice('mic', event.target.value));
  navigator.mediaDevices?.addEventListener?.('devicechange', () => {
    if (!$('device-panel').hidden) refreshDevices();
  });
  document.addEventListener('keydown', (event) => {
    if (event.key === 'Escape') setDevicePanelOpen(false);
  });
  document.addEventListener('pointerdown', () => {
    if (audioBlocked) unlockAudio();
  });
  window.addEventListener('pagehide', () => call?.leave());
}

function sendChat() {
  if (!call) return;
  const input = $('chat-input');
  const problem = call.sendChat(input.value.trim());
  if (problem) {
    toast(problem, 'warn');
    return;
  }
  input.value = '';
}

function onChatMessage(message) {
  ui.chat.append(message, message.self);
  if ($('chat-panel').hidden && !message.self) setUnread(unreadChat + 1);
}

function setChatOpen(open, focus = false) {
  $('chat-panel').hidden = !open;
  $('toggle-chat').setAttribute('aria-expanded', String(open));
  if (open) {
    setUnread(0);
    if (focus) $('chat-input').focus();
  }
  ui.grid.layout();
}

function setUnread(count) {
  unreadChat = count;
  const badge = $('chat-unread');
  badge.textContent = count > 99 ? '99+' : String(count);
  badge.hidden = count === 0;
}

function setDevicePanelOpen(open) {
  $('device-panel').hidden = !open;
  $('toggle-devices').setAttribute('aria-expanded', String(open));
  if (open) refreshDevices();
}

async function refreshDevices() {
  if (!call) return;
  try {
    const { cameras, mics } = await call.media.listDevices();
    fillSelect($('camera-select'), cameras, call?.media.deviceIdOf('camera'), 'No camera');
    fillSelect($('mic-select'), mics, call?.media.deviceIdOf('mic'), 'No microphone');
  } catch (err) {
    console.warn('[app] could not list devices', err);
  }
}

function fillSelect(select, devices, currentId, emptyLabel) {
  const options = devices.map((device) => new Option(device.label, device.deviceId, false, device.deviceId === currentId));
  if (options.length === 0) options.push(new Option(emptyLabel, '', true, true));
  select.replaceChildren(...options);
  select.disabled = devices.length === 0;
}

async function switchDevice(role, deviceId) {
  await call?.switchDevice(role, deviceId);
  refreshDevices();
}

function shareUrl(room, keepToken = false) {
  const url = new URL(window.location.pathname, window.location.origin);
  url.searchParams.set('room', room);
  if (keepToken && token) url.searchParams.set('token', token);
  return url.href;
}

/** Copies a link that opens the join form for this room (the recipient types a name). */
async function copyLink() {
  if (!call) return;
  const link = shareUrl(call.roomName);
  let copied = false;
  try {
    await navigator.clipboard.writeText(link);
    copied = true;
  } catch {
    copied = copyWithSelection(link);
  }
  toast(copied ? `Link copied: ${link}` : `Copy this link: ${link}`, copied ? 'info' : 'warn', 8000);
}

function copyWithSelection(text) {
  const area = document.createElement('textarea');
  area.value = text;
  area.setAttribute('readonly', '');
  area.style.position = 'fixed';
  area.style.opacity = '0';
  document.body.append(area);
  area.select();
  let ok = false;
  try {
    ok = document.execCommand('copy');
  } catch {
    ok = false;
  }
  area.remove();
  return ok;
}

function showAudioBlocked() {
  if (audioBlocked) return;
  audioBlocked = true;
  ui.notices.set('audio', 'Your browser paused the sound of this call until you interact with the page.', 'warn', {
    id: 'enable-audio',
    label: 'Enable sound',
    onClick: unlockAudio,
  });
}

function unlockAudio() {
  audioBlocked = false;
  ui.notices.set('audio', null);
  ui.audio.unlock();
}

// ---- small helpers ----

function storedName() {
  try {
    return window.localStorage.getItem(NAME_KEY) ?? '';
  } catch {
    return '';
  }
}

function rememberName(name) {
  try {
    window.localStorage.setItem(NAME_KEY, name);
  } catch {
    // storage may be disabled; the name is only a convenience
  }
}

function recordError(text) {
  shownErrors.push(text);
  if (shownErrors.length > MAX_RECORDED_ERRORS) shownErrors.shift();
}

// ---- end-to-end test hook ----

function installTestHook() {
  const hook = {
    /** A snapshot of the page's state; see the shape below. */
    state: () => snapshot(),
    /**
     * Per remote tile: decoded video frames and size (subscriber pc's getStats), the quality
     * the tile wants and the one the server was asked for.
     */
    stats: () => remoteVideoStats(),
    /** What this page sends: per camera/screen encoding (rid) and the microphone's level. */
    sendStats: () => sendStats(),
    /**
     * The one hook that changes the page, for tests only: forces the quality this page asks
     * for `participantId`'s camera ('low', 'medium' or 'high') whatever its tile's size or
     * focus, so a test can compare layers without depending on the window's size; null hands
     * it back to the tile. Returns the qualities now wanted, by tile key.
     */
    setQuality: (participantId, quality) => {
      if (quality === null) qualityOverrides.delete(String(participantId));
      else if (QUALITIES.includes(quality)) qualityOverrides.set(String(participantId), quality);
      else throw new Error(`quality must be one of ${QUALITIES.join(', ')} or null`);
      updateQualities();
      return Object.fromEntries(wantedByKey);
    },
  };
  Object.defineProperty(window, 'sfuTest', { value: Object.freeze(hook), writable: false, configurable: false });
}

function domTiles() {
  return [...document.querySelectorAll('#grid .tile')].map((tile) => ({
    participant_id: tile.dataset.participantId,
    kind: tile.dataset.kind,
    local: tile.dataset.local === 'true',
    audio_muted: tile.dataset.audioMuted === 'true',
    video_muted: tile.dataset.videoMuted === 'true',
    speaking: tile.dataset.speaking === 'true',
    focused: tile.dataset.focused === 'true',
    status: tile.dataset.status,
    label: tile.querySelector('.tile-name')?.textContent ?? '',
  }));
}

function snapshot() {
  const current = call;
  const tiles = domTiles();
  const remoteTiles = tiles.filter((tile) => !tile.local);
  const participants = current ? [...current.room.participants.values()] : [];
  return {
    phase: current?.phase ?? 'idle',
    joined: current?.joined ?? false,
    participantId: current?.participantId ?? null,
    room: current?.roomName ?? null,
    name: current?.name ?? null,
    participants: participants.map((p) => p.id),
    names: Object.fromEntries(participants.map((p) => [p.id, p.name])),
    tracks: Object.fromEntries(
      participants.map((p) => [
        p.id,
        [...p.tracks.values()].map((t) => ({
          track_id: t.id,
          kind: t.kind,
          role: t.role,
          muted: t.muted,
          simulcast: t.simulcast,
        })),
      ]),
    ),
    tiles: [...new Set(remoteTiles.map((tile) => tile.participant_id))],
    tileList: tiles,
    localTile: tiles.some((tile) => tile.local && tile.kind === 'camera'),
    chat: (current?.chat ?? []).map(({ participant_id, name, text, ts }) => ({ participant_id, name, text, ts })),
    activeSpeaker: current?.room.activeSpeaker ?? null,
    muted: { mic: current?.media.micMuted ?? false, camera: current?.media.camMuted ?? false },
    publishing: {
      mic: Boolean(current?.media.mic),
      camera: Boolean(current?.media.camera),
      screen: Boolean(current?.media.screen),
    },
    ownTracks: current?.ownTracks ?? [],
    pc: current?.pcStates ?? { publisher: 'none', subscriber: 'none' },
    notices: ui.notices.texts(),
    errors: [...shownErrors],
    shareLink: current ? shareUrl(current.roomName) : null,
    reconnectAttempt: current?.attempt ?? 0,
  };
}

async function remoteVideoStats() {
  const current = call;
  const pc = current?.session?.subscriber?.pc;
  const specs = lastSpecs.filter((spec) => !spec.local);
  const byMid = new Map();
  const byTrack = new Map();
  if (pc && pc.signalingState !== 'closed') {
    const report = await pc.getStats();
    report.forEach((entry) => {
      if (entry.type !== 'inbound-rtp' || (entry.kind ?? entry.mediaType) !== 'video') return;
      if (entry.mid != null) keepNewest(byMid, String(entry.mid), entry);
      if (entry.trackIdentifier) keepNewest(byTrack, entry.trackIdentifier, entry);
    });
  }
  return specs.map((spec) => {
    const binding = spec.binding;
    const entry = binding ? byMid.get(binding.mid) ?? byTrack.get(binding.track.id) : null;
    return {
      participant_id: spec.participantId,
      kind: spec.kind,
      track_id: spec.trackId,
      framesDecoded: entry?.framesDecoded ?? 0,
      frameWidth: entry?.frameWidth ?? 0,
      frameHeight: entry?.frameHeight ?? 0,
      // What a frozen tile's cause shows up in: loss and its repair, keyframes asked for and got.
      framesReceived: entry?.framesReceived ?? 0,
      framesDropped: entry?.framesDropped ?? 0,
      keyFramesDecoded: entry?.keyFramesDecoded ?? 0,
      packetsReceived: entry?.packetsReceived ?? 0,
      packetsLost: entry?.packetsLost ?? 0,
      nackCount: entry?.nackCount ?? 0,
      pliCount: entry?.pliCount ?? 0,
      freezeCount: entry?.freezeCount ?? 0,
      jitterBufferDelay: entry?.jitterBufferDelay ?? 0,
      jitterBufferEmittedCount: entry?.jitterBufferEmittedCount ?? 0,
      wantedQuality: wantedByKey.get(spec.key) ?? null,
      quality: spec.trackId !== null && current ? current.qualityOf(spec.trackId) : null,
    };
  });
}

/**
 * What the publisher pc sends, from its getStats: `camera` is the capture's size and rate,
 * `availableOutgoingBitrate` the browser's estimate of its uplink (what its layers must fit);
 * `video` has one entry per encoding (a simulcast camera has one per rid) with its size,
 * frames and why the browser limits it;
 * `mic` is the microphone's level as captured (`audioLevel` 0–1, and the running energy and
 * duration that give its average power over any interval).
 */
async function sendStats() {
  const pc = call?.session?.publisher?.pc;
  const settings = call?.media.camera?.getSettings?.() ?? null;
  const camera = settings && { width: settings.width ?? 0, height: settings.height ?? 0, frameRate: settings.frameRate ?? 0 };
  const result = { camera, availableOutgoingBitrate: null, video: [], mic: null };
  if (!pc || pc.signalingState === 'closed') return result;
  const report = await pc.getStats();
  report.forEach((entry) => {
    if (entry.type === 'outbound-rtp' && (entry.kind ?? entry.mediaType) === 'video') {
      result.video.push({
        mid: entry.mid ?? null,
        rid: entry.rid ?? null,
        active: entry.active ?? true,
        frameWidth: entry.frameWidth ?? 0,
        frameHeight: entry.frameHeight ?? 0,
        framesEncoded: entry.framesEncoded ?? 0,
        bytesSent: entry.bytesSent ?? 0,
        qualityLimitationReason: entry.qualityLimitationReason ?? null,
      });
    } else if (entry.type === 'candidate-pair' && entry.nominated && entry.availableOutgoingBitrate !== undefined) {
      result.availableOutgoingBitrate = entry.availableOutgoingBitrate;
    } else if (entry.type === 'media-source' && entry.kind === 'audio') {
      result.mic = {
        audioLevel: entry.audioLevel ?? 0,
        totalAudioEnergy: entry.totalAudioEnergy ?? 0,
        totalSamplesDuration: entry.totalSamplesDuration ?? 0,
      };
    }
  });
  result.video.sort((a, b) => String(a.mid).localeCompare(String(b.mid)) || a.frameWidth - b.frameWidth);
  return result;
}

/** A reused m-section can leave an older inbound-rtp entry behind: keep the most recent one. */
function keepNewest(map, key, entry) {
  const previous = map.get(key);
  const recency = (e) => e.lastPacketReceivedTimestamp ?? 0;
  if (!previous || recency(entry) >= recency(previous)) map.set(key, entry);
}

boot();
