"""The machine a benchmark ran on, described one way for every script in bench/ (DEVELOPERS: record the CPU and
its flags with every number; compare only within one run).

    from machine import describe, line   # bench/ is each script's folder
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

# the flags that pick the trunk's and the head's kernels: AVX-512 and its bf16 / VNNI parts, AMX
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")


def describe() -> dict:
    """{cpu, cores, flags (those of KERNEL_FLAGS present, in that order), torch, threads, python}."""
    model, flags = "", []
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name") and not model:
                model = text.split(":", 1)[1].strip()
            if text.startswith("flags") and not flags:
                flags = text.split(":", 1)[1].split()
    except OSError:
        pass
    out = {"cpu": model or platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "flags": " ".join(f for f in KERNEL_FLAGS if f in flags) or "none", "python": platform.python_version()}
    try:
        import torch
    except ImportError:
        return out
    return {**out, "torch": torch.__version__, "threads": torch.get_num_threads()}


def line() -> str:
    """describe() in one line: 'AMD EPYC ..., 2 cores, avx2 avx512f ..., torch 2.14.1, 2 threads'."""
    d = describe()
    return ", ".join([d["cpu"], f"{d['cores']} cores", d["flags"]]
                     + ([f"torch {d['torch']}", f"{d['threads']} threads"] if "torch" in d else []))
