// The frame and its masks, drawn on stacked canvases fitted to the available space at the
// video's aspect ratio; pointer and keyboard input on the frame become prompts in the video's
// pixel coordinates.
//
//   #frame-canvas  the JPEG frame, at the video's resolution (scaled by CSS)
//   #mask-canvas   the label map coloured per object, same resolution
//   #marks-canvas  points, boxes, the crosshair and the box being dragged, at screen resolution

const DRAG_THRESHOLD = 5; // screen pixels a press must move to become a box

export class Viewer {
  /** `onPrompt({kind: "point", x, y, label} | {kind: "box", box})`, in video pixels. */
  constructor(stage, onPrompt) {
    this.stage = stage;
    this.onPrompt = onPrompt;
    this.frameCanvas = stage.querySelector("#frame-canvas");
    this.maskCanvas = stage.querySelector("#mask-canvas");
    this.marks = stage.querySelector("#marks-canvas");
    this.frameCtx = this.frameCanvas.getContext("2d");
    this.maskCtx = this.maskCanvas.getContext("2d", { willReadFrequently: true });
    this.width = 0;
    this.height = 0;
    this.opacity = 0.5;
    this.labels = null; // the label map drawn now
    this.prompts = []; // [{color, active, points: [[x, y]], labels: [1|0], box}]
    this.crosshair = null; // [x, y] in video pixels
    this.keyboardMode = false; // the frame got the focus from the keyboard: the crosshair shows
    this.drag = null;
    new ResizeObserver(() => this.fit()).observe(stage.parentElement);
    this.bindPointer();
  }

  setVideo(width, height) {
    this.width = width;
    this.height = height;
    for (const canvas of [this.frameCanvas, this.maskCanvas]) {
      canvas.width = width;
      canvas.height = height;
    }
    this.crosshair = this.centre();
    this.labels = null;
    this.fit();
  }

  /** Size the stage to the largest rectangle of the video's aspect ratio that fits. */
  fit() {
    if (!this.width) return;
    const box = this.stage.parentElement.getBoundingClientRect();
    const scale = Math.min(box.width / this.width, box.height / this.height);
    const w = Math.max(1, Math.floor(this.width * scale));
    const h = Math.max(1, Math.floor(this.height * scale));
    this.stage.style.width = `${w}px`;
    this.stage.style.height = `${h}px`;
    const dpr = window.devicePixelRatio || 1;
    this.marks.width = Math.round(w * dpr);
    this.marks.height = Math.round(h * dpr);
    this.drawMarks();
  }

  centre() {
    return [Math.floor(this.width / 2), Math.floor(this.height / 2)];
  }

  drawFrame(bitmap) {
    this.frameCtx.drawImage(bitmap, 0, 0, this.width, this.height);
  }

  /**
   * Colour a label map: `colors` maps obj_id to "#rrggbb" for the objects to show (hidden ones
   * left out). Fill at the opacity slider's alpha, a one-pixel outline opaque. Returns the
   * number of pixels coloured.
   */
  drawMask(labels, colors) {
    this.labels = labels;
    this.colors = colors;
    const { width, height } = this;
    const image = this.maskCtx.createImageData(width, height);
    let count = 0;
    if (labels && labels.width === width && labels.height === height) {
      const fill = new Uint32Array(256);
      const edge = new Uint32Array(256);
      const shown = new Uint8Array(256);
      const alpha = Math.round(this.opacity * 255);
      for (const [id, hex] of colors) {
        const r = parseInt(hex.slice(1, 3), 16);
        const g = parseInt(hex.slice(3, 5), 16);
        const b = parseInt(hex.slice(5, 7), 16);
        // ImageData is RGBA in memory: on little-endian machines that is 0xAABBGGRR.
        fill[id] = ((alpha << 24) | (b << 16) | (g << 8) | r) >>> 0;
        edge[id] = ((255 << 24) | (b << 16) | (g << 8) | r) >>> 0;
        shown[id] = 1;
      }
      const out = new Uint32Array(image.data.buffer);
      const px = labels.labels;
      for (let y = 0, p = 0; y < height; y++) {
        for (let x = 0; x < width; x++, p++) {
          const id = px[p];
          if (!shown[id]) continue;
          const border = x === 0 || y === 0 || x === width - 1 || y === height - 1 ||
            px[p - 1] !== id || px[p + 1] !== id || px[p - width] !== id || px[p + width] !== id;
          out[p] = border ? edge[id] : fill[id];
          count++;
        }
      }
    }
    this.maskCtx.putImageData(image, 0, 0);
    return count;
  }

  setOpacity(value) {
    this.opacity = value;
    if (this.colors) this.drawMask(this.labels, this.colors);
  }

  /** Prompts to draw on this frame; see the constructor for their shape. */
  setPrompts(prompts) {
    this.prompts = prompts;
    this.drawMarks();
  }

  /** Screen (CSS) pixels per video pixel. */
  get scale() {
    return this.marks.clientWidth / this.width || 1;
  }

  toVideo(event) {
    const rect = this.marks.getBoundingClientRect();
    const s = rect.width / this.width;
    const clamp = (v, max) => Math.min(max - 1, Math.max(0, Math.floor(v))); // the pixel clicked
    return [clamp((event.clientX - rect.left) / s, this.width),
            clamp((event.clientY - rect.top) / s, this.height)];
  }

  drawMarks() {
    const ctx = this.marks.getContext("2d");
    const dpr = window.devicePixelRatio || 1;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, this.marks.width, this.marks.height);
    if (!this.width) return;
    const s = this.scale * dpr;
    ctx.setTransform(s, 0, 0, s, 0, 0);
    const unit = 1 / s; // one device pixel, in video pixels
    for (const p of this.prompts) {
      ctx.globalAlpha = p.active ? 1 : 0.55;
      if (p.box) {
        const [x0, y0, x1, y1] = p.box;
        ctx.lineWidth = 2 * dpr * unit;
        ctx.strokeStyle = p.color;
        ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
      }
      p.points.forEach(([x, y], k) => {
        ctx.beginPath();
        ctx.arc(x, y, 5 * dpr * unit, 0, 2 * Math.PI);
        ctx.fillStyle = p.labels[k] ? "#22c55e" : "#ef4444";
        ctx.fill();
        ctx.lineWidth = 1.5 * dpr * unit;
        ctx.strokeStyle = "#fff";
        ctx.stroke();
      });
    }
    ctx.globalAlpha = 1;
    if (this.drag?.moved) {
      const [x0, y0, x1, y1] = this.dragBox();
      ctx.setLineDash([6 * dpr * unit, 4 * dpr * unit]);
      ctx.lineWidth = 2 * dpr * unit;
      ctx.strokeStyle = "#fff";
      ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
      ctx.setLineDash([]);
    }
    if (this.crosshair && this.keyboardMode) {
      const [x, y] = this.crosshair;
      const r = 12 * dpr * unit;
      ctx.lineWidth = 2 * dpr * unit;
      ctx.strokeStyle = "#facc15";
      ctx.beginPath();
      ctx.moveTo(x - r, y); ctx.lineTo(x + r, y);
      ctx.moveTo(x, y - r); ctx.lineTo(x, y + r);
      ctx.stroke();
    }
  }

  dragBox(drag = this.drag) {
    const [ax, ay] = drag.from;
    const [bx, by] = drag.to;
    return [Math.min(ax, bx), Math.min(ay, by), Math.max(ax, bx), Math.max(ay, by)];
  }

  /** Left click: positive point; right or Alt+click: negative; left drag: a box. */
  bindPointer() {
    const m = this.marks;
    m.addEventListener("contextmenu", (e) => e.preventDefault());
    m.addEventListener("pointerdown", (e) => {
      if (e.button !== 0 && e.button !== 2) return;
      e.preventDefault();
      m.focus({ preventScroll: true });
      this.keyboardMode = false;
      m.setPointerCapture(e.pointerId);
      this.drag = { from: this.toVideo(e), to: this.toVideo(e), x: e.clientX, y: e.clientY,
                    button: e.button, alt: e.altKey, moved: false };
    });
    m.addEventListener("pointermove", (e) => {
      if (!this.drag) return;
      this.drag.to = this.toVideo(e);
      if (this.drag.button === 0 && !this.drag.alt &&
          Math.hypot(e.clientX - this.drag.x, e.clientY - this.drag.y) > DRAG_THRESHOLD) {
        this.drag.moved = true;
      }
      if (this.drag.moved) this.drawMarks();
    });
    m.addEventListener("pointerup", (e) => {
      const drag = this.drag;
      this.drag = null;
      if (!drag) return;
      if (drag.moved) {
        this.drawMarks();
        this.onPrompt({ kind: "box", box: this.dragBox(drag) });
      } else {
        const [x, y] = drag.from;
        this.crosshair = [x, y];
        this.onPrompt({ kind: "point", x, y, label: drag.button === 2 || drag.alt ? 0 : 1 });
      }
    });
    m.addEventListener("pointercancel", () => { this.drag = null; this.drawMarks(); });
    // Focus from Tab (not from a click) turns on the crosshair, moved by the arrow keys.
    m.addEventListener("focus", () => {
      this.keyboardMode = m.matches(":focus-visible");
      this.drawMarks();
    });
    m.addEventListener("blur", () => {
      this.keyboardMode = false;
      this.drawMarks();
    });
  }

  /**
   * Keys while the frame has the focus from the keyboard: arrows move the crosshair (Shift:
   * 10x further), Enter adds a positive point there, Shift+Enter or "-" a negative one, C
   * re-centres it. Returns true when it handled the key.
   */
  handleKey(e) {
    if (!this.crosshair || !this.keyboardMode) return false;
    const step = Math.max(1, Math.round(Math.min(this.width, this.height) / 50)) * (e.shiftKey ? 10 : 1);
    const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
    if (moves[e.key]) {
      const [dx, dy] = moves[e.key];
      const [x, y] = this.crosshair;
      this.crosshair = [Math.min(this.width - 1, Math.max(0, x + dx)),
                        Math.min(this.height - 1, Math.max(0, y + dy))];
      this.drawMarks();
      return true;
    }
    if (e.key === "Enter" || e.key === "-") {
      const [x, y] = this.crosshair;
      this.onPrompt({ kind: "point", x, y, label: e.key === "-" || e.shiftKey ? 0 : 1 });
      return true;
    }
    if (e.key === "c" || e.key === "C") {
      this.crosshair = this.centre();
      this.drawMarks();
      return true;
    }
    return false;
  }
}
