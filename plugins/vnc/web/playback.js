// The VNC recording player: plays a recording of a VNC session (docs/vnc.md, Playback)
// with noVNC's own RFB client, fed from the recording instead of a WebSocket.
//
// The page is opened with a recording token (console-broker token --recording ID):
// it fetches the recording's index and then each of its parts from the broker
// (../../../recording?token=T, &part=N), parses them (JSON lines: [t, "o", base64] is
// what the session's client was sent), and hands the frames to an RFB client through
// a channel object that looks like a WebSocket to noVNC, as noVNC's own player does
// (its tests/playback.js). The recording starts with the broker's handshake, security
// None: no password is asked. What the player sends back goes nowhere.
//
// Playing follows the recording's clock at 1x or 4x. Seeking forward feeds the frames
// up to that time at once; seeking back starts a new RFB client and feeds the frames
// from the start (an RFB stream is decoded from its beginning).

import RFB from '../novnc/core/rfb.js';

const $ = (id) => document.getElementById(id);

// What scripts and tests read: the page's state and the recording's.
const status = window.playback = {
    state: 'loading',   // loading, ready, playing, paused, ended, error
    position: 0,        // seconds on the recording's clock
    duration: 0,
    speed: 1,
    frames: 0,          // frames to the client
    fed: 0,             // frames fed so far
    parts: 0,
    recording: null,
    domain: null,
    end: null,          // the last part's end: "closed", "failed: ...", or null (cut short)
    error: null,
    connected: false,   // the RFB client reached ServerInit (it shows the screen)
    width: 0,
    height: 0,
};

function setState(state, text) {
    status.state = state;
    document.body.dataset.state = state;
    $('state').textContent = text;
}

function showMessage(text, detail, note) {
    $('message-text').textContent = text;
    $('message-detail').textContent = detail || '';
    $('message').classList.toggle('note', Boolean(note));
    $('message').hidden = false;
}

function clock(seconds) {
    const whole = Math.max(0, Math.floor(seconds));
    const h = Math.floor(whole / 3600);
    const m = Math.floor((whole % 3600) / 60);
    const s = String(whole % 60).padStart(2, '0');
    return h ? `${h}:${String(m).padStart(2, '0')}:${s}` : `${m}:${s}`;
}

function decode(base64) {
    const text = atob(base64);
    const bytes = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) {
        bytes[i] = text.charCodeAt(i);
    }
    return bytes;
}

// --- loading ---------------------------------------------------------------------------

async function fetchChecked(url, what) {
    let response;
    try {
        response = await fetch(url, { cache: 'no-store', credentials: 'omit' });
    } catch (exc) {
        throw new Error(`The broker could not be reached for ${what}.`);
    }
    if (!response.ok) {
        const reason = (await response.text()).trim();
        const known = {
            401: 'This link has expired or is not valid: ask for a new one ' +
                 '(console-broker token --recording ID).',
            403: 'This link is not a recording link.',
            404: 'The recording is not on this broker: it was never made here, or ' +
                 'retention has deleted it.',
            421: 'This link is for another node.',
        };
        const error = new Error(known[response.status] || `The broker refused ${what}.`);
        error.detail = `${response.status}: ${reason}`;
        throw error;
    }
    return response;
}

// Parse one part: its header, then events. Returns the frames to the client and how
// the part ends (its "e" event, or null when it has none: cut short, or being written).
function parsePart(text, frames) {
    const lines = text.split('\n');
    let end = null;
    let complete = lines.length && lines[lines.length - 1] === '';
    if (complete) {
        lines.pop();
    }
    for (let i = 1; i < lines.length; i++) {
        let event;
        try {
            event = JSON.parse(lines[i]);
        } catch (exc) {
            if (i === lines.length - 1 && !complete) {
                break;  // the last line, cut short (being written, or a crash)
            }
            throw new Error(`line ${i + 1} of a part is not JSON`);
        }
        const [t, kind, data] = event;
        if (kind === 'o') {
            frames.push({ t, data: decode(data) });
        } else if (kind === 'e') {
            end = data;
        }
        status.duration = Math.max(status.duration, t);
    }
    return end;
}

async function load(token) {
    const base = new URL('../../../recording', location.href);
    const query = '?token=' + encodeURIComponent(token);
    const index = await (await fetchChecked(base + query, 'the recording')).json();
    status.recording = index.recording;
    status.domain = index.domain;
    status.parts = index.parts.length;
    const name = (index.domain && (index.domain.name || index.domain.uuid)) || '';
    $('about').textContent = `${name} \u00b7 recording ${index.recording} \u00b7 ` +
        `started ${index.started}`;
    document.title = `VNC recording: ${name}`;
    const numbers = index.parts.map((p) => p.part);
    if (!numbers.length || numbers[0] !== 1 || !index.complete) {
        const error = new Error('This recording cannot be played: its first parts have been ' +
            'deleted by retention, and a VNC recording plays from its first part on.');
        error.detail = `parts here: ${numbers.join(', ') || 'none'}`;
        throw error;
    }
    const frames = [];
    let end = null;
    for (const part of index.parts) {
        setState('loading', `Loading part ${part.part} of ${numbers.length}\u2026`);
        const response = await fetchChecked(`${base}${query}&part=${part.part}`,
                                             `part ${part.part}`);
        end = parsePart(await response.text(), frames);
    }
    status.end = end;
    status.live = index.parts.some((p) => p.live);
    return frames;
}

// --- the player --------------------------------------------------------------------------

// What noVNC's Websock needs of a channel: a WebSocket-like object that is open. The
// player calls onmessage with the recording's frames; what the RFB client sends is
// dropped (the session it recorded is over).
class RecordedChannel {
    constructor() {
        this.binaryType = 'arraybuffer';
        this.protocol = '';
        this.readyState = 'open';
        this.onerror = () => {};
        this.onmessage = () => {};
        this.onopen = () => {};
        this.onclose = () => {};
    }

    send() {}

    close() {
        if (this.readyState === 'closed') {
            return;
        }
        this.readyState = 'closed';
        setTimeout(() => this.onclose({ code: 1000, reason: '', wasClean: true }));
    }
}

class Player {
    constructor(frames, screen) {
        this.frames = frames;
        this.screen = screen;
        this.rfb = null;
        this.channel = null;
        this.next = 0;             // the next frame to feed
        this.position = 0;
        this.speed = 1;
        this.playing = false;
        this.timer = null;
        this.generation = 0;       // bumped by every seek or restart: stale loops stop
        this.anchorWall = 0;
        this.anchorPosition = 0;
        this.home = 0;             // where the player starts: the handshake's end
    }

    restart() {
        this.generation += 1;
        if (this.rfb) {
            this.rfb.disconnect();
        }
        status.connected = false;
        this.channel = new RecordedChannel();
        const rfb = new RFB(this.screen, this.channel, { shared: true });
        rfb.viewOnly = true;
        rfb.focusOnClick = false;
        rfb.scaleViewport = true;
        rfb.background = '#111';
        rfb.addEventListener('connect', () => {
            if (rfb === this.rfb) {
                status.connected = true;
            }
        });
        rfb.addEventListener('desktopname', (e) => {
            status.desktopName = e.detail.name;
        });
        // A recording of websocket mode holds QEMU's own handshake: a password it asked
        // for is answered with anything (the answer goes nowhere, the recorded result is
        // what the stream says).
        rfb.addEventListener('credentialsrequired', () => {
            rfb.sendCredentials({ username: '', password: '', target: '' });
        });
        rfb.addEventListener('disconnect', (e) => {
            if (rfb === this.rfb && !e.detail.clean) {
                this.pause();
                setState('error', 'The recording could not be played');
                status.error = 'noVNC could not decode the recording';
                showMessage('noVNC could not decode this recording.', 'See the browser\'s ' +
                            'console for its reason.');
            }
        });
        this.rfb = rfb;
        this.next = 0;
        this.position = 0;
        status.fed = 0;
    }

    feed(frame) {
        this.channel.onmessage({ data: frame.data });
        this.next += 1;
        status.fed = this.next;
    }

    // Let noVNC draw what it was fed (it decodes some encodings asynchronously).
    async settle() {
        await new Promise((resolve) => setTimeout(resolve, 0));
        const display = this.rfb && this.rfb._display;
        if (display && display.pending()) {
            await display.flush();
        }
    }

    // Feed every frame up to *t* as fast as noVNC takes them.
    async fastForward(t) {
        const generation = this.generation;
        let bytes = 0;
        while (this.next < this.frames.length && this.frames[this.next].t <= t) {
            this.feed(this.frames[this.next]);
            bytes += this.frames[this.next - 1].data.length;
            if (bytes > 2 * 1024 * 1024) {
                bytes = 0;
                await this.settle();
                if (generation !== this.generation) {
                    return false;
                }
            }
        }
        await this.settle();
        return generation === this.generation;
    }

    // Start at the end of the handshake: the screen's size shows, ready to play.
    async begin() {
        this.restart();
        while (this.next < this.frames.length && !status.connected) {
            this.feed(this.frames[this.next]);
        }
        await this.settle();
        this.position = this.home = this.next ? this.frames[this.next - 1].t : 0;
        this.idle();
    }

    async seek(t) {
        const wasPlaying = this.playing;
        this.pause(false);
        t = Math.max(0, Math.min(t, status.duration));
        if (t < this.position || !this.rfb) {
            this.restart();
        } else {
            this.generation += 1;
        }
        setState('loading', 'Seeking\u2026');
        if (!await this.fastForward(t)) {
            return;  // another seek took over
        }
        this.position = t;
        this.update();
        if (wasPlaying && t < status.duration) {
            this.play();
        } else {
            this.idle();
        }
    }

    play() {
        if (this.position >= status.duration) {
            this.seek(0).then(() => this.play());
            return;
        }
        this.playing = true;
        this.anchorWall = performance.now();
        this.anchorPosition = this.position;
        setState('playing', `Playing (${this.speed}x)`);
        $('play').textContent = 'Pause';
        this.tick(this.generation);
    }

    pause(show = true) {
        this.playing = false;
        clearTimeout(this.timer);
        this.timer = null;
        $('play').textContent = 'Play';
        if (show) {
            this.idle();
        }
    }

    idle() {
        if (this.position >= status.duration) {
            setState('ended', 'End of the recording');
        } else {
            const started = this.position > this.home;
            setState(started ? 'paused' : 'ready', started ? 'Paused' : 'Ready');
        }
        this.update();
    }

    setSpeed(speed) {
        if (this.playing) {
            this.anchorPosition = this.position;
            this.anchorWall = performance.now();
        }
        this.speed = speed;
        status.speed = speed;
        if (this.playing) {
            setState('playing', `Playing (${speed}x)`);
        }
    }

    tick(generation) {
        if (!this.playing || generation !== this.generation) {
            return;
        }
        const elapsed = (performance.now() - this.anchorWall) / 1000;
        const target = Math.min(status.duration, this.anchorPosition + elapsed * this.speed);
        while (this.next < this.frames.length && this.frames[this.next].t <= target) {
            this.feed(this.frames[this.next]);
        }
        this.position = target;
        this.update();
        if (target >= status.duration) {
            this.playing = false;
            $('play').textContent = 'Play';
            this.settle().then(() => this.idle());
            return;
        }
        let wait = 100;
        if (this.next < this.frames.length) {
            wait = (this.frames[this.next].t - target) * 1000 / this.speed;
        }
        this.timer = setTimeout(() => this.tick(generation), Math.max(4, Math.min(wait, 100)));
    }

    update() {
        status.position = this.position;
        const seek = $('seek');
        if (document.activeElement !== seek || !seek.dataset.dragging) {
            seek.value = String(this.position);
        }
        $('time').textContent = `${clock(this.position)} / ${clock(status.duration)}`;
        if (this.rfb && this.rfb._fbWidth) {
            status.width = this.rfb._fbWidth;
            status.height = this.rfb._fbHeight;
        }
    }
}

// --- the page ----------------------------------------------------------------------------

function readToken() {
    const fromQuery = new URLSearchParams(location.search).get('token');
    const fromHash = new URLSearchParams(location.hash.slice(1)).get('token');
    // A recording token is not used up, but it is a credential: keep it out of the
    // address bar, the history and screenshots.
    history.replaceState(null, '', location.pathname);
    return fromQuery || fromHash;
}

async function main() {
    const token = readToken();
    if (!token) {
        setState('error', 'No token');
        status.error = 'no token';
        showMessage('This page needs a recording link with a token ' +
                    '(console-broker token --recording ID prints one).');
        return;
    }
    let frames;
    try {
        frames = await load(token);
    } catch (exc) {
        setState('error', 'Not playable');
        status.error = exc.message;
        showMessage(exc.message, exc.detail);
        return;
    }
    status.frames = frames.length;
    if (!frames.length) {
        setState('error', 'Empty recording');
        status.error = 'empty';
        showMessage('This recording holds nothing the session\'s client was sent.');
        return;
    }
    const seek = $('seek');
    seek.max = String(status.duration);
    seek.disabled = false;
    $('play').disabled = false;
    if (status.live) {
        showMessage('This session is still being recorded: what was recorded when the page ' +
                    'loaded plays.', '', true);
    } else if (status.end === null) {
        showMessage('This recording was cut short (the broker stopped, or its disk failed): ' +
                    'it plays up to its last whole frame.', '', true);
    } else if (status.end !== 'closed') {
        showMessage('The broker stopped recording this session early.', status.end, true);
    }
    const player = new Player(frames, $('screen'));
    window.playback.player = player;
    await player.begin();

    $('play').addEventListener('click', () => {
        if (player.playing) {
            player.pause();
        } else {
            player.play();
        }
    });
    for (const button of document.querySelectorAll('[data-speed]')) {
        button.addEventListener('click', () => {
            for (const other of document.querySelectorAll('[data-speed]')) {
                other.setAttribute('aria-pressed', String(other === button));
            }
            player.setSpeed(Number(button.dataset.speed));
        });
    }
    seek.addEventListener('input', () => {
        seek.dataset.dragging = '1';
        $('time').textContent = `${clock(Number(seek.value))} / ${clock(status.duration)}`;
    });
    seek.addEventListener('change', () => {
        delete seek.dataset.dragging;
        player.seek(Number(seek.value));
    });
    document.addEventListener('keydown', (e) => {
        if (e.key === ' ' && e.target === document.body) {
            e.preventDefault();
            $('play').click();
        }
    });
}

main();
