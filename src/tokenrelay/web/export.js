// Export of one conversation as Markdown or JSON, downloaded as a file. Pure formatting
// (toMarkdown, toJSON, fileName) plus one download helper; nothing leaves the browser.

const STATE_NOTE = { cancelled: "stopped", error: "failed", interrupted: "interrupted" };

function fence(text, lang = "") {
  // A fence longer than any run of backticks inside, so the text cannot close it.
  const runs = text.match(/`+/g) || [];
  const ticks = "`".repeat(Math.max(3, ...runs.map((r) => r.length + 1)));
  return `${ticks}${lang}\n${text}\n${ticks}`;
}

function quote(text) {
  return text.split("\n").map((line) => (line ? `> ${line}` : ">")).join("\n");
}

/** The conversation as Markdown: a heading per turn, thinking quoted, tool calls fenced. */
export function toMarkdown(conv, now = new Date()) {
  const out = [`# ${conv.title || "New chat"}`, "", `_Exported from tokenrelay on ${now.toISOString()}_`];
  for (const msg of conv.messages) {
    out.push("");
    if (msg.role !== "assistant") {
      out.push(msg.role === "user" ? "## You" : `## ${msg.role}`, "", msg.content || "");
      continue;
    }
    const note = STATE_NOTE[msg.state];
    out.push(`## Assistant${msg.model ? ` (${msg.model})` : ""}${note ? ` — ${note}` : ""}`);
    if (msg.reasoning) out.push("", "**Thinking**", "", quote(msg.reasoning));
    for (const call of msg.tool_calls || []) {
      out.push("", `**Tool call** \`${call.name || "?"}\``, "", fence(call.arguments || "{}", "json"));
    }
    if (msg.content) out.push("", msg.content);
    if (note && msg.error && msg.error.message) out.push("", `_${note}: ${msg.error.message}_`);
  }
  return out.join("\n") + "\n";
}

/** The conversation as JSON: what a script needs, nothing of the page's own bookkeeping. */
export function toJSON(conv, now = new Date()) {
  const messages = conv.messages.map((msg) => {
    if (msg.role !== "assistant") return { role: msg.role, content: msg.content };
    const out = { role: "assistant", content: msg.content, model: msg.model || null, state: msg.state };
    if (msg.reasoning) out.reasoning = msg.reasoning;
    if (msg.tool_calls && msg.tool_calls.length) {
      out.tool_calls = msg.tool_calls.map((c) => ({ id: c.id, name: c.name, arguments: c.arguments }));
    }
    for (const key of ["finish_reason", "usage", "stats", "error"]) {
      if (msg[key]) out[key] = msg[key];
    }
    return out;
  });
  const doc = { title: conv.title || "New chat", id: conv.id || null, exported_at: now.toISOString(), messages };
  return JSON.stringify(doc, null, 2) + "\n";
}

/** A safe file name from the title: letters, digits and dashes. */
export function fileName(conv, ext) {
  const base = (conv.title || "conversation").normalize("NFKD").replace(/[^\w\s-]/g, "")
    .trim().replace(/[\s_]+/g, "-").slice(0, 60).toLowerCase();
  return `${base || "conversation"}.${ext}`;
}

export function download(name, text, type) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}
