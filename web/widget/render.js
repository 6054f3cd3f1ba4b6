/*
 * Rendering model text: markdown to DOM nodes, block by block, while the answer streams.
 *
 * The text is cut into blocks by marked's lexer. A block followed by a blank line and the start of
 * another block is finished: it is rendered once, appended, and never touched again (so a selection,
 * a link being clicked or a screen reader's position in it survive the stream). Only the last block is
 * re-rendered as text arrives; in it, constructs that are not complete yet are held back (a table's
 * rows before its delimiter row, the URL of a half-written link).
 *
 * Nodes are built from marked's tokens with createElement and text nodes, never from an HTML string,
 * so raw HTML in the model's text is shown as the text it is, and no Trusted Types sink is used.
 * DOMPurify then checks the built nodes in place, as a last guard. Any failure shows plain text.
 */

const RENDER_FAILED = "chatbot widget: rendering failed, showing plain text";
const ENTITIES = { amp: "&", lt: "<", gt: ">", quot: '"', apos: "'", nbsp: "\u00a0" };
const LINK_REL = "noopener noreferrer nofollow";
const DATA_IMAGE = /^data:image\/(png|gif|jpe?g|webp);/i;
const PIPE_ROW = /^ {0,3}\|/;

let markdown = null; // {lexer, purify} once the vendored modules have loaded

/** Load marked and DOMPurify from `base`; until then, or if they fail, text is shown plain. */
export async function loadMarkdown(base) {
  try {
    const [markedModule, purifyModule] = await Promise.all([
      import(new URL("vendor/marked.esm.js", base).href),
      import(new URL("vendor/purify.es.mjs", base).href),
    ]);
    const marked = new markedModule.Marked({ gfm: true, breaks: true });
    markdown = { lexer: (text) => marked.lexer(text), purify: purifyModule.default };
  } catch (err) {
    console.warn("chatbot widget: markdown disabled, showing plain text", err);
  }
  return markdown !== null;
}

function el(tag, attrs, children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  if (children) node.append(...children);
  return node;
}

function decodeEntities(text) {
  if (!text.includes("&")) return text;
  return text.replace(/&(#x[0-9a-f]{1,6}|#\d{1,7}|[a-z]+);/gi, (whole, name) => {
    if (name[0] === "#") {
      const code = name[1] === "x" || name[1] === "X" ? parseInt(name.slice(2), 16) : parseInt(name.slice(1), 10);
      return code > 0 && code <= 0x10ffff && !(code >= 0xd800 && code <= 0xdfff) ? String.fromCodePoint(code) : "\ufffd";
    }
    return ENTITIES[name.toLowerCase()] ?? whole;
  });
}

/** An absolute http(s) or mailto URL, or null: anything else (javascript:, data:, relative) is not a link. */
function safeHref(href) {
  try {
    const url = new URL(href);
    return ["http:", "https:", "mailto:"].includes(url.protocol) ? url.href : null;
  } catch {
    return null;
  }
}

// ---- tokens to nodes ------------------------------------------------------------------

function inline(tokens) {
  const nodes = [];
  for (const token of tokens || []) {
    const node = inlineNode(token);
    if (node) nodes.push(node);
  }
  return nodes;
}

function inlineNode(token) {
  switch (token.type) {
    case "text":
      return token.tokens ? el("span", {}, inline(token.tokens)) : document.createTextNode(decodeEntities(token.text));
    case "escape":
      return document.createTextNode(token.text);
    case "strong":
    case "em":
    case "del":
      return el(token.type, {}, inline(token.tokens));
    case "codespan":
      return el("code", {}, [token.text]);
    case "br":
      return el("br");
    case "link": {
      const href = safeHref(token.href);
      const label = inline(token.tokens);
      return href ? el("a", { href, target: "_blank", rel: LINK_REL }, label) : el("span", {}, label);
    }
    case "image": {
      // A remote image is a way to leak the conversation to its host (CVE-2025-32711): only data: images.
      if (DATA_IMAGE.test(token.href)) return el("img", { src: token.href, alt: token.text || "" });
      return document.createTextNode(`[${token.text || "image"}]`);
    }
    case "checkbox":
      return document.createTextNode(token.checked ? "\u2611 " : "\u2610 ");
    default: // "html" (a tag in the model's text) and anything unknown: the text as written
      return document.createTextNode(token.raw || "");
  }
}

function blockNode(token) {
  switch (token.type) {
    case "space":
    case "def":
      return null;
    case "paragraph":
      return el("p", { dir: "auto" }, inline(token.tokens));
    case "text":
      return el("p", { dir: "auto" }, token.tokens ? inline(token.tokens) : [decodeEntities(token.text)]);
    case "heading":
      return el(`h${Math.min(Math.max(token.depth, 3), 6)}`, { dir: "auto" }, inline(token.tokens));
    case "code": {
      const lang = /^[\w+-]{1,32}$/.test(token.lang || "") ? { class: `language-${token.lang}` } : {};
      return el("pre", { dir: "ltr", tabindex: "0" }, [el("code", lang, [token.text])]);
    }
    case "blockquote":
      return el("blockquote", { dir: "auto" }, blocks(token.tokens));
    case "list": {
      const attrs = token.ordered && token.start !== 1 && token.start !== "" ? { start: String(token.start) } : {};
      return el(token.ordered ? "ol" : "ul", attrs, token.items.map(listItem));
    }
    case "table":
      return table(token);
    case "hr":
      return el("hr");
    case "html": // raw HTML written by the model: shown, not interpreted
      return el("p", { dir: "auto", class: "raw" }, [token.raw.replace(/\n+$/, "")]);
    default:
      return el("p", { dir: "auto" }, [token.raw || ""]);
  }
}

function listItem(item) {
  const children = [];
  for (const token of item.tokens) {
    if (token.type === "checkbox") children.push(inlineNode(token));
    else if (token.type === "text" && !item.loose) children.push(...(token.tokens ? inline(token.tokens) : [token.text]));
    else {
      const node = blockNode(token);
      if (node) children.push(node);
    }
  }
  return el("li", { dir: "auto" }, children);
}

function table(token) {
  const cell = (tag, c, i) => {
    const align = token.align[i];
    return el(tag, align ? { class: `align-${align}` } : {}, inline(c.tokens));
  };
  const head = el("thead", {}, [el("tr", {}, token.header.map((c, i) => cell("th", c, i)))]);
  const body = el("tbody", {}, token.rows.map((row) => el("tr", {}, row.map((c, i) => cell("td", c, i)))));
  // The box scrolls sideways, not the message: a wide table stays readable.
  return el("div", { class: "table-scroll", tabindex: "0", dir: "auto" }, [el("table", {}, [head, body])]);
}

function blocks(tokens) {
  const nodes = [];
  for (const token of tokens) {
    const node = blockNode(token);
    if (node) nodes.push(node, document.createTextNode("\n"));
  }
  return nodes;
}

/** DOMPurify over the built nodes, in place: the last guard should our renderer ever build something unsafe. */
function guard(nodes) {
  const box = document.createElement("div");
  box.append(...nodes);
  markdown.purify.sanitize(box, {
    IN_PLACE: true,
    USE_PROFILES: { html: true },
    ADD_ATTR: ["target"],
    FORBID_TAGS: ["form", "input", "button", "textarea", "select", "style", "link", "meta", "base", "iframe"],
    FORBID_ATTR: ["style", "srcset", "background", "poster", "formaction"],
  });
  return [...box.childNodes];
}

function plain(text) {
  return text ? [el("p", { dir: "auto", class: "plain" }, [text])] : [];
}

/** Render a stretch of markdown; plain text if markdown is unavailable or anything throws. */
export function renderMarkdown(text) {
  if (!markdown) return plain(text);
  try {
    return guard(blocks(markdown.lexer(text)));
  } catch (err) {
    console.warn(RENDER_FAILED, err);
    return plain(text);
  }
}

// ---- streaming: finished blocks and the one block still being written --------------------

/** Where the finished blocks of `text` end: after a blank line that another block has begun past. */
function stableEnd(tokens) {
  let end = 0;
  let offset = 0;
  let previous = null; // the last non-space token
  for (let i = 0; i < tokens.length; i++) {
    const token = tokens[i];
    offset += token.raw.length;
    if (token.type !== "space") {
      previous = token;
      continue;
    }
    const next = tokens.slice(i + 1).find((t) => t.type !== "space");
    if (!next || !previous || !token.raw.includes("\n")) continue;
    if (/^\s/.test(next.raw)) continue; // indented: may still belong to the block above
    if (previous.type === "list" && next.type === "list") continue; // one list, loosened by the blank line
    end = offset;
  }
  return end;
}

/** The text of the last block, with what is not complete yet held back or made plain. */
function settle(text) {
  const tokens = markdown.lexer(text).filter((t) => t.type !== "space");
  if (tokens.at(-1)?.type === "code") return text; // an open fence shows its code as it comes
  const lines = text.split("\n");
  // A table before its delimiter row is a paragraph of pipes: hold back the pipe rows until it is one.
  const end = lines[lines.length - 1] === "" ? lines.length - 1 : lines.length;
  let first = end;
  while (first > 0 && PIPE_ROW.test(lines[first - 1])) first--;
  if (first < end && markdown.lexer(lines.slice(first).join("\n"))[0]?.type !== "table") {
    text = lines.slice(0, first).join("\n");
  }
  // A link or image whose URL is still arriving: its label as text, the partial URL held back.
  text = text.replace(/(!?)\[([^\]\n]*)\]\([^)\s]*$/, (whole, bang, label) => (bang ? "" : label));
  // An emphasis or code span still open: close it, so the markers do not flash as text.
  const last = text.slice(text.lastIndexOf("\n") + 1);
  if ((last.match(/`/g) || []).length % 2 === 1) text += "`";
  else if ((last.match(/\*\*/g) || []).length % 2 === 1 && !/\*\*\s*$/.test(last)) text += "**";
  return text;
}

/** One answer's text as DOM, updated as it grows: finished blocks are appended once, never replaced. */
export class StreamingText {
  constructor(container) {
    this.container = container;
    this.committed = ""; // text of the finished blocks already in the container
    this.live = []; // nodes of the last block
    this.shown = null; // [text, final, markdown?] last rendered, to skip identical updates
  }

  update(rawText, { final = false } = {}) {
    const text = rawText.replace(/\r\n?/g, "\n");
    const key = `${final}:${markdown !== null}:${text}`;
    if (key === this.shown) return;
    this.shown = key;
    try {
      this.render(text, final);
    } catch (err) {
      console.warn(RENDER_FAILED, err);
      this.reset();
      this.live = plain(text); // replaced whole at the next update
      this.container.append(...this.live);
    }
  }

  reset() {
    this.committed = "";
    this.live = [];
    this.container.replaceChildren();
  }

  render(text, final) {
    if (!text.startsWith(this.committed) || (this.committed && !markdown)) this.reset();
    let tail = text.slice(this.committed.length);
    if (markdown) {
      const end = final ? tail.length : stableEnd(markdown.lexer(tail));
      if (end > 0) {
        for (const node of this.live) node.remove();
        this.live = [];
        this.container.append(...renderMarkdown(tail.slice(0, end)));
        this.committed += tail.slice(0, end);
        tail = tail.slice(end);
      }
    }
    for (const node of this.live) node.remove();
    this.live = renderMarkdown(final || !markdown ? tail : settle(tail));
    this.container.append(...this.live);
  }
}
