/*
 * Tabs of one site share one conversation and one event stream.
 *
 * A Web Lock elects the leader: the one tab that holds the EventSource of the answer in flight and
 * writes the stored conversation while it streams. It relays every event over a BroadcastChannel;
 * the other tabs apply the same events to their copy. When the leader's tab closes, its lock is
 * released and the next tab waiting for it becomes the leader, resuming after the last event id it
 * has. Without Web Locks (an insecure origin) every tab leads itself; without BroadcastChannel tabs
 * stay apart.
 */

import { newId } from "./state.js";

/** This tab's id; it survives a reload of the tab (sessionStorage), so the tab that asked still knows it. */
function tabId(name) {
  const key = `${name}:tab`;
  try {
    const saved = window.sessionStorage.getItem(key);
    if (saved) return saved;
    const id = newId();
    window.sessionStorage.setItem(key, id);
    return id;
  } catch {
    return newId();
  }
}

export class Tabs {
  /**
   * @param {string} name a name shared by the tabs of one site and one service
   * @param {{onMessage(message: object): void, onLeader(): void}} hooks
   */
  constructor(name, hooks) {
    this.id = tabId(name);
    this.leader = false;
    this.hooks = hooks;
    this.channel = null;
    // One stream for all tabs needs both a leader (Web Locks) and a way to relay (BroadcastChannel).
    this.shared = typeof BroadcastChannel === "function" && Boolean(navigator.locks);
    if (typeof BroadcastChannel === "function") {
      this.channel = new BroadcastChannel(name);
      this.channel.onmessage = (event) => {
        if (event.data && event.data.from !== this.id) hooks.onMessage(event.data);
      };
    }
    this.elect(`${name}:leader`);
  }

  elect(lockName) {
    const lead = () => {
      this.leader = true;
      this.hooks.onLeader();
    };
    if (!navigator.locks || typeof navigator.locks.request !== "function") {
      queueMicrotask(lead);
      return;
    }
    // Held until the page goes away: the promise never settles.
    navigator.locks
      .request(lockName, () => {
        lead();
        return new Promise(() => {});
      })
      .catch(() => {
        if (!this.leader) lead();
      });
  }

  post(message) {
    try {
      this.channel?.postMessage({ ...message, from: this.id });
    } catch (err) {
      console.warn("chatbot widget: could not reach the other tabs", err);
    }
  }
}
