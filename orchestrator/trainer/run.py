"""The training run: what ``python -m orchestrator.trainer --config PATH`` does in every pod.

Order matters for failing fast: config, method/environment checks and URI probes come
before the distributed process group, data is validated before the model is loaded, and the
model shape and budget plan are computed on the meta device before any weight is read.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import shutil
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from orchestrator import storage
from orchestrator.api.trainer_config import MODEL_CACHE_ENV
from orchestrator.trainer import (
    arch,
    artifact,
    budget,
    budget_gate,
    checkpoints,
    evaluation,
    fastpaths,
    hf,
    merge,
    methods,
    samples,
    sources,
    token_cache,
)
from orchestrator.trainer import bottleneck as bn
from orchestrator.trainer.data import (
    Collator,
    Fields,
    TokenDataset,
    build_dataset,
    load_examples,
    mix_replay,
    mix_sets,
    pack,
)
from orchestrator.trainer.dist import barrier, broadcast, local_rank, rank, world_size
from orchestrator.trainer.errors import (
    ConfigError,
    ExitCode,
    ModelError,
    Pruned,
    Stopped,
    storage_failure,
)
from orchestrator.trainer.reporting import MetricsReporter, reporter_for

log = logging.getLogger("orchestrator.trainer")

DEFAULT_SIZES = {"lora": 8, "dora": 8, "qlora": 8, "adapter": 64, "prefix": 20, "prompt": 20}
TASK, GENERAL = "task", "general"
REPLAY = "replay"  # general data mixed into training (data.replay), never evaluated
MIX = "train:"  # data.trainMix entry i is read as f"train:{i}"


def plan_for(shape: budget.ModelShape, method: Any) -> budget.BudgetPlan:
    t = method.type
    size = {"adapter": method.bottleneck, "prefix": method.num_virtual_tokens,
            "prompt": method.num_virtual_tokens}.get(t, method.rank)
    try:
        return budget.plan(shape, t, size=size, target_percent=method.trainable_param_percent,
                           target_modules=method.target_modules,
                           placement=method.adapter_placement or "houlsby",
                           default_size=DEFAULT_SIZES.get(t, 8))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def deepspeed_config(raw: dict[str, Any], world: int = 1,
                     user_keys: bool = False) -> dict[str, Any] | None:
    """The controller's DeepSpeed config, adjusted so TrainingArguments stays the single
    source of batch sizes, precision and clipping ("auto" is filled in by transformers), and
    ZeRO-3 can gather the adapter for saving.

    None (plain PyTorch: DDP, or one process) when DeepSpeed would add nothing but overhead:
    an empty config, ZeRO stage 0, or a single process without offload — unless the user
    set keys of their own in distributed.deepspeed.config."""
    if not raw:
        return None
    zero_cfg = raw.get("zero_optimization") or {}
    offload = bool(zero_cfg.get("offload_optimizer") or zero_cfg.get("offload_param"))
    if not user_keys and (int(zero_cfg.get("stage") or 0) == 0 or (world == 1 and not offload)):
        return None
    ds = copy.deepcopy(raw)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu",
                "gradient_accumulation_steps", "gradient_clipping"):
        ds[key] = "auto"
    for key in ("bf16", "fp16"):
        if isinstance(ds.get(key), dict):
            ds[key]["enabled"] = "auto"
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return ds


class Run:
    def __init__(self, cfg: Any, reporter: MetricsReporter | None = None) -> None:
        self.cfg = cfg
        self.spec = cfg.spec
        self.work = Path(os.environ.get("KUBETUNE_WORKDIR") or cfg.workdir) / cfg.job_name
        self.fingerprint = artifact.spec_fingerprint(self.spec)
        self.reporter = reporter
        self.started = time.time()
        self.last_step = 0
        self.total_steps: int | None = None

    # --- phases -----------------------------------------------------------------------------
    def check_environment(self) -> bool:
        import torch

        cuda = torch.cuda.is_available()
        gpus = self.spec.distributed.gpus_per_node
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if gpus > 0 and torch.cuda.device_count() < local:
            # Never train on CPU while the pod holds GPUs (a missing driver, device plugin or
            # NVIDIA_VISIBLE_DEVICES mismatch would otherwise go unnoticed for hours).
            raise ConfigError(
                f"distributed.gpusPerNode is {gpus} and this pod runs {local} process(es), but "
                f"it sees {torch.cuda.device_count()} CUDA device(s): check the node's NVIDIA "
                "driver and device plugin and that resources.gpu names the GPU resource; "
                "use gpusPerNode 0 to train on CPU")
        t, prec = self.spec.method.type, self.spec.training.precision
        if t == "qlora" and not cuda:
            raise ConfigError("method qlora needs a CUDA GPU (bitsandbytes 4-bit kernels); "
                              "this process has none. Use method lora on CPU")
        if prec == "fp16" and not cuda:
            raise ConfigError("precision fp16 needs a GPU (mixed precision with loss scaling); "
                              "use bf16 or fp32 on CPU")
        if self.spec.data.packing and t in ("prefix", "prompt"):
            raise ConfigError(f"data.packing cannot be used with method {t}: PEFT drops the "
                              "per-example position ids of packed sequences for virtual-token "
                              "methods, so examples would attend to each other; set "
                              "data.packing to false or use lora")
        check_chat_template(self.spec.data.chat_template)
        if self.spec.output.tensorboard:
            summary_writer()  # fail fast when the image lacks tensorboardX
        from orchestrator.trainer import tracking

        self.trackers = tracking.requested()  # MLflow / W&B when their env asks (off by default)
        tracking.check(self.trackers)  # fail fast when the image lacks the client
        ws = world_size()
        tr = self.spec.training
        if tr.global_batch_size % (tr.micro_batch_size * ws):
            raise ConfigError(f"training.globalBatchSize {tr.global_batch_size} is not divisible "
                              f"by microBatchSize {tr.micro_batch_size} x world size {ws}")
        return cuda

    def probe_inputs(self) -> None:
        """Seconds-fast reachability check of the model before anything heavy (data is read
        and validated right after the process group is up)."""
        m = self.spec.model.uri
        if m.startswith("hf://"):
            if os.environ.get("HF_HUB_OFFLINE"):  # offline: the local hub cache answers now
                sources.resolve_model(m, self.cache)
            return
        try:
            sources.probe(m)
        except storage.StorageError as exc:
            raise storage_failure(exc, f"base model {m} is unavailable", "spec.model.uri",
                                  ModelError) from None
        except Exception as exc:
            raise ModelError(f"base model {m} is unavailable: {exc}") from None

    @property
    def cache(self) -> Path:
        return self.work / "cache"

    @property
    def model_cache(self) -> Path:
        """Where the base model is downloaded: the model cache volume (spec.model.cacheClaim,
        shared by attempts and jobs) when the pod has one, else this attempt's scratch."""
        shared = os.environ.get(MODEL_CACHE_ENV)
        return Path(shared) / "objects" if shared else self.cache

    def training_args(self, cuda: bool, ds: dict[str, Any] | None) -> Any:
        from transformers import TrainingArguments

        tr = self.spec.training
        ws = world_size()
        accum = tr.global_batch_size // (tr.micro_batch_size * ws)
        log_every = int(os.environ.get("KUBETUNE_LOG_EVERY", "0")) or max(1, min(tr.eval_every,
                                                                                  10))
        args = TrainingArguments(
            output_dir=str(self.work / "checkpoints"),
            per_device_train_batch_size=tr.micro_batch_size,
            per_device_eval_batch_size=evaluation.EVAL_BATCH_SIZE,  # the probe's predict()
            gradient_accumulation_steps=accum,
            num_train_epochs=tr.epochs,
            max_steps=tr.max_steps or -1,
            learning_rate=tr.learning_rate,
            lr_scheduler_type=tr.lr_scheduler,
            warmup_steps=min(tr.warmup_ratio, 0.999),  # a float < 1 is a ratio of all steps
            weight_decay=tr.weight_decay,
            max_grad_norm=tr.max_grad_norm,
            optim="adamw_torch_fused" if cuda else "adamw_torch",  # one kernel per step on GPU
            bf16=tr.precision == "bf16",
            fp16=tr.precision == "fp16",
            gradient_checkpointing=tr.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            eval_strategy="steps",
            eval_steps=tr.eval_every,
            eval_on_start=True,  # initialEvalLoss; the general baseline is computed then
            save_strategy="steps",
            save_steps=tr.checkpoint_every,
            save_total_limit=1,  # local disk only; the store keeps its own copies
            logging_steps=log_every,
            include_num_input_tokens_seen="non_padding",  # counted in hf.py
            seed=tr.seed,
            data_seed=tr.seed,
            use_cpu=not cuda,
            ddp_backend="gloo" if not cuda and ws > 1 else None,
            ddp_find_unused_parameters=False,
            # the process group's timeout: a dead peer fails the attempt in minutes, not 30
            ddp_timeout=self.spec.distributed.collective_timeout_seconds,
            deepspeed=ds,
            report_to="none",  # MLflow / W&B: tracking.py adds HF's callbacks (rank 0)
            run_name=self.cfg.job_name,  # the trackers' run name
            disable_tqdm=True,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            log_level="warning",
            log_level_replica="error",
        )
        if ds is not None and not cuda:
            # On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce when its comm layer
            # starts (g++, over 1 GiB per rank: OOM-killed in a real 3 GiB pod, minutes of
            # compiling every attempt). gloo does the same job: skip that build.
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        _ = args.device  # initialise the process group now (barriers below need it)
        if ds is not None and ws > 1:
            # On CPU accelerate initialises plain torch.distributed; deepspeed.zero.Init (ZeRO-3
            # model loading) needs DeepSpeed's comm layer on top of it to see the world size.
            import deepspeed

            deepspeed.comm.init_distributed(
                dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False,
                timeout=timedelta(seconds=self.spec.distributed.collective_timeout_seconds))
        return args

    def read_data(self) -> dict[str, tuple[str, list[Any], list[int]]]:
        """Fetch (local rank 0 first, the others hit its cache) and validate every data file."""
        d = self.spec.data
        fields = Fields(text=d.text_field, prompt=d.prompt_field, response=d.response_field,
                        messages=d.messages_field)
        replay = d.replay.uri if d.replay is not None and d.replay.fraction > 0 else None
        trains = ([("train", d.train)] if d.train_mix is None
                  else [(f"{MIX}{i}", t.uri) for i, t in enumerate(d.train_mix)])
        wanted = [(n, u) for n, u in (*trains, (TASK, d.eval), (GENERAL, d.general),
                                      (REPLAY, replay)) if u]
        paths: dict[str, Path] = {}
        for turn in (0, 1):
            if (local_rank() == 0) == (turn == 0):
                paths = {n: sources.resolve_data(u, self.cache) for n, u in wanted}
            barrier()
        return {n: (u, *load_examples(paths[n], u, self.data_format(n), fields))
                for n, u in wanted}

    def data_format(self, name: str) -> str:
        d = self.spec.data
        if name == REPLAY and d.replay is not None:
            return str(d.replay.format or d.general_format)
        if name.startswith(MIX) and d.train_mix is not None:
            return str(d.train_mix[int(name[len(MIX):])].format or d.format)
        return str(d.general_format) if name == GENERAL else str(d.format)

    def tokenize_data(self, raw: dict[str, tuple[str, list[Any], list[int]]],
                      tokenizer: Any, eval_len: int) -> dict[str, TokenDataset]:
        """Training data is cut to maxSeqLength; eval sets to ``eval_len``, which does not
        depend on any training knob (see evaluation.py)."""
        d = self.spec.data
        seed = self.spec.training.seed

        def trained(n: str) -> bool:
            return n in ("train", REPLAY) or n.startswith(MIX)

        # trainMix sets are mixed as examples and packed afterwards (below). Each pod's local
        # rank 0 tokenizes; its other ranks load the result (token_cache.py).
        jobs = []
        for n, (uri, payloads, where) in raw.items():
            fmt, max_len = self.data_format(n), d.max_seq_length if trained(n) else eval_len
            packed = d.packing and trained(n) and not n.startswith(MIX)
            key_args = (payloads, where, fmt, tokenizer, max_len, packed, seed)
            jobs.append(token_cache.Job(
                n, functools.partial(token_cache.dataset_key, *key_args),
                functools.partial(build_dataset, payloads, where, uri, fmt, tokenizer, max_len,
                                  packed, seed, n)))
        out = token_cache.build_on_node(jobs, self.cache / "tokenized")
        if d.train_mix is not None:
            sets = [out.pop(f"{MIX}{i}") for i in range(len(d.train_mix))]
            mixed, counts = mix_sets(sets, [t.weight for t in d.train_mix], seed)
            wsum = sum(t.weight for t in d.train_mix)
            self.mix_doc = [{"uri": t.uri, "weight": t.weight,
                             "share": round(t.weight / wsum, 6),
                             "examples": len(ds), "drawn": n}
                            for t, ds, n in zip(d.train_mix, sets, counts, strict=True)]
            log.info("trainMix: %s", ", ".join(f"{m['uri']} {m['drawn']}/{m['examples']} "
                                               f"({100 * m['share']:.0f}%)"
                                               for m in self.mix_doc))
            if d.packing:
                n_mixed = len(mixed)
                mixed = pack(mixed, d.max_seq_length, seed)
                log.info("trainMix: packed %d examples into %d sequences of <= %d tokens",
                         n_mixed, len(mixed), d.max_seq_length)
            out["train"] = TokenDataset(mixed, "train")
        if REPLAY in out and d.replay is not None:  # rehearsal against forgetting
            out["train"] = mix_replay(out["train"], out.pop(REPLAY), d.replay.fraction,
                                      self.spec.training.seed)
        return out

    def load_tokenizer(self, model_dir: Path) -> Any:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(model_dir))
        except Exception as exc:
            raise ModelError(f"cannot load the tokenizer of {self.spec.model.uri}: {exc}") from None
        if self.spec.data.chat_template is not None:
            tok.chat_template = self.spec.data.chat_template  # saved with the artifact too
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token  # padding is masked out of attention and loss
        return tok

    def load_model(self, model_dir: Path, cuda: bool) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        t, prec = self.spec.method.type, self.spec.training.precision
        # Frozen base weights can live in the training precision; full fine-tuning keeps fp32
        # master weights (autocast / DeepSpeed handle the low-precision compute).
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec, torch.float32)
        kwargs: dict[str, Any] = {"dtype": dtype if t != "full" else torch.float32}
        if self.fast.attn_implementation:  # else transformers' default (sdpa / eager)
            kwargs["attn_implementation"] = self.fast.attn_implementation
        if t == "qlora":
            kwargs["quantization_config"] = methods.quantization_config(prec)
            kwargs.update(qlora_placement(self.cfg.deepspeed, local_rank()))
        try:
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
        except Exception as exc:
            raise ModelError(f"cannot load base model {self.spec.model.uri}: "
                             f"{type(exc).__name__}: {exc}") from None
        model.config.use_cache = False
        if self.spec.training.gradient_checkpointing and t != "full":
            model.enable_input_require_grads()
        return model

    # --- the run ---------------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
        """Train and upload; returns the termination message parts. Raises TrainerError."""
        cfg, spec = self.cfg, self.spec
        cuda = self.check_environment()
        done = artifact.read_metadata(cfg.artifact_uri)
        if (done and done.get("specFingerprint") == self.fingerprint
                and (done.get("merged") or not spec.output.merged)):
            log.info("artifact at %s is already complete for this spec; nothing to do",
                     cfg.artifact_uri)
            return {"metrics": done.get("metrics"), "artifact": done.get("artifact"),
                    "progress": done.get("progress"), "message": "artifact already complete"}
        self.probe_inputs()
        # a sweep trial checks its budget before downloading the model, and tells the
        # controller the model's config so later trials are checked before launch
        budget_gate.check_before_download(
            spec, cfg.sweep,
            self.reporter or reporter_for(cfg.sweep, cfg.job_name, cfg.namespace, cfg.attempt),
            cfg.attempt, announce=rank() == 0)
        self.ds = deepspeed_config(cfg.deepspeed, world_size(),
                                   bool(spec.distributed.deepspeed.config))
        if cfg.deepspeed and self.ds is None:
            log.info("one process or ZeRO stage 0 without offload: plain PyTorch, no DeepSpeed "
                     "engine")
        if spec.method.lora_plus_lr_ratio is not None and "optimizer" in (self.ds or {}):
            raise ConfigError("method.loraPlusLrRatio cannot be used with a DeepSpeed optimizer "
                              "block (distributed.deepspeed.offload cpu or an optimizer in "
                              "distributed.deepspeed.config): DeepSpeed would build it with one "
                              "learning rate; remove one of them")
        args = self.training_args(cuda, self.ds)
        raw_data = self.read_data()
        for turn in (0, 1):
            if (local_rank() == 0) == (turn == 0):
                model_dir = sources.resolve_model(spec.model.uri, self.model_cache)
            barrier()
        digest_box: dict[str, str] = {}
        digest_thread = None
        if rank() == 0:  # hashing a big model takes a while: overlap it with training
            digest_thread = threading.Thread(
                target=lambda: digest_box.setdefault("sha256", sources.model_digest(model_dir)),
                daemon=True)
            digest_thread.start()

        tokenizer = self.load_tokenizer(model_dir)
        config = arch.load_config(model_dir)
        self.fast = fastpaths.decide(fastpaths.probe(
            cuda=cuda, precision=spec.training.precision, method=spec.method.type,
            config=config, zero_stage=int(((self.ds or {}).get("zero_optimization") or {})
                                          .get("stage") or 0)))
        log.info("GPU fast paths: %s", self.fast.describe())
        args.use_liger_kernel = self.fast.liger  # read when the Trainer is built
        eval_len = evaluation.eval_max_length(spec.data.eval_max_seq_length, config)
        datasets = self.tokenize_data(raw_data, tokenizer, eval_len)
        self.evaluator = evaluation.Evaluator(
            pad_id=tokenizer.pad_token_id, precision=spec.training.precision,
            model_id=evaluation.model_identity(model_dir, spec.model.uri),
            method=spec.method.type,
            cache=evaluation.BaselineCache(storage.default_cache_dir() / "baselines"))

        shape = arch.shape_of(arch.meta_model(config), config)
        if cfg.sweep is not None:  # trials refuse what the solver cannot reach (see above)
            budget_gate.refuse_unreachable(shape, spec)
        plan = self.plan = plan_for(shape, spec.method)
        log.info("budget plan: %s", json.dumps(plan.summary()))
        if plan.target_percent is not None and not plan.within_tolerance:
            log.warning("budget: %s", plan.note)

        from transformers import set_seed

        set_seed(spec.training.seed)  # adapter init (e.g. LoRA A) must not vary between runs
        model = self.load_model(model_dir, cuda)
        model = methods.apply(model, plan, spec.method, shape, model_dir)
        self.initial_adapter = methods.initial_adapter(model, spec.method)
        trainable, total = methods.count_trainable(model)
        if (trainable, total) != (plan.trainable_params, plan.all_params):
            log.warning("model reports %d trainable of %d parameters; the plan predicted %d of "
                        "%d", trainable, total, plan.trainable_params, plan.all_params)
        log.info("trainable params: %d || all params: %d || trainable%%: %.4f", trainable, total,
                 100.0 * trainable / total)

        if plan.method in budget.PROMPT_METHODS and args.hf_deepspeed_config is not None:
            # Keep the (small) prompt encoder whole on every rank under ZeRO-3, so saving can
            # read its weight directly (see callbacks.SaveGuardCallback).
            zero = args.hf_deepspeed_config.config.setdefault("zero_optimization", {})
            if zero.get("stage") == 3:
                current = zero.get("stage3_param_persistence_threshold", 100_000)
                if not isinstance(current, int):  # "auto": transformers' 10 x hidden size
                    current = 10 * int(getattr(config, "hidden_size", 0) or 0)
                zero["stage3_param_persistence_threshold"] = max(current,
                                                                 plan.trainable_params + 1)
        resume = self.prepare_resume(args)
        trainer = self.make_trainer(model, args, tokenizer, datasets)
        self.total_steps = None
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        state = trainer.state
        if self.graceful.stopped_at is not None and state.global_step < state.max_steps:
            raise Stopped(f"stopped by SIGTERM at step {state.global_step} after saving a "
                          "checkpoint; the next attempt resumes from it",
                          progress={"step": state.global_step, "totalSteps": state.max_steps})
        if self.callback.pruned:
            raise Pruned(f"pruned by the sweep at step {state.global_step} "
                         f"(evalLoss {self.callback.last_eval.get('evalLoss')})",
                         metrics=dict(self.callback.last_eval),
                         progress={"step": state.global_step, "totalSteps": state.max_steps})
        final = self.final_eval(trainer)
        metrics = self.metrics(trainer, result, final, plan, trainable, total)

        probe = self.probe(trainer, datasets[TASK])
        optimizer_doc = trainer.optimizer_summary()
        n_samples = spec.output.samples
        sample_list, sample_error = samples.generate(
            trainer, samples.prompts(raw_data[TASK][1], self.data_format(TASK), tokenizer,
                                     n_samples, eval_len) if n_samples else [],
            tokenizer, eval_len)
        out_dir = self.work / "artifact"
        if rank() == 0 and out_dir.exists():
            shutil.rmtree(out_dir)
        barrier()
        self.save_artifact(trainer, plan, out_dir)
        summary: dict[str, Any] | None = None
        if rank() == 0:
            if digest_thread is not None:
                digest_thread.join()
            progress = {"step": state.global_step, "totalSteps": state.max_steps}
            if self.resumed_from:
                progress["resumedFromStep"] = self.resumed_from
            doc = self.metadata(plan, metrics, progress, digest_box.get("sha256"), resume)
            doc["probe"] = probe
            doc["optimizer"] = optimizer_doc
            doc["earlyStopping"] = self.early_stopping_doc()
            doc["samples"] = sample_list
            if self.mix_doc is not None:
                doc["trainMix"] = self.mix_doc
            if sample_error:
                doc["samplesError"] = sample_error
            if spec.output.merged:  # rank 0 only, from the adapter just saved (see merge.py)
                doc["merged"] = merge.write_merged(model_dir, out_dir, trainer.processing_class,
                                                   plan.method, spec.training.precision)
            artifact.write_metadata(out_dir, doc)
            manifest = artifact.upload_with_retries(out_dir, cfg.artifact_uri)
            art = {"uri": cfg.artifact_uri, "sha256": manifest.digest}
            log.info("artifact uploaded to %s (manifest sha256 %s)", cfg.artifact_uri,
                     manifest.digest)
            if self.trackers:
                from orchestrator.trainer import tracking

                tracking.log_final(metrics, state.global_step, cfg.artifact_uri)
            if not os.environ.get("KUBETUNE_KEEP_CHECKPOINTS"):
                self._delete_checkpoints()
            summary = {"metrics": metrics, "artifact": art, "progress": progress,
                       "budget": _budget_part(plan)}
            if self.early is not None and self.early.stopped_at is not None:
                summary["message"] = (f"stopped early at step {self.early.stopped_at}: "
                                      f"evalLoss did not improve for {self.early.patience} "
                                      "evaluations")
        return broadcast(summary)  # type: ignore[no-any-return]

    def early_stopping_doc(self) -> dict[str, Any] | None:
        es = self.spec.training.early_stopping
        if es is None or self.early is None:
            return None
        best = self.early.best
        return {"patience": es.patience, "minDelta": es.min_delta,
                "stoppedEarly": self.early.stopped_at is not None,
                "step": self.early.stopped_at,
                "bestEvalLoss": round(best[0], 6) if best else None,
                "bestStep": best[1] if best else None}

    def prepare_resume(self, args: Any) -> Path | None:
        """Download this job's latest checkpoint when it belongs to the same spec and world
        size; returns the local checkpoint directory or None to start fresh."""
        latest = checkpoints.read_latest(self.cfg.checkpoint_uri)
        if latest is None:
            return None
        if latest.spec_fingerprint != self.fingerprint:
            log.warning("ignoring checkpoint %s in %s: it was made for a different spec",
                        latest.name, self.cfg.checkpoint_uri)
            barrier()
            if rank() == 0:
                self._delete_checkpoints()
            barrier()
            return None
        if latest.world_size != world_size():
            log.warning("ignoring checkpoint %s: it was made with %d processes, this run has %d "
                        "(ZeRO shards are per process)", latest.name, latest.world_size,
                        world_size())
            return None
        root = Path(args.output_dir)
        if local_rank() == 0:
            path = checkpoints.download(self.cfg.checkpoint_uri, latest, root)
        barrier()
        path = root / latest.name
        log.info("resuming from %s (step %d)", latest.name, latest.step)
        self.resumed_from = latest.step
        return path

    resumed_from: int | None = None
    fast = fastpaths.FastPaths()  # GPU fast paths, decided once the model config is read
    mix_doc: list[dict[str, Any]] | None = None  # data.trainMix: per set, what was drawn
    ds: dict[str, Any] | None = None
    early: Any = None  # the EarlyStoppingCallback when training.earlyStopping is set
    tensorboard: Any = None  # HF's TensorBoardCallback on rank 0 with output.tensorboard
    trackers: list[Any] = []  # tracking.Tracker: MLflow / W&B runs the env asks for

    @property
    def tensorboard_dir(self) -> Path:
        return self.work / "tensorboard"
    initial_adapter: dict[str, Any] | None = None  # PiSSA/OLoRA init, for the conversion
    evaluator: evaluation.Evaluator
    plan: budget.BudgetPlan

    def _delete_checkpoints(self) -> None:
        try:
            storage.delete_prefix(self.cfg.checkpoint_uri)
        except storage.StorageError as exc:
            log.warning("could not delete checkpoints under %s: %s", self.cfg.checkpoint_uri, exc)

    def make_trainer(self, model: Any, args: Any, tokenizer: Any,
                     datasets: dict[str, TokenDataset]) -> Any:
        from transformers import PrinterCallback

        from orchestrator.trainer.callbacks import (
            EarlyStoppingCallback,
            GracefulStopCallback,
            make_callbacks,
        )

        evals = {TASK: datasets[TASK]}
        if GENERAL in datasets:
            evals[GENERAL] = datasets[GENERAL]
        reporter = self.reporter or reporter_for(self.cfg.sweep, self.cfg.job_name,
                                                 self.cfg.namespace, self.cfg.attempt)
        cbs = make_callbacks(self, reporter)
        self.callback = cbs[0]
        self.graceful = next(c for c in cbs if isinstance(c, GracefulStopCallback))
        self.early = next((c for c in cbs if isinstance(c, EarlyStoppingCallback)), None)
        if self.spec.output.tensorboard and rank() == 0:
            from transformers.integrations import TensorBoardCallback

            self.tensorboard = TensorBoardCallback(
                tb_writer=summary_writer()(log_dir=str(self.tensorboard_dir)))
            # HF reopens a closed writer on a later log (the final eval): same directory
            self.tensorboard.logging_dir = str(self.tensorboard_dir)
            cbs.append(self.tensorboard)
        from orchestrator.trainer import tracking

        cbs.extend(tracking.callbacks(self, self.trackers))
        trainer = hf.trainer_class()(
            model=model, args=args, train_dataset=datasets["train"], eval_dataset=evals,
            data_collator=Collator(tokenizer.pad_token_id), processing_class=tokenizer,
            callbacks=cbs)
        trainer.evaluator = self.evaluator
        trainer.loraplus_lr_ratio = self.spec.method.lora_plus_lr_ratio
        if self.spec.method.type == "adapter":
            trainer.save_bottleneck = self.save_bottleneck
        trainer.remove_callback(PrinterCallback)  # raw dict prints; ProgressCallback logs
        return trainer

    def final_eval(self, trainer: Any) -> dict[str, float]:
        """Losses after training: reuse the evaluation made at the last step if there was
        one, else evaluate now."""
        step = trainer.state.global_step
        found: dict[str, float] = {}
        for entry in trainer.state.log_history:
            if entry.get("step") == step:
                for name in (TASK, GENERAL):
                    if f"eval_{name}_loss" in entry:
                        found[name] = float(entry[f"eval_{name}_loss"])
        if any(name not in found for name in trainer.eval_dataset):
            m = trainer.evaluate()  # every set at once (collective)
            found = {name: float(m[f"eval_{name}_loss"]) for name in trainer.eval_dataset}
        return found

    def metrics(self, trainer: Any, result: Any, final: dict[str, float],
                plan: budget.BudgetPlan, trainable: int, total: int) -> dict[str, Any]:
        hist = trainer.state.log_history
        first_task = next((e["eval_task_loss"] for e in hist if "eval_task_loss" in e), None)
        train_losses = [e["loss"] for e in hist if "loss" in e]
        m: dict[str, Any] = {
            "evalLoss": final[TASK],
            "trainLoss": train_losses[-1] if train_losses else result.training_loss,
            "trainableParams": trainable,
            "totalParams": total,
            "trainableParamPercent": round(100.0 * trainable / total, 6),
            "runtimeSeconds": round(time.time() - self.started, 2),
            "steps": trainer.state.global_step,
        }
        if first_task is not None:
            m["initialEvalLoss"] = first_task
        if plan.knob == "rank":
            m["rank"] = plan.size
        elif plan.size is not None:
            m[{"bottleneck": "bottleneck"}.get(plan.knob or "", "numVirtualTokens")] = plan.size
        if GENERAL in final:
            m["generalLossAfter"] = final[GENERAL]
            before = self.evaluator.baseline
            if before is not None:
                m["generalLossBefore"] = before
                m["generalLossDelta"] = final[GENERAL] - before
                if before > 0:
                    m["generalLossRelativeDelta"] = (final[GENERAL] - before) / before
        if self.early is not None:
            self.early.scan(hist)
            if self.early.best is not None:
                m["bestEvalLoss"], m["bestEvalStep"] = self.early.best
            if self.early.stopped_at is not None:
                m["stoppedEarlyAtStep"] = self.early.stopped_at
        if tokens := trainer.state.num_input_tokens_seen:
            m["tokensSeen"] = int(tokens)
        return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
                for k, v in m.items()}

    def probe(self, trainer: Any, ds: TokenDataset, n_tokens: int = 16,
              n_logits: int = 8) -> dict[str, Any]:
        """Logits of the trained model on a fixed input (the first eval sequence), recorded in
        kubetune.json so anyone can check that a reloaded artifact reproduces the model.

        Runs through Trainer.predict, i.e. the same (collective) evaluation path as the eval
        loss: a direct module call under ZeRO-3 desynchronises the ranks' parameter fetching."""
        ids = ds[0]["input_ids"][:n_tokens]
        one = TokenDataset([{"input_ids": ids, "labels": ids}], "probe")
        pred = trainer.predict(one, metric_key_prefix="probe")
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        last = logits[0, -1]
        return {"inputIds": ids, "lastTokenLogits": [round(float(v), 6) for v in last[:n_logits]],
                "argmax": int(last.argmax()), "precision": self.spec.training.precision}

    def save_artifact(self, trainer: Any, plan: budget.BudgetPlan, out_dir: Path) -> None:
        """PEFT adapters and full models through the Trainer (it gathers ZeRO-3 shards);
        bottleneck adapters in their own format. Collective: every rank must call it."""
        if plan.method == "adapter":
            trainer.save_model(str(out_dir))  # adapter tensors only (see hf.py)
            if rank() == 0:
                trainer.processing_class.save_pretrained(str(out_dir))
        else:
            from orchestrator.trainer.callbacks import set_prompt_inference_mode

            set_prompt_inference_mode(trainer.model, True)  # see SaveGuardCallback
            trainer.save_model(str(out_dir))
            set_prompt_inference_mode(trainer.model, False)
        barrier()
        if rank() == 0:
            (out_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle: never ship it
            cfg_file = out_dir / "adapter_config.json"
            if plan.method not in ("adapter", "full") and cfg_file.is_file():
                # Point PEFT at a name it can resolve, not this pod's cache directory (the URI
                # stays in kubetune.json).
                doc = json.loads(cfg_file.read_text())
                doc["base_model_name_or_path"] = base_model_name(self.spec.model.uri)
                cfg_file.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
            if self.tensorboard is not None:
                if self.tensorboard.tb_writer is not None:
                    self.tensorboard.tb_writer.close()
                    self.tensorboard.tb_writer = None
                if self.tensorboard_dir.is_dir():
                    shutil.copytree(self.tensorboard_dir, out_dir / "tensorboard")
            if self.initial_adapter is not None:
                # PiSSA/OLoRA: loadable on the original base (see methods.py)
                methods.convert_to_plain_lora(out_dir, self.initial_adapter)
            weights = bn.WEIGHTS_NAME if plan.method == "adapter" else "adapter_model.safetensors"
            if plan.method != "full" and not (out_dir / weights).is_file():
                raise RuntimeError(f"adapter weights missing in {out_dir} after saving")

    def save_bottleneck(self, out_dir: Path, state: dict[str, Any]) -> None:
        """Bottleneck adapters in their own format, for checkpoints and the artifact."""
        m = self.spec.method
        bn.save_adapter(out_dir, state, bottleneck_size=int(self.plan.size or 0),
                        placement=m.adapter_placement or "houlsby",
                        non_linearity=methods.ADAPTER_NON_LINEARITY, dropout=m.dropout,
                        target_modules=self.plan.modules,
                        base_model=base_model_name(self.spec.model.uri))

    def metadata(self, plan: budget.BudgetPlan, metrics: dict[str, Any],
                 progress: dict[str, Any], model_sha: str | None,
                 resume: Path | None) -> dict[str, Any]:
        cfg = self.cfg
        loader = {
            "adapter": {"library": "kubetune", "format": bn.FORMAT,
                        "load": "orchestrator.trainer.bottleneck.load_adapter(model, dir)"},
            "full": {"library": "transformers",
                     "load": "AutoModelForCausalLM.from_pretrained(dir)"},
        }.get(plan.method, {"library": "peft",
                            "load": "PeftModel.from_pretrained(base_model, dir)"})
        return {
            "status": "Succeeded",
            "jobName": cfg.job_name,
            "namespace": cfg.namespace,
            "attempt": cfg.attempt,
            "sweep": cfg.sweep.to_wire() if cfg.sweep is not None else None,
            "spec": self.spec.to_wire(),
            "specFingerprint": self.fingerprint,
            "baseModel": {"uri": self.spec.model.uri, "sha256": model_sha},
            "method": plan.method,
            "loading": loader,
            "budget": {**plan.summary(), "adaptedModuleNames": list(plan.modules)},
            "trainableParams": metrics["trainableParams"],
            "trainableParamPercent": metrics["trainableParamPercent"],
            "adaptedModules": list(plan.modules),
            "metrics": metrics,
            "progress": progress,
            "resumedFromStep": self.resumed_from,
            "generalBaseline": ({"loss": self.evaluator.baseline,
                                 "source": self.evaluator.baseline_source}
                                if self.evaluator.baseline is not None else None),
            "worldSize": world_size(),
            "deepspeed": self.ds is not None,
            "fastPaths": self.fast.summary(),
            "zeroStage": (self.ds or {}).get("zero_optimization", {}).get("stage"),
            "libraries": artifact.library_versions(),
            "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "artifact": {"uri": cfg.artifact_uri},
        }


def summary_writer() -> Any:
    """TensorBoard's SummaryWriter class: torch's (needs the tensorboard package) or
    tensorboardX's (the [trainer] extra), as HF's TensorBoardCallback picks it."""
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter
    except ImportError:
        pass
    try:
        import tensorboardX
    except ImportError:
        raise ConfigError("output.tensorboard needs the tensorboardX package in the trainer "
                          "image (pip install 'kubetune[trainer]'); set output.tensorboard "
                          "to false") from None
    return tensorboardX.SummaryWriter


def check_chat_template(template: str | None) -> None:
    """data.chatTemplate must compile (seconds before any download; rendering errors on
    particular records are reported per record by the data loader)."""
    if template is None:
        return
    import jinja2
    from transformers.utils import chat_template_utils

    try:  # transformers' own environment (sandbox, loop controls, {% generation %})
        chat_template_utils._compile_jinja_template(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"data.chatTemplate is not a valid Jinja template: {exc.message} "
                          f"(line {exc.lineno})") from None


def qlora_placement(ds: dict[str, Any] | None, local_rank: int) -> dict[str, Any]:
    """Where a 4-bit base is loaded: on this process's GPU (``device_map``), except under
    ZeRO-3, where transformers refuses a device_map (DeepSpeed places and partitions the
    weights; ``bnb_4bit_quant_storage`` equal to the dtype lets it shard the 4-bit ones)."""
    if ((ds or {}).get("zero_optimization") or {}).get("stage") == 3:
        return {}
    return {"device_map": {"": local_rank}}


def base_model_name(uri: str) -> str:
    """What adapter configs name as ``base_model_name_or_path``: the hub id for ``hf://``,
    else the model directory's name (``s3://models/llama-3.2-1b/`` -> ``llama-3.2-1b``).
    PEFT, AutoPeftModel and vLLM resolve a hub id or a local path, never an ``s3://`` URI."""
    if uri.startswith("hf://"):
        return uri[len("hf://"):].strip("/")
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _budget_part(plan: budget.BudgetPlan) -> dict[str, Any] | None:
    if plan.target_percent is None:
        return None
    return {"targetPercent": plan.target_percent, "withinTolerance": plan.within_tolerance,
            "note": plan.note[:300]}


__all__ = ["ExitCode", "Run", "base_model_name", "deepspeed_config", "plan_for",
           "qlora_placement"]
