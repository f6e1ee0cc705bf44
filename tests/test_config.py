"""Config parsing and validation: K2's numbers, and one readable error per bad field."""

import dataclasses
import json

import pytest

from kimi_jax import rope
from kimi_jax.cache import cache_bytes_per_token
from kimi_jax.config import K2_THINKING, TINY, Config, Int4Quant
from kimi_jax.errors import ConfigError


def test_k2_thinking_preset_matches_the_published_shapes():
    c = K2_THINKING
    assert (c.hidden_size, c.num_hidden_layers, c.n_routed_experts, c.num_experts_per_tok) == (7168, 61, 384, 8)
    assert c.cache_dim == 576
    assert cache_bytes_per_token(c, "bfloat16") == 70_272  # docs/k2-format.md §4.5
    assert rope.softmax_scale(c) == pytest.approx(0.1446796, abs=1e-7)
    # Pairs 0-19 keep their frequency, 20-31 are divided by 64; float32 values, so within one ulp.
    freq_ratio = rope.inv_freq(c) / (c.rope_theta ** (-2 * __import__("numpy").arange(32) / 64))
    assert (abs(freq_ratio[:20] - 1) < 2**-23).all() and (abs(freq_ratio[20:] * 64 - 1) < 2**-23).all()


@pytest.mark.parametrize("cfg", [K2_THINKING, TINY, TINY.replace(q_lora_rank=None, rope_scaling=None)])
def test_hf_config_round_trips(cfg):
    assert Config.from_hf(json.loads(json.dumps(cfg.to_hf()))) == cfg


def _raw(**changes):
    raw = K2_THINKING.to_hf()
    for key, value in changes.items():
        if value is dataclasses.MISSING:
            raw.pop(key)
        else:
            raw[key] = value
    return raw


@pytest.mark.parametrize("changes, field", [
    (dict(hidden_size=dataclasses.MISSING), "hidden_size"),
    (dict(num_hidden_layers="61"), "num_hidden_layers"),
    (dict(n_group=5), "n_group"),
    (dict(topk_group=3, n_group=2), "topk_group"),
    (dict(num_experts_per_tok=500), "num_experts_per_tok"),
    (dict(first_k_dense_replace=70), "first_k_dense_replace"),
    (dict(scoring_func="softmax"), "scoring_func"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(qk_rope_head_dim=63), "qk_rope_head_dim"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(model_type="llama"), "model_type"),
    (dict(q_lora_rank=0), "q_lora_rank"),
])
def test_bad_fields_are_named_in_one_line(changes, field):
    with pytest.raises(ConfigError, match=f"'{field}") as e:
        Config.from_hf(_raw(**changes))
    assert "\n" not in str(e.value)


def test_unsupported_quantization_formats_are_refused_by_name():
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    with pytest.raises(ConfigError, match="'fp8'"):
        Config.from_hf(_raw(quantization_config=fp8))
    asym = Int4Quant().to_hf()
    asym["config_groups"]["group_0"]["weights"]["symmetric"] = False
    with pytest.raises(ConfigError, match="symmetric"):
        Config.from_hf(_raw(quantization_config=asym))
    odd_group = Int4Quant(group_size=96).to_hf()  # 2048 is not a multiple of 96
    with pytest.raises(ConfigError, match="group size 96"):
        Config.from_hf(_raw(quantization_config=odd_group))


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        Config.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        Config.from_hf(tmp_path)
