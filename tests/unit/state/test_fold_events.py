"""Folding a decision's events at once gives the row that folding them one by one gives.

``fold_events`` sets the header's fields and the time of the last change once per
envelope; ``_fold_one`` below is the per-event fold it replaced, kept as the
specification. Hypothesis draws rows (none, or one already folded to some sequence)
and envelopes of events in any order, redeliveries and out-of-order sequences included.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tickmesh.state import core
from tickmesh.v1 import header_pb2, lifetime_pb2, payload_pb2, result_pb2

LS = lifetime_pb2

_TERMINAL = {
    LS.LIFETIME_STATE_COMPLETED,
    LS.LIFETIME_STATE_FAILED,
    LS.LIFETIME_STATE_ABORTED,
}


def _fold_one(
    header: header_pb2.EnvelopeHeader,
    event: lifetime_pb2.LifetimeEvent,
    row: lifetime_pb2.AgentLifetime | None,
) -> lifetime_pb2.AgentLifetime:
    """The per-event fold, field by field (the specification)."""
    if row is None:
        row = lifetime_pb2.AgentLifetime()
    elif event.sequence <= row.last_sequence:
        # A late start still gives the row its creation time and input, once.
        if event.kind == LS.LIFETIME_EVENT_KIND_STARTED:
            if not row.HasField("created_at"):
                row.created_at.CopyFrom(event.at)
            if event.HasField("input") and not row.HasField("input"):
                row.input.CopyFrom(event.input)
        return row
    row.lifetime_id = header.lifetime_id
    row.tenant_id = header.tenant_id
    if header.HasField("graph"):
        row.graph.CopyFrom(header.graph)
    row.labels.update(header.labels)
    row.mode = header.mode
    if header.HasField("fork_origin"):
        row.fork_origin.CopyFrom(header.fork_origin)
    row.last_sequence = event.sequence
    row.updated_at.CopyFrom(event.at)
    if event.kind == LS.LIFETIME_EVENT_KIND_STARTED:
        row.created_at.CopyFrom(event.at)
    if event.state:
        row.state = event.state
    if event.HasField("output"):
        row.output.CopyFrom(event.output)
    if event.HasField("error"):
        row.error.CopyFrom(event.error)
    if event.state in _TERMINAL:
        row.finished_at.CopyFrom(event.at)
    return row


_kinds = st.sampled_from(
    [
        LS.LIFETIME_EVENT_KIND_STARTED,
        LS.LIFETIME_EVENT_KIND_STEP_DISPATCHED,
        LS.LIFETIME_EVENT_KIND_STEP_FINISHED,
        LS.LIFETIME_EVENT_KIND_STATE_CHANGED,
    ]
)
_states = st.sampled_from(
    [
        LS.LIFETIME_STATE_UNSPECIFIED,
        LS.LIFETIME_STATE_RUNNING,
        LS.LIFETIME_STATE_WAITING,
        LS.LIFETIME_STATE_COMPLETED,
        LS.LIFETIME_STATE_FAILED,
        LS.LIFETIME_STATE_ABORTED,
    ]
)


@st.composite
def _events(draw: st.DrawFn) -> lifetime_pb2.LifetimeEvent:
    sequence = draw(st.integers(min_value=1, max_value=12))
    event = lifetime_pb2.LifetimeEvent(sequence=sequence, kind=draw(_kinds), state=draw(_states))
    event.at.FromNanoseconds(draw(st.integers(min_value=0, max_value=10**12)))
    if draw(st.booleans()):
        event.output.CopyFrom(payload_pb2.Payload(content_type=f"out/{sequence}"))
    if draw(st.booleans()):
        event.error.CopyFrom(result_pb2.ErrorInfo(type="E", message=f"at {sequence}"))
    return event


@st.composite
def _headers(draw: st.DrawFn) -> header_pb2.EnvelopeHeader:
    header = header_pb2.EnvelopeHeader(
        tenant_id="acme",
        lifetime_id="lt-1",
        mode=draw(st.sampled_from(list(header_pb2.ExecutionMode.values()))),
    )
    if draw(st.booleans()):
        header.graph.CopyFrom(header_pb2.GraphRef(id="g", version=draw(st.integers(1, 3))))
    header.labels.update(draw(st.dictionaries(st.sampled_from("abc"), st.sampled_from("xyz"))))
    if draw(st.booleans()):
        header.fork_origin.lifetime_id = "origin"
    return header


def _copy(row: lifetime_pb2.AgentLifetime | None) -> lifetime_pb2.AgentLifetime | None:
    return None if row is None else lifetime_pb2.AgentLifetime.FromString(row.SerializeToString())


@settings(max_examples=300, deadline=None)
@given(
    before=st.none() | st.lists(st.tuples(_headers(), _events()), min_size=1, max_size=4),
    header=_headers(),
    events=st.lists(_events(), min_size=1, max_size=6),
)
def test_folding_an_envelope_at_once_equals_folding_its_events_one_by_one(
    before: list[tuple[header_pb2.EnvelopeHeader, lifetime_pb2.LifetimeEvent]] | None,
    header: header_pb2.EnvelopeHeader,
    events: list[lifetime_pb2.LifetimeEvent],
) -> None:
    start: lifetime_pb2.AgentLifetime | None = None
    for earlier_header, earlier in before or ():
        start = _fold_one(earlier_header, earlier, start)

    expected = _copy(start)
    for event in events:
        expected = _fold_one(header, event, expected)

    row = _copy(start)
    folded = core.fold_events(header, events, row)

    assert folded == expected
    if row is not None:
        assert folded is row  # in place


def test_an_envelope_of_old_events_leaves_the_row_as_it_was() -> None:
    header = header_pb2.EnvelopeHeader(tenant_id="acme", lifetime_id="lt-1")
    row = lifetime_pb2.AgentLifetime(lifetime_id="lt-1", last_sequence=5)
    row.updated_at.FromNanoseconds(7)
    stale = [lifetime_pb2.LifetimeEvent(sequence=s, state=LS.LIFETIME_STATE_FAILED) for s in (4, 5)]
    before = row.SerializeToString()
    assert core.fold_events(header, stale, row) is row
    assert row.SerializeToString() == before
