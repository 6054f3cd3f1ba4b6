/*
 * chatbot chat widget. Embed with one tag:
 *   <script src="https://<service>/widget.js" defer></script>
 * Optional attribute: data-open="true" opens the panel on load.
 *
 * The conversation lives in localStorage, including the text and the last event id of an
 * answer still in flight, saved together; a reload resumes the event stream after that id,
 * so every token is appended exactly once. Model output is untrusted: it is rendered with
 * marked, sanitized with DOMPurify, and stripped of remote images.
 */
(() => {
  "use strict";

  const script = document.currentScript;
  const INSTANCE = Symbol.for("chatbot-widget");
  if (!script || window[INSTANCE]) return;
  window[INSTANCE] = true;

  const BASE = new URL(".", script.src);
  const STORAGE_KEY = `chatbot-widget:v1:${BASE.href}`;
  const IN_FLIGHT = new Set(["streaming", "reconnecting"]);
  const RETRY_MIN_MS = 500;
  const RETRY_MAX_MS = 10000;
  const STALE_HIDDEN_MS = 5000;
  const CANCEL_GRACE_MS = 4000;
  const MAX_REFUSALS = 3;
  const REMOTE_TAGS = ["img", "picture", "source", "video", "audio", "track", "iframe", "object", "embed"];
  const FORM_TAGS = ["form", "input", "button", "textarea", "select", "option", "style", "link", "meta", "base"];

  // ---- small helpers -------------------------------------------------------------------

  const api = (path) => new URL(path, BASE);
  const sessionPath = (id) => `sessions/${encodeURIComponent(id)}`;

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === true) node.setAttribute(name, "");
      else if (value !== false && value != null) node.setAttribute(name, String(value));
    }
    node.append(...children);
    return node;
  }

  function parseData(event) {
    try {
      return JSON.parse(event.data);
    } catch {
      return {};
    }
  }

  /** True when event id `a` comes strictly after `b` (stream ids "ms-seq"; unknown forms: differ). */
  function isAfter(a, b) {
    if (!b || !a) return true;
    const pa = /^(\d+)-(\d+)$/.exec(a);
    const pb = /^(\d+)-(\d+)$/.exec(b);
    if (!pa || !pb) return a !== b;
    const [ma, sa, mb, sb] = [pa[1], pa[2], pb[1], pb[2]].map(BigInt);
    return ma > mb || (ma === mb && sa > sb);
  }

  async function problemText(response) {
    try {
      const body = await response.json();
      return body.detail || body.title || `HTTP ${response.status}`;
    } catch {
      return `HTTP ${response.status}`;
    }
  }

  // ---- persisted state -----------------------------------------------------------------

  const memoryStore = new Map();
  const storage = (() => {
    try {
      const probe = `${STORAGE_KEY}:probe`;
      window.localStorage.setItem(probe, "1");
      window.localStorage.removeItem(probe);
      return window.localStorage;
    } catch {
      return {
        getItem: (k) => memoryStore.get(k) ?? null,
        setItem: (k, v) => memoryStore.set(k, v),
        removeItem: (k) => memoryStore.delete(k),
      };
    }
  })();

  function emptyState() {
    return { conversationId: null, messages: [], open: false };
  }

  function loadState() {
    try {
      const saved = JSON.parse(storage.getItem(STORAGE_KEY) || "null");
      if (saved && Array.isArray(saved.messages)) return { ...emptyState(), ...saved };
    } catch {
      /* a corrupt entry is dropped below */
    }
    return emptyState();
  }

  let state = loadState();

  function save() {
    try {
      storage.setItem(STORAGE_KEY, JSON.stringify(state));
    } catch {
      /* quota exceeded: the page keeps working, a reload loses the tail */
    }
  }

  // ---- markdown, sanitized -------------------------------------------------------------

  let markdown = null; // {marked, DOMPurify} once the vendored modules have loaded

  const ready = Promise.all([
    import(api("vendor/marked.esm.js").href),
    import(api("vendor/purify.es.mjs").href),
  ])
    .then(([markedModule, purifyModule]) => {
      markdown = { marked: markedModule.marked, DOMPurify: purifyModule.default };
    })
    .catch((err) => {
      console.warn("chatbot widget: markdown disabled, showing plain text", err);
    });

  function renderInto(target, text) {
    if (!markdown) {
      target.replaceChildren(el("p", {}, text));
      return;
    }
    const html = markdown.marked.parse(text, { async: false, gfm: true, breaks: true });
    const fragment = markdown.DOMPurify.sanitize(html, {
      USE_PROFILES: { html: true },
      FORBID_TAGS: FORM_TAGS,
      FORBID_ATTR: ["style", "srcset", "background", "poster", "formaction"],
      RETURN_DOM_FRAGMENT: true,
    });
    neuterRemoteResources(fragment);
    target.replaceChildren(fragment);
  }

  /** Replace anything that would fetch from another host (an exfiltration channel) with text. */
  function neuterRemoteResources(root) {
    for (const node of root.querySelectorAll(REMOTE_TAGS.join(","))) {
      const src = node.getAttribute("src") || "";
      if (node.localName === "img" && /^data:image\/(png|gif|jpe?g|webp);/i.test(src)) continue;
      const alt = node.getAttribute("alt") || node.localName;
      node.replaceWith(document.createTextNode(`[${alt}]`));
    }
    for (const link of root.querySelectorAll("a[href]")) {
      link.setAttribute("target", "_blank");
      link.setAttribute("rel", "noopener noreferrer nofollow");
    }
  }

  // ---- DOM -----------------------------------------------------------------------------

  const host = el("div", { class: "chatbot-widget-host" });
  host.style.display = "none"; // until widget.css has loaded; CSSOM is allowed under a strict CSP
  const root = host.attachShadow({ mode: "open" });
  const stylesheet = el("link", { rel: "stylesheet", href: api("widget.css").href });
  stylesheet.addEventListener("load", () => (host.style.display = ""));
  stylesheet.addEventListener("error", () => (host.style.display = ""));

  const launcher = el(
    "button",
    { type: "button", class: "launcher", "aria-controls": "panel", "aria-expanded": "false" },
    "Chat"
  );
  const newButton = el("button", { type: "button", class: "ghost", "data-testid": "chat-new" }, "New conversation");
  const closeButton = el("button", { type: "button", class: "ghost close", "aria-label": "Close chat" }, "\u00d7");
  const log = el("div", {
    class: "log",
    role: "log",
    "aria-live": "polite",
    "aria-label": "Conversation",
    tabindex: "0",
  });
  const empty = el("p", { class: "empty" }, "Ask a question to start.");
  const announcer = el("div", { class: "sr-only", role: "status", "aria-live": "polite" });
  const input = el("textarea", {
    id: "input",
    rows: "2",
    "data-testid": "chat-input",
    placeholder: "Ask something\u2026",
    autocomplete: "off",
    enterkeyhint: "send",
  });
  const sendButton = el("button", { type: "submit", class: "primary", "data-testid": "chat-send" }, "Send");
  const stopButton = el("button", { type: "button", class: "stop", "data-testid": "chat-stop", hidden: true }, "Stop");
  const form = el(
    "form",
    { class: "composer" },
    el("label", { for: "input", class: "sr-only" }, "Message"),
    input,
    sendButton,
    stopButton
  );
  const panel = el(
    "section",
    { id: "panel", class: "panel", role: "dialog", "aria-labelledby": "title", hidden: true },
    el("header", {}, el("h2", { id: "title" }, "Assistant"), newButton, closeButton),
    log,
    announcer,
    form
  );
  root.append(stylesheet, launcher, panel);

  const views = new Map(); // message object -> its element

  function messageView(msg) {
    let view = views.get(msg);
    if (view) return view;
    if (msg.role === "user") {
      view = el("div", { class: "msg user" }, el("p", {}, msg.text));
    } else {
      const retry = el("button", { type: "button", class: "retry", "data-testid": "chat-retry", hidden: true }, "Try again");
      retry.addEventListener("click", () => {
        send(msg.question, { again: msg });
        input.focus();
      });
      view = el(
        "article",
        { class: "msg assistant", "data-testid": "assistant-message" },
        el("div", { class: "body" }),
        el("p", { class: "note" }),
        retry
      );
    }
    views.set(msg, view);
    return view;
  }

  const NOTES = {
    streaming: "",
    reconnecting: "Connection lost, reconnecting\u2026",
    done: "",
    cancelled: "Stopped.",
    error: "",
  };

  function paintAssistant(msg) {
    const view = messageView(msg);
    view.dataset.status = msg.status;
    view.dataset.sessionId = msg.sessionId || "";
    view.setAttribute("aria-busy", String(IN_FLIGHT.has(msg.status)));
    renderInto(view.querySelector(".body"), msg.text);
    const note = msg.note || NOTES[msg.status] || "";
    const noteEl = view.querySelector(".note");
    noteEl.textContent = note;
    noteEl.hidden = !note;
    // Only the latest answer can be asked again: an earlier one is followed by the conversation.
    const latest = state.messages[state.messages.length - 1] === msg;
    view.querySelector(".retry").hidden = !(msg.status === "error" && msg.retryable && msg.question && latest);
  }

  let paintQueued = new Set();
  let frame = 0;

  /** Coalesce token repaints into one per animation frame. */
  function schedulePaint(msg) {
    paintQueued.add(msg);
    if (!frame) frame = requestAnimationFrame(flushPaint);
  }

  function flushPaint() {
    frame = 0;
    const queued = paintQueued;
    paintQueued = new Set();
    const stick = nearBottom();
    for (const msg of queued) paintAssistant(msg);
    if (stick) scrollToEnd();
  }

  function nearBottom() {
    return log.scrollHeight - log.scrollTop - log.clientHeight < 48;
  }

  function scrollToEnd() {
    log.scrollTop = log.scrollHeight;
  }

  function renderAll() {
    views.clear();
    const nodes = state.messages.map((msg) => {
      const view = messageView(msg);
      if (msg.role === "assistant") paintAssistant(msg);
      return view;
    });
    log.replaceChildren(...(nodes.length ? nodes : [empty]));
    scrollToEnd();
    renderControls();
  }

  function append(msg) {
    const previous = state.messages[state.messages.length - 1];
    state.messages.push(msg);
    if (previous && previous.role === "assistant") paintAssistant(previous); // no longer the latest
    empty.remove();
    log.append(messageView(msg));
    if (msg.role === "assistant") paintAssistant(msg);
    scrollToEnd();
  }

  function remove(msg) {
    state.messages = state.messages.filter((m) => m !== msg);
    views.get(msg)?.remove();
    views.delete(msg);
  }

  function inFlight() {
    return state.messages.find((m) => m.role === "assistant" && IN_FLIGHT.has(m.status)) || null;
  }

  let sending = false;
  let stopping = false;

  function renderControls() {
    const busy = sending || inFlight() !== null;
    const stopHadFocus = root.activeElement === stopButton;
    sendButton.hidden = busy;
    stopButton.hidden = !busy;
    stopButton.disabled = !inFlight();
    if (stopHadFocus && !busy) input.focus();
  }

  function setOpen(open, { focus = true } = {}) {
    state.open = open;
    save();
    panel.hidden = !open;
    launcher.setAttribute("aria-expanded", String(open));
    launcher.hidden = open;
    if (!focus) return;
    if (open) input.focus();
    else launcher.focus();
  }

  // ---- the event stream of one answer --------------------------------------------------

  let active = null; // {msg, source}
  let retryDelay = RETRY_MIN_MS;
  let retryTimer = 0;
  let refusals = 0; // resumes the service answered with an error status, in a row
  let cancelTimer = 0;

  function closeStream() {
    if (active) active.source.close();
    active = null;
    clearTimeout(retryTimer);
  }

  function setStatus(msg, status, note = "") {
    if (msg.status === status && (msg.note || "") === note) return;
    msg.status = status;
    msg.note = note;
    save();
    paintAssistant(msg);
    renderControls();
  }

  function finish(msg, status, note = "") {
    if (active && active.msg === msg) closeStream();
    clearTimeout(cancelTimer);
    paintQueued.delete(msg);
    setStatus(msg, status, note);
    announcer.textContent =
      status === "done" ? "Answer complete." : status === "cancelled" ? "Answer stopped." : `Answer failed. ${note}`;
  }

  function openStream(msg) {
    closeStream();
    const url = api(`events/${encodeURIComponent(msg.sessionId)}`);
    // A new EventSource cannot set Last-Event-ID; the service accepts it as a query parameter.
    if (msg.lastEventId) url.searchParams.set("last_event_id", msg.lastEventId);
    const source = new EventSource(url.href);
    active = { msg, source };
    const current = () => active && active.source === source;
    // Drops anything at or before what is already shown: a replay is never appended twice.
    const fresh = (event) => current() && isAfter(event.lastEventId, msg.lastEventId);

    source.addEventListener("open", () => {
      if (!current()) return;
      retryDelay = RETRY_MIN_MS;
      refusals = 0;
      if (msg.status === "reconnecting") setStatus(msg, "streaming");
    });
    source.addEventListener("token", (event) => {
      if (!fresh(event)) return;
      const { text } = parseData(event);
      msg.text += typeof text === "string" ? text : "";
      msg.lastEventId = event.lastEventId || msg.lastEventId;
      save(); // text and id together, so a reload resumes exactly here
      if (msg.status !== "streaming") setStatus(msg, "streaming");
      schedulePaint(msg);
    });
    source.addEventListener("done", (event) => {
      if (!fresh(event)) return;
      const { finish_reason: reason } = parseData(event);
      msg.lastEventId = event.lastEventId || msg.lastEventId;
      if (reason === "cancelled") finish(msg, "cancelled");
      else finish(msg, "done", reason === "length" ? "The answer reached its length limit." : "");
    });
    source.addEventListener("error", (event) => {
      if (!current()) return;
      if (typeof event.data === "string") {
        // The service's terminal `error` event, not a transport failure.
        if (!isAfter(event.lastEventId, msg.lastEventId)) return;
        const { message, retryable } = parseData(event);
        msg.lastEventId = event.lastEventId || msg.lastEventId;
        msg.retryable = retryable === true;
        finish(msg, "error", message || "The answer failed.");
      } else if (source.readyState === EventSource.CONNECTING) {
        setStatus(msg, "reconnecting"); // the browser retries by itself, sending Last-Event-ID
      } else {
        reconcile(msg, { refused: true }); // closed: 204 (already finished), 4xx, 5xx
      }
    });
  }

  /** Ask the service where an answer stands, then show its final text or resume its stream. */
  async function reconcile(msg, { refused = false } = {}) {
    if (active && active.msg === msg) closeStream();
    let response;
    try {
      response = await fetch(api(sessionPath(msg.sessionId)), { headers: { Accept: "application/json" } });
    } catch {
      return retryLater(msg);
    }
    if (!IN_FLIGHT.has(msg.status)) return; // finished meanwhile
    if (response.status === 404 || response.status === 410) {
      return finish(msg, "error", "This answer is no longer available.");
    }
    if (!response.ok) return retryLater(msg);
    const session = await response.json();
    const outcome = terminalStatus(session.status);
    if (outcome) {
      // The server's text is the whole answer: it replaces ours, it is never appended to it.
      if (typeof session.text === "string") msg.text = session.text;
      finish(msg, outcome, outcome === "error" ? "The answer failed." : "");
    } else {
      if (refused && ++refusals >= MAX_REFUSALS) {
        // The service keeps refusing to resume after our id (say, its buffer was trimmed): read the
        // answer again from its first event, replacing our text rather than appending to it.
        refusals = 0;
        msg.text = "";
        msg.lastEventId = null;
        save();
        paintAssistant(msg);
      }
      retryLater(msg);
    }
  }

  function terminalStatus(status) {
    if (["done", "stop", "length", "completed", "finished"].includes(status)) return "done";
    if (status === "cancelled" || status === "canceled") return "cancelled";
    if (status === "error" || status === "failed") return "error";
    return null;
  }

  function retryLater(msg) {
    if (!IN_FLIGHT.has(msg.status)) return;
    setStatus(msg, "reconnecting");
    clearTimeout(retryTimer);
    retryTimer = setTimeout(() => {
      if (IN_FLIGHT.has(msg.status)) openStream(msg);
    }, retryDelay);
    retryDelay = Math.min(retryDelay * 2, RETRY_MAX_MS);
  }

  // ---- user actions --------------------------------------------------------------------

  /** Ask `text`; with `again`, ask it once more in place of that failed answer. */
  async function send(text, { again = null } = {}) {
    if (sending || inFlight() || !text.trim()) return;
    sending = true;
    if (again) {
      remove(again);
    } else {
      append({ role: "user", text });
      input.value = "";
    }
    save();
    renderControls();
    const body = { message: text };
    if (state.conversationId) body.conversation_id = state.conversationId;
    let created = null;
    let failure = "";
    let retryable = true;
    try {
      const response = await fetch(api("sessions"), {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify(body),
      });
      if (response.ok) created = await response.json();
      else failure = await problemText(response);
      retryable = response.status === 429 || response.status >= 500;
      if (response.status === 404 && body.conversation_id) {
        // The conversation expired on the service: the next message starts a new one.
        state.conversationId = null;
        failure += " Send again to start a new conversation.";
      }
    } catch {
      failure = "The service could not be reached.";
    }
    sending = false;
    if (!created) {
      append({ role: "assistant", text: "", sessionId: "", status: "error", note: failure, question: text, retryable });
      save();
      renderControls();
      return;
    }
    state.conversationId = created.conversation_id || state.conversationId;
    const msg = { role: "assistant", text: "", sessionId: created.id, status: "streaming", lastEventId: null, question: text };
    append(msg);
    save();
    renderControls();
    openStream(msg);
  }

  async function stop() {
    const msg = inFlight();
    if (!msg || stopping) return;
    // aria-disabled, not disabled: a disabled button drops keyboard focus to <body>.
    stopping = true;
    stopButton.setAttribute("aria-disabled", "true");
    try {
      const response = await fetch(api(`${sessionPath(msg.sessionId)}/cancel`), { method: "POST" });
      if (!response.ok && response.status !== 409) announcer.textContent = await problemText(response);
    } catch {
      announcer.textContent = "Could not reach the service to stop the answer.";
    } finally {
      stopping = false;
      stopButton.removeAttribute("aria-disabled");
    }
    // The stream ends with done{cancelled}; if it does not arrive, ask the service directly.
    clearTimeout(cancelTimer);
    cancelTimer = setTimeout(() => {
      if (IN_FLIGHT.has(msg.status)) reconcile(msg);
    }, CANCEL_GRACE_MS);
    if (!active || active.source.readyState === EventSource.CLOSED) reconcile(msg);
  }

  function newConversation() {
    const msg = inFlight();
    closeStream();
    if (msg) {
      // Nobody will see this answer any more: stop paying for it.
      fetch(api(`${sessionPath(msg.sessionId)}/cancel`), { method: "POST" }).catch(() => {});
    }
    state = { ...emptyState(), open: state.open };
    save();
    renderAll();
    input.focus();
    announcer.textContent = "New conversation.";
  }

  // A backgrounded tab (phones especially) may hold a dead connection that still says OPEN.
  let hiddenAt = 0;

  async function onVisible() {
    const msg = inFlight();
    if (!msg) return;
    if (frame) flushPaint();
    const stale = Date.now() - hiddenAt > STALE_HIDDEN_MS;
    if (!active || active.msg !== msg || active.source.readyState === EventSource.CLOSED || stale) {
      openStream(msg);
      return;
    }
    try {
      const response = await fetch(api(sessionPath(msg.sessionId)), { headers: { Accept: "application/json" } });
      if (!response.ok) return;
      const session = await response.json();
      // Finished on the server but not here: resume after our last id to get exactly the rest.
      if (terminalStatus(session.status) && IN_FLIGHT.has(msg.status)) openStream(msg);
    } catch {
      /* offline: EventSource keeps retrying on its own */
    }
  }

  // ---- wiring --------------------------------------------------------------------------

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    send(input.value);
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send(input.value);
    }
  });
  stopButton.addEventListener("click", stop);
  newButton.addEventListener("click", newConversation);
  launcher.addEventListener("click", () => setOpen(true));
  closeButton.addEventListener("click", () => setOpen(false));
  panel.addEventListener("keydown", (event) => {
    if (event.key === "Escape") setOpen(false);
  });
  // Another tab of this site changed the conversation: show it, unless this tab is mid-answer itself.
  // An answer in flight there is followed through its saves; if that tab goes away, this one
  // resumes the stream when it is next visible.
  window.addEventListener("storage", (event) => {
    if (event.key !== STORAGE_KEY || event.newValue === null || active || sending) return;
    closeStream(); // a pending resume belongs to the state being replaced
    state = { ...loadState(), open: state.open };
    renderAll();
  });
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "hidden") hiddenAt = Date.now();
    else onVisible();
  });

  function start() {
    document.body.append(host);
    renderAll();
    const openOnLoad = script.dataset.open === "true";
    setOpen(state.open || openOnLoad, { focus: false });
    const msg = inFlight();
    if (msg && msg.sessionId) openStream(msg);
    else if (msg) finish(msg, "error", "The answer was interrupted.");
    ready.then(() => {
      for (const m of state.messages) if (m.role === "assistant") paintAssistant(m);
    });
  }

  if (document.body) start();
  else document.addEventListener("DOMContentLoaded", start, { once: true });
})();
