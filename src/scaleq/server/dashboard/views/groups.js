// The groups view (#/groups): each group's size over time and every decision of the autoscaler, with its reason.

import { api, every } from "../api.js";
import { groupChart, MARK } from "../chart.js";
import { badge, emptyRow, fmt, h, notice, table } from "../dom.js";
import { errorSlot, heading, POLL_MS } from "./common.js";

// What this page has seen: every group status (exact samples) and every event, kept while the tab lives, so the
// chart grows as the dashboard stays open.
const seen = { samples: new Map(), events: new Map(), lastEventId: 0 };

function remember(groups) {
  for (const g of groups) {
    const list = seen.samples.get(g.name) || [];
    const last = list[list.length - 1];
    if (!last || last.t !== g.updated_at) list.push({ t: g.updated_at, current: g.current, desired: g.desired });
    if (list.length > 5000) list.splice(0, list.length - 5000);
    seen.samples.set(g.name, list);
  }
}

async function fetchEvents(signal) {
  // the newest 500 at first, then only what is new (the API answers newest first)
  const fresh = await api("/events", { params: { after: seen.lastEventId, limit: 500 }, signal });
  for (const e of fresh) {
    seen.events.set(e.id, e);
    seen.lastEventId = Math.max(seen.lastEventId, e.id);
  }
  if (seen.events.size > 20000) {
    const ids = [...seen.events.keys()].sort((a, b) => a - b);
    for (const id of ids.slice(0, ids.length - 20000)) seen.events.delete(id);
  }
}

function kindBadge(kind) {
  const cls =
    { scale_up: "up", scale_down: "down", error: "failed", fallback: "failed", desired: "queued" }[kind] || "other";
  const sym = { scale_up: "▲", scale_down: "▼", error: "✕", fallback: "!", desired: "◆" }[kind] || "●";
  return badge(cls, MARK[kind]?.label ?? kind, sym);
}

function groupCard(group, events, picked, onHold) {
  const decisions = [...events].reverse(); // newest first
  const rows = new Map();
  const pick = (e) => {
    const row = rows.get(e.id);
    if (!row) return;
    picked.id = e.id;
    for (const r of rows.values()) r.classList.remove("picked");
    row.classList.add("picked");
    row.scrollIntoView({ block: "nearest", behavior: "smooth" });
    row.focus();
  };
  const { el, tbody } = table(`Scaling decisions of ${group.name}, newest first, each with its reason.`, [
    "Time",
    "Decision",
    { label: "From → to", cls: "num" },
    "Reason",
  ], { className: "decisions" });
  const shown = decisions.slice(0, 50);
  tbody.append(
    ...(shown.length
      ? shown.map((e) => {
          const row = h(
            "tr",
            {
              class: [`k-${e.kind}`, picked.id === e.id && "picked"],
              tabindex: -1,
              dataset: { eventId: e.id, kind: e.kind },
            },
            h("td", { title: fmt.stamp(e.time) }, fmt.time(e.time)),
            h("td", {}, kindBadge(e.kind)),
            h("td", { class: "num" }, e.from !== null || e.to !== null ? `${e.from ?? "?"} → ${e.to ?? "?"}` : "—"),
            h("td", { class: "reason" }, e.reason),
          );
          rows.set(e.id, row);
          return row;
        })
      : [emptyRow(4, "No decisions recorded yet.")]),
  );
  const figures = h(
    "ul",
    { class: "figures", "aria-label": `Workers of ${group.name} now` },
    [
      ["current", group.current],
      ["desired", group.desired],
      ["min", group.min],
      ["max", group.max],
    ].map(([k, v]) => h("li", { class: `fig-${k}` }, h("span", { class: "v" }, v), h("span", { class: "k" }, k))),
  );
  const stale = Date.now() / 1000 - group.updated_at > 30;
  // quota / rate_limited: the provider refused more machines or calls (the controller backs off and retries)
  const STATES = { quota: "Quota exceeded", rate_limited: "Rate-limited", error: "Failing" };
  const trouble =
    group.state && group.state !== "ok"
      ? notice(
          "error",
          h("strong", {}, STATES[group.state] || group.state),
          group.state_since != null ? ` for ${fmt.duration(Date.now() / 1000 - group.state_since)}: ` : ": ",
          group.message,
        )
      : null;
  return h(
    "article",
    { class: "group", "aria-labelledby": `g-${group.name}`, dataset: { group: group.name } },
    h(
      "header",
      {},
      h("h2", { id: `g-${group.name}` }, group.name),
      h(
        "p",
        { class: "meta" },
        "queue ",
        h("a", { href: `#/jobs?queue=${encodeURIComponent(group.queue)}` }, group.queue),
        ` · provider ${group.provider} · status from `,
        h("span", { title: fmt.stamp(group.updated_at), class: stale ? "bad" : null }, fmt.ago(group.updated_at)),
        stale ? " (no controller has reported lately)" : "",
      ),
      figures,
      trouble,
      // what the controller says of the group now: capped at max_workers, a signal it fell back from, jobs it cannot run
      group.note ? h("p", { class: "group-note", role: "status" }, group.note) : null,
    ),
    groupChart(group, events, seen.samples.get(group.name) || [], { onPick: pick, onHold }),
    shown.length < decisions.length ? h("p", { class: "hint" }, `The newest 50 of ${decisions.length} shown.`) : null,
    el,
  );
}

export async function groupsView(ctx) {
  const errors = errorSlot();
  const body = h("div", { class: "groups" });
  ctx.page.append(
    heading("Groups"),
    h(
      "p",
      { class: "lede" },
      "Each group follows its queue between its minimum and maximum. The chart shows where it stood and every ",
      "decision the autoscaler took, with its reason.",
    ),
    errors.el,
    body,
  );
  const picked = {};
  const cards = new Map(); // group name → its card on screen
  let held = null; // the group whose chart shows a tooltip: left as it is until the tooltip goes
  await every(
    POLL_MS,
    ctx.signal,
    async () => {
      const [groups] = await Promise.all([api("/groups", { signal: ctx.signal }), fetchEvents(ctx.signal)]);
      errors.clear();
      ctx.updated();
      remember(groups);
      if (!groups.length) {
        cards.clear();
        body.replaceChildren(
          notice(
            "info",
            "No worker groups. ",
            h("code", {}, "scaleq up"),
            " runs one for queue default; ",
            h("code", {}, "scaleq apply --grid grid.toml"),
            " declares others.",
          ),
        );
        return;
      }
      const events = [...seen.events.values()].sort((a, b) => a.time - b.time || a.id - b.id);
      const next = new Map();
      for (const g of groups) {
        const hold = (on) => {
          held = on ? g.name : held === g.name ? null : held;
        };
        const card =
          held === g.name && cards.has(g.name)
            ? cards.get(g.name)
            : groupCard(g, events.filter((e) => e.group === g.name), picked, hold);
        next.set(g.name, card);
      }
      body.querySelector(".notice")?.remove();
      for (const [name, card] of cards) if (!next.has(name)) card.remove();
      for (const [name, card] of next) {
        const old = cards.get(name);
        if (old && old !== card) old.replaceWith(card);
        else if (!old) body.append(card);
      }
      cards.clear();
      for (const [name, card] of next) cards.set(name, card);
    },
    errors.show,
  );
}
