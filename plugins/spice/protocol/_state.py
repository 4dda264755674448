"""The link state machines of both sides of a proxied SPICE channel connection.

Theory of operation
-------------------
The broker sits in the middle of every SPICE channel connection (one TCP or WebSocket
connection per channel: main, display, inputs, ...). It plays the SPICE *server* toward
the client and the SPICE *client* toward QEMU, so each channel connection has two side
objects (``_connection``): ``ClientSide`` parses what the client sends and builds what
the client receives; ``ServerSide`` does the same toward QEMU.

A channel connection goes through the link, then carries messages::

    client                        broker                          QEMU
      | -- SpiceLinkMess ------->   | (policy, session binding)     |
      |                             | -- SpiceLinkMess -----------> |
      |                             | <--------- SpiceLinkReply --- |
      | <------- SpiceLinkReply --  |                               |
      | -- [auth mech] ticket --->  | (client ticket dropped)       |
      |                             | -- [auth mech] own ticket --> |
      |                             | <------------ link result --- |
      | <----------- link result -- |                               |
      | <======== messages, forwarded as Data, headers parsed ====> |

Each side is one state machine. Its transitions are the steps of the link, a *recv*
step when the side parsed something from its peer, a *send* step when the broker sent
something through it. The tables below list every allowed transition; a send step
that is not in the table is a :class:`SpiceUsageError`. A side parses incoming bytes
only in the states where its peer is expected to speak (``RECEIVING_STATES``); in
the others, ``next_event`` answers ``PAUSED`` until the broker sends. The peer closing
its end is allowed in every state and leads to ``CLOSED``; a protocol error from any
state leads to ``ERROR``. Both are final.

A refusal (a link reply or link result with an error) leads to ``REFUSED``: the link
failed, and only the peer's close is still expected.
"""

from __future__ import annotations

import enum

from ._errors import SpiceUsageError


class State(enum.Enum):
    """States of both sides; each side uses the subset in its table."""

    # ClientSide (the broker is the server)
    AWAIT_LINK = "await link message"
    REPLY_DUE = "link reply due"
    AWAIT_TICKET = "await ticket"
    RESULT_DUE = "link result due"
    # ServerSide (the broker is the client)
    LINK_DUE = "link message due"
    AWAIT_REPLY = "await link reply"
    TICKET_DUE = "ticket due"
    AWAIT_RESULT = "await link result"
    # both
    MESSAGES = "messages"
    REFUSED = "refused"
    CLOSED = "closed"
    ERROR = "error"


class Step(enum.Enum):
    RECV_LINK = "receive link message"
    SEND_REPLY_OK = "send link reply"
    SEND_REPLY_REFUSED = "send refusing link reply"
    RECV_TICKET = "receive ticket"
    SEND_RESULT_OK = "send link result OK"
    SEND_RESULT_REFUSED = "send refusing link result"
    SEND_LINK = "send link message"
    RECV_REPLY_OK = "receive link reply"
    RECV_REPLY_REFUSED = "receive refusing link reply"
    SEND_TICKET = "send ticket"
    RECV_RESULT_OK = "receive link result OK"
    RECV_RESULT_REFUSED = "receive refusing link result"
    SEND_DATA = "send data"


#: ``ClientSide``: the client links, the broker answers.
CLIENT_SIDE: dict[tuple[State, Step], State] = {
    (State.AWAIT_LINK, Step.RECV_LINK): State.REPLY_DUE,
    (State.REPLY_DUE, Step.SEND_REPLY_OK): State.AWAIT_TICKET,
    (State.REPLY_DUE, Step.SEND_REPLY_REFUSED): State.REFUSED,
    (State.AWAIT_TICKET, Step.RECV_TICKET): State.RESULT_DUE,
    (State.RESULT_DUE, Step.SEND_RESULT_OK): State.MESSAGES,
    (State.RESULT_DUE, Step.SEND_RESULT_REFUSED): State.REFUSED,
    (State.MESSAGES, Step.SEND_DATA): State.MESSAGES,
}

#: ``ServerSide``: the broker links to QEMU, QEMU answers.
SERVER_SIDE: dict[tuple[State, Step], State] = {
    (State.LINK_DUE, Step.SEND_LINK): State.AWAIT_REPLY,
    (State.AWAIT_REPLY, Step.RECV_REPLY_OK): State.TICKET_DUE,
    (State.AWAIT_REPLY, Step.RECV_REPLY_REFUSED): State.REFUSED,
    (State.TICKET_DUE, Step.SEND_TICKET): State.AWAIT_RESULT,
    (State.AWAIT_RESULT, Step.RECV_RESULT_OK): State.MESSAGES,
    (State.AWAIT_RESULT, Step.RECV_RESULT_REFUSED): State.REFUSED,
    (State.MESSAGES, Step.SEND_DATA): State.MESSAGES,
}

#: Where a side reads its peer's bytes; elsewhere incoming bytes wait (bounded).
RECEIVING_STATES = frozenset(
    {State.AWAIT_LINK, State.AWAIT_TICKET, State.AWAIT_REPLY, State.AWAIT_RESULT, State.MESSAGES}
)
#: Where nothing more happens but the peer's close.
FINAL_STATES = frozenset({State.REFUSED, State.CLOSED, State.ERROR})


def transition(table: dict[tuple[State, Step], State], state: State, step: Step) -> State:
    """The state after *step*; a step the table does not allow is a usage error."""
    try:
        return table[state, step]
    except KeyError:
        raise SpiceUsageError(f"cannot {step.value} in state {state.value!r}") from None
