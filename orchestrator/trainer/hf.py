"""kubetune's ``transformers.Trainer``: the HF training loop with two replacements.

- ``evaluate`` is :class:`orchestrator.trainer.evaluation.Evaluator` (token-weighted losses
  of every eval set in one pass).
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
from orchestrator.trainer.evaluation import Evaluator

BottleneckSaver = Callable[[Path, dict[str, Any]], None]


def trainer_class() -> Any:
    from transformers import Trainer
    from transformers.integrations import is_deepspeed_zero3_enabled

    class KubetuneTrainer(Trainer):  # type: ignore[misc]
        evaluator: Evaluator
        save_bottleneck: BottleneckSaver | None = None  # set for method adapter

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
