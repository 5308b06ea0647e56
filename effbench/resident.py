"""GPU-resident training data: in-memory uint8 images moved to the device once per fit.

Small and medium datasets (digits, CIFAR-10, the synthetic set, pre-resized caches) are held as
one uint8 tensor; on a GPU, copying every batch from host memory costs up to a quarter of the
step time of a small model (``scripts/bench_gpu.py``: resnet18 bf16, 10,577 img/s with the images
on the GPU vs 7,680 copied per step). The hardware plan decides how much GPU memory data may take
(``hardware.data_on_device``); this callback only carries it out, before the loaders are built.
"""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from effbench.data.base import ImageDataModule, TensorImages

log = logging.getLogger(__name__)


class DeviceImages(TensorImages):
    """:class:`TensorImages` on a GPU. The batch index travels through pinned memory without
    blocking: indexing a device tensor with a host index would copy it from pageable memory, which
    waits for every queued kernel, a full synchronisation per step."""

    def __getitems__(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor(idx, dtype=torch.long).pin_memory().to(self.images.device,
                                                                    non_blocking=True)
        return self.images[index], self.labels[index]


class ResidentData(Callback):
    """Moves a datamodule's in-memory splits to the training device when they fit the plan's
    share of its memory; records what it did (``facts``)."""

    def __init__(self, datamodule: ImageDataModule, share: float) -> None:
        self.datamodule, self.share = datamodule, float(share)
        self.facts: dict[str, Any] = {"on_device": False}
        self._pin = datamodule.pin_memory
        self._host: dict[str, TensorImages] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        device = trainer.strategy.root_device
        if device.type != "cuda":
            self.facts = {"on_device": False, "why": f"{device.type}: the images already are in "
                          "the memory the model reads (hardware.data_on_device acts on GPUs)"}
            return
        if self.share <= 0:
            self.facts = {"on_device": False, "why": "hardware.data_on_device=false"}
            return
        splits = {s: ds for s, ds in self.datamodule.datasets.items()
                  if isinstance(ds, TensorImages) and not isinstance(ds, DeviceImages)}
        size = sum(ds.images.numel() * ds.images.element_size() for ds in splits.values())
        budget = self.share * torch.cuda.get_device_properties(device).total_memory
        self.facts = {"on_device": bool(splits) and size <= budget, "bytes": size,
                      "budget_bytes": int(budget)}
        if not self.facts["on_device"]:
            return
        self._host = dict(splits)
        for split, ds in splits.items():
            self.datamodule.datasets[split] = DeviceImages(ds.images.to(device),
                                                           ds.labels.to(device))
        # Pinning applies to host memory only (the loader would fail on device tensors).
        self.datamodule.pin_memory = False
        log.info("training data on %s: %.1f MB of uint8 images", device, size / 2**20)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Back to host memory: work after the fit (int8 evaluation, latency, feature extraction)
        # reads the loaders on the CPU; the next fit/test moves the data again.
        if not self.facts.get("on_device"):
            return
        self.datamodule.datasets.update(self._host)
        self.datamodule.pin_memory = self._pin
