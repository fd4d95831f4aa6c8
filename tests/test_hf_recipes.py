"""The four recipes and evaluation on a tiny Hugging Face model (Qwen2.5-style: q/k/v biases, tied
embeddings, spare embedding rows, sharded safetensors) with a byte-level BPE tokenizer, all under
one torchrun launch of 2 gloo ranks with the device guard (no host tensor in a collective, rank 1
reads no checkpoint); then the trained policy exported to Hugging Face and read back."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, recipe_args, torchrun
from tests.hf_tiny import make_hf_folder, relative_error, script, transformers_logits
from wmtp.models import load_mtp
from wmtp.training.metrics import read_metrics

pytestmark = pytest.mark.slow

HEADS = 3
LAYERS = 4
RECIPES = ("baseline", "critic", "verifiable", "rho1")


def training_argv(tiny: Path, hf: Path, out: Path, name: str, **extra) -> list[str]:
    overrides = {
        "model.path": hf,
        "model.n_future_tokens": HEADS,
        "tokenizer.path": hf,
        "training.max_steps": 3,
        "training.micro_batch_size": 2,
        "validation.path": "",
        **extra,
    }
    return recipe_args(tiny, out / name, f"{name}_tiny.toml", **overrides)


def evaluate_argv(tiny: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return [
        "--config", str(ROOT / "configs" / "eval_mbpp_tiny.toml"),
        "--model.path", str(model),
        "--eval.problems", str(tiny / "data" / "toy_eval.json"),
        "--eval.task_ids", "[1, 40]",
        "--eval.limit", "4",
        "--eval.max_new_tokens", "12",
        "--eval.batch_size", "4",
        "--eval.output_dir", str(out),
        "--metrics.mlflow", "false",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf_recipes")
    hf = make_hf_folder(root / "hf", tiny / "data" / "train.jsonl", layers=LAYERS)
    greedy = ["--eval.n_samples", "1", "--eval.ks", "[1]", "--eval.temperature", "0"]
    sampled = ["--eval.n_samples", "2", "--eval.ks", "[1, 2]", "--eval.temperature", "0.8", "--eval.top_p", "0.95"]
    direct = ["--model.n_future_tokens", str(HEADS), "--tokenizer.path", str(hf), "--eval.speculative", "false"]
    spec = {
        "guard": True,
        "runs": [
            {"recipe": "full_finetune_baseline", "argv": training_argv(tiny, hf, root, "baseline"), "check_load": True},
            {"recipe": "full_finetune_critic", "argv": training_argv(tiny, hf, root, "critic"), "check_load": True},
            {
                "recipe": "full_finetune_verifiable",
                "argv": training_argv(
                    tiny,
                    hf,
                    root,
                    "verifiable",
                    **{"critic.value_head": root / "critic/final/value_head.safetensors", "data.packing": "true"},
                ),
                "check_load": True,
            },
            {
                # packed rows: the Hugging Face reference sees them through position ids
                "recipe": "full_finetune_rho1",
                "argv": training_argv(tiny, hf, root, "rho1", **{"reference.path": hf, "data.packing": "true"}),
            },
            *(
                {"recipe": "evaluate", "argv": evaluate_argv(tiny, root / name, root / "baseline", *greedy, *extra)}
                for name, extra in (("greedy", ["--eval.speculative", "false"]), ("speculative", []))
            ),
            {"recipe": "evaluate", "argv": evaluate_argv(tiny, root / "sampled", hf, *sampled, *direct)},
        ],
    }
    (root / "spec.json").write_text(json.dumps({**spec, "out": str(root)}, default=str))
    torchrun("tests/torchrun_worker.py", [str(root / "spec.json")])
    return root


def test_every_recipe_trains_from_the_hugging_face_model(runs):
    results = [json.loads((runs / f"rank{r}.json").read_text())["runs"] for r in range(2)]
    assert [r.get("bitwise_equal") for r in results[0][:3]] == [True, True, True]  # 2 ranks == 1 process
    for name in RECIPES:
        key = "value_loss" if name == "critic" else "loss"
        values = [r[key] for r in read_metrics(runs / name) if key in r]
        assert len(values) == 3 and all(math.isfinite(v) for v in values), name
    params = json.loads((runs / "baseline" / "final" / "params.json").read_text())
    assert params["n_layers"] == LAYERS + HEADS - 1 and params["qkv_bias"]
    assert params["hf_config"]["model_type"] == "qwen2"
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (runs / "rho1" / "final").iterdir()}
    assert "value_head.weight" in load_file(runs / "verifiable" / "final" / "model.safetensors")


def test_evaluation_greedy_speculative_and_sampled(runs):
    samples = {
        name: [json.loads(line) for line in (runs / name / "samples.jsonl").read_text().splitlines()]
        for name in ("greedy", "speculative", "sampled")
    }
    assert len(samples["greedy"]) == 4 and len(samples["sampled"]) == 8
    assert [s["completion"] for s in samples["speculative"]] == [s["completion"] for s in samples["greedy"]]
    results = {name: json.loads((runs / name / "results.json").read_text()) for name in samples}
    assert results["greedy"]["generation"]["new_tokens"] > 0
    assert results["speculative"]["policy"] == str(runs / "baseline" / "final")
    assert results["greedy"]["generation"]["tokens_per_forward"] <= 1.0
    assert results["speculative"]["generation"]["tokens_per_forward"] >= 1.0
    assert set(results["sampled"]["pass_at_k"]) == {"pass@1", "pass@2"}


def test_the_trained_policy_exports_to_transformers_and_back(runs, tmp_path):
    final = runs / "baseline" / "final"
    script("export_hf").main([str(runs / "baseline"), "--out", str(tmp_path / "hf")])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # output trained apart from the embedding
    ours = load_mtp(final).eval()
    tokens = torch.randint(0, ours.args.vocab_size, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert relative_error(ours.logits(tokens)[:, :, 0], transformers_logits(tmp_path / "hf", tokens)) <= 1e-5
    script("import_hf").main([str(tmp_path / "hf"), "--out", str(tmp_path / "back")])
    before, after = load_file(final / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert (final / "params.json").read_text() == (tmp_path / "back" / "params.json").read_text()
