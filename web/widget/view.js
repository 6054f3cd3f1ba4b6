/*
 * The widget's DOM, in an open shadow root: launcher, panel, conversation log, message box.
 * Painting a message touches only what changed; an answer's text goes through StreamingText.
 */

import { StreamingText } from "./render.js";
import { IN_FLIGHT } from "./state.js";

const NOTES = { reconnecting: "Connection lost, reconnecting\u2026", cancelled: "Stopped." };
const STATUS_CLEAR_MS = 4000;
const NEAR_BOTTOM_PX = 48;

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === true) node.setAttribute(name, "");
    else if (value !== false && value != null) node.setAttribute(name, String(value));
  }
  node.append(...children);
  return node;
}

export class View {
  constructor(base) {
    this.host = el("div", { class: "chatbot-widget-host" });
    this.host.style.display = "none"; // until widget.css has loaded; CSSOM is allowed under a strict CSP
    this.root = this.host.attachShadow({ mode: "open" });
    const stylesheet = el("link", { rel: "stylesheet", href: new URL("widget.css", base).href });
    this.styled = new Promise((resolve) => {
      stylesheet.addEventListener("load", resolve);
      stylesheet.addEventListener("error", resolve);
    }).then(() => {
      this.host.style.display = "";
    });

    this.launcher = el(
      "button",
      { type: "button", class: "launcher", "aria-controls": "panel", "aria-expanded": "false" },
      "Chat"
    );
    this.newButton = el("button", { type: "button", class: "ghost", "data-testid": "chat-new" }, "New conversation");
    this.closeButton = el("button", { type: "button", class: "ghost close", "aria-label": "Close chat" }, "\u00d7");
    this.log = el("div", { class: "log", role: "log", "aria-live": "polite", "aria-label": "Conversation", tabindex: "0" });
    this.empty = el("p", { class: "empty" }, "Ask a question to start.");
    this.announcer = el("div", { class: "sr-only", role: "status", "aria-live": "polite" });
    this.input = el("textarea", {
      id: "input",
      rows: "2",
      dir: "auto",
      "data-testid": "chat-input",
      placeholder: "Ask something\u2026",
      autocomplete: "off",
      enterkeyhint: "send",
    });
    this.sendButton = el("button", { type: "submit", class: "primary", "data-testid": "chat-send" }, "Send");
    this.stopButton = el("button", { type: "button", class: "stop", "data-testid": "chat-stop", hidden: true }, "Stop");
    this.form = el(
      "form",
      { class: "composer" },
      el("label", { for: "input", class: "sr-only" }, "Message"),
      this.input,
      this.sendButton,
      this.stopButton
    );
    this.panel = el(
      "section",
      { id: "panel", class: "panel", role: "dialog", "aria-labelledby": "title", hidden: true },
      el("header", {}, el("h2", { id: "title" }, "Assistant"), this.newButton, this.closeButton),
      this.log,
      this.announcer,
      this.form
    );
    this.root.append(stylesheet, this.launcher, this.panel);
    this.views = new Map(); // message id -> {node, ...parts}
    this.clearTimer = 0;
  }

  // ---- messages ----------------------------------------------------------------------

  /** Show exactly `messages`, in order, re-using the nodes of those already shown. */
  showAll(messages, { isLatest }) {
    const keep = new Set(messages.map((m) => m.id));
    for (const [id, view] of this.views) {
      if (!keep.has(id)) {
        view.node.remove();
        this.views.delete(id);
      }
    }
    const nodes = messages.map((msg) => this.paint(msg, { latest: isLatest(msg) }).node);
    if (!nodes.length) {
      this.log.replaceChildren(this.empty);
      return;
    }
    this.empty.remove();
    // Move only what is out of place: nodes left where they are keep selection and focus.
    let before = this.log.firstChild;
    for (const node of nodes) {
      if (node === before) before = node.nextSibling;
      else this.log.insertBefore(node, before);
    }
    while (before) {
      const next = before.nextSibling;
      before.remove();
      before = next;
    }
  }

  messageView(msg) {
    let view = this.views.get(msg.id);
    if (view) return view;
    if (msg.role === "user") {
      view = { node: el("div", { class: "msg user", dir: "auto" }, el("p", {}, msg.text)) };
    } else {
      const body = el("div", { class: "body", dir: "auto" });
      const note = el("p", { class: "note", dir: "auto", hidden: true });
      const retry = el("button", { type: "button", class: "retry", "data-testid": "chat-retry", hidden: true }, "Try again");
      const node = el("article", { class: "msg assistant", "data-testid": "assistant-message" }, body, note, retry);
      view = { node, body, note, retry, text: new StreamingText(body), reasoning: null, sources: null, sourcesKey: "" };
      retry.addEventListener("click", () => this.onRetry?.(msg.id));
    }
    this.views.set(msg.id, view);
    return view;
  }

  /** Bring a message's view up to date with `msg`; returns the view. */
  paint(msg, { latest = false } = {}) {
    const view = this.messageView(msg);
    if (msg.role !== "assistant") return view;
    const { node } = view;
    node.dataset.status = msg.status;
    node.dataset.sessionId = msg.sessionId || "";
    node.setAttribute("aria-busy", String(IN_FLIGHT.has(msg.status)));
    this.paintReasoning(view, msg.reasoning || "");
    view.text.update(msg.text, { final: !IN_FLIGHT.has(msg.status) });
    this.paintSources(view, Array.isArray(msg.sources) ? msg.sources : []);
    const note = msg.note || NOTES[msg.status] || "";
    if (view.note.textContent !== note) view.note.textContent = note;
    view.note.hidden = !note;
    // Only the latest answer can be asked again: an earlier one is followed by the conversation.
    view.retry.hidden = !(msg.status === "error" && msg.retryable && latest);
    return view;
  }

  paintReasoning(view, text) {
    if (!text) {
      view.reasoning?.details.remove();
      view.reasoning = null;
      return;
    }
    if (!view.reasoning) {
      const body = el("div", { class: "reasoning-text", dir: "auto" });
      const details = el("details", { class: "reasoning" }, el("summary", {}, "Thinking\u2026"), body);
      view.node.insertBefore(details, view.body);
      view.reasoning = { details, body };
    }
    // Plain text, appended: what is already shown is never replaced while it grows.
    const shown = view.reasoning.body.textContent;
    if (text.startsWith(shown)) {
      if (text.length > shown.length) view.reasoning.body.append(text.slice(shown.length));
    } else view.reasoning.body.textContent = text;
  }

  paintSources(view, sources) {
    const safe = [];
    for (const source of sources) {
      try {
        const url = new URL(source && source.url);
        if (url.protocol === "http:" || url.protocol === "https:") {
          const title = typeof source.title === "string" && source.title.trim() ? source.title : url.href;
          safe.push({ url: url.href, title });
        }
      } catch {
        /* not a URL: left out */
      }
    }
    const key = JSON.stringify(safe);
    if (key === view.sourcesKey) return;
    view.sourcesKey = key;
    view.sources?.remove();
    view.sources = null;
    if (!safe.length) return;
    const items = safe.map((s) =>
      el("li", { dir: "auto" }, el("a", { href: s.url, target: "_blank", rel: "noopener noreferrer" }, s.title))
    );
    view.sources = el("nav", { class: "sources", "aria-label": "Sources" }, el("ul", {}, ...items));
    view.body.after(view.sources);
  }

  // ---- scrolling, focus, announcements -------------------------------------------------

  nearBottom() {
    return this.log.scrollHeight - this.log.scrollTop - this.log.clientHeight < NEAR_BOTTOM_PX;
  }

  scrollToEnd() {
    this.log.scrollTop = this.log.scrollHeight;
  }

  /** Say `text` once through the status region; `brief` clears it after a moment. */
  announce(text, { brief = false } = {}) {
    clearTimeout(this.clearTimer);
    this.announcer.textContent = text;
    if (brief) this.clearTimer = setTimeout(() => (this.announcer.textContent = ""), STATUS_CLEAR_MS);
  }

  controls({ busy, canStop }) {
    const stopHadFocus = this.root.activeElement === this.stopButton;
    const sendHadFocus = this.root.activeElement === this.sendButton;
    this.sendButton.hidden = busy;
    this.stopButton.hidden = !busy;
    this.stopButton.disabled = !canStop;
    // A button that disappears would drop keyboard focus to <body>: keep it in the message box.
    if ((stopHadFocus && !busy) || (sendHadFocus && busy)) this.input.focus();
  }

  setOpen(open, { focus = true } = {}) {
    this.panel.hidden = !open;
    this.launcher.setAttribute("aria-expanded", String(open));
    this.launcher.hidden = open;
    if (open) this.scrollToEnd();
    if (!focus) return;
    if (open) this.input.focus();
    else this.launcher.focus();
  }
}
