"""FineTuneJob v1alpha1: spec and status models (the single source of truth for the CRD).

Every cross-field rule exists twice on purpose: as a pydantic validator (used by the
controller, the CLI and local runs) and as a CEL rule in `json_schema_extra` (so the API
server rejects the object at `kubectl apply`). The messages are the same and name the field
plus the fix.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from orchestrator.api.base import (
    DATA_SCHEMES,
    DNS1123_LABEL,
    DNS1123_SUBDOMAIN,
    MAX_LIST_ITEMS,
    MAX_NAME_LENGTH,
    MAX_SHORT_STRING,
    MAX_URI_LENGTH,
    MODEL_SCHEMES,
    OUTPUT_SCHEMES,
    ApiModel,
    Quantity,
    StatusModel,
    UriCheck,
    cel,
    cel_rules,
)
from orchestrator.api.pod import (
    EXTENDED_RESOURCE,
    MAX_EXTENDED_RESOURCES,
    PodOptions,
    check_extended_resources,
    check_name,
)
from orchestrator.api.reasons import Phase

#: Free-form objects copied into every pod or config: bounded, so a spec cannot bloat the
#: Job (etcd's object limit is 1.5 MiB) or the trainer's config.
MAX_AFFINITY_BYTES = 16 * 1024
MAX_DEEPSPEED_CONFIG_BYTES = 32 * 1024
AFFINITY_KEYS = frozenset({"nodeAffinity", "podAffinity", "podAntiAffinity"})


def _check_json_size(value: Any, limit: int, field: str) -> None:
    size = len(json.dumps(value, separators=(",", ":"), default=str))
    if size > limit:
        raise ValueError(f"{field} is {size} bytes as JSON; at most {limit} are allowed")

MethodType = Literal["lora", "dora", "qlora", "ia3", "adapter", "prefix", "prompt", "full"]
LORA_FAMILY: tuple[str, ...] = ("lora", "dora", "qlora")
VIRTUAL_TOKEN_METHODS: tuple[str, ...] = ("prefix", "prompt")
# Adapters that fold into the base weights (W + ΔW, or W x l for IA³): output.merged.
MERGEABLE_METHODS: tuple[str, ...] = ("lora", "dora", "ia3")
DataFormat = Literal["chat", "instruction", "text"]
LoraInit = Literal["default", "gaussian", "pissa", "olora", "loftq"]
# Initialisations that rewrite the base weights (PiSSA, OLoRA: W_res = W - scale x B0 A0) or
# decompose them (LoftQ); they need each whole weight, which ZeRO-3 partitions while loading.
WEIGHT_REWRITING_INITS: tuple[str, ...] = ("pissa", "olora", "loftq")
Precision = Literal["bf16", "fp16", "fp32"]
DEFAULT_LORA_RANK = 8
# rsLoRA scales by alpha / sqrt(rank); a default that grew with the rank (2 x rank) would make
# the update scale grow with whatever rank a sweep or the budget solver picks. A fixed alpha
# keeps it rank-stable (the point of rsLoRA); 8 gives 2.0, plain LoRA's default scale, at r=16.
DEFAULT_RSLORA_ALPHA = 8.0
DEFAULT_ADAPTER_BOTTLENECK = 64
MAX_TRAIN_MIX = 16  # training sets in data.trainMix
MAX_CHAT_TEMPLATE = 32768  # characters; real templates are a few KiB (Llama 3.1: ~4 KiB)
ALL_LINEAR = "all-linear"
# DeepSpeed keys derived from spec.training; overriding them would desynchronise DeepSpeed and
# the trainer's own batch arithmetic, so they are rejected in distributed.deepspeed.config.
RESERVED_DEEPSPEED_KEYS: tuple[str, ...] = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
)

GPU_RESOURCE = EXTENDED_RESOURCE
DEFAULT_RENDEZVOUS_TIMEOUT_SECONDS = 600
DEFAULT_COLLECTIVE_TIMEOUT_SECONDS = 600
_URI = Field(max_length=MAX_URI_LENGTH)
ModelUri = Annotated[str, _URI, UriCheck(MODEL_SCHEMES, "model.uri")]
TrainUri = Annotated[str, _URI, UriCheck(DATA_SCHEMES, "data.train")]
TrainMixUri = Annotated[str, _URI, UriCheck(DATA_SCHEMES, "data.trainMix[].uri")]
EvalUri = Annotated[str, _URI, UriCheck(DATA_SCHEMES, "data.eval")]
GeneralUri = Annotated[str, _URI, UriCheck(DATA_SCHEMES, "data.general")]
OutputUri = Annotated[str, _URI, UriCheck(OUTPUT_SCHEMES, "output.uri")]


def _cel_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


class ModelSource(ApiModel):
    """The base model to fine-tune."""

    uri: ModelUri = Field(
        description="Where the base model (Hugging Face layout: config.json, safetensors, "
        "tokenizer) lives: s3://<bucket>/<prefix>, pvc://<claim>/<path>, hf://<org>/<name> "
        "or file:///<path> (local runs)."
    )
    cache_claim: str | None = Field(
        default=None,
        max_length=MAX_NAME_LENGTH,
        description="An existing PersistentVolumeClaim in the job's namespace that caches "
        "downloaded models (s3:// downloads, and HF_HOME for hf://), so later attempts and "
        "jobs do not download the model again. Mounted read-write; use ReadWriteMany for "
        "jobs with more than one node. Unset: the controller's default, else the pod's "
        "scratch volume (one download per attempt).",
        json_schema_extra={"pattern": DNS1123_SUBDOMAIN},
    )

    @field_validator("cache_claim")
    @classmethod
    def _check_cache_claim(cls, value: str | None) -> str | None:
        return check_name(value, "model.cacheClaim", "PersistentVolumeClaim")


class ReplaySpec(ApiModel):
    """Rehearsal, the standard remedy for forgetting: general-domain sequences mixed into the
    training data so that they make up ``fraction`` of it."""

    uri: GeneralUri = Field(
        description="General-domain training data to replay (JSONL or Parquet); not the "
        "data.general eval set, or forgetting would be measured on data trained on."
    )
    fraction: float = Field(
        default=0.2,
        ge=0.0,
        le=0.9,
        description="Share of the training sequences drawn from the replay data (0 turns "
        "replay off; sweepable as data.replay.fraction).",
    )
    format: DataFormat | None = Field(
        default=None, description="Record layout of the replay data (default: data.generalFormat)."
    )


class TrainSet(ApiModel):
    """One training set of data.trainMix and its weight in the mix."""

    uri: TrainMixUri = Field(
        description="Training data (JSONL or Parquet, or a prefix holding them): s3://, "
        "pvc://, file:// or hf://<org>/<name>[@revision][:split] URI."
    )
    weight: float = Field(
        gt=0,
        le=1_000_000,
        description="Relative weight: this set makes up weight ÷ (sum of the weights) of the "
        "training examples (small sets repeat, large ones are subsampled).",
    )
    format: DataFormat | None = Field(
        default=None, description="Record layout of this set (default: data.format)."
    )


_TRAIN_XOR_MIX_MESSAGE = (
    "set exactly one of data.train (one training set) and data.trainMix (several sets with "
    "weights)"
)
_UNIQUE_MIX_MESSAGE = (
    "data.trainMix lists a uri twice: give each set once and add the weights together"
)


class DataSpec(ApiModel):
    """Training and evaluation data (JSONL or Parquet files, or prefixes holding them, or
    hf://<org>/<name>[@revision][:split] Hugging Face datasets)."""

    model_config = {
        "json_schema_extra": cel_rules(
            cel("has(self.train) != has(self.trainMix)", _TRAIN_XOR_MIX_MESSAGE, ".train"),
            cel(
                "!has(self.trainMix) || "
                "self.trainMix.all(a, self.trainMix.exists_one(b, b.uri == a.uri))",
                _UNIQUE_MIX_MESSAGE,
                ".trainMix",
            ),
        )
    }

    train: TrainUri | None = Field(
        default=None,
        description="Training data: s3://, pvc://, file:// or hf://<org>/<name>[@revision]"
        "[:split] (a Hugging Face dataset; default split train) URI, or data.trainMix instead.",
    )
    train_mix: list[TrainSet] | None = Field(
        default=None,
        min_length=2,
        max_length=MAX_TRAIN_MIX,
        description="Several training sets mixed in proportion to their weights, "
        "deterministically by training.seed (instead of data.train): one epoch holds as many "
        "examples as the sets together, each set weight ÷ (sum of the weights) of them.",
    )
    eval: EvalUri = Field(
        description="Evaluation data; its loss is status.metrics.evalLoss and the objective "
        "most sweeps optimise."
    )
    general: GeneralUri | None = Field(
        default=None,
        description="Optional general-domain eval set: the loss change on it "
        "(status.metrics.generalLossDelta) measures forgetting.",
    )
    format: DataFormat = Field(
        default="chat",
        description="Record layout: chat (a list of {role, content} messages), instruction "
        "(prompt/response fields) or text (one text field).",
    )
    general_format: DataFormat = Field(
        default="text",
        description="Record layout of data.general (chat, instruction or text), independent "
        "of format: a chat job can measure forgetting on a plain-text corpus.",
    )
    max_seq_length: int = Field(
        default=2048,
        ge=16,
        le=131072,
        description="Tokens per training sequence; longer ones are cut. Eval sets use "
        "evalMaxSeqLength instead, so eval losses stay comparable when this is swept.",
    )
    eval_max_seq_length: int | None = Field(
        default=None,
        ge=16,
        le=131072,
        description="Tokens per eval/general sequence (longer ones are cut); unset: 4096 "
        "capped at the model's context length. Independent of maxSeqLength.",
    )
    packing: bool = Field(
        default=False,
        description="Pack several short examples into one sequence of maxSeqLength tokens.",
    )
    text_field: str = Field(
        default="text", max_length=MAX_SHORT_STRING, description="Field read when format=text."
    )
    messages_field: str = Field(
        default="messages",
        max_length=MAX_SHORT_STRING,
        description="Field holding the message list when format=chat.",
    )
    prompt_field: str = Field(
        default="prompt",
        max_length=MAX_SHORT_STRING,
        description="Field holding the prompt when format=instruction.",
    )
    response_field: str = Field(
        default="response",
        max_length=MAX_SHORT_STRING,
        description="Field holding the response (the only tokens trained on) when "
        "format=instruction.",
    )
    chat_template: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_CHAT_TEMPLATE,
        description="A Jinja chat template (the tokenizer_config.json chat_template syntax: "
        "messages, add_generation_prompt) that replaces the tokenizer's own for chat data "
        "(format, generalFormat or replay.format chat) and is saved with the artifact's "
        "tokenizer. Unset: the tokenizer's template.",
    )
    replay: ReplaySpec | None = Field(
        default=None,
        description="Optional rehearsal: mix general-domain data into training to reduce "
        "forgetting (see status.metrics.generalLossDelta).",
    )

    @model_validator(mode="after")
    def _check_train(self) -> DataSpec:
        if (self.train is None) == (self.train_mix is None):
            raise ValueError(_TRAIN_XOR_MIX_MESSAGE)
        uris = [t.uri for t in self.train_mix or []]
        if len(set(uris)) != len(uris):
            raise ValueError(_UNIQUE_MIX_MESSAGE)
        return self

    @property
    def train_uris(self) -> list[str]:
        """Every training set's URI (data.train or the data.trainMix entries)."""
        return [self.train] if self.train is not None else [t.uri for t in self.train_mix or []]


_INIT_FAMILY_MESSAGE = "method.init applies only to lora, dora and qlora: remove it"
_LOFTQ_MESSAGE = (
    "method.init loftq applies only to method.type qlora: LoftQ initialises LoRA to offset the "
    "4-bit quantisation error of the base (bitsandbytes on CUDA); use pissa, olora or gaussian "
    "for lora and dora"
)
_CONVERTED_INIT_DORA_MESSAGE = (
    "method.init pissa and olora cannot be used with method.type dora: the trained adapter is "
    "converted to a plain LoRA adapter for the original base model, which has no place for "
    "DoRA's magnitude vector; use init gaussian or default, or method.type lora"
)
_LORA_PLUS_FAMILY_MESSAGE = "method.loraPlusLrRatio applies only to lora, dora and qlora: remove it"


class MethodSpec(ApiModel):
    """The parameter-efficient fine-tuning method and its size."""

    model_config = {
        "json_schema_extra": cel_rules(
            cel(
                f"!has(self.rank) || self.type in {_cel_list(LORA_FAMILY)}",
                "method.rank applies only to lora, dora and qlora: remove it (adapter uses "
                "method.bottleneck, prefix/prompt use method.numVirtualTokens)",
                ".rank",
            ),
            cel(
                f"!has(self.alpha) || self.type in {_cel_list(LORA_FAMILY)}",
                "method.alpha applies only to lora, dora and qlora: remove it",
                ".alpha",
            ),
            cel(
                f"!self.useRslora || self.type in {_cel_list(LORA_FAMILY)}",
                "method.useRslora applies only to lora, dora and qlora: remove it",
                ".useRslora",
            ),
            cel(
                f"!(self.type in {_cel_list(VIRTUAL_TOKEN_METHODS)}) || has(self.numVirtualTokens)",
                "method.numVirtualTokens is required for prefix and prompt tuning: set it, "
                "for example numVirtualTokens: 20",
                ".numVirtualTokens",
            ),
            cel(
                f"!has(self.numVirtualTokens) || self.type in {_cel_list(VIRTUAL_TOKEN_METHODS)}",
                "method.numVirtualTokens applies only to prefix and prompt tuning: remove it",
                ".numVirtualTokens",
            ),
            cel(
                "!has(self.bottleneck) || self.type == 'adapter'",
                "method.bottleneck applies only to method.type adapter: remove it",
                ".bottleneck",
            ),
            cel(
                "!has(self.adapterPlacement) || self.type == 'adapter'",
                "method.adapterPlacement applies only to method.type adapter: remove it",
                ".adapterPlacement",
            ),
            cel(
                f"!has(self.init) || self.type in {_cel_list(LORA_FAMILY)}",
                _INIT_FAMILY_MESSAGE,
                ".init",
            ),
            cel(
                "!has(self.init) || self.init != 'loftq' || self.type == 'qlora'",
                _LOFTQ_MESSAGE,
                ".init",
            ),
            cel(
                "!has(self.init) || !(self.init in ['pissa', 'olora']) || self.type != 'dora'",
                _CONVERTED_INIT_DORA_MESSAGE,
                ".init",
            ),
            cel(
                f"!has(self.loraPlusLrRatio) || self.type in {_cel_list(LORA_FAMILY)}",
                _LORA_PLUS_FAMILY_MESSAGE,
                ".loraPlusLrRatio",
            ),
            cel(
                "!has(self.trainableParamPercent) || self.type != 'full'",
                "method.trainableParamPercent cannot be used with method.type full (it trains "
                "100% of the parameters): remove it or choose a PEFT method",
                ".trainableParamPercent",
            ),
        )
    }

    type: MethodType = Field(
        default="lora",
        description="lora | dora | qlora (4-bit base, needs GPUs) | ia3 | adapter "
        "(bottleneck adapters) | prefix | prompt | full (all weights, no PEFT).",
    )
    rank: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="LoRA rank (lora/dora/qlora). Unset: chosen by trainableParamPercent when "
        f"that is set, else {DEFAULT_LORA_RANK}.",
    )
    alpha: float | None = Field(
        default=None,
        gt=0,
        le=4096,
        description="LoRA scaling alpha; unset means 2 x rank, or 8 with useRslora (a fixed "
        "alpha keeps the rsLoRA scale alpha/sqrt(rank) stable across ranks).",
    )
    dropout: float = Field(
        default=0.05,
        ge=0,
        lt=1,
        description="Dropout on the adapter's input (lora/dora/qlora, adapter).",
    )
    target_modules: str | list[str] = Field(
        default=ALL_LINEAR,
        description="Modules to adapt: the string all-linear (every linear layer except the "
        "output head) or a list of module names such as [q_proj, v_proj].",
    )
    trainable_param_percent: float | None = Field(
        default=None,
        gt=0,
        le=100,
        description="Parameter budget in percent, as PEFT's print_trainable_parameters "
        "reports it (trainable ÷ all parameters x 100). With rank set it picks the adapted "
        "modules/layers; without rank it picks the rank. Reached within ±10% or the closest "
        "achievable value, reported in status.metrics.",
    )
    num_virtual_tokens: int | None = Field(
        default=None,
        ge=1,
        le=2048,
        description="Virtual tokens for prefix and prompt tuning (required for those).",
    )
    use_rslora: bool = Field(
        default=False, description="Rank-stabilised LoRA scaling (alpha / sqrt(rank))."
    )
    init: LoraInit | None = Field(
        default=None,
        description="LoRA initialisation (lora, dora, qlora): default (A random, B zero: starts "
        "as the base model), gaussian (A Gaussian scaled by rank, B zero), pissa (A, B from the "
        "principal singular vectors of each weight; the base keeps the residual, so training "
        "still starts from the base model's outputs), olora (A, B from a QR decomposition, base "
        "keeps the residual) or loftq (qlora only: LoRA offsets the 4-bit quantisation error). "
        "pissa/olora adapters are stored converted to plain LoRA of twice the rank, loadable on "
        "the original base. Unset means default.",
    )
    lora_plus_lr_ratio: float | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="LoRA+ (lora, dora, qlora): the B matrices (and DoRA magnitudes) train "
        "with learningRate x this ratio, A with learningRate (PEFT create_loraplus_optimizer; "
        "the paper suggests 16). Not with distributed.deepspeed.offload cpu. Unset: one "
        "learning rate.",
    )
    adapter_placement: Literal["houlsby", "pfeiffer"] | None = Field(
        default=None,
        description="Bottleneck adapter placement for method.type adapter: houlsby (after "
        "attention and MLP) or pfeiffer (after the MLP only). Unset means houlsby.",
    )
    bottleneck: int | None = Field(
        default=None,
        ge=1,
        le=65536,
        description="Bottleneck width for method.type adapter. Unset: chosen by "
        f"trainableParamPercent when set, else {DEFAULT_ADAPTER_BOTTLENECK}.",
    )

    @field_validator("target_modules")
    @classmethod
    def _check_targets(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str):
            if value != ALL_LINEAR:
                raise ValueError(
                    f"method.targetModules must be the string {ALL_LINEAR!r} or a list of "
                    f"module names such as [q_proj, v_proj], not {value!r}"
                )
            return value
        if not value:
            raise ValueError("method.targetModules must not be an empty list")
        if len(value) > MAX_LIST_ITEMS:
            raise ValueError(f"method.targetModules lists at most {MAX_LIST_ITEMS} modules")
        if any(not m or len(m) > MAX_SHORT_STRING for m in value):
            raise ValueError("method.targetModules entries must be non-empty module names")
        if len(set(value)) != len(value):
            raise ValueError("method.targetModules lists a module twice: remove the duplicate")
        return value

    @model_validator(mode="after")
    def _check_method(self) -> MethodSpec:
        t = self.type
        if self.rank is not None and t not in LORA_FAMILY:
            raise ValueError(
                "method.rank applies only to lora, dora and qlora: remove it (adapter uses "
                "method.bottleneck, prefix/prompt use method.numVirtualTokens)"
            )
        if self.alpha is not None and t not in LORA_FAMILY:
            raise ValueError("method.alpha applies only to lora, dora and qlora: remove it")
        if self.use_rslora and t not in LORA_FAMILY:
            raise ValueError("method.useRslora applies only to lora, dora and qlora: remove it")
        if t in VIRTUAL_TOKEN_METHODS and self.num_virtual_tokens is None:
            raise ValueError(
                "method.numVirtualTokens is required for prefix and prompt tuning: set it, "
                "for example numVirtualTokens: 20"
            )
        if self.num_virtual_tokens is not None and t not in VIRTUAL_TOKEN_METHODS:
            raise ValueError(
                "method.numVirtualTokens applies only to prefix and prompt tuning: remove it"
            )
        if self.bottleneck is not None and t != "adapter":
            raise ValueError("method.bottleneck applies only to method.type adapter: remove it")
        if self.adapter_placement is not None and t != "adapter":
            raise ValueError(
                "method.adapterPlacement applies only to method.type adapter: remove it"
            )
        if self.trainable_param_percent is not None and t == "full":
            raise ValueError(
                "method.trainableParamPercent cannot be used with method.type full (it trains "
                "100% of the parameters): remove it or choose a PEFT method"
            )
        if self.init is not None and t not in LORA_FAMILY:
            raise ValueError(_INIT_FAMILY_MESSAGE)
        if self.init == "loftq" and t != "qlora":
            raise ValueError(_LOFTQ_MESSAGE)
        if self.init in ("pissa", "olora") and t == "dora":
            raise ValueError(_CONVERTED_INIT_DORA_MESSAGE)
        if self.lora_plus_lr_ratio is not None and t not in LORA_FAMILY:
            raise ValueError(_LORA_PLUS_FAMILY_MESSAGE)
        return self

    @property
    def effective_rank(self) -> int | None:
        """The rank to use when the budget does not decide it (None for non-LoRA methods)."""
        if self.type not in LORA_FAMILY:
            return None
        if self.rank is not None:
            return self.rank
        return None if self.trainable_param_percent is not None else DEFAULT_LORA_RANK

    @property
    def effective_alpha(self) -> float | None:
        """``alpha`` when set; else 2 x rank, or a fixed 8 with rsLoRA (see
        DEFAULT_RSLORA_ALPHA). None while the budget has not decided the rank."""
        if self.alpha is not None:
            return self.alpha
        if self.use_rslora and self.type in LORA_FAMILY:
            return DEFAULT_RSLORA_ALPHA
        rank = self.effective_rank
        return None if rank is None else 2.0 * rank

    @property
    def effective_adapter_placement(self) -> str | None:
        if self.type != "adapter":
            return None
        return self.adapter_placement or "houlsby"


class EvalEarlyStopping(ApiModel):
    """Stop training when the eval loss stops improving."""

    patience: int = Field(
        default=3,
        ge=1,
        le=1000,
        description="Evaluations (every training.evalEvery steps) in a row without an "
        "improvement of more than minDelta over the best eval loss so far before training "
        "stops.",
    )
    min_delta: float = Field(
        default=0.0,
        ge=0,
        le=100,
        description="How much lower than the best eval loss so far a new one must be to count "
        "as an improvement.",
    )


class TrainingSpec(ApiModel):
    """Optimisation hyperparameters."""

    epochs: int = Field(default=1, ge=1, le=1000, description="Passes over the training data.")
    max_steps: int | None = Field(
        default=None, ge=1, description="Optimizer steps; when set it overrides epochs."
    )
    learning_rate: float = Field(
        default=2.0e-4, gt=0, le=1, description="Peak learning rate (after warmup)."
    )
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="Learning-rate schedule after warmup."
    )
    global_batch_size: int = Field(
        default=16,
        ge=1,
        le=65536,
        description="Sequences per optimizer step across all GPUs; must be divisible by "
        "microBatchSize x nodes x gpusPerNode (gradient accumulation makes up the rest).",
    )
    micro_batch_size: int = Field(
        default=1, ge=1, le=4096, description="Sequences per GPU per forward/backward pass."
    )
    precision: Precision = Field(
        default="bf16", description="bf16 | fp16 (with loss scaling) | fp32."
    )
    eval_every: int = Field(
        default=100,
        ge=1,
        description="Evaluate every N optimizer steps; each evaluation is also an "
        "intermediate value for sweep pruning.",
    )
    checkpoint_every: int = Field(
        default=500,
        ge=1,
        description="Checkpoint every N optimizer steps; a restarted attempt resumes from the "
        "latest checkpoint.",
    )
    seed: int = Field(default=42, ge=0, le=2**31 - 1, description="Random seed.")
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in backward to save GPU memory."
    )
    warmup_ratio: float = Field(
        default=0.03, ge=0, le=1, description="Fraction of steps for linear warmup."
    )
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="AdamW weight decay.")
    max_grad_norm: float = Field(
        default=1.0, ge=0, description="Gradient clipping norm (0 disables clipping)."
    )
    early_stopping: EvalEarlyStopping | None = Field(
        default=None,
        description="Stop early when data.eval's loss has not improved by more than minDelta "
        "for patience evaluations; the adapter is the model at the stop (the best eval loss "
        "and its step are reported next to it). Unset: train to maxSteps/epochs.",
    )


class DeepSpeedSpec(ApiModel):
    """DeepSpeed ZeRO settings; kubetune generates the DeepSpeed config from the spec."""

    model_config = {
        "json_schema_extra": cel_rules(
            cel(
                "self.offload == 'none' || self.zeroStage >= 1",
                "distributed.deepspeed.offload cpu needs zeroStage 1, 2 or 3: raise zeroStage "
                "or set offload: none",
                ".offload",
            )
        )
    }

    zero_stage: int = Field(
        default=2,
        ge=0,
        le=3,
        description="ZeRO stage: 0 (plain data parallel), 1 (optimizer states sharded), 2 "
        "(+ gradients), 3 (+ parameters).",
    )
    offload: Literal["none", "cpu"] = Field(
        default="none",
        description="Offload optimizer states (and, with ZeRO-3, parameters) to CPU memory.",
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="DeepSpeed config keys deep-merged over the generated config (user keys "
        "win); batch sizes come from spec.training and cannot be set here. At most "
        f"{MAX_DEEPSPEED_CONFIG_BYTES // 1024} KiB as JSON.",
        json_schema_extra={"maxProperties": 64},
    )

    @model_validator(mode="after")
    def _check(self) -> DeepSpeedSpec:
        if self.offload != "none" and self.zero_stage < 1:
            raise ValueError(
                "distributed.deepspeed.offload cpu needs zeroStage 1, 2 or 3: raise zeroStage "
                "or set offload: none"
            )
        _check_json_size(self.config, MAX_DEEPSPEED_CONFIG_BYTES, "distributed.deepspeed.config")
        reserved = [k for k in RESERVED_DEEPSPEED_KEYS if k in self.config]
        if reserved:
            raise ValueError(
                f"distributed.deepspeed.config.{reserved[0]} is derived from spec.training "
                "(globalBatchSize, microBatchSize): set those instead"
            )
        return self


class DistributedSpec(ApiModel):
    """How many nodes (pods) and GPUs per node the job uses."""

    nodes: int = Field(
        default=1, ge=1, le=256, description="Pods (one per node) in the training gang."
    )
    gpus_per_node: int = Field(
        default=1,
        ge=0,
        le=16,
        description="GPUs per pod, one training process each; 0 runs one CPU process per pod.",
    )
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec, description="DeepSpeed ZeRO.")
    rendezvous_timeout_seconds: int = Field(
        default=DEFAULT_RENDEZVOUS_TIMEOUT_SECONDS,
        ge=30,
        le=86400,
        description="How long each pod's torchrun waits for all nodes to join the rendezvous "
        "on pod 0 (torchrun --rdzv-conf timeout) before the attempt fails; covers image pulls "
        "and scheduling of the slowest pod.",
    )
    collective_timeout_seconds: int = Field(
        default=DEFAULT_COLLECTIVE_TIMEOUT_SECONDS,
        ge=60,
        le=86400,
        description="Timeout of every NCCL/gloo collective (the process group's timeout, "
        "TrainingArguments.ddp_timeout): a dead or hung peer fails the attempt after this "
        "long instead of torch's 30 minutes. Must exceed the longest step, evaluation or "
        "checkpoint save, during which the other ranks wait.",
    )

    @property
    def processes_per_node(self) -> int:
        return max(self.gpus_per_node, 1)

    @property
    def world_size(self) -> int:
        """Data-parallel processes: nodes x max(gpusPerNode, 1)."""
        return self.nodes * self.processes_per_node


class Toleration(ApiModel):
    """A Kubernetes toleration (same fields as core/v1 Toleration)."""

    model_config = {
        "json_schema_extra": cel_rules(
            cel(
                "self.operator != 'Exists' || !has(self.value) || self.value == ''",
                "a toleration with operator Exists must not set value: remove value",
                ".value",
            )
        )
    }

    key: str | None = Field(default=None, max_length=MAX_SHORT_STRING, description="Taint key.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists | Equal.")
    value: str | None = Field(default=None, max_length=MAX_SHORT_STRING, description="Taint value.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; unset tolerates all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, description="How long a NoExecute taint is tolerated."
    )

    @model_validator(mode="after")
    def _check(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError("a toleration with operator Exists must not set value: remove value")
        return self


class ResourcesSpec(ApiModel):
    """Per-pod resources and placement."""

    gpu: str = Field(
        default="nvidia.com/gpu",
        max_length=MAX_SHORT_STRING,
        description="Extended resource name of the GPU, requested gpusPerNode times per pod.",
        json_schema_extra={"pattern": GPU_RESOURCE},
    )
    cpu: Quantity | None = Field(
        default=None, description='CPU request per pod, e.g. "16" (no limit: no throttling).'
    )
    memory: Quantity | None = Field(
        default=None, description="Memory request and limit per pod, e.g. 200Gi."
    )
    shm_size: Quantity | None = Field(
        default=None,
        description="Size limit of the memory-backed /dev/shm (NCCL and data loaders need it); "
        "unset: no limit beyond the pod's memory.",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the pods must match."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=MAX_LIST_ITEMS, description="Taints the pods tolerate."
    )
    affinity: dict[str, Any] | None = Field(
        default=None,
        description="A core/v1 Affinity object (nodeAffinity, podAffinity, podAntiAffinity), "
        f"copied to the pods as is; at most {MAX_AFFINITY_BYTES // 1024} KiB as JSON.",
        json_schema_extra={"maxProperties": 3},
    )

    @field_validator("affinity")
    @classmethod
    def _check_affinity(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return value
        unknown = sorted(set(value) - AFFINITY_KEYS)
        if unknown:
            raise ValueError(
                f"resources.affinity.{unknown[0]} is not a field of a core/v1 Affinity (use "
                "nodeAffinity, podAffinity or podAntiAffinity)"
            )
        _check_json_size(value, MAX_AFFINITY_BYTES, "resources.affinity")
        return value
    ephemeral_storage: Quantity | None = Field(
        default=None,
        description="ephemeral-storage request per pod, e.g. 200Gi (the workspace holds the "
        "downloaded model, data and local checkpoints); unset: the controller's default.",
    )
    workspace_size: Quantity | None = Field(
        default=None,
        description="sizeLimit of the /workspace emptyDir (the kubelet evicts a pod that "
        "writes more); unset: the controller's default, else no limit.",
    )
    extended_resources: dict[str, Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=dict,
        max_length=MAX_EXTENDED_RESOURCES,
        description="Extra extended resources per pod (requests = limits), e.g. "
        "{vpc.amazonaws.com/efa: 4} for EFA or {rdma/ib: 1}; merged over the controller's "
        "defaults. Not the GPU (distributed.gpusPerNode) nor kubernetes.io names.",
    )

    @field_validator("gpu")
    @classmethod
    def _check_gpu(cls, value: str) -> str:
        if not re.match(GPU_RESOURCE, value):
            raise ValueError(
                f"resources.gpu must be an extended resource name such as nvidia.com/gpu or "
                f"amd.com/gpu, not {value!r}"
            )
        return value

    @field_validator("extended_resources")
    @classmethod
    def _check_extended(cls, value: dict[str, int], info: ValidationInfo) -> dict[str, int]:
        return check_extended_resources(value, info.data.get("gpu"))


class OutputSpec(ApiModel):
    """Where the trained adapter goes."""

    uri: OutputUri = Field(
        description="Output prefix (s3://, pvc:// or file://); the job writes its adapter and "
        "metadata under <uri>/<job name>/."
    )
    samples: int = Field(
        default=2,
        ge=0,
        le=16,
        description="Eval prompts (the first ones of data.eval) the trained model completes "
        "greedily at the end (at most 64 new tokens each); stored in kubetune.json and shown "
        "by kubetune status. 0 turns samples off.",
    )
    tensorboard: bool = Field(
        default=False,
        description="Also write TensorBoard event files (train loss, learning rate, grad norm, "
        "eval and general losses per step) into the artifact under tensorboard/.",
    )
    merged: bool = Field(
        default=False,
        description="Also store the base model with the trained adapter merged into its "
        "weights under merged/ in the artifact (sharded safetensors, config and tokenizer): "
        "loadable with AutoModelForCausalLM.from_pretrained and servable without PEFT. Only "
        "for method.type lora, dora and ia3.",
    )

    def artifact_uri(self, job_name: str) -> str:
        """The job's artifact prefix: `<output.uri>/<job name>/` (the sweep's trials share one
        output prefix and stay apart by name)."""
        return f"{self.uri.rstrip('/')}/{job_name}/"

    def checkpoint_uri(self, job_name: str) -> str:
        """Where checkpoints go, so that the next attempt can resume."""
        return f"{self.uri.rstrip('/')}/{job_name}/checkpoints/"


class StorageSpec(ApiModel):
    """S3-compatible object store; unset fields take the controller's defaults."""

    endpoint: str | None = Field(
        default=None,
        max_length=MAX_SHORT_STRING,
        description="S3 endpoint URL, e.g. http://s3.storage:8333 (unset: AWS or the "
        "controller default).",
        json_schema_extra=cel_rules(
            cel(
                "self.startsWith('http://') || self.startsWith('https://')",
                "storage.endpoint must be an http:// or https:// URL",
            )
        ),
    )
    credentials_secret: str | None = Field(
        default=None,
        max_length=MAX_NAME_LENGTH,
        description="Secret in the job's namespace with keys AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY; referenced by the pods, never copied.",
        json_schema_extra={"pattern": DNS1123_SUBDOMAIN},
    )
    region: str | None = Field(
        default=None, max_length=64, description="S3 region, e.g. us-east-1."
    )

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"storage.endpoint must be an http:// or https:// URL, not {value!r}")
        return value

    @field_validator("credentials_secret")
    @classmethod
    def _check_secret(cls, value: str | None) -> str | None:
        if value is not None and not re.match(DNS1123_SUBDOMAIN, value):
            raise ValueError(
                f"storage.credentialsSecret must be a Secret name (lowercase, digits, '-', "
                f"'.'), not {value!r}"
            )
        return value


# The guard keeps a zero (already reported by its own range check) from also producing a
# "modulus by zero" error.
_BATCH_RULE = (
    "self.training.microBatchSize < 1 || self.distributed.nodes < 1 || "
    "self.training.globalBatchSize % (self.training.microBatchSize * self.distributed.nodes * "
    "(self.distributed.gpusPerNode > 0 ? self.distributed.gpusPerNode : 1)) == 0"
)
_BATCH_MESSAGE = (
    "training.globalBatchSize must be divisible by training.microBatchSize x "
    "distributed.nodes x distributed.gpusPerNode (the data-parallel world size): change "
    "globalBatchSize or microBatchSize"
)
_QLORA_MESSAGE = (
    "method.type qlora needs GPUs (4-bit quantization runs on CUDA): set "
    "distributed.gpusPerNode to 1 or more, or use method.type lora"
)
_INIT_ZERO3_MESSAGE = (
    "method.init pissa, olora and loftq cannot be used with distributed.deepspeed.zeroStage 3: "
    "they decompose each whole base weight, which ZeRO-3 partitions across processes while "
    "the model loads; use zeroStage 2 or init gaussian/default"
)
_LORA_PLUS_OFFLOAD_MESSAGE = (
    "method.loraPlusLrRatio cannot be used with distributed.deepspeed.offload cpu: offloading "
    "makes DeepSpeed build its own CPU optimizer with one learning rate, so LoRA+'s larger "
    "learning rate for B would be lost; set offload: none or remove loraPlusLrRatio"
)
_LORA_PLUS_OPTIMIZER_MESSAGE = (
    "method.loraPlusLrRatio cannot be used with an optimizer in distributed.deepspeed.config: "
    "DeepSpeed would build that optimizer with one learning rate, so LoRA+'s larger learning "
    "rate for B would be lost; remove the optimizer key or loraPlusLrRatio"
)
_PREFIX_CHECKPOINTING_MESSAGE = (
    "method.type prefix cannot be combined with training.gradientCheckpointing: the prefix "
    "key/value cache breaks when activations are recomputed (PEFT issue 2191); set "
    "gradientCheckpointing to false or use method.type prompt or lora"
)
_MERGED_MESSAGE = (
    "output.merged needs method.type lora, dora or ia3: virtual tokens (prefix, prompt) and "
    "bottleneck layers (adapter) cannot fold into base weights, a qlora adapter fits the 4-bit "
    "base (merge it offline, see docs/trainer.md), full stores the whole model; set "
    "output.merged to false"
)


class FineTuneJobSpec(ApiModel):
    """A fine-tuning job: a base model, data, a PEFT method and where the adapter goes."""

    model_config = {
        "json_schema_extra": cel_rules(
            cel(_BATCH_RULE, _BATCH_MESSAGE, ".training.globalBatchSize"),
            cel(
                "self.method.type != 'qlora' || self.distributed.gpusPerNode >= 1",
                _QLORA_MESSAGE,
                ".distributed.gpusPerNode",
            ),
            cel(
                "self.method.type != 'prefix' || !self.training.gradientCheckpointing",
                _PREFIX_CHECKPOINTING_MESSAGE,
                ".training.gradientCheckpointing",
            ),
            cel(
                "!has(self.method.init) || "
                f"!(self.method.init in {_cel_list(WEIGHT_REWRITING_INITS)}) || "
                "self.distributed.deepspeed.zeroStage != 3",
                _INIT_ZERO3_MESSAGE,
                ".method.init",
            ),
            cel(
                "!has(self.method.loraPlusLrRatio) || self.distributed.deepspeed.offload == 'none'",
                _LORA_PLUS_OFFLOAD_MESSAGE,
                ".method.loraPlusLrRatio",
            ),
            cel(
                f"!self.output.merged || self.method.type in {_cel_list(MERGEABLE_METHODS)}",
                _MERGED_MESSAGE,
                ".output.merged",
            ),
        )
    }

    model: ModelSource = Field(description="The base model.")
    data: DataSpec = Field(description="Training, evaluation and (optional) general data.")
    method: MethodSpec = Field(default_factory=MethodSpec, description="The PEFT method.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Hyperparameters.")
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec, description="Nodes, GPUs per node and DeepSpeed ZeRO."
    )
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, description="Per-pod resources and placement."
    )
    output: OutputSpec = Field(description="Where the adapter and its metadata are written.")
    storage: StorageSpec = Field(
        default_factory=StorageSpec, description="Object store endpoint and credentials."
    )
    backoff_limit: int = Field(
        default=3,
        ge=0,
        le=20,
        description="Gang restarts after a failed pod before the job is Failed (node "
        "disruptions do not count).",
    )
    suspend: bool = Field(
        default=False, description="Suspend the job: no pods run (running pods are stopped)."
    )
    queue_name: str | None = Field(
        default=None,
        description="Kueue LocalQueue: the Job is created suspended with the queue label and "
        "Kueue admits it.",
        json_schema_extra={"pattern": DNS1123_LABEL, "maxLength": 63},
    )
    image: str | None = Field(
        default=None,
        min_length=1,
        max_length=512,
        description="Trainer image; unset: the controller's default.",
    )
    pod: PodOptions = Field(
        default_factory=PodOptions,
        description="Trainer pod service account, priority class, image pull secrets, extra "
        "env, labels and annotations.",
    )

    @field_validator("queue_name")
    @classmethod
    def _check_queue(cls, value: str | None) -> str | None:
        if value is not None and (len(value) > 63 or not re.match(DNS1123_LABEL, value)):
            raise ValueError(
                f"queueName must be a LocalQueue name (lowercase letters, digits, '-'), not "
                f"{value!r}"
            )
        return value

    @model_validator(mode="after")
    def _check_cross_fields(self) -> FineTuneJobSpec:
        per_step = self.training.micro_batch_size * self.distributed.world_size
        if self.training.global_batch_size % per_step:
            raise ValueError(
                f"{_BATCH_MESSAGE} (globalBatchSize {self.training.global_batch_size} is not a "
                f"multiple of {self.training.micro_batch_size} x {self.distributed.nodes} x "
                f"{self.distributed.processes_per_node} = {per_step})"
            )
        if self.method.type == "qlora" and self.distributed.gpus_per_node < 1:
            raise ValueError(_QLORA_MESSAGE)
        if self.method.type == "prefix" and self.training.gradient_checkpointing:
            raise ValueError(_PREFIX_CHECKPOINTING_MESSAGE)
        ds = self.distributed.deepspeed
        if self.method.init in WEIGHT_REWRITING_INITS and ds.zero_stage == 3:
            raise ValueError(_INIT_ZERO3_MESSAGE)
        if self.method.lora_plus_lr_ratio is not None:
            if ds.offload != "none":
                raise ValueError(_LORA_PLUS_OFFLOAD_MESSAGE)
            if "optimizer" in ds.config:
                raise ValueError(_LORA_PLUS_OPTIMIZER_MESSAGE)
        if self.output.merged and self.method.type not in MERGEABLE_METHODS:
            raise ValueError(_MERGED_MESSAGE)
        return self

    @property
    def gradient_accumulation_steps(self) -> int:
        per_step = self.training.micro_batch_size * self.distributed.world_size
        return self.training.global_batch_size // per_step


# --- status ----------------------------------------------------------------------------------


class Condition(StatusModel):
    """A Kubernetes-style condition."""

    type: str = Field(max_length=64, description="Condition type, e.g. Succeeded.")
    status: Literal["True", "False", "Unknown"] = Field(description="True | False | Unknown.")
    reason: str | None = Field(default=None, max_length=128, description="CamelCase reason.")
    message: str | None = Field(default=None, max_length=32768, description="Human-readable.")
    last_transition_time: str | None = Field(
        default=None,
        description="When the status last changed (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )
    observed_generation: int | None = Field(
        default=None, description="metadata.generation the condition was computed from."
    )


class Progress(StatusModel):
    """Training progress: live while the job runs (reported by the trainer, written at most
    every 30 s), final once it finished."""

    step: int = Field(default=0, ge=0, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, ge=0, description="Optimizer steps planned.")
    epoch: float | None = Field(default=None, ge=0, description="Fractional epoch.")
    train_loss: float | None = Field(default=None, description="Latest training loss.")
    eval_loss: float | None = Field(default=None, description="Latest loss on data.eval.")
    tokens_per_second: float | None = Field(
        default=None, ge=0, description="Training throughput: non-padding tokens per second, "
        "all ranks together."
    )
    mfu: float | None = Field(
        default=None,
        ge=0,
        description="Model FLOPs utilisation: model FLOPs per second over the dense bf16/fp16 "
        "peak of all the job's GPUs (unset where the GPU's peak is not known, and on CPU). "
        "docs/controller.md says how it is counted.",
    )
    eta_seconds: float | None = Field(
        default=None, ge=0, description="Estimated seconds until training ends."
    )
    resumed_from_step: int | None = Field(
        default=None,
        ge=0,
        description="The checkpoint step the latest attempt resumed from (unset: from the "
        "start).",
    )
    summary: str | None = Field(
        default=None,
        max_length=64,
        description="step/totalSteps (e.g. 120/500): the Progress column of kubectl get.",
    )


class Metrics(StatusModel):
    """Final (or latest) metrics reported by the trainer; other numeric metrics are kept too."""

    model_config = {"extra": "allow"}

    eval_loss: float | None = Field(default=None, description="Loss on data.eval.")
    train_loss: float | None = Field(default=None, description="Training loss (last window).")
    general_loss_delta: float | None = Field(
        default=None,
        description="Loss on data.general after minus before fine-tuning (forgetting).",
    )
    trainable_params: int | None = Field(default=None, ge=0, description="Trainable parameters.")
    trainable_param_percent: float | None = Field(
        default=None, description="Trainable ÷ all parameters x 100, as PEFT reports it."
    )
    total_params: int | None = Field(default=None, ge=0, description="All parameters.")
    rank: int | None = Field(default=None, description="LoRA rank actually used.")
    runtime_seconds: float | None = Field(default=None, description="Training wall time.")

    @model_validator(mode="after")
    def _extra_numbers(self) -> Metrics:
        for key, value in (self.model_extra or {}).items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"status.metrics.{key} must be a number, not {value!r}")
        return self


class Artifact(StatusModel):
    """The trained adapter in object storage."""

    uri: str = Field(description="Prefix holding the adapter (PEFT format) and metadata.json.")
    sha256: str | None = Field(
        default=None, description="Checksum of the artifact manifest, verified on collect."
    )


class FineTuneJobStatus(StatusModel):
    """Observed state, written by the controller."""

    phase: Phase | None = Field(default=None, description="Pending | Running | Succeeded | Failed.")
    conditions: list[Condition] = Field(default_factory=list, description="Conditions.")
    attempts: int = Field(default=0, ge=0, description="Gang attempts started so far.")
    disruptions: int = Field(
        default=0,
        ge=0,
        description="Attempts ended by an eviction or preemption (pod condition "
        "DisruptionTarget); they are restarted without counting against spec.backoffLimit.",
    )
    progress: Progress | None = Field(default=None, description="Training progress.")
    metrics: Metrics | None = Field(default=None, description="Metrics from the trainer.")
    artifact: Artifact | None = Field(default=None, description="Where the adapter landed.")
    message: str | None = Field(default=None, description="Latest human-readable summary.")
    observed_generation: int | None = Field(
        default=None, description="metadata.generation last reconciled."
    )
    start_time: str | None = Field(default=None, description="When the first attempt started.")
    completion_time: str | None = Field(default=None, description="When the job finished.")

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)


class FineTuneJob(ApiModel):
    """A whole FineTuneJob object (apiVersion, kind, metadata, spec, status)."""

    api_version: Literal["kubetune.io/v1alpha1"] = Field(
        default="kubetune.io/v1alpha1", alias="apiVersion"
    )
    kind: Literal["FineTuneJob"] = "FineTuneJob"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", ""))
