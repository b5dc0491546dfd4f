"""The training loop: build everything from the config, then step.

One optimizer step = ``grad_accum`` packed sequences per dp rank. Each sequence is the
same on every rank of its CP group; flexcp dispatches it (input ids, pre-shifted labels,
position ids) with the step's key, each rank runs the model on its shard, and the
per-shard loss sum is divided by the step's global label count before backward, so
gradients summed by FSDP over dp x cp are those of the plain mean loss.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
import yaml

from ..hf.offload import ActivationOffload
from ..hf.mesh import CPMesh, build_cp_mesh
from ..hf.prepare import magi_prepare_batch
from ..hf.recipe import MagiState, setup_magi
from .checkpoint import TrainProgress, export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import FinetuneConfig, to_dict, validate
from .data import PackedSequence, build_source
from .errors import RunError
from .evaluate import EVAL_INDEX_BASE, eval_due, held_out
from .loggers import build_sinks, missing_sink_notice
from .loss import CausalLMLoss
from .metrics import MetricsLogger, StepMetrics, fmt_number, model_flops, plural
from .model import build_model, count_params
from .parallel import apply_fsdp, init_distributed
from .run_dir import prepare_out_dir
from .stall import StallWatch
from .tokenizer import load_tokenizer

__all__ = ("EVAL_INDEX_BASE", "DivergedError", "Trainer", "WarmupCosine", "close_distributed")


class DivergedError(RunError):
    """Training produced a non-finite loss or gradient norm; the message names the step and the last good checkpoint."""


class WarmupCosine:
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total`` steps."""

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        frac = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only (norm weights and biases are 1-D); frozen parameters (LoRA's base) are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class Trainer:
    """Owns the mesh, model, optimizer, scheduler, data and logger of one run (every rank builds one)."""

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.device = init_distributed(cfg.parallel.timeout_minutes)
        self.cfg = validate(cfg, dist.get_world_size())
        prepare_out_dir(self.cfg, to_dict(self.cfg))  # before anything is built: a bad out_dir fails in a second
        self.stall = StallWatch(cfg.parallel.timeout_minutes)
        self.rank = dist.get_rank()
        p, t = cfg.parallel, cfg.train
        self.dims: CPMesh = build_cp_mesh(p.cp, self.device.type, dp=p.dp)
        self.magi = self._setup_attention()
        self.tokenizer = load_tokenizer(cfg.model.tokenizer)
        tok = self.tokenizer
        special = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
        self.lm = build_model(cfg.model, tok.vocab_size, self.device, t.seed, special)
        if cfg.model.lora.r:
            from .lora import apply_lora

            self.lm = apply_lora(self.lm, cfg.model.lora)
        self.bf16 = t.dtype == "bf16" or (t.dtype == "auto" and self.device.type == "cuda")
        self.offload = ActivationOffload(self.device) if cfg.model.offload_activations else None
        self.model = apply_fsdp(CausalLMLoss(self.lm, t.loss_chunk_tokens), self.lm, self.dims, self.bf16)
        if cfg.model.compile != "off":
            self.model.compile(backend=cfg.model.compile)  # in place: parameter names (checkpoints) unchanged
        self.optimizer = torch.optim.AdamW(_param_groups(self.model, t.weight_decay), lr=t.lr,
                                           betas=tuple(t.betas), eps=t.eps, foreach=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupCosine(t.warmup_steps, t.steps, t.min_lr_ratio))
        self.source = build_source(cfg, self.tokenizer)
        self.held_out = held_out(cfg, self.tokenizer, self.source)
        self.progress = TrainProgress()
        c = self.lm.config
        self.arch = dict(layers=c.num_hidden_layers, heads=c.num_attention_heads,
                         head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
        self.num_params, self.matmul_params = count_params(self.lm)
        self.trainable_params = sum(p.numel() for p in self.lm.parameters() if p.requires_grad)
        self.resumed_from: str | None = None
        self.metrics: MetricsLogger | None = None
        if cfg.checkpoint.resume and (path := latest_checkpoint(cfg.out_dir)):
            load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.progress)
            self.resumed_from = path
            if self.rank == 0:
                print(f"flexcp finetune: resuming run in {cfg.out_dir} from step {self.progress.step} ({path})",
                      flush=True)

    # ------------------------------------------------------------------------------ attention wiring

    def _setup_attention(self) -> MagiState | None:
        """``setup_magi`` for ``attn_implementation="magi"`` (registers the HF backend, resolves the CP group)."""
        if self.cfg.model.attn_implementation != "magi":
            return None
        state = setup_magi(self.cfg, self.dims.device_mesh)
        if not state.enabled:
            raise RuntimeError("setup_magi did not enable magi for model.attn_implementation='magi'")
        return state

    def _local_batch(self, seq: PackedSequence) -> dict[str, Any]:
        """This rank's shard of a global sequence: ``input_ids``, ``position_ids``, ``labels`` (+ ``magi_key``).

        With magi, flexcp builds the step's key from the sequence's mask and dispatches the
        three fields with it (identity plus chunk padding at cp = 1).
        """
        batch = {
            "input_ids": seq.input_ids[None].to(self.device),
            "labels": seq.labels[None].to(self.device),
            "position_ids": seq.position_ids[None].to(self.device),
        }
        if self.magi is None:
            return batch
        batch["attn_spec"] = seq.spec
        local, _ = magi_prepare_batch(self.lm, batch, self.magi.cp_group, chunk_size=self.cfg.parallel.chunk_size)
        return local

    def _saved_tensors(self) -> AbstractContextManager:
        """Where the forward keeps what backward needs: host memory with ``model.offload_activations``."""
        return self.offload() if self.offload is not None else nullcontext()

    def _run(self, seq: PackedSequence) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self._local_batch(seq)
        extra = {"magi_key": batch["magi_key"]} if "magi_key" in batch else {}
        return self.model(batch["input_ids"], batch["position_ids"], batch["labels"], **extra)

    # ----------------------------------------------------------------------------------- stepping

    def _indices(self, data_index: int, count: int) -> list[int]:
        """This dp rank's micro-batches: global indices ``data_index + a * dp + dp_rank``."""
        dp, r = self.dims.dp, self.dims.dp_rank
        return [data_index + a * dp + r for a in range(count)]

    def _global_sum(self, values: list[float], group: dist.ProcessGroup | None = None) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=group)
        return t.tolist()

    def train_step(self) -> StepMetrics:
        """One optimizer step over ``grad_accum`` micro-batches per dp rank."""
        t0 = time.perf_counter()
        t = self.cfg.train
        seqs = [self.source.get(i) for i in self._indices(self.progress.data_index, t.grad_accum)]
        local_labels = sum(s.num_label_tokens for s in seqs)
        area = sum(s.spec.area() for s in seqs)
        n_labels, area = self._global_sum([local_labels, area], self.dims.dp_group)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        hits = torch.zeros((), dtype=torch.float64, device=self.device)
        for seq in seqs:
            with self._saved_tensors():
                part, correct = self._run(seq)
            (part / max(n_labels, 1.0)).backward()
            loss_sum += part.detach()
            hits += correct
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.max_grad_norm or float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        total_loss, total_hits = self._global_sum([loss_sum.item(), hits.item()])
        self.progress.step += 1
        self.progress.data_index += t.grad_accum * self.dims.dp
        tokens = len(seqs) * self.cfg.data.seq_len * self.dims.dp
        return StepMetrics(
            step=self.progress.step, loss=total_loss / max(n_labels, 1.0), acc=total_hits / max(n_labels, 1.0),
            lr=lr, grad_norm=float(grad_norm), tokens=tokens, label_tokens=int(n_labels),
            flops=model_flops(self.matmul_params, tokens, int(area), **self.arch), seconds=time.perf_counter() - t0,
        )

    @torch.no_grad()
    def evaluate(self, num_batches: int, start: int | None = None) -> tuple[float, float]:
        """``(mean loss, accuracy)`` over label tokens of held-out micro-batches, split over dp ranks.

        The sequences are ``self.held_out`` (``eval.path`` or unseen synthetic ones) from
        index ``start`` (default: the held-out set's first). Dropout (LoRA's) is off meanwhile.
        """
        start = self.held_out.start if start is None else start
        loss_sum = hits = labels = 0.0
        self.model.eval()
        try:
            for i in self._indices(start, -(-num_batches // self.dims.dp)):
                seq = self.held_out.source.get(i)
                part, correct = self._run(seq)
                loss_sum, hits, labels = loss_sum + part.item(), hits + correct.item(), labels + seq.num_label_tokens
        finally:
            self.model.train()
        (labels,) = self._global_sum([labels], self.dims.dp_group)  # a CP group shares its sequences
        loss_sum, hits = self._global_sum([loss_sum, hits])  # per-shard sums: over dp and cp
        return loss_sum / max(labels, 1.0), hits / max(labels, 1.0)

    # ------------------------------------------------------------------------------------ the run

    def fit(self, steps: int | None = None) -> dict[str, Any]:
        """Train until ``train.steps`` (or ``steps`` more); checkpoint, export, and return the summary."""
        cfg = self.cfg
        if self.resumed_from and self.progress.step >= cfg.train.steps:
            return self._already_finished()
        end = cfg.train.steps if steps is None else min(cfg.train.steps, self.progress.step + steps)
        main = self.rank == 0
        sinks = []
        if main:
            os.makedirs(cfg.out_dir, exist_ok=True)
            with open(os.path.join(cfg.out_dir, "config.yaml"), "w") as f:
                yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
            lg = cfg.logging
            sinks = build_sinks(cfg.out_dir, lg.tensorboard, lg.wandb, lg.wandb_project, to_dict(cfg))
        log = self.metrics = MetricsLogger(cfg.out_dir, cfg.train.steps, self.progress.step, cfg.logging.log_every,
                                           cfg.logging.progress, main, self.device, dist.get_world_size(), sinks)
        log.write(self.describe())
        notice = missing_sink_notice(cfg.logging.tensorboard)
        if notice:
            log.write(notice)
        extra: dict[str, Any] = {}
        while self.progress.step < end:
            with self.stall.step(self.progress.step + 1):
                metrics = self.train_step()
                log.log(metrics)
                step = self.progress.step
                self._stop_if_diverged(metrics)
                if eval_due(step, cfg.eval.every, cfg.train.steps):
                    extra["eval_loss"], extra["eval_acc"] = self.evaluate(cfg.eval.steps)
                    log.log_eval(step, extra["eval_loss"], extra["eval_acc"], cfg.eval.steps)
                every = cfg.checkpoint.every
                if every and step % every == 0 and step < cfg.train.steps:
                    save_checkpoint(cfg.out_dir, self.model, self.optimizer, self.scheduler, self.progress,
                                    cfg.checkpoint.keep)
        if self.progress.step >= cfg.train.steps:
            extra["checkpoint"] = save_checkpoint(cfg.out_dir, self.model, self.optimizer, self.scheduler,
                                                  self.progress, cfg.checkpoint.keep)
            if cfg.checkpoint.export_hf:
                extra["hf_export"] = self._export(os.path.join(cfg.out_dir, "hf"))
        return log.close(extra)

    def _stop_if_diverged(self, m: StepMetrics) -> None:
        """Stop at the first non-finite loss or gradient norm (the same all-reduced values on every rank).

        Nothing of that step is saved: the last checkpoint written stays the newest, and resuming
        from it after the fix repeats the run from there.
        """
        if math.isfinite(m.loss) and math.isfinite(m.grad_norm):
            return
        self.metrics.close({"diverged_at_step": m.step})
        last = latest_checkpoint(self.cfg.out_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written before it"
        raise DivergedError(
            f"step {m.step} gave a non-finite loss ({m.loss}) or gradient norm ({m.grad_norm}); stopped without "
            f"saving it: {kept}. Lower train.lr (now {self.cfg.train.lr:g}), keep train.max_grad_norm > 0, or "
            "check the data; resume with checkpoint.resume=true")

    def _export(self, out_dir: str) -> str | None:
        """The final model for ``from_pretrained``: full weights, or LoRA merged / as an adapter."""
        from transformers.utils import logging as hf_logging

        lora = self.cfg.model.lora
        hf_logging.disable_progress_bar()  # transformers' "Writing model shards" bar under our finished one
        try:
            if not lora.r:
                return export_hf(self.model, self.lm, "lm.", self.tokenizer, out_dir)
            from .lora import export_lora

            return export_lora(self.model, self.lm, "lm.", self.tokenizer, out_dir, lora, self.cfg.model.path)
        finally:
            hf_logging.enable_progress_bar()

    def _already_finished(self) -> dict[str, Any]:
        """A rerun of a finished run: say so, touch nothing (no training, no summary of nothing, no re-export)."""
        step = self.progress.step
        if self.rank == 0:
            print(f"flexcp finetune: the run in {self.cfg.out_dir!r} is already finished: {self.resumed_from} is "
                  f"step {step} of train.steps={self.cfg.train.steps}; nothing to do. To train further raise "
                  "train.steps; to start over use a new out_dir or checkpoint.resume=false.", flush=True)
        return {"finished": True, "final_step": step, "checkpoint": self.resumed_from}

    def describe(self) -> str:
        """One paragraph on what this run is."""
        c = self.cfg
        src = c.model.path or f"preset {c.model.preset!r} (random init)"
        lora = c.model.lora
        tuned = (f" (LoRA r={lora.r}: {fmt_number(self.trainable_params)} trainable)" if lora.r else "")
        return (f"flexcp finetune: {src}, {self.num_params / 1e6:.1f}M params{tuned}, "
                f"attention {c.model.attn_implementation!r}"
                + ("; activations offloaded to host" if c.model.offload_activations else "") + "; "
                f"mesh dp={self.dims.dp} x cp={self.dims.cp} on {self.device.type} "
                f"({'bf16' if self.bf16 else 'fp32'}); data {c.data.kind!r}, seq_len {c.data.seq_len}, "
                f"{plural(c.train.grad_accum * self.dims.dp, 'sequence')} per step; steps {self.progress.step}->{c.train.steps}"
                + (f"; resumed from {self.resumed_from}" if self.resumed_from else ""))


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
