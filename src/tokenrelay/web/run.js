// One answer being streamed: start it, follow it, and never lose it.
//
// The run owns a plain message object (`msg`) and applies each SSE event to it exactly once
// (events carry increasing `id: <seq>`; anything at or below msg.last_seq is a duplicate).
// When the connection breaks it re-attaches with GET /api/streams/{id}/events and
// Last-Event-ID = msg.last_seq, with backoff, until a final `done` or `error` arrives.
// Because msg.content and msg.last_seq always change together, a snapshot of `msg` taken at
// any moment can resume after a page reload with no duplicated or missing text.
//
// With a SharedStreams (shared.js) the run follows its stream through the browser's one
// shared connection instead, and lets its own connection go once the worker has attached,
// so ten tabs streaming at once need two connections, not ten.

import { ApiError, randomId } from "./api.js";
import { readEvents } from "./sse.js";

const FINAL = new Set(["complete", "cancelled", "error", "interrupted"]);
const GIVE_UP_MS = 180000; // stop reconnecting after this long without any success
const POST_RETRIES = 4; // a rate-limited or unreachable POST is retried this often

export function isFinal(state) {
  return FINAL.has(state);
}

/** A fresh assistant message for a request. */
export function newAnswer(model) {
  return {
    role: "assistant",
    content: "",
    reasoning: "",
    tool_calls: [],
    state: "pending",
    model: model || "",
    stream_id: null,
    last_seq: 0,
    conn: "",
    retry: null,
    error: null,
    stats: null,
    usage: null,
    finish_reason: null,
    t0: Date.now(),
    text_at: null, // when text (content, reasoning or a tool call) last arrived
    alive_at: null, // when the connection last sent anything (heartbeats included)
    first_token_at: null,
    reasoning_start: null,
    reasoning_end: null,
    deltas: 0,
    idempotency_key: randomId(),
    request: null,
  };
}

function delay(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      window.removeEventListener("online", done);
      if (signal) signal.removeEventListener("abort", done);
      resolve();
    }
    window.addEventListener("online", done); // the network is back: try at once
    if (signal) signal.addEventListener("abort", done);
  });
}

function backoffMs(attempt) {
  const base = Math.min(5000, 250 * 2 ** attempt);
  return base / 2 + Math.random() * (base / 2);
}

export class AnswerRun {
  /**
   * @param api the Api
   * @param msg the assistant message (new, or a snapshot to resume)
   * @param hooks {onChange(msg), onStart(msg), onFinish(msg)}
   * @param stallMs abort a connection that sent no byte (not even a heartbeat) this long
   * @param shared a SharedStreams to follow the stream through, or null
   */
  constructor(api, msg, hooks, stallMs, shared = null) {
    this.api = api;
    this.msg = msg;
    this.hooks = hooks;
    this.stallMs = stallMs;
    this.shared = shared;
    this.sub = null;
    this.stopRequested = false;
    this.cancelSent = false;
    this.waiter = null;
    this.closed = false; // the tab is going away: do nothing more
    this.controller = null;
    this.onOffline = () => this.abortConnection();
  }

  get finished() {
    return isFinal(this.msg.state);
  }

  changed() {
    if (!this.closed) this.hooks.onChange(this.msg);
  }

  /** POST /api/chat and follow the answer. `request` is {messages, model, conversation_id?}. */
  async start(request) {
    this.msg.request = request;
    this.msg.state = "pending";
    this.changed();
    let response = null;
    for (let attempt = 0; !response; attempt++) {
      const controller = new AbortController();
      this.controller = controller;
      try {
        response = await this.api.startChat(request, this.msg.idempotency_key, controller.signal);
      } catch (err) {
        if (this.closed) return;
        if (this.stopRequested && !this.msg.stream_id) {
          return this.finish("cancelled");
        }
        const retryable = !(err instanceof ApiError) || (err.retryable && err.status !== 401);
        if (!retryable || attempt >= POST_RETRIES) {
          return this.fail(err);
        }
        const waitMs = err instanceof ApiError && err.retryAfter != null
          ? err.retryAfter * 1000 : backoffMs(attempt + 2);
        if (err instanceof ApiError) {
          this.msg.retry = {
            attempt: attempt + 1, max_attempts: POST_RETRIES + 1, wait_ms: waitMs,
            reason: err.status === 429 ? "rate_limited" : "server_error", status: err.status,
            until: Date.now() + waitMs,
          };
        } else {
          this.msg.conn = "reconnecting";
        }
        this.changed();
        this.waiter = new AbortController();
        await delay(waitMs, this.waiter.signal);
        if (this.stopRequested) return this.finish("cancelled");
      }
    }
    this.msg.retry = null;
    const streamId = response.headers.get("X-Stream-Id");
    if (streamId) this.msg.stream_id = streamId;
    this.msg.request = null; // the stream exists now: resume by id from here on
    if (this.msg.state === "pending") this.msg.state = "streaming";
    this.changed();
    if (this.stopRequested && this.msg.stream_id) this.sendCancel();
    await this.follow(response);
  }

  /** Re-attach to msg.stream_id after msg.last_seq (a reload, or an answer in progress). */
  async resume() {
    if (!this.msg.stream_id) {
      if (this.msg.request) return this.start(this.msg.request); // same Idempotency-Key
      return this.finish("interrupted", { code: "lost", message: "This answer was interrupted before it started.", retryable: true });
    }
    this.msg.state = "streaming";
    this.changed();
    await this.follow(null);
  }

  /** Read the stream, re-attaching after failures, until the answer is final. */
  async follow(response) {
    window.addEventListener("offline", this.onOffline);
    let attempt = 0;
    let lastSuccess = Date.now();
    try {
      while (!this.finished && !this.closed) {
        if (this.shared && this.msg.stream_id) {
          const followed = await this.followShared(response);
          response = null;
          if (!followed) this.shared = null; // the worker cannot: follow directly from here on
          continue;
        }
        if (!response) {
          if (!navigator.onLine) {
            this.setConn("reconnecting");
            await delay(GIVE_UP_MS);
            continue;
          }
          const controller = new AbortController();
          this.controller = controller;
          try {
            response = await this.api.streamEvents(this.msg.stream_id, this.msg.last_seq, controller.signal);
          } catch (err) {
            if (this.closed) return;
            if (err instanceof ApiError && (err.status === 404 || !err.retryable)) {
              return this.finish("interrupted", {
                code: err.code,
                message: err.status === 404
                  ? "The server no longer has this answer, so it cannot be resumed."
                  : err.message,
                retryable: true,
              });
            }
            if (Date.now() - lastSuccess > GIVE_UP_MS) {
              return this.finish("interrupted", { code: "network", message: "Lost the connection to the server.", retryable: true });
            }
            this.setConn("reconnecting");
            await delay(backoffMs(attempt++));
            continue;
          }
          if (this.msg.conn === "reconnecting") this.setConn("resumed");
        }
        try {
          await this.read(response);
          lastSuccess = Date.now();
        } catch {
          // a network error or our stall watchdog: re-attach below
        }
        response = null;
        if (this.finished || this.closed) break;
        this.setConn("reconnecting");
        await delay(backoffMs(attempt++));
        if (this.stopRequested && !this.cancelSent && this.msg.stream_id) this.sendCancel();
      }
    } finally {
      window.removeEventListener("offline", this.onOffline);
      this.controller = null;
    }
  }

  /**
   * Follow the stream through the shared worker until the answer is final (true), or the
   * worker cannot (false). Until the worker has attached, `response` (the POST's) is read
   * too; events carry seqs, so whichever delivers one first wins and none is applied twice.
   */
  followShared(response) {
    return new Promise((resolve) => {
      const own = response ? this.controller : null;
      let settled = false;
      let sub = null;
      // The tab's own network signals: the shared connection goes over the same network.
      const offline = () => this.setConn("reconnecting");
      const online = () => this.shared.reconnect();
      window.addEventListener("offline", offline);
      window.addEventListener("online", online);
      const end = (followed) => {
        if (settled) return;
        settled = true;
        window.removeEventListener("offline", offline);
        window.removeEventListener("online", online);
        if (sub) sub.close();
        this.sub = null;
        resolve(followed);
      };
      sub = this.shared.follow(this.msg.stream_id, this.msg.last_seq, this.api.key, this.stallMs, {
        attached: () => {
          if (own) own.abort(); // the worker has it: free this tab's connection
          if (this.msg.conn === "reconnecting") this.setConn("resumed");
        },
        event: (m) => {
          this.apply(m.event);
          if (this.finished) end(true);
        },
        alive: () => {
          this.msg.alive_at = Date.now();
        },
        reconnecting: () => this.setConn("reconnecting"),
        gone: () => {
          this.finish("interrupted", {
            code: "stream_not_found", retryable: true,
            message: "The server no longer has this answer, so it cannot be resumed.",
          });
          end(true);
        },
        failed: () => end(false),
      });
      this.sub = { close: () => end(true) };
      if (this.finished || this.closed) return end(true);
      if (own && this.shared.releaseEarly) {
        // The server keeps an answer nobody follows for its grace period, far longer than
        // the worker takes to attach: let this connection go now. Held until the worker
        // attaches, it could be one of six that the worker's own request waits behind.
        own.abort();
      } else if (response) {
        readEvents(response, (ev) => this.apply(ev), () => {
          this.msg.alive_at = Date.now();
        }).then(() => this.finished && end(true), () => {});
      }
    });
  }

  /** Read one response to its end, feeding events; a silent connection is aborted. */
  async read(response) {
    const controller = this.controller;
    let timer = null;
    const arm = () => {
      this.msg.alive_at = Date.now(); // a heartbeat: the model is still being waited for
      clearTimeout(timer);
      timer = setTimeout(() => controller && controller.abort(), this.stallMs);
    };
    arm();
    try {
      await readEvents(response, (ev) => this.apply(ev), arm);
    } finally {
      clearTimeout(timer);
    }
  }

  setConn(state) {
    if (this.msg.conn !== state) {
      this.msg.conn = state;
      this.changed();
    }
  }

  abortConnection() {
    if (this.controller) this.controller.abort();
  }

  /** Apply one SSE event to msg exactly once. */
  apply(ev) {
    if (this.finished) return;
    if (ev.id !== null) {
      const seq = Number(ev.id);
      if (Number.isFinite(seq)) {
        if (seq <= this.msg.last_seq) return; // already applied (a replay overlap)
        this.msg.last_seq = seq;
      }
    }
    let data;
    try {
      data = JSON.parse(ev.data);
    } catch {
      return;
    }
    const msg = this.msg;
    switch (ev.event) {
      case "message":
        if (typeof data.content === "string") {
          if (msg.first_token_at === null) msg.first_token_at = Date.now();
          if (msg.reasoning_start !== null && msg.reasoning_end === null) msg.reasoning_end = Date.now();
          msg.content += data.content;
          msg.deltas += 1;
          msg.text_at = Date.now();
          msg.retry = null;
        }
        break;
      case "start":
        if (data.stream_id) msg.stream_id = data.stream_id;
        if (data.model) msg.model = data.model;
        if (data.message_id) msg.message_id = data.message_id;
        msg.state = "streaming";
        if (data.conversation_id && this.hooks.onStart) this.hooks.onStart(msg, data.conversation_id);
        if (this.stopRequested && !this.cancelSent) this.sendCancel();
        break;
      case "reasoning":
        if (typeof data.reasoning === "string") {
          if (msg.reasoning_start === null) msg.reasoning_start = Date.now();
          msg.reasoning += data.reasoning;
          msg.text_at = Date.now();
          msg.retry = null;
        }
        break;
      case "tool_call":
        applyToolCall(msg, data);
        msg.text_at = Date.now();
        msg.retry = null;
        break;
      case "retry":
        msg.retry = { ...data, until: Date.now() + (Number(data.wait_ms) || 0) };
        break;
      case "done":
        msg.finish_reason = data.finish_reason || null;
        if (data.model) msg.model = data.model;
        msg.usage = data.usage || null;
        msg.stats = data.stats || null;
        return this.finish(data.state === "cancelled" ? "cancelled" : "complete");
      case "error":
        return this.finish(data.state === "interrupted" ? "interrupted" : "error", data.error || {
          code: "error", message: "The answer failed.", retryable: true,
        });
      default:
        return;
    }
    this.changed();
  }

  finish(state, error) {
    const msg = this.msg;
    msg.state = state;
    msg.retry = null;
    if (error) msg.error = error;
    if (msg.reasoning_start !== null && msg.reasoning_end === null) msg.reasoning_end = Date.now();
    if (msg.conn === "reconnecting") msg.conn = "";
    msg.request = null;
    this.abortConnection();
    this.changed();
    if (this.hooks.onFinish) this.hooks.onFinish(msg);
  }

  fail(err) {
    const error = err instanceof ApiError
      ? { code: err.code, message: err.message, retryable: err.retryable }
      : { code: "network", message: "Could not reach the server. Check your connection.", retryable: true };
    this.finish("error", error);
  }

  /** Stop: ask the server to cancel; the stream then ends with done(cancelled). */
  stop() {
    if (this.finished || this.stopRequested) return;
    this.stopRequested = true;
    this.msg.stopping = true;
    this.changed();
    if (this.msg.stream_id) this.sendCancel();
    else if (this.waiter) this.waiter.abort(); // waiting out a 429 before the stream exists
  }

  async sendCancel() {
    try {
      await this.api.cancel(this.msg.stream_id);
      this.cancelSent = true;
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) this.finish("cancelled");
      // otherwise (network) the follow loop sends it again after re-attaching
    }
  }

  /** The tab is unloading: drop the connection without touching msg. */
  close() {
    this.closed = true;
    if (this.sub) this.sub.close();
    this.abortConnection();
  }
}

function applyToolCall(msg, data) {
  const index = Number(data.index) || 0;
  let call = msg.tool_calls.find((c) => c.index === index);
  if (!call) {
    call = { index, id: null, name: "", arguments: "" };
    msg.tool_calls.push(call);
    msg.tool_calls.sort((a, b) => a.index - b.index);
  }
  if (data.id) call.id = data.id;
  if (data.name) call.name = data.name;
  if (typeof data.arguments === "string") call.arguments += data.arguments;
}
