"""The CPU a figure was measured on, as every benchmark reports it: its model name and the flags that decide which
kernels run (bf16 and AMX units, AVX-512 VNNI for our int4/int8 kernels)."""

from __future__ import annotations

import platform
import re
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def _cpuinfo() -> str:
    path = Path("/proc/cpuinfo")
    return path.read_text(encoding="utf-8") if path.exists() else ""


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, or the platform's processor name."""
    found = re.search(r"^model name\s*:\s*(.+)$", _cpuinfo(), re.MULTILINE)
    return found.group(1).strip() if found else platform.processor()


def cpu_flags() -> list[str]:
    """Which of FLAGS this CPU has, sorted."""
    present = set(_cpuinfo().split())
    return sorted(flag for flag in FLAGS if flag in present)
