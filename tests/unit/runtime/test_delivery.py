"""The ack-subject reader agrees with nats-py's ``Msg.metadata`` and refuses what is not one."""

from __future__ import annotations

import pytest
from nats.aio.msg import Msg

from tickmesh.runtime.delivery import Delivery, delivery_of

ACK_SUBJECTS = [
    # v1: stream, consumer, delivered, stream seq, consumer seq, timestamp, pending
    "$JS.ACK.TM_T_WORK.pool_task_echo.1.42.40.1700000000000000000.0",
    "$JS.ACK.TM_T_WORK.pool_task_echo.3.1234567.9.1700000000000000000.12",
    # v2: domain and account hash first, an optional random token last
    "$JS.ACK.hub.ACCHASH.TM_T_EXEC.state.2.77.70.1700000000000000000.5",
    "$JS.ACK.hub.ACCHASH.TM_T_EXEC.state.4.78.71.1700000000000000000.5.xyz",
    "$JS.ACK.hub.ACCHASH.TM_T_EXEC.state.5.79.72.1700000000000000000.5.xyz.more",
]


@pytest.mark.parametrize("reply", ACK_SUBJECTS)
def test_reads_what_nats_py_reads(reply: str) -> None:
    metadata = Msg(None, reply=reply).metadata  # type: ignore[arg-type]
    assert delivery_of(reply) == Delivery(metadata.num_delivered, metadata.sequence.stream)


@pytest.mark.parametrize(
    "reply",
    [
        None,
        "",
        "_INBOX.abc.def",
        "$JS.ACK.too.short",
        "$JS.ACK.TM_T_WORK.pool.x.42.40.1700000000000000000.0",  # delivered not a number
        "$JS.ACK.TM_T_WORK.pool.1.-4.40.1700000000000000000.0",  # stream seq not a number
        "$JS.ACK.a.b.c.d.e.f.g.h",  # ten tokens: neither form
        "$JS.NAK.TM_T_WORK.pool.1.42.40.1700000000000000000.0",
    ],
)
def test_refuses_what_is_not_an_ack_subject(reply: str | None) -> None:
    assert delivery_of(reply) is None
