// The VNC console page: noVNC connected to the broker's /ws/vnc endpoint with the token
// this page's URL carries. The broker speaks RFB 3.8 with security None to the page (the
// token authenticated the user) and enforces view-only itself; the page only mirrors it.
import RFB from '../novnc/core/rfb.js';
import KeyTable from '../novnc/core/input/keysym.js';
import { setupHandoff } from './handoff.js';
import { setupPresence } from './presence.js';

// What the user reads for each WebSocket close code (the broker's table: docs/service.md,
// "Refusals and close codes"; a test keeps this list complete).
const CLOSE_MESSAGES = {
    1000: 'The console was closed.',
    1001: 'The console broker is shutting down. Open the console again in a moment.',
    1006: 'The connection was refused or lost. The link may have expired or been used ' +
          'already: each console link opens one session. Ask for a new link.',
    1009: 'The browser sent a message larger than the broker accepts.',
    1011: 'The console broker hit an internal error.',
    4000: 'The console request was malformed.',
    4001: 'This console link is not valid.',
    4002: 'This console link has expired. Ask for a new one.',
    4003: 'This console link is not valid yet: check the clocks of this computer and the server.',
    4004: 'This console link was already used: each link opens one session. Ask for a new one.',
    4005: 'This console link is for another hypervisor.',
    4006: 'This console link is for another kind of console.',
    4007: 'This page may not open consoles (its origin is not allowed).',
    4008: 'The broker has no plugin for this kind of console.',
    4009: 'View-only sessions are not available for this console: its mode passes VNC ' +
          'through without the broker\'s checks.',
    4010: 'The VM does not exist.',
    4011: 'The VM\'s VNC console is not enabled.',
    4012: 'The VM is not running.',
    4013: 'The console is busy.',
    4014: 'Too many console sessions are open. Close one and try again.',
    4015: 'The hypervisor is unavailable. Try again in a moment.',
    4016: 'The VM\'s display could not be reached.',
    4100: 'The VM stopped.',
    4101: 'The VM was deleted.',
    4102: 'The session was closed because it was idle.',
    4103: 'The broker lost its connection to the hypervisor.',
    4104: 'The session ended: the browser sent a message the broker cannot check.',
    4105: 'The session ended: the VM\'s VNC server broke the protocol.',
    4106: 'The broker could not log in to the VM\'s VNC server (its password or TLS settings).',
    4107: 'The broker refused a channel of this session (its policy).',
    4108: 'The session was closed: this browser stopped reading what the VM sent.',
    4109: 'An operator ended this session.',
};

// The close code of a session an operator ended (console-broker sessions end); its reason
// carries the operator's words.
const OPERATOR_ENDED = 4109;

// Key combinations of the "Keys" menu (its buttons' data-combo) and the Ctrl+Alt+Del
// button: [keysym name, KeyboardEvent.code] pressed in order, released in reverse.
const COMBOS = {
    'ctrl-alt-del': [['XK_Control_L', 'ControlLeft'], ['XK_Alt_L', 'AltLeft'], ['XK_Delete', 'Delete']],
    'ctrl-alt-backspace': [['XK_Control_L', 'ControlLeft'], ['XK_Alt_L', 'AltLeft'],
                           ['XK_BackSpace', 'Backspace']],
    'ctrl-alt-f1': [['XK_Control_L', 'ControlLeft'], ['XK_Alt_L', 'AltLeft'], ['XK_F1', 'F1']],
    'ctrl-alt-f2': [['XK_Control_L', 'ControlLeft'], ['XK_Alt_L', 'AltLeft'], ['XK_F2', 'F2']],
    'ctrl-alt-f3': [['XK_Control_L', 'ControlLeft'], ['XK_Alt_L', 'AltLeft'], ['XK_F3', 'F3']],
    'ctrl-alt-f7': [['XK_Control_L', 'ControlLeft'], ['XK_Alt_L', 'AltLeft'], ['XK_F7', 'F7']],
    'alt-tab': [['XK_Alt_L', 'AltLeft'], ['XK_Tab', 'Tab']],
    'alt-f4': [['XK_Alt_L', 'AltLeft'], ['XK_F4', 'F4']],
    'escape': [['XK_Escape', 'Escape']],
    'tab': [['XK_Tab', 'Tab']],
    'print': [['XK_Print', 'PrintScreen']],
    'alt-sysrq': [['XK_Alt_L', 'AltLeft'], ['XK_Sys_Req', 'PrintScreen']],
    'super': [['XK_Super_L', 'MetaLeft']],
};

const $ = (id) => document.getElementById(id);
const controls = ['ctrl-alt-del', 'keys', 'clipboard-send'];

// What a test (or a curious user in the developer tools) can read.
const status = window.consoleStatus = {
    state: 'loading', code: null, reason: '', message: '', viewOnly: false, name: '',
};

function setState(state, text) {
    status.state = state;
    document.body.dataset.state = state;
    $('state').textContent = text;
}

const keysMenu = $('keys-menu');

function setKeysMenu(open) {
    keysMenu.hidden = !open;
    $('keys').setAttribute('aria-expanded', String(open));
}

function showEnd(message, detail) {
    status.message = message;
    $('message-text').textContent = message;
    $('message-detail').textContent = detail || '';
    $('message').hidden = false;
    for (const id of controls) $(id).disabled = true;
    setKeysMenu(false);
}

// The token's claims, for the page's own display only (the broker enforces them).
function tokenClaims(token) {
    try {
        const payload = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
        return JSON.parse(atob(payload + '='.repeat((4 - payload.length % 4) % 4)));
    } catch {
        return {};
    }
}

function closeMessage(event, securityReason) {
    if (!event) return ['The connection ended.', ''];
    const detail = `close code ${event.code}` + (event.reason ? `: ${event.reason}` : '');
    let message = CLOSE_MESSAGES[event.code];
    if (event.code === OPERATOR_ENDED) {
        // The broker's reason: "ended by an operator", then the operator's own words.
        const words = event.reason.replace(/^ended by an operator:?\s*/, '');
        if (words) message = `An operator ended this session: ${words}`;
    }
    if (!message) {
        message = event.reason ? `The session ended: ${event.reason}.` : 'The session ended.';
    }
    if (securityReason) message += ` (${securityReason})`;
    return [message, detail];
}

function start() {
    const token = new URLSearchParams(location.search).get('token');
    if (!token) {
        setState('disconnected', 'No token');
        showEnd('This page needs a console link with a token (console-broker token ... ' +
                '--protocol vnc prints one).');
        return;
    }
    const url = new URL('../../ws/vnc', location.href);
    url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
    url.search = '?token=' + encodeURIComponent(token);
    // The token is single-use: keep it out of the address bar, history and screenshots.
    history.replaceState(null, '', location.pathname);

    const claims = tokenClaims(token);
    status.viewOnly = claims.rights === 'view';
    $('view-only').hidden = !status.viewOnly;
    if (status.viewOnly) {
        // noVNC in view-only mode ignores the VM's clipboard, and the broker drops what
        // the page would send: the clipboard box could only mislead.
        $('clipboard-toggle').disabled = true;
        $('clipboard-toggle').title = 'The clipboard is not available in view-only sessions';
    }

    let closeEvent = null;
    let securityReason = '';
    const socket = new WebSocket(url.href, ['binary']);
    socket.addEventListener('close', (event) => {
        closeEvent = event;
        status.code = event.code;
        status.reason = event.reason;
    });

    setState('connecting', 'Connecting\u2026');
    const rfb = new RFB($('screen'), socket, { shared: true });
    // "Open in native client": a handoff handle for this session, while it is connected.
    const handoff = setupHandoff('vnc', token, () => rfb.focus());
    // Who else is on this console and who has the keyboard (the control channel). While
    // another viewer has it, the key buttons are off: the broker would drop their keys.
    let connected = false;
    const presence = setupPresence('vnc', token, (mayInput) => {
        if (!connected || status.viewOnly) return;
        for (const id of controls) $(id).disabled = !mayInput;
    });
    window.consoleRFB = rfb;
    rfb.viewOnly = status.viewOnly;
    rfb.scaleViewport = $('scale').checked;
    rfb.background = '#111';

    rfb.addEventListener('connect', () => {
        setState('connected', 'Connected');
        connected = true;
        handoff(true);
        presence.start();
        if (!status.viewOnly) {
            for (const id of controls) $(id).disabled = false;
        }
        rfb.focus();
    });
    rfb.addEventListener('securityfailure', (event) => {
        securityReason = event.detail.reason || '';
    });
    // Only in websocket mode, where the browser speaks to QEMU's own VNC server: the
    // page never asks for a VM's password (a client holds no VM secret).
    rfb.addEventListener('credentialsrequired', () => {
        securityReason = 'the VM\'s VNC server asks for a password, which this page does ' +
                         'not handle: use the broker\'s fd or tcp mode for this VM';
        rfb.disconnect();
    });
    rfb.addEventListener('disconnect', () => {
        // The socket's close event carries the broker's reason; let it arrive first.
        connected = false;
        setTimeout(() => {
            handoff(false);
            presence.stop();
            setState('disconnected', 'Disconnected');
            const [message, detail] = closeMessage(closeEvent, securityReason);
            showEnd(message, detail);
        }, 0);
    });
    rfb.addEventListener('desktopname', (event) => {
        status.name = event.detail.name;
        $('name').textContent = event.detail.name;
        document.title = `${event.detail.name} \u2013 VNC console`;
    });
    rfb.addEventListener('clipboard', (event) => {
        $('clipboard-text').value = event.detail.text;
    });

    const sendCombo = (keys) => {
        for (const [name, code] of keys) rfb.sendKey(KeyTable[name], code, true);
        for (const [name, code] of [...keys].reverse()) rfb.sendKey(KeyTable[name], code, false);
        rfb.focus();
    };
    $('ctrl-alt-del').addEventListener('click', () => sendCombo(COMBOS['ctrl-alt-del']));
    // The Keys menu: a button opening a list of buttons, so that a combination is sent
    // only when chosen (a <select> sends one per arrow key: Chrome fires its change
    // event as the keyboard moves through the options).
    $('keys').addEventListener('click', () => {
        const open = keysMenu.hidden;
        setKeysMenu(open);
        if (open) keysMenu.querySelector('button').focus();
    });
    keysMenu.addEventListener('click', (event) => {
        const combo = COMBOS[event.target.dataset.combo];
        if (!combo) return;
        setKeysMenu(false);
        sendCombo(combo);
    });
    keysMenu.addEventListener('keydown', (event) => {
        if (event.key !== 'Escape') return;
        setKeysMenu(false);
        $('keys').focus();
    });
    document.addEventListener('pointerdown', (event) => {
        if (!event.target.closest('.menu')) setKeysMenu(false);
    }, true);
    // The bar's controls hand the keyboard back to the VM's screen, or the next key
    // would go to the control (Space would toggle it again) instead of the VM.
    $('scale').addEventListener('change', (event) => {
        rfb.scaleViewport = event.target.checked;
        rfb.clipViewport = false;
        rfb.focus();
    });
    $('clipboard-toggle').addEventListener('click', (event) => {
        const panel = $('clipboard');
        panel.hidden = !panel.hidden;
        event.target.setAttribute('aria-expanded', String(!panel.hidden));
    });
    $('clipboard-send').addEventListener('click', () => {
        rfb.clipboardPasteFrom($('clipboard-text').value);
        rfb.focus();
    });
    $('fullscreen').addEventListener('click', () => {
        if (document.fullscreenElement) {
            document.exitFullscreen();
        } else {
            document.documentElement.requestFullscreen().catch(() => {});
        }
        rfb.focus();
    });
    document.addEventListener('fullscreenchange', () => {
        $('fullscreen').textContent = document.fullscreenElement ? 'Leave full screen' : 'Full screen';
    });
}

start();
