"""The self-supervised training loop (docs/reference.md §4, §6, §7).

Metrics stay on the device and are read back every `log_step` steps in one transfer; a non-finite
loss then stops the run before anything is saved, so the last good checkpoint stays."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import time
from typing import Any, Callable, Optional

import torch
from torch import nn
from tqdm import tqdm

from data_loader.base import batch_generator
from data_loader.decode import ImageFiles
from data_loader.gpu_augment import gpu_views
from data_loader.prefetch import Prefetcher
from data_loader.transforms import PackedImages
from trainer.checkpoint import (
    check_module_state,
    check_optimizer_state,
    load_module_state,
    save_checkpoint,
    unwrap,
)
from trainer.precision import Precision
from trainer.preemption import SIGUSR1, Preempted, StopSignal
from trainer.run_dir import RunDir
from trainer.tracking import Tracker, epoch_summary
from utils.dist import ProcessInfo, all_reduce_mean, any_process, barrier
from utils.optim import set_learning_rate
from utils.rng import rng_state, set_rng_state
from utils.schema import CUDA_GRAPH_MODES, TrainerSettings

log = logging.getLogger("groco")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


@dataclasses.dataclass
class Evaluation:
    """An evaluator with its loaders: `train_loader` (k-NN bank, probe training) and `val_loader`
    (k-NN queries, probe validation)."""

    evaluator: Any
    train_loader: Any
    val_loader: Any


class Trainer:
    """One training run; `schedule` maps the global step to its learning rate."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, optimizer, schedule: Callable[[int], float], train_loader,
                 evaluations: list[Evaluation], settings: TrainerSettings, precision: Precision,
                 proc: ProcessInfo, run_dir: Optional[RunDir], config: dict, data_seed: int):
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.schedule = schedule
        self.loader = train_loader
        self.evaluations = evaluations
        self.settings = settings
        self.precision = precision
        self.proc = proc
        self.run_dir = run_dir
        self.config = config
        self.data_seed = data_seed
        self.params = [p for p in model.parameters() if p.requires_grad]
        # compiled callables for the step; state dicts come from the modules themselves
        mode = "default" if settings.compile is True else settings.compile or None
        self.forward = torch.compile(model, mode=mode) if mode else model
        self.compute_loss = torch.compile(loss_fn, mode=mode) if mode else loss_fn
        # CUDA graphs replay into the same output buffers: each step is marked, and what is kept
        # across steps is copied out (`_metrics_row`)
        self.cuda_graphs = mode in CUDA_GRAPH_MODES and proc.device.type == "cuda"
        self.memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
        self.start_epoch = 0
        self.start_step = 0  # batches of start_epoch already done (a run preempted mid-epoch)
        self.global_step = 0  # optimisation steps done: the checkpoint's `step`
        # what a resume continues from, saved in every checkpoint: the results so far, the train
        # metrics of an epoch saved before its evaluation (None once recorded), and the running
        # loss sum of the epoch in progress
        self.results: dict = {"initial": {}, "final": {}, "epochs": []}
        self.unrecorded: Optional[dict] = None
        self.epoch_totals = {"loss": 0.0, "steps": 0}
        self.stop = StopSignal()
        self.tracker = Tracker()

    # ------------------------------------------------------------------ state

    def state_dict(self, epoch: int, epoch_step: int = 0) -> dict:
        """The checkpoint after `epoch` (last finished, 0-based) and `epoch_step` batches of the next."""
        net = unwrap(self.model)
        return {
            "epoch": epoch,
            "step": self.global_step,
            "epoch_step": epoch_step,
            "encoder": net.encoder.state_dict(),
            "projection": net.projection.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "config": self.config,
            "scaler": self.precision.scaler.state_dict(),
            "rng": rng_state(),
            "data_seed": self.data_seed,
            "results": copy.deepcopy(self.results),
            "unrecorded": self.unrecorded,
            "epoch_totals": dict(self.epoch_totals) if epoch_step else {"loss": 0.0, "steps": 0},
        }

    def restore(self, checkpoint: dict, path: str) -> None:
        """Continue at the checkpoint's epoch + 1 (or mid-epoch) with its step count unchanged: it is
        the next step's index, so no schedule step is skipped. Everything is checked before anything
        is loaded: a mismatch is a CheckpointError naming keys and shapes, with nothing changed."""
        net = unwrap(self.model)
        check_module_state(net.encoder, checkpoint["encoder"], f"{path}: encoder")
        check_module_state(net.projection, checkpoint["projection"], f"{path}: projection")
        check_optimizer_state(self.optimizer, checkpoint["optimizer"], checkpoint.get("config"), self.config, path)
        load_module_state(net.encoder, checkpoint["encoder"], f"{path}: encoder")
        load_module_state(net.projection, checkpoint["projection"], f"{path}: projection")
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("scaler"):
            self.precision.scaler.load_state_dict(checkpoint["scaler"])
        if "rng" in checkpoint:
            set_rng_state(checkpoint["rng"])
        self.start_epoch = checkpoint["epoch"] + 1
        self.start_step = checkpoint.get("epoch_step", 0)
        self.global_step = checkpoint.get("step", self.start_epoch * len(self.loader))
        if "results" in checkpoint:
            self.results = copy.deepcopy(checkpoint["results"])
            self.unrecorded = checkpoint["unrecorded"]
            self.epoch_totals = dict(checkpoint["epoch_totals"])
        else:
            log.info("%s holds no results (a released checkpoint or an older one): this run's results start "
                     "after it", path)
        log.info("resumed from %s: epoch %d done%s, %d steps", path, checkpoint["epoch"],
                 f" and {self.start_step} batches of the next" if self.start_step else "", self.global_step)

    def attach(self, run_dir: Optional[RunDir], in_place: bool) -> None:
        """Write to `run_dir` from now on (None on the processes without the run folder). Continuing
        in place, the periodic checkpoint of the resumed epoch is written again if a kill lost it."""
        self.run_dir = run_dir
        epoch = self.start_epoch - 1
        if run_dir is None or not in_place or self.start_step or epoch < 0 or not self._periodic(epoch):
            return
        if not run_dir.checkpoint(epoch).is_file():
            save_checkpoint(self.state_dict(epoch), run_dir.checkpoint(epoch))
            log.info("wrote %s again: it was missing", run_dir.checkpoint(epoch))

    def _periodic(self, epoch: int) -> bool:
        return bool(self.settings.save_period) and (epoch + 1) % self.settings.save_period == 0

    def _save_preempted(self, epoch: int, epoch_step: int) -> None:
        """Every process, after agreeing to stop mid-epoch: rank 0 saves, all wait for it, all raise."""
        path = None
        if self.run_dir is not None:
            path = self.run_dir.checkpoint()
            save_checkpoint(self.state_dict(epoch - 1, epoch_step), path)
            log.info("saved %s after %d of %d batches of epoch %d", path, epoch_step, len(self.loader), epoch)
        barrier()  # none may exit (and, under SLURM, requeue the job) before the checkpoint is on disk
        raise self._preempted()

    def _preempted(self) -> Preempted:
        """The exception that ends a stopped run (a collective, via `_stop_cause`)."""
        return Preempted(self._stop_cause(), str(self.run_dir.checkpoint()) if self.run_dir else None)

    def _stop_cause(self) -> int:
        """The stopping signal, a collective: SIGUSR1 (SLURM's requeue warning) if any process got
        it, else this process's own (0 when only another process got one)."""
        if SIGUSR1 is not None and any_process(self.stop.signum == SIGUSR1):
            return SIGUSR1
        return self.stop.signum or 0

    def save(self, epoch: int) -> None:
        if self.run_dir is None:
            return
        state = self.state_dict(epoch)
        if self.settings.save_latest:
            save_checkpoint(state, self.run_dir.checkpoint())
        if self._periodic(epoch):
            save_checkpoint(state, self.run_dir.checkpoint(epoch))

    # ------------------------------------------------------------------ loop

    def fit(self, tracker: Optional[Tracker] = None) -> dict:
        """Train the remaining epochs; returns `{initial, final, epochs}`. Raises `Preempted`, after
        saving, on a stop signal, and NonFiniteLossError on a NaN or infinite loss."""
        self.tracker = tracker or Tracker()
        resumed = self.start_epoch > 0 or self.start_step > 0
        if self.settings.init_val and resumed:
            log.info("init_val: resumed, so the metrics before training are the checkpoint's: %s",
                     self.results["initial"] or "none")
        elif self.settings.init_val:
            self.results["initial"] = self.evaluate(-1)
            self._record({"epoch": -1, "step": self.global_step, "initial": True, **self.results["initial"]})
        with self.stop:
            if self.unrecorded is not None:  # saved before its evaluation, which a stop cut off
                self._evaluate_and_record(self.start_epoch - 1)
            for epoch in range(self.start_epoch, self.settings.epochs):
                self._fit_epoch(epoch)
        return self.results

    def _fit_epoch(self, epoch: int) -> None:
        """Train, save, evaluate, record. Saved before the evaluation too, so a stop during it loses
        no training."""
        start = time.perf_counter()
        train_metrics = self.train_epoch(epoch)
        log.info("epoch %d trained: %s", epoch, epoch_summary(
            time.perf_counter() - start, len(self.loader) * self.loader.global_batch_size, self.proc.device))
        self.unrecorded = {"epoch": epoch, "step": self.global_step, **train_metrics}
        due = self._due_evaluators(epoch)
        if not due:
            self._add_epoch_record(self.unrecorded)
        self.save(epoch)
        # after rank 0's save: a collective, so all wait for it; a finished run just ends
        if self.stop.requested() and (due or epoch < self.settings.epochs - 1):
            raise self._preempted()
        if due:
            self._evaluate_and_record(epoch)
            self.save(epoch)
            if epoch < self.settings.epochs - 1 and self.stop.requested():  # came during the evaluation
                raise self._preempted()

    def _evaluate_and_record(self, epoch: int) -> None:
        self._add_epoch_record({**self.unrecorded, **self.evaluate(epoch)})

    def _add_epoch_record(self, record: dict) -> None:
        """Log and write an epoch's record, which becomes the results' final metrics."""
        self._record(record)
        self.results["epochs"].append(record)
        self.results["final"] = {k: v for k, v in record.items() if k not in ("epoch", "step")}
        self.unrecorded = None

    def _record(self, record: dict) -> None:
        log.info("epoch %s: %s", record["epoch"], ", ".join(f"{k}={_fmt(v)}" for k, v in record.items()
                                                           if k not in ("epoch",)))
        if self.run_dir is not None:
            self.run_dir.append_metrics([record])
        self.tracker.log_metrics(record, step=record["epoch"] + 1, prefix="epoch/",
                                 global_step=record["step"])

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        first = self.start_step if epoch == self.start_epoch else 0
        self.loader.set_epoch(epoch, first)
        steps, global_batch = len(self.loader), self.loader.global_batch_size
        bar = tqdm(total=steps * global_batch, initial=first * global_batch, unit="samples", unit_scale=True,
                   desc=f"epoch {epoch}", disable=not self.proc.is_main, dynamic_ncols=True)
        pending: list[tuple] = []
        if not first:
            self.epoch_totals = {"loss": 0.0, "steps": 0}
        totals = self.epoch_totals
        window_start = time.perf_counter()
        with self._batches(epoch, first) as batches:
            for i, views in enumerate(batches, start=first):
                lr = self.schedule(self.global_step)
                set_learning_rate(self.optimizer, lr)
                loss, info, grad_norm = self.train_step(views)
                pending.append((self.global_step, lr, _metrics_row(loss, grad_norm, info), list(info)))
                self.global_step += 1
                bar.update(global_batch)
                stop = self.stop.requested()
                if len(pending) >= self.settings.log_step or i == steps - 1 or stop:
                    rate = len(pending) * global_batch / (time.perf_counter() - window_start)
                    self._flush(pending, epoch, rate, totals, bar)
                    pending, window_start = [], time.perf_counter()
                if stop and i < steps - 1:
                    bar.close()
                    self._save_preempted(epoch, i + 1)
        bar.close()
        if totals["steps"] == 0:
            raise RuntimeError(f"epoch {epoch}: the training loader yielded no batch")
        return {"train_loss": totals["loss"] / totals["steps"], "lr": self.schedule(self.global_step - 1)}

    def _batches(self, epoch: int, first: int) -> contextlib.AbstractContextManager:
        """The epoch's views from batch `first` on; with `augment_on: gpu` the next batch is prepared
        on a background thread and CUDA stream."""
        if self.loader.gpu_recipe is None:
            return contextlib.nullcontext(views for views, _ in self.loader)
        return Prefetcher(self.loader, lambda batch, j: self._gpu_views(*batch, epoch, first + j), self.proc.device)

    def train_step(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """One optimisation step on `views` (V tensors `[b, 3, H, W]`); returns loss, info, grad norm."""
        views = [v.to(self.proc.device, non_blocking=True).contiguous(memory_format=self.memory_format)
                 for v in views]
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with self.precision.autocast():
            embeddings = self.forward(views)
        loss, info = self.compute_loss(embeddings)
        scaler = self.precision.scaler
        self.optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(self.optimizer)
        clip = self.settings.clip_grad if self.settings.clip_grad is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        scaler.step(self.optimizer)
        scaler.update()
        return loss, info, grad_norm

    def _gpu_views(self, batch: ImageFiles | PackedImages, labels: torch.Tensor, epoch: int,
                   step: int) -> list[torch.Tensor]:
        """Decode (unless `decode_on: cpu`) and augment on the device, seeded by (seed, epoch, step,
        rank). An undecodable file is replaced by another of the batch: batch sizes stay equal."""
        generator = batch_generator(self.data_seed + 2, epoch, step, self.proc.rank)
        return gpu_views(batch, labels, self.loader.gpu_recipe, self.proc.device, generator,
                         where=f"epoch {epoch}, step {step}")[0]

    def _flush(self, pending: list[tuple], epoch: int, rate: float, totals: dict, bar: tqdm) -> None:
        """Average the pending steps' metrics over the processes (equal parts of the global batch,
        so the global batch's mean), read them back in one transfer, check and write them.
        NonFiniteLossError on every process when any loss is NaN or infinite."""
        info_keys = pending[0][3]
        rows = torch.stack([p[2] for p in pending])  # [steps, 2 + len(info_keys)], this process's
        values = all_reduce_mean(rows).cpu()
        if not torch.isfinite(values[:, 0]).all():
            where = self.run_dir.checkpoint() if self.run_dir else "none"
            raise NonFiniteLossError(
                f"the loss became non-finite in epoch {epoch} (steps {pending[0][0]}-{pending[-1][0]}); "
                f"stopping. The last good checkpoint stays: {where}"
            )
        records = []
        for (step, lr, *_), row in zip(pending, values.tolist()):
            records.append({"step": step, "epoch": epoch, "loss": row[0], "lr": lr, "grad_norm": row[1],
                            "samples_per_s": rate, **dict(zip(info_keys, row[2:]))})
            totals["loss"] += row[0]  # step by step, as a resumed run sums the logged losses
        totals["steps"] += len(pending)
        bar.set_postfix(loss=f"{records[-1]['loss']:.4f}", lr=f"{records[-1]['lr']:.3g}")
        # one averaged point per window: a point per step would make Sacred rewrite a huge metrics.json
        window = dict(zip(["loss", "grad_norm", *info_keys], values.mean(0).tolist()))
        self.tracker.log_metrics({**window, "lr": pending[-1][1], "samples_per_s": rate}, step=pending[-1][0],
                                 prefix="train/")
        if self.run_dir is not None:
            self.run_dir.append_metrics(records)

    # ------------------------------------------------------------------ evaluation

    def _evaluator_epoch(self, epoch: int) -> Optional[int]:
        """The epoch the evaluators are asked about; None (all are due) after the last one, so the
        final results hold every evaluator whatever its period."""
        return None if epoch == self.settings.epochs - 1 else epoch

    def _due_evaluators(self, epoch: int) -> list[Evaluation]:
        return [ev for ev in self.evaluations if ev.evaluator.due(self._evaluator_epoch(epoch))]

    def evaluate(self, epoch: int) -> dict[str, float]:
        """Run the evaluators due after `epoch` (-1: before training) on the encoder."""
        encoder = unwrap(self.model).encoder
        metrics: dict[str, float] = {}
        for ev in self._due_evaluators(epoch):
            log.info("%s after epoch %d: evaluating", type(ev.evaluator).__name__, epoch)
            start = time.perf_counter()
            for loader in (ev.train_loader, ev.val_loader):
                loader.set_epoch(max(epoch, 0))
            # float32 features whatever the training precision, as the reference's evaluators and
            # eval.py: the online k-NN and the probe after the last epoch are the paper's numbers
            metrics.update(ev.evaluator.evaluate(encoder, ev.train_loader, ev.val_loader, self.proc.device, None,
                                                 epoch=self._evaluator_epoch(epoch)))
            log.info("%s after epoch %d took %.1f s", type(ev.evaluator).__name__, epoch,
                     time.perf_counter() - start)
        self.model.train()
        return metrics


def _metrics_row(loss: torch.Tensor, grad_norm: torch.Tensor, info: dict[str, torch.Tensor]) -> torch.Tensor:
    """`[2 + len(info)]` float32 on the device: loss, gradient norm, then the info values in order.
    A new tensor, so it survives the next replay of a CUDA graph that produced its inputs."""
    return torch.stack([loss.detach().float(), grad_norm.detach().float(), *(v.float() for v in info.values())])


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
