// DOM views of messages. A view reads its message object and syncs the DOM to it; updates
// are coalesced to one per animation frame (a timer when the tab is hidden, where frames
// do not run), so a burst of tokens costs one render.

import { MarkdownView } from "./markdown.js";
import { isFinal } from "./run.js";

const BADGES = { cancelled: "stopped", error: "error", interrupted: "interrupted" };

/** Why the gateway is waiting before it retries, in words. */
function retryReason(retry) {
  const reason = String(retry.reason || "");
  if (retry.status === 429 || reason.includes("rate_limited")) return "Rate limited";
  if (reason === "fallback") return retry.next_model ? `Switching to ${retry.next_model}` : "Trying another model";
  if (reason.includes("timeout")) return "The model timed out";
  if (reason.includes("connect")) return "Cannot reach the model";
  if (retry.status >= 500 || reason.includes("server")) return "The model's server had an error";
  return "The model is unavailable";
}

export function nextFrame(fn) {
  if (document.hidden) setTimeout(fn, 100);
  else requestAnimationFrame(fn);
}

function setText(el, text) {
  if (el.textContent !== text) el.textContent = text;
}

function show(el, visible) {
  if (el.hidden === visible) el.hidden = !visible;
}

function seconds(ms) {
  return (Math.max(0, ms) / 1000).toFixed(1);
}

function prettyArgs(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text; // still streaming, or not JSON
  }
}

// Silence shorter than this is the normal rhythm of a stream: only the dots show.
export const WAITING_AFTER_MS = 1000;

/**
 * How long the answer has been waiting for the model (ms), or null when it is not: no
 * text for WAITING_AFTER_MS while the stream is live — before the first token, during
 * hidden reasoning, or a stall mid-answer. A retry countdown speaks for itself instead.
 */
export function waitingMs(msg, now = Date.now()) {
  if (isFinal(msg.state) || msg.retry || msg.stopping || msg.conn === "reconnecting") return null;
  const since = now - (msg.text_at || msg.t0 || now);
  return since >= WAITING_AFTER_MS ? since : null;
}

/** Estimated completion tokens while streaming (about 4 characters a token). */
function estimateTokens(msg) {
  return Math.max(msg.deltas || 0, Math.round((msg.content.length + msg.reasoning.length) / 4));
}

/**
 * Which version of its turn a message is: {version (1-based), versions}. From the server
 * (version, versions) or, in browser-local history, from the message's `variants` (the
 * other branches of that turn, with null in the slot of the one shown).
 */
export function versionOf(msg) {
  if (Array.isArray(msg.variants) && msg.variants.length > 1) {
    return { version: msg.variants.indexOf(null) + 1, versions: msg.variants.length };
  }
  return { version: msg.version || 1, versions: msg.versions || 1 };
}

/** The "‹ 2 / 3 ›" control of a message with versions (buttons disabled at the ends). */
class Versions {
  constructor(el) {
    this.el = el.querySelector(".versions");
    this.prev = this.el.querySelector(".ver-prev");
    this.next = this.el.querySelector(".ver-next");
    this.label = this.el.querySelector(".ver-label");
  }

  render(msg, locked) {
    const { version, versions } = versionOf(msg);
    show(this.el, versions > 1);
    if (versions <= 1) return;
    setText(this.label, `${version} / ${versions}`);
    this.el.setAttribute("aria-label", `Version ${version} of ${versions}`);
    this.prev.disabled = locked || version <= 1;
    this.next.disabled = locked || version >= versions;
  }
}

export class UserView {
  constructor(msg) {
    this.msg = msg;
    this.el = document.getElementById("tpl-user").content.firstElementChild.cloneNode(true);
    this.el.tokenrelay = msg;
    this.bubble = this.el.querySelector(".bubble");
    this.editBtn = this.el.querySelector(".edit-btn");
    this.versions = new Versions(this.el);
    this.bubble.textContent = msg.content;
    this.versions.render(msg, false);
  }

  setEditable(editable) {
    show(this.editBtn, editable);
  }

  /** `locked` while an answer streams: switching versions then would pull the rug. */
  renderVersions(locked) {
    this.versions.render(this.msg, locked);
  }
}

export class AssistantView {
  constructor(msg, renderer, simulated) {
    this.msg = msg;
    this.simulated = simulated; // (model id) => bool
    const el = document.getElementById("tpl-assistant").content.firstElementChild.cloneNode(true);
    this.el = el;
    el.tokenrelay = msg;
    const q = (s) => el.querySelector(s);
    this.modelChip = q(".model-chip");
    this.badge = q(".badge");
    this.conn = q(".conn");
    this.thinking = q(".thinking");
    this.thinkingLabel = q(".thinking-label");
    this.thinkingBody = q(".thinking-body");
    this.tools = q(".tools");
    this.notice = q(".notice");
    this.typing = q(".typing");
    this.waiting = q(".waiting");
    this.error = q(".msg-error");
    this.errorText = q(".msg-error-text");
    this.stats = q(".stats");
    this.copyBtn = q(".copy-btn");
    this.regenBtn = q(".regen-btn");
    this.versions = new Versions(el);
    this.versionsLocked = false;
    this.md = new MarkdownView(renderer, q(".md"));
    this.pending = false;
    this.toolsKey = "";
    this.statsKey = "";
    this.userToggledThinking = false;
    this.wasThinking = false;
    q(".thinking summary").addEventListener("click", () => {
      this.userToggledThinking = true;
    });
    this.canRegenerate = false;
    this.afterRender = null;
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    nextFrame(() => {
      this.pending = false;
      this.render();
    });
  }

  render() {
    const msg = this.msg;
    const final = isFinal(msg.state);
    const live = !final;
    const el = this.el;
    if (el.dataset.state !== msg.state) el.dataset.state = msg.state;
    el.setAttribute("aria-busy", live ? "true" : "false");

    setText(this.modelChip, msg.model ? msg.model + (this.simulated(msg.model) ? " · simulated" : "") : "");
    show(this.modelChip, Boolean(msg.model));

    const badge = msg.stopping && live ? "stopping…" : BADGES[msg.state] || "";
    setText(this.badge, badge);
    this.badge.dataset.kind = msg.stopping && live ? "stopping" : msg.state;
    show(this.badge, Boolean(badge));

    const conn = msg.conn === "reconnecting" ? "reconnecting…" : msg.conn === "resumed" ? "resumed" : "";
    setText(this.conn, conn);
    this.conn.dataset.kind = msg.conn || "";
    show(this.conn, Boolean(conn));

    this.renderThinking(live);
    this.renderTools();
    this.renderNotice(live);

    this.md.render(msg.content, final);
    this.renderWaiting(live);

    const err = (msg.state === "error" || msg.state === "interrupted") && msg.error;
    if (err) {
      const text = String(err.message || "Something went wrong.");
      setText(this.errorText, text.charAt(0).toUpperCase() + text.slice(1));
    }
    show(this.error, Boolean(err));

    this.renderStats(final);
    show(this.copyBtn, final && Boolean(msg.content));
    show(this.regenBtn, final && this.canRegenerate && !err);
    this.versions.render(msg, this.versionsLocked);
    if (this.afterRender) this.afterRender(this);
  }

  renderVersions(locked) {
    this.versionsLocked = locked;
    this.versions.render(this.msg, locked);
  }

  /** The dots before any text, and "waiting for the model · 12 s" through any long silence. */
  renderWaiting(live) {
    const msg = this.msg;
    const waited = live ? waitingMs(msg) : null;
    const empty = !msg.content && !msg.reasoning && !msg.tool_calls.length;
    show(this.typing, live && !msg.retry && (empty || waited !== null));
    let text = "";
    if (waited !== null) {
      text = `waiting for the model · ${Math.floor(waited / 1000)} s`;
      const beat = msg.alive_at ? Math.round((Date.now() - msg.alive_at) / 1000) : null;
      this.waiting.title = beat === null ? "" : `The connection is alive (last sign of life ${beat} s ago)`;
    }
    setText(this.waiting, text);
    show(this.waiting, Boolean(text));
  }

  renderThinking(live) {
    const msg = this.msg;
    show(this.thinking, Boolean(msg.reasoning));
    if (!msg.reasoning) return;
    const thinking = live && msg.reasoning_end === null;
    const start = msg.reasoning_start;
    const end = msg.reasoning_end ?? Date.now();
    const secs = start !== null ? ` (${seconds(end - start)} s)` : "";
    const label = thinking ? `Thinking…${secs}`
      : start !== null ? `Thought for ${seconds(end - start)} s` : "Thought process";
    setText(this.thinkingLabel, label);
    this.thinking.classList.toggle("is-thinking", thinking);
    if (!this.userToggledThinking) {
      if (thinking && !this.thinking.open) this.thinking.open = true;
      if (!thinking && this.wasThinking && this.thinking.open) this.thinking.open = false;
    }
    this.wasThinking = thinking;
    setText(this.thinkingBody, msg.reasoning);
  }

  renderTools() {
    const calls = this.msg.tool_calls;
    const key = calls.map((c) => `${c.index}:${c.name}:${c.arguments.length}`).join("|");
    if (key === this.toolsKey) return;
    this.toolsKey = key;
    show(this.tools, calls.length > 0);
    const nodes = calls.map((call) => {
      const box = document.createElement("div");
      box.className = "tool-call";
      const head = document.createElement("div");
      head.className = "tool-head";
      const label = document.createElement("span");
      label.className = "tool-label";
      label.textContent = "Tool call";
      const name = document.createElement("code");
      name.className = "tool-name";
      name.textContent = call.name || "…";
      head.append(label, name);
      const args = document.createElement("pre");
      args.className = "tool-args";
      args.textContent = prettyArgs(call.arguments) || "{}";
      box.append(head, args);
      return box;
    });
    this.tools.replaceChildren(...nodes);
  }

  renderNotice(live) {
    const retry = live ? this.msg.retry : null;
    if (!retry) {
      show(this.notice, false);
      return;
    }
    const left = Math.max(0, Math.ceil((retry.until - Date.now()) / 1000));
    const reason = retryReason(retry);
    const status = retry.status && retry.status !== 429 ? ` (${retry.status})` : "";
    const attempt = retry.attempt && retry.max_attempts ? ` · attempt ${retry.attempt} of ${retry.max_attempts}` : "";
    const text = left > 0 ? `${reason}${status} — retrying in ${left} s${attempt}` : `${reason}${status} — retrying now${attempt}`;
    setText(this.notice, text);
    show(this.notice, true);
  }

  renderStats(final) {
    const msg = this.msg;
    const items = [];
    const st = msg.stats || {};
    let ttft = null;
    if (final && typeof st.ttft_ms === "number") ttft = st.ttft_ms;
    else if (msg.first_token_at && msg.t0) ttft = msg.first_token_at - msg.t0;
    if (ttft !== null) items.push(["Time to first token", "TTFT", ttft < 1000 ? `${Math.round(ttft)} ms` : `${seconds(ttft)} s`]);

    let tokens = null;
    let estimated = true;
    if (final && msg.usage && typeof msg.usage.completion_tokens === "number") {
      tokens = msg.usage.completion_tokens;
      estimated = Boolean(msg.usage.estimated);
    } else if (final && typeof st.tokens === "number") {
      tokens = st.tokens;
    } else if (msg.content || msg.reasoning) {
      tokens = estimateTokens(msg);
    }
    let rate = null;
    if (final && typeof st.tokens_per_s === "number") rate = st.tokens_per_s;
    else if (!final && msg.first_token_at && tokens) {
      // While waiting for the model the speed holds at what it was when text last came.
      const until = waitingMs(msg) !== null && msg.text_at ? msg.text_at : Date.now();
      const elapsed = (until - msg.first_token_at) / 1000;
      if (elapsed > 0.25) rate = tokens / elapsed;
    }
    if (rate !== null && rate > 0) items.push(["Tokens per second", "Speed", `${rate.toFixed(1)} tok/s`]);
    if (tokens !== null) items.push(["Completion tokens", "Tokens", `${estimated ? "≈" : ""}${tokens}`]);
    if (final && msg.finish_reason === "length") items.push(["Finish reason", "Finish", "length limit"]);
    const key = items.map((i) => i[2]).join("|");
    if (key === this.statsKey) return;
    this.statsKey = key;
    const nodes = [];
    for (const [title, label, value] of items) {
      const wrap = document.createElement("div");
      wrap.className = "stat";
      wrap.title = title;
      const dt = document.createElement("dt");
      dt.textContent = label;
      const dd = document.createElement("dd");
      dd.textContent = value;
      wrap.append(dt, dd);
      nodes.push(wrap);
    }
    this.stats.replaceChildren(...nodes);
  }
}
