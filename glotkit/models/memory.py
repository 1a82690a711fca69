"""Peak memory: resident set size on CPU (VmHWM, resettable), allocated memory on CUDA."""

from __future__ import annotations

from pathlib import Path


def reset_peak(device: str = "cpu") -> None:
    """Start a new peak measurement (best effort: Linux lets a process reset its own VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB since the last reset."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def file_backed_rss_mb() -> float | None:
    """The part of resident memory that is pages of mapped files (Linux ``RssFile``; None elsewhere):
    memory-mapped weights count here."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("RssFile:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_memory(device: str = "cpu") -> dict[str, float]:
    out = {"peak_rss_mb": round(peak_rss_mb(), 1)}
    if device.startswith("cuda"):
        import torch

        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out
