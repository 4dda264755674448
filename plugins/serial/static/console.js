// console-broker's serial console page: xterm.js on the broker's WebSocket.
// The protocol (binary frames: terminal bytes; text frames: JSON control
// messages) is described in docs/serial.md.
(function () {
  "use strict";

  var SUBPROTOCOL = "console-broker.serial.v1";
  // Close codes (docs/service.md), for closes that carry no reason text.
  var CLOSE_TEXT = {
    1000: "console closed",
    1001: "broker shutting down",
    1006: "connection lost",
    1009: "message too big",
    1011: "internal error",
    4000: "malformed console request",
    4001: "invalid token",
    4002: "token expired",
    4003: "token not valid yet",
    4004: "token already used",
    4005: "token is for another node",
    4006: "token is for another protocol",
    4007: "origin not allowed",
    4008: "no plugin serves this protocol",
    4009: "view-only sessions are not available for this protocol",
    4010: "unknown domain",
    4011: "console not enabled on this domain",
    4012: "VM not running",
    4013: "console busy",
    4014: "session limit reached",
    4015: "hypervisor unavailable",
    4016: "console unreachable",
    4100: "VM stopped",
    4101: "domain undefined",
    4102: "idle timeout",
    4103: "hypervisor connection lost",
    4104: "the client sent a message the broker cannot check",
    4105: "console protocol error",
    4106: "the broker could not log in to the console",
    4107: "the session's policy refuses this channel",
    4108: "the client stopped reading",
    4109: "ended by an operator"
  };

  var $ = function (id) { return document.getElementById(id); };
  var ui = {
    domain: $("domain"), state: $("state"), role: $("role"), notice: $("notice"),
    takeover: $("takeover"), copy: $("copy"), paste: $("paste"),
    reconnect: $("reconnect"), link: $("link"), reconnectButton: $("reconnect-button"),
    terminal: $("terminal")
  };
  var api = { state: "connecting", role: null, rights: null, clients: 0, closeCode: null,
              closeReason: null, domain: null };
  window.consoleBroker = api;

  function setState(state, text) {
    api.state = state;
    ui.state.className = "state-" + state;
    ui.state.textContent = text || state;
  }

  function showNotice(text, kind) {
    ui.notice.textContent = text;
    ui.notice.className = kind || "";
    ui.notice.hidden = !text;
  }

  if (typeof window.Terminal !== "function" || !window.FitAddon) {
    setState("closed", "not loaded");
    showNotice("xterm.js could not be loaded from the broker: its assets directory " +
               "(http.assets_dir) lacks @xterm/xterm or @xterm/addon-fit.");
    return;
  }

  // The token: from ?token= (the URL `console-broker token` prints) or #token= (a
  // control plane embedding the page can hand a fresh one without a reload). It is
  // taken out of the address bar at once: it is single use, and the URL is history.
  function tokenFromLocation() {
    var query = new URLSearchParams(window.location.search).get("token");
    var hash = new URLSearchParams(window.location.hash.replace(/^#/, "")).get("token");
    if (query || hash) {
      window.history.replaceState(null, "", window.location.pathname);
    }
    return hash || query;
  }

  function tokenFromText(text) {
    text = (text || "").trim();
    if (!text) { return null; }
    var match = /[?#&]token=([^&#\s]+)/.exec(text);
    return match ? decodeURIComponent(match[1]) : text;
  }

  function websocketURL(token) {
    var scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    // The page lives at {prefix}/console/serial/; the console at {prefix}/ws/serial.
    var prefix = window.location.pathname.replace(/\/console\/serial\/.*$/, "");
    return scheme + "//" + window.location.host + prefix + "/ws/serial?token=" +
      encodeURIComponent(token);
  }

  var term = new window.Terminal({
    cursorBlink: true,
    scrollback: 10000,
    fontFamily: "DejaVu Sans Mono, Menlo, Consolas, monospace",
    fontSize: 14,
    theme: { background: "#000000" }
  });
  var fit = new window.FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(ui.terminal);
  api.term = term;

  var socket = null;
  var connections = 0;
  var encoder = new TextEncoder();

  function framedOpen() {
    return socket && socket.readyState === WebSocket.OPEN && socket.protocol === SUBPROTOCOL;
  }

  function sendControl(message) {
    if (framedOpen()) { socket.send(JSON.stringify(message)); }
  }

  function sendInput(bytes) {
    if (socket && socket.readyState === WebSocket.OPEN) { socket.send(bytes); }
  }

  function refit() {
    try { fit.fit(); } catch (e) { /* not visible yet */ }
  }

  term.onResize(function (size) {
    sendControl({ type: "resize", cols: size.cols, rows: size.rows });
  });
  term.onData(function (data) { sendInput(encoder.encode(data)); });
  term.onBinary(function (data) {
    var bytes = new Uint8Array(data.length);
    for (var i = 0; i < data.length; i++) { bytes[i] = data.charCodeAt(i) & 0xff; }
    sendInput(bytes);
  });

  // Copy and paste: Ctrl+Shift+C / Ctrl+Insert copy the selection, Ctrl+Shift+V /
  // Shift+Insert paste (the browser's own paste event, which xterm.js takes).
  function copySelection() {
    var text = term.getSelection();
    if (text && navigator.clipboard) { navigator.clipboard.writeText(text).catch(function () {}); }
  }
  function pasteClipboard() {
    if (navigator.clipboard && navigator.clipboard.readText) {
      navigator.clipboard.readText().then(function (text) { term.paste(text); },
        function () { showNotice("The browser refused to read the clipboard: use Ctrl+Shift+V.", "info"); });
    }
    term.focus();
  }
  term.attachCustomKeyEventHandler(function (event) {
    if (event.type !== "keydown") { return true; }
    var ctrlShift = event.ctrlKey && event.shiftKey && !event.altKey;
    if ((ctrlShift && event.code === "KeyC") || (event.ctrlKey && event.key === "Insert")) {
      copySelection();
      event.preventDefault();
      return false;
    }
    if ((ctrlShift && event.code === "KeyV") || (event.shiftKey && event.key === "Insert")) {
      return false;  // the browser pastes into xterm.js's textarea
    }
    return true;
  });
  ui.copy.addEventListener("click", function () { copySelection(); term.focus(); });
  ui.paste.addEventListener("click", pasteClipboard);
  ui.takeover.addEventListener("click", function () {
    sendControl({ type: "takeover" });
    term.focus();
  });

  function showRole() {
    var text = api.rights === "view" ? "view only" :
      api.role === "writer" ? "you have the keyboard" : "watching";
    if (api.clients > 1) { text += " \u00b7 " + api.clients + " clients"; }
    ui.role.textContent = text;
    ui.takeover.hidden = !(api.rights === "full" && api.role !== "writer" && framedOpen());
  }

  function onControl(message) {
    if (message.type === "hello") {
      if (connections > 1) { term.reset(); }
      api.domain = message.domain;
      api.rights = message.rights;
      api.role = message.role;
      api.clients = message.clients;
      var name = (message.domain && (message.domain.name || message.domain.uuid)) || "";
      ui.domain.textContent = name + (message.device ? " \u00b7 " + message.device : "");
      document.title = name + " \u2014 serial console";
      if (message.recording) { ui.domain.textContent += " \u00b7 recorded"; }
      showNotice("");
    } else if (message.type === "role") {
      api.role = message.role;
      if (message.reason === "taken_over") {
        showNotice("Another client took the keyboard over: your keys are ignored now.", "info");
      } else if (message.role === "writer") {
        showNotice("");
      }
    } else if (message.type === "clients") {
      api.clients = message.count;
    } else if (message.type === "skipped") {
      term.reset();
      api.role = message.role;
      api.clients = message.clients;
      showNotice("This page fell behind the console: the screen was sent again.", "info");
    } else if (message.type === "error") {
      if (message.error === "not_writer") {
        showNotice("Another client has the keyboard: press \u201cTake over\u201d to type.", "info");
      } else if (message.error === "view_only") {
        showNotice("View only: your keys are not sent.", "info");
      } else {
        showNotice("The broker said: " + message.message);
      }
    }
    showRole();
  }

  function connect(token) {
    if (!token) {
      setState("closed", "no token");
      showNotice("This page has no console token: open a new console link.");
      ui.reconnect.hidden = false;
      return;
    }
    connections += 1;
    ui.reconnect.hidden = true;
    showNotice("");
    setState("connecting");
    api.closeCode = api.closeReason = null;
    socket = new WebSocket(websocketURL(token), [SUBPROTOCOL]);
    socket.binaryType = "arraybuffer";
    var current = socket;
    socket.onopen = function () {
      setState("connected");
      refit();
      sendControl({ type: "resize", cols: term.cols, rows: term.rows });
      term.focus();
      showRole();
    };
    socket.onmessage = function (event) {
      if (typeof event.data === "string") {
        try { onControl(JSON.parse(event.data)); } catch (e) { /* not ours */ }
      } else {
        term.write(new Uint8Array(event.data));
      }
    };
    socket.onclose = function (event) {
      if (current !== socket) { return; }
      var reason = event.reason || CLOSE_TEXT[event.code] || "connection closed";
      api.closeCode = event.code;
      api.closeReason = reason;
      setState("closed", "closed: " + reason);
      showNotice("Disconnected: " + reason + " (code " + event.code + ").");
      ui.takeover.hidden = true;
      ui.reconnect.hidden = false;
    };
  }

  ui.reconnectButton.addEventListener("click", function () {
    var token = tokenFromText(ui.link.value);
    ui.link.value = "";
    if (token) { connect(token); }
  });
  ui.link.addEventListener("keydown", function (event) {
    if (event.key === "Enter") { ui.reconnectButton.click(); }
  });
  window.addEventListener("hashchange", function () {
    var token = tokenFromLocation();
    if (token) {
      if (socket && socket.readyState <= WebSocket.OPEN) { socket.close(1000); }
      connect(token);
    }
  });
  if (window.ResizeObserver) {
    new ResizeObserver(refit).observe(ui.terminal);
  }
  window.addEventListener("resize", refit);
  refit();
  connect(tokenFromLocation());
}());
