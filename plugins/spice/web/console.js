// The SPICE console page: spice-html5 connected to the broker's /ws/spice endpoint with
// the token from the page's URL. spice-html5 opens one WebSocket per channel with the same
// URL; the broker binds them to the session the main channel opened, applies the channel
// policy (view-only) and logs in to QEMU itself: the password the page sends is ignored.
import * as SpiceHtml5 from '../spice-html5/src/main.js';
import { setupHandoff } from './handoff.js';
import { setupPresence } from './presence.js';

// Close codes of the broker (docs/service.md) and what the user is told.
const CLOSE_MESSAGES = {
    1000: 'The session ended.',
    1001: 'The broker is shutting down.',
    1006: 'The connection to the broker was lost.',
    1011: 'The broker hit an internal error.',
    4000: 'The console request was malformed.',
    4001: 'The console link is not valid.',
    4002: 'The console link has expired: ask for a new one.',
    4003: 'The console link is not valid yet (clock skew?).',
    4004: 'The console link was used already: ask for a new one.',
    4005: 'The console link is for another broker node.',
    4006: 'The console link is for another protocol.',
    4007: 'This page\'s origin may not open consoles.',
    4008: 'No plugin serves SPICE on this broker.',
    4009: 'View-only sessions are not available for SPICE here.',
    4010: 'The VM is unknown.',
    4011: 'SPICE is not enabled on this VM.',
    4012: 'The VM is not running.',
    4013: 'The console is busy.',
    4014: 'Too many sessions: try again later.',
    4015: 'The hypervisor is unavailable.',
    4016: 'The VM\'s SPICE server cannot be reached.',
    4100: 'The VM stopped.',
    4101: 'The VM was undefined.',
    4102: 'The session was idle for too long.',
    4103: 'The broker lost its connection to the hypervisor.',
    4104: 'The session ended: the browser sent a message the broker cannot check.',
    4105: 'The session ended: the VM\'s SPICE server broke the protocol.',
    4106: 'The broker could not log in to the VM\'s SPICE server.',
    4107: 'The broker refused a channel of this session (its policy).',
    4108: 'The session was closed: this browser stopped reading what the VM sent.',
    4109: 'An operator ended this session.',
};

const body = document.body;
const stateEl = document.getElementById('state');
const endEl = document.getElementById('end');

function setState(state, text) {
    body.dataset.state = state;
    stateEl.textContent = text;
}

function showEnd(text) {
    endEl.textContent = text;
    endEl.hidden = false;
}

function tokenClaims(token) {
    try {
        const payload = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
        return JSON.parse(atob(payload));
    } catch (e) {
        return {};
    }
}

function start() {
    const token = new URLSearchParams(location.search).get('token');
    if (!token) {
        setState('disconnected', 'No token');
        showEnd('This page needs a console link with a token (console-broker token ... ' +
                '--protocol spice).');
        return;
    }
    const url = new URL('../../ws/spice', location.href);
    url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
    url.search = '?token=' + encodeURIComponent(token);
    history.replaceState(null, '', location.pathname);
    const claims = tokenClaims(token);
    document.getElementById('view-only').hidden = claims.rights !== 'view';
    setState('connecting', 'Connecting\u2026');
    let ended = false;
    let sc;
    const ctrlAltDel = document.getElementById('ctrl-alt-del');
    // "Open in native client": a handoff handle for this session, while it is connected.
    const handoff = setupHandoff('spice', token);
    // Who else is on this console and who has the keyboard (the control channel). While
    // another viewer has it, Ctrl+Alt+Del is off: the broker would drop its keys.
    let connected = false;
    const presence = setupPresence('spice', token, (mayInput) => {
        if (connected && claims.rights !== 'view') ctrlAltDel.disabled = !mayInput;
    });
    try {
        sc = new SpiceHtml5.SpiceMainConn({
            uri: url.href,
            screen_id: 'spice-screen',
            dump_id: 'debug-div',
            message_id: 'message-div',
            password: '',
            onerror: (e) => {
                if (!ended) {
                    connected = false;
                    handoff(false);
                    presence.stop();
                    setState('disconnected', 'Disconnected');
                    showEnd(e && e.message ? e.message : 'The connection failed.');
                }
            },
            onsuccess: () => {
                setState('connected', 'Connected');
                ctrlAltDel.disabled = claims.rights === 'view';
                connected = true;
                handoff(true);
                presence.start();
            },
            onagent: () => {},
        });
    } catch (e) {
        setState('disconnected', 'Disconnected');
        showEnd(String(e));
        return;
    }
    window.spiceConnection = sc;
    sc.ws.addEventListener('close', (event) => {
        ended = true;
        connected = false;
        handoff(false);
        presence.stop();
        const text = CLOSE_MESSAGES[event.code] || ('Closed (' + event.code + ').');
        setState('disconnected', 'Disconnected');
        showEnd(event.reason ? text + ' (' + event.reason + ')' : text);
        document.body.dataset.closeCode = String(event.code);
    });
    ctrlAltDel.addEventListener('click', () => SpiceHtml5.sendCtrlAltDel(sc));
}

start();
