"""Sparse attention methods: each turns q/k (or just the grid) into an AttentionPlan.

One file per method: a documented config dataclass, a planner, the functional
``<method>_attention(q, k, v, grid, config=None, **overrides)`` that builds the plan and runs it
on a backend, a plain definition the tests compare the plan with, and one
``register_method(Method(...))`` that makes the method known everywhere (processors, CLI,
fine-tuning). See :mod:`.registry` for the calling convention.
"""

from .registry import Method, get_method, method_names, register_method, unregister_method

__all__ = ["Method", "get_method", "method_names", "register_method", "unregister_method"]
