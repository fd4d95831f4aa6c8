"""Run recipes inside one torchrun worker, as the distributed tests need.

    torchrun ... tests/torchrun_worker.py SPEC.json

SPEC: {"guard": bool, "out": folder, "runs": [{"recipe": "full_finetune_baseline", "argv": [...],
"check_load": bool}, ...], "probe_checkpoint": folder or absent, "arrangements": [{"recipe":
"baseline", "argv": [...]}, ...] or absent}. "arrangements": `tests/arrangements.py`'s one step in
every arrangement, per recipe; rank 0 saves them to OUT/arrangements.pt. With "guard", `tests/device_guard.py`
marks host tensors and refuses them in collectives, and ranks > 0 may not read checkpoints. Runs
go one after the other in this process and share its process group (the first joins it; it is
destroyed once, at the end). "check_load"
compares the parameters right after setup with a single-process `load_mtp` (+ the critic's value
head), bit for bit, on rank 0. "probe_checkpoint" is the guard's negative control: each rank
all-reduces a host-made tensor and loads that checkpoint, and records the errors. Each rank writes
OUT/rank<r>.json: {"runs": [{"bitwise_equal": ...}], "probes": {name: error message or null}}.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tests import device_guard  # noqa: E402
from tests.conftest import load_recipe  # noqa: E402
from wmtp.distributed.env import destroy  # noqa: E402


def recipe_class(module):
    return next(
        v
        for v in vars(module).values()
        if isinstance(v, type) and v.__module__ == module.__name__ and hasattr(v, "train_step")
    )


def single_process_state(cfg) -> dict[str, torch.Tensor]:
    from wmtp.data.tokenizer import load_tokenizer
    from wmtp.models import load_mtp
    from wmtp.models.checkpoint import load_value_head
    from wmtp.models.hf import NewHeads

    critic = getattr(cfg, "critic", None)
    vocab = load_tokenizer(cfg.tokenizer.path).vocab_size
    heads = NewHeads(cfg.model.n_future_tokens, cfg.model.new_heads, seed=cfg.training.seed)
    model = load_mtp(cfg.model.path, dtype=torch.float32, vocab_size=vocab, value_head=critic is not None, heads=heads)
    if critic is not None and critic.value_head:
        load_value_head(model, critic.value_head)
    return model.state_dict()


def run(spec_run: dict, rank: int) -> dict:
    module = load_recipe(spec_run["recipe"])
    module.destroy = lambda: None  # the next run reuses the process group
    result: dict = {}
    if spec_run.get("check_load"):
        from wmtp.training.checkpointer import full_model_state_dict

        cls = recipe_class(module)
        setup = cls.setup

        def checked_setup(self) -> None:
            setup(self)
            loaded = full_model_state_dict(self.model)
            if rank == 0:
                reference = single_process_state(self.cfg)
                result["bitwise_equal"] = set(loaded) == set(reference) and all(
                    torch.equal(loaded[k], reference[k]) for k in reference
                )

        cls.setup = checked_setup
    module.main(spec_run["argv"])
    return result


def probe(checkpoint: str) -> dict[str, str | None]:
    """What the old code did: reduce counts made on the host, and load the checkpoint on every rank."""
    from wmtp.distributed.env import all_reduce_sum, init_distributed
    from wmtp.models import load_mtp

    init_distributed("cpu")
    errors: dict[str, str | None] = {}
    for name, attempt in (
        ("host_all_reduce", lambda: all_reduce_sum(torch.ones(3))),
        ("checkpoint_read", lambda: load_mtp(checkpoint)),
    ):
        try:
            attempt()
            errors[name] = None
        except RuntimeError as e:
            errors[name] = str(e)
    return errors


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank = int(os.environ["RANK"])
    if spec.get("guard"):
        device_guard.install()
        if rank > 0:
            device_guard.refuse_checkpoint_reads()
    probes = probe(spec["probe_checkpoint"]) if spec.get("probe_checkpoint") else {}
    results = [run(r, rank) for r in spec.get("runs", [])]
    if spec.get("arrangements"):
        from tests.arrangements import step_results

        steps = {r["recipe"]: step_results(r["recipe"], r["argv"]) for r in spec["arrangements"]}
        if rank == 0:
            torch.save(steps, Path(spec["out"], "arrangements.pt"))
    Path(spec["out"], f"rank{rank}.json").write_text(json.dumps({"runs": results, "probes": probes}))
    destroy()


if __name__ == "__main__":
    main()
