// The review view: list /api/review, file the current item with a click or a key (1-7, s, n).
// Every text goes in with textContent, never innerHTML: file names and labels are not HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let labels = [];

function percent(score) {
  return (100 * score).toFixed(1) + " %";
}

function button(text, title, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.title = title;
  b.addEventListener("click", onClick);
  return b;
}

function card(item) {
  const li = document.createElement("li");
  li.className = "review-item" + (item.skipped ? " skipped" : "");
  li.dataset.id = item.id;
  const img = document.createElement("img");
  img.src = item.image;
  img.alt = "queued frame " + item.source;
  img.loading = "lazy";  // a long queue loads its pictures as they scroll into view
  const about = document.createElement("div");
  const title = document.createElement("p");
  title.textContent = item.source + (item.skipped ? " (skipped before)" : "");
  const why = document.createElement("p");
  why.className = "muted";
  why.textContent = "queued because " + item.reason + " · " + item.queued_utc;
  const model = document.createElement("p");
  model.className = "top3";
  model.textContent = "model: " + item.top3.map(([label, score]) => label + " " + percent(score)).join(", ");
  about.append(title, why, model);
  if (item.catalog !== undefined) {
    const catalog = document.createElement("p");
    catalog.className = "catalog";
    catalog.textContent = "catalog: " + item.catalog + (item.agrees === false ? " (disagrees with the model)" : "");
    about.append(catalog);
  }
  const actions = document.createElement("div");
  actions.className = "actions";
  labels.forEach((label, i) => actions.append(button((i + 1) + " " + label, "file under " + label, () => send(item.id, { action: "label", label }))));
  actions.append(button("s skip", "leave it for later", () => send(item.id, { action: "skip" })));
  actions.append(button("n not deep-sky", "not a deep-sky frame: kept out of training", () => send(item.id, { action: "not_deep_sky" })));
  about.append(actions);
  li.append(img, about);
  return li;
}

function current() {
  return document.querySelector("#review-items li:not(.done)");
}

function showCount() {
  const left = document.querySelectorAll("#review-items li:not(.done)").length;
  $("review-status").textContent = left ? left + " to review" : "nothing to review";
  const first = current();
  document.querySelectorAll("#review-items li").forEach((li) => li.classList.toggle("current", li === first));
}

async function send(id, request) {
  $("review-error").hidden = true;
  request.by = $("labeller").value;
  localStorage.setItem("labeller", $("labeller").value);
  try {
    const response = await fetch("/api/review/" + encodeURIComponent(id), {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(request),
    });
    const payload = await response.json();
    if (!response.ok) throw new Error(payload.error || "the server answered " + response.status);
    const li = document.querySelector('#review-items li[data-id="' + id + '"]');
    if (li) {
      li.classList.add("done");
      li.dataset.outcome = payload.filed || "skipped";
      li.hidden = true;
    }
  } catch (err) {
    $("review-error").textContent = err.message;
    $("review-error").hidden = false;
  }
  showCount();
}

function onKey(event) {
  if (event.target.tagName === "INPUT" || event.ctrlKey || event.metaKey || event.altKey) return;
  const item = current();
  if (!item) return;
  const n = parseInt(event.key, 10);
  if (n >= 1 && n <= labels.length) send(item.dataset.id, { action: "label", label: labels[n - 1] });
  else if (event.key === "s") send(item.dataset.id, { action: "skip" });
  else if (event.key === "n") send(item.dataset.id, { action: "not_deep_sky" });
  else return;
  event.preventDefault();
}

async function load() {
  try {
    const response = await fetch("/api/review", { cache: "no-store" });
    const data = await response.json();
    if (!data.enabled) {
      $("review-status").textContent = "the review queue is off (review.enabled in the config)";
      return;
    }
    labels = data.labels;
    $("labeller").value = localStorage.getItem("labeller") || data.labeller;
    $("review-items").replaceChildren(...data.items.map(card));
    showCount();
  } catch (err) {
    $("review-error").textContent = "cannot reach the device (" + err.message + ")";
    $("review-error").hidden = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.addEventListener("keydown", onKey);
  load();
});
