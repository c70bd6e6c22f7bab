// The team page's only script (the CSP allows no inline script). Everything
// works without it; it adds live updates, the wallet sign-in and the env
// checks before a queue form is sent.
"use strict";

const csrf = () => document.querySelector('meta[name="csrf-token"]')?.content || "";

// Live updates: every element with data-live-src is refreshed from what that
// URL renders, every 2 s while the tab is visible. Only the nodes that
// differ are touched, so focus, text selection and a half-done click survive
// a refresh; nothing is touched when nothing changed. Status changes (any
// element with data-status-of) are read out through the #announce region.
// <html data-live-refreshes> counts the refreshes, for the browser tests.
const elementKey = node => node.nodeType === Node.ELEMENT_NODE ? (node.id || node.dataset.id || null) : null;

function sameNode(a, b) {
  if (a.nodeType !== b.nodeType) return false;
  if (a.nodeType !== Node.ELEMENT_NODE) return true;
  return a.tagName === b.tagName && elementKey(a) === elementKey(b)
    && a.getAttribute("aria-label") === b.getAttribute("aria-label");
}

function syncAttributes(current, wanted) {
  for (const {name} of Array.from(current.attributes)) {
    if (!wanted.hasAttribute(name)) current.removeAttribute(name);
  }
  for (const {name, value} of Array.from(wanted.attributes)) {
    if (current.getAttribute(name) !== value) current.setAttribute(name, value);
  }
}

// Makes the children of `parent` those of `wanted`, reusing every node that
// is already right. Nodes are never moved (a moved node loses the focus):
// what is gone is removed, what is new is inserted.
function patchChildren(parent, wanted) {
  const want = Array.from(wanted.childNodes);
  want.forEach((node, i) => {
    let current = parent.childNodes[i];
    if (current && !sameNode(current, node) && node.nodeType === Node.ELEMENT_NODE) {
      // Still further down: what stands before it here is gone.
      const rest = Array.from(parent.childNodes).slice(i + 1);
      const later = rest.findIndex(c => sameNode(c, node));
      for (let k = 0; k <= later; k++) parent.removeChild(parent.childNodes[i]);
      current = parent.childNodes[i];
    }
    if (!current) { parent.appendChild(node); return; }
    if (!sameNode(current, node)) { parent.insertBefore(node, current); return; }
    patchNode(current, node);
  });
  while (parent.childNodes.length > want.length) parent.removeChild(parent.lastChild);
}

function patchNode(current, wanted) {
  if (current.nodeType === Node.ELEMENT_NODE) {
    if (current.outerHTML === wanted.outerHTML) return;
    syncAttributes(current, wanted);
    patchChildren(current, wanted);
  } else if (current.nodeValue !== wanted.nodeValue) {
    current.nodeValue = wanted.nodeValue;
  }
}

const statuses = root => new Map(Array.from(root.querySelectorAll("[data-status-of]"),
  e => [e.dataset.statusOf, e.textContent.trim()]));

function live() {
  const announce = document.getElementById("announce");
  let refreshes = 0;
  for (const element of document.querySelectorAll("[data-live-src]")) {
    let last = null;
    const refresh = async () => {
      if (document.hidden) return;
      try {
        const answer = await fetch(element.dataset.liveSrc, {credentials: "same-origin"});
        // Signed out meanwhile: the reload shows the sign-in page.
        if (answer.redirected || answer.status === 401) { window.location.reload(); return; }
        if (!answer.ok) return;
        const text = await answer.text();
        if (text !== last) {
          last = text;
          const wanted = document.createElement("template");
          wanted.innerHTML = text;
          const before = statuses(element);
          patchChildren(element, wanted.content);
          const changed = [];
          for (const [key, now] of statuses(element)) {
            if (before.has(key) && before.get(key) !== now) changed.push(now);
          }
          if (changed.length && announce) announce.textContent = changed.join(". ");
        }
        document.documentElement.dataset.liveRefreshes = String(++refreshes);
      } catch (_) { /* offline for a moment: try again next time */ }
    };
    setInterval(refresh, 2000);
  }
}

// A form with data-confirm asks before it is sent (cancelling, say).
function confirmations() {
  document.addEventListener("submit", event => {
    const message = event.target.dataset ? event.target.dataset.confirm : undefined;
    if (message && !window.confirm(message)) event.preventDefault();
  });
}

async function postJson(path, body) {
  const answer = await fetch(path, {
    method: "POST",
    credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf()},
    body: JSON.stringify(body),
  });
  const json = await answer.json().catch(() => ({}));
  if (!answer.ok) throw new Error(json.error?.message || `HTTP ${answer.status}`);
  return json;
}

const hex = text => "0x" + Array.from(new TextEncoder().encode(text), b => b.toString(16).padStart(2, "0")).join("");

// Sign-In with Ethereum through the browser wallet (EIP-1193).
function signIn() {
  const button = document.getElementById("siwe");
  if (!button) return;
  const say = text => { document.getElementById("login-status").textContent = text; };
  button.addEventListener("click", async () => {
    if (!window.ethereum) { say("No browser wallet found (window.ethereum)."); return; }
    try {
      button.disabled = true;
      const [address] = await window.ethereum.request({method: "eth_requestAccounts"});
      const chainId = parseInt(await window.ethereum.request({method: "eth_chainId"}), 16);
      say("Sign the message in your wallet…");
      const {message} = await postJson("/login/message", {address, chain_id: chainId});
      const signature = await window.ethereum.request({method: "personal_sign", params: [hex(message), address]});
      const answer = await postJson("/login", {message, signature});
      say(`Signed in as ${answer.subject}.`);
      window.location.assign(answer.redirect);
    } catch (err) {
      say(`Not signed in: ${err.message || err}`);
    } finally {
      button.disabled = false;
    }
  });
}

// The queue form: a .env file fills the text area; the node menu says what
// a replica of the chosen source needs on each node (the server renders it
// for the source it preselects, data-need-<source index> holds the rest);
// and env names outside the source's allowed_envs are refused before the
// form is sent, as the server refuses: the message takes the focus and the
// fields it is about are marked.
function queueForm() {
  const form = document.getElementById("queue");
  if (!form) return;
  const source = document.getElementById("source");
  const node = document.getElementById("node");
  const shown = document.getElementById("allowed-envs");
  const error = document.getElementById("form-error");
  const chosen = () => source.selectedOptions ? source.selectedOptions[0] : null;
  const allowed = () => {
    const list = chosen()?.dataset.allowedEnvs;
    return list === undefined ? null : list.split(",").filter(Boolean);
  };
  const showChoice = () => {
    const names = allowed();
    shown.textContent = names === null ? "" :
      names.length ? `This app allows: ${names.join(", ")}` : "This app allows no env overrides.";
    const index = chosen()?.dataset.index;
    if (index === undefined || !node) return;
    for (const option of node.options) {
      if (option.dataset.label === undefined) continue;
      const need = option.getAttribute(`data-need-${index}`);
      option.textContent = need ? `${option.dataset.label}: ${need}` : option.dataset.label;
    }
  };
  source.addEventListener("change", showChoice);
  showChoice();
  document.getElementById("env-file").addEventListener("change", async event => {
    const file = event.target.files[0];
    if (file) document.getElementById("env").value = await file.text();
  });
  const mark = (field, invalid) => {
    if (invalid) {
      field.setAttribute("aria-invalid", "true");
      field.setAttribute("aria-describedby", "form-error");
    } else if (field.getAttribute("aria-describedby") === "form-error") {
      field.removeAttribute("aria-invalid");
      field.removeAttribute("aria-describedby");
    }
  };
  form.addEventListener("submit", event => {
    const names = allowed();
    if (names === null) return;
    const refused = name => !names.includes(name);
    const text = document.getElementById("env");
    const inText = [];
    for (const line of text.value.split("\n")) {
      const match = line.trim().match(/^(?:export\s+)?([A-Za-z_][A-Za-z0-9_.]*)\s*=/);
      if (match && refused(match[1])) inText.push(match[1]);
    }
    mark(text, inText.length > 0);
    const inRows = [];
    for (const input of form.querySelectorAll('input[name="env_name"]')) {
      const name = input.value.trim();
      mark(input, name !== "" && refused(name));
      if (name && refused(name)) inRows.push(name);
    }
    const all = inText.concat(inRows);
    if (all.length) {
      event.preventDefault();
      error.hidden = false;
      error.textContent = `Not in the app's allowed_envs: ${all.join(", ")}.`;
      error.focus();
      error.scrollIntoView({block: "center"});
    }
  });
}

// Copy buttons (data-copy holds the full address or hash the page shows
// short): one listener for the whole page, so buttons that a live refresh
// brings along work too. Outside a secure context there is no Clipboard
// API, so the value is copied through a selected, hidden text area.
function copyButtons() {
  document.addEventListener("click", async event => {
    const button = event.target.closest ? event.target.closest("button[data-copy]") : null;
    if (!button) return;
    const value = button.dataset.copy;
    try {
      if (navigator.clipboard && window.isSecureContext) {
        await navigator.clipboard.writeText(value);
      } else {
        const area = document.createElement("textarea");
        area.value = value;
        area.setAttribute("readonly", "");
        area.className = "visually-hidden";
        document.body.append(area);
        area.select();
        document.execCommand("copy");
        area.remove();
      }
      button.dataset.copied = "";
      const announce = document.getElementById("announce");
      if (announce) announce.textContent = `Copied ${value}`;
    } catch (_) {
      button.title = "Copy failed: select the text instead";
    }
  });
}

document.addEventListener("DOMContentLoaded", () => { live(); confirmations(); signIn(); queueForm(); copyButtons(); });
