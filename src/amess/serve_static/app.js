// The page's only script: calls the JSON API and draws the result with DOM nodes (text is
// never parsed as HTML).
"use strict";

const $ = (id) => document.getElementById(id);
let info = null;

function status(msg, isError) {
  $("status").textContent = msg;
  $("status").className = isError ? "error" : "";
}

function norm(w) {
  return w.toLowerCase().replace(/^[^\p{L}\p{N}]+|[^\p{L}\p{N}]+$/gu, "");
}

// A word is highlighted when it is an anchor token, or starts with one (word pieces).
function isAnchor(word, anchors) {
  const w = norm(word);
  if (!w) return false;
  return anchors.some((a) => a === w || (a.length >= 3 && w.startsWith(a)) ||
                             (a.startsWith("##") && a.length > 3 && w.endsWith(a.slice(2))));
}

function show(r) {
  const anchors = (r.anchors || []).map((a) => a.toLowerCase()).filter((a) => norm(a) || a.startsWith("##"));
  const t = $("transcript");
  t.replaceChildren();
  for (const part of r.text.split(/(\s+)/)) {
    if (part.trim() && isAnchor(part, anchors)) {
      const m = document.createElement("mark");
      m.textContent = part;
      t.append(m);
    } else {
      t.append(document.createTextNode(part));
    }
  }
  $("anchors-line").textContent = anchors.length ? "anchor words: " + r.anchors.join(" ") : "";
  const bars = $("bars");
  bars.replaceChildren();
  for (const { intent, probability } of r.ranked.slice(0, 8)) {
    const row = document.createElement("div");
    row.className = "bar";
    row.setAttribute("role", "listitem");
    const name = document.createElement("span");
    name.className = "intent";
    name.textContent = intent;
    const track = document.createElement("div");
    track.className = "track";
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = (100 * probability).toFixed(1) + "%";
    track.append(fill);
    const p = document.createElement("span");
    p.className = "p";
    p.textContent = (100 * probability).toFixed(1) + "%";
    row.append(name, track, p);
    bars.append(row);
  }
  const ood = $("ood");
  ood.replaceChildren();
  const dets = Object.entries(r.out_of_scope || {});
  if (!dets.length) ood.textContent = "this run has no out-of-scope detectors";
  for (const [det, out] of dets) {
    const v = document.createElement("span");
    v.className = "verdict " + (out ? "out" : "in");
    v.dataset.detector = det;
    v.textContent = `${det}: ${out ? "out of scope" : "in scope"} (score ${r.ood_scores[det].toFixed(3)}, ` +
                    `threshold ${r.thresholds[det].toFixed(3)})`;
    ood.append(v);
  }
  $("result").hidden = false;
  $("result").dataset.source = r.source;
}

async function call(url, options) {
  const res = await fetch(url, options);
  const body = await res.json().catch(() => ({ error: `HTTP ${res.status}` }));
  if (!res.ok) throw new Error(body.error || `HTTP ${res.status}`);
  return body;
}

async function predictText(ev) {
  ev.preventDefault();
  const text = $("utterance").value.trim();
  if (!text) return status("type an utterance first", true);
  status("predicting…");
  try {
    show(await call("/api/predict", { method: "POST", headers: { "Content-Type": "application/json" },
                                      body: JSON.stringify({ text }) }));
    status("");
  } catch (e) { status(e.message, true); }
}

async function predictClip(ev) {
  ev.preventDefault();
  const file = $("clip").files[0];
  if (!file) return status("choose a clip first", true);
  if (info && file.size > info.max_upload_mb * 1048576) return status(`the clip is over ${info.max_upload_mb} MiB`, true);
  status(`extracting and predicting ${file.name}…`);
  try {
    show(await call("/api/clip", { method: "POST", headers: { "Content-Type": "application/octet-stream",
                                                              "X-Filename": file.name }, body: file }));
    status("");
  } catch (e) { status(e.message, true); }
}

async function init() {
  $("text-form").addEventListener("submit", predictText);
  $("clip-form").addEventListener("submit", predictClip);
  try {
    info = await call("/api/info");
    $("run-info").textContent = `${info.method} run, ${info.intents.length} intents, ` +
      `modalities ${info.modalities.join(" + ")}` + (info.detectors.length ? `, detectors ${info.detectors.join(", ")}` : "");
    $("clip-note").textContent = info.clips ? "clips: " + info.clips : `up to ${info.max_upload_mb} MiB; deleted after use`;
    $("predict-clip").disabled = Boolean(info.clips);
    document.body.dataset.ready = "1";
  } catch (e) { status(e.message, true); }
}

init();
