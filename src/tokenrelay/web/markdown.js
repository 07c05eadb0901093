// Safe, incremental markdown rendering.
//
// Model output is untrusted. markdown-it runs with html:false (raw HTML is shown as text),
// links are kept only for http(s) and mailto, images become plain links (no request to any
// origin), table alignment becomes a class (the CSP forbids inline styles), and DOMPurify
// sanitises the HTML before it reaches the DOM. highlight.js only adds <span class>.
//
// While an answer streams, the text is cut at the last "safe" block boundary (a blank line
// outside a code fence, followed by an unindented line). Blocks before it are rendered once
// and never touched again; only the growing tail is re-rendered, at most once per frame.
// So a long answer costs O(tail) per frame, and nothing above the tail re-lays out.

import MarkdownIt from "./vendor/markdown-it.min.js";
import DOMPurify from "./vendor/purify.es.js";
import hljs from "./vendor/highlight.min.js";

const SAFE_URL = /^(?:https?:|mailto:)/i;

function escapeHtml(s) {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function highlight(code, lang) {
  try {
    if (lang && hljs.getLanguage(lang)) {
      return hljs.highlight(code, { language: lang, ignoreIllegals: true }).value;
    }
  } catch {
    // fall through to plain text
  }
  return escapeHtml(code);
}

function createMarkdown() {
  const md = new MarkdownIt({ html: false, linkify: true, typographer: false, breaks: false, highlight });
  md.validateLink = (url) => SAFE_URL.test(url.trim());
  // Images never load: render them as a link to their URL (if safe) labelled by the alt text.
  md.renderer.rules.image = (tokens, idx) => {
    const token = tokens[idx];
    const src = token.attrGet("src") || "";
    const alt = escapeHtml(token.content || "image");
    if (SAFE_URL.test(src)) {
      return `<a class="md-image-link" href="${escapeHtml(src)}">Image: ${alt}</a>`;
    }
    return `<span class="md-image-link">Image: ${alt}</span>`;
  };
  // Table alignment arrives as style="text-align:…"; turn it into a class.
  const align = (tokens, idx, options, env, self) => {
    const token = tokens[idx];
    const style = token.attrGet("style");
    if (style) {
      const m = /text-align:\s*(left|right|center)/.exec(style);
      token.attrs = token.attrs.filter(([name]) => name !== "style");
      if (m) token.attrJoin("class", `align-${m[1]}`);
    }
    return self.renderToken(tokens, idx, options);
  };
  md.renderer.rules.th_open = align;
  md.renderer.rules.td_open = align;
  // Fences: add a header with the language name; the copy button is added after sanitising.
  const fence = md.renderer.rules.fence;
  md.renderer.rules.fence = (tokens, idx, options, env, self) => {
    const info = (tokens[idx].info || "").trim().split(/\s+/)[0];
    const html = fence(tokens, idx, options, env, self);
    const label = escapeHtml(info || "text");
    return `<div class="code-block"><div class="code-head"><span class="code-lang">${label}</span></div>${html}</div>`;
  };
  return md;
}

function createPurifier() {
  const purify = DOMPurify();
  purify.addHook("afterSanitizeAttributes", (node) => {
    if (node.nodeName === "A") {
      const href = node.getAttribute("href") || "";
      if (!SAFE_URL.test(href)) {
        node.removeAttribute("href");
      } else {
        node.setAttribute("target", "_blank");
        node.setAttribute("rel", "noopener noreferrer");
      }
    }
  });
  return purify;
}

const PURIFY_CONFIG = {
  ALLOWED_URI_REGEXP: /^(?:https?:|mailto:)/i,
  FORBID_TAGS: ["img", "svg", "math", "style", "form", "input", "button", "textarea", "select",
    "iframe", "object", "embed", "video", "audio", "source", "picture", "link", "meta", "base"],
  FORBID_ATTR: ["style", "srcset", "src", "action", "formaction", "background", "poster"],
  ADD_ATTR: ["target"],
  RETURN_DOM_FRAGMENT: true,
};

/** Renders untrusted markdown into sanitised DOM fragments. */
export class Renderer {
  constructor() {
    this.md = createMarkdown();
    this.purify = createPurifier();
  }

  fragment(source) {
    const frag = this.purify.sanitize(this.md.render(source), PURIFY_CONFIG);
    decorate(frag);
    return frag;
  }
}

/** Add a copy button to each code block (built with the DOM, never from HTML strings). */
function decorate(root) {
  for (const head of root.querySelectorAll(".code-head")) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "copy-code";
    button.textContent = "Copy";
    button.setAttribute("aria-label", "Copy code");
    head.appendChild(button);
  }
}

/**
 * Index just after the last safe block boundary in `text`: a blank line outside any code
 * fence whose next line has arrived, starts with a non-space character and is not a list
 * item. Text before it renders the same on its own as inside the whole document.
 */
export function stableBoundary(text, from = 0) {
  let best = from;
  let fence = null; // the open fence's marker ("```" or "~~~" and its length), or null
  let pos = from;
  let prevBlank = false;
  const n = text.length;
  while (pos < n) {
    let end = text.indexOf("\n", pos);
    if (end < 0) break; // an unfinished line: never decide on it
    const line = text.slice(pos, end);
    const stripped = line.trimStart();
    const indent = line.length - stripped.length;
    if (fence) {
      const close = indent < 4 ? /^(`{3,}|~{3,})\s*$/.exec(stripped) : null;
      if (close && close[1][0] === fence[0] && close[1].length >= fence.length) fence = null;
    } else {
      const m = indent < 4 ? /^(`{3,}|~{3,})/.exec(stripped) : null;
      const blank = stripped === "";
      if (prevBlank && !blank && indent === 0 && !LIST_ITEM.test(line)) best = pos;
      if (m) fence = m[1];
      prevBlank = blank;
    }
    pos = end + 1;
  }
  // A non-blank line that began after a blank line can be decided once its first char arrived.
  if (!fence && prevBlank && pos < n) {
    const c = text.charCodeAt(pos);
    const head = text.slice(pos, pos + 12);
    const maybeList = LIST_START.test(head) && (head.length < 12 || LIST_ITEM.test(head));
    if (c !== 32 && c !== 9 && c !== 10 && c !== 13 && !maybeList) best = pos;
  }
  return best;
}

// A list item after a blank line may belong to the list above (which it then makes
// "loose"), so a list is never cut: it stays in the tail until a non-list block follows.
const LIST_ITEM = /^(?:[-+*]|\d{1,9}[.)])(?:[ \t]|$)/;
const LIST_START = /^[-+*\d]/;

/**
 * One answer's markdown view: call set(text) as often as you like; render() does the
 * minimal DOM work (new stable blocks appended, the tail replaced).
 */
export class MarkdownView {
  constructor(renderer, root) {
    this.renderer = renderer;
    this.root = root;
    this.stable = document.createElement("div");
    this.stable.className = "md-stable";
    this.tail = document.createElement("div");
    this.tail.className = "md-tail";
    root.replaceChildren(this.stable, this.tail);
    this.text = "";
    this.cut = 0; // text[0:cut] is rendered in `stable`
    this.renderedTail = null;
    this.scanFrom = 0; // where the boundary scan may resume (a known boundary)
  }

  render(text, final) {
    if (text.length < this.cut || text.slice(0, this.cut) !== this.text.slice(0, this.cut)) {
      this.stable.replaceChildren();
      this.cut = 0;
      this.scanFrom = 0;
      this.renderedTail = null;
    }
    this.text = text;
    const boundary = final ? text.length : stableBoundary(text, this.scanFrom);
    if (boundary > this.cut) {
      this.stable.appendChild(this.renderer.fragment(text.slice(this.cut, boundary)));
      this.cut = boundary;
      this.scanFrom = boundary;
      this.renderedTail = null;
    }
    const tail = text.slice(this.cut);
    if (tail !== this.renderedTail) {
      if (tail.trim() === "") this.tail.replaceChildren();
      else this.tail.replaceChildren(this.renderer.fragment(tail));
      this.renderedTail = tail;
    }
  }
}
