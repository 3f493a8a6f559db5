"""What the benchmarks ran on, printed above every table: CPU model, the instruction-set
extensions that decide matmul speed (AVX2, AVX-512, AMX), cores, torch's threads and kernel
capability, the load average (timings from a loaded machine are not results), the allocator,
and the git commit."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ISA = ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
       "amx_int8", "neon", "asimd", "sve"]


def _cpuinfo() -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            out.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return out


def _physical_cores() -> int | None:
    try:
        pairs = set()
        block: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines() + [""]:
            if not line.strip():
                if "physical id" in block or "core id" in block:
                    pairs.add((block.get("physical id"), block.get("core id")))
                block = {}
                continue
            key, _, value = line.partition(":")
            block[key.strip()] = value.strip()
        return len(pairs) or None
    except OSError:
        return None


def _git() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except OSError:
        return "?"


def machine_info(device: torch.device) -> dict:
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    out = {
        "cpu": info.get("model name") or platform.processor() or platform.machine(),
        "isa": [f for f in ISA if f in flags],
        "physical_cores": _physical_cores(), "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
        "load_avg": [round(x, 2) for x in load], "git": _git(),
    }
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def describe(info: dict) -> list[str]:
    """Header lines for a table."""
    cores = f"{info['physical_cores']} cores / " if info["physical_cores"] else ""
    lines = [
        f"machine: {info['cpu']} | {cores}{info['logical_cpus']} logical CPUs | ISA: {' '.join(info['isa']) or '?'} "
        f"(torch kernels: {info['cpu_capability']}) | device {info['device']}" + (f" ({info['gpu']})" if "gpu" in info else ""),
        f"torch {info['torch']}, {info['torch_threads']} threads | python {info['python']} | git {info['git']} "
        f"| load average {info['load_avg'][0]} at start",
    ]
    if info["load_avg"][0] > 0.5 * (info["logical_cpus"] or 1):
        lines.append(f"WARNING: load average {info['load_avg'][0]} on {info['logical_cpus']} CPUs: other jobs share "
                     "this machine, so wall-clock times and ratios are not results")
    return lines
