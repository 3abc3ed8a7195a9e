"""Guardrail policies: the expression language, policy documents and the evaluation engine.

One library for both the router (in process, every step) and the guardrail service
(validation, and the batched ``Evaluate`` RPC).
"""

from .document import (
    MAX_NESTING,
    MAX_POLICY_BYTES,
    MAX_RULES,
    CompiledPolicy,
    CompiledRule,
    load_policy,
    validate_policy,
)
from .engine import (
    EVALUATION_ERROR,
    SNAPSHOT_EXPIRED,
    SNAPSHOT_MISSING,
    SNAPSHOT_TENANT_MISMATCH,
    EvaluationContext,
    PolicyEngine,
)
from .language import (
    KNOWN_NAMES,
    METRICS,
    Env,
    EvaluationError,
    Expression,
    ExpressionError,
    Type,
    compile_expression,
)
from .usage import EMPTY_USAGE, Usage

__all__ = [
    "EMPTY_USAGE",
    "EVALUATION_ERROR",
    "KNOWN_NAMES",
    "MAX_NESTING",
    "MAX_POLICY_BYTES",
    "MAX_RULES",
    "METRICS",
    "SNAPSHOT_EXPIRED",
    "SNAPSHOT_MISSING",
    "SNAPSHOT_TENANT_MISMATCH",
    "CompiledPolicy",
    "CompiledRule",
    "Env",
    "EvaluationContext",
    "EvaluationError",
    "Expression",
    "ExpressionError",
    "PolicyEngine",
    "Type",
    "Usage",
    "compile_expression",
    "load_policy",
    "validate_policy",
]
