"""Edge cases of the router's guardrail inputs: node estimates at the limits of their fields."""

from __future__ import annotations

from tickmesh.router.guard import estimate_of
from tickmesh.v1 import graph_pb2


def test_a_huge_cost_estimate_is_capped_not_an_error() -> None:
    # $1e13 is under the 1e15 accepted for any estimate, but 1e19 micros is past int64.
    node = graph_pb2.Node(id="n")
    node.config.update({"estimate": {"cost_usd": 1e13, "tokens": 9e14}})
    estimate = estimate_of(node)
    assert estimate.cost_micros == 2**62
    assert estimate.input_tokens == 900_000_000_000_000
