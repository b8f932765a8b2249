"""The training loop: one optimizer step = ``grad_accum`` micro-batches, token-weighted.

Fixed life cycle: ``Trainer(...)`` sets up optimizer, schedule, monitors and the data stream; ``run()``
resumes if asked, loops, validates, checkpoints, writes the final checkpoint and the result, evaluates,
and returns a summary. Everything that writes files goes through ``is_main_process`` (see ``dist.py``).

Signals (SIGINT, SIGTERM), handled while ``handle_signals()`` is open: during training the step finishes,
a checkpoint is written and ``TrainingInterrupted`` raised; during the final save both the checkpoint and
the result are written first; once both are on disk (the final evaluation) the run ends at once. In every
case the message says what is saved and ``train.resume=auto`` continues without redoing a step.

Per step: forward/backward -> non-finite check (skip; N in a row stop) -> clip -> gradient-norm guard
(stop or skip on a 3-sigma spike) -> optimizer step -> logs. Per validation: eval loss + generation
metrics -> plateau controller (LR x factor after `patience` non-improving evaluations, best adapter kept,
optional early stop).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from deftune.config import Recipe, recipe_to_dict
from deftune.data import PreparedData, batches
from deftune.data.augment import epoch_examples
from deftune.errors import DeftuneError
from deftune.training.callbacks.base import Callback
from deftune.training.checkpoint import (
    find_checkpoint,
    load_checkpoint,
    read_meta,
    save_checkpoint,
    write_error,
)
from deftune.training.dist import is_main_process
from deftune.training.loss import count_label_tokens, labelled_positions, response_loss_sum
from deftune.training.monitor import (
    Board,
    GradNormGuard,
    PlateauController,
    UpdateTracker,
    layer_grad_norms,
    peak_memory_gib,
)
from deftune.training.optim import build_optimizer
from deftune.training.report import save_heatmap_png
from deftune.training.state import TrainableState


class TrainingInterrupted(DeftuneError):
    """Ctrl-C or SIGTERM: a checkpoint was saved and the run can be resumed. ``signal_number`` is the
    signal's number (the CLI exits with 128 + it: 130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, signal_number: int | None = None):
        super().__init__(message)
        self.signal_number = None if signal_number is None else int(signal_number)

    @property
    def signum(self) -> int | None:
        """The same as ``signal_number`` (the name the CLI reads)."""
        return self.signal_number

    @signum.setter
    def signum(self, value: int | None) -> None:
        self.signal_number = value


class TrainingStopped(DeftuneError):
    """The gradient-norm guard or repeated non-finite steps stopped the run (checkpoint saved)."""


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    eval_loss: float | None
    tokens_per_s: float
    seconds: float
    resumed_from: str | None = None
    skipped_steps: int = 0
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (the run's data order and initialisation)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def autocast_context(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# Batch entries read on the host (padding-free example boundaries): moving them would cost a device sync
# each time the attention reads them.
HOST_KEYS = frozenset({"cu_seqlens"})


def move(batch: dict, device: torch.device) -> dict:
    """``batch`` on ``device``, with the labelled positions found on the host first (``label_positions``):
    the loss then selects them without asking the GPU how many there are (a sync per micro-batch)."""
    out = {k: v if k in HOST_KEYS else v.to(device, non_blocking=True) for k, v in batch.items()}
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and labels.device.type == "cpu" and torch.device(device).type != "cpu":
        out["label_positions"] = tuple(t.to(device, non_blocking=True) for t in labelled_positions(labels))
    return out


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples, micro_batch: int, pad_id: int, device: torch.device) -> float:
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
                 device: torch.device, progress: bool = True,
                 on_best: Callable[[Path], None] | None = None, callbacks: list[Callback] = (),
                 validator: Callable[[nn.Module], dict] | None = None):
        """``validator(model) -> metrics`` runs at each ``eval.every`` (the recipe passes the eval stage's
        validation: eval loss plus generation metrics); without one, validation is the eval loss alone."""
        self.recipe = recipe
        self.cfg = recipe.train
        self.mon = recipe.monitor
        self.model = model
        self.tokenizer = tokenizer
        self.data = data
        self.run_dir = Path(run_dir)
        self.device = device
        self.progress = progress
        self.on_best = on_best
        self.validator = validator or self._eval_loss_metrics
        self.callbacks = list(callbacks)
        self.trainable = TrainableState()  # which parameters may change, shared by the callbacks
        self.param_starts: dict[str, int] = {}
        self.pad_id = tokenizer.pad_token_id
        if not data.train:
            raise DeftuneError("The training split is empty after tokenization")
        self._epoch_cache: dict[int, list[dict]] = {}
        self._epoch_lengths: dict[int, int] = {}
        self._augment_counts: dict[int, tuple[int, int]] = {}
        self._augment_logged: set[int] = set()
        self.history: list[dict] = []
        micro_per_epoch = self._epoch_length(0)
        self.steps_per_epoch = max(1, math.ceil(micro_per_epoch / self.cfg.grad_accum))
        if self.cfg.max_steps > 0:
            self.total_steps = self.cfg.max_steps
        else:
            self.total_steps = max(1, math.ceil(self.cfg.epochs * self.steps_per_epoch))
        ev = recipe.eval
        self.plateau = PlateauController(ev.plateau_metric, ev.plateau_patience, ev.plateau_factor,
                                         ev.plateau_min_scale, ev.early_stop_patience)
        self.optimizer, self.scheduler = build_optimizer(model, self.cfg, self.total_steps,
                                                         scale=lambda: self.plateau.scale)
        self.stage_warmup = 0
        self.guard = GradNormGuard(self.mon.guard_sigma, self.mon.guard_window, self.mon.guard_warmup)
        self.updates = UpdateTracker(model) if self.mon.heatmap_every else None
        self.step = 0
        self.skipped = 0
        self.nonfinite_run = 0
        self._stop_signal: int | None = None
        self._signal_depth = 0
        # "training" (a signal stops after the step), "saving" (after the result is written), "finished"
        # (checkpoint and result on disk: a signal ends the run at once)
        self.phase = "training"
        self.final_checkpoint: Path | None = None
        self.result_path: Path | None = None
        self.board: Board | None = None

    # -- data stream ---------------------------------------------------------------------------
    def _epoch_batches(self, epoch: int) -> list[dict]:
        examples = self.data.train
        if self.recipe.data.augment_fraction > 0:
            examples, replaced = epoch_examples(self.data, self.tokenizer, self.recipe.data, self.cfg.seed,
                                                epoch, fraction=self.recipe.data.augment_fraction)
            self._augment_counts[epoch] = (replaced, len(examples))
        return batches(
            examples, self.cfg.micro_batch, self.pad_id, seed=self.cfg.seed, epoch=epoch,
            shuffle=True, packing=self.recipe.data.packing, max_length=self.recipe.data.max_length,
            padding_free=self.recipe.data.padding_free,
        )

    def _epoch_length(self, epoch: int) -> int:
        if epoch not in self._epoch_lengths:
            self._epoch_lengths[epoch] = len(self._get_epoch(epoch))
        return self._epoch_lengths[epoch]

    def _get_epoch(self, epoch: int) -> list[dict]:
        if epoch not in self._epoch_cache:
            self._epoch_cache = {epoch: self._epoch_batches(epoch)}
        return self._epoch_cache[epoch]

    def micro_batch(self, index: int) -> dict:
        """Micro-batch ``index`` of the run-long stream: epochs follow one another, each reshuffled (and
        re-augmented) by (seed, epoch), so a resumed run draws exactly what the uninterrupted one would.
        With packing an epoch's row count can vary, hence the walk over epoch lengths."""
        epoch = 0
        while index >= self._epoch_length(epoch):
            index -= self._epoch_length(epoch)
            epoch += 1
        return self._get_epoch(epoch)[index]

    # -- signals -------------------------------------------------------------------------------
    def _on_signal(self, signum, _frame):
        self._stop_signal = signum
        signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C kills at once
        if self.phase == "finished":  # everything is on disk: nothing to wait for
            raise self.interrupted()

    @contextlib.contextmanager
    def handle_signals(self):
        """SIGINT and SIGTERM stop the run cleanly while this is open (see the module docstring); the
        recipe holds it open until the final evaluation is done. Re-entrant."""
        if self._signal_depth:
            self._signal_depth += 1
            try:
                yield
            finally:
                self._signal_depth -= 1
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        try:
            previous = {s: signal.signal(s, self._on_signal) for s in handled}
        except ValueError:  # not in the main thread: leave signals alone
            yield
            return
        self._signal_depth = 1
        try:
            yield
        finally:
            self._signal_depth = 0
            for s, handler in previous.items():
                signal.signal(s, handler)

    def interrupted(self) -> TrainingInterrupted:
        """The exception for the signal received, saying what is on disk and how to go on."""
        name = signal.Signals(self._stop_signal).name
        resume = f"train.resume=auto output_dir={self.run_dir}"
        if self.phase == "training":
            text = (f"Stopped by signal {name} at step {self.step}; checkpoint saved to {self.final_checkpoint}. "
                    f"Resume with {resume}")
        else:
            where = "while saving the result" if self.phase == "saving" else "during the final evaluation"
            text = (f"Stopped by signal {name} {where}; training finished at step {self.step} and is saved: "
                    f"checkpoint {self.final_checkpoint}, result {self.result_path or '(none)'}. The final "
                    f"evaluation did not run; {resume} runs it without redoing any step")
        return TrainingInterrupted(text, self._stop_signal)

    # -- logging and saving --------------------------------------------------------------------
    def log(self, record: dict) -> None:
        self.history.append(record)
        if is_main_process():
            path = self.run_dir / "metrics.jsonl"
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                with open(path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(record) + "\n")
            except OSError as exc:
                raise write_error(path, exc, find_checkpoint(self.run_dir, "auto", warn=lambda _: None)) from None

    def say(self, text: str, bar=None) -> None:
        if not is_main_process():
            return
        if bar is not None:
            bar.write(text)
        else:
            print(text)

    def _state(self) -> dict:
        return {"total_steps": self.total_steps, "seed": self.cfg.seed, "skipped": self.skipped,
                "nonfinite_run": self.nonfinite_run, "guard": self.guard.state_dict(),
                "plateau": self.plateau.state_dict(), "param_starts": self.param_starts,
                "stage_warmup": self.stage_warmup,
                "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks},
                "recipe": recipe_to_dict(self.recipe)}

    def rebuild_optimizer(self, new_params: dict[str, int] | None = None, stage_warmup: int | None = None) -> None:
        """Rebuild optimizer and schedule from the parameters that now require grad, at the current step.

        AdamW moments carry over for parameters that are the same tensors as before; resized or new ones
        start fresh. ``new_params`` (name -> start step) get their own warm-up of ``stage_warmup`` steps.
        """
        if new_params:
            self.param_starts.update(new_params)
        if stage_warmup is not None:
            self.stage_warmup = stage_warmup
        old_state = {id(p): st for p, st in self.optimizer.state.items()}
        shapes = {id(p): p.shape for g in self.optimizer.param_groups for p in g["params"]}
        self.optimizer, self.scheduler = build_optimizer(
            self.model, self.cfg, self.total_steps, scale=lambda: self.plateau.scale, starts=self.param_starts,
            stage_warmup=self.stage_warmup, current_step=self.step,
        )
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                st = old_state.get(id(p))
                if st is not None and shapes.get(id(p)) == p.shape:
                    self.optimizer.state[p] = st

    def save(self) -> Path | None:
        if not is_main_process():
            return None
        self.final_checkpoint = save_checkpoint(self.run_dir, self.model, self.optimizer, self.scheduler,
                                                self.step, self._state(), self.cfg.keep_last)
        return self.final_checkpoint

    def _apply_scale_now(self) -> None:
        """Re-evaluate the schedule at its current position so a new plateau scale applies to the very
        next update, not one step later."""
        last = self.scheduler.last_epoch
        for group, base, fn in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base * fn(last)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    # -- one step ------------------------------------------------------------------------------
    def forward_backward(self) -> tuple[float, int]:
        """Accumulate gradients over the step's micro-batches. Returns (mean loss, tokens seen);
        the loss is non-finite when a micro-batch's was (its gradients are then dropped)."""
        cfg = self.cfg
        micro = [self.micro_batch(self.step * cfg.grad_accum + i) for i in range(cfg.grad_accum)]
        label_tokens = sum(count_label_tokens(b) for b in micro)
        if label_tokens == 0:
            raise DeftuneError(f"Step {self.step + 1}: no response tokens in the batch (all labels -100)")
        seen = 0
        loss_total = 0.0
        for batch in micro:
            batch = move(batch, self.device)
            with autocast_context(self.device):
                loss_sum, _ = response_loss_sum(self.model, batch)
            if not torch.isfinite(loss_sum):
                return float("nan"), seen
            (loss_sum / label_tokens).backward()
            loss_total += float(loss_sum.detach())
            seen += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        return loss_total / label_tokens, seen

    def _skip(self, step_no: int, loss: float, grad_norm: float, tokens: int) -> dict:
        """Drop this step's gradients but move on (data and schedule), so a bad batch is not retried."""
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.scheduler.step()
        self.skipped += 1
        return {"step": step_no, "skipped": True, "loss": loss, "grad_norm": grad_norm, "tokens": tokens}

    def _stop_without_update(self, message: str) -> None:
        """Drop the gradients, checkpoint the (still good) state and stop; ``message`` gets ``{saved}``."""
        self.optimizer.zero_grad(set_to_none=True)
        saved = self.save()
        raise TrainingStopped(message.replace("{saved}", str(saved)))

    def train_step(self) -> dict:
        """One optimizer step (or a skipped one). Returns the step's record for the logs."""
        loss, tokens = self.forward_backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = float("nan")
        if math.isfinite(loss):
            for cb in self.callbacks:
                cb.after_backward(self)
            max_norm = self.cfg.clip_grad if self.cfg.clip_grad > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        step_no = self.step + 1
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            what = "loss" if not math.isfinite(loss) else "grad_norm"
            self.nonfinite_run += 1
            stop = self.nonfinite_run >= self.mon.max_nonfinite
            self.log({"step": step_no, "event": "nonfinite", "what": what, "action": "stop" if stop else "skip"})
            if stop:
                self._stop_without_update(
                    f"Non-finite {what} at step {step_no} ({self.nonfinite_run} step(s) in a row, "
                    f"monitor.max_nonfinite={self.mon.max_nonfinite}); no bad update was applied. "
                    "Last good state saved to {saved}. Lower train.lr or check the data, then resume "
                    "with train.resume=auto."
                )
            return self._skip(step_no, loss, grad_norm, tokens)
        self.nonfinite_run = 0
        if self.mon.guard != "off":
            band = self.guard.band()
            z = self.guard.check(grad_norm)
            if z is not None:
                mean, std = band
                event = {"step": step_no, "event": "grad_spike", "grad_norm": round(grad_norm, 6),
                         "mean": round(mean, 6), "std": round(std, 6), "z": round(z, 3), "action": self.mon.guard}
                self.log(event)
                if self.mon.guard == "stop":
                    self._stop_without_update(
                        f"Gradient-norm guard: step {step_no} had grad norm {grad_norm:.4g}, z = {z:.2f} "
                        f"above the rolling mean {mean:.4g} (std {std:.4g}, limit {self.mon.guard_sigma} sigma). "
                        "The update was not applied; checkpoint saved to {saved}. Resume with "
                        "train.resume=auto (perhaps with a lower train.lr), or set monitor.guard=skip."
                    )
                return self._skip(step_no, loss, grad_norm, tokens)
        layers = layer_grad_norms(self.model) if self.mon.layer_grad_norms and self.board else {}
        self.optimizer.step()
        for cb in self.callbacks:
            cb.after_optimizer_step(self)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": step_no, "skipped": False, "loss": loss, "grad_norm": grad_norm, "tokens": tokens,
                "layers": layers}

    # -- the loop ------------------------------------------------------------------------------
    def run(self, checkpoint: Path | None = None, save_result: Callable[[], Path] | None = None) -> TrainResult:
        """Train (from ``checkpoint``, or the one ``train.resume`` finds), write the final checkpoint, then
        ``save_result()`` (the method's result, e.g. the adapter; its path is kept in ``result_path``), then
        the final evaluation. Signals are handled throughout (``handle_signals``)."""
        with self.handle_signals():
            return self._run(checkpoint, save_result)

    def _run(self, checkpoint: Path | None, save_result: Callable[[], Path] | None) -> TrainResult:
        cfg = self.cfg
        resumed = None
        if checkpoint is None:
            checkpoint = find_checkpoint(self.run_dir, cfg.resume, warn=self.say)
        for cb in self.callbacks:
            cb.on_train_start(self)
        if checkpoint is not None:
            pre = read_meta(checkpoint)
            for cb in self.callbacks:
                cb.load_state_dict(pre.get("callbacks", {}).get(cb.name, {}), self)
            self.param_starts = {k: int(v) for k, v in pre.get("param_starts", {}).items()}
            self.stage_warmup = int(pre.get("stage_warmup", 0))
            self.step = int(pre["step"])
            self.rebuild_optimizer()
            meta = load_checkpoint(checkpoint, self.model, self.optimizer, self.scheduler)
            if int(meta.get("total_steps", self.total_steps)) != self.total_steps:
                raise DeftuneError(
                    f"{checkpoint} was made for a run of {meta['total_steps']} steps, this recipe asks for "
                    f"{self.total_steps}; resume with the same train.max_steps/epochs/batch settings"
                )
            self.step = int(meta["step"])
            self.skipped = int(meta.get("skipped", 0))
            self.nonfinite_run = int(meta.get("nonfinite_run", 0))
            self.guard.load_state_dict(meta.get("guard", {}))
            self.plateau.load_state_dict(meta.get("plateau", {}))
            self._apply_scale_now()
            resumed = str(checkpoint)
            self.final_checkpoint = Path(checkpoint)
            # Steps after this one may be in metrics.jsonl already (logged before the interruption); they
            # are redone, and readers keep the later records (report.read_metrics).
            self.log({"step": self.step, "event": "resume", "from_step": self.step,
                      "checkpoint": Path(checkpoint).name})
            self.say(f"Resumed from {checkpoint} at step {self.step}/{self.total_steps}")
        self.board = Board(self.run_dir, self.mon.tensorboard and is_main_process())
        try:
            return self._loop(resumed, save_result)
        finally:
            self.board.close()

    def _loop(self, resumed: str | None, save_result: Callable[[], Path] | None = None) -> TrainResult:
        cfg, ev = self.cfg, self.recipe.eval
        self.model.train()
        bar = None
        if self.progress and is_main_process():
            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True)
        start = time.perf_counter()
        tokens_total = 0
        last_loss = None
        eval_loss = None
        stopped_early = False
        start_step = self.step
        with self.handle_signals():
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                out = self.train_step()
                self._log_augmentation()
                dt = time.perf_counter() - t0
                tokens_total += out["tokens"]
                lr = self.scheduler.get_last_lr()[0]
                if not out["skipped"]:
                    last_loss = out["loss"]
                    if self.step % max(1, cfg.log_every) == 0 or self.step == self.total_steps:
                        record = {
                            "step": self.step,
                            "epoch": round(self.step / self.steps_per_epoch, 4),
                            "loss": round(out["loss"], 6),
                            "lr": lr,
                            "grad_norm": round(out["grad_norm"], 6),
                            "tokens": out["tokens"],
                            "tokens_per_s": round(out["tokens"] / dt, 2),
                            "elapsed_s": round(time.perf_counter() - start, 2),
                            "peak_mem_gib": round(peak_memory_gib(self.device), 3),
                        }
                        self.log(record)
                        self.board.scalars({k: record[k] for k in ("loss", "lr", "grad_norm", "tokens_per_s",
                                                                   "peak_mem_gib")}, self.step, "train")
                        self.board.scalars({f"layer_{i}": v for i, v in out["layers"].items()}, self.step,
                                           "grad_norm")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{out['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{out['tokens'] / dt:.0f}")
                for cb in self.callbacks:
                    cb.on_step_end(self)
                if self.updates is not None and self.step % self.mon.heatmap_every == 0:
                    self.log_heatmap()
                if ev.every and self.step % ev.every == 0:
                    metrics = self.validate(bar)
                    eval_loss = metrics.get("eval_loss", eval_loss)
                    if self._after_validation(metrics, bar):
                        stopped_early = True
                        break
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                    self.save()
                if self._stop_signal is not None:
                    self.save()
                    if bar is not None:
                        bar.close()
                    raise self.interrupted()
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - start
        if self.updates is not None and (self.step % self.mon.heatmap_every != 0):
            self.log_heatmap()  # the final picture feeds the report's "ineffective modules"
        # The final checkpoint and the result go to disk before the final evaluation, so a signal or a
        # crash there loses nothing; a signal during the save is acted on once both are written.
        self.phase = "saving"
        if self.step != start_step or self.final_checkpoint is None:
            self.save()
        if save_result is not None and is_main_process():
            self.result_path = save_result()
        self.phase = "finished"
        if self._stop_signal is not None:
            self.phase = "saving"  # for the message: the signal came while saving
            raise self.interrupted()
        if self.data.eval and not (ev.every and self.step % ev.every == 0 and self.step != start_step):
            eval_loss = self.evaluate()
        return TrainResult(
            steps=self.step, final_loss=last_loss, eval_loss=eval_loss,
            tokens_per_s=tokens_total / seconds if seconds > 0 else 0.0, seconds=seconds,
            resumed_from=resumed, skipped_steps=self.skipped, stopped_early=stopped_early,
            history=self.history,
        )

    def _log_augmentation(self) -> None:
        for epoch, (replaced, total) in sorted(self._augment_counts.items()):
            if epoch not in self._augment_logged:
                self._augment_logged.add(epoch)
                self.log({"step": self.step, "epoch": epoch, "event": "augmented", "replaced": replaced,
                           "total": total})
                self.board.scalars({"augmented": replaced}, self.step, "data")

    # -- validation ----------------------------------------------------------------------------
    def evaluate(self) -> float:
        loss = evaluate_loss(self.model, self.data.eval, self.cfg.micro_batch, self.pad_id, self.device)
        record = {"step": self.step, "eval_loss": round(loss, 6), "eval_ppl": round(math.exp(min(loss, 50)), 4)}
        self.log(record)
        self.board.scalars(record, self.step, "eval")
        return loss

    def _eval_loss_metrics(self, model: nn.Module) -> dict:
        if not self.data.eval:
            return {}
        loss = evaluate_loss(model, self.data.eval, self.cfg.micro_batch, self.pad_id, self.device)
        return {"eval_loss": round(loss, 4), "eval_ppl": round(math.exp(min(loss, 50)), 3)}

    def validate(self, bar=None) -> dict:
        metrics = self.validator(self.model)
        self.model.train()
        if not metrics:
            return metrics
        self.log({"step": self.step, **metrics})
        self.board.scalars(metrics, self.step, "eval")
        shown = ", ".join(f"{k}={v}" for k, v in metrics.items() if not isinstance(v, str))
        self.say(f"step {self.step} validation: {shown}", bar)
        return metrics

    def _after_validation(self, metrics: dict, bar=None) -> bool:
        """Feed the plateau controller; return True to stop early."""
        name = self.recipe.eval.plateau_metric
        if name not in metrics:
            return False
        outcome = self.plateau.update(float(metrics[name]))
        if outcome["best"]:
            self.log({"step": self.step, "event": "best", "metric": name, "value": metrics[name]})
            if self.on_best is not None and is_main_process():
                self.on_best(self.run_dir / "best")
        if outcome["reduced"]:
            self._apply_scale_now()
            self.log({"step": self.step, "event": "lr_reduced", "metric": name,
                       "factor": self.recipe.eval.plateau_factor, "lr_scale": self.plateau.scale})
            self.say(f"step {self.step}: {name} has not improved for {self.plateau.patience} evaluations; "
                      f"LR x{self.recipe.eval.plateau_factor} (scale now {self.plateau.scale:g})", bar)
        if outcome["stop"]:
            self.log({"step": self.step, "event": "early_stop", "metric": name})
            self.say(f"step {self.step}: early stop, {name} has not improved for "
                      f"{self.plateau.since_best} evaluations", bar)
            return True
        return False

    def log_heatmap(self) -> None:
        grid = self.updates.measure(self.model)
        if not grid["layers"]:
            return
        self.log({"step": self.step, "event": "update_heatmap", **grid})
        if not is_main_process():
            return
        flat = {f"L{layer}/{m}": v for layer, row in zip(grid["layers"], grid["values"])
                for m, v in zip(grid["modules"], row) if v is not None}
        self.board.scalars(flat, self.step, "update")
        if self.mon.tensorboard or self.mon.report:
            path = self.run_dir / "heatmaps" / f"step-{self.step:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_heatmap_png(grid["layers"], grid["modules"], grid["values"], path,
                             f"relative update ||dW||/||W0|| at step {self.step}")
            self.board.image_png("update_heatmap", path, self.step)
