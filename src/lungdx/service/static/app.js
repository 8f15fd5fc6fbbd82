// The radiologist's page: upload, result, heatmap overlay, feedback, monitoring. No external resources.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { card: null, prediction: null };

function apiKey() { return $("api-key").value.trim(); }

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (apiKey()) headers["X-API-Key"] = apiKey();
  const response = await fetch(path, Object.assign({}, options, { headers }));
  const type = response.headers.get("content-type") || "";
  const body = type.includes("application/json") ? await response.json() : await response.text();
  if (!response.ok) {
    // Every error body of the service is {detail, status, errors} (schemas.ErrorOut): detail is the reason.
    const detail = body && typeof body.detail === "string" ? body.detail : response.statusText;
    const error = new Error(`${response.status}: ${detail}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

function showStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function percent(value) { return (100 * value).toFixed(1) + "%"; }

function fillCard(card) {
  state.card = card;
  const list = $("card-list");
  list.replaceChildren();
  const metric = (metrics, name) => {
    if (!metrics || metrics[name] === undefined || metrics[name] === null) return "not recorded";
    const entry = metrics[name];
    if (typeof entry === "number") return entry.toFixed(3);
    return `${entry.value.toFixed(3)} [${entry.ci_low.toFixed(3)}, ${entry.ci_high.toFixed(3)}]`;
  };
  const rows = [
    ["model", `${card.identity.name}`], ["version", card.identity.version], ["task", card.task],
    ["classes", card.class_names.join(" / ")],
    ["threshold", card.threshold === null ? "none" : `${card.threshold.toFixed(4)} (${card.threshold_method || "?"})`],
    ["input", `${card.input_size_px} px`], ["validation AUC", metric(card.validation_metrics, "roc_auc")],
    ["test AUC [95% CI]", metric(card.test_metrics, "roc_auc")], ["intended use", card.intended_use],
  ];
  for (const [name, value] of rows) {
    const dt = document.createElement("dt"); dt.textContent = name;
    const dd = document.createElement("dd"); dd.textContent = value;
    list.append(dt, dd);
  }
  if (card.model_card_markdown) $("card-markdown").textContent = card.model_card_markdown;
  $("banner").textContent = card.not_for_clinical_use;
  $("positive-class").textContent = card.class_names[1];
  const buttons = $("feedback-buttons");
  buttons.replaceChildren();
  for (const name of card.class_names) {
    const button = document.createElement("button");
    button.type = "button"; button.textContent = name; button.dataset.label = name;
    button.addEventListener("click", () => sendFeedback(name));
    buttons.append(button);
  }
}

async function loadCard() {
  try {
    fillCard(await api("/v1/model"));
    showStatus("");
  } catch (error) {
    showStatus(error.status === 401 ? "This service needs an API key: enter it above." : `Cannot load the model card: ${error.message}`, true);
  }
}

async function assess(file) {
  if (!file) return;
  showStatus(`Assessing ${file.name}…`);
  $("result").hidden = true;
  const form = new FormData();
  form.append("file", file);
  try {
    const result = await api("/v1/predictions?heatmap=true&preview=true", { method: "POST", body: form });
    state.prediction = result;
    showResult(result);
    showStatus(`Done in ${Math.round(result.elapsed_ms)} ms.`);
  } catch (error) {
    showStatus(`Not assessed: ${error.message}`, true);
  }
}

function showResult(result) {
  $("radiograph").src = result.preview;
  showHeatmap(result.heatmap);
  $("viewer").hidden = false;
  applyHeatmapControls();
  $("probability").textContent = percent(result.probability);
  $("threshold").textContent = result.threshold === null ? "(none)" : percent(result.threshold);
  const decision = $("decision");
  const statement = result.statement;  // the one wording (lungdx.wording), as in the SR, the SC and FHIR
  decision.textContent = result.label === null ? "no threshold in this model"
    : result.label + (statement.near_threshold ? " (near the threshold: uncertain)" : "");
  decision.className = statement.near_threshold ? "uncertain" : result.label_index === 1 ? "positive" : "negative";
  $("statement").textContent = [statement.threshold_text, statement.uncertainty_text].filter(Boolean).join(" ");
  $("alerts").replaceChildren(...statement.alerts.map((text) => {
    const li = document.createElement("li"); li.textContent = `Monitoring alert: ${text}`; return li; }));
  showLocation(result);
  const warnings = $("warnings");
  warnings.replaceChildren(...result.warnings.map((text) => { const li = document.createElement("li"); li.textContent = text; return li; }));
  $("model-line").textContent = `${result.model.name}, version ${result.model.version}. ${statement.disclaimer}`;
  $("feedback").hidden = !result.id;
  $("feedback-status").textContent = "";
  $("result").hidden = false;
}

function showHeatmap(heatmap) {
  // An empty map comes without a PNG: the notice takes the overlay's place, so a blank never passes for a map.
  const image = $("heatmap"), notice = $("heatmap-notice");
  if (heatmap && heatmap.png) image.src = heatmap.png; else image.removeAttribute("src");
  $("heatmap-note").textContent = heatmap ? heatmap.note : "";
  notice.textContent = heatmap && heatmap.notice ? heatmap.notice : "";
  notice.hidden = !notice.textContent;
}

function showLocation(result) {
  // The nodule map's peak, in the uploaded image's pixels: placed as a share of its columns and rows.
  const where = result.location, marker = $("marker"), line = $("location");
  marker.hidden = line.hidden = !where;
  if (!where) return;
  const { rows, columns } = result.input;
  marker.style.left = `${(100 * (where.x + 0.5)) / columns}%`;
  marker.style.top = `${(100 * (where.y + 0.5)) / rows}%`;
  marker.style.width = `${(200 * where.radius) / columns}%`;  // a circle: aspect-ratio 1 in style.css
  line.textContent = `Nodule map peak at x ${Math.round(where.x)}, y ${Math.round(where.y)} px (circled): ` +
    `P(nodule) ${percent(where.presence)}, P(malignant | nodule) ${percent(where.malignancy)}. ${where.note}`;
}

function applyHeatmapControls() {
  const heatmap = $("heatmap");
  heatmap.hidden = !$("show-heatmap").checked || !heatmap.getAttribute("src");
  heatmap.style.opacity = String($("opacity").value / 100);
}

async function sendFeedback(label) {
  const reader = $("reader").value.trim();
  if (!state.prediction || !state.prediction.id) return;
  if (!reader) { $("feedback-status").textContent = "Enter your reader code first."; return; }
  try {
    await api(`/v1/predictions/${encodeURIComponent(state.prediction.id)}/feedback`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ label, reader }),
    });
    $("feedback-status").textContent = `Recorded: ${label} (reader ${reader}).`;
  } catch (error) {
    $("feedback-status").textContent = `Not recorded: ${error.message}`;
  }
}

async function loadMonitor() {
  $("monitor-status").textContent = "Loading…";
  try {
    const html = await api(`/v1/monitor/report?since=${encodeURIComponent($("since").value)}`);
    $("monitor-frame").srcdoc = html;
    $("monitor-status").textContent = "";
  } catch (error) {
    $("monitor-status").textContent = `Cannot load the monitoring report: ${error.message}`;
  }
}

function showTab(name) {
  for (const tab of ["predict", "monitor"]) {
    $(`view-${tab}`).hidden = tab !== name;
    $(`tab-${tab}`).classList.toggle("active", tab === name);
  }
  if (name === "monitor") loadMonitor();
}

function setUp() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => assess(event.target.files[0]));
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => { event.preventDefault(); drop.classList.remove("over"); assess(event.dataTransfer.files[0]); });
  $("show-heatmap").addEventListener("change", applyHeatmapControls);
  $("opacity").addEventListener("input", applyHeatmapControls);
  $("api-key").value = sessionStorage.getItem("lungdx-api-key") || "";
  $("api-key").addEventListener("change", () => { sessionStorage.setItem("lungdx-api-key", apiKey()); loadCard(); });
  $("tab-predict").addEventListener("click", () => showTab("predict"));
  $("tab-monitor").addEventListener("click", () => showTab("monitor"));
  $("refresh-monitor").addEventListener("click", loadMonitor);
  $("since").addEventListener("change", loadMonitor);
  loadCard();
}

document.addEventListener("DOMContentLoaded", setUp);
