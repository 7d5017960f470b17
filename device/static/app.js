// The page's behaviour: poll /api/latest, and classify uploads through /api/classify.
// Every text goes in with textContent, never innerHTML: file names and labels are not HTML.
"use strict";

const POLL_MS = 2000;
const $ = (id) => document.getElementById(id);

function percent(score) {
  return (100 * score).toFixed(1) + " %";
}

function itemName(record) {
  if (record.file !== undefined) return record.file.split("/").pop();
  return "frame " + record.frame;
}

// The catalog's answer for the record's field, beside the model's: "catalog: M 42 (Great Orion Nebula),
// HII region → emission · agrees"; why there is none; or "" when the catalog look-up is off.
function catalogText(record) {
  if (record.position === undefined) return record.position_note ? "position: " + record.position_note : "";
  const main = record.catalog ? record.catalog.main : null;
  let text;
  if (!record.catalog) {
    text = "no catalog";
  } else if (!main) {
    text = "no catalog object in the field";
  } else {
    text = main.designation + (main.name ? " (" + main.name + ")" : "") + ", " + main.type + " → " + (main.label || "no label");
    text += record.agrees === true ? " · agrees with the model" : record.agrees === false ? " · the model disagrees" : "";
  }
  const p = record.position;
  const where = p.source + " " + p.ra.toFixed(3) + " " + (p.dec >= 0 ? "+" : "") + p.dec.toFixed(3) +
    (p.field_deg ? ", field " + (60 * p.field_deg).toFixed(0) + "′" : "");
  return "catalog: " + text + " [" + where + "]";
}

function showLive(data) {
  const latest = data.latest;
  if (data.model) {
    $("model").textContent = "model " + data.model.name + " (" + data.model.sha256.slice(0, 12) + "), labels: " + data.model.labels.join(", ");
  }
  if (!latest) return;
  const image = $("live-image");
  if (data.image && image.getAttribute("src") !== data.image) {
    image.src = data.image;
    image.hidden = false;
  }
  if (latest.error !== undefined) {
    $("live-label").textContent = "error";
    $("live-score").textContent = "";
    $("live-meta").textContent = itemName(latest) + ": " + latest.error;
  } else if (latest.skipped !== undefined) {
    $("live-label").textContent = "skipped";
    $("live-score").textContent = "";
    $("live-meta").textContent = itemName(latest) + ": " + latest.skipped;
  } else {
    $("live-label").textContent = latest.label;
    $("live-score").textContent = percent(latest.score);
    $("live-meta").textContent = itemName(latest) + " · " + latest.utc;
  }
  $("live-catalog").textContent = latest.label !== undefined ? catalogText(latest) : "";
  const list = $("history");
  list.replaceChildren(...data.history.map((item) => {
    const li = document.createElement("li");
    const what = item.error !== undefined ? "error" : item.skipped !== undefined ? "skipped" : item.label + " " + percent(item.score);
    li.textContent = what + " — " + itemName(item) + " — " + (item.utc || "");
    return li;
  }));
}

async function poll() {
  try {
    const response = await fetch("/api/latest", { cache: "no-store" });
    if (response.ok) showLive(await response.json());
  } catch (err) {
    $("live-meta").textContent = "cannot reach the daemon (" + err.message + ")";
  }
  setTimeout(poll, POLL_MS);
}

function showResult(result) {
  $("result-file").textContent = result.file;
  $("result-label").textContent = result.label;
  $("result-score").textContent = percent(result.score);
  $("result-catalog").textContent = catalogText(result);
  const bars = $("result-bars");
  bars.replaceChildren(...result.top_k.map(([label, score]) => {
    const row = document.createElement("div");
    row.className = "row";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = label;
    const track = document.createElement("div");
    track.className = "track";
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = Math.max(0, Math.min(100, 100 * score)).toFixed(1) + "%";
    track.append(fill);
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = percent(score);
    row.append(name, track, pct);
    return row;
  }));
  $("upload-result").hidden = false;
}

async function upload(event) {
  event.preventDefault();
  const form = event.target;
  const error = $("upload-error");
  error.hidden = true;
  $("upload-result").hidden = true;
  $("upload-status").textContent = "classifying…";
  $("upload-submit").disabled = true;
  try {
    const response = await fetch(form.action, { method: "POST", body: new FormData(form) });
    let payload;
    try {
      payload = await response.json();
    } catch (_) {
      payload = { error: "the server answered " + response.status + " " + response.statusText };
    }
    if (!response.ok) throw new Error(payload.error || "upload failed (" + response.status + ")");
    showResult(payload);
    $("upload-status").textContent = "done";
  } catch (err) {
    error.textContent = err.message;
    error.hidden = false;
    $("upload-status").textContent = "";
  } finally {
    $("upload-submit").disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("upload-form").addEventListener("submit", upload);
  poll();
});
