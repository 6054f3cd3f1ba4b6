// Follows one answer with npm's `eventsource`, using the README's plain-EventSource snippet as written.
// Usage: node follow.mjs <events url> <file holding the snippet>
// Prints one JSON object per line: {"kind": "open"} | {"kind": "event", "type", "id", "data"} | {"kind": "end", ...}
import { readFileSync } from "node:fs";
import { EventSource } from "eventsource";

const [url, snippetFile] = process.argv.slice(2);
globalThis.EventSource = EventSource;
const followAnswer = new Function(`${readFileSync(snippetFile, "utf8")}\nreturn followAnswer;`)();
const print = (record) => process.stdout.write(`${JSON.stringify(record)}\n`);
const LINGER_MS = 1500; // stay a while after the end, so that a reconnect would be seen

// eventsource 5 unrefs its reconnect timer, so a script whose only work is a pending reconnect would exit
// mid-answer: hold the process open until the answer ends.
const alive = setInterval(() => {}, 60_000);
let text = "";
const end = (how, payload) => {
  print({ kind: "end", how, payload, text });
  clearInterval(alive);
  setTimeout(() => process.exit(0), LINGER_MS);
};
const source = followAnswer(url, {
  onText: (piece) => { text += piece; },
  onDone: (done) => end("done", done),
  onError: (error) => end("error", error),
});
source.addEventListener("open", () => print({ kind: "open" }));
source.onmessage = (event) => print({ kind: "event", type: "message", id: event.lastEventId, data: event.data });
for (const type of ["token", "done", "error", "reasoning", "sources"]) {
  source.addEventListener(type, (event) => {
    if (typeof event.data === "string") print({ kind: "event", type, id: event.lastEventId, data: event.data });
  });
}
