"""Sparse attention methods: each turns q/k (or just the grid) into an AttentionPlan.

One file per method: a documented config dataclass, ``plan_<method>(...)`` and the functional
``<method>_attention(q, k, v, grid, ...)`` that builds the plan and runs it on a backend.
"""
