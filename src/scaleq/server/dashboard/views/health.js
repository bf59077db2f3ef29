// The health view (#/health): every hop of the chain, as scaleq doctor checks it.

import { api, ApiError, every, sleep, Unauthorized } from "../api.js";
import { badge, emptyRow, h, notice, table } from "../dom.js";
import { errorSlot, heading } from "./common.js";

const HEALTH_POLL_MS = 10000;

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
