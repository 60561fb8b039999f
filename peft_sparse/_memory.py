"""Memory as the library, the command line and the benchmarks read it.

Peak memory of this process: peak allocated CUDA memory on a GPU; on a CPU the process's peak resident set (``VmHWM``
in ``/proc/self/status``, Linux), which counts the model, activations, gradients, optimizer state and the
Python/torch runtime itself. ``getrusage``'s ``ru_maxrss`` is not used: it carries the parent's peak over ``fork`` +
``exec``. Free memory (:func:`free_memory_bytes`): what a device can still give, which selection's default budget
is taken from."""

from __future__ import annotations

from pathlib import Path


def process_status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...), or None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:  # not Linux
        pass
    return None


def reset_peak_memory(device: str) -> None:
    """Start the peak count here (so that, e.g., loading a model is left out): CUDA's peak statistics, or on a CPU
    ``VmHWM`` restarted from the current resident set (``/proc/self/clear_refs``, Linux >= 4.0; where that is not
    permitted the peak keeps counting from the process's start)."""
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_bytes(device: str) -> int | None:
    """The peak since the last :func:`reset_peak_memory` (or the process's start), or None where it cannot be read."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated()
    peak = process_status_kib("VmHWM")
    return None if peak is None else peak * 1024


def free_memory_bytes(device) -> int | None:
    """Bytes ``device`` can still give this process: on a GPU the driver's free memory plus what PyTorch's caching
    allocator holds unused; on a CPU the kernel's ``MemAvailable`` (``/proc/meminfo``, Linux). None where unknown."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:  # not Linux
        pass
    return None
