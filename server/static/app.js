"use strict";
// The classifier page: a photo goes to POST /predict, the person's verdict to POST /feedback, and
// the live figures come from GET /monitoring/summary. Plain JS, nothing from the network; every
// text from the server is put in with textContent, never as HTML.

const TOKEN_KEY = "catsdogs.apiToken";
const el = (id) => document.getElementById(id);

const page = {
  classes: [], // the model's class names, in its order (from /metadata)
  maxUploadBytes: null, // the server's limit for one photo (from /metadata)
  prediction: null, // the last /predict answer
  previewUrl: null,
  upload: 0, // sequence number: a late answer for an older photo is ignored
  pendingLabel: null, // feedback waiting for an API token
};

/** A refused request: the HTTP status and the API's {"error": {"code", "message"}}. */
class ApiFailure extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function call(url, options = {}) {
  let response;
  try {
    response = await fetch(url, { cache: "no-store", ...options });
  } catch {
    throw new ApiFailure(0, "network", "the server could not be reached");
  }
  let body = null;
  if ((response.headers.get("content-type") || "").includes("application/json")) {
    body = await response.json().catch(() => null);
  }
  if (!response.ok) {
    const error = body && typeof body.error === "object" && body.error ? body.error : {};
    const text = typeof body?.error === "string" ? body.error : error.message;
    throw new ApiFailure(
      response.status,
      error.code || `http_${response.status}`,
      text || response.statusText || "the request failed",
    );
  }
  return body;
}

function describe(failure) {
  if (!(failure instanceof ApiFailure)) return "Something went wrong on this page.";
  if (failure.status === 0) return "The server could not be reached.";
  return `${failure.message} (HTTP ${failure.status}, ${failure.code})`;
}

function percent(p) {
  return `${(p * 100).toFixed(1)}%`;
}

function megabytes(n) {
  return `${(n / (1024 * 1024)).toFixed(n < 1024 * 1024 ? 2 : 1)} MiB`;
}

function showError(text) {
  const box = el("error");
  box.textContent = text;
  box.hidden = !text;
}

function setStatus(text) {
  el("status").textContent = text;
}

// ------------------------------------------------------------------ model facts and figures
async function loadMetadata() {
  try {
    const meta = await call("/metadata");
    page.classes = meta.class_names || [];
    page.maxUploadBytes = meta.limits?.max_upload_bytes ?? null;
    if (page.maxUploadBytes) {
      el("limit").textContent = `JPEG, PNG, WebP, BMP or GIF, up to ${megabytes(page.maxUploadBytes)}`;
    }
  } catch (failure) {
    // the server's own checks still apply; the page only loses its early size check
    showError(`Could not read the model's metadata: ${describe(failure)}`);
  }
}

async function refreshStats() {
  try {
    const summary = await call("/monitoring/summary");
    const version = summary.model_version;
    const figures = (summary.model_versions || {})[version] || {};
    el("served-version").textContent = version || "unknown";
    el("predictions-count").textContent = String(figures.predictions ?? 0);
    el("feedback-count").textContent = String(figures.feedback ?? 0);
    el("accuracy").textContent =
      figures.accuracy == null
        ? "no feedback yet"
        : `${percent(figures.accuracy)} (${figures.correct} of ${figures.feedback})`;
    return figures;
  } catch (failure) {
    el("feedback-count").textContent = "unavailable";
    el("accuracy").textContent = describe(failure);
    return null;
  }
}

// ------------------------------------------------------------------ predictions
function showPreview(file) {
  if (page.previewUrl) URL.revokeObjectURL(page.previewUrl);
  page.previewUrl = URL.createObjectURL(file);
  const img = el("preview");
  img.src = page.previewUrl;
  img.alt = `The photo you chose: ${file.name || "pasted image"}`;
  el("preview-name").textContent = `${file.name || "pasted image"} · ${megabytes(file.size)}`;
  el("preview-box").hidden = false;
}

async function classify(file) {
  const upload = ++page.upload;
  showError("");
  el("result").hidden = true;
  el("token-form").hidden = true;
  page.prediction = null;
  if (page.maxUploadBytes && file.size > page.maxUploadBytes) {
    el("preview-box").hidden = true;
    setStatus("Not sent.");
    showError(
      `This file is ${megabytes(file.size)}; the server takes photos of at most ` +
        `${megabytes(page.maxUploadBytes)}. Choose a smaller one.`,
    );
    return;
  }
  showPreview(file);
  setStatus("Classifying…");
  const form = new FormData();
  form.append("file", file, file.name || "image");
  try {
    const answer = await call("/predict", { method: "POST", body: form });
    if (upload !== page.upload) return;
    showResult(answer);
    refreshStats();
  } catch (failure) {
    if (upload !== page.upload) return;
    setStatus("The server could not classify this file.");
    showError(describe(failure));
  }
}

function bar(name, probability, isBest) {
  const item = document.createElement("li");
  item.className = isBest ? "bar best" : "bar";
  item.dataset.class = name;
  const label = document.createElement("span");
  label.className = "bar-name";
  label.textContent = name;
  const track = document.createElement("span");
  track.className = "bar-track";
  track.setAttribute("aria-hidden", "true"); // the number beside it says the same
  const fill = document.createElement("span");
  fill.className = "bar-fill";
  fill.style.width = `${Math.max(0, Math.min(1, probability)) * 100}%`;
  track.append(fill);
  const value = document.createElement("span");
  value.className = "bar-value";
  value.textContent = percent(probability);
  item.append(label, track, value);
  return item;
}

function showResult(answer) {
  page.prediction = answer;
  const probabilities = answer.probabilities || {};
  const names = page.classes.length ? page.classes : Object.keys(probabilities);
  el("label").textContent = answer.label;
  const confidence = el("confidence");
  confidence.textContent = percent(answer.confidence);
  confidence.dataset.value = String(answer.confidence);
  el("bars").replaceChildren(
    ...names.map((name) => bar(name, probabilities[name] ?? 0, name === answer.label)),
  );
  el("model-version").textContent = answer.model_version;
  el("latency").textContent = `${answer.latency_ms.toFixed(1)} ms`;
  el("prediction-id").textContent = answer.prediction_id;
  el("preview").alt = `The photo you chose, classified as ${answer.label}`;
  setupFeedback(names, answer.label);
  setStatus(`The model says: ${answer.label}.`);
  el("result").hidden = false;
}

// ------------------------------------------------------------------ feedback
function otherClasses(label) {
  return (page.classes.length ? page.classes : Object.keys(page.prediction.probabilities)).filter(
    (name) => name !== label,
  );
}

function setupFeedback(names, label) {
  const others = otherClasses(label);
  const wrong = el("wrong");
  // two classes: "Wrong" means the other one; more: ask which
  wrong.textContent = "Wrong";
  wrong.title = others.length === 1 ? `Record this photo as ${others[0]}` : "Choose the right class";
  el("choose").hidden = true;
  el("true-label").replaceChildren(
    ...others.map((name) => {
      const option = document.createElement("option");
      option.value = name;
      option.textContent = name;
      return option;
    }),
  );
  el("feedback-status").textContent =
    others.length === 1 ? `“Wrong” records the photo as ${others[0]}.` : "";
  el("feedback-status").className = "status";
  setFeedbackBusy(false);
}

function setFeedbackBusy(busy) {
  for (const id of ["right", "wrong", "send-label"]) el(id).disabled = busy;
}

async function sendFeedback(label) {
  const prediction = page.prediction;
  if (!prediction) return;
  const status = el("feedback-status");
  status.className = "status";
  status.textContent = "Sending…";
  showError("");
  setFeedbackBusy(true);
  const headers = { "Content-Type": "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  try {
    const stored = await call("/feedback", {
      method: "POST",
      headers,
      body: JSON.stringify({ prediction_id: prediction.prediction_id, label }),
    });
    if (page.prediction !== prediction) return;
    el("token-form").hidden = true;
    const figures = await refreshStats();
    const verdict = stored.correct ? "the model was right" : "the model was wrong";
    let text = `Thanks: recorded as ${stored.label} (${verdict}).`;
    if (figures) {
      const accuracy = figures.accuracy == null ? "n/a" : percent(figures.accuracy);
      text += ` Feedback so far: ${figures.feedback}, live accuracy ${accuracy}.`;
    }
    status.textContent = text;
    status.className = "status done";
  } catch (failure) {
    if (failure instanceof ApiFailure && (failure.status === 401 || failure.status === 403)) {
      askForToken(label, failure);
      status.textContent = "Not sent yet: the server needs an API token.";
    } else {
      status.textContent = "Not sent.";
      showError(describe(failure));
    }
  } finally {
    setFeedbackBusy(false);
  }
}

function askForToken(label, failure) {
  page.pendingLabel = label;
  if (failure.status === 403) sessionStorage.removeItem(TOKEN_KEY); // it was refused
  el("token-why").textContent =
    failure.status === 403
      ? `That token was refused: ${describe(failure)}`
      : `Sending feedback needs this server's API token: ${describe(failure)}`;
  el("token-form").hidden = false;
  const input = el("token");
  input.value = "";
  input.focus();
}

// ------------------------------------------------------------------ wiring
function wire() {
  const input = el("file");
  input.addEventListener("change", () => {
    if (input.files && input.files[0]) classify(input.files[0]);
    input.value = ""; // choosing the same file again classifies it again
  });

  const drop = el("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer?.files?.[0];
    if (file) classify(file);
  });
  // a photo dropped beside the zone must not make the browser leave the page to show it
  for (const type of ["dragover", "drop"]) {
    window.addEventListener(type, (event) => event.preventDefault());
  }
  document.addEventListener("paste", (event) => {
    const file = [...(event.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
    if (file) classify(file);
  });

  el("right").addEventListener("click", () => {
    if (page.prediction) sendFeedback(page.prediction.label);
  });
  el("wrong").addEventListener("click", () => {
    if (!page.prediction) return;
    const others = otherClasses(page.prediction.label);
    if (others.length === 1) {
      sendFeedback(others[0]);
    } else {
      el("choose").hidden = false;
      el("true-label").focus();
    }
  });
  el("feedback").addEventListener("submit", (event) => {
    event.preventDefault();
    sendFeedback(el("true-label").value);
  });
  el("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = el("token").value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    el("token-form").hidden = true;
    if (page.pendingLabel) sendFeedback(page.pendingLabel);
  });
}

wire();
loadMetadata();
refreshStats();
