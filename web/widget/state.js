/*
 * The conversation and where it is kept.
 *
 * One JSON value in localStorage holds the conversation id and the messages; an answer in flight is
 * saved with its text so far and the id of the last event that text includes, in the same setItem, so
 * the two always agree and a reload resumes after exactly that id.
 *
 * What is stored is always read, even when writing fails (a full or read-only storage). When the whole
 * state does not fit, the newest state that does is kept: the newest answer without its text (read
 * again from its first event after a reload), then older messages dropped, oldest first.
 */

export const IN_FLIGHT = new Set(["streaming", "reconnecting"]);

export function newId() {
  if (window.crypto && typeof crypto.randomUUID === "function" && window.isSecureContext) return crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

export function emptyState() {
  return { conversationId: null, messages: [], open: false };
}

function validMessage(m) {
  return m && (m.role === "user" || m.role === "assistant") && typeof m.text === "string";
}

/** A stored value as a state; anything malformed gives an empty conversation. */
export function parseState(raw) {
  let saved = null;
  try {
    saved = JSON.parse(raw || "null");
  } catch {
    saved = null;
  }
  if (!saved || !Array.isArray(saved.messages)) return emptyState();
  const messages = saved.messages.filter(validMessage).map((m) => ({ ...m, id: m.id || newId() }));
  return { ...emptyState(), ...saved, messages };
}

/** The answer still streaming, if any. */
export function inFlight(state) {
  return state.messages.find((m) => m.role === "assistant" && IN_FLIGHT.has(m.status)) || null;
}

/** The question an answer replies to: the user's message just before it. */
export function questionOf(state, msg) {
  const index = state.messages.indexOf(msg);
  for (let i = index - 1; i >= 0; i--) if (state.messages[i].role === "user") return state.messages[i].text;
  return "";
}

/** Smaller and smaller forms of `state`, newest kept longest. */
function* shrinking(state) {
  const all = state.messages;
  const last = all[all.length - 1];
  let kept = all;
  if (last && last.role === "assistant" && last.sessionId) {
    // First the newest answer's text goes: it is read again from its first event after a reload,
    // so a gap is never stored; the conversation before it stays whole.
    const restarted = { ...last, text: "", reasoning: "", sources: [], lastEventId: null, status: "streaming", note: "" };
    kept = [...all.slice(0, -1), restarted];
    yield { ...state, messages: kept };
  }
  for (let drop = 1; drop < kept.length; drop++) yield { ...state, messages: kept.slice(drop) };
}

export class Store {
  constructor(key) {
    this.key = key;
    this.memory = null; // used only when localStorage cannot even be read
    try {
      this.local = window.localStorage;
      this.local.getItem(key);
    } catch {
      this.local = null;
    }
  }

  load() {
    if (!this.local) return parseState(this.memory);
    try {
      return parseState(this.local.getItem(this.key));
    } catch {
      return parseState(this.memory);
    }
  }

  /** Write `state`, or the newest smaller form of it that fits; false if nothing could be written. */
  save(state) {
    const whole = JSON.stringify(state);
    if (!this.local) {
      this.memory = whole;
      return true;
    }
    if (this.write(whole)) return true;
    for (const smaller of shrinking(state)) if (this.write(JSON.stringify(smaller))) return true;
    return false; // what was stored before stays: older, but whole and consistent
  }

  write(value) {
    try {
      this.local.setItem(this.key, value);
      return true;
    } catch {
      return false;
    }
  }
}
