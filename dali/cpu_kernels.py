"""The CPU kernels the built-in world trains with, pinned so that the same commit prints the same table on every
Intel x86-64 host of our kind, and what a results file records of them.

A model trained from scratch amplifies the last bit of every sum, and three libraries choose their code by the
processor: ATen dispatches its vectorised kernels by instruction set (AVX-512 or AVX2), MKL picks GEMM and FFT code
paths (and cache blockings) by vendor and instruction set, and oneDNN JIT-compiles convolutions for the processor
it finds. Pinned: ATen to AVX2 (``ATEN_CPU_CAPABILITY``), MKL to its conditional numerical reproducibility branch
for AVX2 (``MKL_CBWR``: fixed blockings, deterministic reductions, static scheduling), oneDNN off (convolutions then
run as im2col + MKL GEMM; ``ONEDNN_MAX_CPU_ISA`` caps what is left of it), OpenBLAS (numpy's) to its Haswell
kernels, and two threads. The first three are read when torch loads, so the ``dali`` entry sets them before it
imports a pinned command (:data:`PINNED_COMMANDS`); a variable the user set is kept, and recorded;
``DALI_NATIVE_KERNELS=1`` pins nothing.

MKL honours its AVX2 branch on Intel processors only: on others it runs its own dispatch whatever ``MKL_CBWR``
names, except the ``COMPATIBLE`` branch (SSE2, about twice the GEMM time), which it honours everywhere. So the pinned
table is shared by Intel hosts, and an AMD host's table is its own; :func:`mkl_branch` says which, and the cache
keys and results.json carry it. docs/results.md measures the cost and what stays host-dependent.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

PINNED_COMMANDS = ("world", "demo", "reproduce")
PINNED_ENVIRONMENT = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OPENBLAS_CORETYPE": "Haswell",
}
THREADS = 2


NATIVE = "DALI_NATIVE_KERNELS"  # =1: the processor's own kernels (faster on AVX-512, tables of this host only)


def pin_environment() -> None:
    """Set the pinned variables the user has not set; before torch (and numpy) load, or they have no effect."""
    if os.environ.get(NATIVE) == "1":
        return
    for name, value in PINNED_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def pin_torch(threads: int | None = THREADS) -> None:
    """What is pinned after torch loads: oneDNN off (unless DALI_NATIVE_KERNELS=1) and, unless None, a fixed
    number of threads (the order of every sum)."""
    import torch

    torch.backends.mkldnn.enabled = os.environ.get(NATIVE) == "1"
    if threads is not None:
        torch.set_num_threads(threads)


def kernels_key() -> dict:
    """What of the kernels a model trained here depends on: part of the world's cache keys, so a captioner or
    encoder trained under other kernels (unpinned, or on a host whose unpinned kernels differ) is retrained."""
    import torch

    return {
        "aten": torch.backends.cpu.get_cpu_capability(),
        "mkl_cbwr": mkl_branch() or _own_dispatch(),
        "mkldnn": torch.backends.mkldnn.enabled,
        "threads": torch.get_num_threads(),
    }


def mkl_branch() -> str | None:
    """``MKL_CBWR`` where MKL honours it (any branch on an Intel processor, COMPATIBLE on every one); None where
    GEMMs run the processor's own dispatch: without it, or on another vendor's processor (on an AMD EPYC,
    MKL_CBWR=AVX2, AVX512, SSE4_2 and AUTO gave the bits of no setting, COMPATIBLE others: docs/results.md)."""
    branch = os.environ.get("MKL_CBWR")
    if branch is None or processor().get("vendor_id") == "GenuineIntel" or _branch_name(branch) == "COMPATIBLE":
        return branch
    return None


def _branch_name(branch: str) -> str:
    """MKL_CBWR's branch: "BRANCH=AVX2,STRICT" -> "AVX2"."""
    return branch.upper().removeprefix("BRANCH=").split(",")[0].strip()


def shared_with() -> str:
    """Which hosts print the same table as this one, as far as the kernels decide."""
    branch, aten = mkl_branch(), os.environ.get("ATEN_CPU_CAPABILITY")
    name = None if branch is None else _branch_name(branch)
    if name in (None, "AUTO") or aten is None:
        return "this processor only: kernels chosen by the processor (docs/results.md, Reproducibility)"
    if name == "COMPATIBLE":
        return f"every x86-64 processor, with ATen at {aten.upper()}, under the same settings"
    return f"Intel processors with {name}, with ATen at {aten.upper()}, under the same settings"


def _own_dispatch() -> str:
    facts = processor()
    return f"own dispatch on {facts.get('vendor_id', 'unknown')} {facts.get('model name', '')}".strip()


def processor() -> dict[str, str]:
    """The processor's vendor and model, from /proc/cpuinfo where there is one."""
    facts = {"machine": platform.machine()}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("vendor_id", "model name") and key.strip() not in facts:
                facts[key.strip()] = value.strip()
    return facts


def kernel_facts() -> dict:
    """The processor and the kernel settings in force: what results.json records beside a table."""
    import torch

    return {
        "processor": processor(),
        "torch": torch.__version__,
        **kernels_key(),
        "environment": {name: os.environ.get(name) for name in (*PINNED_ENVIRONMENT, NATIVE)},
        "pinned": all(os.environ.get(name) == value for name, value in PINNED_ENVIRONMENT.items()),
        "same_table_on": shared_with(),
    }
