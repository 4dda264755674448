// The operator page (docs/operations.md, "The operator page"): the node's domains, their
// state, enabled consoles and live sessions; a console opens in a new tab in one click,
// with a token the broker mints for it over the page's operator session.
//
// The operator token in the page's query is used once, to open /operator/ws; it leaves
// the address bar at once. Everything after goes over that WebSocket (JSON text frames).
(() => {
  'use strict';

  const REFRESH_MS = 5000;
  const status = window.consoleBroker = {
    state: 'connecting', node: null, name: null, protocols: [], domains: [],
    opened: [], errors: [], closeCode: null, closeReason: null,
  };
  const $ = (id) => document.getElementById(id);
  const body = document.body;

  function setState(state, text) {
    status.state = state;
    body.dataset.state = state;
    $('state').textContent = text;
  }

  function notice(text) {
    const element = $('notice');
    element.textContent = text;
    element.hidden = !text;
  }

  function cell(row, content, className) {
    const td = document.createElement('td');
    if (className) td.className = className;
    if (typeof content === 'string') td.textContent = content;
    else if (content) td.appendChild(content);
    row.appendChild(td);
    return td;
  }

  const params = new URLSearchParams(window.location.search);
  const token = params.get('token') || '';
  if (token) {
    // Single use: keep it out of the history and of anything copied from the address bar.
    window.history.replaceState(null, '', window.location.pathname);
  }

  let socket = null;
  let nextId = 1;
  // Requests waiting for their answer: id -> {kind, window, domain, protocol}.
  const waiting = new Map();
  let timer = null;

  function send(doc) {
    if (!socket || socket.readyState !== WebSocket.OPEN) return null;
    const id = nextId++;
    socket.send(JSON.stringify({ ...doc, id }));
    return id;
  }

  function refresh() {
    const id = send({ type: 'domains' });
    if (id !== null) waiting.set(id, { kind: 'domains' });
  }

  function protocolTitle(name) {
    const found = status.protocols.find((p) => p.name === name);
    return found ? found.title : name;
  }

  function openConsole(domain, protocol) {
    notice('');
    // A window opened in the click itself: pop-up blockers let it through; it is sent
    // to the console's page once the broker has minted its token.
    const opened = window.open('', '_blank');
    if (opened) {
      opened.document.title = `Opening ${protocol} of ${domain.name}…`;
      opened.document.body.textContent = `Opening the ${protocolTitle(protocol)} console of ${domain.name}…`;
    }
    const viewOnly = $('view-only').checked;
    const id = send({ type: 'open', domain: domain.uuid, protocol, view_only: viewOnly });
    if (id === null) {
      if (opened) opened.close();
      notice('The operator session has ended: this page cannot open consoles any more.');
      return;
    }
    waiting.set(id, { kind: 'open', window: opened, domain, protocol });
  }

  function sessionList(sessions) {
    if (!sessions.length) {
      const none = document.createElement('span');
      none.className = 'none';
      none.textContent = 'none';
      return none;
    }
    const list = document.createElement('ul');
    list.className = 'sessions';
    for (const session of sessions) {
      const item = document.createElement('li');
      const who = session.name || 'anonymous';
      const rights = session.rights === 'view' ? 'view only' : 'full control';
      item.textContent = `${session.protocol}: ${who} (${rights}) from ${session.client}, since ${session.started}`;
      item.dataset.session = session.id;
      list.appendChild(item);
    }
    return list;
  }

  let drawn = null;

  function render(domains) {
    status.domains = domains;
    $('listed').textContent = `listed ${new Date().toLocaleTimeString()}`;
    const shape = JSON.stringify(domains);
    if (shape === drawn) return; // unchanged: the buttons stay where they are
    drawn = shape;
    const tbody = $('domains').querySelector('tbody');
    tbody.textContent = '';
    for (const domain of domains) {
      const row = document.createElement('tr');
      row.dataset.uuid = domain.uuid;
      row.dataset.name = domain.name;
      const name = document.createElement('span');
      name.className = 'name';
      name.textContent = domain.name;
      const id = document.createElement('span');
      id.className = 'uuid';
      id.textContent = domain.uuid;
      const who = cell(row, name);
      who.appendChild(id);
      cell(row, domain.state, `state state-${domain.state.replace(/\s+/g, '-')}`);
      const consoles = cell(row, null, 'consoles');
      if (!domain.consoles.length) {
        const none = document.createElement('span');
        none.className = 'none';
        none.textContent = 'none enabled';
        consoles.appendChild(none);
      }
      for (const protocol of domain.consoles) {
        const button = document.createElement('button');
        button.type = 'button';
        button.className = 'console';
        button.dataset.protocol = protocol;
        button.textContent = protocolTitle(protocol);
        button.disabled = !domain.running || !status.minting;
        button.title = !domain.running ? `${domain.name} is ${domain.state}`
          : !status.minting ? 'this broker mints no console tokens' : `open ${protocol} in a new tab`;
        button.addEventListener('click', () => openConsole(domain, protocol));
        consoles.appendChild(button);
      }
      cell(row, sessionList(domain.sessions), 'sessions');
      tbody.appendChild(row);
    }
    $('empty').hidden = domains.length > 0;
  }

  function opened(request, answer) {
    const entry = { domain: answer.domain.name, protocol: answer.protocol,
      viewOnly: answer.view_only, page: answer.page };
    status.opened.push(entry);
    const item = document.createElement('li');
    const link = document.createElement('a');
    link.href = answer.page;
    link.target = '_blank';
    link.rel = 'noopener noreferrer';
    link.textContent = `${answer.protocol} of ${answer.domain.name}${answer.view_only ? ' (view only)' : ''}`;
    item.appendChild(link);
    item.appendChild(document.createTextNode(
      request.window ? ' (opened in a new tab; the link is single use)'
        : ' (pop-ups are blocked here: click the link, once, before it expires at '
          + `${answer.expires_at})`));
    $('opened').prepend(item);
    $('opened-section').hidden = false;
    if (request.window) {
      request.window.opener = null;
      request.window.location.href = answer.page;
    }
    window.setTimeout(refresh, 2000);
  }

  function failed(request, answer) {
    status.errors.push(answer);
    if (request && request.window) request.window.close();
    const what = request && request.kind === 'open'
      ? `Cannot open ${request.protocol} of ${request.domain.name}: ` : '';
    notice(`${what}${answer.message} (${answer.error})`);
  }

  function onMessage(event) {
    let answer;
    try {
      answer = JSON.parse(event.data);
    } catch (e) {
      return;
    }
    const request = waiting.get(answer.id);
    waiting.delete(answer.id);
    if (answer.type === 'hello') {
      status.node = answer.node;
      status.name = answer.name;
      status.protocols = answer.protocols;
      status.minting = answer.minting;
      $('node').textContent = answer.node;
      document.title = `Operator page: ${answer.node}`;
      $('who').textContent = `Signed in as ${answer.name || 'an operator (the token names nobody)'}`
        + `; the session lasts until ${answer.expires_at} at most.`;
      if (!answer.minting) {
        notice('This broker does not mint console tokens (it trusts a control plane\'s '
          + 'key only): the list is shown, consoles are opened with the control plane\'s links.');
      }
      setState('connected', 'Connected: the list refreshes every few seconds.');
      $('refresh').disabled = false;
      refresh();
      timer = window.setInterval(refresh, REFRESH_MS);
    } else if (answer.type === 'domains') {
      render(answer.domains);
    } else if (answer.type === 'opened') {
      opened(request || {}, answer);
    } else if (answer.type === 'error') {
      if (answer.error === 'rate_limited' && request && request.kind === 'domains') return;
      failed(request, answer);
    }
  }

  function onClose(event) {
    if (timer !== null) window.clearInterval(timer);
    status.closeCode = event.code;
    status.closeReason = event.reason;
    $('refresh').disabled = true;
    for (const button of document.querySelectorAll('button.console')) button.disabled = true;
    const was = status.state;
    const why = event.reason || (was === 'connecting'
      ? 'the broker refused the operator token: used already, expired, or not an operator token'
      : 'the connection was lost');
    setState('closed', 'Disconnected.');
    notice(`The operator session has ended (${why}). An operator token is single use: run `
      + '"console-broker token --operator" on the node and open the new link to renew it.');
  }

  if (!token) {
    setState('closed', 'No operator token.');
    notice('This page needs an operator token: run "console-broker token --operator" on the '
      + 'node and open the link it prints.');
    return;
  }
  const url = new URL('ws', window.location.href);
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  url.search = new URLSearchParams({ token }).toString();
  socket = new WebSocket(url.toString(), ['console-broker.operator.v1']);
  socket.addEventListener('message', onMessage);
  socket.addEventListener('close', onClose);
  $('refresh').addEventListener('click', refresh);
})();
