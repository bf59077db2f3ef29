// The views. Each is `async (ctx) => void`: it fills ctx.page and keeps it live until ctx.signal aborts (the user
// went elsewhere). Polls every 2 s where the API has no long-poll; follows long-polls where it has (a job, its logs).

import { api, ApiError, every, sleep, Unauthorized } from "./api.js";
import { MARK, groupChart } from "./chart.js";
import { badge, emptyRow, fmt, h, jobStatus, notice, stateBadge, table } from "./dom.js";

const POLL_MS = 2000;
const HEALTH_POLL_MS = 10000;
const LONG_POLL_S = 20;

/** A line that says what went wrong with a request, in words. */
function problem(err) {
  if (err instanceof ApiError && err.status === 403) return `This token may not see this: ${err.detail}`;
  if (err instanceof ApiError) return `The server answered ${err.status}: ${err.detail}`;
  return `The server could not be reached (${err.message}); retrying.`;
}

/** A slot for an error message above a live view; cleared by the next good refresh. */
function errorSlot() {
  const el = h("div", { class: "error-slot" });
  return {
    el,
    show: (err) => el.replaceChildren(notice("error", problem(err))),
    clear: () => el.replaceChildren(),
  };
}

function heading(title, ...rest) {
  return h("div", { class: "heading" }, h("h1", {}, title), ...rest);
}

// ---------------------------------------------------------------------------------------------------- queues

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

// ------------------------------------------------------------------------------------------------------ jobs

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
  const errors = errorSlot();

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
    `The newest 100 jobs${what ? ` (${what})` : ""}, newest first. Updated live; a row opens the job.`,
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
  ctx.page.append(heading("Jobs"), filters, errors.el, el);

  let knownQueues = [];
  await every(
    POLL_MS,
    ctx.signal,
    async () => {
      const [jobs, queues] = await Promise.all([
        api("/jobs", { params: { queue, state, limit: 100 }, signal: ctx.signal }),
        api("/queues", { signal: ctx.signal }).catch(() => []),
      ]);
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

// ------------------------------------------------------------------------------------------------ job detail

function dl(pairs) {
  return h(
    "dl",
    { class: "facts" },
    pairs
      .filter(Boolean)
      .map(([k, v]) => [h("dt", {}, k), h("dd", {}, v === null || v === undefined || v === "" ? "—" : v)]),
  );
}

function definitionFacts(d) {
  const req = d.requirements || {};
  return dl([
    ["Command", h("code", { class: "wrap" }, fmt.argv(d.command))],
    d.entrypoint && ["Entrypoint", h("code", { class: "wrap" }, fmt.argv(d.entrypoint))],
    ["Runtime", d.image ? `docker, image ${d.image}` : "process (no image)"],
    d.workdir && ["Workdir", h("code", {}, d.workdir)],
    [
      "Environment",
      Object.keys(d.env || {}).length
        ? h(
            "ul",
            { class: "plain" },
            Object.entries(d.env).map(([k, v]) => h("li", {}, h("code", {}, `${k}=${v}`))),
          )
        : "—",
    ],
    [
      "Inputs",
      (d.inputs || []).length
        ? h(
            "ul",
            { class: "plain" },
            d.inputs.map((i) => h("li", {}, h("code", {}, i.path), ` ${fmt.bytes(i.size)}`)),
          )
        : "—",
    ],
    ["Max duration", fmt.duration(d.max_duration)],
    [
      "Requirements",
      `${req.cpus ?? 1} CPU, ${req.gpus ?? 0} GPU, memory ${req.memory ? fmt.bytes(req.memory) : "any"}`,
    ],
    ["Tags", (d.tags || []).length ? d.tags.join(", ") : "—"],
    ["Network", d.network],
  ]);
}

function summaryFacts(job) {
  return dl([
    ["State", stateBadge(job)],
    ["Job id", h("code", { class: "wrap" }, job.id)],
    ["Queue", h("a", { href: `#/jobs?queue=${encodeURIComponent(job.queue)}` }, job.queue)],
    ["Exit code", job.exit_code],
    job.error && ["Error", h("span", { class: "bad" }, job.error)],
    ["Submitted", h("span", { title: fmt.stamp(job.submitted_at) }, fmt.time(job.submitted_at))],
    ["Started", h("span", { title: fmt.stamp(job.started_at) }, fmt.time(job.started_at))],
    ["Finished", h("span", { title: fmt.stamp(job.finished_at) }, fmt.time(job.finished_at))],
    [
      "Ran for",
      job.started_at === null ? "—" : fmt.duration((job.finished_at ?? Date.now() / 1000) - job.started_at),
    ],
    ["Attempts", `${job.attempts} of ${job.max_attempts} in this run (latest attempt #${job.attempt || "—"})`],
    ["Priority", job.priority],
    ["Worker", job.worker_id ? h("code", {}, job.worker_id) : "—"],
  ]);
}

async function download(ctx, job, output, button) {
  button.disabled = true;
  try {
    const response = await api(`/jobs/${job.id}/outputs/${output.path.split("/").map(encodeURIComponent).join("/")}`, {
      raw: true,
      signal: ctx.signal,
    });
    const url = URL.createObjectURL(await response.blob());
    const a = h("a", { href: url, download: output.path.split("/").pop(), hidden: true });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  } catch (err) {
    if (err.name !== "AbortError") button.after(notice("error", problem(err)));
  } finally {
    button.disabled = false;
  }
}

export async function jobView(ctx) {
  const id = ctx.parts[1];
  const errors = errorSlot();
  let job;
  try {
    job = await api(`/jobs/${encodeURIComponent(id)}`, { signal: ctx.signal });
  } catch (err) {
    if (err instanceof Unauthorized || err.name === "AbortError") return;
    ctx.page.append(heading(`Job ${fmt.shortId(id)}`), notice("error", problem(err)));
    return;
  }
  ctx.updated();

  const title = h("h1", {}, "Job ", h("span", { class: "mono" }, fmt.shortId(job.id)), " ", stateBadge(job));
  const summary = h("div", {}, summaryFacts(job));
  const attemptsBody = table("Every attempt to run this job, oldest first.", [
    { label: "#", cls: "num" },
    "Worker",
    "Started",
    "Ended",
    { label: "Took", cls: "num" },
    "Outcome",
  ]);
  const outputsBody = table(null, ["File", { label: "Size", cls: "num" }, "sha256", ""]);
  const outputsNote = h("p", { class: "hint" });
  const attemptSelect = h("select", { id: "log-attempt" });
  const followBox = h("input", { type: "checkbox", id: "log-follow", checked: true });
  const logStatus = h("span", { class: "log-status", role: "status" });
  const log = h("pre", { class: "log", id: "log", tabindex: 0, "aria-label": "Job output" });

  ctx.page.append(
    h("p", { class: "crumbs" }, h("a", { href: "#/jobs" }, "Jobs"), " / ", fmt.shortId(job.id)),
    h("div", { class: "heading" }, title),
    errors.el,
    h(
      "div",
      { class: "columns" },
      h("section", { "aria-labelledby": "h-summary" }, h("h2", { id: "h-summary" }, "Summary"), summary),
      h(
        "section",
        { "aria-labelledby": "h-definition" },
        h("h2", { id: "h-definition" }, "Definition"),
        definitionFacts(job.definition),
        h(
          "details",
          {},
          h("summary", {}, "As JSON"),
          h("pre", { class: "json" }, JSON.stringify(job.definition, null, 2)),
        ),
      ),
    ),
    h(
      "section",
      { "aria-labelledby": "h-logs" },
      h(
        "div",
        { class: "log-head" },
        h("h2", { id: "h-logs" }, "Logs"),
        h("label", { for: "log-attempt" }, "Attempt"),
        attemptSelect,
        h("label", { class: "check" }, followBox, " keep the end in view"),
        logStatus,
      ),
      log,
    ),
    h("section", { "aria-labelledby": "h-attempts" }, h("h2", { id: "h-attempts" }, "Attempts"), attemptsBody.el),
    h(
      "section",
      { "aria-labelledby": "h-outputs" },
      h("h2", { id: "h-outputs" }, "Outputs"),
      outputsNote,
      outputsBody.el,
    ),
  );

  // ---- logs: follow one attempt (the latest unless picked) with the logs long-poll
  let logAbort = null;
  const followLogs = async (picked) => {
    logAbort?.abort();
    const ctl = new AbortController();
    logAbort = ctl;
    const signal = AbortSignal.any([ctx.signal, ctl.signal]);
    log.replaceChildren();
    let after = 0;
    let shown = null;
    logStatus.textContent = "following…";
    while (!signal.aborted) {
      let page;
      try {
        page = await api(`/jobs/${job.id}/logs`, {
          params: { attempt: picked || undefined, after, wait: LONG_POLL_S, limit: 1000 },
          signal,
        });
      } catch (err) {
        if (err.name === "AbortError" || err instanceof Unauthorized) return;
        logStatus.textContent = problem(err);
        await sleep(POLL_MS, signal);
        continue;
      }
      if (!picked && shown !== null && page.attempt !== shown) {
        // a new attempt began: start its log from the top
        log.replaceChildren();
        after = 0;
        shown = page.attempt;
        continue;
      }
      shown = page.attempt;
      if (page.chunks.length) {
        const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
        log.querySelector(".log-empty")?.remove();
        for (const c of page.chunks) {
          log.append(c.stream === "stderr" ? h("span", { class: "stderr", title: "stderr" }, c.data) : c.data);
        }
        if (followBox.checked && atEnd) log.scrollTop = log.scrollHeight;
        after = page.next;
      }
      if (page.state === "finished" && !page.chunks.length) {
        if (!log.childNodes.length) log.append(h("span", { class: "log-empty" }, "(no output)"));
        logStatus.textContent = page.attempt ? `attempt #${page.attempt} — end of log` : "the job never ran";
        return;
      }
      logStatus.textContent =
        page.state === "queued" && !log.childNodes.length
          ? "waiting for the job to start…"
          : `attempt #${page.attempt} — following…`;
    }
  };
  attemptSelect.addEventListener("change", () => followLogs(Number(attemptSelect.value) || null));

  // ---- attempts and outputs: loaded now and whenever the job changes
  const refreshDetails = async () => {
    const [attempts, outputs] = await Promise.all([
      api(`/jobs/${job.id}/attempts`, { signal: ctx.signal }),
      api(`/jobs/${job.id}/outputs`, { signal: ctx.signal }),
    ]);
    attemptsBody.tbody.replaceChildren(
      ...(attempts.length
        ? attempts.map((a) =>
            h(
              "tr",
              {},
              h("td", { class: "num" }, a.attempt),
              h("td", { class: "mono small" }, a.worker_id),
              h("td", { title: fmt.stamp(a.started_at) }, fmt.time(a.started_at)),
              h("td", { title: fmt.stamp(a.ended_at) }, fmt.time(a.ended_at)),
              h("td", { class: "num" }, fmt.duration((a.ended_at ?? Date.now() / 1000) - a.started_at)),
              h("td", {}, a.outcome ? outcomeBadge(a.outcome) : badge("running", "running", "▶")),
            ),
          )
        : [emptyRow(6, "Not started yet.")]),
    );
    const picked = attemptSelect.value;
    attemptSelect.replaceChildren(
      h("option", { value: "" }, `latest${job.attempt ? ` (#${job.attempt})` : ""}`),
      attempts.map((a) => h("option", { value: a.attempt, selected: String(a.attempt) === picked }, `#${a.attempt}`)),
    );
    outputsNote.textContent =
      job.state === "finished"
        ? outputs.length
          ? "Files the job wrote under /outputs."
          : "The job wrote no files under /outputs."
        : "Outputs are collected when the job finishes.";
    outputsBody.tbody.replaceChildren(
      ...(outputs.length
        ? outputs.map((o) => {
            const button = h("button", { type: "button", class: "small" }, "Download");
            button.addEventListener("click", () => download(ctx, job, o, button));
            return h(
              "tr",
              {},
              h("th", { scope: "row" }, h("code", {}, o.path)),
              h("td", { class: "num" }, fmt.bytes(o.size)),
              h("td", { class: "mono small", title: o.sha256 }, o.sha256.slice(0, 16)),
              h("td", {}, button),
            );
          })
        : [emptyRow(4, "None.")]),
    );
  };

  const render = () => {
    title.replaceChildren("Job ", h("span", { class: "mono" }, fmt.shortId(job.id)), " ", stateBadge(job));
    summary.replaceChildren(summaryFacts(job));
  };

  followLogs(null);
  try {
    await refreshDetails();
  } catch (err) {
    if (err.name !== "AbortError") errors.show(err);
  }

  // ---- the job itself: long-poll until it leaves its state, until it is finished
  while (!ctx.signal.aborted && job.state !== "finished") {
    try {
      const next = await api(`/jobs/${job.id}`, {
        params: { wait: LONG_POLL_S, state: job.state },
        signal: ctx.signal,
      });
      errors.clear();
      ctx.updated();
      const changed = next.state !== job.state || next.attempt !== job.attempt || next.reason !== job.reason;
      job = next;
      render();
      if (changed) await refreshDetails();
    } catch (err) {
      if (err.name === "AbortError" || err instanceof Unauthorized) return;
      errors.show(err);
      await sleep(POLL_MS, ctx.signal);
    }
  }
}

function outcomeBadge(outcome) {
  const look = {
    success: ["✓", "success"],
    failed: ["✗", "failed"],
    timed_out: ["⏱", "timed out"],
    cancelled: ["⊘", "cancelled"],
    worker_lost: ["⚠", "worker lost"],
    released: ["↩", "released"],
    lost: ["⚠", "lost"],
  }[outcome] || ["•", outcome];
  return badge(outcome, look[1], look[0]);
}

// --------------------------------------------------------------------------------------------------- workers

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

// ---------------------------------------------------------------------------------------------------- groups

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
  const cls = { scale_up: "up", scale_down: "down", error: "failed", desired: "queued" }[kind] || "other";
  const sym = { scale_up: "▲", scale_down: "▼", error: "✕", desired: "◆" }[kind] || "●";
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

// ---------------------------------------------------------------------------------------------------- health

export async function healthView(ctx) {
  const errors = errorSlot();
  const server = h("p", { class: "server-health" });
  const summary = h("div", {});
  const { el, tbody } = table(
    "Every hop of the chain, as scaleq doctor checks it. Checked again every 10 s.",
    ["Status", "Hop", "Check", "Detail", "How to fix"],
    { className: "health" },
  );
  const again = h("button", { type: "button", class: "quiet" }, "Check now");
  let kick = null;
  again.addEventListener("click", () => kick?.abort());
  ctx.page.append(heading("Health", again), errors.el, server, summary, el);

  while (!ctx.signal.aborted) {
    if (!document.hidden) {
      try {
        const hz = await fetch("/healthz", { cache: "no-store", signal: ctx.signal }).then(async (r) => ({
          ok: r.ok,
          body: await r.json().catch(() => ({})),
        }));
        server.replaceChildren(
          hz.ok ? badge("success", "ok", "✓") : badge("failed", "failing", "✗"),
          " server and store answer",
          hz.body.version ? ` (scaleq ${hz.body.version})` : "",
        );
        let checks = null;
        try {
          checks = await api("/health/checks", { signal: ctx.signal });
        } catch (err) {
          if (!(err instanceof ApiError) || err.status !== 404) throw err;
        }
        errors.clear();
        ctx.updated();
        if (checks === null) {
          summary.replaceChildren(
            notice("info", "Health checks not available: this server does not serve /api/v1/health/checks."),
          );
          el.hidden = true;
        } else {
          el.hidden = false;
          // a check that could not run (checked: false) is neither a pass nor a failure: it says why
          const look = (c) =>
            c.checked === false
              ? badge("cancelled", "not checked", "?")
              : c.ok
                ? badge("success", "ok", "✓")
                : badge("failed", "failing", "✗");
          const failing = checks.filter((c) => !c.ok && c.checked !== false).length;
          const unchecked = checks.filter((c) => c.checked === false).length;
          const also = unchecked ? ` ${unchecked} could not be checked.` : "";
          summary.replaceChildren(
            failing
              ? notice("error", `${failing} of ${checks.length} checks fail: start with the first failing hop.${also}`)
              : unchecked
                ? notice("info", `No check fails.${also}`)
                : notice("ok", `All ${checks.length} checks pass.`),
          );
          tbody.replaceChildren(
            ...(checks.length
              ? checks.map((c) =>
                  h(
                    "tr",
                    { class: c.checked === false ? "unchecked" : c.ok ? "ok" : "failing" },
                    h("td", {}, look(c)),
                    h("td", {}, c.hop),
                    h("th", { scope: "row" }, c.name),
                    h("td", { class: "reason" }, c.detail || "—"),
                    h("td", { class: "reason" }, c.ok ? "—" : c.fix || "—"),
                  ),
                )
              : [emptyRow(5, "No checks reported.")]),
          );
        }
      } catch (err) {
        if (err.name === "AbortError" || err instanceof Unauthorized) return;
        errors.show(err);
      }
    }
    kick = new AbortController();
    await sleep(HEALTH_POLL_MS, AbortSignal.any([ctx.signal, kick.signal]));
  }
}
