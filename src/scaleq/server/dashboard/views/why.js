// The "Why" section of the job view: the server's chain of reasons for the job (GET /jobs/ID/why) — for a queued
// job its place in its queue and what each group serving it is doing, for one that ran its attempts — each reason
// in words, its numbers on hover; and the estimated start when the server has one. Text only, never HTML.

import { api } from "../api.js";
import { fmt, h } from "../dom.js";

// how each kind of reason is marked: what blocks the job outright, what delays it, what helps it (as `scaleq why`)
const BLOCKING = new Set(["unserved", "nothing_fits", "cannot_run", "provider_error", "no_controller"]);
const DELAYING = new Set(["capped", "backing_off", "starting", "busy", "not_scaled", "group_unknown"]);
const HELPING = new Set(["can_run", "worker_can_run", "free_slots"]);

function look(kind) {
  if (BLOCKING.has(kind)) return ["blocking", "✗"];
  if (DELAYING.has(kind)) return ["delaying", "…"];
  if (HELPING.has(kind)) return ["helping", "✓"];
  return ["said", "•"];
}

function numbers(step) {
  return Object.entries(step.numbers || {})
    .filter(([, v]) => v !== null && v !== undefined)
    .map(([k, v]) => `${k}: ${typeof v === "number" && !Number.isInteger(v) ? v.toFixed(1) : v}`)
    .join(", ");
}

function estimateText(answer) {
  if (answer.estimated_start !== null && answer.estimated_start !== undefined) {
    const left = answer.estimated_start - Date.now() / 1000;
    const when = left > 0 ? `in about ${fmt.duration(left)}` : "any moment now";
    const basis = answer.estimate_basis ? ` — ${answer.estimate_basis}` : "";
    return `Estimated start: ${when} (${fmt.time(answer.estimated_start)})${basis}`;
  }
  if (answer.state !== "queued") return "";
  return answer.estimate_basis ? `Estimated start: not known — ${answer.estimate_basis}` : "Estimated start: not known.";
}

/** The section and how to refresh it for the job as it is now. */
export function whySection() {
  const chain = h("ul", { class: "why", id: "why-chain", "aria-live": "polite" });
  const estimate = h("p", { class: "hint", id: "why-estimate" });
  const el = h(
    "section",
    { "aria-labelledby": "h-why" },
    h("h2", { id: "h-why" }, "Why"),
    h("p", { class: "hint" }, "Why the job waits, or how its attempts went, as the server sees it now."),
    chain,
    estimate,
  );
  const show = (answer) => {
    chain.replaceChildren(
      ...answer.chain.map((step) => {
        const [cls, sym] = look(step.kind);
        return h(
          "li",
          { class: cls, dataset: { kind: step.kind }, title: numbers(step) },
          h("span", { class: "sym", "aria-hidden": "true" }, sym),
          " ",
          step.text,
        );
      }),
    );
    estimate.textContent = estimateText(answer);
  };
  const refresh = async (job, signal) => show(await api(`/jobs/${job.id}/why`, { signal }));
  return { el, refresh };
}
