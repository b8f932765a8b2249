"""The training loop: one optimizer step = ``grad_accum`` micro-batches, token-weighted.

Fixed life cycle: ``Trainer(...)`` sets up optimizer, schedule and the data stream; ``run()`` resumes if
asked, loops, evaluates, checkpoints, and returns a summary. Everything that writes files goes through
``is_main_process`` (see ``dist.py``).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from deftune.config import Recipe
from deftune.data import PreparedData, batches
from deftune.errors import DeftuneError
from deftune.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from deftune.train.dist import is_main_process
from deftune.train.loss import count_label_tokens, response_loss_sum
from deftune.train.optim import build_optimizer


class TrainingInterrupted(DeftuneError):
    """Ctrl-C or SIGTERM: a checkpoint was saved and the run can be resumed."""


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    eval_loss: float | None
    tokens_per_s: float
    seconds: float
    resumed_from: str | None = None
    history: list[dict] = field(default_factory=list)


def autocast_context(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def move(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples, micro_batch: int, pad_id: int, device: torch.device,
                  packing: bool = False, max_length: int | None = None) -> float:
    """Mean response-token cross-entropy over ``examples`` (perplexity = exp of it)."""
    if not examples:
        return float("nan")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches(examples, micro_batch, pad_id, seed=0, epoch=0, shuffle=False):
        with autocast_context(device):
            loss, n = response_loss_sum(model, move(batch, device))
        total += float(loss)
        count += n
    model.train(was_training)
    return total / max(1, count)


class Trainer:
    def __init__(self, recipe: Recipe, model: nn.Module, tokenizer, data: PreparedData, run_dir: Path,
                 device: torch.device, progress: bool = True):
        self.recipe = recipe
        self.cfg = recipe.train
        self.model = model
        self.tokenizer = tokenizer
        self.data = data
        self.run_dir = Path(run_dir)
        self.device = device
        self.progress = progress
        self.pad_id = tokenizer.pad_token_id
        if not data.train:
            raise DeftuneError("The training split is empty after tokenization")
        self.micro_batches_per_epoch = len(self._epoch_batches(0))
        self.steps_per_epoch = max(1, math.ceil(self.micro_batches_per_epoch / self.cfg.grad_accum))
        if self.cfg.max_steps > 0:
            self.total_steps = self.cfg.max_steps
        else:
            self.total_steps = max(1, math.ceil(self.cfg.epochs * self.steps_per_epoch))
        self.optimizer, self.scheduler = build_optimizer(model, self.cfg, self.total_steps)
        self.step = 0
        self._epoch_cache: dict[int, list[dict]] = {}
        self._stop_signal: int | None = None
        self.history: list[dict] = []

    # -- data stream ---------------------------------------------------------------------------
    def _epoch_batches(self, epoch: int) -> list[dict]:
        return batches(
            self.data.train, self.cfg.micro_batch, self.pad_id, seed=self.cfg.seed, epoch=epoch,
            shuffle=True, packing=self.recipe.data.packing, max_length=self.recipe.data.max_length,
        )

    def _micro_batch(self, index: int) -> dict:
        """Micro-batch ``index`` of the run-long stream: epochs follow one another, each reshuffled
        by (seed, epoch), so a resumed run draws exactly what the uninterrupted one would."""
        epoch, offset = divmod(index, self.micro_batches_per_epoch)
        if epoch not in self._epoch_cache:
            self._epoch_cache = {epoch: self._epoch_batches(epoch)}
        return self._epoch_cache[epoch][offset]

    # -- signals -------------------------------------------------------------------------------
    def _on_signal(self, signum, _frame):
        self._stop_signal = signum
        # A second Ctrl-C kills at once.
        signal.signal(signum, signal.SIG_DFL)

    @contextlib.contextmanager
    def _signals(self):
        handled = (signal.SIGINT, signal.SIGTERM)
        try:
            previous = {s: signal.signal(s, self._on_signal) for s in handled}
        except ValueError:  # not in the main thread: leave signals alone
            yield
            return
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    # -- logging -------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        self.history.append(record)
        if is_main_process():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def save(self) -> Path | None:
        if not is_main_process():
            return None
        return save_checkpoint(
            self.run_dir, self.model, self.optimizer, self.scheduler, self.step,
            {"total_steps": self.total_steps, "seed": self.cfg.seed}, self.cfg.keep_last,
        )

    # -- the loop ------------------------------------------------------------------------------
    def train_step(self) -> tuple[float, float, int]:
        """One optimizer step. Returns (mean loss, grad norm before clipping, tokens seen)."""
        model, cfg = self.model, self.cfg
        micro = [self._micro_batch(self.step * cfg.grad_accum + i) for i in range(cfg.grad_accum)]
        label_tokens = sum(count_label_tokens(b) for b in micro)
        if label_tokens == 0:
            raise DeftuneError(f"Step {self.step + 1}: no response tokens in the batch (all labels -100)")
        seen = 0
        loss_total = 0.0
        for batch in micro:
            batch = move(batch, self.device)
            with autocast_context(self.device):
                loss_sum, _ = response_loss_sum(model, batch)
            if not torch.isfinite(loss_sum):
                self.optimizer.zero_grad(set_to_none=True)
                return float("nan"), float("nan"), seen
            (loss_sum / label_tokens).backward()
            loss_total += float(loss_sum.detach())
            seen += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = cfg.clip_grad if cfg.clip_grad > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return loss_total / label_tokens, grad_norm, seen
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss_total / label_tokens, grad_norm, seen

    def run(self) -> TrainResult:
        cfg = self.cfg
        resumed = None
        checkpoint = find_checkpoint(self.run_dir, cfg.resume)
        if checkpoint is not None:
            meta = load_checkpoint(checkpoint, self.model, self.optimizer, self.scheduler)
            self.step = int(meta["step"])
            resumed = str(checkpoint)
            if int(meta.get("total_steps", self.total_steps)) != self.total_steps:
                raise DeftuneError(
                    f"{checkpoint} was made for a run of {meta['total_steps']} steps, this recipe asks for "
                    f"{self.total_steps}; resume with the same train.max_steps/epochs/batch settings"
                )
            print(f"Resumed from {checkpoint} at step {self.step}/{self.total_steps}")
        elif cfg.resume == "auto":
            pass
        self.model.train()
        bar = None
        if self.progress and is_main_process():
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True)
        start = time.perf_counter()
        tokens_total = 0
        last_loss = None
        eval_loss = None
        with self._signals():
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                loss, grad_norm, tokens = self.train_step()
                if not math.isfinite(loss) or not math.isfinite(grad_norm):
                    saved = self.save()
                    raise DeftuneError(
                        f"Non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step "
                        f"{self.step + 1} (loss={loss}, grad_norm={grad_norm}); the update was not applied. "
                        f"Last good state saved to {saved}. Lower train.lr or check the data, then resume "
                        "with train.resume=auto."
                    )
                dt = time.perf_counter() - t0
                tokens_total += tokens
                last_loss = loss
                lr = self.scheduler.get_last_lr()[0]
                if self.step % max(1, cfg.log_every) == 0 or self.step == self.total_steps:
                    record = {
                        "step": self.step,
                        "epoch": round(self.step / self.steps_per_epoch, 4),
                        "loss": round(loss, 6),
                        "lr": lr,
                        "grad_norm": round(grad_norm, 6),
                        "tokens": tokens,
                        "tokens_per_s": round(tokens / dt, 2),
                        "elapsed_s": round(time.perf_counter() - start, 2),
                    }
                    self._log(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt:.0f}")
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                    eval_loss = self.evaluate()
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                    self.save()
                if self._stop_signal is not None:
                    saved = self.save()
                    if bar is not None:
                        bar.close()
                    raise TrainingInterrupted(
                        f"Stopped by signal {signal.Signals(self._stop_signal).name} at step {self.step}; "
                        f"checkpoint saved to {saved}. Resume with train.resume=auto "
                        f"output_dir={self.run_dir}"
                    )
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - start
        if self.data.eval:
            eval_loss = self.evaluate()
        self.save()
        return TrainResult(
            steps=self.step, final_loss=last_loss, eval_loss=eval_loss,
            tokens_per_s=tokens_total / seconds if seconds > 0 else 0.0, seconds=seconds,
            resumed_from=resumed, history=self.history,
        )

    def evaluate(self) -> float:
        loss = evaluate_loss(self.model, self.data.eval, self.cfg.micro_batch, self.pad_id, self.device)
        self._log({"step": self.step, "eval_loss": round(loss, 6), "eval_ppl": round(math.exp(min(loss, 50)), 4)})
        return loss
