// The page: upload, view, prompt, propagate, export. It uses only the public HTTP API (see
// /docs); the comments name the routes. Modules: api.js (requests, keys, SSE), frames.js
// (decoded frames and masks, LRU), viewer.js (canvases, pointer), timeline.js (the strip).

import {
  ApiError, api, fetchBlob, followJob, getKey, health, setKey, setUnauthorizedHandler, uploadVideo,
} from "./api.js";
import { FrameStore } from "./frames.js";
import { Timeline } from "./timeline.js";
import { Viewer } from "./viewer.js";

const $ = (id) => document.getElementById(id);
const PREFETCH = 4; // frames ahead of the current one, decoded before they are needed
const PENDING_COLOR = "#9ca3af"; // an object not yet on the server has no colour yet

// ----------------------------------------------------------------------------- state
const state = {
  sessionId: null,
  video: null, // GET /session `video`: num_frames, width, height, fps...
  store: null, // FrameStore of this session
  frame: 0,
  objects: new Map(), // obj_id -> {id, color, pending}; pending = not on the server yet
  hidden: new Set(),
  active: null,
  prompts: new Map(), // obj_id -> Map(frame -> {points, labels, box}) = current_prompts
  undo: new Map(), // "obj:frame" -> earlier prompt records, for Ctrl+Z
  maskFrames: new Set(),
  scores: {}, // frame -> obj -> {object_score, iou, visible}
  propagations: [],
  live: new Set(), // frames the running propagation has written
  job: null, // the running propagation job
  jobAbort: null, // stops following it (on closing the session)
  playing: false,
  promptQueue: Promise.resolve(), // prompt requests go out one at a time, in click order
  inFlight: 0, // prompt requests not answered yet
};

const viewer = new Viewer($("stage"), (p) => run(() => addPrompt(p)));
const timeline = new Timeline($("strip"), (f) => seek(f));

// ----------------------------------------------------------------------------- messages
/** Show an error (or a note) until dismissed; errors from the API carry status and detail. */
function showMessage(text, kind = "error") {
  const box = document.createElement("div");
  box.className = `message ${kind}`;
  box.setAttribute("role", kind === "error" ? "alert" : "status");
  const span = document.createElement("span");
  span.textContent = text;
  const close = document.createElement("button");
  close.type = "button";
  close.textContent = "×";
  close.setAttribute("aria-label", "Dismiss");
  close.addEventListener("click", () => box.remove());
  box.append(span, close);
  const area = $("messages");
  area.append(box);
  while (area.children.length > 5) area.firstChild.remove();
  if (kind === "info") setTimeout(() => box.remove(), 8000);
}

function showError(err) {
  if (err?.name === "AbortError") return;
  showMessage(err instanceof ApiError ? err.describe() : `Error: ${err?.message || err}`);
}

/** Run an async action from an event handler; any failure is shown, never swallowed. */
function run(action) {
  return Promise.resolve().then(action).catch(showError);
}

window.addEventListener("unhandledrejection", (e) => showError(e.reason));

// ----------------------------------------------------------------------------- access keys
let keyDialogOpen = null;

/** Ask for the key (once, however many requests got a 401); resolves when it is entered. */
function askKey() {
  if (keyDialogOpen) return keyDialogOpen;
  const dialog = $("key-dialog");
  $("key-input").value = "";
  dialog.showModal();
  keyDialogOpen = new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      keyDialogOpen = null;
      if (dialog.returnValue === "ok" && $("key-input").value.trim()) {
        setKey($("key-input").value.trim());
        resolve(true);
      } else resolve(false);
    }, { once: true });
  });
  return keyDialogOpen;
}

setUnauthorizedHandler(() => {
  $("key-button").hidden = false;
  askKey().then((entered) => entered && run(loadAll));
});

// ----------------------------------------------------------------------------- start-up
async function start() {
  bindControls();
  const h = await health();
  showHealth(h);
  if (h.body.auth) {
    $("key-button").hidden = false;
    if (!getKey() && !(await askKey())) {
      showMessage("This server needs an access key: use the Access key button.", "info");
      return;
    }
  }
  await loadAll();
}

/** GET /health answers 503 while the model loads: say so, and look again until it is ready. */
function showHealth(h) {
  const { model, device, model_status: status } = h.body;
  $("server-status").textContent = h.ok ? `${model} on ${device}` : `model ${status}…`;
  if (h.ok) return;
  showMessage(`The server is not ready yet (${h.body.detail || h.body.model_status}); ` +
              `uploads and clicks wait for it. Checking again in ${h.retryAfter || 5} s.`, "info");
  setTimeout(() => run(async () => showHealth(await health())), (h.retryAfter || 5) * 1000);
}

/** Everything that needs the key: formats, recent sessions, the session in the URL. */
async function loadAll() {
  await loadFormats();
  await loadSessions();
  const id = new URLSearchParams(location.search).get("session");
  if (id && id !== state.sessionId) await openSession(id);
}

/** GET /export-formats: the menu is whatever the server offers. */
async function loadFormats() {
  const formats = await api("GET", "/export-formats");
  const select = $("export-format");
  select.replaceChildren(...formats.map((f) => {
    const option = new Option(`${f.name} (.${f.extension})`, f.name);
    option.title = f.description;
    return option;
  }));
  select.disabled = !state.sessionId;
}

// ----------------------------------------------------------------------------- sessions
/** GET /sessions: the caller's sessions, newest first. */
async function loadSessions() {
  const sessions = await api("GET", "/sessions");
  $("sessions").replaceChildren(...sessions.map(sessionRow));
  if (!sessions.length) {
    $("sessions").append(Object.assign(document.createElement("li"), { textContent: "none yet", className: "muted" }));
  }
}

function sessionRow(s) {
  const li = document.createElement("li");
  li.className = "session" + (s.session_id === state.sessionId ? " current" : "");
  li.dataset.session = s.session_id;
  const open = document.createElement("button");
  open.type = "button";
  open.className = "open";
  const when = s.created_at
    ? new Date(s.created_at * 1000).toLocaleString([], { dateStyle: "medium", timeStyle: "short" }) : "";
  const name = document.createElement("span");
  name.textContent = s.filename;
  const facts = document.createElement("small");
  facts.textContent = `${s.num_frames} frames · ${when}`;
  open.append(name, facts);
  open.title = `Open ${s.filename} (${s.session_id})`;
  open.addEventListener("click", () => run(() => openSession(s.session_id)));
  const del = document.createElement("button");
  del.type = "button";
  del.textContent = "Delete";
  del.setAttribute("aria-label", `Delete session ${s.filename}`);
  del.addEventListener("click", () => run(() => deleteSession(s)));
  li.append(open, del);
  return li;
}

async function deleteSession(s) {
  if (!confirm(`Delete ${s.filename} and all its masks and exports?`)) return;
  if (s.session_id === state.sessionId) closeSession(); // first: its requests in flight stop
  await api("DELETE", `/session/${s.session_id}`);
  await loadSessions();
}

/** Open a session by id: GET /session gives video, objects, prompts, masks, propagations. */
async function openSession(id, uploaded = null) {
  pause();
  const desc = uploaded ? null : await api("GET", `/session/${id}`);
  const video = desc ? desc.video : uploaded;
  closeSession();
  state.sessionId = id;
  state.video = video;
  state.store = new FrameStore(id, video);
  history.replaceState(null, "", `/?session=${encodeURIComponent(id)}`);
  const filename = desc ? desc.filename : uploaded.filename;
  $("session-title").textContent = `${filename} · ${video.width}×${video.height} · ` +
    `${video.num_frames} frames @ ${Number(video.fps.toFixed(3))} fps`;
  $("stage").hidden = false;
  $("dropzone").hidden = true;
  viewer.setVideo(video.width, video.height);
  const scrubber = $("scrubber");
  scrubber.max = video.num_frames - 1;
  $("export-start").value = 0;
  $("export-end").value = video.num_frames - 1;
  const controls = "#transport button, #scrubber, #add-object, [data-direction], #export-button, #export-format";
  for (const el of document.querySelectorAll(controls)) el.disabled = false;
  await seek(0); // frame 0 at once; later frames decode on the server meanwhile
  if (desc) applySession(desc);
  else await refreshSession();
  await loadSessions();
  resumeRunningJob();
}

function closeSession() {
  pause();
  state.jobAbort?.abort();
  state.store?.close();
  Object.assign(state, {
    sessionId: null, video: null, store: null, frame: 0, objects: new Map(), hidden: new Set(),
    active: null, prompts: new Map(), undo: new Map(), maskFrames: new Set(), scores: {},
    propagations: [], live: new Set(), job: null,
  });
  history.replaceState(null, "", "/");
  $("stage").hidden = true;
  $("dropzone").hidden = false;
  $("session-title").textContent = "";
  $("prop-status").hidden = true;
  $("export-result").textContent = "";
  renderObjects();
  renderHistory();
  updateTimeline();
}

/** GET /session again; the local prompts stay while prompt requests are still on their way. */
async function refreshSession(keepPrompts = state.inFlight > 0) {
  const id = state.sessionId;
  const desc = await api("GET", `/session/${id}`);
  if (id === state.sessionId) applySession(desc, keepPrompts);
}

/** Take the server's view of the session (keeping local-only pending objects). */
function applySession(desc, keepPrompts = false) {
  const objects = new Map();
  for (const o of desc.objects) objects.set(o.obj_id, { id: o.obj_id, color: o.color, pending: false });
  for (const [id, o] of state.objects) if (o.pending && !objects.has(id)) objects.set(id, o);
  state.objects = objects;
  if (!keepPrompts) state.prompts = new Map(Object.entries(desc.current_prompts).map(([obj, frames]) => [
    Number(obj), new Map(Object.entries(frames).map(([f, r]) => [Number(f), promptRecord(r)]))]));
  state.maskFrames = new Set(desc.mask_frames);
  state.scores = desc.scores;
  state.propagations = desc.propagations;
  if (!state.objects.has(state.active)) state.active = state.objects.keys().next().value ?? null;
  renderObjects();
  renderHistory();
  updateTimeline();
  redraw();
}

/** A copy of one object's prompts on one frame: {points: [[x, y]], labels: [1|0], box|null}. */
const promptRecord = (r) => ({
  points: r.points.map((p) => [...p]), labels: [...r.labels], box: r.box ? [...r.box] : null,
});

// ----------------------------------------------------------------------------- upload
/** POST /upload-video with a progress bar; a .zip of frames also sends its `fps`. */
async function upload(file) {
  const isZip = /\.zip$/i.test(file.name) || file.type === "application/zip";
  const fields = isZip ? { fps: $("zip-fps").value || "24" } : {};
  $("upload-status").hidden = false;
  $("upload-progress").value = 0;
  $("upload-text").textContent = `${file.name}: 0%`;
  try {
    const info = await uploadVideo(file, fields, (fraction) => {
      $("upload-progress").value = fraction;
      $("upload-text").textContent = `${file.name}: ${Math.round(fraction * 100)}%`;
    });
    $("upload-text").textContent = `${file.name}: uploaded, ${info.num_frames} frames`;
    await openSession(info.session_id, info);
  } catch (err) {
    $("upload-text").textContent = `${file.name}: failed`;
    throw err;
  }
}

// ----------------------------------------------------------------------------- viewing
/** Go to frame f: scrubber, label, strip, the drawing, and prefetch of the next frames. */
async function seek(f) {
  if (!state.video) return;
  f = Math.max(0, Math.min(state.video.num_frames - 1, f));
  state.frame = f;
  $("scrubber").value = f;
  $("frame-label").textContent = `Frame ${f} / ${state.video.num_frames - 1}`;
  timeline.update({ current: f });
  updateButtons();
  const drawing = redraw(); // asks for frame f first: the prefetch below never evicts it
  prefetch(f);
  await drawing;
}

/** Draw the current frame, its mask and prompts, once decoded; only the latest call draws. */
let drawSeq = 0;
async function redraw() {
  const { store, frame } = state;
  if (!store) return;
  const seq = ++drawSeq;
  const hasMask = state.maskFrames.has(frame);
  let bitmap, mask;
  try {
    [bitmap, mask] = await Promise.all([store.frame(frame), hasMask ? store.mask(frame) : null]);
  } catch (err) {
    if (store !== state.store) return; // that session was closed (or deleted) meanwhile
    throw err;
  }
  // A later redraw (another frame, a newer mask) or another session takes over.
  if (seq !== drawSeq || store !== state.store) return;
  viewer.drawFrame(bitmap);
  const pixels = viewer.drawMask(mask, visibleColors());
  viewer.setPrompts(promptsToDraw(frame));
  // State for tests: which frame is drawn and how many mask pixels it shows.
  const stage = $("stage");
  stage.dataset.frame = frame;
  stage.dataset.maskPixels = pixels;
}

function prefetch(f) {
  const { store } = state;
  const ahead = Math.min(state.playing ? PREFETCH * 2 : PREFETCH, Math.floor(store.capacity / 2) - 1);
  const last = Math.min(state.video.num_frames - 1, f + ahead);
  for (let i = f - 1; i <= last; i++) {
    if (i < 0 || i === f) continue;
    // A failed prefetch is dropped from the cache; showing that frame retries and reports it.
    store.frame(i).catch(() => {});
    if (state.maskFrames.has(i)) store.mask(i).catch(() => {});
  }
}

function visibleColors() {
  return [...state.objects.values()]
    .filter((o) => !o.pending && !state.hidden.has(o.id))
    .map((o) => [o.id, o.color]);
}

function promptsToDraw(frame) {
  const out = [];
  for (const [obj, frames] of state.prompts) {
    const rec = frames.get(frame);
    if (!rec || state.hidden.has(obj)) continue;
    out.push({ ...rec, color: state.objects.get(obj)?.color || PENDING_COLOR, active: obj === state.active });
  }
  return out;
}

const step = (n) => seek(state.frame + n);

// ----------------------------------------------------------------------------- playback
/** Play the masked preview at the video's fps; a frame not decoded yet is waited for. */
async function play() {
  if (!state.video || state.playing) return;
  if (state.frame >= state.video.num_frames - 1) await seek(0);
  state.playing = true;
  $("play-button").textContent = "Pause";
  const interval = 1000 / (state.video.fps || 25);
  let shownAt = performance.now();
  try {
    while (state.playing) {
      const next = state.frame + 1;
      if (next >= state.video.num_frames) break;
      await state.store.ready(next, state.maskFrames.has(next));
      const wait = interval - (performance.now() - shownAt);
      if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
      if (!state.playing) break;
      shownAt = performance.now();
      await seek(next);
    }
  } finally {
    pause();
  }
}

function pause() {
  state.playing = false;
  $("play-button").textContent = "Play";
}

// ----------------------------------------------------------------------------- objects
function objectFrameCount(id) {
  // Frames where the object has a score and is visible: the frames its mask is drawn on.
  let n = 0;
  for (const per of Object.values(state.scores)) if (per[id]?.visible) n++;
  return n;
}

function renderObjects() {
  const list = $("objects");
  list.replaceChildren(...[...state.objects.values()].map((o, k) => {
    const li = document.createElement("li");
    li.className = "object";
    li.classList.toggle("active", o.id === state.active);
    li.classList.toggle("hidden", state.hidden.has(o.id));
    li.dataset.obj = o.id;
    li.dataset.pending = o.pending;
    const pick = document.createElement("button");
    pick.type = "button";
    pick.className = "pick";
    pick.setAttribute("aria-pressed", String(o.id === state.active));
    pick.title = k < 9 ? `Make active (${k + 1})` : "Make active";
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = o.pending ? PENDING_COLOR : o.color;
    const name = document.createElement("span");
    name.textContent = `Object ${o.id}${o.pending ? " (new: click on the frame)" : ""}`;
    const count = document.createElement("span");
    count.className = "count";
    const n = objectFrameCount(o.id);
    count.textContent = o.pending ? "" : `${n} frame${n === 1 ? "" : "s"}`;
    pick.append(swatch, name, count);
    pick.addEventListener("click", () => selectObject(o.id));
    const eye = document.createElement("button");
    eye.type = "button";
    eye.className = "eye";
    eye.textContent = state.hidden.has(o.id) ? "Show" : "Hide";
    eye.setAttribute("aria-label", `${eye.textContent} object ${o.id}`);
    eye.addEventListener("click", () => toggleHidden(o.id));
    const del = document.createElement("button");
    del.type = "button";
    del.className = "remove";
    del.textContent = "×";
    del.setAttribute("aria-label", `Remove object ${o.id}`);
    del.addEventListener("click", () => run(() => removeObject(o.id)));
    li.append(pick, eye, del);
    return li;
  }));
  list.dataset.count = state.objects.size;
  updateButtons();
}

function selectObject(id) {
  if (!state.objects.has(id)) return;
  state.active = id;
  renderObjects();
  viewer.setPrompts(promptsToDraw(state.frame));
}

/** A new object with the next free id (1..255); it reaches the server with its first prompt. */
function addObject() {
  let id = 1;
  while (state.objects.has(id)) id++;
  if (id > 255) throw new Error("there can be at most 255 objects");
  state.objects.set(id, { id, color: PENDING_COLOR, pending: true });
  selectObject(id);
}

function toggleHidden(id) {
  if (state.hidden.has(id)) state.hidden.delete(id);
  else state.hidden.add(id);
  renderObjects();
  redraw().catch(showError);
}

/** DELETE /object/{id}/{obj}: its prompts go and its pixels leave every mask. */
async function removeObject(id) {
  const o = state.objects.get(id);
  if (!o) return;
  if (!o.pending) {
    if (!confirm(`Remove object ${id} from every frame?`)) return;
    await api("DELETE", `/object/${state.sessionId}/${id}`);
    state.store.dropMasks();
  }
  state.objects.delete(id);
  if (state.active === id) state.active = state.objects.keys().next().value ?? null;
  if (!o.pending) await refreshSession();
  else renderObjects();
}

// ----------------------------------------------------------------------------- prompts
const promptKey = (obj, frame) => `${obj}:${frame}`;

function currentRecord(obj, frame) {
  return state.prompts.get(obj)?.get(frame) || { points: [], labels: [], box: null };
}

/** A click, Enter or a dragged box on the frame: the active object's prompts on this frame grow. */
function addPrompt(p) {
  if (!state.sessionId) return;
  if (state.active == null) addObject();
  const obj = state.active;
  const frame = state.frame;
  const before = currentRecord(obj, frame);
  const after = promptRecord(before);
  if (p.kind === "box") after.box = p.box;
  else {
    after.points.push([p.x, p.y]);
    after.labels.push(p.label);
  }
  const key = promptKey(obj, frame);
  state.undo.set(key, [...(state.undo.get(key) || []), before]);
  return setPrompts(obj, frame, after);
}

/** Ctrl+Z: back to the prompts before the last click (or drop the last point, after a reload). */
function undo() {
  const obj = state.active;
  const frame = state.frame;
  const current = currentRecord(obj, frame);
  const stack = state.undo.get(promptKey(obj, frame)) || [];
  let previous = stack.pop();
  if (!previous) {
    if (!current.points.length && !current.box) return;
    previous = promptRecord(current);
    if (previous.points.length) {
      previous.points.pop();
      previous.labels.pop();
    } else previous.box = null;
  }
  return setPrompts(obj, frame, previous);
}

function clearFrame() {
  const obj = state.active;
  const current = currentRecord(obj, state.frame);
  if (!current.points.length && !current.box) return;
  state.undo.delete(promptKey(obj, state.frame));
  return setPrompts(obj, state.frame, { points: [], labels: [], box: null });
}

/**
 * Make the server's prompts of `obj` on `frame` equal `record`. POST /annotate-frame replaces
 * that object's prompts on that frame with the full list (refine-mask would append); an empty
 * list is POST /clear-prompts. The local copy changes at once and requests go out in order.
 */
function setPrompts(obj, frame, record) {
  const empty = !record.points.length && !record.box;
  const frames = state.prompts.get(obj) || new Map();
  if (empty) frames.delete(frame);
  else frames.set(frame, record);
  state.prompts.set(obj, frames);
  viewer.setPrompts(promptsToDraw(state.frame));
  updateTimeline();
  updateButtons();
  const { sessionId } = state;
  const send = async () => {
    if (sessionId !== state.sessionId) return;
    try {
      if (empty) await clearPrompts(obj, frame);
      else await annotate(obj, frame, record);
    } catch (err) {
      // The server did not take it: take its view again, so the page shows what it has.
      await refreshSession(false).catch(() => {});
      throw err;
    }
  };
  pendingPrompts(+1);
  const sent = state.promptQueue.then(send).finally(() => pendingPrompts(-1));
  state.promptQueue = sent.catch(() => {}); // the caller reports the failure; the queue goes on
  return sent;
}

/** Prompt requests not answered yet, on <body data-pending> (tests wait for 0). */
function pendingPrompts(delta) {
  state.inFlight += delta;
  document.body.dataset.pending = state.inFlight;
}

async function annotate(obj, frame, record) {
  const body = {
    frame_idx: frame, obj_id: obj,
    points: record.points.map(([x, y], k) => ({ x, y, label: record.labels[k] })),
  };
  if (record.box) body.box = record.box;
  const answer = await api("POST", `/annotate-frame/${state.sessionId}`, { json: body });
  // The answer has this frame's scores for every object; its mask is at answer.mask_url
  // (= /mask/{id}/{frame}), fetched again below.
  state.scores[frame] = answer.scores;
  state.maskFrames.add(frame);
  state.store.dropMask(frame);
  const known = answer.obj_ids.every((id) => state.objects.has(id) && !state.objects.get(id).pending);
  if (!known) await refreshSession(true); // a new object: the session has its colour
  else {
    renderObjects();
    updateTimeline();
  }
  if (frame === state.frame) await redraw();
}

/** POST /clear-prompts; clearing an object's last prompted frame removes the object. */
async function clearPrompts(obj, frame) {
  if (state.objects.get(obj)?.pending) return;
  const body = { frame_idx: frame, obj_id: obj };
  const answer = await api("POST", `/clear-prompts/${state.sessionId}`, { json: body });
  if (answer.object_removed) {
    state.objects.delete(obj);
    showMessage(`Object ${obj} had no other prompts and was removed.`, "info");
  }
  state.store.dropMasks(); // masks of several frames may have changed
  await refreshSession();
}

// ----------------------------------------------------------------------------- propagation
/** POST /propagate as a background job from the current frame; follow it live. */
async function propagate(direction) {
  const body = { start_frame: state.frame, direction, background: true };
  const limit = Number($("max-frames").value);
  if (limit > 0) body.max_frames = limit;
  const job = await api("POST", `/propagate/${state.sessionId}`, { json: body });
  await followPropagation(job);
}

/** After a reload: a propagation still running on the server is followed again. */
function resumeRunningJob() {
  const last = state.propagations.at(-1);
  if (last?.status === "running" && last.job_id) {
    run(() => followPropagation({ job_id: last.job_id, events_url: `/jobs/${last.job_id}/events`,
                                  cancel_url: `/jobs/${last.job_id}/cancel` }));
  }
}

async function followPropagation(job) {
  const { sessionId, store } = state;
  state.job = job;
  state.live = new Set();
  const abort = new AbortController();
  state.jobAbort = abort;
  $("prop-status").hidden = false;
  $("prop-status").dataset.job = job.job_id;
  $("prop-status").dataset.finished = ""; // set once the job ended and the page caught up
  $("prop-cancel").disabled = false;
  showProgress("prop", { done: 0, total: 0, status: "running" }, "frames");
  updateButtons();
  let last = null; // the previous progress event, to fill frames between two events
  const onEvent = (name, j) => {
    if (sessionId !== state.sessionId) return;
    showProgress("prop", j, "frames");
    if (j.frame_idx == null) return;
    // Events can coalesce: if the two last events are `done` apart, every frame between was written.
    const frames = [j.frame_idx];
    if (last && last.frame_idx != null && Math.abs(j.frame_idx - last.frame_idx) === j.done - last.done) {
      const dir = Math.sign(j.frame_idx - last.frame_idx);
      for (let f = last.frame_idx + dir; f !== j.frame_idx; f += dir) frames.push(f);
    }
    last = j;
    for (const f of frames) {
      state.live.add(f);
      state.maskFrames.add(f);
      store.dropMask(f);
    }
    updateTimeline();
    // The event can come before the frame's mask file is written (the server writes on
    // other threads): a current frame that showed no mask is asked again on the next event,
    // and every mask is read again when the job ends.
    const stale = state.live.has(state.frame) && !viewer.labels;
    if (stale) store.dropMask(state.frame);
    if (stale || frames.includes(state.frame)) redraw().catch(showError);
  };
  let final;
  try {
    final = await followJob(job, onEvent, abort.signal);
  } finally {
    if (state.job === job) state.job = null;
    updateButtons();
  }
  if (sessionId !== state.sessionId) return;
  $("prop-cancel").disabled = true;
  state.live = new Set();
  store.dropMasks();
  await refreshSession();
  $("prop-status").dataset.finished = final.status;
  if (final.status === "failed") showMessage(`Propagation failed: ${final.error || "no reason given"}`);
  else if (final.status !== "succeeded") {
    showMessage(`Propagation ${final.status}; the frames written so far keep their masks.`, "info");
  }
}

/** "7/12 frames · 4.1 fps · 1 s left" on a progress bar. */
function showProgress(prefix, job, unit) {
  const bar = $(`${prefix}-progress`);
  bar.max = Math.max(1, job.total);
  bar.value = job.done;
  let text = `${job.done}/${job.total || "?"} ${unit}`;
  if (job.fps) text += ` · ${job.fps.toFixed(1)} fps`;
  if (job.eta_s != null && job.status === "running") text += ` · ${Math.ceil(job.eta_s)} s left`;
  if (job.status !== "running") text += ` · ${job.status}`;
  $(`${prefix}-text`).textContent = text;
  bar.dataset.status = job.status;
}

/** POST /jobs/{job_id}/cancel: masks written so far stay. */
async function cancelJob() {
  if (!state.job) return;
  $("prop-cancel").disabled = true;
  await api("POST", state.job.cancel_url);
}

/**
 * Frames the latest propagation covered: its passes, from..to. A run that stopped early
 * (cancelled, interrupted, failed) ended its last pass at `last_frame`.
 */
function coveredFrames() {
  const covered = new Set();
  const run = state.propagations.at(-1);
  const passes = run?.passes || [];
  passes.forEach((pass, k) => {
    let to = pass.to;
    if (k === passes.length - 1 && run.status !== "done") to = run.last_frame;
    if (pass.from == null || to == null) return;
    const dir = to >= pass.from ? 1 : -1;
    if (dir !== Math.sign(pass.to - pass.from || 1)) return; // stopped before this pass began
    for (let f = pass.from; f !== to + dir; f += dir) covered.add(f);
  });
  return covered;
}

function renderHistory() {
  $("history").replaceChildren(...state.propagations.slice().reverse().map((p) => {
    const li = document.createElement("li");
    const passes = (p.passes || []).map((x) => `${x.direction} ${x.from}→${x.to}`).join(", ");
    const frames = p.frames != null ? ` · ${p.frames} frames` : "";
    li.textContent = `from ${p.start_frame}: ${passes || "…"}${frames} · ${p.status}`;
    return li;
  }));
  $("history").dataset.count = state.propagations.length;
}

// ----------------------------------------------------------------------------- export
/** POST /export as a job, follow its events, then download result.download_url as a Blob. */
async function exportVideo() {
  const body = { format: $("export-format").value };
  const start = $("export-start").value;
  const end = $("export-end").value;
  if (start !== "") body.start_frame = Number(start);
  if (end !== "") body.end_frame = Number(end);
  $("export-button").disabled = true;
  $("export-status").hidden = false;
  $("export-result").textContent = "";
  showProgress("export", { done: 0, total: 0, status: "running" }, "frames");
  try {
    const job = await api("POST", `/export/${state.sessionId}`, { json: body });
    const final = await followJob(job, (name, j) => showProgress("export", j, "frames"));
    if (final.status !== "succeeded") {
      throw new Error(`export ${final.status}: ${final.error || "no reason given"}`);
    }
    const { blob, headers } = await fetchBlob(final.result.download_url);
    const name = fileNameOf(headers) || final.result.file;
    saveBlob(blob, name);
  } finally {
    $("export-button").disabled = false;
  }
}

function fileNameOf(headers) {
  const match = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(headers.get("Content-Disposition") || "");
  return match ? decodeURIComponent(match[1]) : null;
}

/** Save through an <a download> on an object URL; the link stays for another download. */
function saveBlob(blob, name) {
  const result = $("export-result");
  const old = result.querySelector("a");
  if (old) URL.revokeObjectURL(old.href);
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  link.textContent = name;
  result.replaceChildren(link, ` (${formatBytes(blob.size)})`);
  link.click();
}

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

// ----------------------------------------------------------------------------- timeline, buttons
function updateTimeline() {
  const prompts = new Set();
  for (const frames of state.prompts.values()) for (const f of frames.keys()) prompts.add(f);
  const review = new Set();
  for (const [f, per] of Object.entries(state.scores)) {
    const doubtful = (s) => s.visible === false || (s.iou != null && s.iou < 0.5);
    if (Object.values(per).some(doubtful)) review.add(Number(f));
  }
  // The page's copy of current_prompts, in GET /session's shape (for tests and debugging).
  document.body.dataset.prompts = JSON.stringify(Object.fromEntries([...state.prompts]
    .filter(([, frames]) => frames.size)
    .map(([obj, frames]) => [obj, Object.fromEntries(frames)])));
  timeline.update({
    numFrames: state.video?.num_frames || 0, current: state.frame, masks: state.maskFrames,
    prompts, review,
    covered: state.job ? new Set() : coveredFrames(), // while a job runs, its frames show as `live`
    live: state.job ? state.live : new Set(),
  });
}

function updateButtons() {
  const open = !!state.sessionId;
  const rec = open && state.active != null ? currentRecord(state.active, state.frame) : null;
  const hasPrompt = !!rec && (rec.points.length > 0 || !!rec.box);
  $("undo-button").disabled = !hasPrompt;
  $("clear-frame").disabled = !hasPrompt;
  for (const b of document.querySelectorAll("[data-direction]")) b.disabled = !open || !!state.job;
}

// ----------------------------------------------------------------------------- input
function bindControls() {
  const input = $("file-input");
  $("open-button").addEventListener("click", () => input.click());
  input.addEventListener("change", () => {
    const file = input.files[0];
    input.value = "";
    if (file) run(() => upload(file));
  });
  bindDrop();
  $("play-button").addEventListener("click", () => (state.playing ? pause() : run(play)));
  $("prev-button").addEventListener("click", () => run(() => step(-1)));
  $("next-button").addEventListener("click", () => run(() => step(1)));
  $("scrubber").addEventListener("input", (e) => run(() => seek(Number(e.target.value))));
  $("opacity").addEventListener("input", (e) => viewer.setOpacity(Number(e.target.value)));
  $("add-object").addEventListener("click", () => run(addObject));
  $("undo-button").addEventListener("click", () => run(undo));
  $("clear-frame").addEventListener("click", () => run(clearFrame));
  for (const b of document.querySelectorAll("[data-direction]")) {
    b.addEventListener("click", () => run(() => propagate(b.dataset.direction)));
  }
  $("prop-cancel").addEventListener("click", () => run(cancelJob));
  $("export-button").addEventListener("click", () => run(exportVideo));
  $("refresh-sessions").addEventListener("click", () => run(loadSessions));
  $("key-button").addEventListener("click", () => askKey().then((ok) => ok && run(loadAll)));
  $("help-button").addEventListener("click", () => $("help-dialog").showModal());
  document.addEventListener("keydown", onKey);
}

function bindDrop() {
  let depth = 0;
  const hasFiles = (e) => [...(e.dataTransfer?.types || [])].includes("Files");
  // dragenter/dragleave fire for every child element: count them to know when the drag left.
  document.addEventListener("dragenter", (e) => {
    if (!hasFiles(e)) return;
    depth++;
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragleave", () => {
    if (--depth > 0) return;
    depth = 0;
    document.body.classList.remove("dragging");
  });
  document.addEventListener("dragover", (e) => hasFiles(e) && e.preventDefault());
  document.addEventListener("drop", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    depth = 0;
    document.body.classList.remove("dragging");
    const file = e.dataTransfer.files[0];
    if (file) run(() => upload(file));
  });
}

/** Keyboard shortcuts; the help dialog (?) lists them. */
function onKey(e) {
  if (document.querySelector("dialog[open]")) return;
  const target = e.target;
  const typing = target.matches?.("input:not([type=range]), select, textarea");
  if (typing) {
    if (e.key === "Escape") target.blur();
    return;
  }
  if ((e.ctrlKey || e.metaKey) && e.key.toLowerCase() === "z") {
    e.preventDefault();
    run(undo);
    return;
  }
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  if (e.key === "?") {
    e.preventDefault();
    $("help-dialog").showModal();
    return;
  }
  if (!state.sessionId) return;
  const onFrame = target === viewer.marks;
  if (onFrame && viewer.handleKey(e)) {
    e.preventDefault();
    return;
  }
  const n = e.shiftKey ? 10 : 1;
  const onRange = target.matches?.("input[type=range]");
  const actions = {
    BracketRight: () => step(n), BracketLeft: () => step(-n),
    Home: () => seek(0), End: () => seek(state.video.num_frames - 1),
  };
  if (!onRange) { // (on the frame, the crosshair took the arrows above when it shows)
    Object.assign(actions, {
      ArrowRight: () => step(n), ArrowLeft: () => step(-n), KeyD: () => step(n), KeyA: () => step(-n),
    });
  }
  if (!target.matches?.("button, a")) actions.Space = () => (state.playing ? pause() : play());
  if (/^Digit[1-9]$/.test(e.code)) {
    actions[e.code] = () => selectObject([...state.objects.keys()][Number(e.code.slice(5)) - 1]);
  }
  actions.KeyN = addObject;
  if (onFrame) actions.Escape = () => target.blur();
  if (onFrame && !viewer.keyboardMode) { // after a click on the frame, Enter shows the crosshair
    actions.Enter = () => {
      viewer.keyboardMode = true;
      viewer.drawMarks();
    };
  }
  const action = actions[e.code];
  if (action) {
    e.preventDefault();
    run(action);
  }
}

run(start);
