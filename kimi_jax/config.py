"""Model configuration: one frozen dataclass, defaults = Kimi K2 Thinking.

`Config.from_hf(path_or_dict)` is the only route from a checkpoint's `config.json`; the field names
are the Hugging Face ones (docs/k2-format.md §1) so a reader can hold the two side by side. Test and benchmark
configs come from `dataclasses.replace` on a preset. The dataclass is frozen and hashable, so it
can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from kimi_jax.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("kimi_k2", "deepseek_v3")


@dataclasses.dataclass(frozen=True)
class Yarn:
    """YaRN rope scaling (docs/k2-format.md §4.3). K2 Thinking: factor 64 over an original 4096 context."""

    factor: float = 64.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 1.0  # K2 uses 1.0, not DeepSeek-V3's 32
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


@dataclasses.dataclass(frozen=True)
class Int4Quant:
    """compressed-tensors `pack-quantized` weights (docs/k2-format.md §1.3, §3): symmetric int4, grouped.

    Only the routed experts are quantized in K2 Thinking; everything in `ignore` stays bf16.
    """

    group_size: int = 32
    ignore: tuple[str, ...] = (
        "lm_head",
        "re:.*self_attn.*",
        "re:.*shared_experts.*",
        r"re:.*mlp\.(gate|up|gate_up|down)_proj.*",
    )

    def to_hf(self) -> dict[str, Any]:
        """The `quantization_config` block as compressed-tensors writes it."""
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "kv_cache_scheme": None,
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "input_activations": None,
                    "output_activations": None,
                    "weights": {
                        "num_bits": 4,
                        "type": "int",
                        "symmetric": True,
                        "strategy": "group",
                        "group_size": self.group_size,
                        "dynamic": False,
                        "observer": "minmax",
                        "observer_kwargs": {},
                        "actorder": None,
                        "block_structure": None,
                    },
                }
            },
            "ignore": list(self.ignore),
        }


@dataclasses.dataclass(frozen=True)
class Config:
    """A K2-architecture model's hyperparameters under their config.json names; the defaults are
    Kimi K2 Thinking's. Read one with `Config.from_hf(dir)`, change one with `cfg.replace(...)`."""

    vocab_size: int = 163840
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense SwiGLU of the first `first_k_dense_replace` layers
    moe_intermediate_size: int = 2048  # per routed expert and per shared expert
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 1
    n_routed_experts: int = 384
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.827
    q_lora_rank: int | None = 1536  # None: a single q_proj instead of q_a/q_b
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    num_attention_heads: int = 64
    rope_theta: float = 50000.0
    rope_scaling: Yarn | None = Yarn()
    max_position_embeddings: int = 262144
    rms_norm_eps: float = 1e-5
    # The reference code builds q_a_layernorm and kv_a_layernorm without passing eps, so they use
    # the RMSNorm class default 1e-6 whatever rms_norm_eps says (docs/k2-format.md §4.1). We follow the reference
    # (and transformers) so parity holds; vLLM/SGLang pass rms_norm_eps instead. UNVERIFIED which
    # one Moonshot trained with; the difference is numerically tiny.
    latent_norm_eps: float = 1e-6
    bos_token_id: int | None = 163584
    eos_token_id: int | None = 163586  # <|im_end|>; UNVERIFIED for the Thinking config.json
    pad_token_id: int | None = 163839
    quantization: Int4Quant | None = Int4Quant()
    model_type: str = "kimi_k2"

    # ---- derived sizes ------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        """Query/key width per head: the no-rope part plus the rope part."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_dense_layers(self) -> int:
        """Layers with a dense SwiGLU instead of experts (the first ones)."""
        return self.first_k_dense_replace

    @property
    def n_moe_layers(self) -> int:
        """Layers with routed experts."""
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def cache_dim(self) -> int:
        """Values cached per token per layer: the normalized latent plus the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    # ---- Hugging Face config.json ---------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict) -> "Config":
        """Read and validate a HF `config.json` (a path to the file, its directory, or the dict)."""
        where = "config.json"
        if isinstance(source, dict):
            raw = source
        else:
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            where = path
            if not os.path.isfile(path):
                raise ConfigError(f"{path}: file not found")
            try:
                with open(path, encoding="utf-8") as f:
                    raw = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"{path}: expected a JSON object")
        return _parse_hf(raw, where)

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that transformers' DeepseekV3Config and `from_hf` both read."""
        out: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": self.model_type,
            "auto_map": {
                "AutoConfig": "configuration_deepseek.DeepseekV3Config",
                "AutoModel": "modeling_deepseek.DeepseekV3Model",
                "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
            },
            "moe_layer_freq": 1,
            "topk_method": "noaux_tc",
            "scoring_func": "sigmoid",
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "num_key_value_heads": self.num_attention_heads,
            "num_nextn_predict_layers": 0,
            "tie_word_embeddings": False,
            "initializer_range": 0.02,
            "use_cache": True,
            "torch_dtype": "bfloat16",
        }
        for f in dataclasses.fields(self):
            if f.name in ("rope_scaling", "quantization", "latent_norm_eps", "model_type"):
                continue
            out[f.name] = getattr(self, f.name)
        out["rope_scaling"] = (
            None if self.rope_scaling is None else {"type": "yarn", **dataclasses.asdict(self.rope_scaling)}
        )
        if self.quantization is not None:
            out["quantization_config"] = self.quantization.to_hf()
        return out

    def replace(self, **changes) -> "Config":
        """A copy with `changes` (field=value) applied and validated like a config.json."""
        cfg = dataclasses.replace(self, **changes)
        _validate(cfg, "config")
        return cfg


# ---- parsing and validation -------------------------------------------------------------------

_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "n_routed_experts",
    "num_experts_per_tok",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "num_attention_heads",
)
_INT_FIELDS = _REQUIRED + ("first_k_dense_replace", "n_shared_experts", "n_group", "topk_group",
                           "max_position_embeddings")
_FLOAT_FIELDS = ("routed_scaling_factor", "rope_theta", "rms_norm_eps")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_hf(raw: dict, where: str) -> Config:
    def fail(field, msg):
        raise ConfigError(f"{where}: field '{field}' {msg}")

    for name in _REQUIRED:
        if name not in raw or raw[name] is None:
            fail(name, "is missing")
    for name in _INT_FIELDS:
        if name in raw and raw[name] is not None and not _is_int(raw[name]):
            fail(name, f"must be an integer, got {raw[name]!r}")
    for name in _FLOAT_FIELDS:
        if name in raw and not (isinstance(raw[name], (int, float)) and not isinstance(raw[name], bool)):
            fail(name, f"must be a number, got {raw[name]!r}")

    # Architecture features this runtime does not implement: refuse them by name rather than
    # computing something else silently.
    unsupported = {
        "scoring_func": ("sigmoid",),
        "topk_method": ("noaux_tc",),
        "hidden_act": ("silu",),
        "moe_layer_freq": (1,),
        "attention_bias": (False,),
        "tie_word_embeddings": (False,),
    }
    for name, ok in unsupported.items():
        if name in raw and raw[name] not in ok:
            fail(name, f"= {raw[name]!r} is not supported (expected {' or '.join(map(repr, ok))})")
    model_type = raw.get("model_type", "kimi_k2")
    if model_type not in SUPPORTED_MODEL_TYPES:
        fail("model_type", f"= {model_type!r} is not a K2/DeepSeek-V3 architecture")
    q_lora = raw.get("q_lora_rank")
    if q_lora is not None and (not _is_int(q_lora) or q_lora <= 0):
        fail("q_lora_rank", f"must be a positive integer or null, got {q_lora!r}")

    rope = raw.get("rope_scaling")
    yarn = None
    if rope is not None:
        if not isinstance(rope, dict):
            fail("rope_scaling", "must be an object or null")
        kind = rope.get("type", rope.get("rope_type"))
        if kind != "yarn":
            fail("rope_scaling", f"type {kind!r} is not supported (expected 'yarn' or null)")
        kw = {}
        for f in dataclasses.fields(Yarn):
            if f.name in rope and rope[f.name] is not None:
                v = rope[f.name]
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    fail(f"rope_scaling.{f.name}", f"must be a number, got {v!r}")
                kw[f.name] = type(f.default)(v)
        if "factor" not in kw:
            fail("rope_scaling.factor", "is missing")
        yarn = Yarn(**kw)

    quant = _parse_quantization(raw.get("quantization_config"), where)

    kw = {}
    for f in dataclasses.fields(Config):
        if f.name in ("rope_scaling", "quantization", "latent_norm_eps", "model_type"):
            continue
        if f.name in raw:
            kw[f.name] = raw[f.name]
    if isinstance(kw.get("eos_token_id"), list):  # generation configs sometimes list several
        kw["eos_token_id"] = kw["eos_token_id"][0] if kw["eos_token_id"] else None
    defaults_that_k2_sets = dict(first_k_dense_replace=0, n_shared_experts=0, n_group=1, topk_group=1)
    for name, default in defaults_that_k2_sets.items():
        kw.setdefault(name, default)
    cfg = Config(**kw, rope_scaling=yarn, quantization=quant, model_type=model_type)
    _validate(cfg, where)
    return cfg


def _parse_quantization(q: Any, where: str) -> Int4Quant | None:
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ConfigError(f"{where}: field 'quantization_config' must be an object")
    method = q.get("quant_method")
    fmt = q.get("format")
    if method != "compressed-tensors" or fmt != "pack-quantized":
        raise ConfigError(
            f"{where}: quantization_config quant_method={method!r} format={fmt!r} is not supported "
            "(only compressed-tensors 'pack-quantized' int4 is; e.g. fp8 checkpoints need conversion)"
        )
    groups = q.get("config_groups") or {}
    if len(groups) != 1:
        raise ConfigError(f"{where}: quantization_config.config_groups must hold exactly one group")
    (gname, group), = groups.items()
    w = group.get("weights") or {}
    field = f"quantization_config.config_groups.{gname}.weights"
    checks = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group"}
    for key, want in checks.items():
        if w.get(key) != want:
            raise ConfigError(f"{where}: {field}.{key} = {w.get(key)!r} is not supported (need {want!r})")
    if group.get("input_activations") is not None:
        raise ConfigError(f"{where}: quantized activations ({field[:-8]}input_activations) are not supported")
    if w.get("actorder") not in (None, False):
        raise ConfigError(f"{where}: {field}.actorder = {w.get('actorder')!r} is not supported")
    gs = w.get("group_size")
    if not _is_int(gs) or gs <= 0:
        raise ConfigError(f"{where}: {field}.group_size must be a positive integer, got {gs!r}")
    return Int4Quant(group_size=gs, ignore=tuple(q.get("ignore") or ()))


def _validate(cfg: Config, where: str) -> None:
    def fail(field, msg):
        raise ConfigError(f"{where}: field '{field}' {msg}")

    for name in _REQUIRED + ("max_position_embeddings",):
        if getattr(cfg, name) <= 0:
            fail(name, f"must be positive, got {getattr(cfg, name)}")
    if not 0 <= cfg.first_k_dense_replace <= cfg.num_hidden_layers:
        fail("first_k_dense_replace", f"= {cfg.first_k_dense_replace} must be in [0, num_hidden_layers]")
    if cfg.n_moe_layers > 0:
        if cfg.num_experts_per_tok > cfg.n_routed_experts:
            fail("num_experts_per_tok", f"= {cfg.num_experts_per_tok} exceeds n_routed_experts")
        if cfg.n_group <= 0 or cfg.n_routed_experts % cfg.n_group:
            fail("n_group", f"= {cfg.n_group} must divide n_routed_experts = {cfg.n_routed_experts}")
        if not 1 <= cfg.topk_group <= cfg.n_group:
            fail("topk_group", f"= {cfg.topk_group} must be in [1, n_group = {cfg.n_group}]")
        per_group = cfg.n_routed_experts // cfg.n_group
        if cfg.n_group > 1 and per_group < 2:
            fail("n_group", "leaves fewer than 2 experts per group (group score sums the top 2)")
        if cfg.num_experts_per_tok > cfg.topk_group * per_group:
            fail("num_experts_per_tok", "exceeds the experts left after group selection")
    if cfg.n_shared_experts < 0:
        fail("n_shared_experts", "must be >= 0")
    if cfg.qk_rope_head_dim % 2:
        fail("qk_rope_head_dim", "must be even (rope rotates pairs)")
    if cfg.quantization is not None:
        for name, dim in (("hidden_size", cfg.hidden_size), ("moe_intermediate_size", cfg.moe_intermediate_size)):
            if dim % cfg.quantization.group_size:
                fail(name, f"= {dim} is not a multiple of the int4 group size {cfg.quantization.group_size}")
    if cfg.rope_scaling is not None and cfg.rope_scaling.factor < 1:
        fail("rope_scaling.factor", "must be >= 1")


# ---- presets ----------------------------------------------------------------------------------

K2_THINKING = Config()

# Small K2-shaped configs for tests and CPU benchmarks: every architectural branch of K2 is kept
# (MLA with q LoRA, YaRN, dense first layer, sigmoid group routing, shared expert), sizes shrunk.
TINY = Config(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    q_lora_rank=48,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    num_attention_heads=4,
    rope_scaling=Yarn(factor=8.0, original_max_position_embeddings=64),
    max_position_embeddings=512,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
    quantization=None,
)

PRESETS = {"k2-thinking": K2_THINKING, "tiny": TINY}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown config preset '{name}' (known: {', '.join(sorted(PRESETS))})")
    return PRESETS[name]

