// The operator page: everything it shows comes from the service's own APIs (GET /packs, POST /generate), with
// `Authorization: Bearer <key>` when the service asks for a key. No build step, no dependencies.
"use strict";

const KEY_STORAGE = "erasure.api-key"; // sessionStorage: the key lives as long as the tab
const state = { info: null, key: sessionStorage.getItem(KEY_STORAGE) || "", busy: false };
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

function authHeaders(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (state.key) h["Authorization"] = "Bearer " + state.key;
  return h;
}

// The server's own words for a failed request: `detail` lists each field and the fix; else `error`.
async function errorOf(response) {
  const text = await response.text();
  let body = null;
  try { body = JSON.parse(text); } catch (_) { /* not JSON: show the text */ }
  const lines = [];
  const fields = [];
  if (body && Array.isArray(body.detail) && body.detail.length) {
    for (const d of body.detail) {
      const loc = Array.isArray(d.loc) ? d.loc.join(".") : "";
      if (loc) fields.push(String(d.loc[0]));
      lines.push((loc ? loc + ": " : "") + String(d.msg || "").replace(/^Value error, /, ""));
    }
  } else if (body && body.error) {
    lines.push(String(body.error));
  } else {
    lines.push(text.slice(0, 300) || response.statusText);
  }
  const retry = response.headers.get("retry-after");
  if (retry) lines.push("retry after " + retry + " s");
  return { status: response.status, title: response.status + " " + response.statusText, lines, fields };
}

function showError(err) {
  const box = $("error");
  box.replaceChildren(el("strong", { text: err.title }), el("ul", {}, ...err.lines.map((l) => el("li", { text: l }))));
  box.hidden = false;
  for (const name of err.fields || []) {
    const input = $(name);
    if (input) input.setAttribute("aria-invalid", "true");
  }
}

function clearError() {
  $("error").hidden = true;
  $("error").replaceChildren();
  for (const input of document.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
}

function setStatus(text) { $("status").textContent = text; }

function showAccess(message) {
  $("access").hidden = false;
  $("access-message").textContent = message;
  $("api-key").focus();
}

// --- the packs --------------------------------------------------------------------------------------------------

async function loadService() {
  clearError();
  let response;
  try {
    response = await fetch("packs", { headers: authHeaders(false) });
  } catch (e) {
    showError({ title: "The service cannot be reached", lines: [String(e)] });
    return;
  }
  if (response.status === 401 || response.status === 403) {
    const err = await errorOf(response);
    showAccess(err.lines.join(" "));
    setStatus("waiting for an API key");
    return;
  }
  if (!response.ok) {
    showError(await errorOf(response));
    return;
  }
  state.info = await response.json();
  $("access").hidden = !state.key;
  $("access-message").textContent = state.key ? "Using the key you entered (kept for this tab only)." : "";
  render(state.info);
  setStatus("ready: " + state.info.packs.length + " pack(s) loaded");
}

function percent(x) { return (x <= 1 ? x * 100 : x).toFixed(0) + " %"; }

// The pack's red-team record, when it has one: the attack-success rate first, then anything else it holds.
function redteamText(record) {
  if (!record || typeof record !== "object") return "";
  const parts = [];
  if (typeof record.attack_success_rate === "number") {
    let s = "red-team: " + percent(record.attack_success_rate) + " attack success";
    if (record.attack) s += " (" + record.attack + ")";
    if (typeof record.base_rate === "number") s += ", base " + percent(record.base_rate);
    parts.push(s);
  }
  if (record.asr && typeof record.asr === "object") {
    parts.push("by attack: " + Object.entries(record.asr).map(([k, v]) => k + " " + percent(v)).join(", "));
  }
  const shown = ["attack_success_rate", "attack", "base_rate", "asr"];
  const rest = Object.entries(record).filter(([k]) => !shown.includes(k));
  if (rest.length) parts.push((parts.length ? "" : "red-team: ") + rest.map(([k, v]) => k + " " + JSON.stringify(v)).join(", "));
  return parts.join("; ");
}

function render(info) {
  const lim = info.limits;
  $("service-info").textContent = "base " + info.base + " on " + info.device + " · " + info.packs.length +
    " pack(s), mandatory: " + (info.mandatory.join(", ") || "none") + " · limits: steps ≤ " + lim.max_steps +
    ", size ≤ " + lim.max_size + " (multiples of " + lim.size_multiple + "), guidance " + lim.min_guidance + " to " + lim.max_guidance +
    (lim.negative_prompt ? "" : ", no negative prompts");
  $("negative_prompt").disabled = !lim.negative_prompt;
  $("negative_prompt").placeholder = lim.negative_prompt ? "" : "off on this service (limits.negative_prompt)";

  const list = $("pack-list");
  list.replaceChildren();
  const packs = [...info.packs].sort((a, b) => (b.mandatory - a.mandatory) || a.name.localeCompare(b.name));
  if (!packs.length) list.append(el("li", { class: "muted", text: "no packs loaded: the base model only" }));
  for (const p of packs) {
    const id = "pack-" + p.name;
    const box = el("input", { type: "checkbox", id, value: p.name, "data-pack": p.name, "aria-describedby": id + "-meta" });
    if (p.mandatory) { box.checked = true; box.disabled = true; }
    const label = el("label", { for: id }, el("strong", { text: p.name }));
    if (p.mandatory) label.append(el("span", { class: "lock", text: "mandatory · locked" }));
    const meta = el("div", { class: "meta", id: id + "-meta" });
    meta.append("concepts: " + p.concepts.join(", ") + " · " + p.method + " · sha ",
      el("code", { title: p.sha, text: p.sha.slice(0, 12) }), " · scale " + p.scale);
    const rt = redteamText(p.redteam);
    if (rt) meta.append(el("div", { class: "redteam", text: rt }));
    list.append(el("li", { class: "pack" + (p.mandatory ? " mandatory" : "") }, box, label, meta));
  }

  const sizes = [];
  for (let s = lim.size_multiple; s <= lim.max_size; s += lim.size_multiple) sizes.push(s);
  for (const side of ["width", "height"]) {
    const select = $(side);
    select.replaceChildren(...sizes.map((s) => el("option", { value: String(s), text: String(s) })));
    select.value = String(info.defaults[side]);
  }
  if (!$("steps").value) $("steps").value = info.defaults.steps;
  if (!$("guidance_scale").value) $("guidance_scale").value = info.defaults.guidance_scale;
  $("steps").max = lim.max_steps;
  $("guidance_scale").max = lim.max_guidance;
}

// --- generating -------------------------------------------------------------------------------------------------

function selectedPacks() {
  return [...document.querySelectorAll("#pack-list input[data-pack]")]
    .filter((b) => b.checked && !b.disabled).map((b) => b.value);
}

function numberOrNull(id) {
  const raw = $(id).value.trim();
  return raw === "" ? null : Number(raw);
}

function body(packs, seed) {
  const b = { prompt: $("prompt").value, packs, seed };
  const negative = $("negative_prompt").value;
  if (negative) b.negative_prompt = negative;
  for (const field of ["steps", "guidance_scale", "width", "height"]) {
    const v = numberOrNull(field);
    if (v !== null) b[field] = v;
  }
  return b;
}

class RequestFailed extends Error {
  constructor(err) { super(err.title); this.err = err; }
}

function readAsDataURL(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

async function generate(job) {
  const t0 = performance.now();
  const response = await fetch("generate", { method: "POST", headers: authHeaders(true), body: JSON.stringify(job.body) });
  if (!response.ok) throw new RequestFailed(await errorOf(response));
  const h = (name) => response.headers.get(name) || "";
  return {
    src: await readAsDataURL(await response.blob()),
    packs: h("x-erasure-packs"), shas: h("x-erasure-pack-shas"), seed: h("x-erasure-seed"),
    seconds: (performance.now() - t0) / 1000,
  };
}

function figure(job, result) {
  const shas = result.shas ? result.shas.split(",").map((kv) => {
    const [name, sha] = kv.split("=");
    return el("code", { title: sha, text: name + "=" + (sha || "").slice(0, 12) });
  }) : [el("span", { text: "none" })];
  const caption = el("figcaption", {},
    el("div", { class: "job", text: job.label }),
    el("div", { class: "hdr", text: "x-erasure-packs: " + (result.packs || "(none: the base model)") }),
    el("div", { class: "hdr", text: "x-erasure-seed: " + result.seed + " · " + result.seconds.toFixed(2) + " s" }),
    el("div", { class: "hdr" }, "x-erasure-pack-shas: ", ...shas.flatMap((c, i) => (i ? [" ", c] : [c]))));
  const img = el("img", { src: result.src, alt: job.label + ", seed " + result.seed, "data-packs": result.packs,
    "data-seed": result.seed });
  return el("figure", { class: "result" }, img, caption);
}

// Runs the jobs two at a time; stops at the first refusal (the others would be refused the same way).
async function runJobs(jobs, place) {
  const box = $("progress-box");
  let done = 0;
  let failure = null;
  box.hidden = false;
  $("progress").max = jobs.length;
  const tick = () => {
    $("progress").value = done;
    $("progress-text").textContent = done + " / " + jobs.length + " image(s)";
  };
  tick();
  let next = 0;
  async function worker() {
    while (next < jobs.length && !failure) {
      const job = jobs[next++];
      try {
        place(job, figure(job, await generate(job)));
      } catch (e) {
        failure = failure || (e instanceof RequestFailed ? e.err : { title: "The request failed", lines: [String(e)] });
      }
      done += 1;
      tick();
    }
  }
  await Promise.all([worker(), worker()]);
  box.hidden = true;
  return failure;
}

async function onGenerate(event) {
  event.preventDefault();
  if (state.busy) return;
  if (!state.info) { await loadService(); if (!state.info) return; }
  clearError();
  state.busy = true;
  $("generate").disabled = true;
  $("results").setAttribute("aria-busy", "true");
  const results = $("results");
  results.replaceChildren();
  const selected = selectedPacks();
  const seed = numberOrNull("seed") ?? 0;
  const mode = document.querySelector("input[name=mode]:checked").value;
  let failure;
  if (mode === "grid") {
    const optional = selected.length ? selected : state.info.packs.filter((p) => !p.mandatory).map((p) => p.name);
    const rows = [{ label: "mandatory only", packs: [] }, ...optional.map((p) => ({ label: "+ " + p, packs: [p] }))];
    if (selected.length > 1) rows.push({ label: "+ " + selected.join(" + "), packs: selected });
    const count = Math.max(1, Math.min(8, Math.round(numberOrNull("grid-seeds") ?? 4)));
    const seeds = Array.from({ length: count }, (_, i) => seed + i);
    const table = el("table", { class: "grid" });
    table.append(el("tr", {}, el("th", { text: "packs \\ seed" }), ...seeds.map((s) => el("th", { scope: "col", text: String(s) }))));
    const cells = new Map();
    const jobs = [];
    for (const row of rows) {
      const tr = el("tr", {}, el("th", { scope: "row", text: row.label }));
      for (const s of seeds) {
        const td = el("td");
        tr.append(td);
        const job = { label: row.label + ", seed " + s, body: body(row.packs, s) };
        cells.set(job, td);
        jobs.push(job);
      }
      table.append(tr);
    }
    results.append(table);
    setStatus("generating a " + rows.length + " × " + seeds.length + " grid");
    failure = await runJobs(jobs, (job, fig) => cells.get(job).append(fig));
  } else {
    const pair = el("div", { class: "pair" });
    results.append(pair);
    const jobs = [
      { label: "mandatory packs only", body: body([], seed) },
      { label: selected.length ? "with " + selected.join(" + ") : "with the selected packs (none ticked)", body: body(selected, seed) },
    ];
    const slots = jobs.map(() => pair.appendChild(el("div", { class: "slot" })));
    setStatus("generating seed " + seed + ": mandatory only, and with " + (selected.join(" + ") || "no optional pack"));
    failure = await runJobs(jobs, (job, fig) => slots[jobs.indexOf(job)].append(fig));
  }
  results.removeAttribute("aria-busy");
  $("generate").disabled = false;
  state.busy = false;
  if (failure) {
    showError(failure);
    if (failure.status === 401 || failure.status === 403) showAccess(failure.lines.join(" "));
    setStatus("the service refused the request");
  } else {
    setStatus("done");
  }
}

function useKey() {
  state.key = $("api-key").value.trim();
  $("api-key").value = "";
  if (state.key) sessionStorage.setItem(KEY_STORAGE, state.key);
  else sessionStorage.removeItem(KEY_STORAGE);
  loadService();
}

document.addEventListener("DOMContentLoaded", () => {
  $("request").addEventListener("submit", onGenerate);
  $("use-key").addEventListener("click", useKey);
  $("api-key").addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); useKey(); }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); $("request").requestSubmit(); }
  });
  loadService();
});
