// The job view (#/jobs/ID): one job's definition, why it waits or how it ran, attempts, logs (followed by long-poll)
// and outputs.

import { api, sleep, Unauthorized } from "../api.js";
import { badge, emptyRow, fmt, h, notice, stateBadge, table } from "../dom.js";
import { errorSlot, heading, POLL_MS, problem } from "./common.js";
import { whySection } from "./why.js";

const LONG_POLL_S = 20;

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
  const why = whySection();

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
    why.el,
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

  // ---- why: loaded with the details, and again at each turn of the long-poll while the job waits (a group
  // starting, capped or refused changes without the job changing)
  const refreshWhy = async () => {
    try {
      await why.refresh(job, ctx.signal);
    } catch (err) {
      if (err.name !== "AbortError" && !(err instanceof Unauthorized)) errors.show(err);
    }
  };

  const render = () => {
    title.replaceChildren("Job ", h("span", { class: "mono" }, fmt.shortId(job.id)), " ", stateBadge(job));
    summary.replaceChildren(summaryFacts(job));
  };

  followLogs(null);
  try {
    await Promise.all([refreshDetails(), refreshWhy()]);
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
      if (changed || job.state === "queued") await refreshWhy();
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
