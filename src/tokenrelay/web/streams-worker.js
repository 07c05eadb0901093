// SharedWorker: one connection follows every answer that this browser's tabs stream.
//
// A browser opens at most six HTTP/1.1 connections per host, and an SSE response holds
// one, so the seventh tab streaming an answer would wait. Tabs instead ask this worker to
// follow their stream; it holds ONE response, GET /api/events?streams=ID:SEQ,..., with
// every stream followed, and relays each stream's events to the tabs that follow it.
// When the set of streams changes, or the connection breaks or falls silent, it reconnects
// with each stream resumed after the last seq it relayed: nothing is lost or repeated.
//
// Messages from a tab (port): {type: "follow", stream, after, key, stallMs},
// {type: "unfollow", stream}, {type: "bye"}, {type: "reconnect"} (the tab's network came
// back: the connection may be dead without knowing it yet). To a tab: {type: "attached", stream},
// {type: "event", stream, event} (event as sse.js returns it), {type: "alive"},
// {type: "reconnecting"}, {type: "gone", stream}, {type: "failed", stream, status}.

import { SSEParser } from "./sse.js";

const RECONNECT_DELAY_MS = 20; // lets a burst of follows from many tabs share one reconnect
const MAX_BACKOFF_MS = 5000;

const streams = new Map(); // stream id -> {after, ports: Map<port, after>}
let key = null; // the API key the tabs use (they share one browser's storage)
let stallMs = 30000;
let controller = null;
let timer = null;
let failures = 0;

function post(port, message) {
  try {
    port.postMessage(message);
  } catch {
    // a port whose tab has gone: it is dropped on its "bye" or its next unfollow
  }
}

function ports() {
  const all = new Set();
  for (const entry of streams.values()) for (const port of entry.ports.keys()) all.add(port);
  return all;
}

function broadcast(message) {
  for (const port of ports()) post(port, message);
}

function drop(streamId) {
  streams.delete(streamId);
  schedule();
}

function schedule(delay = RECONNECT_DELAY_MS) {
  clearTimeout(timer);
  timer = setTimeout(connect, delay);
}

/** (Re)open the one response for the streams followed now; close it if there are none. */
async function connect() {
  timer = null;
  if (controller) controller.abort();
  controller = null;
  if (!streams.size) return;
  const mine = new AbortController();
  controller = mine;
  const list = [...streams].map(([id, entry]) => `${encodeURIComponent(id)}:${entry.after}`).join(",");
  const headers = { Accept: "text/event-stream" };
  if (key) headers.Authorization = `Bearer ${key}`;
  let watchdog = null;
  const arm = () => {
    clearTimeout(watchdog);
    watchdog = setTimeout(() => mine.abort(), stallMs);
  };
  try {
    arm();
    const response = await fetch(`/api/events?streams=${list}`, { headers, signal: mine.signal });
    if (!response.ok) {
      // Nothing a reconnect can heal (a key refused, the endpoint missing): the tabs fall
      // back to following their streams themselves.
      for (const [id, entry] of streams) {
        for (const port of entry.ports.keys()) post(port, { type: "failed", stream: id, status: response.status });
      }
      streams.clear();
      return;
    }
    failures = 0;
    const followed = new Set(streams.keys());
    for (const [id, entry] of streams) {
      for (const port of entry.ports.keys()) post(port, { type: "attached", stream: id });
    }
    await read(response, arm);
    if (mine !== controller) return; // replaced by a newer connection
    // The response ended: every stream it carried has ended (or was gone).
    for (const id of followed) if (streams.has(id) && isEnded(streams.get(id))) streams.delete(id);
    if (streams.size) schedule();
  } catch {
    if (mine !== controller) return;
    failures += 1;
    broadcast({ type: "reconnecting" });
    schedule(Math.min(MAX_BACKOFF_MS, 250 * 2 ** failures));
  } finally {
    clearTimeout(watchdog);
  }
}

function isEnded(entry) {
  return entry.ended === true;
}

async function read(response, arm) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder("utf-8");
  const parser = new SSEParser();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return;
    arm();
    broadcast({ type: "alive" });
    for (const ev of parser.feed(decoder.decode(value, { stream: true }))) relay(ev);
  }
}

function relay(ev) {
  const entry = ev.stream !== undefined ? streams.get(ev.stream) : undefined;
  if (!entry) return;
  if (ev.event === "gone") {
    for (const port of entry.ports.keys()) post(port, { type: "gone", stream: ev.stream });
    streams.delete(ev.stream); // no reconnect needed: the response carries on for the rest
    return;
  }
  const seq = ev.id !== null ? Number(ev.id) : NaN;
  if (Number.isFinite(seq)) {
    if (seq <= entry.after) return;
    entry.after = seq;
  }
  for (const [port, after] of entry.ports) {
    if (Number.isFinite(seq) && seq <= after) continue; // that tab already has it
    post(port, { type: "event", stream: ev.stream, event: ev });
  }
  if (ev.event === "done" || ev.event === "error") entry.ended = true;
}

function follow(port, message) {
  if (message.key !== undefined) key = message.key;
  if (message.stallMs) stallMs = message.stallMs;
  const after = Number(message.after) || 0;
  let entry = streams.get(message.stream);
  if (!entry) {
    entry = { after, ports: new Map(), ended: false };
    streams.set(message.stream, entry);
    entry.ports.set(port, after);
    schedule();
    return;
  }
  entry.ports.set(port, after);
  if (after < entry.after) {
    entry.after = after; // replay what this tab has not seen
    schedule();
  } else if (controller) {
    post(port, { type: "attached", stream: message.stream });
  }
}

function unfollow(port, streamId) {
  const entry = streams.get(streamId);
  if (!entry) return;
  entry.ports.delete(port);
  if (!entry.ports.size) drop(streamId);
}

self.onconnect = (e) => {
  const port = e.ports[0];
  port.onmessage = (m) => {
    const message = m.data || {};
    if (message.type === "follow") follow(port, message);
    else if (message.type === "unfollow") unfollow(port, message.stream);
    else if (message.type === "bye") for (const id of [...streams.keys()]) unfollow(port, id);
    else if (message.type === "reconnect" && streams.size) schedule(0);
  };
  port.start();
};
