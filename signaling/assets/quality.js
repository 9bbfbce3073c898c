// quality.js — owns which simulcast layer the page wants for each received video tile: the
// focused (enlarged) tile wants the best one and the others the smallest; with nothing
// focused, each tile wants the smallest layer that still looks sharp at its size on screen.
// Plain functions of sizes and ids: no DOM, no network (call.js sends what changes).

/** The qualities of the protocol's `set_quality`, smallest first. */
export const QUALITIES = ['low', 'medium', 'high'];

/**
 * Widest tile, in device pixels, that each layer fills without visible blur. A publisher's
 * layers are 320, 640 and 1280 pixels wide (see CAMERA_LAYERS in peers.js); stretched by an
 * eighth or less a layer looks the same, so 320 serves tiles up to 360 pixels and 640 up to 720.
 */
export const LOW_MAX_WIDTH = 360;
export const MEDIUM_MAX_WIDTH = 720;

/** The smallest quality that looks sharp in a tile `devicePixels` wide. */
export function qualityForWidth(devicePixels) {
  if (devicePixels <= LOW_MAX_WIDTH) return 'low';
  if (devicePixels <= MEDIUM_MAX_WIDTH) return 'medium';
  return 'high';
}

/**
 * The quality each remote video tile wants, in this order of precedence: an override (the
 * test hook's), then focus (the focused tile `high`, every other one `low`: they shrink to a
 * strip), then the tile's width. A tile with no width yet and nothing else to go by (not laid
 * out) is left out, so the page asks for nothing before it knows.
 *
 * @param {{key: string, participantId: string, kind: string, trackId: string, width: number}[]}
 *   tiles `kind` is 'camera' or 'screen', `width` in device pixels
 * @param {string|null} focusKey the key of the focused tile, or null
 * @param {Map<string, string>} overrides participant id → quality, for that participant's camera
 * @returns {{key: string, participantId: string, trackId: string, quality: string}[]}
 */
export function wantedQualities(tiles, focusKey, overrides = new Map()) {
  const wanted = [];
  for (const tile of tiles) {
    const override = tile.kind === 'camera' ? overrides.get(tile.participantId) : undefined;
    const quality = override
      ?? (focusKey !== null ? (tile.key === focusKey ? 'high' : 'low') : null)
      ?? (tile.width > 0 ? qualityForWidth(tile.width) : null);
    if (quality) wanted.push({ key: tile.key, participantId: tile.participantId, trackId: tile.trackId, quality });
  }
  return wanted;
}
