// "Open in native client": the page asks the broker for a handoff handle for its own live
// session (POST ../../handoff/{protocol}, the page's token in the Authorization header, so
// that no proxy logs it) and shows the `console-broker open` command that uses it, built
// from this page's own address (the front door's, in a cluster). The handle is single use
// and short lived (docs/tokens.md, "Handoff handles"); each click asks for a new one.
//
// The same file serves the VNC and the SPICE page (each plugin ships its copy in web/; a
// test keeps them identical). The page's HTML holds the button (#native) and the dialog
// (#native-dialog and its parts); window.consoleHandoff tells scripts and tests what the
// dialog shows.

const $ = (id) => document.getElementById(id);

// What the user reads when the broker refuses, by HTTP status.
const REFUSALS = {
    401: 'The broker no longer accepts this page\'s link for its session (the session ' +
         'ended?). Open the console again with a new link.',
    403: 'The broker refused: this page may not ask for a link.',
    404: 'This broker does not hand consoles over to native clients.',
    421: 'This console link is for another hypervisor.',
    429: 'Enough links are waiting to be used for this session: use one, or wait a minute.',
    503: 'The console broker is shutting down.',
};

// *text* as one shell word (POSIX single quotes).
export function shellQuote(text) {
    return '\'' + text.replace(/'/g, '\'\\\'\'') + '\'';
}

// The command that opens this page's console, with *handle*, in a native client.
export function openCommand(handle) {
    const page = new URL(location.pathname, location.href);
    page.search = '?token=' + encodeURIComponent(handle);
    page.hash = '';
    return 'console-broker open ' + shellQuote(page.href);
}

// Wires the button and the dialog for *protocol* with the page's *token*; *onClose* runs
// when the dialog closes (the VNC page gives the keyboard back to the VM's screen).
// Returns setEnabled(on): the button is usable only while the session is connected.
export function setupHandoff(protocol, token, onClose = () => {}) {
    const button = $('native');
    const dialog = $('native-dialog');
    const status = $('native-status');
    const ready = $('native-ready');
    const command = $('native-command');
    const note = $('native-note');
    const copy = $('native-copy');
    const state = window.consoleHandoff = {
        state: 'idle', command: '', expiresIn: null, error: '', copied: false,
    };
    let asked = 0;

    function show(text) {
        status.textContent = text;
        status.hidden = !text;
    }

    function fail(text) {
        state.state = 'failed';
        state.error = text;
        show(text);
    }

    async function ask() {
        const mine = ++asked;
        Object.assign(state, { state: 'asking', command: '', expiresIn: null, error: '',
                               copied: false });
        ready.hidden = true;
        copy.disabled = true;
        command.value = '';
        show('Asking the broker for a link\u2026');
        if (!dialog.open) dialog.showModal();
        let reply;
        let body = '';
        try {
            reply = await fetch(new URL('../../handoff/' + protocol, location.href), {
                method: 'POST',
                headers: { Authorization: 'Bearer ' + token },
                cache: 'no-store',
                credentials: 'omit',
                redirect: 'error',
            });
            body = reply.ok ? await reply.json() : (await reply.text()).trim();
        } catch {
            if (mine === asked) fail('The broker could not be reached.');
            return;
        }
        if (mine !== asked) return;  // closed, or asked again, meanwhile
        if (!reply.ok) {
            const why = REFUSALS[reply.status] || 'The broker refused.';
            fail(`${why} (${reply.status}${body ? ': ' + body : ''})`);
            return;
        }
        const text = openCommand(body.token);
        Object.assign(state, { state: 'ready', command: text, expiresIn: body.expires_in });
        command.value = text;
        const until = new Date(Date.now() + body.expires_in * 1000).toLocaleTimeString();
        note.textContent = `Single use, valid ${body.expires_in} s (until ${until}). ` +
            'Needs console-broker on this computer (docs/native.md).';
        show('');
        ready.hidden = false;
        copy.disabled = false;
        command.focus();
        command.select();
    }

    copy.addEventListener('click', async () => {
        command.focus();
        command.select();
        try {
            await navigator.clipboard.writeText(command.value);
            state.copied = true;
        } catch {
            // No clipboard API (not a secure context, or refused): the selection's copy.
            state.copied = document.execCommand('copy');
        }
        show(state.copied ? 'Copied. Paste it into a terminal on this computer.'
                          : 'Select the command and copy it (Ctrl+C).');
    });
    $('native-close').addEventListener('click', () => dialog.close());
    dialog.addEventListener('close', () => {
        asked++;  // an answer still on its way is dropped
        command.value = '';  // the handle leaves the page with the dialog
        state.state = 'idle';
        state.command = '';
        onClose();
    });
    button.addEventListener('click', ask);
    return (on) => {
        button.disabled = !on;
        if (!on && dialog.open && state.state !== 'ready') dialog.close();
    };
}
