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

import hashlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from . import blocks, common, estimate, routed, window
from .common import INTERPRET
from .tiles import GPU_TILES, HOPPER, MIN_TILE, Tiles, gpu_tiles, launch_options

# Pointer arguments by kind (others: the dtype of q, k, v); every other argument is an int32
# except the two scales.
_POINTERS_F32 = {"LSE", "DELTA", "ACC", "M", "L", "BLOCK_MAX", "SPREAD", "VARIANCE"}
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
    maxnreg: int | None
    dtype: str

    def label(self) -> str:
        switches = ",".join(f"{k}={v}" for k, v in sorted(self.constexprs.items()))
        cap = "" if self.maxnreg is None else f" r{self.maxnreg}"
        return f"{self.kernel}[{switches}] {self.dtype} w{self.num_warps} s{self.num_stages}{cap}"


KERNELS = {
    "rows": blocks._rows_kernel,
    "keys": blocks._keys_kernel,
    "box_rows": window._box_rows_kernel,
    "box_keys": window._box_keys_kernel,
    "routed_rows": routed._routed_rows_kernel,
    "estimate": estimate.sampled_stats,
}


def _key_widths(block_n: int) -> list[int]:
    """Every ``BLOCK_N`` a key-major launch can pick (per-level widths up to ``block_n``)."""
    widths, n = [], MIN_TILE
    while n <= block_n:
        widths.append(n)
        n *= 2
    return widths


def _row_shapes(tiles: Tiles) -> list[tuple[int, int]]:
    shapes = [(tiles.block_m, tiles.block_n)]
    if tiles.small_m is not None and tiles.small_m != tiles.block_m:
        shapes.append((tiles.small_m, tiles.block_n))
    return shapes


def variants(head_dim: int, dtype: str, major: int = HOPPER) -> list[Variant]:
    """Every (kernel, constexprs, launch option) a launch on a GPU of compute capability
    ``major`` can use at ``head_dim`` (= value head dim) in ``dtype``."""
    choice = gpu_tiles(head_dim, major)
    specs = []  # (kernel, tiles of its kind, BLOCK_M, BLOCK_N, switches)
    for kind, switches in (("forward", [dict(WINDOW=0, BACKWARD=False)]), ("dq", [dict(WINDOW=0, BACKWARD=True)]),
                           ("window", [dict(WINDOW=w, BACKWARD=b) for b in (False, True) for w in (1, 2)])):
        tiles = getattr(choice, kind)
        specs += [("rows", tiles, m, n, sw) for m, n in _row_shapes(tiles) for sw in switches]
    box = [dict(MASKED=m, DILATED=d) for m, d in ((False, False), (True, False), (True, True))]
    specs += [("box_rows", choice.window, m, n, dict(sw, BACKWARD=b))
              for m, n in _row_shapes(choice.window) for b in (False, True) for sw in box]
    keys = [dict(GATHER=False, WINDOW=w) for w in (0, 1, 2)] + [dict(GATHER=True, WINDOW=0)]
    for n in _key_widths(choice.keys.block_n):
        specs += [("keys", choice.keys, choice.keys.block_m, n, sw) for sw in keys]
        specs += [("box_keys", choice.keys, choice.keys.block_m, n, sw) for sw in box]
    specs += [("routed_rows", choice.routed, choice.routed.block_m, choice.routed.block_n, dict(BACKWARD=b))
              for b in (False, True)]
    base = dict(HEAD_D=head_dim, HEAD_DV=head_dim, UPCAST=False, PRECISION="tf32", COUNT_WORK=False)
    out = []
    for kernel, tiles, block_m, block_n, switches in specs:
        constexprs = {**base, **switches, "BLOCK_M": block_m, "BLOCK_N": block_n}
        for warps, stages, maxnreg in launch_options(tiles, block_m, block_n):
            out.append(Variant(kernel, constexprs, warps, stages, maxnreg, dtype))
    return out


def estimate_variants(head_dim: int, dtype: str) -> list[Variant]:
    """The PSA importance-estimate kernel as planning launches it (Triton's default 4 warps and
    3 stages) at the default sampling of blocks of 64 and 128 (a quarter of the block: 16 and 32
    samples, the most it takes), with and without the budget mode's statistics. Not in
    :func:`variants` (nor the committed attention-kernel table): the spill test compiles these."""
    out = []
    for samples in (16, 32):
        for stats in (False, True):
            constexprs = dict(SQ=samples, SK=samples, SPREAD_STRIDE=4, HEAD_D=head_dim, SQ_PAD=samples,
                              SK_PAD=samples, STATS=stats, UPCAST=False, PRECISION="ieee")
            out.append(Variant("estimate", constexprs, 4, 3, None, dtype))
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


def code_key() -> str:
    """A hash of what decides the variants and their machine code: the source of every
    ``@triton.jit`` function of the kernel modules, their constexpr globals, and the tile table
    (Triton's own cache key also changes when a function merely moves down its file)."""
    digest = hashlib.sha256()
    for module in (common, blocks, window, routed):
        for name, value in sorted(vars(module).items()):
            if isinstance(value, JITFunction) and value.fn.__module__ == module.__name__:
                digest.update(f"{module.__name__}.{name}:{value.src}".encode())
            elif isinstance(value, tl.constexpr):
                digest.update(f"{module.__name__}.{name}={value.value!r}".encode())
    digest.update(repr(GPU_TILES).encode())
    return digest.hexdigest()


def cuobjdump() -> str | None:
    """Path of the ``cuobjdump`` in Triton's wheel, or ``None``."""
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.access(path, os.X_OK) else None


def why_not_available() -> str | None:
    """Why variants cannot be compiled here (``None`` when they can)."""
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except ImportError as err:
        return f"the installed Triton has no CUDA backend ({err})"
    if cuobjdump() is None:
        return "cuobjdump is missing from the installed Triton's CUDA backend"
    if INTERPRET:
        return "the kernel modules were imported under TRITON_INTERPRET=1 (the interpreter's kernels do not compile)"
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
                              options=dict(num_warps=variant.num_warps, num_stages=variant.num_stages,
                                           maxnreg=variant.maxnreg))
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


__all__ = ["KERNELS", "Variant", "code_key", "compile_variant", "cuobjdump", "estimate_variants", "variants",
           "why_not_available"]
