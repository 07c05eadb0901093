// The chat page: wiring between the composer, the message views, the current answer's run,
// the history sidebar and the tab's session storage.
//
// Idle tabs hold no connection: a stream is read with fetch() only while an answer is
// being generated, so many tabs never exhaust the browser's six connections per origin.
// While an answer streams, a snapshot of the conversation (text + last seq, always
// consistent) is kept in sessionStorage, so a reload re-attaches where it left off.

import { Api, ApiError } from "./api.js";
import { download, fileName, toJSON, toMarkdown } from "./export.js";
import { LocalHistory, adoptVariants, branchAt, newConversationId, openHistory, switchLocal } from "./history.js";
import { Renderer } from "./markdown.js";
import { AnswerRun, isFinal, newAnswer } from "./run.js";
import { SharedStreams } from "./shared.js";
import { applyTheme, savedTheme, setTheme } from "./theme.js";
import { AssistantView, UserView, versionOf, waitingMs } from "./views.js";

const ACTIVE_KEY = "tokenrelay.active"; // sessionStorage: the answer in progress
const CURRENT_KEY = "tokenrelay.current"; // sessionStorage: the open conversation
const MODEL_KEY = "tokenrelay.model"; // localStorage: the last model picked
const OTHER = "\u0000other"; // the picker's "Other model…" entry: a name typed by the user
const MODEL_NAME_KEY = "tokenrelay.model-name"; // localStorage: the last name typed there
const SNAPSHOT_EVERY_MS = 150;
const SEARCH_DELAY_MS = 200; // typing in the search box queries once it pauses
const ANNOUNCE_WAIT_MS = 10000; // a silence this long is said once to screen readers
const MOBILE = "(max-width: 820px)";

function titleFrom(text) {
  const flat = text.split(/\s+/).join(" ").trim();
  return flat.length > 60 ? flat.slice(0, 59) + "…" : flat || "New chat";
}

function session(key, value) {
  try {
    if (value === undefined) return JSON.parse(sessionStorage.getItem(key) || "null");
    if (value === null) sessionStorage.removeItem(key);
    else sessionStorage.setItem(key, JSON.stringify(value));
  } catch {
    // storage full or disabled: reload-resume is best effort
  }
  return null;
}

class App {
  constructor() {
    const $ = (id) => document.getElementById(id);
    this.dom = {
      app: $("app"), sidebar: $("sidebar"), scrim: $("scrim"), toggle: $("sidebar-toggle"),
      newChat: $("new-chat"), topbarNew: $("topbar-new"), convList: $("conv-list"),
      convEmpty: $("conv-empty"), historyMode: $("history-mode"), version: $("version"),
      title: $("conv-title"), model: $("model"), messages: $("messages"), log: $("log"),
      welcome: $("welcome"), form: $("composer"), input: $("input"), send: $("send"),
      stop: $("stop"), simNote: $("sim-note"), announcer: $("announcer"),
      keyDialog: $("key-dialog"), keyForm: $("key-form"), keyInput: $("key-input"),
      keyDesc: $("key-desc"), jump: $("jump"), exportBtn: $("export"),
      exportMenu: $("export-menu"), search: $("conv-search"), theme: $("theme"),
      modelName: $("model-name"), banner: $("upstream-banner"),
      bannerTitle: $("upstream-banner-title"), bannerText: $("upstream-banner-text"),
      bannerHint: $("upstream-banner-hint"), bannerRetry: $("upstream-retry"),
    };
    this.api = new Api(() => this.askForKey());
    this.renderer = new Renderer();
    this.history = new LocalHistory();
    this.shared = SharedStreams.open(); // one connection for every tab's answers
    this.models = new Map();
    this.anyModel = false; // the gateway passes any model name to its upstream
    this.conv = null; // {id, title, messages, created_at}
    this.run = null; // the AnswerRun in progress (at most one per tab)
    this.runConv = null; // the conversation that run belongs to
    this.views = new WeakMap(); // message -> view, for the conversation on screen
    this.heartbeatS = 15;
    this.lastSnapshot = 0;
    this.snapshotTimer = null;
    this.ticker = null;
    this.editing = null;
    this.switching = false; // a version switch is on its way to the server
    this.mobile = window.matchMedia(MOBILE);
    this.ready = false;
    this.query = ""; // the history search
    this.searchTimer = null;
  }

  async init() {
    this.bindEvents();
    let config = null;
    try {
      config = await this.api.config();
    } catch (err) {
      this.announce("Cannot reach the server.");
    }
    if (config) {
      this.dom.version.textContent = config.version ? `v${config.version}` : "";
      if (typeof config.heartbeat_s === "number" && config.heartbeat_s > 0) this.heartbeatS = config.heartbeat_s;
      if (this.shared && typeof config.grace_s === "number") this.shared.releaseEarly = config.grace_s >= 5;
      if (config.auth_required && !this.api.key) await this.askForKey(true);
      this.showUser(config);
    }
    // A gateway that says whether it keeps history spares us probing (and a logged 404).
    const advertised = config && typeof config.history === "boolean" ? config.history : undefined;
    await Promise.all([this.loadModels(), this.loadHistory(advertised)]);
    await this.restore();
    this.ready = true; // only now may the user send: restore() replaces what is on screen
    this.updateComposer();
    document.body.dataset.ready = "true";
  }

  /** "Signed in as ..." (and the proxy's sign-out link) when an auth proxy named the user. */
  showUser(config) {
    if (typeof config.user !== "string" || !config.user) return;
    document.getElementById("user-name").textContent = config.user;
    const out = document.getElementById("sign-out");
    const url = config.sign_out_url;
    if (typeof url === "string" && /^(https?:\/\/|\/)/.test(url)) {
      out.href = url;
      out.hidden = false;
    }
    document.getElementById("signed-in").hidden = false;
  }

  // ------------------------------------------------------------------ setup

  bindEvents() {
    const d = this.dom;
    d.form.addEventListener("submit", (e) => {
      e.preventDefault();
      this.send();
    });
    d.input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        this.send();
      }
    });
    d.input.addEventListener("input", () => this.updateComposer());
    d.stop.addEventListener("click", () => {
      this.stop();
      d.input.focus();
    });
    d.newChat.addEventListener("click", () => this.newChat());
    d.topbarNew.addEventListener("click", () => this.newChat());
    d.toggle.addEventListener("click", () => this.toggleSidebar());
    d.scrim.addEventListener("click", () => this.toggleSidebar(false));
    d.model.addEventListener("change", () => {
      try {
        localStorage.setItem(MODEL_KEY, d.model.value);
      } catch {
        // ignore
      }
      this.updateSimNote();
      this.updateModelName();
      if (d.model.value === OTHER) d.modelName.focus();
    });
    d.modelName.addEventListener("input", () => {
      try {
        localStorage.setItem(MODEL_NAME_KEY, d.modelName.value.trim());
      } catch {
        // ignore
      }
      this.updateComposer();
    });
    d.bannerRetry.addEventListener("click", async () => {
      await this.loadModels();
      this.updateComposer();
    });
    for (const b of document.querySelectorAll(".suggestion")) {
      b.addEventListener("click", () => {
        d.input.value = b.textContent;
        this.send();
      });
    }
    d.log.addEventListener("click", (e) => this.onLogClick(e));
    document.addEventListener("keydown", (e) => {
      if (e.key !== "Escape" || e.defaultPrevented) return;
      if (this.editing) return this.cancelEdit();
      if (this.dom.app.classList.contains("sidebar-open")) return this.toggleSidebar(false);
      if (this.run) {
        e.preventDefault();
        this.stop();
      }
    });
    d.keyDialog.addEventListener("cancel", (e) => {
      if (this.keyResolve) e.preventDefault(); // start-up cannot go on without a key
    });
    d.keyForm.addEventListener("submit", (e) => {
      e.preventDefault();
      const value = d.keyInput.value.trim();
      if (!value) return;
      this.api.key = value;
      d.keyDialog.close();
      if (this.keyResolve) {
        const resolve = this.keyResolve;
        this.keyResolve = null;
        resolve();
      } else {
        // A key was refused after start-up: start over with the new one (the answer in
        // progress, if any, is resumed from sessionStorage).
        this.saveSnapshot(true);
        location.reload();
      }
    });
    window.addEventListener("pagehide", () => {
      this.saveSnapshot();
      if (this.run) this.run.close();
    });
    this.mobile.addEventListener("change", () => this.toggleSidebar(false));
    this.toggleSidebar(false);
    this.follow = true;
    d.messages.addEventListener("scroll", () => {
      this.follow = this.isNearBottom();
      this.updateJump();
    }, { passive: true });
    d.jump.addEventListener("click", () => {
      this.scrollToBottom();
      d.input.focus({ preventScroll: true });
    });
    d.theme.value = savedTheme();
    d.theme.addEventListener("change", () => setTheme(d.theme.value));
    d.search.addEventListener("input", () => {
      clearTimeout(this.searchTimer);
      this.searchTimer = setTimeout(() => {
        this.query = d.search.value;
        this.refreshList();
      }, SEARCH_DELAY_MS);
    });
    d.search.addEventListener("keydown", (e) => {
      if (e.key === "Escape" && d.search.value) {
        e.preventDefault(); // clear the search first; a second Escape closes the drawer
        d.search.value = "";
        this.query = "";
        this.refreshList();
      }
    });
    this.bindExportMenu();
    window.addEventListener("storage", (e) => {
      // Another tab changed this browser's history: keep the sidebar in step.
      if (!this.history.server && e.key && e.key.startsWith("tokenrelay.conv")) this.refreshList();
    });
    window.addEventListener("pageshow", (e) => {
      if (e.persisted && this.run) location.reload(); // back from bfcache: the run was closed
    });
  }

  /** The export button opens a two-item menu (arrow keys move, Escape closes). */
  bindExportMenu() {
    const d = this.dom;
    const items = () => [...d.exportMenu.querySelectorAll("[role=menuitem]")];
    const open = (focusFirst) => {
      d.exportMenu.hidden = false;
      d.exportBtn.setAttribute("aria-expanded", "true");
      if (focusFirst) items()[0].focus();
    };
    const close = (refocus) => {
      if (d.exportMenu.hidden) return;
      d.exportMenu.hidden = true;
      d.exportBtn.setAttribute("aria-expanded", "false");
      if (refocus) d.exportBtn.focus();
    };
    d.exportBtn.addEventListener("click", () => (d.exportMenu.hidden ? open(true) : close(false)));
    d.exportMenu.addEventListener("click", (e) => {
      const item = e.target.closest("[role=menuitem]");
      if (!item) return;
      close(true);
      this.exportConversation(item.dataset.format);
    });
    d.exportMenu.addEventListener("keydown", (e) => {
      const list = items();
      const i = list.indexOf(document.activeElement);
      if (e.key === "ArrowDown" || e.key === "ArrowUp") {
        e.preventDefault();
        list[(i + (e.key === "ArrowDown" ? 1 : list.length - 1)) % list.length].focus();
      } else if (e.key === "Escape") {
        e.preventDefault(); // only the menu closes, not the answer in progress
        close(true);
      } else if (e.key === "Tab") {
        close(false);
      }
    });
    document.addEventListener("click", (e) => {
      if (!e.target.closest(".export")) close(false);
    });
  }

  exportConversation(format) {
    const conv = this.conv;
    if (!conv || !conv.messages.length) return;
    if (format === "json") download(fileName(conv, "json"), toJSON(conv), "application/json");
    else download(fileName(conv, "md"), toMarkdown(conv), "text/markdown");
    this.announce("Conversation exported.");
  }

  /** Ask for an API key. During start-up the returned promise waits for it. */
  askForKey(waiting = false) {
    const dialog = this.dom.keyDialog;
    if (!dialog.open) {
      this.dom.keyInput.value = "";
      this.dom.keyDesc.textContent = this.api.key
        ? "The server refused this API key. Enter a valid one; it is kept in this browser only."
        : "This gateway needs an API key. It is kept in this browser only.";
      dialog.showModal();
    }
    if (!waiting) return Promise.resolve();
    return new Promise((resolve) => {
      this.keyResolve = resolve;
    });
  }

  async loadModels() {
    const select = this.dom.model;
    let data;
    try {
      data = await this.api.models();
    } catch {
      select.replaceChildren(new Option("No models available", ""));
      return;
    }
    const models = (data && data.models) || [];
    this.models = new Map(models.map((m) => [m.id, m]));
    this.anyModel = Boolean(data && data.any_model);
    // The closed picker shows just the id (it fits 320 px); simulated models are labelled
    // by their group in the list, by the chip on each answer and the note under the box.
    const option = (m) => {
      const o = new Option(m.id, m.id);
      o.title = m.description || (m.simulated ? "Simulated model" : "");
      return o;
    };
    const real = models.filter((m) => !m.simulated).map(option);
    const simulated = models.filter((m) => m.simulated).map(option);
    if (this.anyModel) real.push(new Option("Other model…", OTHER));
    const group = (label, options) => {
      const g = document.createElement("optgroup");
      g.label = label;
      g.append(...options);
      return g;
    };
    select.replaceChildren(...(real.length && simulated.length
      ? [group("Models", real), group("Simulated (no real LLM)", simulated)]
      : simulated.length ? [group("Simulated (no real LLM)", simulated)] : real));
    let saved = null;
    try {
      saved = localStorage.getItem(MODEL_KEY);
    } catch {
      // ignore
    }
    const fallback = this.anyModel ? OTHER : "";
    const keep = saved && (this.models.has(saved) || (saved === OTHER && this.anyModel));
    select.value = keep ? saved : data.default || (models[0] && models[0].id) || fallback;
    if (this.anyModel && !this.dom.modelName.value) {
      try {
        this.dom.modelName.value = localStorage.getItem(MODEL_NAME_KEY) || "";
      } catch {
        // ignore
      }
    }
    this.showProblem(data && data.problem);
    this.updateModelName();
    this.updateSimNote(); // the picker is enabled once init() is done (see updateComposer)
  }

  /** The banner: why the upstream's model list is missing, and what to do about it. */
  showProblem(problem) {
    const d = this.dom;
    d.banner.hidden = !problem;
    if (!problem) return;
    const offer = this.models.size
      ? "You can still send with the default model, or pick “Other model…” and type a name."
      : "You can still send: type a model name next to “Model”.";
    d.bannerTitle.textContent = `The model list of “${problem.provider}” could not be fetched`;
    d.bannerText.textContent = problem.message;
    d.bannerHint.textContent = `${problem.hint} ${this.anyModel ? offer : ""}`.trim();
  }

  updateModelName() {
    this.dom.modelName.hidden = this.dom.model.value !== OTHER;
  }

  /** The model to ask: the picked one, or the name typed after "Other model…". */
  currentModel() {
    const picked = this.dom.model.value;
    return picked === OTHER ? this.dom.modelName.value.trim() : picked;
  }

  updateSimNote() {
    const m = this.models.get(this.dom.model.value);
    this.dom.simNote.hidden = !(m && m.simulated);
  }

  isSimulated(id) {
    const m = this.models.get(id);
    return Boolean(m && m.simulated);
  }

  async loadHistory(advertised) {
    this.history = await openHistory(this.api, advertised);
    this.dom.historyMode.textContent = this.history.server ? "Saved on the server" : "Saved in this browser";
    await this.refreshList();
  }

  // ------------------------------------------------------------------ restore after reload

  async restore() {
    const snap = session(ACTIVE_KEY);
    if (snap && snap.conv && Array.isArray(snap.conv.messages)) {
      const conv = snap.conv;
      const msg = conv.messages[conv.messages.length - 1];
      if (msg && msg.role === "assistant" && !isFinal(msg.state)) {
        this.show(conv);
        this.startRun(msg, conv, null);
        return;
      }
    }
    session(ACTIVE_KEY, null);
    const current = session(CURRENT_KEY);
    if (current) {
      let conv = null;
      try {
        conv = await this.history.get(current);
      } catch {
        conv = null;
      }
      if (conv) {
        this.show(conv);
        this.resumeStored(conv);
        return;
      }
    }
    this.show(null);
  }

  /** A stored conversation whose last answer is still in progress: follow it to its end. */
  resumeStored(conv) {
    const msg = conv.messages[conv.messages.length - 1];
    if (!msg || msg.role !== "assistant" || isFinal(msg.state) || this.run) return;
    if (!msg.stream_id) {
      msg.state = "interrupted";
      msg.error = { code: "lost", message: "This answer was interrupted before it started.", retryable: true };
      this.views.get(msg)?.render();
      return;
    }
    if (this.history.server) {
      // The server's copy may be a checkpoint of unknown seq: replay the stream from its start.
      Object.assign(msg, { content: "", reasoning: "", tool_calls: [], last_seq: 0, deltas: 0 });
    }
    this.startRun(msg, conv, null);
  }

  // ------------------------------------------------------------------ conversation on screen

  show(conv, keepScroll = false) {
    const top = this.dom.messages.scrollTop;
    this.cancelEdit();
    this.conv = conv;
    this.views = new WeakMap();
    session(CURRENT_KEY, conv && conv.id ? conv.id : null);
    this.dom.title.textContent = conv ? conv.title : "New chat";
    document.title = conv ? `${conv.title} · tokenrelay` : "tokenrelay";
    const nodes = [];
    if (conv) {
      for (const msg of conv.messages) nodes.push(this.viewFor(msg).el);
    }
    this.dom.log.replaceChildren(...nodes);
    for (const msg of conv ? conv.messages : []) {
      const view = this.views.get(msg);
      if (view instanceof AssistantView) view.render();
    }
    this.dom.welcome.hidden = Boolean(conv && conv.messages.length);
    // Continue a conversation with the model that answered it last (if still offered).
    const last = conv ? [...conv.messages].reverse().find((m) => m.role === "assistant" && m.model) : null;
    if (last && this.models.has(last.model) && !this.run) {
      this.dom.model.value = last.model;
      this.updateSimNote();
    }
    this.markCurrent();
    this.updateComposer();
    if (!keepScroll) {
      this.scrollToBottom();
      return;
    }
    this.dom.messages.scrollTop = top; // switching versions: the control stays in place
    this.follow = this.isNearBottom();
    this.updateJump();
  }

  viewFor(msg) {
    let view = this.views.get(msg);
    if (view) return view;
    if (msg.role === "assistant") {
      view = new AssistantView(msg, this.renderer, (id) => this.isSimulated(id));
      view.afterRender = () => this.afterViewRender();
    } else {
      view = new UserView(msg);
    }
    this.views.set(msg, view);
    return view;
  }

  append(msg) {
    const view = this.viewFor(msg);
    this.dom.welcome.hidden = true;
    this.dom.log.appendChild(view.el);
    if (view instanceof AssistantView) view.render();
    this.scrollToBottom();
    return view;
  }

  newChat() {
    this.show(null);
    this.toggleSidebar(false);
    this.dom.input.focus();
  }

  // ------------------------------------------------------------------ sending

  send() {
    const text = this.dom.input.value;
    if (!this.ready || !text.trim() || this.run) return;
    const model = this.currentModel();
    if (!model) return;
    this.dom.input.value = "";
    if (!this.conv) {
      this.conv = {
        id: this.history.server ? null : newConversationId(),
        title: titleFrom(text),
        created_at: Date.now(),
        messages: [],
      };
      this.dom.title.textContent = this.conv.title;
      document.title = `${this.conv.title} · tokenrelay`;
      session(CURRENT_KEY, this.conv.id);
    }
    const user = { role: "user", content: text };
    this.conv.messages.push(user);
    this.append(user);
    this.ask();
  }

  /**
   * Start an answer to the conversation as it stands (ends with the user's message).
   * `variants`: the earlier versions of this answer's turn (a regenerate), kept in the
   * browser when history is; the server keeps its own.
   */
  ask(variants = null) {
    const conv = this.conv;
    const history = conv.messages
      .filter((m) => m.role === "user" || (m.role === "assistant" && m.content))
      .map((m) => ({ role: m.role, content: m.content }));
    const model = this.currentModel();
    const msg = newAnswer(model);
    if (variants && !this.history.server) adoptVariants(msg, variants);
    conv.messages.push(msg);
    this.append(msg);
    const request = { messages: history, model };
    if (this.history.server && conv.id) request.conversation_id = conv.id;
    this.history.save(conv);
    this.refreshList();
    this.startRun(msg, conv, request);
  }

  startRun(msg, conv, request) {
    const stallMs = Math.max(10000, this.heartbeatS * 2500);
    const run = new AnswerRun(this.api, msg, {
      onChange: () => this.onRunChange(run),
      onStart: (m, conversationId) => this.onRunConversation(run, conversationId),
      onFinish: () => this.onRunFinish(run),
    }, stallMs, this.shared);
    this.run = run;
    this.runConv = conv;
    this.updateComposer();
    this.ticker = setInterval(() => this.tick(), 250);
    this.saveSnapshot(true);
    if (request) run.start(request);
    else run.resume();
  }

  onRunChange(run) {
    const view = this.views.get(run.msg);
    if (view) view.schedule();
    this.saveSnapshot(false);
  }

  onRunConversation(run, conversationId) {
    const conv = this.runConv;
    if (!this.history.server || !conv || conv.id === conversationId) return;
    conv.id = conversationId;
    if (this.conv === conv) session(CURRENT_KEY, conv.id);
    this.saveSnapshot(true);
    this.refreshList();
  }

  onRunFinish(run) {
    if (this.run !== run) return;
    const msg = run.msg;
    const conv = this.runConv;
    this.run = null;
    this.runConv = null;
    clearInterval(this.ticker);
    clearTimeout(this.snapshotTimer);
    this.snapshotTimer = null;
    session(ACTIVE_KEY, null);
    delete msg.stopping;
    const view = this.views.get(msg);
    if (view) view.render();
    this.history.save(conv);
    this.refreshList();
    const hadFocus = document.activeElement === this.dom.stop;
    this.updateComposer();
    if (hadFocus) this.dom.input.focus({ preventScroll: true }); // Stop is hidden now
    this.updateJump();
    const said = {
      complete: "Answer complete.",
      cancelled: "Stopped.",
      error: `Error: ${msg.error ? msg.error.message : "the answer failed."}`,
      interrupted: `Interrupted: ${msg.error ? msg.error.message : "the answer was cut off."}`,
    }[msg.state];
    this.announce(said || "");
    if (this.history.server && conv && conv.id) this.refreshVersions(conv);
  }

  /**
   * After an answer, the server's ids and versions of the messages shown (a regenerate or
   * an edit made a new version: "‹ 2 / 2 ›"), merged into the messages on screen.
   */
  async refreshVersions(conv) {
    let fresh = null;
    try {
      fresh = await this.history.get(conv.id);
    } catch {
      return; // the versions show on the next load
    }
    if (!fresh || this.conv !== conv) return;
    const shown = conv.messages;
    for (let i = 0; i < Math.min(shown.length, fresh.messages.length); i++) {
      const m = fresh.messages[i];
      if (m.role !== shown[i].role) break;
      const { id, parent_id, version, versions, sibling_ids } = m;
      Object.assign(shown[i], { id, parent_id, version, versions, sibling_ids });
    }
    this.updateComposer();
  }

  tick() {
    const run = this.run;
    if (!run) return;
    const view = this.views.get(run.msg);
    if (view) view.schedule(); // countdowns, thinking time, waiting time, live tokens/s
    const waited = waitingMs(run.msg);
    if (waited !== null && waited >= ANNOUNCE_WAIT_MS && run.announcedWait !== run.msg.text_at) {
      run.announcedWait = run.msg.text_at; // once per silence
      this.announce("Still waiting for the model.");
    }
  }

  stop() {
    if (this.run) this.run.stop();
  }

  /** Keep the answer in progress in sessionStorage (throttled), for reload-resume. */
  saveSnapshot(now) {
    const run = this.run;
    if (!run || !this.runConv) return;
    const write = () => {
      this.snapshotTimer = null;
      this.lastSnapshot = Date.now();
      if (this.run) session(ACTIVE_KEY, { conv: this.runConv, at: this.lastSnapshot });
    };
    if (now === true || Date.now() - this.lastSnapshot >= SNAPSHOT_EVERY_MS) {
      clearTimeout(this.snapshotTimer);
      write();
    } else if (!this.snapshotTimer) {
      this.snapshotTimer = setTimeout(write, SNAPSHOT_EVERY_MS);
    }
  }

  // ------------------------------------------------------------------ message actions

  onLogClick(e) {
    const target = e.target.closest("button");
    if (!target) return;
    if (target.classList.contains("copy-code")) {
      const code = target.closest(".code-block")?.querySelector("code");
      if (code) this.copy(code.textContent, target);
      return;
    }
    const article = target.closest("article");
    const msg = article && article.tokenrelay;
    if (!msg) return;
    if (target.classList.contains("copy-btn")) this.copy(msg.content, target);
    else if (target.classList.contains("regen-btn") || target.classList.contains("retry-btn")) this.regenerate(msg);
    else if (target.classList.contains("edit-btn")) this.startEdit(msg);
    else if (target.classList.contains("ver-prev")) this.switchVersion(msg, -1);
    else if (target.classList.contains("ver-next")) this.switchVersion(msg, 1);
  }

  /** Show the previous (-1) or next (+1) version of a message's turn. */
  async switchVersion(msg, delta) {
    const conv = this.conv;
    if (this.run || !conv || this.editing || this.switching) return;
    const i = conv.messages.indexOf(msg);
    if (i < 0) return;
    let next = conv;
    if (this.history.server) {
      this.switching = true;
      try {
        next = await this.history.switchVersion(conv, msg, delta);
      } catch (err) {
        this.announce(`Could not show that version: ${err.message}`);
        return;
      } finally {
        this.switching = false;
      }
      if (!next || this.conv !== conv || this.run) return;
    } else {
      if (!switchLocal(conv, i, delta)) return;
      this.history.save(conv);
    }
    this.show(next, true);
    const shown = next.messages[i];
    const view = shown && this.views.get(shown);
    if (!view) return;
    // Focus stays on the arrow pressed, or its twin once the end is reached.
    const same = view.el.querySelector(delta < 0 ? ".ver-prev" : ".ver-next");
    const other = view.el.querySelector(delta < 0 ? ".ver-next" : ".ver-prev");
    (same && !same.disabled ? same : other)?.focus({ preventScroll: true });
    const { version, versions } = versionOf(shown);
    this.announce(`Version ${version} of ${versions}`);
  }

  async copy(text, button) {
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = "Copied";
    } catch {
      button.textContent = "Copy failed";
    }
    setTimeout(() => {
      button.textContent = "Copy";
    }, 1500);
  }

  regenerate(msg) {
    const conv = this.conv;
    if (this.run || !conv) return;
    const i = conv.messages.indexOf(msg);
    if (i < 0 || i !== conv.messages.length - 1) return;
    // The answer shown becomes an earlier version (kept: here, or by the server).
    const { tail, variants } = branchAt(conv, i);
    for (const old of tail) this.views.get(old)?.el.remove();
    this.ask(variants);
    this.dom.stop.focus(); // the button pressed is gone with its answer
  }

  startEdit(msg) {
    const conv = this.conv;
    if (this.run || !conv || this.editing) return;
    const view = this.views.get(msg);
    if (!view) return;
    const form = document.createElement("form");
    form.className = "edit-form";
    const label = document.createElement("label");
    label.className = "visually-hidden";
    label.textContent = "Edit your message";
    const area = document.createElement("textarea");
    area.value = msg.content;
    area.rows = Math.min(10, Math.max(2, msg.content.split("\n").length));
    area.id = "edit-input";
    label.htmlFor = area.id;
    const actions = document.createElement("div");
    actions.className = "edit-actions";
    const cancel = document.createElement("button");
    cancel.type = "button";
    cancel.className = "btn btn-secondary btn-small";
    cancel.textContent = "Cancel";
    const save = document.createElement("button");
    save.type = "submit";
    save.className = "btn btn-primary btn-small";
    save.textContent = "Save & send";
    actions.append(cancel, save);
    form.append(label, area, actions);
    view.el.classList.add("is-editing");
    view.bubble.hidden = true;
    view.el.insertBefore(form, view.bubble);
    this.editing = { msg, view, form };
    this.updateComposer();
    area.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        form.requestSubmit();
      } else if (e.key === "Escape") {
        e.preventDefault();
        this.cancelEdit();
      }
    });
    cancel.addEventListener("click", () => this.cancelEdit());
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      this.finishEdit(area.value);
    });
    area.focus();
    area.setSelectionRange(area.value.length, area.value.length);
  }

  cancelEdit() {
    const editing = this.editing;
    if (!editing) return;
    this.editing = null;
    editing.form.remove();
    editing.view.bubble.hidden = false;
    editing.view.el.classList.remove("is-editing");
    editing.view.editBtn.focus();
    this.updateComposer();
  }

  finishEdit(text) {
    const editing = this.editing;
    const conv = this.conv;
    if (!editing || !conv || !text.trim() || this.run) return;
    this.editing = null;
    const i = conv.messages.indexOf(editing.msg);
    if (i < 0) return;
    // The question and what followed it become an earlier version of this turn.
    const { tail, variants } = branchAt(conv, i);
    for (const later of tail) this.views.get(later)?.el.remove();
    const user = { role: "user", content: text };
    if (!this.history.server) adoptVariants(user, variants);
    conv.messages.push(user);
    this.append(user);
    this.dom.input.focus();
    this.ask();
  }

  // ------------------------------------------------------------------ composer & layout

  updateComposer() {
    const d = this.dom;
    const busy = Boolean(this.run);
    d.send.hidden = busy;
    d.stop.hidden = !busy;
    d.send.disabled = !this.ready || busy || !d.input.value.trim() || !this.currentModel();
    d.model.disabled = !this.ready || busy || (this.models.size === 0 && !this.anyModel);
    d.modelName.disabled = !this.ready || busy;
    d.exportBtn.disabled = !this.conv || !this.conv.messages.length;
    d.input.rows = Math.min(8, Math.max(1, d.input.value.split("\n").length));
    // Only the last user message and the last answer offer Edit / Regenerate.
    const msgs = this.conv ? this.conv.messages : [];
    let lastUser = null;
    for (let i = msgs.length - 1; i >= 0; i--) {
      if (msgs[i].role === "user") {
        lastUser = msgs[i];
        break;
      }
    }
    for (const msg of msgs) {
      const view = this.views.get(msg);
      if (!view) continue;
      view.renderVersions(busy || Boolean(this.editing));
      if (view instanceof UserView) view.setEditable(!busy && !this.editing && msg === lastUser);
      else {
        const can = !busy && msg === msgs[msgs.length - 1];
        if (view.canRegenerate !== can) {
          view.canRegenerate = can;
          view.render();
        }
      }
    }
  }

  isNearBottom() {
    const m = this.dom.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight < 120;
  }

  scrollToBottom() {
    const m = this.dom.messages;
    m.scrollTop = m.scrollHeight;
    this.follow = true;
    this.dom.jump.hidden = true;
  }

  afterViewRender() {
    // Follow the answer while the reader is at the bottom; leave them alone if they scrolled up.
    if (this.follow) this.scrollToBottom();
    else this.updateJump();
  }

  /** "Jump to latest" while the reader is scrolled away from the end of the conversation. */
  updateJump() {
    const away = !this.follow && !this.isNearBottom();
    if (this.dom.jump.hidden === away) {
      if (!away && document.activeElement === this.dom.jump) this.dom.input.focus({ preventScroll: true });
      this.dom.jump.hidden = !away;
    }
  }

  /** Mobile: the sidebar is a drawer (open/closed). Desktop: it can be collapsed. */
  toggleSidebar(force) {
    const app = this.dom.app;
    const mobile = this.mobile.matches;
    let expanded;
    if (mobile) {
      expanded = typeof force === "boolean" ? force : !app.classList.contains("sidebar-open");
      app.classList.toggle("sidebar-open", expanded);
    } else {
      app.classList.remove("sidebar-open");
      if (typeof force !== "boolean") app.classList.toggle("sidebar-collapsed");
      expanded = !app.classList.contains("sidebar-collapsed");
    }
    this.dom.toggle.setAttribute("aria-expanded", String(expanded));
    this.dom.toggle.setAttribute("aria-label", expanded ? "Hide conversations" : "Show conversations");
    this.dom.scrim.hidden = !(mobile && expanded);
    this.dom.sidebar.inert = mobile && !expanded;
    if (mobile && expanded) this.dom.newChat.focus();
  }

  announce(text) {
    this.dom.announcer.textContent = "";
    setTimeout(() => {
      this.dom.announcer.textContent = text;
    }, 50);
  }

  // ------------------------------------------------------------------ history sidebar

  async refreshList() {
    let items = [];
    const query = this.query;
    try {
      items = await this.history.list(query);
    } catch (err) {
      if (err instanceof ApiError && err.status === 404 && this.history.server) {
        this.history = new LocalHistory();
        items = await this.history.list(query);
      }
    }
    if (query !== this.query) return; // a newer search is on its way
    const ul = this.dom.convList;
    this.dom.convEmpty.textContent = query.trim() ? "No conversations match." : "No conversations yet.";
    this.dom.convEmpty.hidden = items.length > 0;
    // An unchanged list is left alone: a half-done rename or delete confirmation survives.
    const key = JSON.stringify(items.map((c) => [c.id, c.title]));
    if (key === this.listKey && ul.children.length === items.length) {
      this.markCurrent();
      return;
    }
    this.listKey = key;
    // Keep keyboard focus on the same control of the same conversation across the refresh
    // (a refresh lands whenever an answer ends, possibly mid-Tab through the list).
    const focused = document.activeElement;
    const focusedId = ul.contains(focused) ? focused.closest("li")?.dataset.id : undefined;
    const focusedKind = focusedId && ["conv-rename", "conv-delete"].find((k) => focused.classList.contains(k));
    ul.replaceChildren(...items.map((c) => this.convItem(c)));
    this.markCurrent();
    if (focusedId) {
      ul.querySelector(`li[data-id="${CSS.escape(focusedId)}"] .${focusedKind || "conv-open"}`)?.focus();
    }
  }

  convItem(c) {
    const li = document.createElement("li");
    li.className = "conv-item";
    li.dataset.id = c.id;
    const open = document.createElement("button");
    open.type = "button";
    open.className = "conv-open";
    open.textContent = c.title || "New chat";
    open.title = c.title || "New chat";
    const rename = document.createElement("button");
    rename.type = "button";
    rename.className = "icon-btn conv-rename";
    rename.setAttribute("aria-label", `Rename “${c.title || "New chat"}”`);
    rename.innerHTML = '<span class="icon icon-edit" aria-hidden="true"></span>';
    const del = document.createElement("button");
    del.type = "button";
    del.className = "icon-btn conv-delete";
    del.setAttribute("aria-label", `Delete “${c.title || "New chat"}”`);
    del.innerHTML = '<span class="icon icon-trash" aria-hidden="true"></span>';
    li.append(open, rename, del);
    open.addEventListener("click", () => this.openConversation(c.id));
    rename.addEventListener("click", () => this.renameInline(li, c));
    del.addEventListener("click", () => this.deleteWithConfirm(li, del, c));
    return li;
  }

  markCurrent() {
    const id = this.conv && this.conv.id;
    for (const li of this.dom.convList.children) {
      const open = li.querySelector(".conv-open");
      if (li.dataset.id === id) open.setAttribute("aria-current", "page");
      else open.removeAttribute("aria-current");
    }
  }

  async openConversation(id) {
    if (this.conv && this.conv.id === id) return this.toggleSidebar(false);
    let conv = this.runConv && this.runConv.id === id ? this.runConv : null;
    if (!conv) {
      try {
        conv = await this.history.get(id);
      } catch {
        conv = null;
      }
    }
    if (!conv) {
      this.announce("That conversation no longer exists.");
      await this.refreshList();
      return;
    }
    this.show(conv);
    this.toggleSidebar(false);
    if (conv === this.runConv) this.views.get(this.run.msg)?.render();
    else this.resumeStored(conv);
    if (!this.mobile.matches) this.dom.input.focus(); // on phones that would pop the keyboard
  }

  renameInline(li, c) {
    const open = li.querySelector(".conv-open");
    const input = document.createElement("input");
    input.type = "text";
    input.className = "conv-rename-input";
    input.value = c.title || "";
    input.setAttribute("aria-label", "Conversation title");
    input.maxLength = 200;
    open.replaceWith(input);
    input.focus();
    input.select();
    let done = false;
    const finish = async (save) => {
      if (done) return;
      done = true;
      const title = input.value.trim();
      if (save && title && title !== c.title) {
        try {
          await this.history.rename(c.id, title);
          if (this.conv && this.conv.id === c.id) {
            this.conv.title = title;
            this.dom.title.textContent = title;
            document.title = `${title} · tokenrelay`;
          }
        } catch {
          this.announce("Rename failed.");
        }
      }
      this.listKey = null; // the item's button comes back even if the title did not change
      await this.refreshList();
      this.dom.convList.querySelector(`li[data-id="${CSS.escape(c.id)}"] .conv-open`)?.focus();
    };
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter") {
        e.preventDefault();
        finish(true);
      } else if (e.key === "Escape") {
        e.preventDefault();
        finish(false);
      }
    });
    input.addEventListener("blur", () => finish(true));
  }

  deleteWithConfirm(li, button, c) {
    if (!button.classList.contains("confirm")) {
      button.classList.add("confirm");
      button.setAttribute("aria-label", `Confirm delete “${c.title || "New chat"}”`);
      button.innerHTML = '<span class="confirm-text">Delete?</span>';
      const reset = () => {
        button.classList.remove("confirm");
        button.setAttribute("aria-label", `Delete “${c.title || "New chat"}”`);
        button.innerHTML = '<span class="icon icon-trash" aria-hidden="true"></span>';
      };
      button.addEventListener("blur", reset, { once: true });
      return;
    }
    this.deleteConversation(c.id);
  }

  async deleteConversation(id) {
    if (this.runConv && this.runConv.id === id && this.run) this.run.stop();
    // Where focus goes afterwards: the next conversation, else the previous, else New chat.
    const li = this.dom.convList.querySelector(`li[data-id="${CSS.escape(id)}"]`);
    const neighbour = (li?.nextElementSibling || li?.previousElementSibling)?.dataset.id;
    try {
      await this.history.remove(id);
    } catch {
      this.announce("Delete failed.");
      return;
    }
    if (this.conv && this.conv.id === id) this.show(null);
    await this.refreshList();
    const next = neighbour && this.dom.convList.querySelector(`li[data-id="${CSS.escape(neighbour)}"] .conv-open`);
    (next || this.dom.newChat).focus();
    this.announce("Conversation deleted.");
  }
}

applyTheme(savedTheme());
const app = new App();
app.init();
