// The owner's page of `veil serve` (served at / with index.html and app.css; no build step, nothing
// fetched from elsewhere, nothing inline: the server's CSP allows only its own scripts and styles).
//
// One edit: upload or pick an image -> POST /v1/sessions (the capability + the classifier's guesses);
// corrections and choices -> PATCH /v1/sessions/{s}; preview -> POST .../previews, a server-sent event
// stream read with fetch (EventSource cannot POST); more/less private, accept, reject -> POST .../feedback;
// the budget and history -> GET /v1/sessions/{s}; the publishable revision -> GET /v1/revision (a zip).
// Every API error is {"error", "field"} with a 4xx (503 + Retry-After when overloaded): it is shown in
// the alert region, never swallowed. A server token, when asked for (401), lives in sessionStorage only.

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "veil-serve-token";
const DATASET_PAGE = 24;

const app = {
  info: null,        // GET /v1/info
  session: null,     // the capability of the open session
  state: null,       // the latest session state
  closed: false,     // accepted, refused or rejected: start a new session to edit again
  stream: null,      // AbortController of the running preview
  datasetOffset: 0,
  busy: 0,
};

// ---- the API ---------------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, field = null, retryAfter = null) {
    super(message);
    this.status = status;
    this.field = field;
    this.retryAfter = retryAfter;
  }
}

async function api(path, { method = "GET", json, form, raw = false, signal } = {}) {
  const headers = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form) {
    body = form;
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body, signal, cache: "no-store" });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "Could not reach the server: is veil serve still running?");
  }
  if (response.ok) return raw ? response : response.json();
  let detail = {};
  try {
    detail = await response.json();
  } catch {
    // not JSON (a proxy's page): the status says enough
  }
  const retry = parseInt(response.headers.get("Retry-After") || "", 10);
  throw new ApiError(response.status, detail.error || `${response.status} ${response.statusText}`,
                     detail.field ?? null, Number.isFinite(retry) ? retry : null);
}

const sessionPath = (suffix = "") => `/v1/sessions/${encodeURIComponent(app.session)}${suffix}`;

// ---- messages --------------------------------------------------------------------------------------------

let retryTimer = null;

function say(text) {
  $("status").textContent = text;
}

function hideMessage() {
  $("message").hidden = true;
  $("message-retry").hidden = true;
  clearInterval(retryTimer);
  for (const el of document.querySelectorAll("[aria-invalid=true]")) el.removeAttribute("aria-invalid");
}

function showMessage(text, retry = null, waitSeconds = 0) {
  hideMessage();
  $("message-text").textContent = text;
  $("message").hidden = false;
  const button = $("message-retry");
  if (retry) {
    button.hidden = false;
    button.onclick = () => { hideMessage(); retry(); };
    let left = waitSeconds;
    const tick = () => {
      button.disabled = left > 0;
      button.textContent = left > 0 ? `Retry in ${left} s` : "Retry";
      left -= 1;
      if (left < 0) clearInterval(retryTimer);
    };
    tick();
    if (waitSeconds > 0) retryTimer = setInterval(tick, 1000);
  }
  $("message").scrollIntoView({ block: "nearest" });
}

const FIELD_CONTROLS = { image: "file", body: "file", dataset_image: "file", protected: "attributes",
                         attributes: "attributes", "body.epsilon": "epsilon", "body.strength": "strength",
                         "body.encoding": "encoding", "body.level": "levels" };

// What an error means for the owner, from its status and field; the server's own message follows.
function explain(err) {
  const field = err.field ? err.field.replace(/^body\./, "") : "the request";
  const m = err.field && err.message.startsWith(`${err.field}: `) ? err.message.slice(err.field.length + 2) : err.message;
  switch (err.status) {
    case 0: return m;
    case 401: return sessionStorage.getItem(TOKEN_KEY) ? "The server refused that token: check it and enter it again below."
                                                       : "This server needs its token: enter it below.";
    case 404: return err.field === "session" ? `This edit session is unknown to the server (${m}). Upload the image again.` : m;
    case 409: return err.field === "session" ? `This session is closed (${m}). Upload the image again to start a new one.`
                                             : `Release refused: the privacy budget does not allow it. ${m}`;
    case 413: return `The file is too large: ${m}`;
    case 415: return `That file was refused: ${m}`;
    case 422: return `Please check ${field}: ${m}`;
    case 503: return `The server is busy (overloaded): retry in ${err.retryAfter ?? "a few"} seconds. ${m}`;
    default: return err.status >= 500 ? `The server failed: ${m}` : m;
  }
}

function showError(err, retry = null) {
  if (err.name === "AbortError") return;
  if (!(err instanceof ApiError)) err = new ApiError(-1, `Something went wrong in the page: ${err.message || err}`);
  const text = explain(err);
  if (err.field === "session" && (err.status === 404 || err.status === 409)) app.closed = true; // start anew
  if (err.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    app.afterToken = retry;
    $("token-form").hidden = false;
  }
  // a Retry only where trying again can help: no connection, overloaded (after Retry-After), a server failure
  const retryable = err.status === 0 || err.status === 503 || err.status >= 500;
  showMessage(text, retryable ? retry : null, err.status === 503 ? err.retryAfter ?? 5 : 0);
  if (err.status === 401) $("token").focus();
  const control = $(FIELD_CONTROLS[err.field] || "");
  if (control) control.setAttribute("aria-invalid", "true");
  say("");
}

// Runs an action with the page marked busy; its error is shown with a Retry that runs it again.
async function run(action, label) {
  app.busy += 1;
  document.body.classList.add("busy");
  setControls();
  if (label) say(label);
  try {
    await action();
  } catch (err) {
    showError(err, () => run(action, label));
  } finally {
    app.busy -= 1;
    if (!app.busy) document.body.classList.remove("busy");
    setControls();
  }
}

// ---- formatting ------------------------------------------------------------------------------------------

const fmtEps = (e) => (e === null || e === undefined ? "unlimited"
  : e === "inf" || e === Infinity ? "∞" : `${+Number(e).toFixed(3)}`);
const fmtValue = (v) => (v === 1 ? "yes" : v === -1 ? "no" : "unknown");
const fmtBytes = (n) => (n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MiB` : `${Math.ceil(n / 1024)} KiB`);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k in node) node[k] = v;
    else node.setAttribute(k, v);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

// ---- setup: info, levels, dataset ------------------------------------------------------------------------

async function loadInfo() {
  const info = app.info = await api("/v1/info");
  const budget = info.budget === null ? "no budget limit" : `a budget of ε ${fmtEps(info.budget)} per image and attribute`;
  $("server-info").textContent = `${info.attribute_names.length} attributes, ${info.resolution}×${info.resolution} ` +
    `pixels, ${budget}${info.classifier ? ", releases checked by a classifier" : ", releases NOT checked (no check classifier)"}.`;
  $("upload-limit").textContent = `At most ${fmtBytes(info.max_upload_bytes)}.`;
  renderLevels();
  if (info.dataset?.available) await loadDataset();
  say("Ready: upload an image to start.");
}

function renderLevels() {
  const box = $("level-options");
  box.replaceChildren();
  for (const lv of app.info.levels) {
    const id = `level-${lv.name}`;
    const keep = lv.keep_probability !== undefined ? `, value kept ${(100 * lv.keep_probability).toFixed(1)}%` : "";
    box.append(el("div", { class: "level" },
      el("input", { type: "radio", name: "level", id, value: lv.name, checked: lv.name === app.info.default_level,
                    "aria-describedby": `${id}-help` }),
      el("label", { htmlFor: id }, el("strong", {}, lv.name), ` (ε ${fmtEps(lv.epsilon)}${keep})`),
      el("p", { id: `${id}-help`, class: "muted help" }, lv.explanation)));
  }
  fillExpert(levelByName(app.info.default_level));
  updateBudgetNote();
}

const levelByName = (name) => app.info.levels.find((lv) => lv.name === name);
const selectedLevel = () => document.querySelector("input[name=level]:checked")?.value || app.info.default_level;

function selectLevel(level) {
  const radio = $(`level-${level.name}`);
  if (radio) radio.checked = true;
  fillExpert(level);
  updateBudgetNote();
}

function fillExpert(level) {
  if (!level) return;
  $("epsilon").value = level.epsilon === "inf" ? "50" : level.epsilon;
  $("strength").value = level.strength;
  $("encoding").value = level.encoding;
}

async function loadDataset() {
  const page = await api(`/v1/dataset?offset=${app.datasetOffset}&limit=${DATASET_PAGE}`);
  if (!page.available) return;
  $("dataset").hidden = false;
  for (const item of page.items) {
    const pick = el("button", { type: "button", class: "pick", title: item.id },
                    el("img", { src: item.image, alt: `Dataset image ${item.id}` }));
    pick.addEventListener("click", () => startSession({ dataset_image: item.id }, item.id));
    $("dataset-items").append(el("li", {}, pick));
  }
  app.datasetOffset += page.items.length;
  $("dataset-more").hidden = app.datasetOffset >= page.count;
}

// ---- the session -----------------------------------------------------------------------------------------

function uploadFile(file) {
  if (!file) return;
  const limit = app.info?.max_upload_bytes;
  if (limit && file.size > limit) {
    showError(new ApiError(413, `${file.name} is ${fmtBytes(file.size)}; this server takes at most ${fmtBytes(limit)}.`,
                           "image"));
    return;
  }
  startSession({ image: file }, file.name);
}

function startSession(fields, label) {
  hideMessage();
  return run(async () => {
    const form = new FormData();
    for (const [k, v] of Object.entries(fields)) form.append(k, v);
    form.append("level", selectedLevel());
    const s = await api("/v1/sessions", { method: "POST", form });
    app.stream?.abort();
    Object.assign(app, { session: s.session, closed: false, state: s });
    $("original").src = s.image;
    $("candidates").replaceChildren();
    $("release").hidden = true;
    for (const id of ["edit", "privacy", "preview", "ledger"]) $(id).hidden = false;
    renderState(s);
    say(`${label} is ready: check the attributes, choose what to protect, then preview.`);
    $("attr-title").scrollIntoView({ block: "start" });
  }, `Uploading ${label}…`);
}

function renderState(s) {
  app.state = s;
  renderAttributes(s);
  if (s.level && levelByName(s.level.name)) selectLevel(s.level);
  renderLedger(s);
  updateBudgetNote();
}

function renderAttributes(s) {
  const list = $("attributes");
  const focused = document.activeElement?.id;
  list.replaceChildren();
  const checkable = new Set(app.info.classifier ? app.info.classifier_attributes : app.info.attribute_names);
  for (const name of app.info.attribute_names) {
    const value = s.attributes[name] ?? 0;
    const guess = s.guesses?.[name];
    const guessText = guess ? `guess: ${fmtValue(guess.value)}, ${Math.round(100 * guess.confidence)}% sure` : "no guess";
    const present = el("input", { type: "checkbox", role: "switch", id: `value-${name}`, checked: value === 1,
                                  indeterminate: value === 0, disabled: app.closed });
    present.addEventListener("change", () => patch({ attributes: { [name]: present.checked ? 1 : -1 } }));
    const canProtect = checkable.has(name) && value !== 0;
    const protect = el("input", { type: "checkbox", role: "switch", id: `protect-${name}`,
                                  checked: s.protected.includes(name), disabled: app.closed || !canProtect,
                                  "aria-describedby": `guess-${name}` });
    protect.addEventListener("change", () => {
      const chosen = app.state.protected.filter((p) => p !== name);
      if (protect.checked) chosen.push(name);
      patch({ protected: chosen });
    });
    const why = !checkable.has(name) ? " (the classifier cannot check it)" : value === 0 ? " (set its value first)" : "";
    list.append(el("li", { class: `attr${s.protected.includes(name) ? " protected" : ""}` },
      el("span", { class: "attr-name" }, name),
      el("span", { class: "muted guess", id: `guess-${name}` }, guessText + why),
      el("span", { class: "switch" }, present,
         el("label", { htmlFor: `value-${name}` }, el("span", { class: "sr-only" }, `${name}: `), fmtValue(value))),
      el("span", { class: "switch" }, protect,
         el("label", { htmlFor: `protect-${name}` }, "protect", el("span", { class: "sr-only" }, ` ${name}`)))));
  }
  if (focused && $(focused)) $(focused).focus();
}

function patch(body) {
  hideMessage();
  return run(async () => {
    try {
      renderState({ ...app.state, ...(await api(sessionPath(), { method: "PATCH", json: body })) });
      say("Saved.");
    } catch (err) {
      renderState(app.state); // put the switches back as the server has them
      throw err;
    }
  });
}

function renderLedger(s) {
  const budget = $("budget-table").tBodies[0];
  budget.replaceChildren();
  const names = Object.keys(s.left || {});
  if (!names.length) {
    budget.append(el("tr", {}, el("td", { colSpan: 3 }, "Protect an attribute to see its budget.")));
  }
  for (const name of names) {
    budget.append(el("tr", {}, el("th", { scope: "row" }, name), el("td", {}, fmtEps(s.spent?.[name] ?? 0)),
                     el("td", { class: "left", "data-attribute": name }, fmtEps(s.left[name]))));
  }
  $("budget-table").caption.textContent = s.budget === null ? "Epsilon spent per protected attribute (no limit)"
    : `Epsilon left per protected attribute, of ${fmtEps(s.budget)}`;
  const history = $("history-table").tBodies[0];
  history.replaceChildren();
  if (!s.history?.length) history.append(el("tr", {}, el("td", { colSpan: 5 }, "No release of this image yet.")));
  for (const h of s.history || []) {
    history.append(el("tr", {}, el("td", {}, String(h.release_id)),
      el("td", {}, h.released_at ? new Date(h.released_at).toLocaleString() : ""),
      el("td", {}, `${h.level ?? ""} (ε ${fmtEps(h.epsilon)})`), el("td", {}, (h.protected || []).join(", ")),
      el("td", {}, h.outcome ?? "")));
  }
}

function updateBudgetNote() {
  if (!app.info) return;
  const lv = $("expert").checked ? { epsilon: $("epsilon").value } : levelByName(selectedLevel());
  const chosen = app.state?.protected || [];
  const cost = lv?.epsilon === "inf" ? Infinity : Number(lv?.epsilon);
  const short = chosen.filter((p) => app.state.left?.[p] != null && app.state.left[p] < cost);
  $("budget-note").textContent = !chosen.length ? "Switch on \"protect\" for at least one attribute to preview."
    : `Accepting at this level costs ε ${fmtEps(lv?.epsilon)} for each protected attribute (${chosen.join(", ")}).` +
      (short.length ? ` Not enough budget is left for ${short.map((p) => `${p} (${fmtEps(app.state.left[p])})`)
        .join(", ")}: choose a more private level.` : "");
}

// ---- preview: the candidates as the server streams them --------------------------------------------------

function previewBody() {
  const body = { n: parseInt($("count").value, 10), protected: app.state.protected, level: selectedLevel() };
  if ($("expert").checked) {
    const epsilon = Number($("epsilon").value), strength = Number($("strength").value);
    if ($("epsilon").value === "" || !Number.isFinite(epsilon)) throw new ApiError(422, "epsilon: give a number from 0 to 50", "body.epsilon");
    if ($("strength").value === "" || !Number.isFinite(strength)) throw new ApiError(422, "strength: give a number above 0, up to 1", "body.strength");
    Object.assign(body, { epsilon, strength, encoding: $("encoding").value });
  }
  return body;
}

function preview() {
  hideMessage();
  if (!app.state?.protected.length) {
    showError(new ApiError(422, "switch on \"protect\" for at least one attribute first", "protected"));
    return Promise.resolve();
  }
  return run(async () => {
    app.stream?.abort();
    const stream = app.stream = new AbortController();
    const body = previewBody();
    const response = await api(sessionPath("/previews"), { method: "POST", json: body, raw: true, signal: stream.signal });
    const slots = [];
    $("candidates").replaceChildren();
    for (let i = 0; i < body.n; i += 1) {
      const img = el("img", { alt: `Candidate ${i + 1}, refining` });
      const caption = el("figcaption", {}, `Candidate ${i + 1}`);
      slots.push({ img, caption });
      $("candidates").append(el("li", { class: "candidate pending" }, el("figure", {}, img, caption)));
    }
    await readEvents(response, (event, data) => onPreviewEvent(event, data, slots));
  }, "Previewing…");
}

async function readEvents(response, handle) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) handle(event, JSON.parse(data));
    }
  }
}

function onPreviewEvent(event, data, slots) {
  const progress = $("progress");
  if (event === "start") {
    progress.max = Math.max(1, data.steps);
    progress.value = 0;
    progress.hidden = false;
    app.state = { ...app.state, protected: data.protected, level: data.level };
    if (levelByName(data.level.name)) selectLevel(data.level);
    say(`Previewing ${data.n} candidates at ${data.level.name} (ε ${fmtEps(data.level.epsilon)})…`);
  } else if (event === "preview") {
    progress.max = Math.max(1, data.steps);
    progress.value = data.step;
    data.images.forEach((src, i) => { if (slots[i]) slots[i].img.src = src; });
  } else if (event === "candidate") {
    const slot = slots[data.index];
    if (!slot) return;
    slot.img.src = data.image;
    const released = app.state.protected.map((p) => `${p}: ${fmtValue(data.released_attributes[p])}`).join(", ");
    slot.img.alt = `Candidate ${data.index + 1}: released as ${released}`;
    slot.caption.textContent = `${released} (chance ${Math.round(100 * data.probability)}%)`;
    slot.img.closest("li").classList.replace("pending", "final");
  } else if (event === "done") {
    progress.value = progress.max;
    progress.hidden = true;
    say(`${data.n} candidates ready. Accept to release a fresh draw at this level, or change the level.`);
  } else if (event === "error") {
    progress.hidden = true;
    throw new ApiError(500, data.error, data.field ?? null);
  }
}

// ---- feedback: more / less private, accept, reject -------------------------------------------------------

function move(action) {
  hideMessage();
  return run(async () => {
    const r = await api(sessionPath("/feedback"), { method: "POST", json: { action } });
    app.state = { ...app.state, level: r.level };
    $("expert").checked = false;
    $("expert-fields").hidden = true;
    selectLevel(r.level);
    say(r.suggestion ? `Level: ${r.level.name}. ${r.suggestion}.` : `Level: ${r.level.name}.`);
    if (r.level && app.state.protected.length) await preview();
  });
}

function newKey() {
  if (crypto.randomUUID) return crypto.randomUUID();
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

function accept() {
  hideMessage();
  const key = newKey(); // one per click; the Retry of a failed accept reuses it (run retries this closure)
  return run(async () => {
    app.stream?.abort();
    const r = await api(sessionPath("/feedback"), { method: "POST",
                                                    json: { action: "accept", idempotency_key: key } });
    app.closed = true;
    showRelease(r);
    renderState(await api(sessionPath()));
  }, "Releasing: drawing and checking a fresh edit…");
}

function showRelease(r) {
  const section = $("release");
  section.hidden = false;
  const rel = r.release;
  $("released-figure").hidden = !rel;
  $("release-details").hidden = !rel;
  section.querySelector(".release").classList.toggle("refused", !rel);  // no image: the words take the full width
  $("released-attributes").replaceChildren();
  $("release-cost").replaceChildren();
  if (rel) {
    $("released-image").src = rel.image;
    $("release-summary").textContent = `Release #${rel.release_id} at ${rel.level.name} (ε ${fmtEps(rel.epsilon)})` +
      `${rel.checked ? ", checked by the classifier" : ""}${r.replayed ? " (already recorded: replayed)" : ""}.`;
    for (const [name, v] of Object.entries(rel.released_attributes)) {
      $("released-attributes").append(el("li", { class: rel.protected.includes(name) ? "protected" : "" },
        `${name}: ${fmtValue(v)}${rel.protected.includes(name) ? " (protected: randomized)" : ""}`));
    }
    for (const [name, eps] of Object.entries(rel.cost)) {
      $("release-cost").append(el("li", {}, `${name}: ε ${fmtEps(eps)}`));
    }
    say(`Released (#${rel.release_id}). The budget below is updated; download the revision to publish.`);
  } else {
    const hint = r.suggestion ? ` ${r.suggestion[0].toUpperCase()}${r.suggestion.slice(1)}.` : "";
    $("release-summary").textContent = `Refused: ${r.refusal || "the edit did not pass its check"}.${hint}`;
    for (const name of app.state.protected) {  // a refused draw is charged all the same
      $("release-cost").append(el("li", {}, `${name}: ε ${fmtEps(r.level.epsilon)} (charged, nothing published)`));
    }
    say("The edit was refused: recorded and charged, not published.");
  }
  $("release-title").focus();
}

function reject() {
  hideMessage();
  return run(async () => {
    app.stream?.abort();
    await api(sessionPath("/feedback"), { method: "POST", json: { action: "reject" } });
    app.closed = true;
    renderState(await api(sessionPath()));
    say("Rejected: nothing was released or charged. Upload an image to start again.");
  });
}

function setControls() {
  const open = Boolean(app.session) && !app.closed;
  const idle = app.busy === 0;
  for (const id of ["more-private", "less-private", "reject"]) $(id).disabled = !open || !idle;
  $("accept").disabled = !open || !idle;
  $("preview-button").disabled = !open || !idle;
  $("file").disabled = !idle;
}

// ---- the revision ----------------------------------------------------------------------------------------

function download() {
  hideMessage();
  return run(async () => {
    const response = await api("/v1/revision", { raw: true });
    const url = URL.createObjectURL(await response.blob());
    const link = el("a", { href: url, download: "veil-revision.zip", class: "sr-only" });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
    say("Revision downloaded (veil-revision.zip).");
  }, "Preparing the revision…");
}

// ---- wiring ----------------------------------------------------------------------------------------------

function wire() {
  $("file").addEventListener("change", (e) => { uploadFile(e.target.files[0]); e.target.value = ""; });
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    uploadFile(e.dataTransfer.files[0]);
  });
  $("dataset-more").addEventListener("click", () => run(loadDataset));
  $("level-options").addEventListener("change", () => {
    fillExpert(levelByName(selectedLevel()));
    updateBudgetNote();
    if (app.session && !app.closed) patch({ level: selectedLevel() });
  });
  $("expert").addEventListener("change", () => {
    $("expert-fields").hidden = !$("expert").checked;
    updateBudgetNote();
  });
  $("epsilon").addEventListener("input", updateBudgetNote);
  $("preview-button").addEventListener("click", preview);
  $("more-private").addEventListener("click", () => move("more_private"));
  $("less-private").addEventListener("click", () => move("less_private"));
  $("accept").addEventListener("click", accept);
  $("reject").addEventListener("click", reject);
  $("download").addEventListener("click", download);
  $("new-image").addEventListener("click", () => { $("image-section").scrollIntoView(); $("file").focus(); });
  $("message-close").addEventListener("click", hideMessage);
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value);
    $("token").value = "";
    $("token-form").hidden = true;
    hideMessage();
    const next = app.afterToken || (() => run(loadInfo, "Connecting…"));
    app.afterToken = null;
    next();
  });
  window.addEventListener("error", (e) => showError(e.error || new Error(e.message)));
  window.addEventListener("unhandledrejection", (e) => showError(e.reason || new Error("unknown failure")));
  setControls();
}

wire();
run(loadInfo, "Connecting to the server…");
