"""One rank of `bench_load.py`: the baseline recipe's setup(), its peak RSS and time, and a bitwise check.

torchrun --nproc_per_node=2 benchmarks/load_worker.py OUT_DIR --config ... (recipe arguments)
"""

import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tests.conftest import load_recipe  # noqa: E402
from wmtp.models import load_mtp  # noqa: E402
from wmtp.models.hf import NewHeads  # noqa: E402
from wmtp.training.checkpointer import full_model_state_dict  # noqa: E402


def main() -> None:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    recipe_module = load_recipe("full_finetune_baseline")
    cfg = recipe_module.main_config(recipe_module.BaselineConfig, argv)
    recipe = recipe_module.BaselineRecipe(cfg)
    t0 = time.perf_counter()
    recipe.setup()
    setup_s = time.perf_counter() - t0
    # ru_maxrss is the process's peak so far (KiB on Linux): what setup needed at most.
    result = {
        "rank": int(os.environ.get("RANK", 0)),
        "setup_s": setup_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 * 1.048576,
    }
    loaded = full_model_state_dict(recipe.model)
    if result["rank"] == 0:
        heads = NewHeads(cfg.model.n_future_tokens, cfg.model.new_heads, seed=cfg.training.seed)
        vocab = recipe.tokenizer.vocab_size
        reference = load_mtp(cfg.model.path, dtype=torch.float32, vocab_size=vocab, heads=heads).state_dict()
        result["bitwise_equal"] = set(loaded) == set(reference) and all(
            torch.equal(loaded[k], reference[k]) for k in reference
        )
    (out / f"rank{result['rank']}.json").write_text(json.dumps(result))
    recipe.cleanup(status="FINISHED")


if __name__ == "__main__":
    main()
