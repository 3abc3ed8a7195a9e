"""The guardrail engine: evaluate a tenant's policy snapshot against one step, failing closed.

The router calls ``PolicyEngine.evaluate`` in process on every step, and the guardrail service's
batched ``Evaluate`` calls the same code, so both reach the same decision from the same inputs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from tickmesh.sdk.errors import ValidationError
from tickmesh.v1 import guardrail_pb2, header_pb2

from .document import CompiledPolicy, CompiledRule, load_policy
from .language import Env, EvaluationError, Fn
from .usage import EMPTY_USAGE, Usage

ALLOW: Final = guardrail_pb2.GUARDRAIL_ACTION_ALLOW
REJECT: Final = guardrail_pb2.GUARDRAIL_ACTION_REJECT_EXECUTION
PAUSE: Final = guardrail_pb2.GUARDRAIL_ACTION_PAUSE_LIFETIME
ABORT: Final = guardrail_pb2.GUARDRAIL_ACTION_ABORT_LIFETIME

# Strictness, for "the strictest action wins" (ABORT > PAUSE > REJECT > ALLOW).
_RANK: Final[dict[int, int]] = {ALLOW: 0, REJECT: 1, PAUSE: 2, ABORT: 3}
_PHASES: Final[frozenset[int]] = frozenset(
    {guardrail_pb2.GUARDRAIL_PHASE_PRE_DISPATCH, guardrail_pb2.GUARDRAIL_PHASE_POST_RESULT}
)
_LIFETIME: Final = guardrail_pb2.GUARDRAIL_SCOPE_LIFETIME
_TENANT: Final = guardrail_pb2.GUARDRAIL_SCOPE_TENANT
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

SNAPSHOT_MISSING: Final = "snapshot_missing"
SNAPSHOT_EXPIRED: Final = "snapshot_expired"
SNAPSHOT_TENANT_MISMATCH: Final = "snapshot_tenant_mismatch"
EVALUATION_ERROR: Final = "evaluation_error"


def _tenant_usage_unavailable(window_s: float | None) -> Usage:
    # A tenant-scope rule with no tenant counters must not evaluate against zeros (an allow).
    raise LookupError("tenant usage was not provided")


@dataclass(frozen=True, slots=True)
class EvaluationContext:
    """Everything one evaluation reads besides the snapshot."""

    phase: int
    """``guardrail_pb2.GuardrailPhase``: which rules run."""
    header: header_pb2.EnvelopeHeader
    """The step's header: node, graph, labels, attempt, tenant."""
    execution: Usage = EMPTY_USAGE
    """This execution's usage (post_result), or empty."""
    estimate: Usage = EMPTY_USAGE
    """The step's estimated usage (pre_dispatch), or empty."""
    lifetime: Usage = EMPTY_USAGE
    """The lifetime's cumulative usage, including this execution."""
    tenant_usage: Callable[[float | None], Usage] = _tenant_usage_unavailable
    """Window in seconds (``None`` = all time) -> the tenant's cumulative usage; called at most
    once per distinct window per evaluation, and only when a tenant-scope rule runs."""


def _detail(exc: Exception) -> str:
    if isinstance(exc, ZeroDivisionError):
        return "division by zero"
    if isinstance(exc, EvaluationError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _fmt(value: float) -> str:
    return f"{value:.15g}"


def _add_violation(
    decision: guardrail_pb2.GuardrailDecision, rule: CompiledRule, env: Env, *, dry_run: bool
) -> None:
    when = rule.when
    observed, limit = when.measure(env)
    if rule.message:
        message = rule.message
    elif when.observed is not None:
        message = f"{when.metric} = {_fmt(observed)}, limit {_fmt(limit)} ({when.summary})"
    else:
        message = f"{when.summary} holds"
    # Violation has no dry-run flag; the prefix keeps a mixed decision readable.
    if dry_run:
        message = "dry run: " + message
    # Built in place: copying finished messages into the decision costs more than the rule.
    decision.violations.add(
        rule_id=rule.id,
        scope=rule.scope,
        metric=when.metric,
        observed=observed,
        limit=limit,
        message=message,
        action=rule.action,
    )


# What the rule loop needs, unpacked once per compiled policy: (test, scope, window, rule).
_Step = tuple[Fn, int, float | None, CompiledRule]


@dataclass(frozen=True, slots=True)
class _Prepared:
    policy: CompiledPolicy
    steps: Mapping[int, tuple[_Step, ...]]

    @staticmethod
    def of(policy: CompiledPolicy) -> _Prepared:
        steps = {
            phase: tuple((r.when.test, r.scope, r.window_s, r) for r in policy.rules_for(phase))
            for phase in _PHASES
        }
        return _Prepared(policy, steps)


class PolicyEngine:
    """Evaluates policy snapshots. Compiled policies are cached by digest, never per step.

    One engine serves every tenant and may be shared between threads: it holds no per-step
    state, and its cache only ever gains or drops whole entries.
    """

    def __init__(self, *, cache_size: int = 1024) -> None:
        self._cache: dict[str, _Prepared | ValidationError] = {}
        self._by_source: dict[str, _Prepared | ValidationError] = {}
        self._cache_size = cache_size

    def compile(self, policy: guardrail_pb2.Policy) -> CompiledPolicy:
        """The compiled form of ``policy``, cached by its digest.

        Raises:
            ValidationError: the source does not load, or does not match its digest.
        """
        found = self._lookup(policy)
        if isinstance(found, ValidationError):
            raise found
        return found.policy

    def _lookup(self, policy: guardrail_pb2.Policy) -> _Prepared | ValidationError:
        digest = policy.digest
        # Without a digest (a hand-built snapshot) the text itself is the key: a string hash
        # per step instead of a SHA-256.
        cache = self._cache if digest else self._by_source
        key = digest or policy.source
        found = cache.get(key)
        if found is not None:
            return found
        source = policy.source
        result: _Prepared | ValidationError
        actual = hashlib.sha256(source.encode("utf-8", errors="surrogatepass")).hexdigest()
        if digest and digest.lower() != actual:
            # Checked once per digest: a policy cached under another's digest would silently
            # enforce the wrong rules.
            result = ValidationError(f"policy {policy.policy_id!r}: digest does not match source")
        else:
            try:
                name = f"{policy.tenant_id}/{policy.policy_id}"
                result = _Prepared.of(load_policy(source, name=name))
            except ValidationError as exc:
                result = exc
        if len(cache) >= self._cache_size:
            # Oldest first: policies change rarely, so FIFO is as good as LRU here.
            cache.pop(next(iter(cache)), None)
        cache[key] = result
        return result

    def reads_usage(
        self,
        snapshot: guardrail_pb2.PolicySnapshot | None,
        phase: int,
        graph_id: str,
    ) -> bool:
        """Whether :meth:`evaluate` of ``phase`` could read any usage in ``ctx``: False only
        when every policy of the snapshot that applies to ``graph_id`` compiles and has no
        rule in ``phase`` (the caller may then pass empty usage and skip building it). A
        missing snapshot or a policy that does not compile answers True, so the caller
        builds what it would anyway and ``evaluate`` decides as it always does."""
        if snapshot is None:
            return True
        for policy in snapshot.policies:
            if policy.graph_id and policy.graph_id != graph_id:
                continue
            found = self._lookup(policy)
            if isinstance(found, ValidationError) or found.steps.get(phase):
                return True
        return False

    def evaluate(
        self,
        snapshot: guardrail_pb2.PolicySnapshot | None,
        ctx: EvaluationContext,
        *,
        now: datetime,
        graph_id: str = "",
    ) -> guardrail_pb2.GuardrailDecision:
        """Decide what the router does with one step.

        Args:
            snapshot: The tenant's newest policy snapshot, or ``None`` if the router has none.
            ctx: The step: phase, header and the usage of each scope.
            now: The current time (timezone-aware), checked against the snapshot's lease.
            graph_id: The graph the step belongs to; defaults to ``ctx.header.graph.id``.
                Policies bound to another graph are skipped.

        Returns:
            The decision. It fails closed: a missing or expired snapshot, or any error while
            evaluating an enforced policy, is at least a REJECT_EXECUTION with its reason.

        Raises:
            ValueError: ``now`` is naive (a local clock would shift the lease).
        """
        phase = ctx.phase
        if snapshot is None:
            return _refusal(phase, SNAPSHOT_MISSING)
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        delta = now - _EPOCH
        now_ns = ((delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds) * 1000
        issued, lease = snapshot.issued_at, snapshot.lease
        expires_ns = (issued.seconds + lease.seconds) * 1_000_000_000 + issued.nanos + lease.nanos
        if now_ns > expires_ns:
            return _refusal(phase, SNAPSHOT_EXPIRED)
        header = ctx.header
        if snapshot.tenant_id and header.tenant_id and snapshot.tenant_id != header.tenant_id:
            return _refusal(phase, SNAPSHOT_TENANT_MISMATCH)
        if phase not in _PHASES:
            return _refusal(phase, f"{EVALUATION_ERROR}: unknown phase {phase}")
        if not snapshot.policies:
            return guardrail_pb2.GuardrailDecision(action=ALLOW, phase=phase)  # type: ignore[arg-type]
        return self._evaluate(snapshot, ctx, graph_id or header.graph.id)

    def _evaluate(
        self,
        snapshot: guardrail_pb2.PolicySnapshot,
        ctx: EvaluationContext,
        graph_id: str,
    ) -> guardrail_pb2.GuardrailDecision:
        phase = ctx.phase
        execution = ctx.execution
        env = Env(execution, ctx.estimate, ctx.header)
        decision: guardrail_pb2.GuardrailDecision | None = None
        # (rank, policy id, policy version, reason) of the strictest outcome so far, for the
        # enforced policies and for the dry-run ones.
        enforced: _Outcome | None = None
        dry: _Outcome | None = None
        tenant: dict[float | None, Usage] = {}
        for policy in snapshot.policies:
            if policy.graph_id and policy.graph_id != graph_id:
                continue
            found = self._lookup(policy)
            if isinstance(found, ValidationError):
                problem = found.issues[0] if found.issues else found
                reason = f"{EVALUATION_ERROR}: policy {policy.policy_id!r} v{policy.version} "
                outcome = (_RANK[REJECT], policy.policy_id, policy.version, f"{reason}{problem}")
                if policy.dry_run:
                    dry = _stricter(dry, outcome)
                else:
                    enforced = _stricter(enforced, outcome)
                continue
            steps = found.steps.get(phase)
            if not steps:
                continue
            is_dry: bool | None = None
            for test, scope, window, rule in steps:
                try:
                    if scope == _LIFETIME:
                        env.usage = ctx.lifetime
                    elif scope == _TENANT:
                        usage = tenant.get(window)
                        if usage is None:
                            usage = tenant[window] = ctx.tenant_usage(window)
                        env.usage = usage
                    else:
                        env.usage = execution
                    if not test(env):
                        continue
                    if decision is None:
                        decision = guardrail_pb2.GuardrailDecision(phase=phase)  # type: ignore[arg-type]
                    if is_dry is None:
                        is_dry = policy.dry_run or found.policy.dry_run
                    _add_violation(decision, rule, env, dry_run=is_dry)
                    outcome = (_RANK[rule.action], *_identity(policy, found.policy), "")
                # The fail-closed boundary: whatever goes wrong in a rule becomes a rejection
                # with its reason, never an exception in the router's step loop.
                except Exception as exc:
                    policy_id, version = _identity(policy, found.policy)
                    reason = f"{EVALUATION_ERROR}: policy {policy_id!r} rule {rule.id!r}: "
                    outcome = (_RANK[REJECT], policy_id, version, reason + _detail(exc))
                if is_dry is None:
                    is_dry = policy.dry_run or found.policy.dry_run
                if is_dry:
                    dry = _stricter(dry, outcome)
                else:
                    enforced = _stricter(enforced, outcome)
        if decision is None:
            decision = guardrail_pb2.GuardrailDecision(phase=phase)  # type: ignore[arg-type]
        if enforced is not None:
            rank, decision.policy_id, decision.policy_version, decision.reason = enforced
            decision.action = _ACTION_OF_RANK[rank]  # type: ignore[assignment]
        else:
            decision.action = ALLOW
            if dry is not None:
                _, decision.policy_id, decision.policy_version, decision.reason = dry
                decision.dry_run = True
        return decision


_Outcome = tuple[int, str, int, str]


def _identity(policy: guardrail_pb2.Policy, compiled: CompiledPolicy) -> tuple[str, int]:
    """The stored policy's id and version (the service's), else the document's own."""
    return policy.policy_id or compiled.id, policy.version or compiled.version


_ACTION_OF_RANK: Final = {rank: action for action, rank in _RANK.items()}


def _stricter(current: _Outcome | None, new: _Outcome) -> _Outcome:
    """The stricter outcome; on a tie the earlier one, but an error's reason is never lost."""
    if current is None or new[0] > current[0]:
        if current is not None and current[3] and not new[3]:
            return (*new[:3], current[3])
        return new
    if new[3] and not current[3]:
        return (*current[:3], new[3])
    return current


def _refusal(phase: int, reason: str) -> guardrail_pb2.GuardrailDecision:
    return guardrail_pb2.GuardrailDecision(
        action=REJECT,
        phase=phase,  # type: ignore[arg-type]
        reason=reason,
    )


__all__ = [
    "EVALUATION_ERROR",
    "SNAPSHOT_EXPIRED",
    "SNAPSHOT_MISSING",
    "SNAPSHOT_TENANT_MISMATCH",
    "EvaluationContext",
    "PolicyEngine",
    "Usage",
]
