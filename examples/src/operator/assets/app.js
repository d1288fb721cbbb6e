// fleet dashboard. Plain browser JavaScript, no framework, no build step, no external assets.
// Every figure comes from the operator JSON API (/api/v1/...) with the session cookie; writes
// carry the session's CSRF token from <meta name="fleet-csrf">. Text is always set through
// textContent (never innerHTML), so nothing an agent reports can inject markup, and every text
// the page shows passes through visible(), so nothing an agent reports can hide or reorder
// what is shown either.
"use strict";

const CSRF = document.querySelector('meta[name="fleet-csrf"]').content;
const TENANT = document.querySelector('meta[name="fleet-tenant"]').content;
const PAGE_SIZE = 50;
const REFRESH_MS = 3000;

// ---------- small helpers ----------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") headers["X-CSRF-Token"] = CSRF;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (r.status === 401) {
    location.assign("/login?next=" + encodeURIComponent(location.pathname + location.search));
    throw new ApiError(401, "unauthorized", "session ended");
  }
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!r.ok) {
    const e = (data && data.error) || {};
    throw new ApiError(r.status, e.code || "http_" + r.status, e.message || r.statusText);
  }
  return data;
}

// Characters that are not shown, or change how the text around them is shown: controls (Cc),
// format characters (Cf: the bidirectional overrides and isolates U+202A–U+202E and
// U+2066–U+2069, the zero-width U+200B–U+200F, U+FEFF and the rest) and the line and paragraph
// separators. A hostname with U+202E would otherwise read backwards, and one with U+200B look
// like another machine's.
const HIDDEN = /[\p{Cc}\p{Cf}\p{Zl}\p{Zp}]/gu;

function codePoint(ch) {
  return ch.codePointAt(0).toString(16).toUpperCase().padStart(4, "0");
}

// `text` as nodes to show: its ordinary runs as text, each hidden character as a visible escape
// (`\u{202E}`) in a distinct style.
function visible(text) {
  const out = [];
  let last = 0;
  for (const m of text.matchAll(HIDDEN)) {
    if (m.index > last) out.push(text.slice(last, m.index));
    const cp = codePoint(m[0]);
    const e = document.createElement("span");
    e.className = "esc";
    e.title = "U+" + cp + ": an invisible or control character in this text";
    e.textContent = "\\u{" + cp + "}";
    out.push(e);
    last = m.index + m[0].length;
  }
  if (last < text.length) out.push(text.slice(last));
  return out;
}

// The same for places that take a plain string (tooltips).
function visibleText(text) {
  return String(text).replace(HIDDEN, (ch) => "\\u{" + codePoint(ch) + "}");
}

// el("div", {class: "x", onclick: f}, child, "text", [more children])
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "class") e.className = v;
    else if (k === "dataset") Object.assign(e.dataset, v);
    else if (k === "value") e.value = v;
    else if (k === "title") e.title = visibleText(v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  append(e, children);
  return e;
}

function append(parent, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    if (c instanceof Node) parent.append(c);
    else parent.append(...visible(String(c)));
  }
  return parent;
}

function replace(node, ...children) {
  node.replaceChildren();
  return append(node, children);
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  let v = Number(n);
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i === 0 ? v.toFixed(0) : v.toFixed(v >= 100 ? 0 : 1)) + " " + units[i];
}

function rate(n) {
  return n === null || n === undefined ? "–" : bytes(n) + "/s";
}

function pct(n, digits = 1) {
  return n === null || n === undefined ? "–" : Number(n).toFixed(digits) + " %";
}

function duration(secs) {
  if (secs === null || secs === undefined) return "–";
  secs = Math.max(0, Math.floor(secs));
  const d = Math.floor(secs / 86400), h = Math.floor((secs % 86400) / 3600);
  const m = Math.floor((secs % 3600) / 60), s = secs % 60;
  if (d > 0) return d + "d " + h + "h";
  if (h > 0) return h + "h " + m + "m";
  if (m > 0) return m + "m " + s + "s";
  return s + "s";
}

function ago(ts) {
  if (!ts) return "never";
  const secs = (Date.now() - Date.parse(ts)) / 1000;
  if (secs < 0) return "just now";
  return duration(secs) + " ago";
}

function when(ts) {
  if (!ts) return "–";
  const d = new Date(ts);
  return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
}

function ratio(used, total) {
  return used === null || used === undefined || !total ? null : (100 * used) / total;
}

function bar(p) {
  if (p === null || p === undefined) return el("span", { class: "muted" }, "–");
  const cls = p >= 90 ? "bar hot" : p >= 75 ? "bar warm" : "bar";
  const fill = el("span");
  fill.style.width = Math.max(0, Math.min(100, p)).toFixed(1) + "%";
  return el("span", { class: "metric" }, el("span", { class: cls }, fill),
    el("span", { class: "pct" }, Math.round(p) + "%"));
}

function statusBadge(status) {
  return el("span", { class: "status-" + status },
    el("span", { class: "dot" }), el("span", { class: "status-label" }, status));
}

function tagChips(tags, groups) {
  return [
    Object.entries(tags || {}).map(([k, v]) => el("span", { class: "tag" }, v === "" ? k : k + "=" + v)),
    (groups || []).map((g) => el("span", { class: "tag group" }, g)),
  ];
}

function quote(s) {
  return '"' + s.replace(/\\/g, "\\\\").replace(/"/g, '\\"') + '"';
}

function showError(where, e) {
  replace(where, el("p", { class: "error", role: "alert" }, e.message || String(e)));
}

function markReady(page) {
  document.documentElement.dataset.page = page;
  if (!document.documentElement.dataset.ready) {
    document.documentElement.dataset.ready = "1";
    performance.mark("fleet-data-painted");
  }
}

// Polls `fn` every REFRESH_MS while the tab is visible; one run at a time.
let timer = null;
function live(fn) {
  const dot = document.getElementById("live");
  let busy = false;
  const tick = async () => {
    if (!document.hidden && !busy) {
      busy = true;
      try {
        await fn();
        dot.className = "live on";
      } catch (e) {
        dot.className = "live err";
        dot.title = visibleText("Update failed: " + e.message);
      } finally {
        busy = false;
      }
    }
    timer = setTimeout(tick, REFRESH_MS);
  };
  timer = setTimeout(tick, REFRESH_MS);
}

// ---------- fleet dashboard ----------

function filterFromUrl(params) {
  const terms = [];
  const status = params.get("status");
  if (status) terms.push("status:" + status);
  const tag = (params.get("tag") || "").trim();
  if (tag) terms.push(tag);
  const group = (params.get("group") || "").trim();
  if (group) terms.push("group:" + quote(group));
  const tenant = (params.get("tenant") || "").trim();
  if (tenant && !TENANT) terms.push("tenant:" + quote(tenant));
  const q = (params.get("q") || "").trim();
  if (q) terms.push("text:" + quote(q));
  return terms.join(" ");
}

function count(n) {
  return n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US");
}

function card(id, cls, label, value, sub, fill) {
  return el("div", { class: "card " + cls, id },
    el("div", { class: "label" }, label),
    el("div", { class: "value" }, value),
    sub ? el("div", { class: "sub" }, sub) : null,
    fill === undefined || fill === null ? null : el("div", { class: "card-bar" }, bar(fill)));
}

function summaryCards(s) {
  return [
    card("card-total", "", "Instances", count(s.total), count(s.reporting) + " reporting"),
    card("card-online", "online", "Online", count(s.online)),
    card("card-warning", "warning", "Warning", count(s.warning)),
    card("card-offline", "offline", "Offline", count(s.offline)),
    card("card-health", "health", "Health", pct(s.health_percent), "online ÷ total"),
    card("card-cpu", "", "CPU", pct(s.cpu_avg_percent), "peak " + pct(s.cpu_peak_percent)),
    // Used ÷ installed across the fleet, coloured at 75 % and 90 %: the capacity indicator.
    card("card-memory", "", "Memory", bytes(s.memory_used_bytes), "of " + bytes(s.memory_total_bytes), ratio(s.memory_used_bytes, s.memory_total_bytes)),
    card("card-disk", "", "Disk", bytes(s.disk_used_bytes), "of " + bytes(s.disk_total_bytes), ratio(s.disk_used_bytes, s.disk_total_bytes)),
    card("card-network", "net", "Network", "↓ " + rate(s.network_rx_bytes_per_sec), "↑ " + rate(s.network_tx_bytes_per_sec)),
  ];
}

function instanceRow(i) {
  const m = i.metrics || {};
  const fresh = i.status !== "offline";
  return el("tr", { dataset: { id: i.id, status: i.status } },
    el("td", {}, el("a", { class: "hostname", href: "/instances/" + encodeURIComponent(i.id) }, i.hostname)),
    el("td", { class: "status" }, statusBadge(i.status)),
    el("td", { class: "mono" }, (i.ip_addresses || [])[0] || "–"),
    el("td", {}, fresh ? duration(m.uptime_secs) : "–"),
    el("td", {}, bar(fresh ? m.cpu_percent : null)),
    el("td", {}, bar(fresh ? ratio(m.memory_used_bytes, m.memory_total_bytes) : null)),
    el("td", {}, bar(fresh ? ratio(m.disk_used_bytes, m.disk_total_bytes) : null)),
    el("td", {}, tagChips(i.tags, i.groups)),
    el("td", { class: "nowrap", title: when(i.last_seen) }, ago(i.last_seen)));
}

async function fleetPage(root) {
  const params = new URLSearchParams(location.search);
  const filter = filterFromUrl(params);
  const cursor = params.get("cursor");
  const perPage = /^\d+$/.test(params.get("per_page") || "") ? Math.min(1000, Math.max(1, Number(params.get("per_page")))) : PAGE_SIZE;
  const go = (changes) => {
    const p = new URLSearchParams(location.search);
    for (const [k, v] of Object.entries(changes)) {
      if (v === null || v === "") p.delete(k); else p.set(k, v);
    }
    if (!("cursor" in changes)) p.delete("cursor");
    p.delete("deregistered");
    const qs = p.toString();
    location.assign("/" + (qs ? "?" + qs : ""));
  };

  const status = params.get("status") || "";
  const chips = el("div", { class: "chips", role: "group", "aria-label": "Status" },
    ["", "online", "warning", "offline"].map((s) => el("button", {
      type: "button", class: s === status ? "active" : "", dataset: { status: s || "all" },
      onclick: () => go({ status: s }),
    }, s || "all")));
  const tagInput = el("input", { id: "filter-tag", placeholder: "tag: env=prod", value: params.get("tag") || "" });
  const groupInput = el("input", { id: "filter-group", placeholder: "group", value: params.get("group") || "" });
  const search = el("input", { id: "filter-q", type: "search", placeholder: "Search hostname or IP", value: params.get("q") || "" });
  // Operators of every tenant can narrow the view to one (a tenant operator sees only its own).
  const tenantInput = TENANT ? null : el("input", { id: "filter-tenant", placeholder: "tenant", value: params.get("tenant") || "" });
  const form = el("form", {
    class: "filters", id: "filter-form",
    onsubmit: (ev) => {
      ev.preventDefault();
      go({ tag: tagInput.value.trim(), group: groupInput.value.trim(), q: search.value.trim(), tenant: tenantInput ? tenantInput.value.trim() : "" });
    },
  }, chips, tagInput, groupInput, tenantInput, search,
  el("button", { type: "submit", id: "filter-apply" }, "Apply"),
  filter ? el("a", { href: "/", id: "filter-clear" }, "Clear") : null,
  filter ? el("span", { class: "filter-expr mono", id: "filter-expr" }, filter) : null);

  const cards = el("div", { class: "cards", id: "summary" });
  const tbody = el("tbody");
  const table = el("div", { class: "table-wrap" }, el("table", { id: "instances" },
    el("thead", {}, el("tr", {}, ["Hostname", "Status", "IP", "Uptime", "CPU", "RAM", "Disk", "Tags", "Last seen"].map((h) => el("th", {}, h)))),
    tbody));
  const pager = el("div", { class: "pager", id: "pager" });
  const message = el("div");
  if (params.get("deregistered")) {
    replace(message, el("p", { class: "notice", id: "deregistered" }, "Instance " + params.get("deregistered") + " was deregistered and its certificate revoked."));
  }
  const bulk = el("details", { class: "panel", id: "bulk" },
    el("summary", {}, filter ? "Send a command to every instance this filter selects" : "Send a command to every instance"),
    commandForm("bulk", "Send to all", () => ({ filter }), async () => {}));
  replace(root, el("h1", {}, TENANT ? "Fleet · " + TENANT : "Fleet"), form, message, cards, table, pager, bulk);

  const qs = (extra) => {
    const p = new URLSearchParams();
    if (filter) p.set("filter", filter);
    for (const [k, v] of Object.entries(extra)) if (v) p.set(k, v);
    return p.toString();
  };
  const load = async () => {
    const [summary, page] = await Promise.all([
      api("GET", "/api/v1/summary?" + qs({})),
      api("GET", "/api/v1/instances?" + qs({ limit: perPage, cursor })),
    ]);
    replace(cards, summaryCards(summary));
    replace(tbody, page.items.length
      ? page.items.map(instanceRow)
      : el("tr", {}, el("td", { colspan: 9, class: "empty" }, filter ? "No instance matches this filter." : "No instance has joined yet.")));
    replace(pager,
      el("span", { class: "muted", id: "page-count" }, page.items.length + " shown of " + count(summary.total)),
      cursor ? el("a", { href: "#", id: "page-first", onclick: (ev) => { ev.preventDefault(); go({ cursor: null }); } }, "First page") : null,
      page.next_cursor ? el("button", { type: "button", id: "page-next", onclick: () => go({ cursor: page.next_cursor }) }, "Next page") : null);
  };
  try {
    await load();
  } catch (e) {
    if (e.code === "invalid_filter" || e.code === "filter_too_large") {
      showError(message, e);
      return;
    }
    throw e;
  }
  markReady("fleet");
  live(load);
}

// ---------- commands ----------

const BUILT_IN_COMMANDS = ["ping", "collect-inventory", "restart-agent"];

// A form that queues a command for `target()` (an instance, or the current filter); `done` gets
// the server's report. Payload is JSON (empty: null); the server validates kind and payload.
function commandForm(idPrefix, label, target, done) {
  const kind = el("input", { id: idPrefix + "-kind", list: idPrefix + "-kinds", placeholder: "ping", value: "ping" });
  const kinds = el("datalist", { id: idPrefix + "-kinds" }, BUILT_IN_COMMANDS.map((k) => el("option", { value: k })));
  const payload = el("input", { id: idPrefix + "-payload", placeholder: "payload JSON (optional)" });
  const ttl = el("input", { id: idPrefix + "-ttl", type: "number", min: 1, value: 24, title: "Hours the command may wait for the instance" });
  const msg = el("div", { id: idPrefix + "-message" });
  const form = el("form", {
    class: "filters", id: idPrefix + "-form",
    onsubmit: async (ev) => {
      ev.preventDefault();
      let body;
      try {
        body = {
          target: target(),
          kind: kind.value.trim(),
          payload: payload.value.trim() ? JSON.parse(payload.value) : null,
          ttl_secs: Math.round(Number(ttl.value) * 3600),
        };
      } catch (e) {
        showError(msg, new Error("The payload is not JSON: " + e.message));
        return;
      }
      try {
        const report = await api("POST", "/api/v1/commands", body);
        replace(msg, el("p", { class: "ok" }, "Queued " + report.created + " command" + (report.created === 1 ? "" : "s") +
          (report.targeted !== report.created ? " (" + report.existing + " already queued)" : "") +
          "; delivered with the next heartbeat, or when the instance comes back."));
        await done(report);
      } catch (e) {
        showError(msg, e);
      }
    },
  }, kind, kinds, payload, el("label", { for: idPrefix + "-ttl" }, "expires in (h)"), ttl,
  el("button", { type: "submit", class: "primary", id: idPrefix + "-send" }, label));
  return el("div", {}, form, msg);
}

// ---------- server detail ----------

function chart(points, series, opts = {}) {
  const W = 300, H = 90, P = 2;
  const s = svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img" });
  for (const y of [0.25, 0.5, 0.75]) s.append(svg("line", { class: "grid", x1: 0, x2: W, y1: H * y, y2: H * y }));
  const vals = points.flatMap((p) => series.map((k) => p[k.key])).filter((v) => v !== null && v !== undefined);
  if (points.length === 1) points = [points[0], { ...points[0], at: new Date(Date.parse(points[0].at) + 1000).toISOString() }];
  if (points.length < 2 || vals.length === 0) {
    const t = svg("text", { x: 8, y: H / 2 });
    t.textContent = "no samples yet";
    s.append(t);
    return s;
  }
  const max = opts.max !== undefined ? opts.max : Math.max(1, ...vals) * 1.1;
  const t0 = Date.parse(points[0].at), t1 = Date.parse(points[points.length - 1].at);
  const x = (p) => P + ((Date.parse(p.at) - t0) / Math.max(1, t1 - t0)) * (W - 2 * P);
  const y = (v) => H - P - (Math.min(v, max) / max) * (H - 2 * P);
  for (const k of series) {
    let d = "";
    let pen = false;
    for (const p of points) {
      const v = p[k.key];
      if (v === null || v === undefined) { pen = false; continue; }
      d += (pen ? "L" : "M") + x(p).toFixed(1) + " " + y(v).toFixed(1);
      pen = true;
    }
    if (series.length === 1 && d) {
      s.append(svg("path", { class: "area", d: d + `L${x(points[points.length - 1]).toFixed(1)} ${H}L${x(points[0]).toFixed(1)} ${H}Z` }));
    }
    s.append(svg("path", { class: "line " + (k.cls || ""), d }));
  }
  return s;
}

function graph(id, title, points, series, now, opts) {
  return el("div", { class: "graph", id },
    el("h3", {}, title), el("div", { class: "now" }, now), chart(points, series, opts));
}

function parseTags(text) {
  const tags = {};
  for (const line of text.split(/[\n,]/)) {
    const t = line.trim();
    if (!t) continue;
    const i = t.indexOf("=");
    if (i < 0) tags[t] = "";
    else tags[t.slice(0, i).trim()] = t.slice(i + 1).trim();
  }
  return tags;
}

async function detailPage(root, id) {
  const enc = encodeURIComponent(id);
  const head = el("div");
  const notice = el("div");
  const graphs = el("div", { class: "graphs", id: "graphs" });
  const info = el("div", { class: "panel", id: "system" });
  const edit = el("div", { class: "panel", id: "labels" });
  const apps = el("div", { class: "panel", id: "apps" });
  const policies = el("div", { class: "panel", id: "policies" });
  const commands = el("div", { class: "panel", id: "commands" });
  const send = el("div", { class: "panel", id: "send-command" });
  replace(root, el("p", {}, el("a", { href: "/" }, "← Fleet")), head, notice, graphs,
    el("div", { class: "row" }, info, edit), el("div", { class: "row" }, apps, policies), send, commands);

  let d;
  try {
    d = await api("GET", "/api/v1/instances/" + enc);
  } catch (e) {
    if (e.status === 404) {
      replace(root, el("p", {}, el("a", { href: "/" }, "← Fleet")),
        el("p", { class: "error", id: "not-found" }, "No instance " + id + " (deregistered, or not in your tenant)."));
      markReady("detail");
      return;
    }
    throw e;
  }

  // Tags and groups: editable; saved with PUT and shown again from the server's answer.
  const tagsInput = el("textarea", { id: "tags-input", "aria-label": "Tags, one key=value per line" });
  const groupsInput = el("input", { id: "groups-input", "aria-label": "Groups, comma separated" });
  const editMsg = el("div", { id: "labels-message" });
  const fillLabels = (x) => {
    tagsInput.value = Object.entries(x.tags || {}).map(([k, v]) => (v === "" ? k : k + "=" + v)).join("\n");
    groupsInput.value = (x.groups || []).join(", ");
  };
  const save = async (what, body) => {
    try {
      await api("PUT", "/api/v1/instances/" + enc + "/" + what, body);
      replace(editMsg, el("p", { class: "ok" }, what === "tags" ? "Tags saved." : "Groups saved."));
      await refresh();
    } catch (e) {
      showError(editMsg, e);
    }
  };
  const confirmBtn = el("button", {
    type: "button", class: "danger", id: "deregister-confirm", hidden: true,
    onclick: async () => {
      try {
        await api("DELETE", "/api/v1/instances/" + enc);
        location.assign("/?deregistered=" + enc);
      } catch (e) {
        showError(editMsg, e);
      }
    },
  }, "Yes, deregister and revoke its certificate");
  replace(edit, el("h2", {}, "Tags and groups"),
    el("label", { for: "tags-input" }, "Tags (key=value, one per line)"), tagsInput,
    el("div", { class: "actions" }, el("button", { type: "button", id: "tags-save", onclick: () => save("tags", parseTags(tagsInput.value)) }, "Save tags")),
    el("label", { for: "groups-input" }, "Groups (comma separated)"), el("div", {}, groupsInput),
    el("div", { class: "actions" }, el("button", { type: "button", id: "groups-save", onclick: () => save("groups", groupsInput.value.split(",").map((g) => g.trim()).filter(Boolean)) }, "Save groups")),
    editMsg,
    el("h2", {}, "Deregister"),
    el("p", { class: "muted" }, "Removes the instance from the fleet and revokes its certificate at once. Its history is kept."),
    el("div", { class: "actions" }, el("button", { type: "button", class: "danger", id: "deregister", onclick: (ev) => { ev.target.hidden = true; confirmBtn.hidden = false; } }, "Deregister…"), confirmBtn));
  fillLabels(d);
  replace(send, el("h2", {}, "Send a command"),
    el("p", { class: "muted" }, "Built in: ping, collect-inventory, restart-agent. The agent refuses kinds it does not know."),
    commandForm("command", "Send", () => ({ instance: d.id }), () => refresh()));

  const render = (d, points, cmds, uptime) => {
    const m = d.metrics || {};
    replace(head, el("h1", { id: "detail-hostname" }, d.hostname),
      el("p", {}, el("span", { id: "detail-status" }, statusBadge(d.status)), " · last seen ",
        el("span", { title: when(d.last_seen) }, ago(d.last_seen)),
        uptime ? [" · ", el("span", { id: "detail-uptime" }, pct(uptime.uptime_percent, 2) + " uptime (30 days)")] : null,
        " · ", tagChips(d.tags, d.groups)));
    const last = (k) => (points.length ? points[points.length - 1][k] : null);
    replace(graphs,
      graph("graph-cpu", "CPU", points, [{ key: "cpu_percent" }], pct(last("cpu_percent")), { max: 100 }),
      graph("graph-memory", "Memory", points, [{ key: "memory_percent" }], pct(last("memory_percent")) + " · " + bytes(m.memory_used_bytes), { max: 100 }),
      graph("graph-disk", "Disk", points, [{ key: "disk_percent" }], pct(last("disk_percent")) + " · " + bytes(m.disk_used_bytes), { max: 100 }),
      graph("graph-network", "Network (↓ green, ↑ purple)", points,
        [{ key: "network_rx_bytes_per_sec", cls: "rx" }, { key: "network_tx_bytes_per_sec", cls: "tx" }],
        "↓ " + rate(last("network_rx_bytes_per_sec")) + " ↑ " + rate(last("network_tx_bytes_per_sec"))));
    const sys = d.system || {};
    const cert = d.certificate;
    replace(info, el("h2", {}, "System"), el("dl", { class: "kv" },
      [["Hostname", sys.hostname || d.hostname], ["OS", [sys.os, sys.os_version].filter(Boolean).join(" ") || "–"],
        ["Architecture", sys.arch || "–"], ["Agent", sys.agent_version || "–"],
        ["IP addresses", (d.ip_addresses || []).join(", ") || "–"], ["Uptime", duration(m.uptime_secs)],
        ["Load (1 min)", m.load_1m === undefined || m.load_1m === null ? "–" : m.load_1m.toFixed(2)],
        ["Tenant", d.tenant || "–"], ["Registered", when(d.registered_at)], ["Instance id", d.id],
        ["Certificate", cert ? "serial " + cert.serial + ", expires " + when(cert.not_after) : "–"],
      ].map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])));
    replace(apps, el("h2", {}, "Installed apps (" + (d.apps || []).length + ")"),
      (d.apps || []).length
        ? el("table", {}, el("tbody", {}, d.apps.map((a) => el("tr", {}, el("td", {}, a.name), el("td", { class: "muted" }, a.version || "")))))
        : el("p", { class: "muted" }, "None reported."));
    const pol = d.policies || [];
    replace(policies, el("h2", {}, "Policy compliance"),
      pol.length
        ? el("table", {}, el("tbody", {}, pol.map((p) => el("tr", { dataset: { policy: p.policy } },
          el("td", {}, p.policy), el("td", { class: p.pass ? "pass" : "fail" }, p.pass ? "pass" : "fail"), el("td", { class: "muted" }, p.reason)))))
        : el("p", { class: "muted" }, "No policy applies."));
    replace(commands, el("h2", {}, "Command history"),
      cmds.items.length
        ? el("table", {}, el("thead", {}, el("tr", {}, ["Kind", "State", "Created", "Finished", "Exit", "Output"].map((h) => el("th", {}, h)))),
          el("tbody", {}, cmds.items.map((c) => el("tr", { dataset: { command: c.id } },
            el("td", { class: "mono" }, c.kind), el("td", {}, c.state), el("td", {}, when(c.created_at)),
            el("td", {}, when(c.finished_at)), el("td", {}, c.result && c.result.exit_code !== null && c.result.exit_code !== undefined ? c.result.exit_code : "–"),
            el("td", { class: "mono" }, c.result ? c.result.output.slice(0, 120) : "")))))
        : el("p", { class: "muted" }, "No command sent yet."));
  };
  const fetchRest = () => Promise.all([
    api("GET", "/api/v1/instances/" + enc + "/metrics"),
    api("GET", "/api/v1/instances/" + enc + "/commands?limit=20"),
    api("GET", "/api/v1/instances/" + enc + "/uptime").catch(() => null),
  ]);
  // A reply older than the newest request is dropped: a slow periodic refresh must not draw
  // over what a save has just shown.
  let asked = 0;
  const refresh = async () => {
    const mine = ++asked;
    let fresh;
    try {
      fresh = await api("GET", "/api/v1/instances/" + enc);
    } catch (e) {
      if (e.status === 404) {
        replace(notice, el("p", { class: "error" }, "This instance was deregistered."));
        return;
      }
      throw e;
    }
    const [points, cmds, uptime] = await fetchRest();
    if (mine === asked) render(fresh, points.items, cmds, uptime);
  };
  const [points, cmds, uptime] = await fetchRest();
  render(d, points.items, cmds, uptime);
  markReady("detail");
  live(refresh);
}

// ---------- fleet health ----------

async function healthPage(root) {
  const score = el("div", { class: "panel", id: "health-score" });
  const trend = el("div", { class: "panel trend", id: "trend" });
  const alerts = el("div", { class: "panel", id: "alerts" });
  replace(root, el("h1", {}, "Fleet health"), el("div", { class: "row" }, score, trend), alerts);
  const load = async () => {
    const week = new Date(Date.now() - 7 * 86400 * 1000).toISOString();
    const [s, a] = await Promise.all([api("GET", "/api/v1/summary"), api("GET", "/api/v1/alerts?limit=50&since=" + encodeURIComponent(week))]);
    replace(score, el("h2", {}, "Health score"), el("div", { class: "score", id: "health-percent" }, pct(s.health_percent)),
      el("p", {}, el("span", { class: "dot online" }), s.online + " online · ", el("span", { class: "dot warning" }), s.warning + " warning · ",
        el("span", { class: "dot offline" }), s.offline + " offline of " + s.total));
    const rows = [
      ...(a.fleet || []).map((f) => ({ at: f.at, node: el("tr", { class: "fleet-alert" }, el("td", {}, when(f.at)), el("td", {}, statusBadge(f.status)), el("td", {}, f.message)) })),
      ...a.items.map((c) => ({ at: c.at, node: el("tr", { dataset: { instance: c.instance } }, el("td", {}, when(c.at)), el("td", {}, statusBadge(c.to)),
        el("td", {}, c.hostname
          ? el("a", { href: "/instances/" + encodeURIComponent(c.instance) }, c.hostname)
          : el("span", { class: "muted", title: c.instance }, "deregistered instance"),
        " went " + c.from + " → " + c.to)) })),
    ].sort((x, y) => Date.parse(y.at) - Date.parse(x.at));
    replace(alerts, el("h2", {}, "Alerts (last 7 days)"), rows.length
      ? el("table", {}, el("thead", {}, el("tr", {}, ["When", "Now", "What"].map((h) => el("th", {}, h)))), el("tbody", {}, rows.map((r) => r.node)))
      : el("p", { class: "muted" }, "No instance has changed status."));
    try {
      const t = await api("GET", "/api/v1/trends");
      const points = t.items.map((b) => ({ at: b.start, health: b.health_percent, min: b.health_min_percent }));
      replace(trend, el("h2", {}, "Health over the last 30 days (hourly; lowest in light)"),
        chart(points, [{ key: "health" }, { key: "min", cls: "tx" }], { max: 100 }),
        el("p", { class: "muted" }, points.length + " buckets"));
    } catch (e) {
      if (e.code !== "forbidden") throw e;
      replace(trend, el("h2", {}, "Trend"), el("p", { class: "muted" }, "The fleet-wide trend is shown to operators without a tenant."));
    }
  };
  await load();
  markReady("health");
  live(load);
}

// ---------- registration tokens ----------

function tokenState(t) {
  if (t.revoked_at) return "revoked";
  if (t.expires_at && Date.parse(t.expires_at) <= Date.now()) return "expired";
  if (t.max_uses && t.max_uses.limited !== undefined && t.uses >= t.max_uses.limited) return "used up";
  return "active";
}

async function tokensPage(root) {
  const created = el("div", { id: "token-created" });
  const list = el("div", { class: "panel", id: "tokens" });
  const history = el("div", { class: "panel", id: "token-history", hidden: true });
  const msg = el("div", { id: "token-message" });
  const f = {
    description: el("input", { id: "token-description", placeholder: "web servers, eu-west" }),
    expires: el("input", { id: "token-expires", type: "number", min: 1, value: 24 }),
    uses: el("input", { id: "token-max-uses", placeholder: "1, 50 or unlimited", value: "1" }),
    tenant: el("input", { id: "token-tenant", placeholder: "none", value: TENANT, disabled: !!TENANT }),
    tags: el("input", { id: "token-tags", placeholder: "env=prod, region=eu-west" }),
    groups: el("input", { id: "token-groups", placeholder: "web, database-servers" }),
  };
  const field = (label, input) => el("div", {}, el("label", { for: input.id }, label), input);
  const form = el("form", {
    class: "grid", id: "token-form",
    onsubmit: async (ev) => {
      ev.preventDefault();
      const uses = f.uses.value.trim();
      const body = {
        description: f.description.value.trim(),
        expires_in_secs: Math.round(Number(f.expires.value) * 3600),
        // A number or "unlimited"; anything else goes as typed, for the server to refuse.
        max_uses: /^\d+$/.test(uses) ? Number(uses) : uses,
        tags: parseTags(f.tags.value),
        groups: f.groups.value.split(",").map((g) => g.trim()).filter(Boolean),
      };
      if (f.tenant.value.trim()) body.tenant = f.tenant.value.trim();
      try {
        const t = await api("POST", "/api/v1/tokens", body);
        const join = el("code", { id: "join-string" }, t.join);
        const copy = el("button", {
          type: "button", id: "join-copy",
          onclick: async () => {
            try { await navigator.clipboard.writeText(t.join); copy.textContent = "Copied"; } catch (_) {
              getSelection().selectAllChildren(join); copy.textContent = "Selected: press Ctrl+C";
            }
          },
        }, "Copy");
        replace(created, el("div", { class: "join" }, join, copy),
          el("p", { class: "muted" }, "Shown once: the secret is not stored, only its hash. Run on the machine: agent --join '<this string>' --server https://<control panel>:8443"));
        replace(msg);
        await load();
      } catch (e) {
        showError(msg, e);
      }
    },
  }, field("Description", f.description), field("Expires in (hours)", f.expires), field("Usage limit", f.uses),
  field("Tenant", f.tenant), field("Tags for its instances", f.tags), field("Groups for its instances", f.groups),
  el("div", {}, el("button", { type: "submit", class: "primary", id: "token-create" }, "Create token")));

  const showHistory = async (id) => {
    const t = await api("GET", "/api/v1/tokens/" + encodeURIComponent(id));
    history.hidden = false;
    replace(history, el("h2", {}, "Usage of " + id),
      t.ledger.length
        ? el("table", {}, el("thead", {}, el("tr", {}, ["When", "Outcome", "Instance", "From"].map((h) => el("th", {}, h)))),
          el("tbody", {}, t.ledger.map((e) => el("tr", {}, el("td", {}, when(e.at)), el("td", {}, e.outcome),
            el("td", {}, e.instance ? el("a", { href: "/instances/" + encodeURIComponent(e.instance) }, e.instance) : "–"),
            el("td", { class: "mono" }, e.peer || "–")))))
        : el("p", { class: "muted" }, "Not used yet."));
  };
  const load = async () => {
    const { items } = await api("GET", "/api/v1/tokens");
    items.sort((a, b) => Date.parse(b.created_at) - Date.parse(a.created_at));
    replace(list, el("h2", {}, "Tokens"), items.length
      ? el("table", {}, el("thead", {}, el("tr", {}, ["Id", "Description", "Tenant", "Tags & groups given", "Uses", "Expires", "State", ""].map((h) => el("th", {}, h)))),
        el("tbody", {}, items.map((t) => {
          const state = tokenState(t);
          return el("tr", { dataset: { token: t.id, state } },
            el("td", { class: "mono" }, t.id), el("td", {}, t.description || "–"), el("td", {}, t.tenant || "–"),
            el("td", {}, tagChips(t.tags, t.groups)),
            el("td", {}, t.uses + " / " + (t.max_uses === "unlimited" ? "∞" : t.max_uses.limited)),
            el("td", {}, t.expires_at ? when(t.expires_at) : "never"), el("td", { class: "state" }, state),
            el("td", {}, el("button", { type: "button", class: "history", onclick: () => showHistory(t.id).catch((e) => showError(msg, e)) }, "History"), " ",
              state === "revoked" ? null : el("button", {
                type: "button", class: "danger revoke",
                onclick: async () => {
                  try { await api("POST", "/api/v1/tokens/" + encodeURIComponent(t.id) + "/revoke"); await load(); } catch (e) { showError(msg, e); }
                },
              }, "Revoke")));
        })))
      : el("p", { class: "muted" }, "No token yet."));
  };
  replace(root, el("h1", {}, "Registration tokens"), el("div", { class: "panel" }, el("h2", {}, "New token"), form, msg, created), list, history);
  await load();
  markReady("tokens");
}

// ---------- boot ----------

async function boot() {
  const root = document.getElementById("app");
  document.getElementById("who").textContent = TENANT ? "tenant " + TENANT : "all tenants";
  document.getElementById("logout").addEventListener("click", async () => {
    let r = null;
    try { r = await fetch("/logout", { method: "POST", headers: { "X-CSRF-Token": CSRF }, credentials: "same-origin" }); } catch (_) { r = null; }
    if (r && (r.ok || r.status === 401)) location.assign("/login");
    else showError(document.getElementById("app"), new Error("Logging out failed" + (r ? " (" + r.status + ")" : "") + "; the session is still open."));
  });
  const path = location.pathname;
  const nav = path.startsWith("/health") ? "health" : path.startsWith("/tokens") ? "tokens" : "fleet";
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.nav === nav);
  try {
    if (path === "/") await fleetPage(root);
    else if (path === "/health") await healthPage(root);
    else if (path === "/tokens") await tokensPage(root);
    else if (path.startsWith("/instances/")) await detailPage(root, decodeURIComponent(path.slice("/instances/".length)));
    else replace(root, el("p", { class: "error" }, "No such page."));
  } catch (e) {
    if (e.status !== 401) showError(root, e);
  }
}

boot();
