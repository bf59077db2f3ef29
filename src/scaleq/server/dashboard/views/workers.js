// The workers view (#/workers): live workers (or every one the server has known), what each offers and runs.

import { api, every } from "../api.js";
import { badge, emptyRow, fmt, h, table } from "../dom.js";
import { errorSlot, heading, POLL_MS } from "./common.js";

export async function workersView(ctx) {
  const all = ctx.params.get("all") === "1";
  const errors = errorSlot();
  const toggle = h("input", {
    type: "checkbox",
    id: "w-all",
    checked: all,
    onchange: (ev) => {
      window.location.hash = ev.target.checked ? "#/workers?all=1" : "#/workers";
    },
  });
  const { el, tbody } = table(
    `${all ? "Every worker the server has known" : "Live workers"}, updated live.`,
    [
      "State",
      "Worker",
      "Group",
      "Queue",
      { label: "Busy / slots", cls: "num" },
      "Runtimes",
      "Offers",
      "Host",
      { label: "Heartbeat", cls: "num" },
      { label: "Idle for", cls: "num" },
    ],
  );
  ctx.page.append(
    heading("Workers"),
    h("form", { class: "filters" }, h("label", { class: "check" }, toggle, " show workers that are gone")),
    errors.el,
    el,
  );
  await every(
    POLL_MS,
    ctx.signal,
    async () => {
      const workers = await api("/workers", { params: { all: all ? "true" : undefined }, signal: ctx.signal });
      errors.clear();
      ctx.updated();
      const now = Date.now() / 1000;
      tbody.replaceChildren(
        ...(workers.length
          ? workers.map((w) => {
              const look =
                w.state === "active"
                  ? w.busy > 0
                    ? badge("running", "busy", "▶")
                    : badge("idle", "idle", "◦")
                  : w.state === "draining"
                    ? badge("draining", "draining", "↘")
                    : badge("cancelled", "gone", "⊘");
              const offers = [
                `${w.cpus} CPU`,
                w.memory ? fmt.bytes(w.memory) : null,
                w.gpus ? `${w.gpus} GPU` : null,
                ...(w.tags || []).map((t) => `#${t}`),
                w.host_network ? "host network" : null,
              ].filter(Boolean);
              return h(
                "tr",
                { dataset: { workerId: w.id } },
                h("td", {}, look),
                h("th", { scope: "row", class: "mono small" }, w.id),
                h("td", {}, w.group ? h("a", { href: "#/groups" }, w.group) : "—"),
                h("td", {}, h("a", { href: `#/jobs?queue=${encodeURIComponent(w.queue)}` }, w.queue)),
                h("td", { class: "num" }, `${w.busy} / ${w.slots}`),
                h("td", {}, (w.runtimes || []).join(", ")),
                h("td", {}, offers.join(", ")),
                h("td", {}, w.hostname || "—"),
                h("td", { class: "num", title: fmt.stamp(w.last_heartbeat) }, fmt.ago(w.last_heartbeat)),
                h(
                  "td",
                  { class: "num" },
                  w.idle_since && w.state === "active" ? fmt.duration(now - w.idle_since) : "—",
                ),
              );
            })
          : [
              emptyRow(
                10,
                "No workers right now. Groups start them when their queue has work, and drain them when it is idle.",
              ),
            ]),
      );
    },
    errors.show,
  );
}
