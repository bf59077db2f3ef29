// What the views share. A view (one module per view in this directory) is `async (ctx) => void`: it fills
// ctx.page and keeps it live until ctx.signal aborts (the user went elsewhere). Polls every 2 s where the API has
// no long-poll; follows long-polls where it has (a job, its logs).

import { ApiError } from "../api.js";
import { h, notice } from "../dom.js";

export const POLL_MS = 2000;

/** A line that says what went wrong with a request, in words. */
export function problem(err) {
  if (err instanceof ApiError && err.status === 403) return `This token may not see this: ${err.detail}`;
  if (err instanceof ApiError) return `The server answered ${err.status}: ${err.detail}`;
  return `The server could not be reached (${err.message}); retrying.`;
}

/** A slot for an error message above a live view; cleared by the next good refresh. */
export function errorSlot() {
  const el = h("div", { class: "error-slot" });
  return {
    el,
    show: (err) => el.replaceChildren(notice("error", problem(err))),
    clear: () => el.replaceChildren(),
  };
}

export function heading(title, ...rest) {
  return h("div", { class: "heading" }, h("h1", {}, title), ...rest);
}
