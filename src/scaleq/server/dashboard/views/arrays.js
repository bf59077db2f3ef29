// The arrays view (#/arrays): every array (the jobs of one submit-many), newest first, with its progress as a bar
// and its counts by state, and what it cost (worker-seconds; money where its groups have a price per hour).

import { api, every } from "../api.js";
import { emptyRow, fmt, h, table } from "../dom.js";
import { errorSlot, heading, POLL_MS } from "./common.js";

const COLUMNS = 10;

function money(cost) {
  if (!cost || cost.cost === null || cost.cost === undefined) return "—";
  return cost.cost.toLocaleString("en", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
}

function unsuccessful(a) {
  return a.failed + Object.values(a.other).reduce((sum, n) => sum + n, 0);
}

function progress(a) {
  const label = `${a.done} of ${a.size} done (${a.percent}%)`;
  return h(
    "td",
    { class: "progress" },
    h("progress", { max: a.size, value: a.done, "aria-label": label, title: label }),
    h("span", { class: "num" }, ` ${a.percent}%`),
  );
}

function row(a) {
  return h(
    "tr",
    { dataset: { arrayId: a.id } },
    h(
      "th",
      { scope: "row" },
      h("code", { title: a.id }, fmt.shortId(a.id)),
      a.name ? h("span", { class: "array-name" }, ` ${a.name}`) : null,
    ),
    h("td", {}, h("a", { href: `#/jobs?queue=${encodeURIComponent(a.queue)}` }, a.queue)),
    progress(a),
    h("td", { class: "num" }, a.succeeded),
    h("td", { class: ["num", unsuccessful(a) && "bad"] }, unsuccessful(a)),
    h("td", { class: ["num", a.running && "busy"] }, a.running),
    h("td", { class: ["num", a.queued && "hot"] }, a.queued),
    h("td", { class: "num" }, a.cost ? Math.round(a.cost.worker_seconds).toLocaleString("en") : "—"),
    h("td", { class: "num cost" }, money(a.cost)),
    h("td", { class: "num", title: fmt.stamp(a.created_at) }, fmt.time(a.created_at)),
  );
}

export async function arraysView(ctx) {
  const errors = errorSlot();
  const { el, tbody } = table("Every array (one per submit-many), newest first, with its progress. Updated live.", [
    "Array",
    "Queue",
    "Progress",
    { label: "Succeeded", cls: "num" },
    { label: "Unsuccessful", cls: "num" },
    { label: "Running", cls: "num" },
    { label: "Queued", cls: "num" },
    { label: "Worker-seconds", cls: "num" },
    { label: "Cost", cls: "num" },
    { label: "Created", cls: "num" },
  ]);
  ctx.page.append(heading("Arrays"), errors.el, el);
  await every(
    POLL_MS,
    ctx.signal,
    async () => {
      const arrays = await api("/arrays", { signal: ctx.signal });
      errors.clear();
      ctx.updated();
      if (!arrays.length) {
        tbody.replaceChildren(
          emptyRow(COLUMNS, "No arrays yet. An array is made by ", h("code", {}, "scaleq submit-many QUEUE FILE")),
        );
        return;
      }
      tbody.replaceChildren(...arrays.map(row));
    },
    errors.show,
  );
}
