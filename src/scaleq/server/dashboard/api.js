// The API client: the token lives in sessionStorage and goes as a bearer token on every request to /api/v1.

const KEY = "scaleq.token";

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail || `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
  }
}

/** The token was refused (401): the app goes back to the login page. */
export class Unauthorized extends ApiError {}

export const token = {
  get: () => sessionStorage.getItem(KEY),
  set: (value) => sessionStorage.setItem(KEY, value),
  clear: () => sessionStorage.removeItem(KEY),
};

let unauthorized = () => {};
/** Called with the server's words when any request is answered 401. */
export function onUnauthorized(handler) {
  unauthorized = handler;
}

let reachable = () => {};
/** Called with true after each answered request and false when the server could not be reached. */
export function onReachability(handler) {
  reachable = handler;
}

async function detailOf(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
    return JSON.stringify(body);
  } catch {
    return response.statusText;
  }
}

/**
 * GET (or another method) on /api/v1 + path. Answers the parsed JSON, or the Response itself with {raw: true}.
 * Throws Unauthorized (after telling the app), ApiError for other HTTP errors, and lets network errors and aborts
 * through (after telling the app the server is unreachable).
 */
export async function api(path, { params, signal, raw = false, method = "GET", tokenOverride } = {}) {
  const url = new URL(`/api/v1${path}`, window.location.origin);
  for (const [key, value] of Object.entries(params || {})) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(key, value);
  }
  let response;
  try {
    response = await fetch(url, {
      method,
      headers: { Authorization: `Bearer ${tokenOverride ?? token.get() ?? ""}` },
      signal,
      cache: "no-store",
    });
  } catch (err) {
    if (err.name !== "AbortError") reachable(false);
    throw err;
  }
  reachable(true);
  if (response.status === 401) {
    const detail = await detailOf(response);
    if (tokenOverride === undefined) unauthorized(detail);
    throw new Unauthorized(401, detail);
  }
  if (!response.ok) throw new ApiError(response.status, await detailOf(response));
  return raw ? response : response.json();
}

/** Resolve after ms, or at once when the signal aborts. */
export function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

/**
 * Run fn now and then every `ms` until the signal aborts; skipped while the tab is hidden (a hidden dashboard
 * costs the server nothing). Errors go to onError and the loop goes on.
 */
export async function every(ms, signal, fn, onError) {
  while (!signal.aborted) {
    if (!document.hidden) {
      try {
        await fn();
      } catch (err) {
        if (err.name === "AbortError" || signal.aborted) return;
        if (err instanceof Unauthorized) return;
        onError?.(err);
      }
    }
    await sleep(ms, signal);
  }
}
