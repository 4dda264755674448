"""The channel policy: view-only, the operator's deny list, the session binding."""

from __future__ import annotations

import pytest
from broker_spice.protocol import (
    VIEW_ONLY_CHANNELS,
    ChannelPolicy,
    ChannelType,
    ClientSide,
    LinkError,
    LinkMessage,
    LinkReply,
    State,
    build_link_error_reply,
    build_link_message,
)
from spicekit import link_message

SESSION = 0xF5FE4FFD


def test_view_only_channels() -> None:
    assert {
        ChannelType.MAIN,
        ChannelType.DISPLAY,
        ChannelType.CURSOR,
        ChannelType.PLAYBACK,
    } == VIEW_ONLY_CHANNELS


@pytest.mark.parametrize("channel_type", list(ChannelType))
def test_view_only_refuses_every_channel_that_reaches_into_the_vm(
    channel_type: ChannelType,
) -> None:
    policy = ChannelPolicy(view_only=True)
    connection_id = 0 if channel_type is ChannelType.MAIN else SESSION
    answer = policy.check(
        link_message(channel_type, connection_id=connection_id), session_id=SESSION
    )
    if channel_type in VIEW_ONLY_CHANNELS:
        assert answer is LinkError.OK
    else:
        assert answer is LinkError.PERMISSION_DENIED


@pytest.mark.parametrize("channel_type", list(ChannelType))
def test_full_access_allows_every_channel(channel_type: ChannelType) -> None:
    assert ChannelPolicy().allows(channel_type)


def test_deny_list_applies_on_top() -> None:
    policy = ChannelPolicy(deny=[ChannelType.USBREDIR, 8])
    assert policy.deny == {ChannelType.USBREDIR, ChannelType.SMARTCARD}
    assert not policy.allows(ChannelType.USBREDIR)
    assert not policy.allows(ChannelType.SMARTCARD)
    assert policy.allows(ChannelType.INPUTS)
    viewer = ChannelPolicy(view_only=True, deny=frozenset({ChannelType.PLAYBACK}))
    assert not viewer.allows(ChannelType.PLAYBACK)
    assert viewer.allows(ChannelType.DISPLAY)


def test_session_binding() -> None:
    policy = ChannelPolicy()
    main = link_message(ChannelType.MAIN)
    assert policy.check(main, session_id=None) is LinkError.OK
    # a main channel with a chosen id would make QEMU treat it as a migration target
    assert (
        policy.check(link_message(ChannelType.MAIN, connection_id=SESSION), session_id=SESSION)
        is LinkError.BAD_CONNECTION_ID
    )
    display = link_message(ChannelType.DISPLAY, connection_id=SESSION)
    assert policy.check(display, session_id=SESSION) is LinkError.OK
    assert policy.check(display, session_id=None) is LinkError.BAD_CONNECTION_ID
    assert policy.check(display, session_id=SESSION + 1) is LinkError.BAD_CONNECTION_ID
    # the channel type is judged first
    denied = ChannelPolicy(view_only=True)
    assert denied.check(link_message(ChannelType.INPUTS), session_id=SESSION) is (
        LinkError.PERMISSION_DENIED
    )


def test_refusing_through_the_client_side() -> None:
    client = ClientSide()
    client.receive_data(build_link_message(link_message(ChannelType.INPUTS, connection_id=SESSION)))
    link = client.next_event()
    assert isinstance(link, LinkMessage)
    assert link == link_message(ChannelType.INPUTS, connection_id=SESSION)
    answer = ChannelPolicy(view_only=True).check(link, session_id=SESSION)
    data = client.send(LinkReply(error=answer))
    assert data == build_link_error_reply(LinkError.PERMISSION_DENIED)
    assert client.state is State.REFUSED
