/*
 * The widget: state, tabs, stream and view wired together, and what the user can do.
 * Loaded by widget.js (the one <script> tag) as an ES module; `start` is called once per page.
 */

import { loadMarkdown } from "./render.js";
import { IN_FLIGHT, Store, emptyState, inFlight, newId, questionOf } from "./state.js";
import { AnswerStream, isAfter, terminalStatus } from "./stream.js";
import { Tabs } from "./tabs.js";
import { View } from "./view.js";

const STALE_HIDDEN_MS = 5000;
const CANCEL_GRACE_MS = 4000;
const RETRYABLE_CODES = new Set(["empty_answer", "internal_error", "upstream_overloaded", "producer_lost", "server_shutdown"]);
const ERROR_TEXT = {
  upstream_bad_response: "The model sent an answer that could not be read.",
  empty_answer: "The model returned an empty answer.",
  internal_error: "Something went wrong on the service.",
};
const DONE_NOTES = {
  length: "The answer reached its length limit.",
  content_filter: "The answer was cut short by the provider's content filter.",
};

function parseData(data) {
  try {
    const value = JSON.parse(data);
    return value && typeof value === "object" ? value : {};
  } catch {
    return {};
  }
}

const str = (value) => (typeof value === "string" ? value : "");

async function problemText(response) {
  try {
    const body = await response.json();
    return body.detail || body.title || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

class Widget {
  constructor(base, openOnLoad) {
    this.base = base;
    this.api = (path) => new URL(path, base);
    this.name = `chatbot-widget:v1:${base}`;
    this.store = new Store(this.name);
    this.state = this.store.load();
    this.openOnLoad = openOnLoad;
    this.view = new View(base);
    this.view.onRetry = (id) => this.retry(id);
    this.tabs = null;
    this.sending = false;
    this.stopping = false;
    this.announced = new Set(); // "<session id>:<what>" already said in this tab
    this.dirty = new Set();
    this.frame = 0;
    this.cancelTimer = 0;
    this.hiddenAt = 0;
    this.stream = new AnswerStream(this.api, {
      event: (msg, name, id, data) => this.onStreamEvent(msg, name, id, data),
      status: (msg, status) => this.leaderChange(msg, { status, note: "" }),
      settle: (msg, session) => this.settle(msg, session),
      restart: (msg) => this.leaderChange(msg, { text: "", reasoning: "", sources: [], lastEventId: null }),
      lost: (msg) => this.leaderChange(msg, { status: "error", note: "This answer is no longer available." }),
    });
  }

  start() {
    const { view } = this;
    document.body.append(view.host);
    this.tabs = new Tabs(this.name, {
      onMessage: (message) => this.onTabMessage(message),
      onLeader: () => this.lead(),
    });
    view.host.dataset.tab = "follower";
    this.renderAll({ scroll: true });
    this.setOpen(this.state.open || this.openOnLoad, { focus: false });
    // Heights change when the styles, then markdown, arrive: the newest message stays in view.
    view.styled.then(() => view.scrollToEnd());
    loadMarkdown(this.base).then(() => {
      for (const msg of this.state.messages) this.dirty.add(msg);
      this.flush();
      view.scrollToEnd();
    });
    this.wire();
    this.tabs.post({ t: "sync" });
  }

  // ---- the state and its views ---------------------------------------------------------

  save() {
    this.store.save(this.state);
  }

  asked(msg) {
    return msg.askedBy === this.tabs.id;
  }

  isLatest(msg) {
    return this.state.messages[this.state.messages.length - 1] === msg;
  }

  renderAll({ scroll }) {
    this.dirty.clear();
    this.view.showAll(this.state.messages, { isLatest: (m) => this.isLatest(m) });
    if (scroll) this.view.scrollToEnd();
    this.controls();
  }

  /** Repaint `msg` at the next frame (tokens), or at once. */
  paint(msg, { now = false } = {}) {
    this.dirty.add(msg);
    if (now) this.flush();
    else if (!this.frame) this.frame = requestAnimationFrame(() => this.flush());
  }

  flush() {
    cancelAnimationFrame(this.frame);
    this.frame = 0;
    const stick = this.view.nearBottom();
    let askedHere = false;
    for (const msg of this.dirty) {
      if (!this.state.messages.includes(msg)) continue;
      this.view.paint(msg, { latest: this.isLatest(msg) });
      askedHere ||= this.asked(msg);
    }
    this.dirty.clear();
    // Only the tab that asked follows the answer down; the others never move their reader.
    if (stick && askedHere) this.view.scrollToEnd();
  }

  controls() {
    const msg = inFlight(this.state);
    this.view.controls({ busy: this.sending || msg !== null, canStop: msg !== null });
    // A tab that did not ask does not read the answer out as it arrives.
    this.view.log.setAttribute("aria-live", msg && !this.asked(msg) ? "off" : "polite");
  }

  /** Say something about an answer once, in the tab that asked it. */
  announceOnce(msg, what, text, options) {
    const key = `${msg.sessionId}:${what}`;
    if (!this.asked(msg) || this.announced.has(key)) return;
    this.announced.add(key);
    this.view.announce(text, options);
  }

  ended(msg) {
    clearTimeout(this.cancelTimer);
    const text =
      msg.status === "done"
        ? `Answer complete.${msg.note ? ` ${msg.note}` : ""}`
        : msg.status === "cancelled"
          ? "Answer stopped."
          : `Answer failed. ${msg.note || ""}`;
    this.announceOnce(msg, "end", text, { brief: true });
    this.paint(msg, { now: true });
    this.controls();
  }

  // ---- events: applied the same way in every tab ----------------------------------------

  /** Apply one event of `msg`'s stream; false if it is not after what is already shown. */
  apply(msg, name, id, data) {
    if (!isAfter(id, msg.lastEventId)) return false;
    const payload = parseData(data);
    if (id) msg.lastEventId = id;
    if (name === "token") {
      msg.text += str(payload.text);
      if (msg.status !== "streaming") Object.assign(msg, { status: "streaming", note: "" });
    } else if (name === "reasoning") {
      msg.reasoning = (msg.reasoning || "") + str(payload.text);
      this.announceOnce(msg, "reasoning", "Thinking\u2026", { brief: true });
    } else if (name === "sources") {
      msg.sources = Array.isArray(payload.sources) ? payload.sources : [];
    } else if (name === "done") {
      const reason = str(payload.finish_reason);
      msg.finishReason = reason;
      Object.assign(msg, reason === "cancelled" ? { status: "cancelled", note: "" } : { status: "done", note: DONE_NOTES[reason] || "" });
    } else if (name === "error") {
      const code = str(payload.code);
      msg.retryable = typeof payload.retryable === "boolean" ? payload.retryable : RETRYABLE_CODES.has(code);
      msg.errorCode = code;
      Object.assign(msg, { status: "error", note: str(payload.message).trim() || ERROR_TEXT[code] || "The answer failed." });
    }
    return true;
  }

  afterApply(msg) {
    if (IN_FLIGHT.has(msg.status)) this.paint(msg);
    else this.ended(msg);
  }

  /** Leader: an event from the EventSource. Saved with its id, then relayed to the other tabs. */
  onStreamEvent(msg, name, id, data) {
    const prev = msg.lastEventId;
    if (!this.apply(msg, name, id, data)) return;
    this.save(); // text and id together, so a reload resumes exactly here
    if (this.tabs.shared) this.tabs.post({ t: "event", sessionId: msg.sessionId, prev, name, id, data });
    this.afterApply(msg);
  }

  /** Leader: a change that is not an event (reconnecting, the service's final text): saved and shared. */
  leaderChange(msg, fields) {
    const wasInFlight = IN_FLIGHT.has(msg.status);
    Object.assign(msg, fields);
    if (fields.status === "reconnecting" && wasInFlight) {
      this.announceOnce(msg, `reconnecting:${msg.lastEventId}`, "Connection lost, reconnecting\u2026", { brief: true });
    }
    this.save();
    if (this.tabs.shared) this.tabs.post({ t: "msg", msg });
    if (wasInFlight && !IN_FLIGHT.has(msg.status)) this.ended(msg);
    else {
      this.paint(msg, { now: true });
      this.controls();
    }
  }

  settle(msg, session) {
    const status = terminalStatus(session.status);
    // The service's text is the whole answer: it replaces ours, it is never appended to it.
    const fields = { status, note: status === "error" ? "The answer failed." : "" };
    if (typeof session.text === "string") fields.text = session.text;
    if (typeof session.reasoning === "string") fields.reasoning = session.reasoning;
    if (Array.isArray(session.sources)) fields.sources = session.sources;
    this.leaderChange(msg, fields);
  }

  // ---- tabs ----------------------------------------------------------------------------

  /** This tab now holds the stream: follow the answer in flight after the last id it has. */
  lead() {
    this.view.host.dataset.tab = "leader";
    const msg = inFlight(this.state);
    if (!msg || this.stream.msg === msg) return;
    if (msg.sessionId) this.stream.follow(msg);
    else if (!this.sending) this.leaderChange(msg, { status: "error", note: "The answer was interrupted." });
  }

  find(sessionId) {
    return this.state.messages.find((m) => m.role === "assistant" && m.sessionId && m.sessionId === sessionId) || null;
  }

  onTabMessage(message) {
    const leader = this.tabs.leader;
    // Without a leader election every tab streams for itself; only whole-conversation changes are shared.
    if (!this.tabs.shared && message.t !== "state") return;
    if (message.t === "event") {
      const msg = this.find(message.sessionId);
      if (!msg || !isAfter(message.id, msg.lastEventId)) return;
      if ((msg.lastEventId || null) !== (message.prev || null)) return this.tabs.post({ t: "sync" }); // a gap
      if (this.apply(msg, message.name, message.id, message.data)) this.afterApply(msg);
    } else if (message.t === "msg") {
      const msg = this.state.messages.find((m) => m.id === message.msg.id);
      if (!msg) return this.tabs.post({ t: "sync" });
      const wasInFlight = IN_FLIGHT.has(msg.status);
      Object.assign(msg, message.msg);
      if (wasInFlight && !IN_FLIGHT.has(msg.status)) this.ended(msg);
      else {
        this.paint(msg, { now: true });
        this.controls();
      }
    } else if (message.t === "state") {
      // A copy sent for a tab that just opened must not undo a question this tab is sending.
      if (!(message.sync && this.sending)) this.adopt(message.state);
    } else if (message.t === "sync" && leader) {
      this.tabs.post({ t: "state", state: this.state, sync: true });
    } else if (message.t === "check" && leader) {
      const msg = inFlight(this.state);
      if (msg && msg.sessionId) message.reconcile ? this.stream.reconcile(msg) : this.stream.check(msg);
    }
  }

  /** Take another tab's conversation; messages already here keep their objects and views. */
  adopt(incoming) {
    const local = new Map(this.state.messages.map((m) => [m.id, m]));
    const messages = incoming.messages.map((m) => {
      const mine = local.get(m.id);
      if (!mine) return m;
      const ahead = mine.lastEventId && m.lastEventId && isAfter(mine.lastEventId, m.lastEventId);
      if (!ahead) Object.assign(mine, m);
      return mine;
    });
    this.state = { ...incoming, messages, open: this.state.open };
    if (this.stream.msg && !messages.includes(this.stream.msg)) this.stream.close();
    this.renderAll({ scroll: false });
    if (this.tabs.leader) {
      this.save(); // over anything this tab wrote before it heard of the change
      this.lead();
    }
  }

  publish() {
    this.tabs.post({ t: "state", state: this.state });
  }

  // ---- what the user does --------------------------------------------------------------

  setOpen(open, options) {
    if (this.state.open !== open) {
      this.state.open = open;
      this.save();
    }
    this.view.setOpen(open, options);
  }

  /** Ask `text`; with `again`, ask it once more in place of that failed answer. */
  async send(text, { again = null } = {}) {
    if (this.sending || inFlight(this.state) || !text.trim()) return;
    const { view } = this;
    this.sending = true;
    if (again) {
      this.state.messages = this.state.messages.filter((m) => m !== again);
    } else {
      this.state.messages.push({ id: newId(), role: "user", text });
      view.input.value = "";
    }
    this.commit();
    const body = { message: text };
    if (this.state.conversationId) body.conversation_id = this.state.conversationId;
    let created = null;
    let failure = "";
    let retryable = true;
    try {
      const response = await fetch(this.api("sessions"), {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify(body),
      });
      if (response.ok) created = await response.json();
      else failure = await problemText(response);
      retryable = response.status === 429 || response.status >= 500;
      if (response.status === 404 && body.conversation_id) {
        // The conversation expired on the service: the next message starts a new one.
        this.state.conversationId = null;
        failure += " Send again to start a new conversation.";
      }
    } catch {
      failure = "The service could not be reached.";
    }
    this.sending = false;
    const answer = { id: newId(), role: "assistant", text: "", askedBy: this.tabs.id, reasoning: "", sources: [] };
    if (!created) {
      Object.assign(answer, { sessionId: "", status: "error", note: failure, retryable });
      this.state.messages.push(answer);
      this.commit();
      this.view.announce(`Answer failed. ${failure}`, { brief: true });
      return;
    }
    this.state.conversationId = created.conversation_id || this.state.conversationId;
    Object.assign(answer, { sessionId: created.id, status: "streaming", lastEventId: null });
    this.state.messages.push(answer);
    this.commit();
    if (this.tabs.leader) this.stream.follow(answer);
  }

  /** A change made in this tab: saved, shown, and sent to the other tabs. */
  commit() {
    this.save();
    this.publish();
    this.renderAll({ scroll: true });
  }

  retry(id) {
    const msg = this.state.messages.find((m) => m.id === id);
    if (!msg) return;
    this.send(questionOf(this.state, msg), { again: msg });
    this.view.input.focus();
  }

  async stop() {
    const msg = inFlight(this.state);
    if (!msg || this.stopping) return;
    const { stopButton } = this.view;
    // aria-disabled, not disabled: a disabled button drops keyboard focus to <body>.
    this.stopping = true;
    stopButton.setAttribute("aria-disabled", "true");
    try {
      const response = await fetch(this.api(`sessions/${encodeURIComponent(msg.sessionId)}/cancel`), { method: "POST" });
      if (!response.ok && response.status !== 409) this.view.announce(await problemText(response), { brief: true });
    } catch {
      this.view.announce("Could not reach the service to stop the answer.", { brief: true });
    } finally {
      this.stopping = false;
      stopButton.removeAttribute("aria-disabled");
    }
    // The stream ends with done{cancelled}; if it does not arrive, ask the service directly.
    clearTimeout(this.cancelTimer);
    this.cancelTimer = setTimeout(() => {
      if (IN_FLIGHT.has(msg.status)) this.check(msg, { reconcile: true });
    }, CANCEL_GRACE_MS);
    if (this.tabs.leader && !this.stream.open) this.stream.reconcile(msg);
  }

  /** Have the leader look at the answer in flight (this tab, or another over the channel). */
  check(msg, { reconcile = false, stale = false } = {}) {
    if (!this.tabs.leader) return this.tabs.post({ t: "check", reconcile });
    if (reconcile) this.stream.reconcile(msg);
    else this.stream.check(msg, { stale });
  }

  newConversation() {
    const msg = inFlight(this.state);
    this.stream.close();
    if (msg && msg.sessionId) {
      // Nobody will see this answer any more: stop paying for it.
      fetch(this.api(`sessions/${encodeURIComponent(msg.sessionId)}/cancel`), { method: "POST" }).catch(() => {});
    }
    this.state = { ...emptyState(), open: this.state.open };
    this.commit();
    this.view.input.focus();
    this.view.announce("New conversation.", { brief: true });
  }

  onVisible() {
    if (this.frame) this.flush();
    const msg = inFlight(this.state);
    if (msg && msg.sessionId) this.check(msg, { stale: Date.now() - this.hiddenAt > STALE_HIDDEN_MS });
  }

  // ---- wiring --------------------------------------------------------------------------

  wire() {
    const { view } = this;
    let composing = false;
    // An IME's Enter confirms a word: Chromium says isComposing, Safari sends keyCode 229 after compositionend.
    const imeKey = (event) => event.isComposing || composing || event.keyCode === 229;
    view.input.addEventListener("compositionstart", () => (composing = true));
    view.input.addEventListener("compositionend", () => (composing = false));
    view.input.addEventListener("blur", () => (composing = false)); // a composition cut short by focus loss
    view.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.send(view.input.value);
      view.input.focus();
    });
    view.input.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !imeKey(event)) {
        event.preventDefault();
        this.send(view.input.value);
      }
    });
    view.stopButton.addEventListener("click", () => this.stop());
    view.newButton.addEventListener("click", () => this.newConversation());
    view.launcher.addEventListener("click", () => this.setOpen(true));
    view.closeButton.addEventListener("click", () => this.setOpen(false));
    view.panel.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && !imeKey(event)) this.setOpen(false);
    });
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "hidden") this.hiddenAt = Date.now();
      else this.onVisible();
    });
  }
}

/** Start the widget for the service at `base`; `open` opens the panel on load. */
export function start({ base, open = false }) {
  const widget = new Widget(base, open);
  if (document.body) widget.start();
  else document.addEventListener("DOMContentLoaded", () => widget.start(), { once: true });
}
