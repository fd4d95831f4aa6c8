"""The multi-GPU path on CPU: NCCL-safe collectives (device guard), torchrun at any size, rank-0 loading,
multi-node rendezvous and HSDP, each against one plain process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, TEST_ENV, load_recipe, recipe_args, torchrun
from wmtp.training.metrics import read_metrics

pytestmark = pytest.mark.slow

WORKER = "tests/torchrun_worker.py"
STEPS = 6
AGENT_TIMEOUT_S = 600


def baseline_args(tiny: Path, out: Path, **overrides) -> list[str]:
    return recipe_args(tiny, out, "baseline_tiny.toml", **{"training.max_steps": STEPS, **overrides})


def losses(out: Path) -> torch.Tensor:
    return torch.tensor([r["loss"] for r in read_metrics(out) if "loss" in r])


@pytest.fixture(scope="module")
def single(tiny, tmp_path_factory) -> torch.Tensor:
    """Baseline losses of one plain process (no process group), global batch 4."""
    out = tmp_path_factory.mktemp("single") / "run"
    load_recipe("full_finetune_baseline").main(baseline_args(tiny, out, **{"training.micro_batch_size": 4}))
    return losses(out)


def run_worker(spec: dict, out: Path, *, nproc: int = 2) -> tuple[list[dict], str]:
    """tests/torchrun_worker.py under torchrun; the per-rank JSON results and the output."""
    out.mkdir(parents=True, exist_ok=True)
    spec_file = out / "spec.json"
    spec_file.write_text(json.dumps({**spec, "out": str(out)}, default=str))
    proc = torchrun(WORKER, [str(spec_file)], nproc=nproc)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)], proc.stdout


def test_device_guard_refuses_host_tensors_and_checkpoint_reads_off_rank_0(tiny, tmp_path):
    """The guard's negative control: what the old recipes did fails under it."""
    results, _ = run_worker({"guard": True, "probe_checkpoint": tiny / "mtp_model"}, tmp_path)
    for rank, result in enumerate(results):
        assert "all_reduce got a host tensor" in result["probes"]["host_all_reduce"], rank
    assert results[0]["probes"]["checkpoint_read"] is None
    assert "only rank 0 reads checkpoints" in results[1]["probes"]["checkpoint_read"]


def test_every_recipe_step_is_nccl_safe_and_loads_once_bit_for_bit(tiny, tmp_path):
    """Each recipe's steps under the device guard (no host tensor reaches a collective, rank 1 reads
    no checkpoint); the sharded parameters after setup equal a single-process load bit for bit."""
    # Every recipe validates too (held-out sums all-reduced); the critic every 2 steps over every row.
    # Rows are packed (two tiny rows per sequence of 256): segments, per-row weighting, ranks holding
    # different numbers of rows; tests/test_packing.py runs grouped and padded steps under the guard.
    common = {
        "training.max_steps": 3,
        "training.micro_batch_size": 2,
        "validation.path": tiny / "data" / "valid.jsonl",
        "validation.max_rows": 8,
        "data.packing": "true",
        "model.max_seq_len": 256,
    }
    extra = {
        "baseline": {},
        "critic": {"validation.every": 2, "validation.max_rows": 0},
        "verifiable": {"critic.value_head": tmp_path / "critic" / "final" / "value_head.safetensors"},
        "rho1": {"reference.path": tiny / "reference"},
    }
    runs = [
        {
            "recipe": f"full_finetune_{name}",
            "check_load": name in ("baseline", "verifiable"),
            "argv": recipe_args(tiny, tmp_path / name, f"{name}_tiny.toml", **{**common, **overrides}),
        }
        for name, overrides in extra.items()
    ]
    results, _ = run_worker({"guard": True, "runs": runs}, tmp_path)
    assert [r.get("bitwise_equal") for r in results[0]["runs"]] == [True, None, True, None]
    for name in extra:
        key = "value_loss" if name == "critic" else "loss"
        rows = [r for r in read_metrics(tmp_path / name) if key in r]
        assert [r["step"] for r in rows] == [1, 2, 3] and all(torch.isfinite(torch.tensor([r[key] for r in rows])))
        assert any(k.startswith("val/") for r in read_metrics(tmp_path / name) for k in r), name


def test_torchrun_with_one_process_joins_the_process_group(single, tiny, tmp_path):
    out = tmp_path / "one"
    proc = torchrun(
        "recipes/full_finetune_baseline.py",
        baseline_args(tiny, out, **{"training.micro_batch_size": 4, "checkpoint.save_every": 3}),
        nproc=1,
    )
    assert "[dist] FSDP2 over 1 rank(s)" in proc.stdout
    torch.testing.assert_close(losses(out), single, rtol=1e-5, atol=0)
    assert len(list((out / "checkpoints" / "step_000006").glob("*.distcp"))) == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_agents_on_loopback_match_one_process(single, tiny, tmp_path):
    """--nnodes=2 --nproc_per_node=1 with a c10d rendezvous: two "nodes" on 127.0.0.1."""
    out = tmp_path / "nodes"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "--rdzv-id=wmtp-test",
        "recipes/full_finetune_baseline.py",
        *baseline_args(tiny, out, **{"training.micro_batch_size": 2}),
    ]
    env = {**os.environ, **TEST_ENV, "OMP_NUM_THREADS": "1"}
    agents = [
        subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    logs = [agent.communicate(timeout=AGENT_TIMEOUT_S)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert any("[dist] FSDP2 over 2 rank(s)" in log for log in logs)
    torch.testing.assert_close(losses(out), single, rtol=1e-5, atol=0)


def test_hsdp_2x2_on_four_processes_matches_one_process(single, tiny, tmp_path):
    out = tmp_path / "hsdp"
    proc = torchrun(
        "recipes/full_finetune_baseline.py",
        baseline_args(
            tiny, out, **{"training.micro_batch_size": 1, "distributed.hsdp_replicas": 2, "checkpoint.save_every": 3}
        ),
        nproc=4,
    )
    assert "[dist] HSDP 2 replicas x 2 shards" in proc.stdout
    torch.testing.assert_close(losses(out), single, rtol=1e-5, atol=0)
    # Resume from the HSDP checkpoint at step 3 (the run folder as it was then) reproduces steps 4-6.
    resumed = tmp_path / "hsdp_resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "final")
    later = [c for c in (resumed / "checkpoints").iterdir() if c.name != "step_000003"]
    assert [c.name for c in later] == ["step_000006"]
    shutil.rmtree(later[0])
    proc = torchrun(
        "recipes/full_finetune_baseline.py",
        baseline_args(tiny, resumed, **{"training.micro_batch_size": 1, "distributed.hsdp_replicas": 2}),
        nproc=4,
    )
    assert "resumed from" in proc.stdout and "(step 3)" in proc.stdout
    assert losses(resumed).tolist() == losses(out).tolist()


def test_hsdp_replicas_must_divide_the_world_size(tiny, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "recipes/full_finetune_baseline.py",
        *baseline_args(tiny, tmp_path, **{"distributed.hsdp_replicas": 3}),
    ]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env={**os.environ, **TEST_ENV, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=AGENT_TIMEOUT_S,
    )
    assert proc.returncode != 0
    assert "distributed.hsdp_replicas (3) must be >= 1 and divide the world size (2)" in proc.stderr


def test_the_process_group_has_a_cpu_backend_beside_nccl(monkeypatch):
    from wmtp.distributed.env import launched_by_torchrun, process_group_backend

    assert process_group_backend(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    assert process_group_backend(torch.device("cpu")) == "gloo"
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "0")
    assert launched_by_torchrun()
    monkeypatch.delenv("MASTER_PORT")
    assert not launched_by_torchrun()
