"""Held-out evaluation: which sequences (``eval.path``, or unseen synthetic ones) and when (``eval.every``).

The numbers themselves (mean token loss and argmax accuracy over label tokens, summed
over dp x cp) come from :meth:`flexcp.train.loop.Trainer.evaluate`; the logger writes
them to ``metrics.jsonl`` (``eval_loss``, ``eval_acc``) and the sinks (``eval/loss``, ``eval/acc``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .schema import FinetuneConfig
from .data import DataSource, build_source
from .tokenizer import Tokenizer

EVAL_INDEX_BASE = 1 << 40
"""Held-out micro-batch indices of synthetic sources start here, far from any training index."""


@dataclass(frozen=True)
class HeldOut:
    """Evaluation sequences are ``source.get(start + i)`` for ``i = 0, 1, ..``."""

    source: DataSource
    start: int


def held_out(cfg: FinetuneConfig, tok: Tokenizer, train_source: DataSource) -> HeldOut:
    """``eval.path`` packed like the training data (not shuffled), else the training source past any training index.

    The second is held out only for synthetic data (``recall``): a JSONL source repeats its
    epochs, which is why ``eval.every`` with JSONL data requires ``eval.path`` (config check).
    """
    if cfg.eval.path is None:
        return HeldOut(train_source, EVAL_INDEX_BASE)
    return HeldOut(build_source(cfg, tok, path=cfg.eval.path, shuffle=False), 0)


def eval_due(step: int, every: int, total_steps: int) -> bool:
    """Evaluate after optimizer step ``step``: every ``every`` steps and after the last one (never if 0)."""
    return every > 0 and (step % every == 0 or step == total_steps)
