"""Every kernel variant the library can launch, compiled for a GPU on any machine, with the
registers, local memory (spills) and shared memory it needs.

Triton compiles for a CUDA target without a GPU: :func:`compile_variant` builds the cubin of
one variant for ``sm_90`` (H100/H200) or ``sm_80`` (A100), and ``cuobjdump
--dump-resource-usage`` (shipped in Triton's wheel) reads its registers per thread (``REG``),
stack frame (``STACK``: spilled registers live there) and local memory (``LOCAL``).
:func:`variants` lists what the launches can use: each kernel, its constexpr switches, the
tiles :mod:`.tiles` can pick for a head dim, and the autotuner's ``(num_warps, num_stages)``
for those tiles. Used by ``bench/kernel_resources.py`` (the table in ``bench/results/``) and
the spill test.

The kernel modules must have been imported with ``TRITON_INTERPRET`` off (the interpreter's
kernels cannot be compiled).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

import triton

from . import blocks, routed, window
from .tiles import MIN_TILE, gpu_tiles, launch_options

# Pointer arguments by kind (others: the dtype of q, k, v); every other argument is an int32
# except the two scales.
_POINTERS_F32 = {"LSE", "DELTA", "ACC", "M", "L"}
_POINTERS_I8 = {"EMASK", "KMASK"}
_POINTERS_I64 = {"WORK"}
_POINTERS_I32 = {"Q_OFF", "ENT", "COUNTS", "ROWS_PER_ENTRY", "CODE", "GROUP", "LO_CODE", "HI_CODE", "LO_GROUP", "RANGES",
                 "ROWPTR", "ITEMS",
                 "TILES", "POS_OF_TOKEN", "TASKS", "POS"}
_POINTERS_DATA = {"Q", "K", "V", "O", "DO", "EK", "EV", "DK", "DV"}
_FLOATS = {"qk_scale", "sm_scale"}
DTYPES = {"bf16": "bf16", "fp16": "fp16"}


@dataclass(frozen=True)
class Variant:
    """One compiled kernel: name, constexpr values and launch options."""

    kernel: str
    constexprs: dict = field(hash=False)
    num_warps: int
    num_stages: int
    dtype: str

    def label(self) -> str:
        switches = ",".join(f"{k}={v}" for k, v in sorted(self.constexprs.items()))
        return f"{self.kernel}[{switches}] {self.dtype} w{self.num_warps} s{self.num_stages}"


KERNELS = {
    "rows": blocks._rows_kernel,
    "keys": blocks._keys_kernel,
    "box_rows": window._box_rows_kernel,
    "box_keys": window._box_keys_kernel,
    "routed_rows": routed._routed_rows_kernel,
}


def _key_widths(block_n: int) -> list[int]:
    """Every ``BLOCK_N`` a key-major launch can pick (per-level widths up to ``block_n``)."""
    widths, n = [], MIN_TILE
    while n <= block_n:
        widths.append(n)
        n *= 2
    return widths


def variants(head_dim: int, dtype: str) -> list[Variant]:
    """Every (kernel, constexprs, launch option) a GPU launch can use at ``head_dim`` (= value
    head dim) in ``dtype``."""
    choice = gpu_tiles(head_dim)
    base = dict(HEAD_D=head_dim, HEAD_DV=head_dim, UPCAST=False, PRECISION="tf32", COUNT_WORK=False)
    specs = []
    for block_m in sorted({choice.rows.block_m, choice.rows.small_m or choice.rows.block_m}):
        tile = dict(BLOCK_M=block_m, BLOCK_N=choice.rows.block_n)
        for backward in (False, True):
            for win in (False, True):
                specs.append(("rows", dict(tile, WINDOW=win, BACKWARD=backward)))
            specs.append(("box_rows", dict(tile, BACKWARD=backward)))
    for block_n in _key_widths(choice.keys.block_n):
        tile = dict(BLOCK_M=choice.keys.block_m, BLOCK_N=block_n)
        specs += [("keys", dict(tile, GATHER=False, WINDOW=False)), ("keys", dict(tile, GATHER=False, WINDOW=True)),
                  ("keys", dict(tile, GATHER=True, WINDOW=False)), ("box_keys", dict(tile))]
    for backward in (False, True):
        specs.append(("routed_rows", dict(BLOCK_M=choice.routed.block_m, BLOCK_N=choice.routed.block_n,
                                          BACKWARD=backward)))
    out = []
    for kernel, switches in specs:
        constexprs = {**base, **switches}
        for warps, stages in launch_options(constexprs["BLOCK_M"], constexprs["BLOCK_N"], head_dim):
            out.append(Variant(kernel, constexprs, warps, stages, dtype))
    return out


def _signature(fn, dtype: str, constexprs: dict):
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            continue
        if name in _POINTERS_DATA:
            kind = f"*{dtype}"
        elif name in _POINTERS_F32:
            kind = "*fp32"
        elif name in _POINTERS_I8:
            kind = "*i8"
        elif name in _POINTERS_I64:
            kind = "*i64"
        elif name in _POINTERS_I32:
            kind = "*i32"
        else:
            kind = "fp32" if name in _FLOATS else "i32"
        signature[name] = kind
        if kind.startswith("*"):  # torch allocations are 16-byte aligned, as a launch sees them
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def cuobjdump() -> str | None:
    """Path of the ``cuobjdump`` in Triton's wheel, or ``None``."""
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.access(path, os.X_OK) else None


def why_not_available() -> str | None:
    """Why variants cannot be compiled here (``None`` when they can)."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as err:
        return f"the installed Triton has no CUDA backend ({err})"
    if cuobjdump() is None:
        return "cuobjdump is missing from the installed Triton's CUDA backend"
    if isinstance(blocks._rows_kernel, type(None)) or not hasattr(blocks._rows_kernel, "arg_names"):
        return "the kernel modules were imported under TRITON_INTERPRET=1"
    return None


_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def compile_variant(variant: Variant, arch: int) -> dict:
    """Compile one variant for ``sm_<arch>``; its ``registers``, ``stack`` and ``local`` bytes
    per thread, ``shared`` bytes (static + dynamic) and ``spills`` (stack or local > 0)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = KERNELS[variant.kernel]
    signature, attrs = _signature(fn, variant.dtype, variant.constexprs)
    source = ASTSource(fn, signature, constexprs=variant.constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=variant.num_warps, num_stages=variant.num_stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
        path = f.name
    try:
        dump = subprocess.run([cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(path)
    found = _USAGE.search(dump)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output for {variant.label()}: {dump!r}")
    reg, stack, static_shared, local = (int(x) for x in found.groups())
    return {"registers": reg, "stack": stack, "local": local, "shared": static_shared + compiled.metadata.shared,
            "spills": stack > 0 or local > 0}


__all__ = ["KERNELS", "Variant", "compile_variant", "cuobjdump", "variants", "why_not_available"]
