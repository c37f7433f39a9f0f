"""HF Trainer callbacks: metrics publishing and pruning, progress logs, checkpoint upload."""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from orchestrator.trainer import checkpoints, graceful, throughput
from orchestrator.trainer.dist import barrier, broadcast, local_rank, rank, world_size
from orchestrator.trainer.reporting import MetricsReporter, ProgressPoster, progress_poster_for

log = logging.getLogger("orchestrator.trainer")


class MetricsCallback(TrainerCallback):
    """Publishes every evaluation (eval loss, general loss and its delta) through the reporter on
    rank 0 and stops training on every rank when the answer is "prune"."""

    def __init__(self, run: Any, reporter: MetricsReporter) -> None:
        self.run = run
        self.reporter = reporter
        self.pruned = False
        self.last_eval: dict[str, float] = {}

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None
                    = None, **kw: Any) -> None:
        metrics = metrics or {}
        if "eval_task_loss" not in metrics:
            return
        # Every eval set is evaluated in the same pass (evaluation.Evaluator): the general
        # loss reported here is this interval's, not the previous one's.
        self.last_eval = {"evalLoss": float(metrics["eval_task_loss"])}
        if "eval_general_loss" in metrics:
            self.last_eval["generalLoss"] = float(metrics["eval_general_loss"])
            if "eval_general_baseline_loss" in metrics:
                self.last_eval["generalLossDelta"] = (
                    self.last_eval["generalLoss"] - float(metrics["eval_general_baseline_loss"]))
        decision = "continue"
        if rank() == 0:
            decision = self.reporter.report(state.global_step, dict(self.last_eval))
        decision = broadcast(decision)
        if decision == "prune" and state.global_step > 0:
            log.warning("the sweep pruned this trial at step %d; stopping", state.global_step)
            self.pruned = True
            control.should_training_stop = True
            control.should_save = False

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.reporter.close()


class EarlyStoppingCallback(TrainerCallback):
    """``training.earlyStopping``: stop when ``patience`` evaluations in a row did not lower the
    eval loss by more than ``min_delta`` below the best so far.

    Not HF's EarlyStoppingCallback: that one needs ``load_best_model_at_end``, i.e. a
    checkpoint at every evaluation (with DeepSpeed, engine shards uploaded to the store each
    time) and a reload of the best one. Here the run stops and the artifact is the model at
    the stop; the best eval loss and its step are reported next to it. The decision is
    recomputed from ``state.log_history`` at every evaluation, so a resumed attempt continues
    the count, and every rank decides alike (the eval loss is summed across ranks)."""

    def __init__(self, patience: int, min_delta: float) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.stopped_at: int | None = None
        self.best: tuple[float, int] | None = None  # (loss, step)

    def scan(self, history: list[dict[str, Any]]) -> int:
        """Evaluations since the last improvement (updates ``best``)."""
        best: tuple[float, int] | None = None
        since = 0
        for entry in history:
            if "eval_task_loss" not in entry:
                continue
            loss, step = float(entry["eval_task_loss"]), int(entry.get("step", 0))
            if best is None or loss < best[0] - self.min_delta:
                best, since = (loss, step), 0
            else:
                since += 1
        self.best = best
        return since

    def on_evaluate(self, args: Any, state: Any, control: Any,
                    metrics: dict[str, float] | None = None, **kw: Any) -> None:
        if not metrics or "eval_task_loss" not in metrics:
            return
        since = self.scan(state.log_history)
        if since >= self.patience and state.global_step < state.max_steps:
            assert self.best is not None
            self.stopped_at = state.global_step
            log.warning("early stopping at step %d: evalLoss has not improved by more than %g "
                        "on %.6f (step %d) for %d evaluations", state.global_step,
                        self.min_delta, self.best[0], self.best[1], since)
            control.should_training_stop = True
            control.should_save = False


class ProgressCallback(TrainerCallback):
    """One line per logging step on rank 0: step/total, loss, lr, tokens/s (non-padding
    tokens of all ranks), MFU where the device's peak is known, ETA; the same numbers posted to
    the controller (status.progress) at most once per interval."""

    def __init__(self, poster: ProgressPoster | None = None, precision: str = "fp32",
                 context: int = 0) -> None:
        self.poster = poster
        self.precision = precision
        self.context = context  # maxSeqLength: T in the attention FLOPs
        self.t0 = 0.0
        self.step0 = 0
        self.last = (0.0, 0)  # (time, tokens)
        self.flops_per_token = 0.0
        self.peak: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.t0 = time.time()
        self.step0 = state.global_step
        self.last = (self.t0, state.num_input_tokens_seen or 0)
        if not state.is_world_process_zero:
            return
        log.info("training: %d steps (from step %d), %d epoch(s), world size %d, "
                 "global batch %d", state.max_steps, state.global_step,
                 int(args.num_train_epochs), args.world_size,
                 args.per_device_train_batch_size * args.gradient_accumulation_steps
                 * args.world_size)
        if kw.get("model") is not None:
            fm = throughput.flops_model(kw["model"], self.context)
            self.flops_per_token = fm.per_token
            self.peak = throughput.peak_flops(self.precision, throughput.device_name())
            log.info("model FLOPs per token %.4g (matmul weights: %d frozen, %d trainable; "
                     "attention over %d tokens); device peak %s", fm.per_token, fm.frozen,
                     fm.trainable, fm.context,
                     f"{self.peak / 1e12:g} TFLOPS" if self.peak else
                     f"unknown (set {throughput.PEAK_ENV} for MFU)")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kw: Any) -> None:
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        now = time.time()
        tokens = state.num_input_tokens_seen or 0
        dt = max(now - self.last[0], 1e-9)
        tps = (tokens - self.last[1]) / dt
        self.last = (now, tokens)
        done = state.global_step - self.step0
        eta = (now - self.t0) / done * (state.max_steps - state.global_step) if done else 0
        mfu = throughput.mfu(tps, self.flops_per_token, self.peak, args.world_size)
        log.info("step %d/%d (%.0f%%) loss %.4f lr %.3g tokens/s %.0f%s ETA %s",
                 state.global_step, state.max_steps,
                 100.0 * state.global_step / max(state.max_steps, 1), logs["loss"],
                 logs.get("learning_rate", 0.0), tps,
                 "" if mfu is None else f" MFU {100 * mfu:.1f}%", timedelta(seconds=int(eta)))
        if self.poster is not None:
            progress = {
                "step": state.global_step, "totalSteps": state.max_steps,
                "epoch": round(float(state.epoch or 0.0), 4), "trainLoss": float(logs["loss"]),
                "tokensPerSecond": round(tps, 1), "etaSeconds": round(eta, 1)}
            if mfu is not None:
                progress["mfu"] = round(mfu, 4)
            self.poster.post(time.monotonic(), state.global_step, progress)


class CheckpointSyncCallback(TrainerCallback):
    """After each local checkpoint: upload every node's part, then publish latest.json."""

    def __init__(self, run: Any) -> None:
        self.run = run

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        name = f"checkpoint-{state.global_step}"
        local = Path(args.output_dir) / name
        barrier()  # every rank finished writing its shards
        if local_rank() == 0 and local.is_dir():
            checkpoints.upload_node_part(local, self.run.cfg.checkpoint_uri,
                                         checkpoints.node_index())
        barrier()  # every node finished uploading
        if rank() == 0:
            checkpoints.publish(self.run.cfg.checkpoint_uri, state.global_step, name,
                                checkpoints.num_nodes(), self.run.fingerprint, world_size())
        barrier()


class GracefulStopCallback(TrainerCallback):
    """Stops every rank at the same step, with a checkpoint, when any rank got SIGTERM."""

    def __init__(self) -> None:
        self.stopped_at: int | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.stopped_at is None and graceful.any_rank_requested():
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True


class SaveGuardCallback(TrainerCallback):
    """Two adjustments around HF's checkpoint saves.

    - No checkpoint at the last step: the artifact is the final output and is uploaded right
      after; a checkpoint there would only be uploaded and deleted again.
    - Prompt-learning adapters (prefix/prompt) are saved from the embedding weight directly
      (PEFT's inference_mode path) instead of a forward pass through the prompt encoder: that
      forward runs on rank 0 only and, under ZeRO-3, leaves rank 0's parameter-fetch trace
      different from the other ranks', which deadlocks the next forward pass."""

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None,
                    **kw: Any) -> None:
        if state.global_step >= state.max_steps:
            control.should_save = False
        if control.should_save:
            set_prompt_inference_mode(model, True)

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        set_prompt_inference_mode(model, False)


def set_prompt_inference_mode(model: Any, on: bool) -> None:
    for cfg in (getattr(model, "peft_config", None) or {}).values():
        if getattr(cfg, "is_prompt_learning", False):
            cfg.inference_mode = on


def make_callbacks(run: Any, reporter: MetricsReporter) -> list[Any]:
    # GracefulStop before SaveGuard: a stop's checkpoint gets SaveGuard's prompt handling,
    # and SaveGuard still drops the save at the last step (the run then simply finishes).
    poster = progress_poster_for(run.cfg) if rank() == 0 else None
    progress = ProgressCallback(poster, run.spec.training.precision, run.spec.data.max_seq_length)
    cbs: list[Any] = [MetricsCallback(run, reporter), progress,
                      GracefulStopCallback(), SaveGuardCallback(), CheckpointSyncCallback(run)]
    es = run.spec.training.early_stopping
    if es is not None:
        cbs.insert(1, EarlyStoppingCallback(es.patience, es.min_delta))
    return cbs
