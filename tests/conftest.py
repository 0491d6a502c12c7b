"""Shared test helpers: fresh random inputs and a per-dtype tolerance table."""

from __future__ import annotations

import zlib

import pytest
import torch

# Absolute tolerance vs the float64 reference, per input dtype (outputs are O(1)).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def random_qkv(B, N, H, D, *, dtype=torch.float32, seed=0, device="cpu", requires_grad=False):
    """Fresh ``[B, N, heads, D]`` q, k, v from a seeded generator (differs per seed)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = [torch.randn(B, N, H, D, generator=g).to(device=device, dtype=dtype) for _ in range(3)]
    if requires_grad:
        for t in out:
            t.requires_grad_(True)
    return out


def assert_close(actual, expected, dtype, what=""):
    tol = TOLERANCE[dtype]
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.1g} ({dtype})"


@pytest.fixture
def seed(request):
    """A different seed per test case (fresh inputs for every case), reproducible per test id."""
    return zlib.crc32(request.node.nodeid.encode())
