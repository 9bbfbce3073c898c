// media.js — owns local capture: the microphone and camera tracks (opened with fallbacks,
// with a clear sentence when one is denied or missing), the user's mute wishes, device lists
// and switching, and the screen-share track. It knows nothing about peer connections.

const CAMERA_CONSTRAINTS = { width: { ideal: 1280 }, height: { ideal: 720 }, frameRate: { ideal: 30 } };
const MIC_CONSTRAINTS = { echoCancellation: true, noiseSuppression: true, autoGainControl: true };

const LABEL = { mic: 'microphone', camera: 'camera' };
/** Stands for "no such device" when enumerateDevices lists none of a kind. */
const MISSING = { name: 'NotFoundError', message: 'no device' };

/** A sentence saying why a device could not be opened. */
export function describeMediaError(err, what) {
  switch (err?.name) {
    case 'NotAllowedError':
    case 'SecurityError':
      return `Access to your ${what} was blocked`;
    case 'NotFoundError':
    case 'OverconstrainedError':
      return `No ${what.replace(' and ', ' or ')} was found`;
    case 'NotReadableError':
    case 'AbortError':
      return `Your ${what} is in use by another app or could not start`;
    default:
      return `Your ${what} could not be opened (${err?.message || err})`;
  }
}

async function getUserMedia(constraints) {
  return navigator.mediaDevices.getUserMedia(constraints);
}

/** Which kinds of device exist; before permission browsers list them without labels. */
async function presentKinds() {
  try {
    const devices = await navigator.mediaDevices.enumerateDevices();
    if (devices.length === 0) return { mic: true, camera: true };
    return {
      mic: devices.some((d) => d.kind === 'audioinput'),
      camera: devices.some((d) => d.kind === 'videoinput'),
    };
  } catch {
    return { mic: true, camera: true };
  }
}

export class LocalMedia {
  constructor() {
    /** @type {MediaStreamTrack|null} */
    this.mic = null;
    /** @type {MediaStreamTrack|null} */
    this.camera = null;
    /** @type {MediaStreamTrack|null} */
    this.screen = null;
    /** The user's wishes; they survive reconnects and apply to tracks opened later. */
    this.micMuted = false;
    this.camMuted = false;
    /** The stream (msid) our mic and camera are published in. */
    this.stream = new MediaStream();
    this.screenStream = null;
  }

  get supported() {
    return Boolean(navigator.mediaDevices?.getUserMedia);
  }

  get screenSupported() {
    return Boolean(navigator.mediaDevices?.getDisplayMedia);
  }

  /** Roles that currently have a track, in publishing order. */
  roles() {
    return ['mic', 'camera', 'screen'].filter((role) => this[role]);
  }

  /**
   * Opens microphone and camera, settling for whatever works. Returns a sentence for the
   * user when something is missing, or null when both are on.
   */
  async acquire() {
    if (!this.supported) {
      return 'Camera and microphone need a secure page (HTTPS or localhost). You joined as a viewer: you can still watch, listen and chat.';
    }
    const present = await presentKinds();
    /** role → the error that kept it closed */
    const failures = {};
    const wanted = ['mic', 'camera'].filter((role) => {
      if (!present[role]) failures[role] = MISSING;
      return present[role];
    });
    if (wanted.length > 0) {
      try {
        this.adopt(await getUserMedia(this.constraints(wanted)));
      } catch (err) {
        const denied = err?.name === 'NotAllowedError' || err?.name === 'SecurityError';
        if (wanted.length === 2 && !denied) {
          // One of the two may be the culprit (busy, missing): try each on its own.
          for (const role of wanted) await this.tryOpen(role, failures);
        } else {
          for (const role of wanted) failures[role] = err;
        }
      }
    }
    return this.acquireSummary(failures);
  }

  async tryOpen(role, failures) {
    try {
      this.adopt(await getUserMedia(this.constraints([role])));
    } catch (err) {
      failures[role] = err;
    }
  }

  acquireSummary(failures) {
    if (this.mic && this.camera) return null;
    const denied = Object.values(failures).some((err) => err?.name === 'NotAllowedError' || err?.name === 'SecurityError');
    const retry = denied
      ? 'Allow access in the address bar, then press the camera or microphone button to try again.'
      : 'Press the camera or microphone button to try again.';
    const why = (role) => describeMediaError(failures[role] ?? MISSING, LABEL[role]);
    if (!this.mic && !this.camera) {
      const reason = failures.mic?.name === failures.camera?.name
        ? describeMediaError(failures.mic ?? MISSING, 'camera and microphone')
        : `${why('camera')}. ${why('mic')}`;
      return `${reason}. You joined as a viewer: you can still watch, listen and chat. ${retry}`;
    }
    if (!this.camera) return `${why('camera')}. You joined with your microphone only. ${retry}`;
    return `${why('mic')}. You joined with your camera only. ${retry}`;
  }

  constraints(roles, deviceIds = {}) {
    const withDevice = (base, id) => (id ? { ...base, deviceId: { exact: id } } : base);
    return {
      audio: roles.includes('mic') ? withDevice(MIC_CONSTRAINTS, deviceIds.mic) : false,
      video: roles.includes('camera') ? withDevice(CAMERA_CONSTRAINTS, deviceIds.camera) : false,
    };
  }

  adopt(stream) {
    for (const track of stream.getTracks()) this.setTrack(track.kind === 'audio' ? 'mic' : 'camera', track);
  }

  setTrack(role, track) {
    const old = this[role];
    if (old) this.stream.removeTrack(old);
    this[role] = track;
    if (track) {
      this.stream.addTrack(track);
      track.enabled = !(role === 'mic' ? this.micMuted : this.camMuted);
    }
    return old;
  }

  /** Opens a device that is missing (after a denial or with nothing plugged in). */
  async enable(role) {
    if (!this.supported) throw new Error('Camera and microphone need a secure page (HTTPS or localhost)');
    try {
      this.adopt(await getUserMedia(this.constraints([role])));
    } catch (err) {
      throw new Error(describeMediaError(err, LABEL[role]));
    }
    return this[role];
  }

  setMicMuted(muted) {
    this.micMuted = muted;
    if (this.mic) this.mic.enabled = !muted;
  }

  setCamMuted(muted) {
    this.camMuted = muted;
    if (this.camera) this.camera.enabled = !muted;
  }

  /**
   * Opens another device for a role. Returns `{ track, old }`: the caller swaps the sender's
   * track and then stops `old`, so the switch has no gap.
   */
  async switchDevice(role, deviceId) {
    let stream;
    try {
      stream = await getUserMedia(this.constraints([role], { [role]: deviceId }));
    } catch (err) {
      throw new Error(describeMediaError(err, `selected ${LABEL[role]}`));
    }
    const track = stream.getTracks()[0];
    const old = this.setTrack(role, track);
    return { track, old };
  }

  deviceIdOf(role) {
    return this[role]?.getSettings?.().deviceId ?? '';
  }

  /** `{ cameras, mics }`, each a list of `{ deviceId, label }`. */
  async listDevices() {
    if (!navigator.mediaDevices?.enumerateDevices) return { cameras: [], mics: [] };
    const devices = await navigator.mediaDevices.enumerateDevices();
    const list = (kind, fallback) =>
      devices
        .filter((d) => d.kind === kind && d.deviceId)
        .map((d, i) => ({ deviceId: d.deviceId, label: d.label || `${fallback} ${i + 1}` }));
    return { cameras: list('videoinput', 'Camera'), mics: list('audioinput', 'Microphone') };
  }

  /** Starts screen capture; `onEnded` runs when the browser's own "stop sharing" is used. */
  async startScreen(onEnded) {
    const stream = await navigator.mediaDevices.getDisplayMedia({ video: { frameRate: { ideal: 15 } }, audio: false });
    const [track] = stream.getVideoTracks();
    if ('contentHint' in track) track.contentHint = 'detail';
    track.addEventListener('ended', onEnded, { once: true });
    this.screen = track;
    this.screenStream = stream;
    return track;
  }

  stopScreen() {
    this.screen?.stop();
    this.screen = null;
    this.screenStream = null;
  }

  stopAll() {
    this.stopScreen();
    for (const role of ['mic', 'camera']) this.setTrack(role, null)?.stop();
  }
}
