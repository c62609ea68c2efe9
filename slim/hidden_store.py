"""Where the evaluation requests' hidden states wait between decoder layers: device, host memory, or a file.

One slot per batch ([b, T_b, H]); a layer's output replaces its input in the same slot, so one copy of every
request's hidden states is held, never two. ``disk`` keeps them in a memory-mapped file on local disk (the kernel
writes pages back and evicts them as memory runs short): the way out when they fit neither the device nor host
memory. ``choose_store`` is the rule the memory plan (slim.plan) and the streamed backend share.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

STORES = ("auto", "device", "host", "disk")
DEVICE_SHARE = 0.5  # hidden states may use this share of free device memory (the layer and logits need the rest)
HOST_SHARE = 0.5  # ... and of the host memory available to the rank


def choose_store(requested: str, nbytes: int, device: torch.device, device_bytes: int, host_bytes: int) -> str:
    """``requested`` unless ``auto``: the device when they fit there (a GPU), else host memory, else disk."""
    if requested != "auto":
        return "host" if requested == "device" and device.type == "cpu" else requested
    if device.type != "cpu" and nbytes <= DEVICE_SHARE * device_bytes:
        return "device"
    return "host" if host_bytes <= 0 or nbytes <= HOST_SHARE * host_bytes else "disk"


def host_available_bytes() -> int:
    """Memory this process may still use: MemAvailable of /proc/meminfo (0 when unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class HiddenStore:
    """Slots for ``shapes`` ([b, T, H] each) of ``dtype`` on ``where`` (device | host | disk)."""

    def __init__(self, shapes: list[tuple[int, int, int]], dtype: torch.dtype, where: str, device: torch.device,
                 spill_dir: Path | None = None):
        self.where, self.device, self.dtype = where, device, dtype
        self.slots: list[torch.Tensor | None] = [None] * len(shapes)
        self.path: Path | None = None
        if where == "disk":
            spill_dir = Path(spill_dir or ".")
            spill_dir.mkdir(parents=True, exist_ok=True)
            self.path = spill_dir / f"hidden_states.{os.getpid()}.bin"
            total = sum(math.prod(s) for s in shapes)
            with open(self.path, "wb") as f:
                f.truncate(max(total, 1) * dtype.itemsize)
            flat = torch.from_file(str(self.path), shared=True, size=max(total, 1), dtype=dtype)
            offset = 0
            for i, shape in enumerate(shapes):
                n = math.prod(shape)
                self.slots[i] = flat[offset:offset + n].view(shape)
                offset += n

    @property
    def store_device(self) -> torch.device:
        return self.device if self.where == "device" else torch.device("cpu")

    def put(self, i: int, hidden: torch.Tensor) -> None:
        if self.where == "disk":
            self.slots[i].copy_(hidden)
        else:
            self.slots[i] = hidden.to(self.store_device)

    def get(self, i: int) -> torch.Tensor:
        """Slot ``i`` on the compute device (a copy for disk slots, which ``put`` then overwrites)."""
        t = self.slots[i]
        return t.to(self.device, copy=self.where == "disk")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.slots if t is not None)

    def close(self) -> None:
        self.slots = [None] * len(self.slots)
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None
