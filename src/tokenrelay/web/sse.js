// Incremental Server-Sent Events parser (WHATWG rules), pure: no I/O, no DOM.
//
// feed(text) accepts any chunking (an event, a line, or a CRLF pair split across reads)
// and returns only complete events; the rest is kept for the next call. Lines end on CR,
// LF or CRLF. Decoding bytes is the caller's job: use one TextDecoder with
// {stream: true} so a UTF-8 character split across reads is never mangled.

export class SSEParser {
  constructor() {
    this.buffer = "";
    this.skipLF = false; // the previous chunk ended in CR: a leading LF belongs to it
    this.reset();
  }

  reset() {
    this.eventType = "";
    this.data = [];
    this.hasData = false;
    this.id = null; // id field of the event being built (null: none seen)
    this.stream = null; // tokenrelay's multiplex field: the stream an event belongs to
  }

  /** Feed decoded text; returns an array of {event, data, id} for complete events. */
  feed(text) {
    const out = [];
    let buf = this.buffer + text;
    let start = 0;
    if (this.skipLF && buf.length > 0) {
      if (buf.charCodeAt(0) === 10) start = 1;
      this.skipLF = false;
    }
    const n = buf.length;
    for (let i = start; i < n; i++) {
      const c = buf.charCodeAt(i);
      if (c !== 10 && c !== 13) continue;
      this.line(buf.slice(start, i), out);
      if (c === 13) {
        if (i + 1 < n) {
          if (buf.charCodeAt(i + 1) === 10) i++;
        } else {
          this.skipLF = true;
        }
      }
      start = i + 1;
    }
    this.buffer = start < n ? buf.slice(start) : "";
    return out;
  }

  line(line, out) {
    if (line === "") {
      if (this.hasData) {
        const ev = { event: this.eventType || "message", data: this.data.join("\n"), id: this.id };
        if (this.stream !== null) ev.stream = this.stream;
        out.push(ev);
      }
      this.reset();
      return;
    }
    if (line.charCodeAt(0) === 58) return; // ":" comment (heartbeat)
    const colon = line.indexOf(":");
    let field = line;
    let value = "";
    if (colon >= 0) {
      field = line.slice(0, colon);
      value = line.slice(colon + 1);
      if (value.charCodeAt(0) === 32) value = value.slice(1);
    }
    if (field === "data") {
      this.data.push(value);
      this.hasData = true;
    } else if (field === "event") {
      this.eventType = value;
    } else if (field === "id") {
      if (value.indexOf("\0") < 0) this.id = value;
    } else if (field === "stream") {
      this.stream = value;
    }
    // "retry" and unknown fields are ignored: reconnection is ours, not EventSource's.
  }
}

/**
 * Read an SSE response body, calling onEvent(ev) for each event and onActivity() for every
 * chunk (heartbeats included). Resolves when the body ends; rejects on network errors.
 */
export async function readEvents(response, onEvent, onActivity) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder("utf-8");
  const parser = new SSEParser();
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      if (onActivity) onActivity();
      const events = parser.feed(decoder.decode(value, { stream: true }));
      for (const ev of events) onEvent(ev);
    }
    const tail = parser.feed(decoder.decode());
    for (const ev of tail) onEvent(ev);
  } finally {
    reader.releaseLock();
  }
}
