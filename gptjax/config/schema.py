"""The config schema: one frozen dataclass per section (model, data, optim, train, mesh, sample).

Each section checks its own values (`check()`), `Config.check` the rules that span sections; each
mistake is one `ConfigError` line naming the key. Reading YAML and overrides is in load.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from collections.abc import Callable
from typing import Any, ClassVar

from gptjax.errors import ConfigError, UserError
from gptjax.xla_flags import expand as expand_xla_flags

PRESETS = ("small", "medium", "large", "xl", "2.7b", "6.7b", "13b", "175b")
ATTENTION_KINDS = ("dense", "local")
REMAT_CHOICES = ("none", "dots", "full", "auto")
ATTENTION_IMPLS = ("auto", "cudnn", "splash", "xla", "reference")
DECODE_ATTENTION_IMPLS = ("xla", "cudnn")
DTYPES = ("float32", "bfloat16", "float16")
PIPELINES = ("auto", "tf.data", "threads")
# The projections a LoRA adapter may target (gptjax/lora/adapters.py), named as their kernels.
LORA_TARGETS = ("qkv", "out", "fc", "proj")
# JAX's random keys (64-bit mode off, its default) keep a seed's low 32 bits only: a larger seed
# would silently repeat a smaller one's stream. One range for every seed.
SEED_MAX = 2**32 - 1
# Tokenizer processes are spawned as jobs come; thousands only exhaust memory. Fixed, not from
# this machine's cores: a config planned (--dry-run) on a laptop must stay valid on its cluster.
MAX_WORKERS = 1024
# rule -> (test, what a value must be); NaN fails every numeric rule.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "positive": (lambda v: v > 0, "must be positive"),
    "nonneg": (lambda v: v >= 0, "must be >= 0"),
    "finite_nonneg": (lambda v: 0 <= v < math.inf, "must be >= 0 and finite"),
    "fraction": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "seed": (lambda v: 0 <= v <= SEED_MAX, f"must be in [0, {SEED_MAX}] (seeds are 32-bit)"),
    "nonempty": (lambda v: bool(v.strip()), "must not be empty"),
    "workers": (lambda v: 0 <= v <= MAX_WORKERS, f"must be in [0, {MAX_WORKERS}] (0: one per core)"),
}
SAMPLING_RULES = {"max_new_tokens": "positive", "temperature": "finite_nonneg", "top_k": "nonneg",
                  "top_p": "fraction", "num_samples": "positive", "seed": "seed"}


def _check_rule(key: str, rule: str, value: Any, error: type[UserError] = ConfigError) -> None:
    test, need = RULES[rule]
    if not test(value):
        raise error(f"{key} {need}, got {value!r}")


def _require(section: str, rule: str, values: dict[str, Any]) -> None:
    """values: field -> value, each held to RULES[rule]."""
    for name, value in values.items():
        _check_rule(f"{section}.{name}", rule, value)


def _require_representable(section: str, obj: Any) -> None:
    """Floats finite, ints within 64 bits (`train.steps=1e30` would pass, then overflow)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{section}.{f.name} must be a finite number, got {value}")
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise ConfigError(f"{section}.{f.name} must fit in 64 bits, got {value}")


def _expand_user(obj: Any, names: tuple[str, ...]) -> None:
    """`~` expanded in these path fields of a frozen section, once, as it is built: every reader
    (trainer, cache, checkpoints) and the recorded config see the real path, never a `./~`."""
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, str):
            object.__setattr__(obj, name, os.path.expanduser(value))


def expand_globs(source: str) -> str:
    """data.source with `~` expanded in each comma-separated glob (stdlib and tfds: unchanged)."""
    return ",".join(os.path.expanduser(p) if p.strip().startswith("~") else p
                    for p in source.split(","))


def _require_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")


def check_sampling(values: dict[str, Any], name: Callable[[str], str] = str,
                   error: type[UserError] = UserError) -> None:
    """Checks sampling settings (any of max_new_tokens, temperature, top_k, top_p,
    num_samples, seed; None means unset) for config, sample.py and generate alike; a bad one is a
    UserError naming it as name(field) says (`sample.top_p`, `--top-p`, `top_p`)."""
    for field, value in values.items():
        if value is not None and field in SAMPLING_RULES:
            _check_rule(name(field), SAMPLING_RULES[field], value, error)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 50257
    context_length: int = 2048
    n_layer: int = 12
    d_model: int = 768
    n_head: int = 12
    d_ff: int = 3072
    # Cycled over the layers; nn.scan runs over one period of it.
    attention_pattern: tuple[str, ...] = ("dense", "local")
    # Band width of "local" layers: a token sees itself and the local_window - 1 tokens before it.
    # The paper does not give it; 256 is our choice.
    local_window: int = 256
    dtype: str = "float32"  # matmul compute dtype
    param_dtype: str = "float32"
    # Embedding rows are padded to a multiple of this (speed); padded ids get no probability.
    vocab_multiple: int = 128
    remat: str = "none"  # none | dots | full | auto (train.py picks by memory; elsewhere none)
    scan_layers: bool = True
    attention_impl: str = "auto"  # auto | cudnn | xla | reference
    # The decoder's one-token step against the KV cache (a prompt's prefill uses xla).
    decode_attention_impl: str = "xla"  # xla | cudnn
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    # Training loss computed this many positions at a time (0: all at once), so the fp32
    # [B, T, vocab] logits are never materialized whole.
    loss_chunk: int = 0

    # The one list of which fields define the weights. SHAPE_FIELDS fix every parameter's shape
    # (with attention_pattern and vocab_multiple, which only pad or reorder); EXECUTION_FIELDS
    # change how a program runs, not the parameters: a run resumes, and a checkpoint loads,
    # under other values of these. The rest (attention_pattern, local_window, dtypes, layer_norm_eps,
    # scan_layers, ...) change the function the weights compute or their layout.
    SHAPE_FIELDS: ClassVar[tuple[str, ...]] = (
        "vocab_size", "context_length", "n_layer", "d_model", "n_head", "d_ff")
    EXECUTION_FIELDS: ClassVar[tuple[str, ...]] = (
        "remat", "attention_impl", "decode_attention_impl", "loss_chunk")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_multiple
        return -(-self.vocab_size // m) * m

    @property
    def period(self) -> int:
        return len(self.attention_pattern)

    def layer_kinds(self) -> tuple[str, ...]:
        return tuple(self.attention_pattern[i % self.period] for i in range(self.n_layer))

    def check(self) -> None:
        _require_representable("model", self)
        _require("model", "positive", {k: getattr(self, k) for k in (
            *self.SHAPE_FIELDS, "local_window", "vocab_multiple", "layer_norm_eps", "init_std")})
        _require("model", "nonneg", {"loss_chunk": self.loss_chunk})
        if self.d_model % self.n_head:
            raise ConfigError(f"model.n_head={self.n_head} does not divide "
                              f"model.d_model={self.d_model}")
        if not self.attention_pattern:
            raise ConfigError("model.attention_pattern must name at least one layer kind")
        for kind in self.attention_pattern:
            if kind not in ATTENTION_KINDS:
                raise ConfigError(f"model.attention_pattern: unknown kind {kind!r} "
                                  f"(use {' or '.join(ATTENTION_KINDS)})")
        if self.n_layer % self.period:
            raise ConfigError(f"model.n_layer={self.n_layer} is not a multiple of the "
                              f"attention_pattern length {self.period}")
        if "local" in self.attention_pattern and self.local_window > self.context_length:
            raise ConfigError(f"model.local_window={self.local_window} is larger than "
                              f"model.context_length={self.context_length}")
        for key, allowed in (("dtype", DTYPES), ("param_dtype", DTYPES), ("remat", REMAT_CHOICES),
                             ("attention_impl", ATTENTION_IMPLS),
                             ("decode_attention_impl", DECODE_ATTENTION_IMPLS)):
            _require_choice(f"model.{key}", getattr(self, key), allowed)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # stdlib | tfds:NAME[/CONFIG][:VERSION] | comma-separated globs of .txt/.jsonl[.gz|.zst],
    # .parquet files and datasets.save_to_disk directories
    source: str = "stdlib"
    tokenizer: str = "byte"  # byte | gpt2
    cache_dir: str = ".cache/gptjax/tokens"
    stride: int = 0  # 0 means context_length (no overlap)
    seed: int = 0
    text_key: str = "text"
    tfds_data_dir: str = ""
    train_split: str = "train"
    val_split: str = "validation"
    # Fraction of the files of a files/stdlib source (by path hash) held out for validation.
    val_fraction: float = 0.01
    num_workers: int = 0  # tokenizer processes; 0 means one per core
    prefetch: int = 2
    pipeline: str = "auto"  # tf.data | threads (no TensorFlow) | auto: the same batches

    def __post_init__(self) -> None:
        _expand_user(self, ("cache_dir", "tfds_data_dir"))
        if isinstance(self.source, str):
            object.__setattr__(self, "source", expand_globs(self.source))

    def check(self) -> None:
        _check_rule("data.seed", "seed", self.seed)  # first: its range says more than "64 bits"
        _require_representable("data", self)
        _require("data", "nonneg", {"stride": self.stride, "prefetch": self.prefetch})
        _require("data", "nonempty", {k: getattr(self, k) for k in (
            "source", "cache_dir", "text_key", "train_split", "val_split")})
        _check_rule("data.num_workers", "workers", self.num_workers)
        _require_choice("data.tokenizer", self.tokenizer, ("byte", "gpt2"))
        _require_choice("data.pipeline", self.pipeline, PIPELINES)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 6e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    # Schedules are in tokens, as in the paper, and converted to steps by the trainer.
    warmup_tokens: int = 375_000_000
    decay_tokens: int = 260_000_000_000
    min_lr_ratio: float = 0.1
    # Batch-size ramp: from ramp_start_tokens per step up to the full batch over ramp_tokens.
    ramp_start_tokens: int = 32_768
    ramp_tokens: int = 0  # 0 disables the ramp

    def check(self) -> None:
        _require_representable("optim", self)
        _require("optim", "positive", {"learning_rate": self.learning_rate, "eps": self.eps})
        _require("optim", "nonneg", {k: getattr(self, k) for k in (
            "warmup_tokens", "decay_tokens", "ramp_tokens", "ramp_start_tokens",
            "weight_decay", "clip_norm")})
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for key, value in (("optim.beta1", self.beta1), ("optim.beta2", self.beta2)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{key} must be in [0, 1), got {value}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/default"
    batch_size: int = 256  # sequences per optimizer step, global
    microbatches: int = 1  # gradient accumulation inside the jitted step
    steps: int = 0  # 0 means total_tokens // tokens per step
    total_tokens: int = 300_000_000_000
    seed: int = 0
    log_every: int = 10
    eval_every: int = 500
    eval_batches: int = 0  # 0 means the whole validation split
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    max_bad_steps: int = 5
    peak_tflops: float = 0.0  # per device; 0 means look it up (n/a where unknown)
    init_from: str = ""  # a run directory or Hugging Face GPT-2 directory to fine-tune from
    # XLA flags train.py and the benchmarks set: auto | none | flags ("auto" = gptjax.xla_flags.DEFAULT)
    xla_flags: str = "auto"
    fewshot_tasks: tuple[str, ...] = ()  # task files scored at each evaluation (docs/fewshot.md)
    fewshot_shots: int = 4  # examples per prompt for fewshot_tasks
    # LoRA (docs/finetune-eval.md): rank 0 trains every weight; R > 0 trains only adapters of
    # rank R over the frozen train.init_from, scaled by lora_alpha / R.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("qkv", "out")  # any of qkv, out (attention), fc, proj (MLP)
    lora_dropout: float = 0.0  # on each adapter's input, during training

    def __post_init__(self) -> None:
        _expand_user(self, ("run_dir", "init_from"))

    def check(self) -> None:
        _check_rule("train.seed", "seed", self.seed)  # first: its range says more than "64 bits"
        _require_representable("train", self)
        _require("train", "nonempty", {"run_dir": self.run_dir})
        _require("train", "positive", {k: getattr(self, k) for k in (
            "batch_size", "microbatches", "log_every", "eval_every", "checkpoint_every",
            "keep_checkpoints", "max_bad_steps")})
        _require("train", "nonneg", {k: getattr(self, k) for k in (
            "steps", "total_tokens", "eval_batches", "peak_tflops", "fewshot_shots")})
        if self.batch_size % self.microbatches:
            raise ConfigError(f"train.microbatches={self.microbatches} does not divide "
                              f"train.batch_size={self.batch_size}")
        if self.steps == 0 and self.total_tokens == 0:
            raise ConfigError("train.steps and train.total_tokens are both 0: nothing to train")
        self._check_lora()
        expand_xla_flags(self.xla_flags)  # a malformed flag is a config error before anything starts

    def _check_lora(self) -> None:
        _require("train", "nonneg", {"lora_rank": self.lora_rank})
        _require("train", "positive", {"lora_alpha": self.lora_alpha})
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"train.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_targets or len(set(self.lora_targets)) != len(self.lora_targets):
            raise ConfigError(f"train.lora_targets must name distinct projections, got "
                              f"{','.join(self.lora_targets) or 'none'}")
        for t in self.lora_targets:
            _require_choice("train.lora_targets", t, LORA_TARGETS)
        if self.lora_rank and not self.init_from:
            raise ConfigError("train.lora_rank > 0 adapts a trained model: set train.init_from "
                              "to a run directory or a Hugging Face GPT-2 directory")

@dataclasses.dataclass(frozen=True)
class MeshConfig:
    # Sizes of the mesh axes; one of them may be -1 to take the remaining devices.
    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def check(self) -> None:
        _require_representable("mesh", self)
        sizes = dataclasses.asdict(self)
        if sum(v == -1 for v in sizes.values()) > 1:
            raise ConfigError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
        for key, value in sizes.items():
            if value == 0 or value < -1:
                raise ConfigError(f"mesh.{key} must be positive or -1, got {value}")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> None:
        check_sampling(dataclasses.asdict(self), lambda field: f"sample.{field}", ConfigError)
        _require_representable("sample", self)


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    sample: SampleConfig = SampleConfig()

    def check(self) -> None:
        """Each section's own rules, then those that span sections."""
        for name in SECTIONS:
            getattr(self, name).check()
        if self.data.stride > self.model.context_length:
            raise ConfigError(f"data.stride={self.data.stride} is larger than "
                              f"model.context_length={self.model.context_length}")
        if self.optim.ramp_tokens > 0 and self.train.microbatches == 1:
            raise ConfigError("optim.ramp_tokens > 0 needs train.microbatches > 1: the batch "
                              "ramp grows the number of accumulated microbatches")


# section name -> its dataclass
SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Config)[f.name]
                             for f in dataclasses.fields(Config)}
