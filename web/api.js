// The HTTP API, as a browser client uses it: the access key on every request, errors as
// ApiError (status + the server's `detail`), uploads with progress, job events (SSE) read
// with fetch() so that the Authorization header can be sent (EventSource cannot send it).

const KEY_STORAGE = "sam2.key";

/** An HTTP error from the server (or a network failure, status 0), in words a person reads. */
export class ApiError extends Error {
  constructor(status, statusText, code, detail, retryAfter) {
    super(detail || statusText || "request failed");
    this.status = status;
    this.code = code;
    this.detail = detail;
    this.retryAfter = retryAfter; // seconds, from the Retry-After header (409, 429, 503)
    this.statusText = statusText;
  }

  /** "HTTP 409 Conflict: the session is busy ... Retry in 3 s." */
  describe() {
    if (this.status === 0) return `Network error: ${this.detail}`;
    let text = `HTTP ${this.status}${this.statusText ? " " + this.statusText : ""}: ${this.message}`;
    if (this.retryAfter != null) text += ` Retry in ${this.retryAfter} s.`;
    return text;
  }
}

// Called on every 401, so the page can ask for a key (set by app.js).
let onUnauthorized = () => {};
export function setUnauthorizedHandler(fn) {
  onUnauthorized = fn;
}

export function getKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

function authHeaders(extra = {}) {
  const key = getKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

/** Turn a non-2xx response into an ApiError (the body is `{"error", "detail"}`). */
async function errorFrom(response) {
  let code = "";
  let detail = "";
  try {
    const body = await response.json();
    code = body.error || "";
    detail = body.detail || "";
  } catch {
    detail = `the server answered ${response.status} without an explanation`;
  }
  const retry = response.headers.get("Retry-After");
  const error = new ApiError(response.status, response.statusText, code, detail,
                             retry == null ? null : Number(retry));
  if (response.status === 401) onUnauthorized(error);
  return error;
}

/** fetch() with the key; network failures become ApiError(status 0). */
async function send(method, path, { json, signal, headers } = {}) {
  const init = { method, signal, headers: authHeaders(headers) };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "", "network", `could not reach the server (${err.message})`);
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

/** A JSON request: `await api("POST", "/annotate-frame/ID", {json: {...}})`. */
export async function api(method, path, options) {
  const response = await send(method, path, options);
  return response.status === 204 ? null : response.json();
}

/** A binary response (frames, masks, exports) as a Blob, plus the response's headers. */
export async function fetchBlob(path, options) {
  const response = await send("GET", path, options);
  return { blob: await response.blob(), headers: response.headers };
}

/** GET /health needs no key; it answers 503 (with a JSON body) while the model loads. */
export async function health() {
  try {
    const response = await fetch("/health");
    const body = await response.json();
    return { ok: response.ok, body, retryAfter: Number(response.headers.get("Retry-After")) || null };
  } catch (err) {
    throw new ApiError(0, "", "network", `could not reach the server (${err.message})`);
  }
}

/**
 * POST /upload-video with XMLHttpRequest, the only browser API that reports upload progress.
 * `fields` are extra multipart text fields (`fps` for a ZIP of frames).
 */
export function uploadVideo(file, fields, onProgress) {
  return new Promise((resolve, reject) => {
    const form = new FormData();
    for (const [name, value] of Object.entries(fields)) form.append(name, value);
    form.append("file", file, file.name);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/upload-video");
    const key = getKey();
    if (key) xhr.setRequestHeader("Authorization", `Bearer ${key}`);
    xhr.responseType = "json";
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded / e.total);
    xhr.onerror = () => reject(new ApiError(0, "", "network", "the upload was interrupted"));
    xhr.onload = () => {
      if (xhr.status >= 200 && xhr.status < 300) return resolve(xhr.response);
      const body = xhr.response || {};
      const retry = xhr.getResponseHeader("Retry-After");
      const error = new ApiError(xhr.status, xhr.statusText, body.error, body.detail,
                                 retry == null ? null : Number(retry));
      if (xhr.status === 401) onUnauthorized(error);
      reject(error);
    };
    xhr.send(form);
  });
}

/**
 * Follow a job: GET /jobs/{id}/events is a server-sent event stream of `progress` events and
 * one `end` event, each with the job as JSON. Calls onEvent(name, job) for each; resolves with
 * the final job. If the stream breaks before `end`, falls back to polling GET /jobs/{id}.
 */
export async function followJob(job, onEvent, signal) {
  const response = await send("GET", job.events_url, { signal, headers: { Accept: "text/event-stream" } });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n?/g, "\n");
      // Events are separated by a blank line; each has `event:` and `data:` lines.
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const event = parseEvent(block);
        if (!event) continue;
        onEvent(event.name, event.data);
        if (event.name === "end") return event.data;
      }
    }
  } catch (err) {
    if (err.name === "AbortError") throw err;
    // The stream broke (a proxy timeout, a network blip): the job goes on; poll it instead.
  } finally {
    reader.cancel().catch(() => {});
  }
  return pollJob(job.job_id, onEvent, signal);
}

function parseEvent(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue; // a comment (keep-alive)
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
  }
  return data.length ? { name, data: JSON.parse(data.join("\n")) } : null;
}

const FINISHED = new Set(["succeeded", "failed", "cancelled", "interrupted"]);

async function pollJob(jobId, onEvent, signal) {
  for (;;) {
    const job = await api("GET", `/jobs/${jobId}`, { signal });
    const finished = FINISHED.has(job.status);
    onEvent(finished ? "end" : "progress", job);
    if (finished) return job;
    await new Promise((resolve) => setTimeout(resolve, 1000));
    if (signal?.aborted) throw signal.reason;
  }
}
