"""What a run shows and records: a rank-0 progress bar, metrics.jsonl, TensorBoard, a final summary.

Throughput counts every token of every packed sequence (padding included: it is
computed). Model FLOPs per step = 6 * N * tokens (N: parameters used in matmuls) plus
attention 12 * layers * heads * head_dim * area, where area is the number of (q, k)
cells the step's masks keep (3x the 4 * area * heads * d forward cost, the usual
fwd + bwd convention; activation recomputation is not counted).
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from .loggers import Sink
from .replay import drop_records_after


@dataclass
class StepMetrics:
    step: int
    loss: float
    acc: float
    lr: float
    grad_norm: float
    tokens: int
    """Tokens processed by the whole world this step."""
    label_tokens: int
    flops: float
    """Model FLOPs of the whole world this step."""
    seconds: float


def model_flops(num_matmul_params: int, tokens: int, area: int, layers: int, heads: int, head_dim: int) -> float:
    """Training FLOPs of ``tokens`` tokens whose attention keeps ``area`` cells (see the module doc)."""
    return 6.0 * num_matmul_params * tokens + 12.0 * layers * heads * head_dim * area


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory of this rank, or the process's peak RSS on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def fmt_number(v: Any) -> str:
    """One number format for the console: thousands separators from 1,000 up, 4 significant digits below."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int) or (abs(v) >= 1000 and float(v).is_integer()):
        return f"{int(v):,}"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"


def plural(n: int, noun: str) -> str:
    """``"1 sequence"``, ``"2 sequences"``: a count in plain words for the console."""
    return f"{fmt_number(n)} {noun}{'' if n == 1 else 's'}"


class _Plain:
    def __init__(self, total: int, initial: int) -> None:
        self.n = initial

    def update(self, n: int, text: str) -> None:
        self.n = n

    def write(self, line: str) -> None:
        print(line, flush=True)

    def close(self) -> None:
        pass


class _Tqdm(_Plain):
    def __init__(self, total: int, initial: int) -> None:
        from tqdm import tqdm

        self.total, self.done = total, False
        self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)

    def update(self, n: int, text: str) -> None:
        self.bar.set_postfix_str(text, refresh=False)
        if n < self.total:
            self.bar.update(n - self.bar.n)
        else:  # finished: drawn once, by close(); later lines print below it
            self.bar.n = n
            self.close()

    def write(self, line: str) -> None:
        if self.done:
            print(line, flush=True)
        else:
            self.bar.write(line)

    def close(self) -> None:
        if not self.done:
            self.bar.close()
            self.done = True


class _Rich(_Plain):
    def __init__(self, total: int, initial: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[text]}"))
        self.task = self.progress.add_task("train", total=total, completed=initial, text="")
        self.progress.start()

    def update(self, n: int, text: str) -> None:
        self.progress.update(self.task, completed=n, text=text)

    def write(self, line: str) -> None:
        self.progress.console.print(line, highlight=False)

    def close(self) -> None:
        self.progress.stop()


def _make_bar(kind: str, total: int, initial: int) -> _Plain | None:
    if kind == "none":
        return None
    if kind == "auto":
        kind = next((k for k in ("tqdm", "rich") if importlib.util.find_spec(k)), "plain")
    return {"tqdm": _Tqdm, "rich": _Rich, "plain": _Plain}[kind](total, initial)


def window_mean(steps: Sequence[StepMetrics], key: str) -> float:
    """The mean of one per-step figure over ``steps``."""
    return sum(getattr(m, key) for m in steps) / len(steps)


class MetricsLogger:
    """Rank 0 shows and writes; other ranks only keep the numbers (so every rank can return a summary).

    Every step is recorded in ``metrics.jsonl`` and the sinks (``loss``, ``acc``: that step's).
    A console line is printed every ``log_every`` steps, on the first step of the run and on
    the last one (``total_steps``, or the last step before :meth:`close`): that step's
    ``loss`` and ``acc`` and, named ``loss_avgN`` / ``acc_avgN``, their means over the N
    steps since the previous line. The progress bar shows the current step's figures.
    """

    def __init__(self, out_dir: str, total_steps: int, start_step: int, log_every: int, progress: str,
                 is_main: bool, device: torch.device, world_size: int, sinks: Sequence[Sink] = ()) -> None:
        self.log_every, self.is_main, self.device, self.world = log_every, is_main, device, world_size
        self.total_steps = total_steps
        self.history: list[StepMetrics] = []
        self.start_step = self.last_printed = start_step
        self.sinks = list(sinks)
        self.bar = self.jsonl = None
        if is_main:
            os.makedirs(out_dir, exist_ok=True)
            self.bar = _make_bar(progress, total_steps, start_step)
            path = os.path.join(out_dir, "metrics.jsonl")
            if start_step:  # resumed: the steps after the checkpoint run again, so their old records go
                drop_records_after(path, start_step)
            self.jsonl = open(path, "a" if start_step else "w")

    def derived(self, m: StepMetrics) -> dict[str, float]:
        """Per-second and per-device numbers of one step."""
        return {
            "tokens_per_s": m.tokens / m.seconds,
            "tokens_per_s_per_device": m.tokens / m.seconds / self.world,
            "tflops_per_device": m.flops / m.seconds / self.world / 1e12,
            "memory_gb": peak_memory_gb(self.device),
        }

    def log(self, m: StepMetrics) -> None:
        self.history.append(m)
        if not self.is_main:
            return
        self._record(m)
        if m.step % self.log_every == 0 or m.step == self.start_step + 1 or m.step >= self.total_steps:
            self._print_line(m)
        if self.bar is not None:
            d = self.derived(m)
            self.bar.update(m.step, f"loss {m.loss:.4f} acc {m.acc:.3f} {fmt_number(d['tokens_per_s'])} tok/s "
                                    f"{d['tflops_per_device']:.3g} TFLOP/s {d['memory_gb']:.2f} GB")

    def _record(self, m: StepMetrics) -> None:
        """One step's record: a ``metrics.jsonl`` line and the sinks' scalars."""
        d = self.derived(m)
        self._emit({**asdict(m), **d})
        scalars = {"loss": m.loss, "acc": m.acc, "lr": m.lr, "grad_norm": m.grad_norm, **d}
        for sink in self.sinks:
            sink.log({f"train/{k}": v for k, v in scalars.items()}, m.step)

    def _print_line(self, m: StepMetrics) -> None:
        """The console line of step ``m``: its own loss and accuracy, and their means since the previous line."""
        d = self.derived(m)
        window = [w for w in self.history[-self.log_every:] if w.step > self.last_printed]
        means = (f"loss_avg{len(window)} {window_mean(window, 'loss'):.4f} | acc_avg{len(window)} "
                 f"{window_mean(window, 'acc'):.3f} | ") if len(window) > 1 else ""
        self.write(f"step {m.step:>6} | loss {m.loss:.4f} | acc {m.acc:.3f} | {means}lr {m.lr:.2e} | "
                   f"grad {m.grad_norm:.3f} | {fmt_number(d['tokens_per_s'])} tok/s | "
                   f"{d['tflops_per_device']:.3g} TFLOP/s/dev | {d['memory_gb']:.2f} GB")
        self.last_printed = m.step

    def _emit(self, record: dict[str, Any]) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()

    def log_eval(self, step: int, loss: float, acc: float, sequences: int) -> None:
        """Record a held-out evaluation (``eval_loss``, ``eval_acc`` in metrics.jsonl; ``eval/*`` in the sinks)."""
        if not self.is_main:
            return
        self._emit({"step": step, "eval_loss": loss, "eval_acc": acc, "eval_sequences": sequences})
        self.write(f"eval {step:>6} | loss {loss:.4f} | acc {acc:.3f} ({sequences} held-out sequences)")
        for sink in self.sinks:
            sink.log({"eval/loss": loss, "eval/acc": acc}, step)

    def write(self, line: str) -> None:
        """Print a line on rank 0 without breaking the progress bar."""
        if not self.is_main:
            return
        if self.bar is None:
            print(line, flush=True)
        else:
            self.bar.write(line)

    def summary(self) -> dict[str, Any]:
        """Numbers of the run so far: ``loss`` / ``acc`` of the last step, ``loss_avgN`` / ``acc_avgN`` their means
        over the last N steps (N = ``log_every``, or fewer); throughput skips the first step (warm-up) when there are more."""
        final = self.history[-1].step if self.history else self.start_step
        out: dict[str, Any] = {"steps": len(self.history), "final_step": final}
        if not self.history:
            return out
        timed = self.history[1:] if len(self.history) > 1 else self.history
        seconds = sum(m.seconds for m in timed)
        last = self.history[-min(len(self.history), self.log_every):]
        return {
            **out,
            "loss": self.history[-1].loss,
            "acc": self.history[-1].acc,
            f"loss_avg{len(last)}": window_mean(last, "loss"),
            f"acc_avg{len(last)}": window_mean(last, "acc"),
            "tokens_per_s": sum(m.tokens for m in timed) / seconds,
            "tokens_per_s_per_device": sum(m.tokens for m in timed) / seconds / self.world,
            "tflops_per_device": sum(m.flops for m in timed) / seconds / self.world / 1e12,
            "peak_memory_gb": peak_memory_gb(self.device),
            "train_seconds": sum(m.seconds for m in self.history),
        }

    def close(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Print the last step's line if it was not, close the outputs; rank 0 prints the summary (plus ``extra``)."""
        if self.is_main and self.history and self.history[-1].step > self.last_printed:
            self._print_line(self.history[-1])
        s = {**self.summary(), **(extra or {})}
        if self.bar is not None:
            self.bar.close()
        if self.is_main:
            self.jsonl.close()
            for sink in self.sinks:
                sink.close()
            print("\nsummary:", flush=True)
            for k, v in s.items():
                print(f"  {k:<24} {fmt_number(v)}", flush=True)
        return s
