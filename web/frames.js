// Decoded frames and masks, fetched once and kept in a small LRU cache, so that stepping and
// playing never wait on the network. Images are fetched with fetch() (the access key travels
// as a header, which <img src> cannot send) and decoded with createImageBitmap.

import { ApiError, fetchBlob } from "./api.js";

/** A Map in least-recently-used order, of at most `limit` entries. */
class Lru {
  constructor(limit, onEvict = () => {}) {
    this.limit = limit;
    this.onEvict = onEvict;
    this.map = new Map();
  }
  get(key) {
    if (!this.map.has(key)) return undefined;
    const value = this.map.get(key);
    this.map.delete(key);
    this.map.set(key, value);
    return value;
  }
  set(key, value) {
    this.delete(key);
    this.map.set(key, value);
    while (this.map.size > this.limit) this.delete(this.map.keys().next().value);
  }
  delete(key) {
    if (!this.map.has(key)) return;
    const value = this.map.get(key);
    this.map.delete(key);
    this.onEvict(value);
  }
  clear() {
    for (const key of [...this.map.keys()]) this.delete(key);
  }
}

// Entries hold promises; a decoded ImageBitmap is closed when evicted.
const closeBitmap = (promise) => promise.then((bitmap) => bitmap && bitmap.close?.(), () => {});

export class FrameStore {
  /** `video`: {width, height}; the caches hold about 256 MiB of decoded frames at most. */
  constructor(sessionId, video) {
    this.sessionId = sessionId;
    this.width = video.width;
    this.height = video.height;
    const frames = Math.max(8, Math.min(120, Math.floor(256e6 / (video.width * video.height * 4))));
    this.capacity = frames;
    this.frames = new Lru(frames, closeBitmap);
    this.masks = new Lru(frames * 2);
    this.scratch = null; // a canvas to read mask pixels from
    this.closed = false;
    this.abort = new AbortController(); // cancels every request in flight on close()
  }

  /** Frame i as an ImageBitmap (GET /frame; a 503 while decoding is retried after Retry-After). */
  frame(i) {
    let entry = this.frames.get(i);
    if (!entry) {
      entry = this.loadFrame(i);
      this.frames.set(i, entry);
      entry.catch(() => this.frames.map.get(i) === entry && this.frames.map.delete(i));
    }
    return entry;
  }

  async loadFrame(i, attempts = 5) {
    for (let attempt = 1; ; attempt++) {
      try {
        const { blob } = await fetchBlob(`/frame/${this.sessionId}/${i}`, { signal: this.abort.signal });
        return await createImageBitmap(blob);
      } catch (err) {
        const decoding = err instanceof ApiError && err.status === 503 && err.retryAfter != null;
        if (!decoding || attempt >= attempts || this.closed) throw err;
        await new Promise((resolve) => setTimeout(resolve, err.retryAfter * 1000));
      }
    }
  }

  /**
   * The label map of frame i (Uint8Array, width*height, value = obj_id), or null when the
   * frame has no mask. Only called for frames the session lists in mask_frames (a 404 would
   * otherwise be logged by the browser).
   */
  mask(i) {
    let entry = this.masks.get(i);
    if (!entry) {
      entry = this.loadMask(i);
      this.masks.set(i, entry);
      entry.catch(() => this.masks.map.get(i) === entry && this.masks.map.delete(i));
    }
    return entry;
  }

  async loadMask(i) {
    let blob;
    try {
      ({ blob } = await fetchBlob(`/mask/${this.sessionId}/${i}`, { signal: this.abort.signal }));
    } catch (err) {
      if (err instanceof ApiError && err.status === 404 && err.code === "mask_not_found") return null;
      throw err;
    }
    // The PNG is 8-bit grey, pixel = obj_id: decode it without colour management or
    // premultiplication so that the values come back exactly.
    const bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
    if (!this.scratch) {
      this.scratch = document.createElement("canvas").getContext("2d", { willReadFrequently: true });
    }
    const { width, height } = bitmap;
    const ctx = this.scratch;
    ctx.canvas.width = width;
    ctx.canvas.height = height;
    ctx.drawImage(bitmap, 0, 0);
    bitmap.close();
    const rgba = ctx.getImageData(0, 0, width, height).data;
    const labels = new Uint8Array(width * height);
    for (let p = 0, q = 0; p < labels.length; p++, q += 4) labels[p] = rgba[q];
    return { labels, width, height };
  }

  /** Forget a frame's mask (it changed on the server), or every mask. */
  dropMask(i) {
    this.masks.delete(i);
  }
  dropMasks() {
    this.masks.clear();
  }

  /** Whether frame i (and its mask, if it has one) is decoded and ready to draw. */
  async ready(i, hasMask) {
    await Promise.all([this.frame(i), hasMask ? this.mask(i) : null]);
  }

  close() {
    this.closed = true;
    this.abort.abort();
    this.frames.clear();
    this.masks.clear();
  }
}
