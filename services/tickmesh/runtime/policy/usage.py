"""Usage: the aggregated metrics guardrail rules read, for one execution, lifetime or tenant."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from tickmesh.v1 import telemetry_pb2

_EMPTY: Mapping[str, float] = MappingProxyType({})


def _empty() -> Mapping[str, float]:
    return _EMPTY


@dataclass(frozen=True, slots=True)
class Usage:
    """Aggregated metrics over one scope (an execution, a lifetime, or a tenant window).

    Counters (executions, tokens, cost, calls, wall time, custom metrics) add up under
    ``plus``; ``iterations``, ``fanout`` and ``depth`` are high-water marks and combine by
    ``max``. ``max_values`` holds the largest single-execution value of each metric, keyed
    by the metric's name in the policy language (``tokens``, ``cost_micros``,
    ``custom.<name>``, ...), for ``max(metric)``.
    """

    executions: int = 0
    """Number of executions in the scope (``count()``)."""
    input_tokens: int = 0
    """Model input tokens."""
    output_tokens: int = 0
    """Model output tokens."""
    cost_micros: int = 0
    """Cost in millionths of the currency unit (``cost_usd`` = this / 1e6)."""
    model_calls: int = 0
    """Model calls made."""
    tool_calls: int = 0
    """Tool or API calls made."""
    iterations: int = 0
    """Highest iteration reached (a high-water mark)."""
    wall_time_s: float = 0.0
    """Seconds of wall time: handler run time summed, unless the caller sets elapsed time."""
    fanout: int = 0
    """Widest fan-out reached (a high-water mark)."""
    depth: int = 0
    """Deepest step reached (a high-water mark)."""
    max_values: Mapping[str, float] = field(default_factory=_empty)
    """Largest single-execution value per metric, for ``max(metric)``."""
    custom: Mapping[str, float] = field(default_factory=_empty)
    """Handler-defined metrics (``custom.<name>``), summed."""

    @staticmethod
    def of(
        telemetry: telemetry_pb2.Telemetry,
        *,
        iteration: int = 0,
        fanout: int = 0,
        depth: int = 0,
    ) -> Usage:
        """The usage of one execution, from its telemetry.

        ``iteration``, ``fanout`` and ``depth`` are not part of telemetry; the router knows
        them from the header and the graph and may pass them.
        """
        run = telemetry.run_time
        wall = run.seconds + run.nanos / 1e9
        # dict() of a protobuf map walks it through the Mapping ABC, even when empty.
        custom = dict(telemetry.custom_metrics) if telemetry.custom_metrics else {}
        tokens_in = telemetry.input_tokens
        tokens_out = telemetry.output_tokens
        maxima: dict[str, float] = {
            "executions": 1,
            "tokens": tokens_in + tokens_out,
            "input_tokens": tokens_in,
            "output_tokens": tokens_out,
            "cost_micros": telemetry.cost_micros,
            "model_calls": telemetry.model_calls,
            "tool_calls": telemetry.tool_calls,
            "iterations": iteration,
            "wall_time_s": wall,
            "fanout": fanout,
            "depth": depth,
        }
        for name, value in custom.items():
            maxima["custom." + name] = value
        return new_usage(
            executions=1,
            input_tokens=tokens_in,
            output_tokens=tokens_out,
            cost_micros=telemetry.cost_micros,
            model_calls=telemetry.model_calls,
            tool_calls=telemetry.tool_calls,
            iterations=iteration,
            wall_time_s=wall,
            fanout=fanout,
            depth=depth,
            max_values=MappingProxyType(maxima),
            custom=MappingProxyType(custom),
        )

    def plus(self, other: Usage) -> Usage:
        """This usage combined with another (counters add, high-water marks and maxima max)."""
        return self.plus_all((other,))

    def plus_all(self, others: Iterable[Usage]) -> Usage:
        """This usage combined with each of ``others`` in turn: the same result as
        ``self.plus(a).plus(b)…`` (floats are added in the same order), built once."""
        executions = self.executions
        input_tokens = self.input_tokens
        output_tokens = self.output_tokens
        cost_micros = self.cost_micros
        model_calls = self.model_calls
        tool_calls = self.tool_calls
        iterations = self.iterations
        wall_time_s = self.wall_time_s
        fanout = self.fanout
        depth = self.depth
        maxima = dict(self.max_values)
        custom = dict(self.custom)
        for other in others:
            executions += other.executions
            input_tokens += other.input_tokens
            output_tokens += other.output_tokens
            cost_micros += other.cost_micros
            model_calls += other.model_calls
            tool_calls += other.tool_calls
            iterations = max(iterations, other.iterations)
            wall_time_s += other.wall_time_s
            fanout = max(fanout, other.fanout)
            depth = max(depth, other.depth)
            for name, value in other.max_values.items():
                mine = maxima.get(name)
                # `not mine >= value` also replaces a NaN already held, so NaN never hides a value.
                if mine is None or not mine >= value:
                    maxima[name] = value
            for name, value in other.custom.items():
                custom[name] = custom.get(name, 0.0) + value
        return new_usage(
            executions=executions,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cost_micros=cost_micros,
            model_calls=model_calls,
            tool_calls=tool_calls,
            iterations=iterations,
            wall_time_s=wall_time_s,
            fanout=fanout,
            depth=depth,
            max_values=MappingProxyType(maxima),
            custom=MappingProxyType(custom),
        )


EMPTY_USAGE = Usage()
"""The usage of an empty scope."""

# The slots' own setters (the member descriptors of the class), in field order: unpacked by
# name, so a field added to Usage and not here fails at import.
(
    _set_executions,
    _set_input_tokens,
    _set_output_tokens,
    _set_cost_micros,
    _set_model_calls,
    _set_tool_calls,
    _set_iterations,
    _set_wall_time_s,
    _set_fanout,
    _set_depth,
    _set_max_values,
    _set_custom,
) = (Usage.__dict__[f.name].__set__ for f in dataclasses.fields(Usage))
_new = object.__new__


def new_usage(
    *,
    executions: int,
    input_tokens: int,
    output_tokens: int,
    cost_micros: int,
    model_calls: int,
    tool_calls: int,
    iterations: int,
    wall_time_s: float,
    fanout: int,
    depth: int,
    max_values: Mapping[str, float],
    custom: Mapping[str, float],
) -> Usage:
    """``Usage(...)`` with every field given, for the step loop (a few per step).

    A frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``; the
    slots' own setters do the same in well under half the time. The result is an ordinary
    frozen ``Usage``: equal to, and as immutable as, one built by ``Usage(...)``.
    """
    usage: Usage = _new(Usage)
    _set_executions(usage, executions)
    _set_input_tokens(usage, input_tokens)
    _set_output_tokens(usage, output_tokens)
    _set_cost_micros(usage, cost_micros)
    _set_model_calls(usage, model_calls)
    _set_tool_calls(usage, tool_calls)
    _set_iterations(usage, iterations)
    _set_wall_time_s(usage, wall_time_s)
    _set_fanout(usage, fanout)
    _set_depth(usage, depth)
    _set_max_values(usage, max_values)
    _set_custom(usage, custom)
    return usage


__all__ = ["EMPTY_USAGE", "Usage", "new_usage"]
