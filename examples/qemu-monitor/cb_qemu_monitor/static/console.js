// The QEMU monitor page of console-broker-qemu-monitor: HMP command lines over the
// broker's WebSocket. The protocol (text messages: a command line out, a JSON answer
// in) is in the distribution's README.md.
(function () {
  "use strict";

  var SUBPROTOCOL = "console-broker.monitor.v1";
  // Close codes (console-broker's docs/service.md, and this plugin's own), for closes
  // that carry no reason text.
  var CLOSE_TEXT = {
    1000: "console closed",
    1001: "broker shutting down",
    1006: "connection lost",
    1009: "message too big",
    1011: "internal error",
    4001: "invalid token",
    4002: "token expired",
    4003: "token not valid yet",
    4004: "token already used",
    4006: "token is for another protocol",
    4007: "origin not allowed",
    4008: "no plugin serves this protocol",
    4010: "unknown domain",
    4012: "VM not running",
    4014: "session limit reached",
    4015: "hypervisor unavailable",
    4100: "VM stopped",
    4101: "domain undefined",
    4102: "idle timeout",
    4103: "hypervisor connection lost",
    4104: "the client sent a message the broker cannot check",
    4108: "the client stopped reading",
    4301: "a view-only session may not run this command"
  };

  var $ = function (id) { return document.getElementById(id); };
  var ui = {
    domain: $("domain"), state: $("state"), rights: $("rights"), notice: $("notice"),
    log: $("log"), prompt: $("prompt"), command: $("command"), run: $("run")
  };
  // What the page knows, for scripts and tests.
  var api = { state: "connecting", domain: null, viewOnly: null, commands: null,
              answers: [], closeCode: null, closeReason: null };
  window.consoleBroker = api;

  function setState(state, text) {
    api.state = state;
    ui.state.className = "state-" + state;
    ui.state.textContent = text || state;
  }

  function showNotice(text) {
    ui.notice.textContent = text;
    ui.notice.hidden = !text;
  }

  function setEnabled(enabled) {
    ui.command.disabled = !enabled;
    ui.run.disabled = !enabled;
  }

  // The token: from ?token= (the URL `console-broker token` prints) or #token= (a
  // control plane embedding the page can hand one over without a reload). It leaves the
  // address bar at once: it is single use, and the URL is history.
  function tokenFromLocation() {
    var query = new URLSearchParams(window.location.search).get("token");
    var hash = new URLSearchParams(window.location.hash.replace(/^#/, "")).get("token");
    if (query || hash) {
      window.history.replaceState(null, "", window.location.pathname);
    }
    return hash || query;
  }

  function websocketURL(token) {
    var scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    // The page lives at {prefix}/console/monitor/; the session at {prefix}/ws/monitor.
    var prefix = window.location.pathname.replace(/\/console\/monitor\/.*$/, "");
    return scheme + "//" + window.location.host + prefix + "/ws/monitor?token=" +
      encodeURIComponent(token);
  }

  // Commands sent and not answered yet: the broker answers them in order.
  var pending = [];
  var history = [];
  var historyAt = 0;

  function element(tag, className, text) {
    var el = document.createElement(tag);
    if (className) { el.className = className; }
    if (text !== undefined) { el.textContent = text; }
    return el;
  }

  function scrollDown() { ui.log.scrollTop = ui.log.scrollHeight; }

  function addEntry(line) {
    var entry = element("section", "entry");
    entry.appendChild(element("div", "command", line));
    ui.log.appendChild(entry);
    scrollDown();
    return entry;
  }

  function onAnswer(message) {
    api.answers.push(message);
    var entry = pending.shift() || addEntry(message.command);
    if (message.type === "output") {
      entry.appendChild(element("pre", "output", message.output));
      if (message.truncated) {
        entry.appendChild(element("div", "cut", "(output cut: the broker sends at most " +
          message.output.length + " characters)"));
      }
    } else {
      entry.appendChild(element("pre", "error", message.error));
    }
    scrollDown();
  }

  function onHello(message) {
    api.domain = message.domain;
    api.viewOnly = message.view_only;
    api.commands = message.commands;
    ui.domain.textContent = message.domain || "QEMU monitor";
    document.title = (message.domain ? message.domain + " \u2014 " : "") + "QEMU monitor";
    ui.rights.textContent = message.view_only
      ? "view only: " + (message.commands || []).join(", ")
      : "full access";
  }

  var socket = null;

  function connect(token) {
    if (!token) {
      setState("closed", "no token");
      showNotice("This page has no console token: open a new console link.");
      return;
    }
    showNotice("");
    setState("connecting");
    api.closeCode = api.closeReason = null;
    pending = [];
    socket = new WebSocket(websocketURL(token), [SUBPROTOCOL]);
    var current = socket;
    socket.onopen = function () {
      setState("connected");
      setEnabled(true);
      ui.command.focus();
    };
    socket.onmessage = function (event) {
      if (typeof event.data !== "string") { return; }
      var message;
      try { message = JSON.parse(event.data); } catch (e) { return; }
      if (message.type === "hello") {
        onHello(message);
      } else if (message.type === "output" || message.type === "error") {
        onAnswer(message);
      }
    };
    socket.onclose = function (event) {
      if (current !== socket) { return; }
      var reason = event.reason || CLOSE_TEXT[event.code] || "connection closed";
      api.closeCode = event.code;
      api.closeReason = reason;
      setState("closed", "closed: " + reason);
      showNotice("Disconnected: " + reason + " (code " + event.code + ").");
      setEnabled(false);
    };
  }

  ui.prompt.addEventListener("submit", function (event) {
    event.preventDefault();
    var line = ui.command.value.trim();
    if (!line || !socket || socket.readyState !== WebSocket.OPEN) { return; }
    socket.send(line);
    pending.push(addEntry(line));
    if (history[history.length - 1] !== line) { history.push(line); }
    historyAt = history.length;
    ui.command.value = "";
  });
  ui.command.addEventListener("keydown", function (event) {
    if (event.key === "ArrowUp" && historyAt > 0) {
      historyAt -= 1;
    } else if (event.key === "ArrowDown" && historyAt < history.length) {
      historyAt += 1;
    } else {
      return;
    }
    ui.command.value = history[historyAt] || "";
    event.preventDefault();
  });
  window.addEventListener("hashchange", function () {
    var token = tokenFromLocation();
    if (token) {
      if (socket && socket.readyState <= WebSocket.OPEN) { socket.close(1000); }
      connect(token);
    }
  });
  connect(tokenFromLocation());
}());
