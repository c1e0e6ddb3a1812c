// circot web page: pick a reference, type a modification, watch the reasoning stream, steer it.
"use strict";

const PARTS = ["caption", "reasoning", "conclusion"];
const $ = (id) => document.getElementById(id);
const KEY_STORE = "circot-api-key";  // kept for this tab only (sessionStorage)

const state = {
  reference: null,        // {kind: "gallery", id, url} or {kind: "upload", file, url}
  galleryOffset: 0,
  galleryFilter: "",
  lastQuery: null,        // {text, k} of the last search, for steering
  generated: null,        // the CoT as the model wrote it
  busy: false,
  keyRequired: false,     // the service was started with an API key (see /health)
  apiKey: sessionStorage.getItem(KEY_STORE) || "",
};

// ---------- helpers ----------
function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.detail) return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

function setBusy(busy) {
  state.busy = busy;
  $("search-btn").disabled = busy;
  $("search-btn").textContent = busy ? "Searching…" : "Search";
  updateSteerButton();
}

function setStatus(text, kind) {
  const badge = $("cot-status");
  badge.textContent = text;
  badge.title = text;
  badge.className = `badge ${kind}`;
}

// ---------- API key ----------
// Every route but the page and /health needs "Authorization: Bearer <key>" when the service has a key, the
// images too: an <img src> cannot send that header, so they are fetched and shown from object URLs.
async function api(url, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (state.apiKey) headers.Authorization = `Bearer ${state.apiKey}`;
  const response = await fetch(url, { ...options, headers });
  if (response.status === 401) askForKey(state.apiKey ? "The service refused this API key; enter it again" : null);
  return response;
}

function askForKey(reason) {
  $("key-label").textContent = reason || "This service needs an API key";
  $("key-form").hidden = false;
  $("api-key").focus();
}

function useKey(event) {
  event.preventDefault();
  state.apiKey = $("api-key").value.trim();
  sessionStorage.setItem(KEY_STORE, state.apiKey);
  $("api-key").value = "";
  $("key-form").hidden = true;
  showError("");
  loadGallery(true);
}

async function setImage(img, url) {
  if (!state.keyRequired) { img.src = url; return; }
  const response = await api(url);
  if (!response.ok) { img.alt = `${img.alt} (${response.status})`; return; }
  const local = URL.createObjectURL(await response.blob());
  img.addEventListener("load", () => URL.revokeObjectURL(local), { once: true });
  img.src = local;
}

// ---------- service info ----------
async function loadHealth() {
  try {
    const response = await fetch("/health");
    if (!response.ok) throw new Error(await errorText(response));
    const info = await response.json();
    const fp = info.model_fingerprint ? info.model_fingerprint.slice(0, 10) : "?";
    const service = $("service");
    service.textContent = "";
    service.append(`${info.gallery_size} gallery images · model `);
    const code = document.createElement("code");
    code.textContent = fp;
    service.append(code);
    if (!info.index_matches_model) service.append(" · index built with another model");
    state.keyRequired = Boolean(info.api_key_required);
    if (state.keyRequired && !state.apiKey) askForKey(null);
    $("k").max = String(info.limits.max_k);
    $("text").maxLength = info.limits.max_text_chars;
  } catch (err) {
    $("service").textContent = `service unavailable: ${err.message}`;
  }
}

// ---------- gallery picker ----------
async function loadGallery(reset) {
  if (reset) {
    state.galleryOffset = 0;
    $("gallery-grid").textContent = "";
  }
  if (state.keyRequired && !state.apiKey) return;  // asked for the key first
  const params = new URLSearchParams({ offset: state.galleryOffset, limit: 60, q: state.galleryFilter });
  const response = await api(`/api/gallery?${params}`);
  if (!response.ok) { showError(await errorText(response)); return; }
  const page = await response.json();
  const grid = $("gallery-grid");
  for (const item of page.items) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "thumb";
    button.title = item.id;
    button.dataset.id = item.id;
    const img = document.createElement("img");
    img.loading = "lazy";
    img.alt = item.id;
    setImage(img, item.url);
    button.append(img);
    button.addEventListener("click", () => pickGallery(item.id, item.url));
    if (state.reference && state.reference.kind === "gallery" && state.reference.id === item.id) {
      button.classList.add("selected");
    }
    grid.append(button);
  }
  state.galleryOffset += page.items.length;
  $("gallery-count").textContent = `${Math.min(state.galleryOffset, page.total)} of ${page.total}`;
  $("gallery-more").hidden = state.galleryOffset >= page.total;
}

function markSelected() {
  for (const thumb of document.querySelectorAll(".thumb")) {
    const on = state.reference && state.reference.kind === "gallery" && thumb.dataset.id === state.reference.id;
    thumb.classList.toggle("selected", Boolean(on));
  }
}

function showReference(url, label) {
  const img = $("ref-img");
  if (url.startsWith("blob:")) img.src = url;  // an upload, already local
  else setImage(img, url);
  img.hidden = false;
  $("ref-placeholder").hidden = true;
  $("ref-preview").classList.remove("empty");
  $("ref-label").textContent = label;
}

function pickGallery(id, url) {
  if (state.reference && state.reference.kind === "upload") URL.revokeObjectURL(state.reference.url);
  state.reference = { kind: "gallery", id, url };
  showReference(url, `gallery image ${id}`);
  markSelected();
  showError("");
}

function pickFile(file) {
  if (!file) return;
  if (state.reference && state.reference.kind === "upload") URL.revokeObjectURL(state.reference.url);
  const url = URL.createObjectURL(file);
  state.reference = { kind: "upload", file, url };
  showReference(url, `uploaded: ${file.name}`);
  markSelected();
  showError("");
}

function selectTab(name) {
  for (const tab of ["gallery", "upload"]) {
    const on = tab === name;
    $(`tab-${tab}`).classList.toggle("active", on);
    $(`tab-${tab}`).setAttribute("aria-selected", String(on));
    $(`panel-${tab}`).hidden = !on;
  }
}

// ---------- the reasoning panel ----------
const TAG_RE = /<\|[^|>]*\|>/g;

// Split a (possibly unfinished) generated text into its three parts, and say which one is being written.
function splitLive(raw) {
  let text = raw.replace(TAG_RE, "");
  const emb = text.indexOf("<emb>");
  if (emb >= 0) text = text.slice(0, emb);
  const out = { caption: "", reasoning: "", conclusion: "", active: null };
  for (const part of PARTS) {
    const open = text.indexOf(`<${part}>`);
    if (open < 0) continue;
    const start = open + part.length + 2;
    const close = text.indexOf(`</${part}>`, start);
    let end = close >= 0 ? close : text.length;
    for (const other of PARTS) {
      const next = text.indexOf(`<${other}>`, start);
      if (next >= 0 && next < end) end = next;
    }
    out[part] = text.slice(start, end).replace(/<\/?[a-z]*>?$/, "");
    if (close < 0) out.active = part;
  }
  if (!out.caption && !out.reasoning && !out.conclusion && text.trim() && !text.includes("<")) {
    out.caption = text;  // a model that writes no tags: show what it writes
    out.active = "caption";
  }
  return out;
}

function renderCoT(parts, editable) {
  for (const part of PARTS) {
    const view = $(`cot-${part}`);
    const edit = $(`edit-${part}`);
    view.textContent = parts[part] || "";
    view.hidden = editable;
    edit.hidden = !editable;
    if (editable) edit.value = parts[part] || "";
    view.parentElement.classList.toggle("active", !editable && parts.active === part);
  }
  updateSteerButton();
}

function showRaw(raw, open) {
  const box = $("raw-box");
  box.hidden = raw === null;
  $("cot-raw").textContent = raw || "";
  if (open !== undefined) box.open = open;
}

function editedCoT() {
  const cot = {};
  for (const part of PARTS) cot[part] = $(`edit-${part}`).value.trim();
  return cot;
}

function updateSteerButton() {
  const ready = !state.busy && state.lastQuery && !$("edit-conclusion").hidden && editedCoT().conclusion;
  $("steer-btn").disabled = !ready;
}

// ---------- results ----------
function renderResults(data) {
  const grid = $("results");
  grid.textContent = "";
  if (!data.results.length) {
    const p = document.createElement("p");
    p.className = "empty-note";
    p.textContent = "No results.";
    grid.append(p);
  }
  // bars show where each score lies between the worst and the best shown result
  const top = Math.max(...data.results.map((r) => r.score));
  const bottom = Math.min(...data.results.map((r) => r.score));
  for (const result of data.results) {
    const card = document.createElement("figure");
    card.className = "result use";
    card.title = `use ${result.id} as the reference`;
    card.dataset.id = result.id;
    const pic = document.createElement("div");
    pic.className = "pic";
    const img = document.createElement("img");
    img.alt = result.id;
    setImage(img, result.url);
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = `#${result.rank}`;
    pic.append(img, rank);
    const meta = document.createElement("figcaption");
    meta.className = "meta";
    const id = document.createElement("div");
    id.className = "id";
    id.textContent = result.id;
    const score = document.createElement("div");
    score.className = "score";
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("i");
    const share = top - bottom > 1e-6 ? (result.score - bottom) / (top - bottom) : 1;
    fill.style.width = `${Math.round(12 + 88 * share)}%`;
    bar.append(fill);
    const value = document.createElement("span");
    value.className = "score-value";
    value.textContent = result.score.toFixed(3);
    score.append(bar, value);
    meta.append(id, score);
    card.append(pic, meta);
    card.addEventListener("click", () => pickGallery(result.id, result.url));
    grid.append(card);
  }
  const t = data.timings_ms || {};
  const parts = Object.entries(t).filter(([name]) => name !== "queue").map(([name, ms]) => `${name} ${Math.round(ms)} ms`);
  $("timings").textContent = `${data.results.length} results${data.edited ? " · from your reasoning" : ""} · ${parts.join(" · ")}`;
}

// ---------- searching ----------
function queryForm(text, k) {
  const form = new FormData();
  form.append("text", text);
  form.append("k", String(k));
  if (state.reference.kind === "gallery") form.append("gallery_id", state.reference.id);
  else form.append("image", state.reference.file, state.reference.file.name);
  return form;
}

// Read a Server-Sent Events body and call onEvent(name, data) for each event.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}

async function search(event) {
  event.preventDefault();
  if (state.busy) return;
  showError("");
  const text = $("text").value.trim();
  const k = Number($("k").value) || 10;
  const mode = document.querySelector("input[name=mode]:checked").value;
  if (!state.reference) { showError("Pick a reference image from the gallery or upload one."); return; }
  if (!text) { showError("Type the modification you want."); $("text").focus(); return; }

  const form = queryForm(text, k);
  form.append("mode", mode);
  setBusy(true);
  $("results").classList.add("busy");
  let raw = "";
  renderCoT({ caption: "", reasoning: "", conclusion: "", active: mode === "full" ? "caption" : null }, false);
  showRaw(mode === "full" ? "" : null, false);
  setStatus(mode === "full" ? "reasoning…" : "embedding…", "live");
  try {
    const response = await api("/api/search/stream", { method: "POST", body: form });
    if (!response.ok) throw new Error(await errorText(response));
    let finished = false;
    await readEvents(response, (name, data) => {
      if (name === "token") {
        raw += data.text;
        renderCoT(splitLive(raw), false);
        showRaw(raw);
      } else if (name === "cot") {
        state.generated = data;
        setStatus(data.well_formed ? "well-formed" : `malformed: ${data.problems.join(", ")}`, data.well_formed ? "good" : "warn");
        renderCoT(data, true);
        showRaw(data.raw, !data.well_formed);
      } else if (name === "results") {
        state.lastQuery = { text, k };
        if (!data.cot) {
          setStatus("fast mode · no reasoning written", "muted");
          renderCoT({ caption: "", reasoning: "", conclusion: "" }, true);
        }
        renderResults(data);
        finished = true;
      } else if (name === "error") {
        throw new Error(data.detail);
      }
    });
    if (!finished) throw new Error("the search ended early; try again");
  } catch (err) {
    showError(err.message);
    setStatus("failed", "warn");
  } finally {
    $("results").classList.remove("busy");
    setBusy(false);
  }
}

async function steer() {
  if (state.busy || !state.lastQuery || !state.reference) return;
  showError("");
  const cot = editedCoT();
  if (!cot.conclusion) { showError("Write a conclusion to search from."); return; }
  const form = queryForm(state.lastQuery.text, state.lastQuery.k);
  for (const part of PARTS) form.append(part, cot[part]);
  setBusy(true);
  $("results").classList.add("busy");
  setStatus("searching from your reasoning…", "live");
  try {
    const response = await api("/api/search/edited", { method: "POST", body: form });
    if (!response.ok) throw new Error(await errorText(response));
    const data = await response.json();
    renderResults(data);
    setStatus("your reasoning", "good");
  } catch (err) {
    showError(err.message);
    setStatus("failed", "warn");
  } finally {
    $("results").classList.remove("busy");
    setBusy(false);
  }
}

// ---------- wiring ----------
async function init() {
  $("search-form").addEventListener("submit", search);
  $("key-form").addEventListener("submit", useKey);
  $("steer-btn").addEventListener("click", steer);
  for (const part of PARTS) $(`edit-${part}`).addEventListener("input", updateSteerButton);
  $("text").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("search-form").requestSubmit(); }
  });
  $("tab-gallery").addEventListener("click", () => selectTab("gallery"));
  $("tab-upload").addEventListener("click", () => selectTab("upload"));
  $("file-input").addEventListener("change", (e) => pickFile(e.target.files[0]));
  const drop = $("dropzone");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    pickFile(e.dataTransfer.files[0]);
  });
  let timer = null;
  $("gallery-filter").addEventListener("input", (e) => {
    clearTimeout(timer);
    timer = setTimeout(() => { state.galleryFilter = e.target.value.trim(); loadGallery(true); }, 200);
  });
  $("gallery-more").addEventListener("click", () => loadGallery(false));
  await loadHealth();  // says whether the gallery needs the API key
  loadGallery(true);
}

document.addEventListener("DOMContentLoaded", init);
