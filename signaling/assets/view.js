// view.js — owns the call page's DOM: the tile grid (one keyed tile per camera or screen
// share; a click enlarges a tile and shrinks the others to a strip, a second click restores
// the grid; each tile's size on screen is measured for the quality it asks for), the hidden
// remote-audio players, the chat list, the notice banner and toasts. It renders plain data
// handed to it by app.js and never talks to the network.

/** Creates an element: `el('p', { class: 'x', 'data-a': 1 }, 'text', child)`. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== null && value !== undefined && value !== false) node.setAttribute(name, String(value));
  }
  node.append(...children);
  return node;
}

/** Up to two initials for an avatar: "Ada Lovelace" → "AL". */
export function initials(name) {
  const words = String(name ?? '').trim().split(/\s+/).filter(Boolean);
  const letters = words.slice(0, 2).map((word) => [...word][0]);
  return (letters.join('') || '?').toUpperCase();
}

/**
 * A stable hue for a participant, so their avatar keeps its colour. Keyed by name: ids differ
 * between one's own page and the others' (one's own tile is drawn before the server names it)
 * and change on every rejoin, so a person would otherwise wear a different colour on each page.
 */
export function hueOf(key) {
  let hue = 0;
  for (const ch of String(key)) hue = (hue * 31 + ch.codePointAt(0)) % 360;
  return hue;
}

export function formatTime(ts) {
  const date = new Date(ts);
  return Number.isNaN(date.getTime()) ? '' : date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
}

const TRACK_EVENTS = ['mute', 'unmute', 'ended'];
const VIDEO_EVENTS = ['loadeddata', 'playing', 'resize', 'emptied'];

/**
 * One tile. A spec is `{ key, participantId, kind, local, name, label, videoTrack, hasVideo,
 * audioMuted, videoMuted, speaking }`. Its status is 'live' once video frames render,
 * 'connecting' while waiting for them, and 'off' when there is no video to show.
 */
class Tile {
  constructor(template) {
    this.root = template.content.firstElementChild.cloneNode(true);
    this.video = this.root.querySelector('video');
    // Set as properties too: a cloned `muted` attribute does not always mute.
    this.video.muted = true;
    this.video.autoplay = true;
    this.video.playsInline = true;
    this.initials = this.root.querySelector('.initials');
    this.name = this.root.querySelector('.tile-name');
    this.statusText = this.root.querySelector('.tile-status');
    this.spec = null;
    this.track = null;
    /** Width on screen in CSS pixels, as last measured by the grid's ResizeObserver. */
    this.width = 0;
    this.refresh = () => this.refreshStatus();
    for (const type of VIDEO_EVENTS) this.video.addEventListener(type, this.refresh);
  }

  setFocused(focused) {
    this.root.dataset.focused = String(focused);
    const hint = focused ? 'Click to show everyone' : 'Click to enlarge';
    if (this.root.title !== hint) this.root.title = hint;
  }

  update(spec) {
    this.spec = spec;
    const data = this.root.dataset;
    data.participantId = spec.participantId;
    data.kind = spec.kind;
    data.local = String(spec.local);
    data.audioMuted = String(spec.audioMuted);
    data.videoMuted = String(spec.videoMuted);
    data.speaking = String(spec.speaking);
    if (this.name.textContent !== spec.label) this.name.textContent = spec.label;
    this.initials.textContent = initials(spec.name);
    this.root.style.setProperty('--hue', String(hueOf(spec.name)));
    this.root.setAttribute('aria-label', spec.label);
    this.setTrack(spec.videoTrack);
    this.refreshStatus();
  }

  setTrack(track) {
    if (track === this.track) return;
    for (const type of TRACK_EVENTS) this.track?.removeEventListener(type, this.refresh);
    this.track = track;
    for (const type of TRACK_EVENTS) track?.addEventListener(type, this.refresh);
    this.video.srcObject = track ? new MediaStream([track]) : null;
    this.play();
  }

  play() {
    if (this.video.srcObject) this.video.play().catch(() => {});
  }

  status() {
    const { spec, track, video } = this;
    if (!spec || !spec.hasVideo || spec.videoMuted) return 'off';
    if (!track || track.readyState === 'ended') return 'connecting';
    if (video.videoWidth === 0 || (!spec.local && track.muted)) return 'connecting';
    return 'live';
  }

  statusLabel(status) {
    const { spec } = this;
    if (status === 'connecting') return spec.local ? 'starting camera…' : 'connecting…';
    if (status === 'off' && spec.kind === 'camera') return spec.videoMuted ? 'camera off' : 'no camera';
    return '';
  }

  refreshStatus() {
    const status = this.status();
    this.root.dataset.status = status;
    const label = this.statusLabel(status);
    if (this.statusText.textContent !== label) this.statusText.textContent = label;
  }

  destroy() {
    this.setTrack(null);
    this.root.remove();
  }
}

/** Columns for a number of tiles: 1 → 1, 2–4 → 2, 5–9 → 3, more → 4 (fewer on phones). */
function columnsFor(count, width) {
  if (width < 700) return count <= 2 ? 1 : 2;
  if (count <= 1) return 1;
  if (count <= 4) return 2;
  if (count <= 9) return 3;
  return 4;
}

export class TileGrid {
  /**
   * @param {() => void} onChange runs when a tile's size on screen or the focus changes
   *   (what each tile should receive depends on both)
   */
  constructor(grid, template, onChange = () => {}) {
    this.grid = grid;
    this.template = template;
    this.onChange = onChange;
    /** @type {Map<string, Tile>} */
    this.tiles = new Map();
    /** The key of the enlarged tile, or null for the plain grid. */
    this.focusKey = null;
    this.resizeObserver = typeof ResizeObserver === 'function'
      ? new ResizeObserver((entries) => this.measured(entries))
      : null;
    window.addEventListener('resize', () => this.layout());
    // One listener for every tile, present and future: a click or Enter/Space toggles focus.
    grid.addEventListener('click', (event) => this.toggleFocusFrom(event.target));
    grid.addEventListener('keydown', (event) => {
      if (event.key !== 'Enter' && event.key !== ' ') return;
      if (this.toggleFocusFrom(event.target)) event.preventDefault();
    });
  }

  measured(entries) {
    let changed = false;
    for (const entry of entries) {
      const tile = [...this.tiles.values()].find((t) => t.root === entry.target);
      const width = entry.borderBoxSize?.[0]?.inlineSize ?? entry.contentRect.width;
      if (tile && tile.width !== width) {
        tile.width = width;
        changed = true;
      }
    }
    if (changed) this.onChange();
  }

  /** Width on screen of the tile with `key`, in CSS pixels (0 before it is laid out). */
  widthOf(key) {
    return this.tiles.get(key)?.width ?? 0;
  }

  /** Toggles focus on the tile an event happened in. Returns whether there was one. */
  toggleFocusFrom(target) {
    const root = target instanceof Element ? target.closest('.tile') : null;
    const key = [...this.tiles].find(([, tile]) => tile.root === root)?.[0];
    if (key === undefined) return false;
    this.setFocus(this.focusKey === key ? null : key);
    return true;
  }

  /** Enlarges the tile with `key` (null: back to the plain grid). */
  setFocus(key) {
    const next = key !== null && this.tiles.has(key) ? key : null;
    if (next === this.focusKey) return;
    this.focusKey = next;
    this.layout();
    this.onChange();
  }

  /** Makes the grid show exactly these tiles, in this order, reusing existing elements. */
  sync(specs) {
    const wanted = new Set(specs.map((spec) => spec.key));
    for (const [key, tile] of this.tiles) {
      if (!wanted.has(key)) {
        this.resizeObserver?.unobserve(tile.root);
        tile.destroy();
        this.tiles.delete(key);
      }
    }
    if (this.focusKey !== null && !wanted.has(this.focusKey)) this.focusKey = null;
    specs.forEach((spec, index) => {
      let tile = this.tiles.get(spec.key);
      if (!tile) {
        tile = new Tile(this.template);
        this.tiles.set(spec.key, tile);
        this.resizeObserver?.observe(tile.root);
      }
      tile.update(spec);
      const current = this.grid.children[index];
      if (current !== tile.root) {
        this.grid.insertBefore(tile.root, current ?? null);
        tile.play(); // moving a media element can pause it
      }
    });
    this.layout();
  }

  layout() {
    const count = Math.max(1, this.tiles.size);
    const cols = columnsFor(count, window.innerWidth);
    this.grid.style.setProperty('--cols', String(cols));
    this.grid.style.setProperty('--rows', String(Math.ceil(count / cols)));
    this.grid.dataset.focus = String(this.focusKey !== null);
    for (const [key, tile] of this.tiles) tile.setFocused(key === this.focusKey);
  }

  clear() {
    this.sync([]);
  }
}

/** Remote audio: one hidden <audio autoplay> per received audio track. */
export class AudioSinks {
  /** @param {() => void} onBlocked called when autoplay policy refuses to play */
  constructor(container, onBlocked) {
    this.container = container;
    this.onBlocked = onBlocked;
    /** @type {Map<string, HTMLAudioElement>} */
    this.players = new Map();
  }

  /** @param {{key: string, track: MediaStreamTrack}[]} sinks */
  sync(sinks) {
    const wanted = new Map(sinks.map((sink) => [sink.key, sink.track]));
    for (const [key, audio] of this.players) {
      if (wanted.get(key) !== audio.srcObject?.getAudioTracks()[0]) {
        audio.srcObject = null;
        audio.remove();
        this.players.delete(key);
      }
    }
    for (const [key, track] of wanted) {
      if (this.players.has(key)) continue;
      const audio = el('audio', { 'data-key': key });
      audio.autoplay = true;
      audio.srcObject = new MediaStream([track]);
      this.container.append(audio);
      this.players.set(key, audio);
      this.play(audio);
    }
  }

  play(audio) {
    audio.play().catch((err) => {
      if (err?.name === 'NotAllowedError') this.onBlocked();
    });
  }

  /** Retries playback after a user gesture. */
  unlock() {
    for (const audio of this.players.values()) this.play(audio);
  }

  clear() {
    this.sync([]);
  }
}

/** The chat list. Messages are `{ participant_id, name, text, ts }`. */
export class ChatView {
  constructor(list) {
    this.list = list;
  }

  append(message, self) {
    const nearBottom = this.list.scrollHeight - this.list.scrollTop - this.list.clientHeight < 48;
    const time = el('time', {}, formatTime(message.ts));
    const item = el(
      'li',
      { class: 'chat-msg', 'data-self': String(self), 'data-participant-id': message.participant_id },
      el('div', { class: 'chat-meta' }, el('span', { class: 'chat-name' }, message.name || 'Guest'), time),
      el('p', { class: 'chat-text' }, message.text),
    );
    this.list.append(item);
    if (nearBottom || self) this.list.scrollTop = this.list.scrollHeight;
  }

  clear() {
    this.list.replaceChildren();
  }
}

/** Persistent messages, one per key (e.g. 'media', 'connection'), shown in a banner. */
export class Notices {
  constructor(container) {
    this.container = container;
    /** @type {Map<string, {text: string, level: string, action: object|null}>} */
    this.items = new Map();
  }

  /** Sets (or with a null text, clears) the notice for a key. */
  set(key, text, level = 'info', action = null) {
    if (text) this.items.set(key, { text, level, action });
    else this.items.delete(key);
    this.render();
  }

  clear() {
    this.items.clear();
    this.render();
  }

  texts() {
    return [...this.items.values()].map((item) => item.text);
  }

  render() {
    const nodes = [...this.items].map(([key, { text, level, action }]) => {
      const node = el('div', { class: 'notice', 'data-key': key, 'data-level': level, role: level === 'error' ? 'alert' : 'status' }, el('span', {}, text));
      if (action) {
        const button = el('button', { type: 'button', class: 'ghost', id: action.id ?? null }, action.label);
        button.addEventListener('click', action.onClick);
        node.append(button);
      }
      return node;
    });
    this.container.replaceChildren(...nodes);
    this.container.hidden = nodes.length === 0;
  }
}

/** A short-lived message in the corner. */
export function toast(text, level = 'info', ms = 4500) {
  const container = document.getElementById('toasts');
  if (!container) return;
  const node = el('div', { class: 'toast', 'data-level': level, role: level === 'error' ? 'alert' : 'status' }, text);
  container.append(node);
  while (container.children.length > 4) container.firstElementChild.remove();
  setTimeout(() => node.remove(), ms);
}
