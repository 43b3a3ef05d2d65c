// The attention playground: builds its form from GET /attention, sends one request per run and
// draws the answer. No framework, no outside network.
"use strict";

(() => {
  // Parameters of the text input (embedded as chapter 2 does) and of the answer's form; every
  // other parameter a variant lists is one of the variant's own.
  const INPUT_PARAMS = ["embedding_dim", "context_length", "embedding_seed"];
  const OUTPUT_PARAMS = ["decimals", "return_weights"];
  const PREFILLED = { decimals: "4" }; // the book prints 4 decimals
  const DEFAULT_VARIANT = "multi-head";
  const MAX_CELLS = 20000; // beyond this many table cells the page points to the JSON
  const MAX_JSON_CHARS = 200000;
  // ColorBrewer "Blues", light to dark.
  const PALETTE = [[247, 251, 255], [198, 219, 239], [107, 174, 214], [33, 113, 181], [8, 48, 107]];

  const $ = (id) => document.getElementById(id);
  const form = $("form");
  const variantSelect = $("variant");
  let variants = new Map();
  let openapi = null; // only for the kinds of the parameters' controls
  const opened = new Set(); // disclosures the person opened
  const values = { ...PREFILLED }; // what was typed, kept across variant switches
  let runs = 0; // requests sent; an answer to an older one is dropped

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "className") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value === true ? "" : value);
    }
    node.append(...children);
    return node;
  }

  // "a `code` span" -> text and <code> nodes
  function withCode(text) {
    return (text || "").split("`").map((part, i) => (i % 2 ? el("code", { text: part }) : part));
  }

  function inputMode() {
    return form.elements.input.value;
  }

  // --- the form, from the registry ---------------------------------------------------------

  // The kind of control a parameter needs, from its JSON schema in /openapi.json (generated
  // from the same registry), else from its default.
  function kindOf(name, info, schema) {
    if (name === "implementation") return "implementation";
    if (schema) {
      const options = [schema, ...(schema.anyOf || [])].filter((s) => s.type && s.type !== "null");
      const types = new Set(options.map((s) => s.type));
      const items = schema.items || (options.find((s) => s.items) || {}).items;
      if (types.has("boolean")) return "boolean";
      if (types.has("integer") || types.has("number")) return "number";
      if (types.has("array") && items && items.enum) return "choices";
      if (types.has("array") || types.has("object")) return "json";
    }
    if (typeof info.default === "boolean") return "boolean";
    if (typeof info.default === "number" || info.default === null) return "number";
    return "json";
  }

  function paramField(name, info, variant, schema) {
    const kind = kindOf(name, info, schema);
    const hintId = `hint-${name}`;
    const errId = `err-${name}`;
    const describedBy = `${hintId} ${errId}`;
    const description = info.description || "";
    const hint = el("p", { className: "hint", id: hintId }, ...withCode(description));
    const hasDefault = info.default !== null && info.default !== undefined;
    if (hasDefault && kind !== "boolean" && kind !== "implementation") {
      hint.append(/[.!?]$/.test(description) ? " Default: " : "; default: ",
        el("code", { text: JSON.stringify(info.default) }));
    }
    const error = el("p", { className: "error", id: errId, hidden: true });
    const common = {
      id: name, name, "aria-describedby": describedBy, "data-param": name, "data-kind": kind,
    };
    if (kind === "boolean") {
      const input = el("input", { type: "checkbox", ...common, "data-default": String(info.default) });
      input.checked = name in values ? values[name] : info.default;
      return el("div", { className: "field check" },
        input, el("label", { for: name, text: name }), hint, error);
    }
    if (kind === "implementation") {
      const select = el("select", common);
      for (const impl of variant.implementations) {
        const label = impl.book_class ? `${impl.name}: ${impl.book_class}` : impl.name;
        select.append(el("option", { value: impl.name, text: label, selected: impl.default }));
      }
      const kept = values[`implementation:${variant.name}`];
      if (kept) select.value = kept;
      return el("div", { className: "field" },
        el("label", { for: name, text: name }), select, hint, error);
    }
    if (kind === "choices") {
      const items = schema.items || schema.anyOf.find((s) => s.items).items;
      const kept = values[name] || [];
      const boxes = items.enum.map((choice) => el("label", {},
        el("input", { type: "checkbox", value: choice, checked: kept.includes(choice) }), choice));
      return el("fieldset", { className: "field choices-field", ...common },
        el("legend", { text: name }), el("div", { className: "choice-list" }, ...boxes), hint, error);
    }
    const control = kind === "json"
      ? el("textarea", { ...common, rows: "3", spellcheck: "false", placeholder: "JSON" })
      : el("input", {
        type: "text", ...common, inputmode: "decimal", autocomplete: "off", spellcheck: "false",
        placeholder: hasDefault ? String(info.default) : "",
      });
    control.value = values[name] || "";
    return el("div", { className: "field" },
      el("label", { for: name, text: name }), control, hint, error);
  }

  function buildParams() {
    const variant = variants.get(variantSelect.value);
    const schemas = variantSchemas(variant);
    $("variant-description").replaceChildren(
      ...withCode(variant.description),
      ` Book section ${variant.book_section}`,
      ...(variant.book_class ? [", ", el("code", { text: variant.book_class })] : []),
      ".",
    );
    const groups = { input: [], variant: [], more: [], output: [] };
    const names = Object.keys(variant.parameters);
    // The implementation (which of the book's classes) first: the other fields depend on it.
    names.sort((a, b) => (b === "implementation") - (a === "implementation"));
    for (const name of names) {
      const field = paramField(name, variant.parameters[name], variant, schemas[name]);
      const kind = field.dataset.kind || field.querySelector("[data-kind]").dataset.kind;
      const group = INPUT_PARAMS.includes(name) ? "input"
        : OUTPUT_PARAMS.includes(name) ? "output"
          : kind === "json" || kind === "choices" ? "more" : "variant";
      groups[group].push(field);
    }
    $("input-params").replaceChildren();
    if (groups.input.length) $("input-params").append(folded("embedding", "Embedding", groups.input));
    $("variant-params").replaceChildren(...groups.variant);
    if (!groups.variant.length) {
      $("variant-params").append(
        el("p", { className: "hint", text: "No parameters: no trainable weights." }));
    }
    if (groups.more.length) $("variant-params").append(folded("more", "More parameters", groups.more));
    $("output-params").replaceChildren(...groups.output);
    showInputMode();
  }

  // Fields behind a disclosure that stays as the person left it when the variant changes.
  function folded(key, title, fields) {
    const details = el("details", { className: "more", open: opened.has(key) },
      el("summary", { text: `${title} (${fields.length})` }), ...fields);
    details.addEventListener("toggle", () => (details.open ? opened.add(key) : opened.delete(key)));
    return details;
  }

  function variantSchemas(variant) {
    try {
      const body = openapi.paths[variant.path].post.requestBody;
      return body.content["application/json"].schema.properties || {};
    } catch {
      return {};
    }
  }

  function showInputMode() {
    const text = inputMode() === "text";
    $("field-text").hidden = !text;
    $("field-embeddings").hidden = text;
    $("input-params").hidden = !text;
  }

  // --- the request -------------------------------------------------------------------------

  class FieldError extends Error {
    constructor(field, message) {
      super(message);
      this.field = field;
    }
  }

  // JSON text without the whitespace between tokens, a space after each comma; the numbers
  // stay exactly as typed (JSON.parse would round a 20-digit seed).
  function compactJson(raw) {
    let out = "";
    let inString = false;
    for (let i = 0; i < raw.length; i++) {
      const c = raw[i];
      if (inString) {
        out += c;
        if (c === "\\") out += raw[++i] ?? "";
        else if (c === '"') inString = false;
      } else if (c === '"') {
        inString = true;
        out += c;
      } else if (!/\s/.test(c)) {
        out += c === "," ? ", " : c;
      }
    }
    return out;
  }

  // The body as JSON text, in the order of the form: [[name, JSON text], ...].
  function bodyParts() {
    const parts = [];
    if (inputMode() === "text") {
      parts.push(["text", JSON.stringify($("text").value)]);
    } else {
      const raw = $("embeddings").value.trim();
      try {
        JSON.parse(raw);
      } catch (error) {
        throw new FieldError("embeddings", `This is not valid JSON (${error.message}): `
          + "paste rows of numbers such as [[0.43, 0.15], [0.55, 0.87]].");
      }
      parts.push(["embeddings", compactJson(raw)]);
    }
    for (const control of form.querySelectorAll("[data-param]")) {
      if (control.closest("[hidden]")) continue; // a text-input parameter while embeddings are in use
      const name = control.dataset.param;
      const kind = control.dataset.kind;
      if (kind === "boolean") {
        const checked = String(control.checked);
        if (checked !== control.dataset.default) parts.push([name, checked]);
      } else if (kind === "implementation") {
        parts.push([name, JSON.stringify(control.value)]);
      } else if (kind === "choices") {
        const checked = [...control.querySelectorAll("input:checked")].map((box) => box.value);
        if (checked.length) parts.push([name, JSON.stringify(checked)]);
      } else {
        const value = control.value.trim();
        if (value === "") continue; // the API's default
        // JSON (a number, a list...) goes as typed; anything else as a string, for the API to
        // say what it expected.
        let json = true;
        try {
          JSON.parse(value);
        } catch {
          json = false;
        }
        parts.push([name, json ? compactJson(value) : JSON.stringify(value)]);
      }
    }
    return parts;
  }

  function shellQuote(text) {
    return `'${text.replaceAll("'", "'\\''")}'`;
  }

  // --- errors ------------------------------------------------------------------------------

  function clearErrors() {
    for (const node of form.querySelectorAll(".error")) {
      node.hidden = true;
      node.replaceChildren();
    }
    for (const node of form.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
  }

  function fieldError(field, message) {
    const box = $(`err-${field}`);
    const control = $(field);
    if (!box || !control || box.closest("[hidden]:not(.error)")) return false;
    const details = box.closest("details");
    if (details) details.open = true;
    box.hidden = false;
    box.append(el("span", { text: message }));
    control.setAttribute("aria-invalid", "true");
    return true;
  }

  function showErrors(status, answer) {
    const general = $("err-general");
    const detail = answer && answer.detail;
    const placed = [];
    const loose = [];
    if (Array.isArray(detail)) {
      for (const item of detail) {
        const loc = Array.isArray(item.loc) ? item.loc : [];
        const field = loc[0] === "body" && typeof loc[1] === "string" ? loc[1] : null;
        const where = loc.slice(2).map((index) => `[${index}]`).join("");
        const message = where ? `${item.msg} (at ${field}${where})` : String(item.msg);
        if (field && fieldError(field, message)) placed.push(field);
        else loose.push(message);
      }
    } else {
      loose.push(typeof detail === "string" ? detail : `The API answered ${status} with no detail.`);
    }
    general.replaceChildren(`The API answered ${status}. `);
    if (placed.length) {
      general.append("See ");
      [...new Set(placed)].forEach((field, i) => {
        if (i) general.append(", ");
        general.append(el("a", { href: `#${field}`, text: field }));
      });
      general.append(". ");
    }
    for (const message of loose) general.append(el("span", { className: "loose", text: message }), " ");
    general.hidden = false;
  }

  // --- drawing the answer ------------------------------------------------------------------

  function depth(value) {
    return Array.isArray(value) ? 1 + depth(value[0]) : 0;
  }

  function color(value) {
    // sqrt spreads the small weights a long sequence has; dropout can scale a weight above 1.
    const t = Math.sqrt(Math.min(1, Math.max(0, value))) * (PALETTE.length - 1);
    const i = Math.min(PALETTE.length - 2, Math.floor(t));
    const f = t - i;
    return PALETTE[i].map((c, k) => Math.round(c + (PALETTE[i + 1][k] - c) * f));
  }

  function luminance(rgb) {
    const [r, g, b] = rgb.map((c) => {
      const s = c / 255;
      return s <= 0.04045 ? s / 12.92 : ((s + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  }

  // What a token looks like as a label: spaces and line breaks made visible.
  function shown(token) {
    const visible = { " ": "\u2423", "\n": "\u21b5", "\t": "\u21e5" };
    return token.replace(/[ \n\t]/g, (c) => visible[c]) || "\u2205";
  }

  function labelCell(tag, token, index, scope) {
    return el(tag, {
      scope, title: `${index}: ${JSON.stringify(token)}`, "data-token": token, "data-index": index,
    }, el("span", { text: shown(token) }));
  }

  // Whether a variant applies the causal mask: the listing's `causal` where it says so, else
  // its description. The weights alone cannot tell: a weight can round to 0 without a mask.
  function isCausal(variant) {
    if (typeof variant.causal === "boolean") return variant.causal;
    return /\bcausal\b/i.test(variant.description);
  }

  // Why query i may not see key j, or "" if it may: a later token, or (with a sliding window
  // of `windowSize` tokens) one too far back.
  function hiddenBy(causal, windowSize, i, j) {
    if (!causal) return "";
    if (j > i) return "a later token";
    return windowSize && i - j >= windowSize ? "beyond the window" : "";
  }

  function heatmap(matrix, labels, caption, causal, tokens, windowSize) {
    const T = matrix.length;
    const name = (i) => (tokens ? `${i} ${JSON.stringify(labels[i])}` : String(i));
    // Drawn blank only when every hidden weight is 0, as the mask makes it (padding aside).
    let masked = causal && T > 1;
    for (let i = 0; i < T && masked; i++) {
      for (let j = 0; j < T; j++) {
        if (hiddenBy(causal, windowSize, i, j) && matrix[i][j] !== 0 && matrix[i][j] !== null) {
          masked = false;
          break;
        }
      }
    }
    const table = el("table", {
      className: `heatmap${T > 16 ? " dense" : ""}`, role: "grid", "aria-label": caption,
    });
    const head = el("tr", {}, el("th", { scope: "col", className: "corner" },
      el("span", { text: "query \u2193 key \u2192" })));
    labels.forEach((token, j) => head.append(labelCell("th", token, j, "col")));
    const body = el("tbody");
    matrix.forEach((row, i) => {
      const tr = el("tr", {}, labelCell("th", labels[i], i, "row"));
      row.forEach((value, j) => {
        const reason = masked ? hiddenBy(causal, windowSize, i, j) : "";
        const isMasked = Boolean(reason);
        const what = `query ${name(i)} \u2192 key ${name(j)}: ${value}`
          + (isMasked ? ` (masked: ${reason})` : "");
        const td = el("td", {
          tabindex: i === 0 && j === 0 ? "0" : "-1", title: what, "aria-label": what,
          "data-row": i, "data-col": j, "data-value": value, className: isMasked ? "masked" : null,
        });
        if (!isMasked) {
          const rgb = color(value);
          td.style.backgroundColor = `rgb(${rgb.join(",")})`;
          td.style.color = luminance(rgb) > 0.179 ? "#000" : "#fff"; // both >= 4.5:1
          td.textContent = value.toFixed(2);
        }
        tr.append(td);
      });
      body.append(tr);
    });
    table.append(el("thead", {}, head), body);
    return el("figure", { className: "heatmap-figure" },
      el("figcaption", { text: caption }), el("div", { className: "scroll" }, table));
  }

  function numbersTable(rows, labels, caption) {
    const width = rows[0] ? rows[0].length : 0;
    const shownCols = Math.max(1, Math.min(width, Math.floor(MAX_CELLS / (rows.length || 1))));
    const head = el("tr", {}, el("th", { scope: "col", text: "token" }));
    for (let k = 0; k < shownCols; k++) head.append(el("th", { scope: "col", text: String(k) }));
    const body = el("tbody");
    rows.forEach((row, i) => {
      const tr = el("tr", {}, labelCell("th", labels[i], i, "row"));
      for (let k = 0; k < shownCols; k++) tr.append(el("td", { text: String(row[k]) }));
      body.append(tr);
    });
    const note = shownCols < width
      ? el("p", {
        className: "hint", text: `The first ${shownCols} of ${width} columns; the JSON below has them all.`,
      })
      : "";
    const size = `${rows.length} tokens x ${width}`;
    return el("figure", { className: "numbers-figure" },
      el("figcaption", { text: caption ? `${caption}: ${size}` : size }),
      el("div", {
        className: "scroll", tabindex: "0", role: "region", "aria-label": `Context vectors ${caption}`.trim(),
      },
        el("table", { className: "numbers" }, el("thead", {}, head), body)),
      note);
  }

  // "16 values per token x 6 tokens = 96 values": what one layer's cache would hold.
  function showKvCache(kv) {
    $("kv").hidden = !kv;
    if (!kv) return;
    const bytes = (4 * kv.values).toLocaleString("en");
    $("kv-cache").textContent = `${kv.values_per_token} values per token \u00d7 ${kv.tokens} `
      + `tokens = ${kv.values.toLocaleString("en")} values (${bytes} bytes as float32).`;
  }

  function render(answer, variant) {
    const contexts = answer.context_vectors;
    const windowSize = (answer.config && answer.config.window_size) || null;
    const batched = depth(contexts) === 3;
    const sequences = batched ? contexts : [contexts];
    const weights = answer.attention_weights;
    const heatmaps = [];
    const tables = [];
    let summary = "";
    sequences.forEach((context, b) => {
      const labels = answer.tokens
        ? answer.tokens.map((token) => token.text)
        : context.map((_, i) => String(i));
      const prefix = batched ? `Sequence ${b + 1} of ${sequences.length}, ` : "";
      tables.push(numbersTable(context, labels, batched ? `Sequence ${b + 1}` : ""));
      if (!weights) return;
      const seq = batched ? weights[b] : weights;
      const heads = depth(seq) === 3 ? seq : [seq];
      const T = labels.length;
      summary = `${heads.length > 1 ? `${heads.length} heads of ` : ""}${T} x ${T} weights`;
      if (T * T * heads.length * sequences.length > MAX_CELLS) {
        const text = `${summary}: too many cells to draw here; the JSON below has them.`;
        if (!heatmaps.length) heatmaps.push(el("p", { className: "hint", text }));
        return;
      }
      heads.forEach((matrix, h) => {
        const caption = depth(seq) === 3 ? `${prefix}head ${h + 1} of ${heads.length}` : `${prefix}weights`;
        const title = caption[0].toUpperCase() + caption.slice(1);
        heatmaps.push(
          heatmap(matrix, labels, title, isCausal(variant), Boolean(answer.tokens), windowSize));
      });
    });
    $("heatmaps").replaceChildren(...heatmaps);
    $("weights").hidden = !weights;
    $("readout").textContent = "\u00a0";
    $("context-tables").replaceChildren(...tables);
    $("context").hidden = false;
    showKvCache(answer.kv_cache);
    showAnswer(answer, false);
    return weights ? summary : "no weights asked for";
  }

  // The answer as the API wrote it; an error's is short and worth reading: it is open.
  function showAnswer(answer, open) {
    const json = JSON.stringify(answer, null, 1);
    $("response-json").firstChild.textContent = json.length > MAX_JSON_CHARS
      ? `${json.slice(0, MAX_JSON_CHARS)}\n\u2026 (${json.length} characters in all)`
      : json;
    $("response").querySelector("details").open = open;
    $("response").hidden = false;
  }

  // --- running -----------------------------------------------------------------------------

  async function run(event) {
    if (event) event.preventDefault();
    clearErrors();
    const variant = variants.get(variantSelect.value);
    let parts;
    try {
      parts = bodyParts();
    } catch (error) {
      if (!(error instanceof FieldError)) throw error;
      fieldError(error.field, error.message);
      document.body.dataset.state = "error";
      $("form-status").textContent = "Nothing sent: fix the field marked below.";
      return;
    }
    const body = `{${parts.map(([name, json]) => `${JSON.stringify(name)}: ${json}`).join(", ")}}`;
    const url = `${location.origin}${variant.path}`;
    $("curl").firstChild.textContent =
      `curl -s ${url} -H 'Content-Type: application/json' -d ${shellQuote(body)}`;
    $("curl").dataset.body = body;
    $("request").hidden = false;
    $("results-empty").hidden = true;
    $("copy-status").textContent = "";

    const id = ++runs;
    document.body.dataset.state = "loading";
    $("submit").setAttribute("aria-busy", "true");
    $("form-status").textContent = `POST ${variant.path}\u2026`;
    const started = performance.now();
    let response;
    let answer = null;
    try {
      response = await fetch(variant.path, {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body,
      });
      answer = await response.json().catch(() => null);
    } catch (error) {
      if (id !== runs) return;
      finish(id, "error", `The request failed: ${error.message}`);
      showErrors("no answer", { detail: `The service could not be reached (${error.message}).` });
      return;
    }
    if (id !== runs) return;
    const took = `${Math.round(performance.now() - started)} ms`;
    $("response-title").textContent = `The answer: ${response.status} ${response.statusText}`;
    if (!response.ok || !answer) {
      for (const section of ["weights", "context", "kv", "response"]) $(section).hidden = true;
      showErrors(response.status, answer);
      if (answer) showAnswer(answer, true);
      finish(id, "error", `${response.status} ${response.statusText} in ${took}.`);
      return;
    }
    const summary = render(answer, variant);
    finish(id, "done", `${response.status} ${response.statusText} in ${took}: ${summary}.`);
    // One column (a phone): the answer is below the form, bring it into view.
    if (event && !matchMedia("(min-width: 60rem)").matches) $("results").scrollIntoView();
  }

  function finish(id, state, message) {
    $("submit").removeAttribute("aria-busy");
    $("form-status").textContent = message;
    document.body.dataset.state = state;
    document.body.dataset.runs = String(id);
  }

  // --- interaction -------------------------------------------------------------------------

  function describeCell(td) {
    const caption = td.closest("figure").querySelector("figcaption").textContent;
    $("readout").textContent = `${caption}: ${td.title}`;
  }

  function moveInGrid(event) {
    const td = event.target.closest("td[data-row]");
    if (!td) return;
    const table = td.closest("table");
    const T = table.tBodies[0].rows.length;
    let row = Number(td.dataset.row);
    let col = Number(td.dataset.col);
    const keys = {
      ArrowUp: () => (row = Math.max(0, row - 1)), ArrowDown: () => (row = Math.min(T - 1, row + 1)),
      ArrowLeft: () => (col = Math.max(0, col - 1)), ArrowRight: () => (col = Math.min(T - 1, col + 1)),
      Home: () => (col = 0), End: () => (col = T - 1),
    };
    if (!(event.key in keys)) return;
    event.preventDefault();
    keys[event.key]();
    const next = table.querySelector(`td[data-row="${row}"][data-col="${col}"]`);
    td.tabIndex = -1;
    next.tabIndex = 0;
    next.focus();
  }

  async function copy() {
    const text = $("curl").textContent;
    try {
      await navigator.clipboard.writeText(text);
    } catch {
      const range = document.createRange();
      range.selectNodeContents($("curl"));
      getSelection().removeAllRanges();
      getSelection().addRange(range);
      if (!document.execCommand("copy")) {
        $("copy-status").textContent = "Selected: press Ctrl+C (\u2318C) to copy.";
        return;
      }
    }
    $("copy-status").textContent = "Copied.";
  }

  function remember(event) {
    const control = event.target.closest("[data-param]");
    if (!control) return;
    const name = control.dataset.param;
    const kind = control.dataset.kind;
    if (kind === "implementation") values[`implementation:${variantSelect.value}`] = control.value;
    else if (kind === "choices") {
      values[name] = [...control.querySelectorAll("input:checked")].map((box) => box.value);
    }
    else values[name] = kind === "boolean" ? control.checked : control.value;
  }

  async function init() {
    try {
      const [listing, schema] = await Promise.all([
        fetch("/attention", { headers: { Accept: "application/json" } }),
        fetch("/openapi.json", { headers: { Accept: "application/json" } }).catch(() => null),
      ]);
      if (!listing.ok) throw new Error(`GET /attention answered ${listing.status}`);
      variants = new Map((await listing.json()).map((variant) => [variant.name, variant]));
      if (schema && schema.ok) openapi = await schema.json().catch(() => null);
    } catch (error) {
      showErrors("no answer", { detail: `The list of variants could not be loaded: ${error.message}` });
      return;
    }
    for (const variant of variants.values()) {
      const text = `${variant.name} (${variant.book_section})`;
      variantSelect.append(el("option", { value: variant.name, text }));
    }
    if (variants.has(DEFAULT_VARIANT)) variantSelect.value = DEFAULT_VARIANT;
    buildParams();
    variantSelect.addEventListener("change", buildParams);
    for (const radio of form.elements.input) radio.addEventListener("change", showInputMode);
    form.addEventListener("input", remember);
    form.addEventListener("change", remember);
    form.addEventListener("submit", run);
    form.addEventListener("keydown", (event) => {
      const submits = event.key === "Enter" && (event.ctrlKey || event.metaKey);
      if (submits && event.target.tagName === "TEXTAREA") run(event);
    });
    $("copy").addEventListener("click", copy);
    $("heatmaps").addEventListener("keydown", moveInGrid);
    $("heatmaps").addEventListener("focusin", (event) => {
      if (event.target.matches("td")) describeCell(event.target);
    });
    $("heatmaps").addEventListener("mouseover", (event) => {
      const td = event.target.closest("td[data-row]");
      if (td) describeCell(td);
    });
    document.body.dataset.ready = "true";
    run();
  }

  init();
})();
