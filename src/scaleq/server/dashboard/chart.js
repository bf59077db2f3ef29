// A group's chart: current / desired / min / max over time, with every scaling decision marked on it, drawn as
// inline SVG (no library).
//
// The server stores only a group's latest status, so the time series is rebuilt from its events (each decision
// records the current count it saw as `from` and the desired count it chose as `to`; a scale_up or scale_down
// brings current to `to`) plus every status this page has seen while open (exact samples, every poll).

import { fmt, h, s } from "./dom.js";

const W = 760;
const H = 240;
const M = { left: 40, right: 74, top: 30, bottom: 28 };
const MIN_SPAN = 30; // seconds: the narrowest window shown
const MAX_SPAN = 6 * 3600; // and the widest

export const MARK = {
  scale_up: { shape: "up", label: "scale up" },
  scale_down: { shape: "down", label: "scale down" },
  desired: { shape: "diamond", label: "desired changed" },
  error: { shape: "cross", label: "error" },
  adopt: { shape: "dot", label: "adopted workers" },
  recovered: { shape: "dot", label: "recovered" },
};

/** Points {t, current, desired} in time order, from the group's events (oldest first) and seen statuses. */
export function buildSeries(group, events, samples) {
  const points = [];
  // Where this page saw the group's status every poll, those samples say when a change took effect; elsewhere a
  // scale_up / scale_down is taken to bring current to what it decided.
  const seenFrom = samples.length ? samples[0].t : Infinity;
  for (const e of events) {
    const counted = e.kind === "scale_up" || e.kind === "scale_down" || e.kind === "desired";
    if (counted && e.from !== null && e.to !== null) {
      points.push({ t: e.time, current: e.from, desired: e.to });
      if (e.kind !== "desired" && e.time < seenFrom) points.push({ t: e.time + 0.001, current: e.to, desired: e.to });
    } else if (e.kind === "adopt" && e.to !== null) {
      points.push({ t: e.time, current: e.to, desired: null });
    }
  }
  for (const sample of samples) points.push(sample);
  points.push({ t: group.updated_at, current: group.current, desired: group.desired });
  points.sort((a, b) => a.t - b.t);
  let desired = null;
  for (const p of points) {
    if (p.desired === null) p.desired = desired ?? p.current;
    desired = p.desired;
  }
  return points;
}

function niceStep(span, target, steps) {
  return steps.find((step) => span / step <= target) ?? steps[steps.length - 1];
}

function shape(kind, x, y) {
  const r = 6;
  switch (MARK[kind]?.shape) {
    case "up":
      return s("path", { d: `M${x},${y - r} L${x + r},${y + r - 1} L${x - r},${y + r - 1} Z` });
    case "down":
      return s("path", { d: `M${x},${y + r} L${x + r},${y - r + 1} L${x - r},${y - r + 1} Z` });
    case "diamond":
      return s("path", { d: `M${x},${y - r} L${x + r},${y} L${x},${y + r} L${x - r},${y} Z` });
    case "cross":
      return s("path", {
        d: `M${x - r},${y - r} L${x + r},${y + r} M${x + r},${y - r} L${x - r},${y + r}`,
        class: "cross",
      });
    default:
      return s("circle", { cx: x, cy: y, r: r - 1 });
  }
}

/** The step path of one value over the window [t0, now]. */
function stepPath(points, key, X, Y, t0, now) {
  let last = null;
  let d = "";
  for (const p of points) {
    if (p.t < t0) {
      last = p[key];
      continue;
    }
    if (p.t > now) break;
    if (d === "") {
      d = last === null ? `M${X(p.t)},${Y(p[key])}` : `M${X(t0)},${Y(last)} H${X(p.t)} V${Y(p[key])}`;
    } else {
      d += ` H${X(p.t)} V${Y(p[key])}`;
    }
    last = p[key];
  }
  if (d === "" && last !== null) d = `M${X(t0)},${Y(last)}`;
  if (d !== "") d += ` H${X(now)}`;
  return d;
}

/**
 * The chart of one group: a <figure> with the SVG, a tooltip for the decision markers, and a legend.
 * `events` are this group's events, oldest first; `onPick(event)` is called when a marker is clicked, `onHold(true)`
 * while a marker's tooltip shows (the caller then leaves the chart alone) and `onHold(false)` after.
 */
export function groupChart(group, events, samples, { onPick, onHold } = {}) {
  const now = Math.max(Date.now() / 1000, group.updated_at);
  const points = buildSeries(group, events, samples);
  const earliest = Math.min(...points.map((p) => p.t), ...events.map((e) => e.time));
  const span = Math.min(MAX_SPAN, Math.max(MIN_SPAN, (now - earliest) * 1.08));
  const t0 = now - span;
  const yMax = Math.max(1, group.max, ...points.map((p) => Math.max(p.current, p.desired)));
  const yTop = yMax + Math.max(1, Math.ceil(yMax * 0.1));
  const X = (t) => +(M.left + ((t - t0) / (now - t0)) * (W - M.left - M.right)).toFixed(1);
  const Y = (v) => +(H - M.bottom - (v / yTop) * (H - M.top - M.bottom)).toFixed(1);
  const plotBottom = H - M.bottom;

  const grid = [];
  const yStep = niceStep(yTop, 5, [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000]);
  for (let v = 0; v <= yTop; v += yStep) {
    grid.push(s("line", { x1: M.left, x2: W - M.right, y1: Y(v), y2: Y(v), class: "grid" }));
    grid.push(s("text", { x: M.left - 6, y: Y(v) + 4, class: "tick", "text-anchor": "end" }, String(v)));
  }
  const tStep = niceStep(now - t0, 6, [5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200]);
  for (let t = Math.ceil(t0 / tStep) * tStep; t <= now; t += tStep) {
    const label = tStep >= 60 ? fmt.time(t).slice(0, -3) : fmt.time(t);
    grid.push(s("line", { x1: X(t), x2: X(t), y1: M.top, y2: plotBottom, class: "grid" }));
    grid.push(s("text", { x: X(t), y: plotBottom + 18, class: "tick", "text-anchor": "middle" }, label));
  }

  const band = s("rect", {
    x: M.left,
    y: Y(group.max),
    width: W - M.left - M.right,
    height: Math.max(0, Y(group.min) - Y(group.max)),
    class: "band",
  });
  const bounds = [
    s("line", { x1: M.left, x2: W - M.right, y1: Y(group.max), y2: Y(group.max), class: "bound" }),
    s("line", { x1: M.left, x2: W - M.right, y1: Y(group.min), y2: Y(group.min), class: "bound" }),
  ];
  const desired = s("path", { d: stepPath(points, "desired", X, Y, t0, now), class: "desired" });
  const current = s("path", { d: stepPath(points, "current", X, Y, t0, now), class: "current" });

  // Labels at the right end: where each line stands now (nudged apart when they would overlap).
  const ends = [
    { v: group.max, text: `max ${group.max}`, cls: "lbl-bound" },
    { v: group.min, text: `min ${group.min}`, cls: "lbl-bound" },
    { v: group.desired, text: `desired ${group.desired}`, cls: "lbl-desired" },
    { v: group.current, text: `current ${group.current}`, cls: "lbl-current" },
  ]
    .map((e) => ({ ...e, y: Y(e.v) + 4 }))
    .sort((a, b) => a.y - b.y);
  for (let i = 1; i < ends.length; i += 1) ends[i].y = Math.max(ends[i].y, ends[i - 1].y + 13);
  const overflow = ends[ends.length - 1].y - (plotBottom + 4);
  if (overflow > 0) for (const e of ends) e.y -= overflow;
  for (let i = ends.length - 2; i >= 0; i -= 1) ends[i].y = Math.min(ends[i].y, ends[i + 1].y - 13);
  const endLabels = ends.map((e) => s("text", { x: W - M.right + 6, y: e.y, class: e.cls }, e.text));

  const tip = h("div", { class: "tip", role: "tooltip", hidden: true });
  const figure = h("figure", { class: "chart" });
  const hideTip = () => {
    tip.hidden = true;
    onHold?.(false);
  };
  const markers = events
    .filter((e) => e.time >= t0 && e.time <= now)
    .map((e) => {
      const x = X(e.time);
      const words = `${fmt.time(e.time)} · ${MARK[e.kind]?.label ?? e.kind}${
        e.from !== null || e.to !== null ? ` ${e.from ?? "?"} → ${e.to ?? "?"}` : ""
      }: ${e.reason}`;
      const show = () => {
        tip.replaceChildren(
          h("strong", {}, `${fmt.time(e.time)} · ${MARK[e.kind]?.label ?? e.kind}`),
          e.from !== null || e.to !== null ? ` ${e.from ?? "?"} → ${e.to ?? "?"}` : "",
          h("br"),
          e.reason,
        );
        tip.hidden = false;
        onHold?.(true);
        const left = (x / W) * 100;
        tip.style.left = `${Math.min(Math.max(left, 20), 80)}%`;
        tip.style.top = `${((M.top + 4) / H) * 100}%`;
      };
      return s(
        "g",
        {
          class: `marker k-${e.kind}`,
          tabindex: 0,
          role: "button",
          "aria-label": words,
          dataset: { eventId: e.id, kind: e.kind },
          onmouseenter: show,
          onfocus: show,
          onmouseleave: hideTip,
          onblur: hideTip,
          onclick: () => onPick?.(e),
          onkeydown: (ev) => {
            if (ev.key === "Enter" || ev.key === " ") {
              ev.preventDefault();
              onPick?.(e);
            }
          },
        },
        s("title", {}, words),
        s("line", { x1: x, x2: x, y1: M.top - 6, y2: plotBottom, class: "stem" }),
        s("rect", { x: x - 8, y: 4, width: 16, height: plotBottom - 4, class: "hit" }),
        shape(e.kind, x, M.top - 14),
      );
    });

  const titleId = `chart-title-${group.name}`;
  const svg = s(
    "svg",
    {
      viewBox: `0 0 ${W} ${H}`,
      class: "plot",
      role: "group",
      "aria-labelledby": titleId,
    },
    s(
      "title",
      { id: titleId },
      `Workers of group ${group.name} over time: current ${group.current}, desired ${group.desired}, ` +
        `min ${group.min}, max ${group.max}; ${markers.length} decisions shown`,
    ),
    band,
    grid,
    bounds,
    current,
    desired,
    endLabels,
    s("line", { x1: M.left, x2: M.left, y1: M.top, y2: plotBottom, class: "axis" }),
    s("line", { x1: M.left, x2: W - M.right, y1: plotBottom, y2: plotBottom, class: "axis" }),
    markers,
  );

  const legend = h(
    "ul",
    { class: "legend" },
    h("li", {}, h("span", { class: "key current", "aria-hidden": "true" }), "current workers"),
    h("li", {}, h("span", { class: "key desired", "aria-hidden": "true" }), "desired"),
    h("li", {}, h("span", { class: "key bound", "aria-hidden": "true" }), "min – max"),
    h("li", {}, h("span", { class: "key mark-up", "aria-hidden": "true" }, "▲"), "scale up"),
    h("li", {}, h("span", { class: "key mark-down", "aria-hidden": "true" }, "▼"), "scale down"),
    h("li", {}, h("span", { class: "key mark-other", "aria-hidden": "true" }, "◆"), "other decision"),
    h("li", {}, h("span", { class: "key mark-error", "aria-hidden": "true" }, "✕"), "error"),
  );
  figure.append(
    h("div", { class: "plot-wrap" }, svg, tip),
    h(
      "figcaption",
      {},
      legend,
      h(
        "span",
        { class: "hint" },
        `Last ${fmt.duration(now - t0)}. Point at a marker for the decision and its reason; `,
        "the list below has them all.",
      ),
    ),
  );
  return figure;
}
