// The queues view (#/queues): every queue the server knows, with its jobs by state.

import { api, every } from "../api.js";
import { emptyRow, fmt, h, table } from "../dom.js";
import { errorSlot, heading, POLL_MS } from "./common.js";

export async function queuesView(ctx) {
  const errors = errorSlot();
  const { el, tbody } = table("Every queue the server knows, with its jobs by state. Updated live.", [
    "Queue",
    { label: "Queued", cls: "num" },
    { label: "Running", cls: "num" },
    { label: "Succeeded", cls: "num" },
    { label: "Unsuccessful", cls: "num" },
    { label: "Oldest waiting", cls: "num" },
  ]);
  ctx.page.append(heading("Queues"), errors.el, el);
  await every(
    POLL_MS,
    ctx.signal,
    async () => {
      const queues = await api("/queues", { signal: ctx.signal });
      errors.clear();
      ctx.updated();
      if (!queues.length) {
        tbody.replaceChildren(
          emptyRow(
            6,
            "No queues yet. A queue appears with its first job: ",
            h("code", {}, "scaleq submit default -- echo hi"),
          ),
        );
        return;
      }
      tbody.replaceChildren(
        ...queues.map((q) =>
          h(
            "tr",
            { dataset: { queue: q.name } },
            h("th", { scope: "row" }, h("a", { href: `#/jobs?queue=${encodeURIComponent(q.name)}` }, q.name)),
            h("td", { class: ["num", q.queued && "hot"] }, q.queued),
            h("td", { class: ["num", q.running && "busy"] }, q.running),
            h("td", { class: "num" }, q.succeeded),
            h("td", { class: ["num", q.unsuccessful && "bad"] }, q.unsuccessful),
            h("td", { class: "num" }, q.oldest_queued_age === null ? "—" : fmt.duration(q.oldest_queued_age)),
          ),
        ),
      );
    },
    errors.show,
  );
}
