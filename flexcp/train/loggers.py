"""Experiment trackers the recipe's metrics also go to: TensorBoard and (optional) Weights & Biases.

Each sink takes ``log({"train/loss": ..., ...}, step)`` and ``close()``. Neither package
is required: TensorBoard is used when installed (``logging.tensorboard``), W&B only when
asked for (``logging.wandb``; config validation says to install it if missing). W&B reads
its usual environment (``WANDB_MODE=offline``, ``WANDB_API_KEY``, ...); the run id is kept
in ``out_dir/wandb_run_id`` so a resumed run continues the same W&B run.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import uuid
from typing import Any, Protocol

WANDB_ID_FILE = "wandb_run_id"


class Sink(Protocol):
    def log(self, values: dict[str, float], step: int) -> None:
        """Record scalar ``values`` at optimizer step ``step``."""

    def close(self) -> None:
        """Flush and finish."""


class TensorBoardSink:
    """Scalars into ``out_dir/tb`` (torch's SummaryWriter)."""

    def __init__(self, out_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(out_dir, "tb"))

    def log(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One W&B run per ``out_dir`` (resumed with it), named after the directory, holding the config."""

    def __init__(self, out_dir: str, project: str | None, config: dict[str, Any]) -> None:
        wandb = importlib.import_module("wandb")
        id_path = os.path.join(out_dir, WANDB_ID_FILE)
        if os.path.isfile(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:16]
            with open(id_path, "w") as f:
                f.write(run_id)
        project = project or os.environ.get("WANDB_PROJECT") or "flexcp"
        name = os.path.basename(os.path.normpath(out_dir))
        self.run = wandb.init(project=project, name=name, id=run_id, resume="allow", dir=out_dir, config=config)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def missing_sink_notice(tensorboard: bool) -> str | None:
    """A one-line notice when ``logging.tensorboard`` is on but TensorBoard is not installed (nothing goes to tb/)."""
    if tensorboard and not importlib.util.find_spec("tensorboard"):
        return ("logging.tensorboard: TensorBoard is not installed, so no out_dir/tb events are written "
                "(pip install tensorboard to get them; logging.tensorboard=false hides this notice)")
    return None


def build_sinks(out_dir: str, tensorboard: bool, wandb: bool, wandb_project: str | None,
                config: dict[str, Any]) -> list[Sink]:
    """The sinks a rank-0 logger writes to (TensorBoard only if installed; W&B only if asked for)."""
    sinks: list[Sink] = []
    if tensorboard and importlib.util.find_spec("tensorboard"):
        sinks.append(TensorBoardSink(out_dir))
    if wandb:
        sinks.append(WandbSink(out_dir, wandb_project, config))
    return sinks
