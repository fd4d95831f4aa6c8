"""Hugging Face models in and out: head 0 against transformers per family, the RoPE row mapping,
the export that transformers loads and its exact round trip, and unsupported families refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, load_recipe, recipe_args
from tests.hf_tiny import (
    FAMILIES,
    LLAMA3_SCALING,
    hf_model,
    make_hf_folder,
    relative_error,
    script,
    transformers_logits,
)
from wmtp.config.inputs import check_inputs_or_exit, input_problems
from wmtp.layout import HEADS_FILENAME
from wmtp.models import load_mtp
from wmtp.models.hf import (
    NewHeads,
    interleaved_to_rotate_half,
    rotate_half_to_interleaved,
)
from wmtp.models.hf_export import export_hf
from wmtp.models.mtp_transformer import scaled_frequencies

PARITY_RTOL = 1e-5
"""fp32: max |ours - transformers| over max |transformers| of the logits."""
VOCAB = 96
SEQ = 72
"""Positions 0..71: past the scaled models' original context (16) and past max_position_embeddings (64)."""


@pytest.fixture(scope="module")
def hf_data(tiny, tmp_path_factory) -> Path:
    """A tiny Qwen2.5-style folder (biases, tied embeddings, spare rows, shards) with a BPE tokenizer."""
    return make_hf_folder(tmp_path_factory.mktemp("hf") / "qwen", tiny / "data" / "train.jsonl", layers=3)


@pytest.mark.parametrize("style", list(FAMILIES))
def test_head0_logits_equal_transformers(style, tmp_path):
    model = hf_model(style, vocab_size=VOCAB)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1  # the sharded path
    ours = load_mtp(tmp_path, heads=NewHeads(3)).eval()
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(input_ids=tokens).logits
        logits = ours.logits(tokens)
    error = relative_error(logits[:, :, 0], reference)
    print(f"[parity] {style}: max relative logits error {error:.2e}")
    assert error <= PARITY_RTOL, (style, error)
    # copy_last: every added head is the last block, applied to the same trunk output.
    assert torch.equal(logits[:, :, 1], logits[:, :, 0]) and torch.equal(logits[:, :, 2], logits[:, :, 0])
    assert ours.args.n_layers == 3 + 3 - 1 and ours.args.qkv_bias == (style == "qwen2.5")


def test_random_new_heads_are_seeded_draws_and_the_trunk_is_kept(tmp_path):
    hf_model("llama3.1", vocab_size=VOCAB).save_pretrained(tmp_path)
    copied = load_mtp(tmp_path, heads=NewHeads(3)).state_dict()
    drawn = [load_mtp(tmp_path, heads=NewHeads(3, "random", seed=s)).state_dict() for s in (5, 5, 6)]
    for key, tensor in copied.items():
        assert torch.equal(drawn[0][key], drawn[1][key]), key
        if not key.startswith("extra_heads."):
            assert torch.equal(drawn[0][key], tensor), key
    wq = drawn[0]["extra_heads.0.attention.wq.weight"]
    assert not torch.equal(wq, drawn[2]["extra_heads.0.attention.wq.weight"])
    assert abs(float(wq.std()) - 0.02) < 0.005
    assert torch.equal(drawn[0]["extra_heads.1.ffn_norm.weight"], torch.ones(64))


def test_rope_rows_map_hand_computed_and_back_exactly():
    # One head of 4 dims: Hugging Face rows [re0, re1, im0, im1] are Meta's pairs (re0, im0), (re1, im1).
    hf_rows = torch.tensor([[10.0], [11.0], [20.0], [21.0]])
    assert rotate_half_to_interleaved(hf_rows, 1).flatten().tolist() == [10.0, 20.0, 11.0, 21.0]
    w = torch.randn(3 * 8, 5)
    assert torch.equal(interleaved_to_rotate_half(rotate_half_to_interleaved(w, 3), 3), w)
    bias = torch.randn(3 * 8)
    assert torch.equal(rotate_half_to_interleaved(bias, 3), rotate_half_to_interleaved(bias[:, None], 3)[:, 0])


def test_llama3_frequency_scaling_equals_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {**LLAMA3_SCALING, "original_max_position_embeddings": 8192}  # Llama 3.1 8B's
    sizes = dict(hidden_size=256, num_attention_heads=2, max_position_embeddings=131072)
    config = LlamaConfig(**sizes, rope_theta=500000.0, rope_scaling=scaling)
    reference, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    plain = 1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128))
    ours = scaled_frequencies(plain, scaling)
    assert torch.equal(ours, reference.float())
    kept, stretched = ours == plain, ours == plain / 8
    assert kept.any() and stretched.any() and not (kept | stretched).all()  # all three bands


def test_export_loads_in_transformers_and_round_trips_exactly(hf_data, tmp_path):
    from transformers import AutoTokenizer

    from wmtp.data.tokenizer import load_tokenizer

    mtp, exported, back = tmp_path / "mtp", tmp_path / "exported", tmp_path / "back"
    script("import_hf").main([str(hf_data), "--out", str(mtp), "--n-future-tokens", "3", "--new-heads", "random"])
    script("export_hf").main([str(mtp), "--out", str(exported)])
    script("import_hf").main([str(exported), "--out", str(back)])

    before, after = load_file(mtp / "model.safetensors"), load_file(back / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert (mtp / "params.json").read_text() == (back / "params.json").read_text()

    config = json.loads((exported / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["num_hidden_layers"] == 3 and config["model_type"] == "qwen2"
    assert "lm_head.weight" not in load_file(exported / "model.safetensors")
    assert sorted({k.split(".")[1] for k in load_file(exported / HEADS_FILENAME)}) == ["0", "1"]

    ours = load_mtp(mtp).eval()
    tokens = torch.randint(0, ours.args.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = ours.logits(tokens)[:, :, 0]
    assert relative_error(logits, transformers_logits(exported, tokens)) <= PARITY_RTOL

    tokenizer, theirs = load_tokenizer(hf_data), AutoTokenizer.from_pretrained(exported)
    prompt = "Below is an instruction.\n\n### Response:\n"
    assert theirs(prompt, add_special_tokens=False).input_ids == tokenizer.encode(prompt, prefix=True)
    assert (theirs.bos_token, theirs.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")


def test_a_trained_output_is_exported_untied(hf_data, tmp_path):
    model = load_mtp(hf_data, heads=NewHeads(2), value_head=True)
    sd = model.state_dict()
    sd["output.weight"] = sd["output.weight"] + 0.01  # training moved it away from the embedding
    sd["value_head.weight"] = torch.randn(1, model.args.dim)
    export_hf(tmp_path / "hf", model.args, sd, tokenizer=None)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    back = load_mtp(tmp_path / "hf")
    assert back.value_head is not None
    assert all(torch.equal(back.state_dict()[k], v) for k, v in sd.items())
    tokens = torch.randint(0, model.args.vocab_size, (1, 30))
    model.load_state_dict(sd)
    with torch.no_grad():
        assert relative_error(model.logits(tokens)[:, :, 0], transformers_logits(tmp_path / "hf", tokens)) <= 1e-5


def test_a_meta_policy_exports_as_llama(tiny, tmp_path):
    from transformers import AutoTokenizer

    from wmtp.data.tokenizer import load_tokenizer

    script("export_hf").main([str(tiny / "mtp_model"), "--out", str(tmp_path / "hf")])
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    ours = load_mtp(tiny / "mtp_model").eval()
    tokens = torch.randint(0, ours.args.vocab_size, (2, 40))
    with torch.no_grad():
        assert relative_error(ours.logits(tokens)[:, :, 0], transformers_logits(tmp_path / "hf", tokens)) <= 1e-5
    back = load_mtp(tmp_path / "hf")
    assert back.args.to_dict() == ours.args.to_dict()  # Meta's params, no Hugging Face config
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.state_dict().items())
    text = "def add(a, b):\n    return a + b"
    spm = load_tokenizer(tiny / "tokenizer.model")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert theirs(text).input_ids == [spm.bos_id, *spm.encode(text, prefix=True)]


# ------------------------------------------------------------------------------------------ refusals


def hf_config_folder(folder: Path, **config) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(ROOT / "pyproject.toml", folder / "model.safetensors")  # never read: refused before
    return folder


LLAMA = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    hidden_size=64,
    num_attention_heads=4,
    num_hidden_layers=3,
    intermediate_size=80,
    vocab_size=96,
)


def test_an_unsupported_family_stops_the_recipe_with_one_line(tiny, tmp_path, capsys):
    mistral = {**LLAMA, "model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 4096}
    folder = hf_config_folder(tmp_path / "mistral", **mistral)
    argv = recipe_args(tiny, tmp_path / "run", "baseline_tiny.toml", **{"model.path": folder})
    with pytest.raises(SystemExit) as info:
        load_recipe("full_finetune_baseline").main([*argv, "--model.n_future_tokens", "4"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: model.path: {folder / 'config.json'}: "), err
    assert "model family 'mistral' (MistralForCausalLM) is not supported; supported: llama (" in err
    assert "qwen2 (Qwen2, Qwen2.5, Qwen2.5-Coder)" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({**LLAMA, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True},
         "sliding-window attention"),
        ({**LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling 'yarn' is not supported"),
        ({**LLAMA, "num_local_experts": 8}, "num_local_experts (mixture of experts)"),
        ({**LLAMA, "head_dim": 32}, "head_dim 32"),
        ({**LLAMA, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}, "model family 'qwen3'"),
    ],
)  # fmt: skip
def test_unsupported_config_keys_are_named(config, named, tiny, tmp_path):
    folder = hf_config_folder(tmp_path / "m", **config)
    cfg = load_recipe("full_finetune_baseline").main_config(
        load_recipe("full_finetune_baseline").BaselineConfig,
        recipe_args(tiny, tmp_path / "run", "baseline_tiny.toml", **{"model.path": folder, "model.n_future_tokens": 2}),
    )
    problems = input_problems(cfg)
    assert len(problems) == 1 and named in problems[0], problems


def test_a_supported_folder_needs_its_heads_and_its_shards(hf_data, tiny, tmp_path, capsys):
    recipe = load_recipe("full_finetune_baseline")
    argv = recipe_args(tiny, tmp_path / "run", "baseline_tiny.toml", **{"model.path": hf_data})
    cfg = recipe.main_config(recipe.BaselineConfig, argv)
    assert input_problems(cfg) == [
        f"model.n_future_tokens: set it (>= 1) for the Hugging Face model {hf_data}: its MTP heads"
    ]
    broken = tmp_path / "broken"
    shutil.copytree(hf_data, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    argv += ["--model.path", str(broken), "--model.n_future_tokens", "2"]
    cfg = recipe.main_config(recipe.BaselineConfig, argv)
    with pytest.raises(SystemExit):
        check_inputs_or_exit(cfg)
    assert f"{shard} (named in model.safetensors.index.json) does not exist" in capsys.readouterr().err


def test_head_counts_are_checked_where_they_are_given(hf_data, tiny):
    with pytest.raises(ValueError, match="needs model.n_future_tokens >= 1"):
        load_mtp(hf_data)
    with pytest.raises(ValueError, match="n_future_tokens is 4; model.n_future_tokens asks 2"):
        load_mtp(tiny / "mtp_model", heads=NewHeads(2))
