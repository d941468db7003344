"""What machine a benchmark ran on: CPU model, vector/matrix ISA flags, cache sizes.

Shared by the bench scripts (they run as `python bench/X.py`, so this directory is on
sys.path). Reads `lscpu` (util-linux) and falls back to /proc/cpuinfo and sysfs.
"""
from __future__ import annotations

import os
import re
import subprocess
from typing import Dict, Optional

# flags that decide which kernels are fast (GEMM / int8 / bf16 paths)
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
             "amx_int8", "avx_vnni")
_UNITS = {"": 1, "B": 1, "K": 1024, "KIB": 1024, "KB": 1024, "M": 2**20, "MIB": 2**20, "MB": 2**20,
          "G": 2**30, "GIB": 2**30, "GB": 2**30}


def _lscpu() -> Dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True,
                             env=dict(os.environ, LC_ALL="C")).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    info = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


def _bytes(text: str) -> Optional[int]:
    """'32 MiB (1 instance)' / '512K' -> bytes (the total lscpu prints), None if unparsable."""
    m = re.match(r"\s*([\d.]+)\s*([KMG]?i?B?)", text, re.IGNORECASE)
    if not m:
        return None
    return int(float(m.group(1)) * _UNITS.get(m.group(2).upper(), 1))


def l3_bytes() -> int:
    """Total last-level (L3, else L2) cache of the machine in bytes (32 MiB if unknown)."""
    info = _lscpu()
    for key in ("L3 cache", "L2 cache"):
        if key in info and _bytes(info[key]):
            return int(_bytes(info[key]))
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            return int(_bytes(f.read()) or 32 * 2**20)
    except OSError:
        return 32 * 2**20


def cpu_flags() -> set:
    info = _lscpu()
    if "Flags" in info:
        return set(info["Flags"].split())
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def describe() -> str:
    """One line: model name, cores, ISA flags present, cache sizes, load average."""
    info = _lscpu()
    flags = cpu_flags()
    model = info.get("Model name", "unknown CPU")
    isa = " ".join(f for f in ISA_FLAGS if f in flags) or "none of " + "/".join(ISA_FLAGS)
    caches = ", ".join(f"{k.split()[0]} {info[k]}" for k in ("L1d cache", "L2 cache", "L3 cache")
                       if k in info)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"CPU: {model}, {os.cpu_count()} cpus; ISA: {isa}; caches: {caches or 'unknown'}; "
            f"load average {load:.1f}")
