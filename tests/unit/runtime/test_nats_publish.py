"""The runtime's JetStream publisher without a server: PubAck parsing, header encoding,
one round per batch, compare-and-set conflicts, and acks written in one go."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast

import pytest
from nats import errors as nats_errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import PubAck
from nats.js.errors import (
    APIError,
    BadRequestError,
    InvalidKeyError,
    KeyWrongLastSequenceError,
    ServiceUnavailableError,
)
from nats.js.kv import KeyValue

from tickmesh.runtime import nats as tm_nats
from tickmesh.runtime.kv import CasWriter, is_wrong_last_sequence

Answer = Callable[[str, dict[str, str], bytes], bytes | None]
"""What the fake server answers a publish (subject, headers, data); None: nothing."""


def wrong_last(seq: int) -> bytes:
    return json.dumps(
        {
            "error": {
                "code": 400,
                "err_code": 10071,
                "description": f"wrong last sequence: {seq}",
            },
            "stream": "KV_b",
            "seq": 0,
        }
    ).encode()


class FakeServer(NatsClient):
    """An unconnected client whose 'server' answers each publish with ``answer``."""

    def __init__(self, answer: Answer) -> None:
        super().__init__()
        # As a connection that is reconnecting: publishes are buffered.
        self._max_pending_size = 1 << 20
        self._max_payload = 1 << 20
        self.answer = answer
        self.sent: list[tuple[str, str, dict[str, str], bytes]] = []
        self.commands: list[bytes] = []
        self.reply_cb: Callable[[Msg], Any] | None = None
        self.deliveries: list[asyncio.Task[Any]] = []

    async def subscribe(self, subject: str, *args: Any, cb: Any = None, **kwargs: Any) -> Any:
        self.reply_cb = cb

    async def _send_command(self, cmd: bytes, priority: bool = False) -> None:
        self.commands.append(bytes(cmd))
        head, _, rest = bytes(cmd).partition(b"\r\n")
        op, subject, reply, *sizes = head.decode().split(" ")
        headers: dict[str, str] = {}
        if op == "HPUB":
            hlen = int(sizes[0])
            block, data = rest[:hlen], rest[hlen:-2]
            for line in block.decode().split("\r\n")[1:]:
                if line:
                    key, _, value = line.partition(": ")
                    headers[key] = value
        else:
            data = rest[:-2]
        self.sent.append((subject, reply, headers, data))
        answer = self.answer(subject, headers, data)
        if answer is not None:
            self.deliver(reply, answer)

    def deliver(self, reply: str, data: bytes) -> None:
        assert self.reply_cb is not None
        self.deliveries.append(
            asyncio.ensure_future(self.reply_cb(Msg(_client=self, subject=reply, data=data)))
        )


def acking(stream: str = "S") -> Answer:
    seqs = iter(range(1, 1000))

    def answer(subject: str, headers: dict[str, str], data: bytes) -> bytes:
        return json.dumps({"stream": stream, "seq": next(seqs)}).encode()

    return answer


def test_a_puback_gives_its_stream_sequence_and_duplicate_flag() -> None:
    ack = tm_nats.parse_puback(b'{"stream":"S","seq":7,"duplicate":true}')

    assert ack == PubAck(stream="S", seq=7, duplicate=True)


@pytest.mark.parametrize(
    "answer",
    [
        b'{"stream":"TM_ACME_WORK","seq":18446744073709551615}',
        b'{"stream":"S","seq":2,"duplicate": true}',
        b'{"stream":"S","seq":3,"domain":"hub"}',
        b'{"stream": "S", "seq": 4}',
        b'{"stream":"S","seq":5}\n',
    ],
)
def test_a_plain_puback_reads_as_the_json_parser_reads_it(answer: bytes) -> None:
    """The common answer is read without the JSON parser; any other shape goes through it."""
    fields = json.loads(answer)
    expected = PubAck(
        stream=fields["stream"],
        seq=fields["seq"],
        domain=fields.get("domain"),
        duplicate=fields.get("duplicate"),
    )

    assert tm_nats.parse_puback(answer) == expected


def test_a_compare_and_set_refusal_is_parsed_as_the_api_error_nats_py_raises() -> None:
    error = tm_nats.parse_puback(wrong_last(4))

    assert isinstance(error, BadRequestError)
    assert error.err_code == 10071
    assert is_wrong_last_sequence(error)
    assert not is_wrong_last_sequence(nats_errors.TimeoutError())


def test_other_refusals_and_unreadable_answers_are_errors_not_acks() -> None:
    unavailable = tm_nats.parse_puback(b'{"error":{"code":503,"description":"down"}}')
    garbage = tm_nats.parse_puback(b"not json")

    assert isinstance(unavailable, ServiceUnavailableError)
    assert not is_wrong_last_sequence(unavailable)
    assert isinstance(garbage, APIError)


def test_headers_are_encoded_as_nats_py_encodes_them() -> None:
    block = tm_nats.encode_headers({"Nats-Msg-Id": " m1 ", " ": "skipped", "R": "a\r\nb"})

    assert block == b"NATS/1.0\r\nNats-Msg-Id: m1\r\nR: a  b\r\n\r\n"
    with pytest.raises(nats_errors.BadHeaderError):
        tm_nats.encode_headers({"bad key": "v"})


async def test_a_batch_is_sent_in_one_round_and_its_acks_come_back_in_order() -> None:
    nc = FakeServer(acking())
    js = tm_nats.jetstream(nc)
    batch = [
        tm_nats.Outgoing("s.a", b"one", {"Nats-Msg-Id": "a"}),
        tm_nats.Outgoing("s.b", b"two"),
    ]

    acks = await tm_nats.publish_batch(js, batch)

    assert [(a.stream, a.seq) for a in acks] == [("S", 1), ("S", 2)]
    (subject_a, reply_a, headers_a, data_a), (subject_b, reply_b, headers_b, data_b) = nc.sent
    assert (subject_a, headers_a, data_a) == ("s.a", {"Nats-Msg-Id": "a"}, b"one")
    assert (subject_b, headers_b, data_b) == ("s.b", {}, b"two")
    # One round: the replies differ only by the message's place in it.
    assert reply_a.removesuffix(".0") == reply_b.removesuffix(".1")
    assert nc.commands[1].startswith(b"PUB s.b ")


async def test_a_refused_publish_fails_the_batch_at_once_with_the_refusal() -> None:
    nc = FakeServer(
        lambda subject, headers, data: (
            wrong_last(3) if subject == "s.b" else b'{"stream":"S","seq":1}'
        )
    )
    js = tm_nats.jetstream(nc)

    async with asyncio.timeout(1):  # not the 10 s ack timeout
        with pytest.raises(tm_nats.PublishError) as raised:
            await tm_nats.publish_batch(
                js, [tm_nats.Outgoing("s.a", b"1"), tm_nats.Outgoing("s.b", b"2")]
            )

    ((failed, error),) = raised.value.failures
    assert failed.subject == "s.b"
    assert is_wrong_last_sequence(error)


async def test_an_unanswered_publish_fails_after_the_ack_timeout() -> None:
    nc = FakeServer(lambda subject, headers, data: None)
    js = tm_nats.jetstream(nc)

    with pytest.raises(tm_nats.PublishError) as raised:
        await tm_nats.publish_batch(js, [tm_nats.Outgoing("s.a", b"1")], ack_timeout=0.05)

    ((_, error),) = raised.value.failures
    assert isinstance(error, TimeoutError)


async def test_late_repeated_and_stray_answers_change_nothing() -> None:
    nc = FakeServer(acking())
    js = tm_nats.jetstream(nc)
    await tm_nats.publish_batch(js, [tm_nats.Outgoing("s.a", b"1")])
    (_, reply, _, _) = nc.sent[0]
    prefix = reply.rpartition(".")[0].rpartition(".")[0]

    nc.deliver(reply, b'{"stream":"S","seq":99}')  # the round is over
    nc.deliver(f"{prefix}.zz.0", b'{"stream":"S","seq":98}')  # no such round
    nc.deliver(f"{prefix}.1.x", b'{"stream":"S","seq":97}')  # no place
    await asyncio.gather(*nc.deliveries)
    acks = await tm_nats.publish_batch(js, [tm_nats.Outgoing("s.b", b"2")])

    assert [a.seq for a in acks] == [2]


async def test_a_cas_write_expects_the_last_revision_and_maps_a_refusal_to_a_conflict() -> None:
    nc = FakeServer(
        lambda subject, headers, data: (
            b'{"stream":"KV_b","seq":6}'
            if headers["Nats-Expected-Last-Subject-Sequence"] == "5"
            else wrong_last(5)
        )
    )
    kv = cast(KeyValue, SimpleNamespace(_js=tm_nats.jetstream(nc), _pre="$KV.b."))
    writer = CasWriter(kv)

    assert await writer.update("lt.x", b"v", last=5) == 6
    with pytest.raises(KeyWrongLastSequenceError):
        await writer.update("lt.x", b"v", last=4)
    assert [s for s, _, _, _ in nc.sent] == ["$KV.b.lt.x", "$KV.b.lt.x"]


async def test_cas_writes_of_several_keys_go_out_in_one_round_and_fail_alone() -> None:
    def answer(subject: str, headers: dict[str, str], data: bytes) -> bytes:
        if subject.endswith(".b"):
            return wrong_last(9)
        last = int(headers["Nats-Expected-Last-Subject-Sequence"])
        return json.dumps({"stream": "KV_b", "seq": last + 1}).encode()

    nc = FakeServer(answer)
    kv = cast(KeyValue, SimpleNamespace(_js=tm_nats.jetstream(nc), _pre="$KV.b."))
    writer = CasWriter(kv)

    outcomes = await writer.update_many(
        [("lt.a", b"1", 3), ("lt.b", b"2", 4), ("bad key", b"3", 5), ("lt.c", b"4", 7)]
    )

    assert outcomes[0] == 4
    assert outcomes[3] == 8
    assert isinstance(outcomes[1], KeyWrongLastSequenceError)
    assert isinstance(outcomes[2], InvalidKeyError)
    # The invalid key is never sent; the other three go out as one round (one reply
    # subject prefix, one future).
    assert [s for s, _, _, _ in nc.sent] == ["$KV.b.lt.a", "$KV.b.lt.b", "$KV.b.lt.c"]
    assert len({reply.rsplit(".", 1)[0] for _, reply, _, _ in nc.sent}) == 1


async def test_acks_go_out_in_one_write_and_are_refused_a_second_time() -> None:
    nc = FakeServer(lambda subject, headers, data: None)
    msgs = [Msg(_client=nc, subject="s", reply=f"$JS.ACK.S.c.1.{i}.{i}.0.0") for i in (1, 2)]

    await tm_nats.ack_all(msgs)

    assert nc.commands == [
        b"PUB $JS.ACK.S.c.1.1.1.0.0 0\r\n\r\nPUB $JS.ACK.S.c.1.2.2.0.0 0\r\n\r\n"
    ]
    assert all(m._ackd for m in msgs)
    with pytest.raises(nats_errors.Error):  # MsgAlreadyAckdError, as Msg.ack raises
        await tm_nats.ack_all(msgs[:1])


async def test_a_drop_fails_at_once_what_has_no_id_and_sends_again_what_has_one() -> None:
    nc = FakeServer(lambda subject, headers, data: None)  # a server that died
    js = tm_nats.jetstream(nc)
    link = tm_nats.watch(nc)
    batch = [
        tm_nats.Outgoing("s.a", b"1", {"Nats-Msg-Id": "a"}),
        tm_nats.Outgoing("s.b", b"2"),
    ]
    publishing = asyncio.ensure_future(tm_nats.publish_batch(js, batch, ack_timeout=5))
    await asyncio.sleep(0.01)  # sent, and waiting for PubAcks that will not come
    assert len(nc.sent) == 2
    nc.answer = acking()  # the restarted server answers

    async with asyncio.timeout(1):  # not the 5 s ack timeout
        link._dropped(nc)
        await asyncio.sleep(0.01)
        link._reconnected()
        with pytest.raises(tm_nats.PublishError) as raised:
            await publishing

    ((failed, error),) = raised.value.failures
    assert (failed.subject, type(error)) == ("s.b", tm_nats.LinkLostError)
    assert [subject for subject, _, _, _ in nc.sent] == ["s.a", "s.b", "s.a"]


@pytest.mark.parametrize(
    "raw",
    [
        b"Nats-Msg-Id: ref:1:2\r\nTickmesh-Type: execution_ref\r\n\r\n",
        b"A:b\r\nA:\tc\r\n  Spaced : v \r\n",  # repeated key: the last wins
        b"Bad Name: x\r\nGood: y\r\n",  # whitespace inside a name: skipped
        b"N\xc3\xa4me: x\r\nOk: \xff\xfe\r\n",  # non-ASCII name skipped; bad UTF-8 replaced
        b"no colon here\r\n\r\n: empty name\r\nK: a: b\r\n",
        b"",
    ],
)
def test_header_blocks_read_as_nats_py_reads_them(raw: bytes) -> None:
    for _ in range(2):  # the second time from the names already seen
        assert tm_nats.parse_header_lines(raw) == NatsClient._parse_header_lines(raw)
