// The jobs view (#/jobs): the jobs, filtered by queue and state, 100 a page: "Older" follows the cursor the server
// gives (X-Scaleq-Next-Cursor), "Newest" goes back to the first page; each page is updated live.

import { api, every } from "../api.js";
import { emptyRow, fmt, h, jobStatus, stateBadge, table } from "../dom.js";
import { errorSlot, heading, POLL_MS } from "./common.js";

const STATES = ["queued", "running", "finished"];

function jobRow(job) {
  const duration =
    job.started_at === null
      ? null
      : (job.finished_at ?? Date.now() / 1000) - job.started_at;
  const command = fmt.argv([...(job.definition.entrypoint || []), ...job.definition.command]);
  const href = `#/jobs/${job.id}`;
  return h(
    "tr",
    {
      class: ["job", `st-${jobStatus(job)}`],
      dataset: { jobId: job.id },
      onclick: (ev) => {
        if (!ev.target.closest("a")) window.location.hash = href;
      },
    },
    h("td", {}, stateBadge(job)),
    h("th", { scope: "row" }, h("a", { href, class: "mono", title: job.id }, fmt.shortId(job.id))),
    h("td", {}, job.queue),
    h("td", { class: "cmd" }, h("code", { title: command }, command)),
    h("td", { title: fmt.stamp(job.submitted_at) }, fmt.time(job.submitted_at)),
    h("td", { class: "num" }, fmt.duration(duration)),
    h("td", { class: "num" }, job.exit_code ?? "—"),
    h("td", { class: "num" }, job.attempt ? `${job.attempt}` : "—"),
    h("td", { class: "mono small" }, job.worker_id ?? "—"),
  );
}

export async function jobsView(ctx) {
  const queue = ctx.params.get("queue") || "";
  const state = ctx.params.get("state") || "";
  const cursor = ctx.params.get("cursor") || "";
  const errors = errorSlot();
  const pageLink = (label, to) => {
    const p = new URLSearchParams();
    if (queue) p.set("queue", queue);
    if (state) p.set("state", state);
    if (to) p.set("cursor", to);
    return h("a", { href: `#/jobs${p.toString() ? `?${p}` : ""}`, class: "page-link" }, label);
  };
  const pager = h("nav", { class: "pager", "aria-label": "Pages of jobs" });

  const queueSelect = h("select", { id: "f-queue", name: "queue" }, h("option", { value: "" }, "all queues"));
  const stateSelect = h(
    "select",
    { id: "f-state", name: "state" },
    h("option", { value: "" }, "all states"),
    STATES.map((st) => h("option", { value: st, selected: st === state }, st)),
  );
  const apply = () => {
    const p = new URLSearchParams();
    if (queueSelect.value) p.set("queue", queueSelect.value);
    if (stateSelect.value) p.set("state", stateSelect.value);
    window.location.hash = `#/jobs${p.toString() ? `?${p}` : ""}`;
  };
  queueSelect.addEventListener("change", apply);
  stateSelect.addEventListener("change", apply);
  const filters = h(
    "form",
    { class: "filters", role: "search", "aria-label": "Filter jobs", onsubmit: (ev) => ev.preventDefault() },
    h("label", { for: "f-queue" }, "Queue"),
    queueSelect,
    h("label", { for: "f-state" }, "State"),
    stateSelect,
  );
  const what = [queue && `queue ${queue}`, state && `state ${state}`].filter(Boolean).join(", ");
  const { el, tbody } = table(
    `${cursor ? "Older jobs, 100 a page" : "The newest 100 jobs"}${what ? ` (${what})` : ""}, newest first. ` +
      "Updated live; a row opens the job.",
    [
      "State",
      "Job",
      "Queue",
      "Command",
      "Submitted",
      { label: "Ran for", cls: "num" },
      { label: "Exit", cls: "num" },
      { label: "Attempt", cls: "num" },
      "Worker",
    ],
    { className: "jobs" },
  );
  ctx.page.append(heading("Jobs"), filters, errors.el, el, pager);

  let knownQueues = [];
  await every(
    POLL_MS,
    ctx.signal,
    async () => {
      const [response, queues] = await Promise.all([
        api("/jobs", { params: { queue, state, limit: 100, cursor }, signal: ctx.signal, raw: true }),
        api("/queues", { signal: ctx.signal }).catch(() => []),
      ]);
      const jobs = await response.json();
      const next = response.headers.get("X-Scaleq-Next-Cursor");
      pager.replaceChildren(
        ...(cursor ? [pageLink("← Newest", "")] : []),
        ...(next ? [pageLink("Older →", next)] : []),
      );
      errors.clear();
      ctx.updated();
      const names = [...new Set([...queues.map((q) => q.name), ...(queue ? [queue] : [])])].sort();
      if (names.join("\n") !== knownQueues.join("\n")) {
        knownQueues = names;
        queueSelect.replaceChildren(
          h("option", { value: "" }, "all queues"),
          names.map((n) => h("option", { value: n, selected: n === queue }, n)),
        );
      }
      tbody.replaceChildren(...(jobs.length ? jobs.map(jobRow) : [emptyRow(9, "No jobs match.")]));
    },
    errors.show,
  );
}
