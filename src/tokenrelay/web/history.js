// Conversation history: the server's /api/conversations when it exists, else localStorage.
//
// Both stores speak one small interface so the sidebar does not care which it has:
// list(query), get(id), save(conv), rename(id, title), remove(id); `server` says whether
// /api/chat records messages itself (then conversation_id is sent with each request).

import { ApiError } from "./api.js";

const INDEX_KEY = "tokenrelay.conversations";
const CONV_PREFIX = "tokenrelay.conv.";
const MAX_LOCAL = 100;

export function newConversationId() {
  const bytes = crypto.getRandomValues(new Uint8Array(9));
  return "local-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function readJSON(key, fallback) {
  try {
    const raw = localStorage.getItem(key);
    return raw ? JSON.parse(raw) : fallback;
  } catch {
    return fallback;
  }
}

function writeJSON(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
    return true;
  } catch {
    return false; // full or disabled: history is a convenience, not a requirement
  }
}

/** Conversations kept in this browser (when the server has no history API). */
export class LocalHistory {
  constructor() {
    this.server = false;
  }

  /** Newest first; a `query` keeps those whose title or message text contains it. */
  async list(query = "") {
    const index = readJSON(INDEX_KEY, []);
    index.sort((a, b) => (b.updated_at || 0) - (a.updated_at || 0));
    const q = query.trim().toLowerCase();
    if (!q) return index;
    return index.filter((c) => {
      if ((c.title || "").toLowerCase().includes(q)) return true;
      const conv = readJSON(CONV_PREFIX + c.id, null);
      return Boolean(conv && conv.messages.some((m) => (m.content || "").toLowerCase().includes(q)));
    });
  }

  async get(id) {
    return readJSON(CONV_PREFIX + id, null);
  }

  async save(conv) {
    if (!conv.messages.length) return;
    conv.updated_at = Date.now();
    const stored = { ...conv, messages: conv.messages.map(storable) };
    writeJSON(CONV_PREFIX + conv.id, stored);
    let index = readJSON(INDEX_KEY, []).filter((c) => c.id !== conv.id);
    index.unshift({ id: conv.id, title: conv.title, created_at: conv.created_at, updated_at: conv.updated_at });
    for (const old of index.slice(MAX_LOCAL)) localStorage.removeItem(CONV_PREFIX + old.id);
    index = index.slice(0, MAX_LOCAL);
    writeJSON(INDEX_KEY, index);
  }

  async rename(id, title) {
    const conv = readJSON(CONV_PREFIX + id, null);
    if (conv) {
      conv.title = title;
      writeJSON(CONV_PREFIX + id, conv);
    }
    writeJSON(INDEX_KEY, readJSON(INDEX_KEY, []).map((c) => (c.id === id ? { ...c, title } : c)));
  }

  async remove(id) {
    try {
      localStorage.removeItem(CONV_PREFIX + id);
    } catch {
      // ignore
    }
    writeJSON(INDEX_KEY, readJSON(INDEX_KEY, []).filter((c) => c.id !== id));
  }
}

/** Conversations stored by the gateway (GET/PATCH/DELETE /api/conversations...). */
export class ServerHistory {
  constructor(api) {
    this.api = api;
    this.server = true;
  }

  async list(query = "") {
    const data = await this.api.conversations(query);
    return (data && data.conversations) || [];
  }

  async get(id) {
    try {
      return fromServerConversation(await this.api.conversation(id));
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) return null;
      throw err;
    }
  }

  /** Show another version of a turn: the branch through `messageId`. */
  async switchVersion(conv, msg, delta) {
    const ids = Array.isArray(msg.sibling_ids) ? msg.sibling_ids : [];
    const target = ids[(msg.version || 1) - 1 + delta];
    if (!target || !conv.id) return null;
    return fromServerConversation(await this.api.switchVersion(conv.id, target));
  }

  async save() {
    // the gateway records each request and answer itself
  }

  async rename(id, title) {
    await this.api.renameConversation(id, title);
  }

  async remove(id) {
    await this.api.deleteConversation(id);
  }
}

/** The server's history if it has one (config says so, or it answers), else this browser's. */
export async function openHistory(api, advertised) {
  if (advertised === false) return new LocalHistory();
  try {
    await api.conversations();
    return new ServerHistory(api);
  } catch {
    return new LocalHistory();
  }
}

function fromServerConversation(data) {
  return {
    id: data.id,
    title: data.title || "New chat",
    created_at: data.created_at,
    updated_at: data.updated_at,
    messages: (data.messages || []).map(fromServer),
  };
}

// ------------------------------------------------------------------ versions in this browser
//
// A message of a browser-local conversation may keep `variants`: the branches of its turn
// (each the list of messages from that turn to the end), with null in the slot of the
// branch shown, which is conv.messages from that message on. Only the message shown at a
// turn holds them, so nothing is cyclic and the whole conversation is plain JSON.

/**
 * Make room for a new version of the turn at `i` (a regenerate or an edit): the shown
 * branch from `i` is kept as a variant and removed from conv.messages (returned). The
 * caller pushes the new message and passes it to `adoptVariants`.
 */
export function branchAt(conv, i) {
  const tail = conv.messages.splice(i);
  const first = tail[0];
  const variants = first && Array.isArray(first.variants) ? first.variants.slice() : [null];
  if (first) delete first.variants;
  variants[variants.indexOf(null)] = tail;
  variants.push(null);
  return { tail, variants };
}

export function adoptVariants(msg, variants) {
  if (variants.length > 1) msg.variants = variants;
}

/** Show the branch `delta` versions away at turn `i`; false when there is none. */
export function switchLocal(conv, i, delta) {
  const msg = conv.messages[i];
  const variants = msg && Array.isArray(msg.variants) ? msg.variants : null;
  const from = variants ? variants.indexOf(null) : -1;
  const to = from + delta;
  if (!variants || from < 0 || to < 0 || to >= variants.length) return false;
  const next = variants.slice();
  const tail = conv.messages.splice(i);
  delete msg.variants;
  next[from] = tail;
  const shown = next[to];
  next[to] = null;
  shown[0].variants = next;
  conv.messages.push(...shown);
  return true;
}

function storable(msg) {
  const out = storableOne(msg);
  if (Array.isArray(msg.variants)) {
    out.variants = msg.variants.map((tail) => (tail ? tail.map(storable) : null));
  }
  return out;
}

function storableOne(msg) {
  if (msg.role !== "assistant") return { role: msg.role, content: msg.content };
  const out = {};
  for (const key of ["role", "content", "reasoning", "tool_calls", "state", "model", "stream_id",
    "last_seq", "error", "stats", "usage", "finish_reason", "t0", "first_token_at",
    "reasoning_start", "reasoning_end", "deltas", "conn"]) {
    out[key] = msg[key];
  }
  return out;
}

function fromServer(m) {
  const msg = {
    id: m.id,
    role: m.role,
    content: typeof m.content === "string" ? m.content : "",
    parent_id: m.parent_id ?? null,
    version: m.version || 1,
    versions: m.versions || 1,
    sibling_ids: Array.isArray(m.sibling_ids) ? m.sibling_ids : [m.id],
  };
  if (m.role !== "assistant") return msg;
  const toolCalls = Array.isArray(m.tool_calls) ? m.tool_calls : [];
  return {
    ...msg,
    reasoning: m.reasoning || "",
    tool_calls: toolCalls.map((c, i) => ({
      index: typeof c.index === "number" ? c.index : i,
      id: c.id || null,
      name: c.name || (c.function && c.function.name) || "",
      arguments: c.arguments || (c.function && c.function.arguments) || "",
    })),
    state: m.state || "complete",
    model: m.model_used || m.model || "",
    stream_id: m.stream_id || null,
    last_seq: 0,
    error: serverError(m.error),
    stats: m.stats || { ttft_ms: m.ttft_ms ?? null, tokens_per_s: m.tokens_per_s ?? null },
    usage: m.usage || null,
    finish_reason: m.finish_reason || null,
    conn: "",
    deltas: 0,
    t0: null,
    first_token_at: null,
    reasoning_start: null,
    reasoning_end: null,
  };
}

function serverError(error) {
  if (!error) return null;
  if (typeof error === "string") return { code: "error", message: error, retryable: true };
  return { code: error.code || "error", message: error.message || "The answer failed.", retryable: error.retryable !== false };
}
