"""kubetune's ``transformers.Trainer``: the HF training loop with two replacements.

- ``evaluate`` is :class:`orchestrator.trainer.evaluation.Evaluator` (token-weighted losses
  of every eval set in one pass).
- ``create_optimizer`` builds PEFT's LoRA+ optimizer when ``method.loraPlusLrRatio`` is set
  (the same optimizer class and hyperparameters as HF would use, with the B matrices in
  groups of their own at ``ratio`` x the learning rate). DeepSpeed (without an optimizer block
  of its own, which the API rejects with LoRA+) wraps this client optimizer and keeps its
  groups; the LR schedule scales every group alike, so the ratio holds throughout.
- Tokens are counted without a device sync per micro-step (HF gathers the count and calls
  ``.item()`` on every one): the training collator adds each batch's non-padding token count
  as a plain int, ``training_step`` takes it off, and the ranks' sums are all-reduced once per
  log step into ``state.num_input_tokens_seen`` (what tokens/s and MFU are computed from).
- Bottleneck adapters (not a PEFT model, so HF would save the whole base model into every
  checkpoint, and under ZeRO-3 gather all of it first) are saved as adapter tensors only:
  ``save_model`` gathers just the adapter parameters and writes the bottleneck format, and a
  non-DeepSpeed resume loads them back (DeepSpeed resumes from its own engine checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.trainer import bottleneck
from orchestrator.trainer.data import TOKENS_KEY, Collator
from orchestrator.trainer.evaluation import Evaluator

BottleneckSaver = Callable[[Path, dict[str, Any]], None]


def trainer_class() -> Any:
    from transformers import Trainer
    from transformers.integrations import is_deepspeed_zero3_enabled

    class KubetuneTrainer(Trainer):  # type: ignore[misc]
        evaluator: Evaluator
        save_bottleneck: BottleneckSaver | None = None  # set for method adapter
        loraplus_lr_ratio: float | None = None  # method.loraPlusLrRatio
        tokens_pending = 0  # this rank's non-padding tokens trained since the last count

        def get_train_dataloader(self) -> Any:
            plain = self.data_collator
            if isinstance(plain, Collator):  # only training batches carry the count
                self.data_collator = plain.counting()
            try:
                return super().get_train_dataloader()
            finally:
                self.data_collator = plain

        def training_step(self, model: Any, inputs: dict[str, Any],
                          num_items_in_batch: Any = None) -> Any:
            self.tokens_pending += int(inputs.pop(TOKENS_KEY, 0))
            return super().training_step(model, inputs, num_items_in_batch)

        def _track_num_input_tokens(self, inputs: Any) -> None:
            """Replaced by count_tokens (HF's syncs the device on every micro-step)."""

        def count_tokens(self) -> None:
            """Add every rank's tokens since the last count to state.num_input_tokens_seen:
            one all-reduce, so only where every rank calls it (log steps, end of training)."""
            import torch
            import torch.distributed as dist

            n, self.tokens_pending = self.tokens_pending, 0
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                total = torch.tensor([n], dtype=torch.int64, device=self.args.device)
                dist.all_reduce(total)
                n = int(total.item())
            self.state.num_input_tokens_seen += n

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs:  # a training log step, logged by every rank
                self.count_tokens()
            super().log(logs, start_time)

        def train(self, *args: Any, **kwargs: Any) -> Any:
            result = super().train(*args, **kwargs)
            self.count_tokens()  # the steps after the last log step
            return result

        def create_optimizer(self, model: Any = None) -> Any:
            if self.loraplus_lr_ratio is None or self.optimizer is not None:
                return super().create_optimizer(model)
            from peft.optimizers import create_loraplus_optimizer

            opt_model: Any = self.model if model is None else model
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            kwargs.pop("lr", None)

            def without_empty_groups(groups: list[dict[str, Any]], **kw: Any) -> Any:
                # PEFT always lists an embedding group; ZeRO cannot flatten an empty one
                return cls([g for g in groups if g["params"]], **kw)

            self.optimizer = create_loraplus_optimizer(
                opt_model, without_empty_groups,  # type: ignore[arg-type]
                lr=self.args.learning_rate,
                loraplus_lr_ratio=self.loraplus_lr_ratio,
                loraplus_weight_decay=self.args.weight_decay, **kwargs)
            return self.optimizer

        def optimizer_summary(self) -> dict[str, Any]:
            """The learning rate (before the schedule) and weight decay of every parameter
            group of the optimizer actually stepped (DeepSpeed's, when it wraps ours)."""
            groups = getattr(self.optimizer, "param_groups", None) or []
            return {"loraPlusLrRatio": self.loraplus_lr_ratio,
                    "paramGroups": [{"lr": float(g.get("initial_lr", g.get("lr", 0.0))),
                                     "weightDecay": float(g.get("weight_decay", 0.0))}
                                    for g in groups]}

        def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None,
                     metric_key_prefix: str = "eval") -> dict[str, float]:
            return self.evaluator.evaluate(self, eval_dataset, metric_key_prefix)

        def save_model(self, output_dir: str | None = None,
                       _internal_call: bool = False) -> None:
            if self.save_bottleneck is None:
                super().save_model(output_dir, _internal_call)
                return
            out = Path(output_dir or str(self.args.output_dir))
            # Collective under ZeRO-3: every rank calls save_model.
            state = bottleneck.adapter_tensors(self.model, is_deepspeed_zero3_enabled())
            if self.args.should_save:
                self.save_bottleneck(out, state)

        def _load_from_checkpoint(self, resume_from_checkpoint: str,
                                  model: Any = None) -> None:
            ckpt = Path(resume_from_checkpoint)
            if self.save_bottleneck is None or not (ckpt / bottleneck.CONFIG_NAME).is_file():
                super()._load_from_checkpoint(resume_from_checkpoint, model)
                return
            bottleneck.load_weights(model or self.model, ckpt)

    return KubetuneTrainer
