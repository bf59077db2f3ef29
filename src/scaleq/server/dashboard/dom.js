// Small DOM helpers. Everything the server sends is put in the page as text (never as HTML).

const SVG_NS = "http://www.w3.org/2000/svg";

function build(el, attrs, children) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.setAttribute("class", Array.isArray(value) ? value.filter(Boolean).join(" ") : value);
    else if (key === "text") el.textContent = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (value === true) el.setAttribute(key, "");
    else el.setAttribute(key, String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** h("a", {href: "#/x", class: "y"}, "text", h("span", {}, "more")) */
export function h(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** The same for SVG elements. */
export function s(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

const pad = (n) => String(n).padStart(2, "0");

export const fmt = {
  /** 14:03:07, or "Nov 25 14:03" when not today. */
  time(t) {
    if (t === null || t === undefined) return "—";
    const d = new Date(t * 1000);
    const hms = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
    const today = new Date();
    if (d.toDateString() === today.toDateString()) return hms;
    return `${d.toLocaleString("en", { month: "short" })} ${d.getDate()} ${hms}`;
  },
  /** The full local date and time, for title attributes. */
  stamp(t) {
    return t === null || t === undefined ? "" : new Date(t * 1000).toLocaleString();
  },
  /** 3 s, 4 min 10 s, 2 h 5 min, 3 d 4 h */
  duration(seconds) {
    if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "—";
    const v = Math.max(0, seconds);
    if (v < 10) return `${v.toFixed(1)} s`;
    if (v < 60) return `${Math.round(v)} s`;
    if (v < 3600) return `${Math.floor(v / 60)} min ${Math.round(v % 60)} s`;
    if (v < 86400) return `${Math.floor(v / 3600)} h ${Math.round((v % 3600) / 60)} min`;
    return `${Math.floor(v / 86400)} d ${Math.round((v % 86400) / 3600)} h`;
  },
  ago(t) {
    if (t === null || t === undefined) return "—";
    const v = Date.now() / 1000 - t;
    return v < 1 ? "just now" : `${fmt.duration(v)} ago`;
  },
  bytes(n) {
    if (n === null || n === undefined) return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let v = n;
    let u = 0;
    while (v >= 1024 && u < units.length - 1) {
      v /= 1024;
      u += 1;
    }
    return u === 0 ? `${v} B` : `${v.toFixed(v < 10 ? 1 : 0)} ${units[u]}`;
  },
  /** argv as a shell would read it back. */
  argv(args) {
    return (args || [])
      .map((a) => (/^[A-Za-z0-9_@%+=:,./-]+$/.test(a) ? a : `'${a.replaceAll("'", "'\\''")}'`))
      .join(" ");
  },
  shortId(id) {
    return id ? id.slice(0, 12) : "—";
  },
};

// What a job's state looks like: a symbol and a word (never colour alone).
const LOOK = {
  queued: ["◷", "queued"],
  running: ["▶", "running"],
  success: ["✓", "success"],
  failed: ["✗", "failed"],
  timed_out: ["⏱", "timed out"],
  cancelled: ["⊘", "cancelled"],
  worker_lost: ["⚠", "worker lost"],
};

/** The one-glance state of a job: queued, running, or the reason it finished. */
export function jobStatus(job) {
  return job.state === "finished" ? job.reason || "failed" : job.state;
}

export function badge(kind, word, symbol) {
  return h(
    "span",
    { class: `badge b-${kind}` },
    symbol ? h("span", { class: "sym", "aria-hidden": "true" }, symbol) : null,
    h("span", { class: "word" }, word),
  );
}

export function stateBadge(job) {
  const status = jobStatus(job);
  const [symbol, word] = LOOK[status] || ["•", status];
  const el = badge(status, word, symbol);
  el.dataset.state = status;
  return el;
}

/** A table with a caption, a header row and a body (the body is returned too, to be refilled live). */
export function table(caption, headers, { className } = {}) {
  const tbody = h("tbody");
  const el = h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      { class: className },
      caption ? h("caption", {}, caption) : null,
      h("thead", {}, h("tr", {}, headers.map((c) => h("th", { scope: "col", class: c.cls }, c.label ?? c)))),
      tbody,
    ),
  );
  return { el, tbody };
}

/** A row that says there is nothing to show, spanning the table. */
export function emptyRow(columns, ...message) {
  return h("tr", { class: "empty" }, h("td", { colspan: columns }, ...message));
}

export function notice(kind, ...content) {
  return h("p", { class: `notice ${kind}`, role: kind === "error" ? "alert" : null }, ...content);
}
