// The tab's side of the SharedWorker that follows every tab's answers over one connection
// (see streams-worker.js). Where SharedWorker is missing (some mobile browsers) or fails,
// open() returns null and each run follows its stream over its own connection, as before.

const WORKER_URL = "/static/streams-worker.js";

export class SharedStreams {
  static open() {
    if (typeof SharedWorker === "undefined") return null;
    try {
      const worker = new SharedWorker(WORKER_URL, { type: "module", name: "tokenrelay-streams" });
      return new SharedStreams(worker.port);
    } catch {
      return null;
    }
  }

  constructor(port) {
    this.port = port;
    this.subs = new Map(); // stream id -> handlers
    // Whether a tab may drop its own connection to a new answer before the worker has
    // attached: only when the server's grace period leaves ample time (set from /api/config).
    this.releaseEarly = false;
    port.onmessage = (m) => this.dispatch(m.data || {});
    port.start();
    window.addEventListener("pagehide", () => port.postMessage({ type: "bye" }));
  }

  /**
   * Follow `streamId` after seq `after`. `handlers` may have attached(), event(msg),
   * alive(), reconnecting(), gone(), failed(). Returns {close()} to stop following.
   */
  follow(streamId, after, key, stallMs, handlers) {
    this.subs.set(streamId, handlers);
    this.port.postMessage({ type: "follow", stream: streamId, after, key: key || null, stallMs });
    return {
      close: () => {
        if (this.subs.get(streamId) !== handlers) return;
        this.subs.delete(streamId);
        this.port.postMessage({ type: "unfollow", stream: streamId });
      },
    };
  }

  /** The network came back: have the worker reopen its connection now. */
  reconnect() {
    this.port.postMessage({ type: "reconnect" });
  }

  dispatch(msg) {
    if (msg.type === "alive" || msg.type === "reconnecting") {
      for (const handlers of this.subs.values()) handlers[msg.type]?.();
      return;
    }
    const handlers = this.subs.get(msg.stream);
    if (handlers && handlers[msg.type]) handlers[msg.type](msg);
  }
}
