// room.js — owns the room model as the server describes it: the other participants (in join
// order), their published tracks with a role (audio, camera or screen), mute flags, and the
// active speaker. Plain data fed by server messages: no DOM, no WebRTC, no network.

/** Ids arrive as strings (or numbers from some servers); the page compares them as strings. */
export function idOf(value) {
  return typeof value === 'string' || typeof value === 'number' ? String(value) : null;
}

/**
 * Decides whether a track is audio, a camera or a screen share. The server's optional
 * `source` wins; otherwise a participant's first video track is its camera and any further
 * video track is a screen share. A role, once decided, does not change.
 */
export function classifyTrack(tracks, track, previousRole = null) {
  if (track.kind === 'audio') return 'audio';
  if (track.source === 'camera' || track.source === 'screen') return track.source;
  if (previousRole) return previousRole;
  for (const other of tracks.values()) {
    if (other.id !== track.id && other.role === 'camera') return 'screen';
  }
  return 'camera';
}

export class Room {
  constructor() {
    this.reset();
  }

  /** Forgets everything (a new session starts from the server's `joined`). */
  reset() {
    /** @type {Map<string, {id: string, name: string, tracks: Map<string, object>}>} */
    this.participants = new Map();
    /** Participant id of the loudest speaker, or null. */
    this.activeSpeaker = null;
  }

  /** Adds or updates a participant from a wire Participant. Returns it, or null if malformed. */
  upsertParticipant(wire) {
    const id = idOf(wire?.participant_id);
    if (id === null) return null;
    const participant = this.ensure(id);
    if (typeof wire.name === 'string') participant.name = wire.name;
    if (Array.isArray(wire.tracks)) {
      for (const track of wire.tracks) this.publishTrack(id, track);
    }
    return participant;
  }

  ensure(id) {
    let participant = this.participants.get(id);
    if (!participant) {
      participant = { id, name: '', tracks: new Map() };
      this.participants.set(id, participant);
    }
    return participant;
  }

  removeParticipant(id) {
    if (this.activeSpeaker === id) this.activeSpeaker = null;
    return this.participants.delete(id);
  }

  /** Records a wire Track for a participant. Returns the stored track, or null if malformed. */
  publishTrack(participantId, wire) {
    const id = idOf(wire?.track_id);
    if (participantId === null || id === null) return null;
    if (wire.kind !== 'audio' && wire.kind !== 'video') return null;
    const participant = this.ensure(participantId);
    const previous = participant.tracks.get(id);
    const track = {
      id,
      wireId: wire.track_id,
      kind: wire.kind,
      muted: wire.muted === true,
      simulcast: wire.simulcast === true,
      source: typeof wire.source === 'string' ? wire.source : null,
      role: null,
    };
    track.role = classifyTrack(participant.tracks, track, previous?.role);
    participant.tracks.set(id, track);
    return track;
  }

  unpublishTrack(participantId, trackId) {
    return this.participants.get(participantId)?.tracks.delete(trackId) ?? false;
  }

  setMuted(participantId, trackId, muted) {
    const track = this.participants.get(participantId)?.tracks.get(trackId);
    if (!track) return false;
    track.muted = muted;
    return true;
  }

  hasTrack(participantId, trackId) {
    return this.participants.get(participantId)?.tracks.has(trackId) ?? false;
  }

  setActiveSpeakers(ids) {
    this.activeSpeaker = Array.isArray(ids) && ids.length > 0 ? idOf(ids[0]) : null;
  }

  /** The participant's tracks with the given role, in publication order. */
  tracksWithRole(participant, role) {
    return [...participant.tracks.values()].filter((track) => track.role === role);
  }
}
