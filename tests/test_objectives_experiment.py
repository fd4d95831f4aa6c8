"""A smoke run of the objectives experiment (scripts/objectives_experiment.py): one seed, two steps
from a pretrained base of two steps, the critic and two arms (verifiable from the critic's value
model, Rho-1 with its random control), evaluated on three held-out problems, then the tables and
the plot. The real experiment (configs/experiments/objectives.toml) is not run here."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import run_script

pytestmark = pytest.mark.slow

SMOKE = """
[experiment]
seeds = [1]
steps = 2
micro_batch_size = 2
lr = 1e-3
warmup_steps = 1
critic_steps = 2
critic_lr = 1e-3
frozen_critic_steps = 0
frozen_critic_lr = 1e-2
rho1_select_head0 = true
heldout_seed = 77
heldout_problems = 3
max_new_tokens = 8
parallel = 2
base_steps = 2
reference_steps = 1
tiny = "{tiny}"
arms = ["verifiable", "rho1_random"]
"""


def test_the_experiment_runs_every_arm_and_reports_each_seed(tiny, tmp_path):
    work = tmp_path / "tiny"
    shutil.copytree(tiny, work)  # the session's artifacts stay without pretrained/
    config = tmp_path / "smoke.toml"
    config.write_text(SMOKE.format(tiny=work))
    out = tmp_path / "out"
    run_script(["scripts/objectives_experiment.py", "--config", str(config), "--out", str(out)])

    inputs = json.loads((work / "pretrained" / "inputs.json").read_text())
    assert inputs["base"]["training.max_steps"] == 2 and (work / "pretrained" / "reference" / "params.json").is_file()
    results = json.loads((out / "results.json").read_text())
    arms = results["arms"]
    assert set(arms) == {"verifiable", "rho1_random"}
    for name, arm in arms.items():
        assert 0.0 <= arm["pass_at_1"]["1"] <= 1.0, name
        assert arm["tokens"]["1"] > 0, name
    assert set(results["context"]) == {"base", "reference"}
    assert 0.0 <= results["critic"]["critic"]["val/auroc"]["1"] <= 1.0
    # Verifiable trained from the seed's value model; Rho-1 against the pretrained reference, at random.
    assert "seed_1/critic/final" in (out / "seed_1" / "verifiable" / "config.toml").read_text()
    rho1 = (out / "seed_1" / "rho1_random" / "config.toml").read_text()
    assert 'control = "random"' in rho1 and "pretrained/reference" in rho1

    problems = json.loads((out / "heldout_problems.json").read_text())
    assert [p["task_id"] for p in problems] == [1, 2, 3]
    table = (out / "results.md").read_text()
    for name in arms:
        assert f"| {name} |" in table
    assert "seed 1" in table and "| critic | 1 |" in table
    assert (out / "results.png").stat().st_size > 0
