"""What makes a run repeatable and resumable to the same numbers.

- :class:`EpochSeed` reseeds the global RNGs from (seed, epoch) at the start of every training
  epoch: the shuffle order, dropout and augmentation of epoch *n* depend only on the config, so a
  run resumed from a checkpoint after epoch *n-1* continues exactly as if it had not stopped
  (Lightning restores model, optimizer and loops, but not the RNG state).
- :class:`AtomicCheckpointIO` writes checkpoints to a temp file and renames it: Lightning's own
  writer opens the target for writing, so a ``kill -9`` mid-save leaves a truncated ``last.ckpt``
  that cannot be resumed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback

from effbench.errors import EffbenchError
from effbench.rundir import WRITE_FIX, publish


class EpochSeed(Callback):
    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs before Lightning creates the epoch's data iterator (which draws the shuffle seed).
        pl.seed_everything(self.seed * 100_003 + trainer.current_epoch, workers=True,
                           verbose=False)


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            torch.save(checkpoint, tmp)
            publish(tmp, target)  # fsync, rename, folder fsync
        except (OSError, RuntimeError) as err:
            # torch's zip writer (inline_container.cc) reports a full disk or a file-size limit
            # as a RuntimeError ("file write failed", "unexpected pos …").
            if not isinstance(err, OSError) and not re.search("write|inline_container",
                                                              str(err)):
                raise
            why = (err.strerror if isinstance(err, OSError) and err.strerror
                   else "the disk is full, over quota or past the file-size limit")
            raise EffbenchError(f"cannot write the checkpoint {target} ({why}); "
                                f"{WRITE_FIX}.") from err
        finally:
            tmp.unlink(missing_ok=True)
