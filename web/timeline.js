// The strip under the scrubber: one column per frame, in rows.
//   top     frames with a mask (mask_frames)
//   middle  frames the latest propagation covered (its passes), brighter where this run wrote
//   marks   prompts (yellow ticks) and frames to review (orange: an object not visible, or IoU < 0.5)
// The current frame is a white line. Clicking or dragging on the strip seeks.

const COLORS = {
  empty: "#262a31", mask: "#3b82f6", covered: "#64748b", live: "#a855f7",
  prompt: "#facc15", review: "#f97316", cursor: "#ffffff",
};

export class Timeline {
  constructor(canvas, onSeek) {
    this.canvas = canvas;
    this.onSeek = onSeek;
    this.data = { numFrames: 0, current: 0, masks: new Set(), prompts: new Set(), review: new Set(),
                  covered: new Set(), live: new Set() };
    const seek = (e) => {
      if (!this.data.numFrames) return;
      const rect = canvas.getBoundingClientRect();
      const f = Math.floor(((e.clientX - rect.left) / rect.width) * this.data.numFrames);
      this.onSeek(Math.min(this.data.numFrames - 1, Math.max(0, f)));
    };
    canvas.addEventListener("pointerdown", (e) => { canvas.setPointerCapture(e.pointerId); seek(e); });
    canvas.addEventListener("pointermove", (e) => e.buttons && seek(e));
    new ResizeObserver(() => this.draw()).observe(canvas);
  }

  /** Merge new facts (any of the keys of `this.data`) and redraw. */
  update(facts) {
    Object.assign(this.data, facts);
    const d = this.data;
    // State for tests and for anyone inspecting the page.
    this.canvas.dataset.maskFrames = d.masks.size;
    this.canvas.dataset.promptFrames = d.prompts.size;
    this.canvas.dataset.reviewFrames = d.review.size;
    this.canvas.dataset.coveredFrames = d.covered.size;
    this.draw();
  }

  draw() {
    const { canvas, data: d } = this;
    const dpr = window.devicePixelRatio || 1;
    const w = Math.round(canvas.clientWidth * dpr);
    const h = Math.round(canvas.clientHeight * dpr);
    if (!w || !h) return;
    if (canvas.width !== w || canvas.height !== h) {
      canvas.width = w;
      canvas.height = h;
    }
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = COLORS.empty;
    ctx.fillRect(0, 0, w, h);
    if (!d.numFrames) return;
    const col = w / d.numFrames;
    const span = (f) => [Math.floor(f * col), Math.max(1, Math.floor((f + 1) * col) - Math.floor(f * col))];
    const row = (set, color, y0, y1) => {
      ctx.fillStyle = color;
      for (const f of set) {
        const [x, cw] = span(f);
        ctx.fillRect(x, y0 * h, cw, (y1 - y0) * h);
      }
    };
    row(d.masks, COLORS.mask, 0, 0.45);
    row(d.covered, COLORS.covered, 0.5, 0.7);
    row(d.live, COLORS.live, 0.5, 0.7);
    row(d.review, COLORS.review, 0.75, 1);
    row(d.prompts, COLORS.prompt, 0.75, 1);
    const [x, cw] = span(d.current);
    ctx.fillStyle = COLORS.cursor;
    ctx.fillRect(x + cw / 2 - dpr, 0, 2 * dpr, h);
  }
}
