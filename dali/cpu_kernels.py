"""The CPU kernels the built-in world trains with, pinned so that the same commit prints the same table on every
x86-64 host of our kind, and what a results file records of them.

A model trained from scratch amplifies the last bit of every sum, and three libraries choose their code by the
processor: ATen dispatches its vectorised kernels by instruction set (AVX-512 here, AVX2 on an AMD EPYC of Zen 2
or 3), MKL picks GEMM and FFT code paths (and cache blockings) by vendor and instruction set, and oneDNN JIT-compiles
convolutions for the processor it finds. Pinned: ATen to AVX2 (``ATEN_CPU_CAPABILITY``), MKL to its conditional
numerical reproducibility branch for AVX2 (``MKL_CBWR``: fixed blockings, deterministic reductions, static
scheduling), oneDNN off (convolutions then run as im2col + MKL GEMM; ``ONEDNN_MAX_CPU_ISA`` caps what is left of
it), OpenBLAS (numpy's) to its Haswell kernels, and two threads. The first three are read when torch loads, so the
``dali`` entry sets them before it imports a pinned command (:data:`PINNED_COMMANDS`); a variable the user set is
kept, and recorded; ``DALI_NATIVE_KERNELS=1`` pins nothing. docs/results.md measures the cost and says what stays
host-dependent.
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
        "mkl_cbwr": os.environ.get("MKL_CBWR"),
        "mkldnn": torch.backends.mkldnn.enabled,
        "threads": torch.get_num_threads(),
    }


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
    }
