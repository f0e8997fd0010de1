// The memory page: sends the image to POST /classify (the service's one pipeline) and draws the answer.
// No framework and no build step; every string from the server goes in through textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, image: null, name: "", seq: 0, timer: 0, objectUrl: "" };

// ------------------------------------------------------------------ API keys

// Where the server wants a key (401), the page asks for one and keeps it for this tab only (sessionStorage).
const KEY = "rac-api-key";

function apiKey() {
  return sessionStorage.getItem(KEY) || "";
}

async function api(url, options = {}) {
  const headers = new Headers(options.headers || {});
  if (apiKey()) headers.set("Authorization", `Bearer ${apiKey()}`);
  const response = await fetch(url, { ...options, headers });
  if (response.status === 401) askForKey(apiKey() ? "That key is not taken: try another." : "");
  return response;
}

function askForKey(message) {
  $("key-box").hidden = false;
  $("key-message").textContent = message || "This service needs an API key.";
  $("key").focus();
}

// An image behind a key: <img src> sends no Authorization header, so it is fetched and shown from a blob.
function setImage(img, url) {
  if (!apiKey()) {
    img.src = url;
    return;
  }
  api(url).then((r) => (r.ok ? r.blob() : Promise.reject(new Error(String(r.status)))))
    .then((blob) => { img.src = URL.createObjectURL(blob); })
    .catch(() => img.dispatchEvent(new Event("error")));
}

function memoryParam() {
  return $("memory").value ? `memory=${encodeURIComponent($("memory").value)}` : "";
}

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key === "style") node.setAttribute("style", value);
    else node.setAttribute(key, value);
  }
  for (const child of [].concat(children)) if (child != null) node.append(child);
  return node;
}

function bar(fraction) {
  const width = Math.max(0, Math.min(1, fraction)) * 100;
  return el("div", { class: "bar", "aria-hidden": "true" }, el("span", { style: `width:${width.toFixed(1)}%` }));
}

// ------------------------------------------------------------------ errors and status

function detailText(body) {
  if (body && typeof body.detail === "string") return body.detail;
  if (body && Array.isArray(body.detail)) {
    return body.detail.map((d) => `${(d.loc || []).slice(1).join(".") || "request"}: ${d.msg}`).join("; ");
  }
  return "";
}

const HINTS = {
  400: "The file could not be read as an image.",
  413: "The image is too large for this service.",
  415: "That file is not a PNG, JPEG or WebP image.",
  422: "A value is out of range.",
  503: "The service is busy or still starting: try again in a moment.",
};

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function setStatus(text) {
  $("status").textContent = text;
}

async function refusal(response) {
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  const hint = HINTS[response.status] || "The service could not answer.";
  const detail = detailText(body) || response.statusText;
  return `${hint} (${response.status}${detail ? ": " + detail : ""})`;
}

// ------------------------------------------------------------------ what is served

async function loadInfo(tries = 60) {
  try {
    const response = await api(`/info?${memoryParam()}`);
    if (response.status === 503 && tries > 0) {
      // Still loading the artifacts: the page is up before the pipeline is; ask again shortly.
      $("served").textContent = "the service is starting…";
      await new Promise((resolve) => setTimeout(resolve, 1000));
      return loadInfo(tries - 1);
    }
    if (!response.ok) throw new Error(await refusal(response));
    const info = await response.json();
    state.info = info;
    const m = info.memory || {};
    const index = info.index || {};
    const names = Object.keys(info.memories || {});
    if (names.length > 1 && $("memory").options.length !== names.length) {
      $("memory").replaceChildren(...names.map((n) => el("option", { value: n, text: n })));
      $("memory").value = m.name;
    }
    $("memory-box").hidden = names.length < 2;
    const parts = [
      `memory ${m.name} ${m.version}`,
      `${Number(m.size).toLocaleString("en")} items`,
      `${index.type}${index.nprobe ? ` (nprobe ${index.nprobe})` : ""}`,
      `head ${info.head ? info.head.kind : "?"}`,
      `k = ${index.k}`,
    ];
    $("served").textContent = parts.join(" · ");
    $("top_k").max = String((info.classes || []).length || 1000);
    $("top_k").value = String(Math.min(5, (info.classes || []).length || 5));
    $("neighbors").max = String(index.k || 1000);
    $("neighbors").value = String(Math.min(Number($("neighbors").value), index.k || 12));
    $("zero-shot").hidden = !zeroShotSupported(info);
    const sources = Object.keys(m.sources || {}).sort();
    $("source").replaceChildren(el("option", { value: "", text: "every source" }),
      ...sources.map((s) => el("option", { value: s, text: `${s} only` })));
  } catch (e) {
    $("served").textContent = "not ready";
    showError(`Could not read what the service serves: ${e.message}`);
  }
}

// The zero-shot route exists only in artifacts built with its parts; /info says whether they are there.
function zeroShotSupported(info) {
  return Boolean(info.supports && info.supports.zero_shot);
}

async function loadExamples() {
  try {
    const response = await api(`/examples?${memoryParam()}`);
    if (!response.ok) return;
    const { examples } = await response.json();
    const list = $("examples");
    list.replaceChildren();
    for (const ex of examples) {
      const label = `example: ${ex.label || ex.name}`;
      const img = el("img", { alt: "", width: "48", height: "48" });
      setImage(img, ex.url);
      const button = el("button", { type: "button", title: label, "aria-label": label }, img);
      button.addEventListener("click", () => pickExample(ex));
      list.append(el("li", {}, button));
    }
    $("examples-box").hidden = examples.length === 0;
  } catch (_) {
    // Examples are a convenience: without them the page still takes files.
  }
}

async function pickExample(ex) {
  try {
    const response = await api(ex.url);
    if (!response.ok) throw new Error(await refusal(response));
    useImage(await response.blob(), ex.name);
  } catch (e) {
    showError(`Could not load the example: ${e.message}`);
  }
}

// ------------------------------------------------------------------ classify

function useImage(blob, name) {
  clearTimeout(state.timer); // a pending re-classify of the previous image is superseded
  state.image = blob;
  state.name = name || "image";
  $("again").disabled = false;
  classify().then(() => {
    // On a phone the answer is below the controls: bring it into view once a new image is in.
    if (window.matchMedia("(max-width: 760px)").matches) $("status").scrollIntoView({ block: "start" });
  });
}

function params() {
  const q = new URLSearchParams();
  q.set("top_k", $("top_k").value || "5");
  q.set("neighbors", $("neighbors").value || "0");
  if ($("source").value) q.set("source", $("source").value); // the search itself keeps to that source
  if ($("memory").value) q.set("memory", $("memory").value);
  return q;
}

async function classify() {
  if (!state.image) return;
  const seq = ++state.seq;
  const form = new FormData();
  form.append("image", state.image, state.name);
  const labels = $("zero-shot").hidden ? [] : $("labels").value.split("\n").map((s) => s.trim()).filter(Boolean);
  for (const label of labels) form.append("labels", label);
  const route = labels.length ? "/classify/zero-shot" : "/classify";
  setStatus(`Classifying ${state.name}…`);
  let response;
  try {
    response = await api(`${route}?${params()}`, { method: "POST", body: form });
  } catch (e) {
    if (seq !== state.seq) return;
    $("answer").hidden = true;
    showError(`Could not reach the service: ${e.message}`);
    setStatus("No answer.");
    return;
  }
  if (seq !== state.seq) return; // a newer request was sent meanwhile
  if (!response.ok) {
    const message = await refusal(response);
    if (seq !== state.seq) return;
    $("answer").hidden = true;
    showError(message);
    setStatus(`${state.name} was refused.`);
    return;
  }
  const answer = await response.json();
  if (seq !== state.seq) return;
  clearError();
  render(answer, labels.length > 0);
}

function render(answer, zeroShot) {
  if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
  state.objectUrl = URL.createObjectURL(state.image);
  $("query-image").src = state.objectUrl;
  $("query-name").textContent = state.name;

  const predictions = answer.predictions || [];
  const top = predictions.length ? predictions[0].label : null;
  $("predictions").replaceChildren(...predictions.map((p) =>
    el("li", { "data-label": p.label }, [
      el("span", { class: "name", text: p.label }),
      bar(p.probability),
      el("span", { class: "value", text: `${(100 * p.probability).toFixed(1)}%` }),
    ])));

  const t = answer.timings_ms || {};
  // /classify says true or false; /classify/zero-shot says which parts came from the cache.
  const cached = answer.cached === true || Boolean(answer.cached && answer.cached.image);
  const stages = Object.entries(t).filter(([name]) => name !== "total").map(([name, ms]) => `${name} ${ms.toFixed(2)}`);
  $("timings").replaceChildren(
    `${stages.join(" · ")} · total ${(t.total || 0).toFixed(2)} ms `,
    cached ? el("span", { class: "badge", text: "neighbours from cache" }) : "",
  );

  // Zero-shot labels are the caller's own words: a neighbour's class cannot be compared with them.
  renderNeighbors(answer.neighbors || [], zeroShot ? null : top, answer.memory_version);
  $("answer").hidden = false;
  setStatus(`${state.name}: ${top || "no class"}, memory ${answer.memory} ${answer.memory_version}.`);
}

function renderNeighbors(neighbors, top, version) {
  const sorted = [...neighbors].sort((a, b) => (b.attention ?? 0) - (a.attention ?? 0));
  const most = Math.max(1e-12, ...sorted.map((n) => n.attention ?? 0));
  const other = sorted.filter((n) => n.label && top !== null && n.label !== top).length;
  const attended = sorted.some((n) => n.attention != null); // zero-shot neighbours carry no attention
  const order = attended ? "by attention" : "by similarity";
  $("neighbors-title").textContent = sorted.length
    ? `${sorted.length} neighbours, ${order}${other ? ` (${other} name another class)` : ""}`
    : "No neighbours asked for";
  document.querySelector(".legend").hidden = top === null;
  $("neighbor-grid").replaceChildren(...sorted.map((n) => card(n, top, version, most)));
}

function card(n, top, version, most) {
  const differs = Boolean(n.label) && top !== null && n.label !== top;
  const img = el("img", { class: "thumb", alt: `memory item ${n.id}`, width: "64", height: "64" });
  const where = $("memory").value ? `&memory=${encodeURIComponent($("memory").value)}` : "";
  setImage(img, `/items/${n.id}/thumbnail?v=${encodeURIComponent(version)}${where}`);
  const attention = n.attention;
  const item = el("li", { class: differs ? "card other" : "card", "data-id": String(n.id) }, [
    img,
    el("div", {}, [
      el("div", { class: "text", text: `“${n.text}”` }),
      n.label ? el("div", { class: "meta names" }, [
        "names ", el("b", { text: n.label }), differs ? el("span", { class: "differs", text: `≠ ${top}` }) : null,
      ]) : null,
    ]),
    el("div", { class: "meta foot" }, [
      el("span", { text: [`#${n.id}`, n.source || "memory", n.key, ...(n.tags || [])].filter(Boolean).join(" · ") }),
      el("span", { class: "num", text: `similarity ${Number(n.similarity).toFixed(3)}` }),
    ]),
    attention == null ? null : el("div", { class: "attn", title: `attention weight ${attention}` }, [
      bar(attention / most),
      el("span", { class: "num", text: `attention ${attention.toFixed(3)}` }),
    ]),
  ]);
  // A memory built without thumbnails answers 404: the card shows the text alone.
  img.addEventListener("error", () => {
    img.remove();
    item.classList.add("text-only");
  });
  return item;
}

// ------------------------------------------------------------------ input: file, drop, controls

function wire() {
  $("file").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) useImage(file, file.name);
  });
  const drop = $("drop");
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  // A file dropped anywhere on the page is taken, rather than the browser navigating to it.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) useImage(file, file.name);
  });
  $("query").addEventListener("submit", (e) => { e.preventDefault(); classify(); });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("key").value.trim());
    $("key").value = "";
    $("key-box").hidden = true;
    loadInfo().then(loadExamples).then(classify);
  });
  $("memory").addEventListener("change", () => loadInfo().then(classify));
  for (const id of ["top_k", "neighbors", "source"]) {
    $(id).addEventListener("input", () => {
      clearTimeout(state.timer);
      state.timer = setTimeout(classify, 300);
    });
  }
}

wire();
loadInfo().then(loadExamples);
