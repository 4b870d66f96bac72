// dstack VMM dashboard: lists VMs through the manager's pRPC API (POST /prpc/<Method>?json) and drives
// stop/start/remove. On TCP the API needs a bearer token: taken from `#token=…` or the token box, kept in
// localStorage.
"use strict";

const TOKEN_KEY = "dstack-vmm-token";

(function takeTokenFromFragment() {
  const m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  if (m) {
    localStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
})();

async function rpc(method, body) {
  const headers = { "Content-Type": "application/json" };
  const token = localStorage.getItem(TOKEN_KEY);
  if (token) headers["Authorization"] = "Bearer " + token;
  const resp = await fetch("prpc/" + method + "?json", {
    method: "POST", headers, body: JSON.stringify(body || {}),
  });
  const text = await resp.text();
  let data = {};
  try { data = text ? JSON.parse(text) : {}; } catch (_) { data = { error: text }; }
  if (!resp.ok) {
    const msg = data.error || resp.statusText;
    if (/unauthorized/.test(msg)) document.getElementById("auth").style.display = "block";
    throw new Error(method + ": " + msg);
  }
  return data;
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function showError(e) {
  document.getElementById("error").textContent = e ? String(e.message || e) : "";
}

async function act(method, id, confirmText) {
  if (confirmText && !confirm(confirmText)) return;
  try {
    showError(null);
    await rpc(method, { id });
  } catch (e) { showError(e); }
  refresh();
}

function ports(cfg) {
  return (cfg && cfg.ports || [])
    .map(p => `${p.protocol}:${p.host_address || "*"}:${p.host_port}→${p.vm_port}`).join(", ");
}

function row(vm) {
  const cfg = vm.configuration || {};
  const running = vm.status === "running" || vm.status === "restarting";
  const progress = el("td", {}, vm.boot_progress || "");
  if (vm.boot_error) progress.append(el("div", { class: "err" }, "error: " + vm.boot_error));
  if (vm.shutdown_progress) progress.append(el("div", {}, "shutdown: " + vm.shutdown_progress));
  const actions = el("td", {},
    el("button", { "data-action": "shutdown", onclick: () => act("ShutdownVm", vm.id) }, "Shutdown"),
    el("button", { "data-action": "stop", onclick: () => act("StopVm", vm.id) }, "Stop"),
    el("button", { "data-action": "start", onclick: () => act("StartVm", vm.id) }, "Start"),
    el("button", { "data-action": "remove", onclick: () => act("RemoveVm", vm.id, `Remove VM ${vm.name}?`) }, "Remove"));
  for (const b of actions.querySelectorAll("button")) {
    const a = b.getAttribute("data-action");
    if ((a === "start" && running) || ((a === "stop" || a === "shutdown") && !running)) b.disabled = true;
  }
  return el("tr", { "data-vm-id": vm.id },
    el("td", {}, el("div", {}, vm.name), el("div", { class: "id" }, vm.id)),
    el("td", { class: "status-" + vm.status }, vm.status),
    el("td", {}, cfg.vcpu ?? ""),
    el("td", {}, cfg.memory != null ? cfg.memory + " MB" : ""),
    el("td", {}, cfg.disk_size != null ? cfg.disk_size + " GB" : ""),
    el("td", {}, cfg.image || ""),
    el("td", {}, ports(cfg)),
    el("td", {}, vm.uptime || ""),
    progress,
    actions);
}

async function refresh() {
  try {
    const [st, ver] = await Promise.all([rpc("Status", {}), rpc("Version", {})]);
    const body = document.getElementById("vms");
    body.replaceChildren(...(st.vms || []).map(row));
    if (!(st.vms || []).length) body.append(el("tr", {}, el("td", { colspan: "10" }, "no VMs")));
    document.getElementById("meta").textContent =
      `version ${ver.version} (${ver.rev}) · ${st.total || 0} VM(s)`;
    document.getElementById("auth").style.display = "none";
  } catch (e) { showError(e); }
}

document.getElementById("save-token").addEventListener("click", () => {
  localStorage.setItem(TOKEN_KEY, document.getElementById("token").value);
  refresh();
});

refresh();
setInterval(refresh, 3000);
