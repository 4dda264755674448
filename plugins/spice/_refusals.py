"""The SPICE plugin's own refusal reason (declared with ``console_broker_refusals``)."""

from __future__ import annotations

from broker.api import Refusal

#: A channel the session's policy does not admit: a view-only session's inputs, a channel
#: ``spice.deny_channels`` names, one that is not the session's.
CHANNEL_REFUSED = Refusal(
    "channel_refused", 0, 4107, "the session's policy refuses this channel"
)
