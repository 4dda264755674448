// Presence and "Take control": who else is on this console, who has its keyboard and
// mouse, and the button that takes them over or gives them up. The page's session opens
// the console's own WebSocket; this module opens its control channel beside it,
// ../../ws/{protocol}/control?token=T with the page's token (docs/service.md, "The control
// channel"), once the session is connected, and shows what the broker says there, live.
// The broker enforces who types: a watching page's keys are dropped by the broker, not here.
//
// The same file serves the VNC and the SPICE page (each plugin ships its copy in web/; a
// test keeps them identical). The page's HTML holds the status (#presence), the buttons
// (#take-control, #viewers) and the panel (#presence-panel, #presence-list);
// window.consolePresence tells scripts and tests what the panel shows.

const $ = (id) => document.getElementById(id);

// How long to wait before opening the channel again after it closed while the session
// goes on (a network hiccup), in milliseconds; then it gives up.
const RETRIES = [500, 1000, 2000, 4000];

// A viewer as the panel names it: the token's name, else its address.
export function viewerLabel(viewer) {
    return viewer.name || `anonymous (${viewer.address})`;
}

// The clock time of an ISO timestamp, in the user's locale (hours and minutes).
function clockTime(iso) {
    const moment = new Date(iso);
    if (Number.isNaN(moment.getTime())) return iso;
    return moment.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
}

// What the status says, from a presence message and whether this page just lost the input
// (nothing in shared mode: everyone types, and the Viewers button counts them).
export function statusText(doc, lost) {
    if (doc.mode !== 'single') return '';
    if (doc.input) return 'You have the keyboard';
    const holder = doc.viewers.find((v) => v.id === doc.holder);
    if (holder) {
        const who = viewerLabel(holder);
        return lost ? `${who} took the keyboard: you are watching`
            : `Watching: ${who} has the keyboard`;
    }
    return 'Nobody has the keyboard';
}

// Wires the presence UI for *protocol* with the page's *token*. *onInput(may, state)* is
// called whenever this page's input right may have changed (the VNC page disables its key
// buttons while another viewer has the keyboard). Returns { start, stop }: start() when
// the session is connected, stop() when it ended.
export function setupPresence(protocol, token, onInput = () => {}) {
    const statusEl = $('presence');
    const take = $('take-control');
    const toggle = $('viewers');
    const panel = $('presence-panel');
    const list = $('presence-list');
    const state = window.consolePresence = {
        state: 'idle', you: null, mode: null, rights: null, input: null, holder: null,
        reason: null, viewers: [], lost: false, status: '', error: '',
    };
    let socket = null;
    let running = false;
    let attempt = 0;
    let timer = null;

    function render() {
        statusEl.textContent = state.status;
        statusEl.hidden = !state.status;
        statusEl.dataset.input = String(Boolean(state.input));
        toggle.hidden = state.state !== 'open';
        toggle.textContent = `Viewers (${state.viewers.length})`;
        const single = state.mode === 'single' && state.rights === 'full';
        take.hidden = !(single && state.state === 'open');
        take.textContent = state.input ? 'Release' : 'Take control';
        take.title = state.input ? 'Give the keyboard and mouse up: nobody has them then'
            : 'Take the keyboard and mouse over: the viewer who has them watches then';
        list.replaceChildren(...state.viewers.map((viewer) => {
            const item = document.createElement('li');
            item.dataset.id = viewer.id;
            const name = document.createElement('span');
            name.className = 'viewer-name';
            name.textContent = viewerLabel(viewer) + (viewer.you ? ' (you)' : '');
            const facts = document.createElement('span');
            facts.className = 'viewer-facts';
            const rights = viewer.rights === 'full' ? 'full control' : 'view only';
            facts.textContent = `${viewer.address}, ${rights}, ${viewer.protocol}, ` +
                `since ${clockTime(viewer.since)}`;
            item.append(name, facts);
            if (viewer.id === state.holder || (state.mode !== 'single' && viewer.input)) {
                const badge = document.createElement('span');
                badge.className = 'viewer-keyboard';
                badge.textContent = 'has the keyboard';
                item.append(badge);
            }
            return item;
        }));
    }

    function receive(doc) {
        if (doc.type === 'error') {
            state.error = `${doc.error}: ${doc.message}`;
            return;
        }
        if (doc.type !== 'presence') return;
        // Lost: this page had the input, and another viewer took it.
        const lost = state.input === true && doc.input === false && doc.holder !== null
            && doc.holder !== doc.you;
        Object.assign(state, {
            state: 'open', you: doc.you, mode: doc.mode, rights: doc.rights, input: doc.input,
            holder: doc.holder, reason: doc.reason, viewers: doc.viewers,
            lost: lost || (state.lost && doc.input === false && doc.holder !== null),
        });
        state.status = statusText(doc, state.lost);
        render();
        onInput(doc.input || (doc.mode === 'single' && doc.holder === null), state);
    }

    function open() {
        const url = new URL(`../../ws/${protocol}/control`, location.href);
        url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
        url.search = '?token=' + encodeURIComponent(token);
        state.state = 'connecting';
        socket = new WebSocket(url.href, ['console-broker.control.v1']);
        socket.addEventListener('open', () => { attempt = 0; });
        socket.addEventListener('message', (event) => {
            if (typeof event.data !== 'string') return;
            try {
                receive(JSON.parse(event.data));
            } catch {
                // not ours to break the page over
            }
        });
        socket.addEventListener('close', () => {
            socket = null;
            if (!running) return;
            state.state = 'closed';
            render();
            if (attempt < RETRIES.length) {
                timer = setTimeout(open, RETRIES[attempt++]);
            }
        });
    }

    function send(type) {
        if (socket && socket.readyState === WebSocket.OPEN) {
            socket.send(JSON.stringify({ type }));
        }
    }

    take.addEventListener('click', () => {
        state.lost = false;
        send(state.input ? 'release' : 'takeover');
    });
    toggle.addEventListener('click', () => {
        panel.hidden = !panel.hidden;
        toggle.setAttribute('aria-expanded', String(!panel.hidden));
    });

    return {
        start() {
            if (running) return;
            running = true;
            open();
        },
        stop() {
            running = false;
            clearTimeout(timer);
            if (socket) socket.close();
            Object.assign(state, { state: 'closed', status: '' });
            panel.hidden = true;
            toggle.setAttribute('aria-expanded', 'false');
            render();
            take.hidden = true;
            toggle.hidden = true;
        },
    };
}
