/*
 * The event stream of the answer in flight, held by the leader tab only.
 *
 * An EventSource opened after the last event id shown (`?last_event_id=`: a new EventSource cannot
 * set the header); the browser's own reconnects send Last-Event-ID. A stream the service refuses
 * (204, 4xx, 5xx) is closed by the browser for good: then `GET /sessions/<id>` says where the answer
 * stands, and its whole text replaces ours, or the stream is opened again later.
 */

import { IN_FLIGHT } from "./state.js";

const RETRY_MIN_MS = 500;
const RETRY_MAX_MS = 10000;
const MAX_REFUSALS = 3;
export const EVENTS = ["token", "reasoning", "sources", "done", "error"];

/** True when event id `a` comes strictly after `b` (stream ids "ms-seq"; unknown forms: differ). */
export function isAfter(a, b) {
  if (!b || !a) return true;
  const pa = /^(\d+)-(\d+)$/.exec(a);
  const pb = /^(\d+)-(\d+)$/.exec(b);
  if (!pa || !pb) return a !== b;
  const [ma, sa, mb, sb] = [pa[1], pa[2], pb[1], pb[2]].map(BigInt);
  return ma > mb || (ma === mb && sa > sb);
}

export function terminalStatus(status) {
  if (["done", "stop", "length", "completed", "finished"].includes(status)) return "done";
  if (status === "cancelled" || status === "canceled") return "cancelled";
  if (status === "error" || status === "failed") return "error";
  return null;
}

export class AnswerStream {
  /**
   * @param {(path: string) => URL} api
   * @param {{event(msg, name, id, data): void, status(msg, status): void,
   *          settle(msg, session): void, restart(msg): void, lost(msg): void}} hooks
   */
  constructor(api, hooks) {
    this.api = api;
    this.hooks = hooks;
    this.msg = null;
    this.source = null;
    this.retryDelay = RETRY_MIN_MS;
    this.retryTimer = 0;
    this.refusals = 0; // resumes the service answered with an error status, in a row
  }

  get open() {
    return this.source !== null && this.source.readyState !== EventSource.CLOSED;
  }

  close() {
    this.source?.close();
    this.source = null;
    this.msg = null;
    clearTimeout(this.retryTimer);
  }

  /** Open (or re-open) the stream of `msg` after its last event id. */
  follow(msg) {
    this.close();
    this.msg = msg;
    const url = this.api(`events/${encodeURIComponent(msg.sessionId)}`);
    if (msg.lastEventId) url.searchParams.set("last_event_id", msg.lastEventId);
    const source = new EventSource(url.href);
    this.source = source;
    const current = () => this.source === source;

    source.addEventListener("open", () => {
      if (!current()) return;
      this.retryDelay = RETRY_MIN_MS;
      this.refusals = 0;
      if (msg.status === "reconnecting") this.hooks.status(msg, "streaming");
    });
    for (const name of EVENTS) {
      source.addEventListener(name, (event) => {
        if (!current()) return;
        // A transport failure is an `error` event without data; the service's own `error` has data.
        if (name === "error" && typeof event.data !== "string") return this.onFailure(msg, source);
        this.hooks.event(msg, name, event.lastEventId, event.data);
        if (!IN_FLIGHT.has(msg.status) && current()) this.close();
      });
    }
  }

  onFailure(msg, source) {
    if (source.readyState === EventSource.CONNECTING) {
      this.hooks.status(msg, "reconnecting"); // the browser retries by itself, sending Last-Event-ID
    } else {
      this.reconcile(msg, { refused: true }); // closed: 204 (already finished), 4xx, 5xx
    }
  }

  /** Ask the service where an answer stands, then show its final text or resume its stream. */
  async reconcile(msg, { refused = false } = {}) {
    if (this.msg === msg) this.close();
    let response;
    try {
      response = await fetch(this.api(`sessions/${encodeURIComponent(msg.sessionId)}`), {
        headers: { Accept: "application/json" },
      });
    } catch {
      return this.retryLater(msg);
    }
    if (!IN_FLIGHT.has(msg.status)) return; // finished meanwhile
    if (response.status === 404 || response.status === 410) return this.hooks.lost(msg);
    if (!response.ok) return this.retryLater(msg);
    let session;
    try {
      session = await response.json();
    } catch {
      return this.retryLater(msg);
    }
    if (terminalStatus(session.status)) return this.hooks.settle(msg, session);
    if (refused && ++this.refusals >= MAX_REFUSALS) {
      // The service keeps refusing to resume after our id (its buffer was trimmed, say): read the
      // answer again from its first event, replacing our text rather than appending to it.
      this.refusals = 0;
      this.hooks.restart(msg);
    }
    this.retryLater(msg);
  }

  retryLater(msg) {
    if (!IN_FLIGHT.has(msg.status)) return;
    this.hooks.status(msg, "reconnecting");
    clearTimeout(this.retryTimer);
    this.msg = msg;
    this.retryTimer = setTimeout(() => {
      if (IN_FLIGHT.has(msg.status) && this.msg === msg) this.follow(msg);
    }, this.retryDelay);
    this.retryDelay = Math.min(this.retryDelay * 2, RETRY_MAX_MS);
  }

  /** Check a stream that may be silently dead (a tab woken from sleep); `stale` re-opens it at once. */
  async check(msg, { stale = false } = {}) {
    if (!IN_FLIGHT.has(msg.status)) return;
    if (stale || this.msg !== msg || !this.open) return this.follow(msg);
    try {
      const response = await fetch(this.api(`sessions/${encodeURIComponent(msg.sessionId)}`), {
        headers: { Accept: "application/json" },
      });
      if (!response.ok) return;
      const session = await response.json();
      // Finished on the server but not here: resume after our last id to get exactly the rest.
      if (terminalStatus(session.status) && IN_FLIGHT.has(msg.status)) this.follow(msg);
    } catch {
      /* offline: EventSource keeps retrying on its own */
    }
  }
}
