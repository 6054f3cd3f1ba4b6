/*
 * chatbot chat widget. Embed with one tag:
 *   <script src="https://<service>/widget.js" defer></script>
 * Optional attribute: data-open="true" opens the panel on load.
 *
 * This classic script only finds the service from its own URL and loads the widget's ES modules
 * from beside it (web/widget/, served as they are, no build step):
 *   state.js   the conversation and its storage      tabs.js    one leader tab, the others follow
 *   stream.js  the event stream of an answer          render.js  markdown to DOM, block by block
 *   view.js    the DOM in a shadow root                main.js    wiring and user actions
 */
(() => {
  "use strict";

  const script = document.currentScript;
  const INSTANCE = Symbol.for("chatbot-widget");
  if (!script || window[INSTANCE]) return;
  window[INSTANCE] = true;

  const base = new URL(".", script.src).href;
  import(new URL("widget/main.js", base).href)
    .then((widget) => widget.start({ base, open: script.dataset.open === "true" }))
    .catch((err) => console.error("chatbot widget: could not load", err));
})();
