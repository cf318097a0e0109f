/* The settings page at /me/proxy: one small ES module, no framework, no build step.
 *
 * The page is a shell (sign-in, sign-out, polling) around a list of panels. A panel is
 * an object with
 *   refresh(ctx)  (optional) read what it shows from the API: on sign-in, every
 *                 REFRESH_MS while the tab is visible, and after any change;
 *   reset()       forget everything (on sign-out);
 * and optionally signedIn(ctx) for what depends only on the token. A new panel is a
 * <section> in the page and one more entry in PANELS; the shell needs no change.
 *
 * The gateway token lives in sessionStorage only and goes out as Authorization: Bearer
 * to this origin's API; no cookie is ever sent (credentials: "omit"). Nothing the API
 * returns is inserted as HTML: text nodes and textContent only.
 */

const KEY_API = "/api/v1/me/anthropic-key";
const USAGE_API = "/api/v1/me/usage";
const USAGE_DAYS = 7;
const SVG_NS = "http://www.w3.org/2000/svg";
const TOKEN_STORAGE = "gateway-token";
const REFRESH_MS = 10_000;

// The settings API's rules (gateway/me_api.py), mirrored exactly.
const MIN_CAP = 1;
const MAX_CAP = 256;
const DEFAULT_CAP = 8;
const MAX_KEY_LENGTH = 256;
const KEY_PREFIX = "sk-ant-";

const byId = (id) => document.getElementById(id);

/* ------------------------------------------------------------------ the API client */

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function callApi(token, method, path, body) {
  const init = {
    method,
    headers: { authorization: `Bearer ${token}`, accept: "application/json" },
    credentials: "omit",
    cache: "no-store",
    redirect: "error",
  };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    throw new ApiError(0, "The gateway did not answer. Check the connection and try again.");
  }
  if (response.status === 204) return null;
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) {
    const message = data?.error?.message;
    throw new ApiError(
      response.status,
      typeof message === "string" ? message : `The gateway answered ${response.status}.`,
    );
  }
  return data;
}

/* -------------------------------------------------------------------- small helpers */

function showError(element, message) {
  element.textContent = message;
  element.hidden = !message;
}

function setInvalid(input, error, message) {
  showError(error, message);
  if (message) input.setAttribute("aria-invalid", "true");
  else input.removeAttribute("aria-invalid");
}

/** "max_concurrent: must be ..." -> ["max_concurrent", "Must be ..."]; [null, message] else. */
function splitFieldMessage(message) {
  const match = /^([a-z_]+): (.*)$/s.exec(message);
  if (!match) return [null, message];
  const rest = match[2];
  return [match[1], rest.charAt(0).toUpperCase() + rest.slice(1)];
}

const dateTime = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });

/* ------------------------------------------------------ validation, as the API does */

/** The cap field's text -> {value} or {error}: an integer from 1 to 256. */
function checkCap(text, badInput = false) {
  const trimmed = text.trim();
  if (badInput) return { error: `Must be a whole number from ${MIN_CAP} to ${MAX_CAP}.` };
  if (trimmed === "") {
    return { error: `Enter the number of concurrent requests, from ${MIN_CAP} to ${MAX_CAP}.` };
  }
  if (!/^[0-9]+$/.test(trimmed)) {
    return { error: `Must be a whole number from ${MIN_CAP} to ${MAX_CAP}, got ${trimmed}.` };
  }
  const value = Number(trimmed);
  if (value < MIN_CAP || value > MAX_CAP) {
    return { error: `Must be between ${MIN_CAP} and ${MAX_CAP}, got ${value}.` };
  }
  return { value };
}

/** The key field's text -> {value} ("" for no change) or {error}. */
function checkKey(text) {
  const key = text.trim();
  if (key === "") return { value: "" };
  // Counted in code points, as the API (Python) counts them.
  const length = [...key].length;
  if (length > MAX_KEY_LENGTH) {
    return { error: `Must be at most ${MAX_KEY_LENGTH} characters (this one has ${length}).` };
  }
  if (!key.startsWith(KEY_PREFIX)) return { error: `Must start with ${KEY_PREFIX}` };
  return { value: key };
}

/* -------------------------------------------------- the key and cap panel (key-panel) */

const keyPanel = {
  stored: null, // the last status the API gave
  busy: false,

  init(ctx) {
    this.ctx = ctx;
    this.form = byId("key-form");
    this.keyInput = byId("key");
    this.capInput = byId("cap");
    this.save = byId("save");
    this.remove = byId("remove");
    this.dialog = byId("remove-dialog");
    this.message = byId("form-message");
    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.submit();
    });
    for (const input of [this.keyInput, this.capInput]) {
      input.addEventListener("input", () => {
        this.updateSave();
        this.clearMessage();
      });
    }
    byId("refresh").addEventListener("click", () => ctx.refreshAll());
    this.remove.addEventListener("click", () => this.dialog.showModal());
    byId("remove-cancel").addEventListener("click", () => this.dialog.close("cancel"));
    byId("remove-confirm").addEventListener("click", () => this.dialog.close("remove"));
    // Escape closes the dialog too; either way it ends here.
    this.dialog.addEventListener("close", () => {
      if (this.dialog.returnValue === "remove") this.confirmRemove();
      else if (!this.remove.hidden) this.remove.focus();
      this.dialog.returnValue = "";
    });
  },

  async refresh(ctx) {
    const status = await ctx.api("GET", KEY_API);
    this.show(status);
  },

  reset() {
    this.stored = null;
    this.form.reset();
    this.capInput.value = "";
    this.clearErrors();
    this.clearMessage();
    byId("status").textContent = "Loading…";
    showError(byId("status-problem"), "");
    this.remove.hidden = true;
    this.updateSave();
  },

  baselineCap() {
    return this.stored?.max_concurrent ?? DEFAULT_CAP;
  },

  show(status) {
    const previousBaseline = this.stored === null ? null : this.baselineCap();
    this.stored = status;
    this.renderStatus();
    // Follow the stored cap unless the user is editing it.
    const capText = this.capInput.value.trim();
    if (previousBaseline === null || capText === String(previousBaseline)) {
      this.capInput.value = String(this.baselineCap());
    }
    this.keyInput.placeholder = status.configured
      ? "Leave empty to keep the stored key"
      : "sk-ant-…";
    this.remove.hidden = !status.configured;
    this.updateSave();
  },

  renderStatus() {
    const line = byId("status");
    const status = this.stored;
    line.replaceChildren();
    if (!status.configured) {
      line.textContent = "No key stored yet";
      return;
    }
    const time = document.createElement("time");
    time.dateTime = status.configured_at;
    const at = new Date(status.configured_at);
    time.textContent = Number.isNaN(at.getTime()) ? String(status.configured_at) : dateTime.format(at);
    const tail = [`cap ${status.max_concurrent}`];
    // null only in the instant a key is removed between the two reads of a status.
    if (typeof status.in_use === "number") tail.push(`${status.in_use} in use now`);
    line.append("Configured · last set ", time, ` · ${tail.join(" · ")}`);
  },

  changed() {
    return (
      this.keyInput.value.trim() !== "" ||
      this.capInput.value.trim() !== String(this.baselineCap()) ||
      this.capInput.validity.badInput
    );
  },

  updateSave() {
    this.save.disabled = this.busy || this.stored === null || !this.changed();
    this.remove.disabled = this.busy;
  },

  clearErrors() {
    setInvalid(this.keyInput, byId("key-error"), "");
    setInvalid(this.capInput, byId("cap-error"), "");
  },

  clearMessage() {
    this.message.textContent = "";
    this.message.classList.remove("bad");
  },

  say(text, { bad = false, focus = false } = {}) {
    this.message.textContent = text;
    this.message.classList.toggle("bad", bad);
    if (focus) this.message.focus();
  },

  /** Validate as the API would; show every error and focus the first. The body or null. */
  validated() {
    this.clearErrors();
    const errors = [];
    const key = checkKey(this.keyInput.value);
    const cap = checkCap(this.capInput.value, this.capInput.validity.badInput);
    if (key.error) errors.push([this.keyInput, byId("key-error"), key.error]);
    if (cap.error) errors.push([this.capInput, byId("cap-error"), cap.error]);
    const body = {};
    if (key.value) body.key = key.value;
    if (cap.value !== undefined && cap.value !== this.baselineCap()) {
      body.max_concurrent = cap.value;
    }
    if (!errors.length && !body.key && !this.stored.configured && "max_concurrent" in body) {
      // The API's rule: a cap alone needs a stored key.
      errors.push([this.keyInput, byId("key-error"), "Enter your key too: none is stored yet."]);
    }
    for (const [input, error, message] of errors) setInvalid(input, error, message);
    if (errors.length) {
      errors[0][0].focus();
      return null;
    }
    return Object.keys(body).length ? body : null;
  },

  async submit() {
    if (this.busy || this.stored === null) return;
    this.clearMessage();
    const body = this.validated();
    if (body === null) return;
    this.busy = true;
    this.updateSave();
    try {
      await this.ctx.api("PUT", KEY_API, body);
      this.keyInput.value = "";
      this.capInput.value = String(body.max_concurrent ?? this.baselineCap());
      const done = [];
      if (body.key) done.push(this.stored.configured ? "key replaced" : "key stored");
      if (body.max_concurrent) done.push(`cap ${body.max_concurrent}`);
      this.say(`Saved: ${done.join(", ")}.`, { focus: true });
      await this.ctx.refreshAll();
    } catch (error) {
      this.failed(error);
    } finally {
      this.busy = false;
      this.updateSave();
    }
  },

  failed(error) {
    if (!(error instanceof ApiError)) throw error;
    if (error.status === 401) return; // the shell has signed out and says why
    const [field, message] = splitFieldMessage(error.message);
    const target = {
      key: [this.keyInput, byId("key-error")],
      max_concurrent: [this.capInput, byId("cap-error")],
    }[field];
    // 409: a cap alone while no key is stored (the state, not the input, is the problem).
    if ((error.status === 400 || error.status === 409) && target) {
      setInvalid(target[0], target[1], message);
      target[0].focus();
    } else {
      this.say(error.message, { bad: true, focus: true });
    }
    // A refusal often means the page is behind (a change made elsewhere): catch up.
    this.ctx.refreshAll();
  },

  async confirmRemove() {
    this.busy = true;
    this.updateSave();
    try {
      await this.ctx.api("DELETE", KEY_API);
      this.keyInput.value = "";
      this.clearErrors();
      this.say("Key removed.", { focus: true });
      await this.ctx.refreshAll();
    } catch (error) {
      this.failed(error);
    } finally {
      this.busy = false;
      this.updateSave();
    }
  },
};

/* ---------------------------------------------------------- the "Use it" panel */

const MASK = "•".repeat(12);

const usePanel = {
  token: "",
  revealed: false,

  init() {
    this.list = byId("snippets");
    this.revealButton = byId("reveal");
    this.copyMessage = byId("copy-message");
    this.revealButton.addEventListener("click", () => {
      this.revealed = !this.revealed;
      this.render();
    });
  },

  signedIn(ctx) {
    this.token = ctx.token;
    this.render();
  },

  reset() {
    this.token = "";
    this.revealed = false;
    this.list.replaceChildren();
    this.copyMessage.textContent = "";
  },

  snippets() {
    const origin = window.location.origin;
    const shown = this.revealed ? this.token : `${this.token.slice(0, 4)}${MASK}`;
    const both = (token) => [
      ["Base URL", `export ANTHROPIC_BASE_URL=${origin}`],
      ["Gateway token", `export ANTHROPIC_API_KEY=${token}`],
      ["Claude Code", `ANTHROPIC_BASE_URL=${origin} ANTHROPIC_API_KEY=${token} claude`],
      [
        "Python SDK",
        `client = anthropic.Anthropic(base_url="${origin}", api_key="${token}")`,
      ],
    ];
    const real = both(this.token);
    return both(shown).map(([label, text], i) => ({ label, text, copy: real[i][1] }));
  },

  render() {
    this.revealButton.textContent = this.revealed ? "Hide token" : "Show token";
    this.list.replaceChildren(
      ...this.snippets().map(({ label, text, copy }) => {
        const item = document.createElement("li");
        const name = document.createElement("span");
        name.className = "snippet-label";
        name.textContent = label;
        const code = document.createElement("code");
        code.textContent = text;
        const button = document.createElement("button");
        button.type = "button";
        button.className = "copy";
        button.textContent = "Copy";
        button.setAttribute("aria-label", `Copy: ${label}`);
        button.addEventListener("click", () => this.copy(copy, label));
        item.append(name, code, button);
        return item;
      }),
    );
  },

  async copy(text, label) {
    const copied = await copyText(text);
    this.copyMessage.textContent = copied
      ? `Copied: ${label}.`
      : "Copying is blocked here: select the line and copy it by hand.";
  },
};

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      // Refused (permissions): fall back to a selection below.
    }
  }
  // Plain http on a host name is no secure context and has no clipboard API.
  const area = document.createElement("textarea");
  area.className = "offscreen";
  area.value = text;
  area.setAttribute("readonly", "");
  area.setAttribute("aria-hidden", "true");
  area.tabIndex = -1;
  document.body.append(area);
  area.select();
  let copied = false;
  try {
    copied = document.execCommand("copy");
  } catch {
    copied = false;
  }
  area.remove();
  return copied;
}

/* ------------------------------------------------------------ the usage panel */

const numbers = new Intl.NumberFormat();
const dayNames = new Intl.DateTimeFormat(undefined, {
  weekday: "short",
  day: "numeric",
  timeZone: "UTC",
});
const longDays = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeZone: "UTC" });

/** The last USAGE_DAYS UTC days, oldest first, as "YYYY-MM-DD" (the API's day keys). */
function lastDays(now) {
  const today = Date.UTC(now.getUTCFullYear(), now.getUTCMonth(), now.getUTCDate());
  const days = [];
  for (let back = USAGE_DAYS - 1; back >= 0; back -= 1) {
    days.push(new Date(today - back * 86_400_000).toISOString().slice(0, 10));
  }
  return days;
}

function svgElement(name, attributes) {
  const element = document.createElementNS(SVG_NS, name);
  for (const [attribute, value] of Object.entries(attributes)) {
    element.setAttribute(attribute, String(value));
  }
  return element;
}

const usagePanel = {
  init() {
    this.summary = byId("usage-summary");
    this.figure = byId("usage-figure"); // the chart and its legend
    this.chart = byId("usage-chart");
    this.table = byId("usage-table");
    this.rows = byId("usage-rows");
  },

  async refresh(ctx) {
    const report = await ctx.api("GET", `${USAGE_API}?group_by=day`);
    if (report) this.render(report);
  },

  reset() {
    this.summary.textContent = "Loading…";
    this.clearChart();
    this.rows.replaceChildren();
    this.figure.hidden = true;
    this.table.hidden = true;
  },

  clearChart() {
    for (const child of [...this.chart.children]) {
      if (child.tagName !== "title") child.remove();
    }
  },

  render(report) {
    const byDay = new Map(report.rows.map((row) => [row.day, row]));
    const days = lastDays(new Date()).map((day) => {
      const row = byDay.get(day) ?? {};
      const counts = {
        requests: row.requests ?? 0,
        rejected: row.rejected ?? 0,
        input: row.input_tokens ?? 0,
        cacheWrite: row.cache_creation_input_tokens ?? 0,
        cacheRead: row.cache_read_input_tokens ?? 0,
        output: row.output_tokens ?? 0,
      };
      counts.inputSide = counts.input + counts.cacheWrite + counts.cacheRead;
      return { day, ...counts };
    });
    const total = report.totals;
    const tokens =
      total.input_tokens +
      total.cache_creation_input_tokens +
      total.cache_read_input_tokens +
      total.output_tokens;
    const used = total.requests > 0 || total.rejected > 0;
    this.summary.textContent = used
      ? `${numbers.format(total.requests)} request${total.requests === 1 ? "" : "s"}, ` +
        `${numbers.format(total.rejected)} ` +
        `refused (429), ${numbers.format(tokens)} tokens ` +
        `(${numbers.format(total.output_tokens)} output).`
      : "No requests in the last 7 days.";
    this.figure.hidden = !used;
    this.table.hidden = !used;
    this.drawChart(days);
    this.fillTable(days);
  },

  drawChart(days) {
    this.clearChart();
    const top = 10;
    const height = 130;
    const slot = 700 / days.length;
    const most = Math.max(1, ...days.map((d) => d.inputSide + d.output));
    days.forEach((d, index) => {
      const x = index * slot + slot * 0.2;
      const width = slot * 0.6;
      const inHeight = (d.inputSide / most) * height;
      const outHeight = (d.output / most) * height;
      const group = svgElement("g", { class: "usage-day", "data-day": d.day });
      const tip = svgElement("title", {});
      tip.textContent =
        `${longDays.format(new Date(`${d.day}T00:00:00Z`))}: ` +
        `${numbers.format(d.inputSide)} input, ${numbers.format(d.output)} output tokens, ` +
        `${numbers.format(d.requests)} requests, ${numbers.format(d.rejected)} refused`;
      group.append(
        tip,
        svgElement("rect", {
          class: "bar bar-in",
          x,
          y: top + height - inHeight,
          width,
          height: inHeight,
        }),
        svgElement("rect", {
          class: "bar bar-out",
          x,
          y: top + height - inHeight - outHeight,
          width,
          height: outHeight,
        }),
      );
      const label = svgElement("text", {
        class: "usage-label",
        x: index * slot + slot / 2,
        y: top + height + 22,
        "text-anchor": "middle",
      });
      label.textContent = dayNames.format(new Date(`${d.day}T00:00:00Z`));
      group.append(label);
      this.chart.append(group);
    });
    this.chart.append(
      svgElement("line", { class: "axis", x1: 0, x2: 700, y1: top + height, y2: top + height }),
    );
  },

  fillTable(days) {
    this.rows.replaceChildren(
      ...[...days].reverse().map((d) => {
        const row = document.createElement("tr");
        const head = document.createElement("th");
        head.scope = "row";
        head.textContent = longDays.format(new Date(`${d.day}T00:00:00Z`));
        row.append(head);
        for (const value of [
          d.requests,
          d.rejected,
          d.input,
          d.cacheWrite,
          d.cacheRead,
          d.output,
        ]) {
          const cell = document.createElement("td");
          cell.textContent = numbers.format(value);
          row.append(cell);
        }
        return row;
      }),
    );
  },
};

/* ---------------------------------------------------------------------- the shell */

const PANELS = [keyPanel, usagePanel, usePanel];

const shell = {
  token: null,
  timer: null,
  round: null,
  nextRound: null,

  start() {
    const ctx = {
      api: (method, path, body) => this.api(method, path, body),
      refreshAll: () => this.refreshAll(),
      get token() {
        return shell.token;
      },
    };
    this.ctx = ctx;
    for (const panel of PANELS) panel.init(ctx);
    byId("sign-in-form").addEventListener("submit", (event) => {
      event.preventDefault();
      this.signIn();
    });
    byId("sign-out").addEventListener("click", () => this.signOut(""));
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && this.token) this.refreshAll();
    });
    const saved = sessionStorage.getItem(TOKEN_STORAGE);
    if (saved) this.enter(saved);
    else this.showSignIn("");
  },

  async api(method, path, body) {
    try {
      return await callApi(this.token, method, path, body);
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) {
        this.signOut(error.message);
      }
      throw error;
    }
  },

  async signIn() {
    const input = byId("token");
    const error = byId("token-error");
    const token = input.value.trim();
    setInvalid(input, error, "");
    if (!token) {
      setInvalid(input, error, "Paste your gateway token.");
      input.focus();
      return;
    }
    const button = byId("sign-in-button");
    button.disabled = true;
    try {
      await callApi(token, "GET", KEY_API);
    } catch (failure) {
      setInvalid(input, error, failure.message);
      input.focus();
      return;
    } finally {
      button.disabled = false;
    }
    input.value = "";
    sessionStorage.setItem(TOKEN_STORAGE, token);
    await this.enter(token);
    // The sign-in form is gone: keyboard users continue at the first field.
    if (this.token) byId("key").focus();
  },

  async enter(token) {
    this.token = token;
    byId("sign-in").hidden = true;
    byId("signed-in").hidden = false;
    byId("sign-out").hidden = false;
    for (const panel of PANELS) panel.signedIn?.(this.ctx);
    clearInterval(this.timer);
    this.timer = setInterval(() => {
      if (!document.hidden) this.refreshAll();
    }, REFRESH_MS);
    await this.refreshAll();
  },

  /** Every panel reads again. One round at a time; a call during a round gets a fresh
   * round after it, so a change is never answered by a read that started before it. */
  refreshAll() {
    if (!this.nextRound) {
      const previous = this.round ?? Promise.resolve();
      this.nextRound = previous.then(() => {
        this.nextRound = null;
        this.round = this.readPanels().finally(() => {
          this.round = null;
        });
        return this.round;
      });
    }
    return this.nextRound;
  },

  async readPanels() {
    if (!this.token) return;
    const results = await Promise.allSettled(
      PANELS.map(async (panel) => panel.refresh?.(this.ctx)),
    );
    if (!this.token) return;
    const failed = results.find((result) => result.status === "rejected");
    const reason = failed?.reason;
    showError(
      byId("status-problem"),
      failed ? `Not up to date: ${reason instanceof Error ? reason.message : reason}` : "",
    );
    // Our own bug, not the gateway's answer: keep it visible to whoever debugs the page.
    if (failed && !(reason instanceof ApiError)) console.error(reason);
  },

  signOut(message) {
    this.token = null;
    clearInterval(this.timer);
    this.timer = null;
    sessionStorage.removeItem(TOKEN_STORAGE);
    for (const panel of PANELS) panel.reset();
    const dialog = byId("remove-dialog");
    if (dialog.open) dialog.close("cancel");
    this.showSignIn(message);
  },

  showSignIn(message) {
    byId("signed-in").hidden = true;
    byId("sign-out").hidden = true;
    byId("sign-in").hidden = false;
    const input = byId("token");
    setInvalid(input, byId("token-error"), message);
    input.focus();
  },
};

shell.start();
