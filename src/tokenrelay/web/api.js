// The gateway's HTTP API, same origin. Adds the API key (if any) to every call and turns
// error responses into ApiError with the server's code, message and Retry-After.

const KEY_STORAGE = "tokenrelay.apiKey";

export class ApiError extends Error {
  constructor(status, code, message, retryable, retryAfter) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryable = retryable;
    this.retryAfter = retryAfter; // seconds, or null
  }
}

export class Api {
  constructor(onUnauthorized) {
    this.onUnauthorized = onUnauthorized;
  }

  get key() {
    try {
      return localStorage.getItem(KEY_STORAGE) || "";
    } catch {
      return "";
    }
  }

  set key(value) {
    try {
      if (value) localStorage.setItem(KEY_STORAGE, value);
      else localStorage.removeItem(KEY_STORAGE);
    } catch {
      // storage disabled: the key lives for this call only
    }
  }

  headers(extra) {
    const h = { Accept: "application/json", ...extra };
    const key = this.key;
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  /** fetch() an /api path; non-2xx becomes ApiError (401 also calls onUnauthorized). */
  async request(path, { method = "GET", body, headers, signal } = {}) {
    const init = { method, headers: this.headers(headers), signal, cache: "no-store" };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers["Content-Type"] = "application/json";
    }
    const response = await fetch(path, init);
    if (!response.ok) throw await toError(response, this.onUnauthorized);
    return response;
  }

  async json(path, options) {
    const response = await this.request(path, options);
    if (response.status === 204) return null;
    return response.json();
  }

  config() {
    return this.json("/api/config");
  }

  models() {
    return this.json("/api/models");
  }

  startChat(body, idempotencyKey, signal) {
    return this.request("/api/chat", {
      method: "POST",
      body,
      signal,
      headers: { Accept: "text/event-stream", "Idempotency-Key": idempotencyKey },
    });
  }

  streamEvents(streamId, afterSeq, signal) {
    return this.request(`/api/streams/${encodeURIComponent(streamId)}/events`, {
      signal,
      headers: { Accept: "text/event-stream", "Last-Event-ID": String(afterSeq) },
    });
  }

  streamInfo(streamId) {
    return this.json(`/api/streams/${encodeURIComponent(streamId)}`);
  }

  cancel(streamId) {
    return this.json(`/api/streams/${encodeURIComponent(streamId)}/cancel`, { method: "POST" });
  }

  /** The caller's conversations, newest first; `query` searches titles and message text. */
  conversations(query = "") {
    const q = query.trim();
    return this.json(q ? `/api/conversations?q=${encodeURIComponent(q)}` : "/api/conversations");
  }

  conversation(id) {
    return this.json(`/api/conversations/${encodeURIComponent(id)}`);
  }

  renameConversation(id, title) {
    return this.json(`/api/conversations/${encodeURIComponent(id)}`, { method: "PATCH", body: { title } });
  }

  /** Show the branch through `messageId` (a version of its turn); the conversation back. */
  switchVersion(id, messageId) {
    return this.json(`/api/conversations/${encodeURIComponent(id)}`, {
      method: "PATCH",
      body: { active_message_id: messageId },
    });
  }

  deleteConversation(id) {
    return this.json(`/api/conversations/${encodeURIComponent(id)}`, { method: "DELETE" });
  }
}

async function toError(response, onUnauthorized) {
  let code = "http_" + response.status;
  let message = `${response.status} ${response.statusText || "error"}`;
  let retryable = response.status >= 500 || response.status === 429;
  try {
    const data = await response.json();
    if (data && data.error) {
      code = data.error.code || code;
      message = data.error.message || message;
      if (typeof data.error.retryable === "boolean") retryable = data.error.retryable;
    }
  } catch {
    // not JSON: keep the status line
  }
  const header = response.headers.get("Retry-After");
  const retryAfter = header && /^\d+$/.test(header.trim()) ? Number(header) : null;
  if (response.status === 401 && onUnauthorized) onUnauthorized();
  return new ApiError(response.status, code, message, retryable, retryAfter);
}

/** A random id for Idempotency-Key (crypto.randomUUID needs a secure context). */
export function randomId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
