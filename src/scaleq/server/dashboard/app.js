// The dashboard's shell: login by token, hash routing (#/queues, #/jobs, #/jobs/ID, #/arrays, #/workers, #/groups,
// #/health), and the "live" indicator. Plain ES modules, no build step.

import { api, onReachability, onUnauthorized, token, Unauthorized } from "./api.js";
import { fmt } from "./dom.js";
import { arraysView } from "./views/arrays.js";
import { groupsView } from "./views/groups.js";
import { healthView } from "./views/health.js";
import { jobView } from "./views/job.js";
import { jobsView } from "./views/jobs.js";
import { queuesView } from "./views/queues.js";
import { workersView } from "./views/workers.js";

const $ = (id) => document.getElementById(id);
const ROUTES = {
  queues: { view: queuesView, title: "Queues" },
  jobs: { view: jobsView, title: "Jobs" },
  arrays: { view: arraysView, title: "Arrays" },
  workers: { view: workersView, title: "Workers" },
  groups: { view: groupsView, title: "Groups" },
  health: { view: healthView, title: "Health" },
};

let current = null; // the AbortController of the view on screen

function parseHash() {
  const raw = window.location.hash.replace(/^#\/?/, "");
  const [path, query = ""] = raw.split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { parts: parts.length ? parts : ["queues"], params: new URLSearchParams(query) };
}

function setLive(text, ok = true) {
  const live = $("live");
  live.textContent = text;
  live.classList.toggle("down", !ok);
}

function showLogin(message, kind = "error") {
  current?.abort();
  current = null;
  token.clear();
  $("nav").hidden = true;
  $("session").hidden = true;
  $("page").replaceChildren();
  $("login").hidden = false;
  const error = $("login-error");
  error.hidden = !message;
  error.className = kind;
  error.textContent = message || "";
  document.title = "Log in · scaleq";
  $("token").focus();
}

async function route() {
  if (!token.get()) {
    showLogin();
    return;
  }
  current?.abort();
  const controller = new AbortController();
  current = controller;
  const { parts, params } = parseHash();
  const name = parts[0] === "jobs" && parts.length > 1 ? "job" : parts[0];
  const entry = name === "job" ? { view: jobView, title: `Job ${fmt.shortId(parts[1])}` } : ROUTES[name];

  $("login").hidden = true;
  $("nav").hidden = false;
  $("session").hidden = false;
  for (const a of document.querySelectorAll("#nav a")) {
    if (a.dataset.view === parts[0]) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const page = $("page");
  page.replaceChildren();
  if (!entry) {
    page.textContent = `There is no view “${parts[0]}”.`;
    return;
  }
  document.title = `${entry.title} · scaleq`;
  const ctx = {
    parts,
    params,
    page,
    signal: controller.signal,
    updated: () => setLive(`live · updated ${fmt.time(Date.now() / 1000)}`),
  };
  try {
    await entry.view(ctx);
  } catch (err) {
    if (err.name !== "AbortError" && !(err instanceof Unauthorized)) {
      console.error(err);
      page.append(`Something went wrong: ${err.message}`);
    }
  }
}

async function login(event) {
  event.preventDefault();
  const value = $("token").value.trim();
  const error = $("login-error");
  error.hidden = true;
  error.className = "error";
  try {
    await api("/queues", { tokenOverride: value });
  } catch (err) {
    error.hidden = false;
    error.textContent =
      err instanceof Unauthorized
        ? `That token was refused (${err.detail}). Check it, or make a new one with scaleq tokens create.`
        : `Could not log in: ${err.message}`;
    $("token").select();
    return;
  }
  token.set(value);
  $("token").value = "";
  if (!window.location.hash || window.location.hash === "#/") window.location.hash = "#/queues";
  else route();
}

function start() {
  onUnauthorized((detail) => showLogin(`Your token was refused (${detail}): log in again.`));
  onReachability((ok) => {
    if (!ok) setLive("server unreachable · retrying", false);
  });
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", () => showLogin("Logged out.", "info"));
  window.addEventListener("hashchange", route);
  route();
}

start();
