"""Damaged checkpoints and failed saves (issue #10, item 5), on real tiny runs and real file systems.

One baseline run of 6 steps saves step 2, 4 and 6; each case copies that run folder, damages its
checkpoints the way storage faults and partial copies do, and resumes it in-process. A resume must
name the damaged checkpoint and why on stderr, move it aside (`step_N.damaged`, never deleted),
resume from the next newest one and reproduce the uninterrupted run's losses exactly (CPU fp32).

Disk full: a real 8 MiB tmpfs filled up, when this process may mount one (root; skipped otherwise),
and, wherever there is a /dev/full, writes redirected to it (a real ENOSPC from the kernel).
The torchrun case (two ranks agreeing on a fallback) takes about half of this file's time.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.conftest import load_recipe, recipe_args, torchrun
from wmtp.atomic import WriteError, atomic_write_text
from wmtp.models.args import ModelArgs
from wmtp.models.checkpoint import save_mtp
from wmtp.training.checkpointer import (
    DAMAGED_NOTE,
    Checkpointer,
    CheckpointMismatchError,
    CheckpointSaveError,
    DamagedCheckpoint,
    NoLoadableCheckpointError,
    check_shard_files,
    read_trainer_state,
)
from wmtp.training.metrics import read_metrics

pytestmark = pytest.mark.slow

RUN = {
    "training.max_steps": 6,
    "training.micro_batch_size": 2,
    "checkpoint.save_every": 2,
    "checkpoint.keep_last": 0,
    "checkpoint.export_final": "false",
}
SHARD = "__0_0.distcp"


def assert_short(message: str, *paths: Path) -> None:
    """A report stays readable: without the paths it names, under 250 characters."""
    for path in sorted(map(str, paths), key=len, reverse=True):
        message = message.replace(path, "<path>")
    assert len(message) < 250, message


def step_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step_{step:06d}"


def train(tiny: Path, out: Path) -> dict[int, float]:
    load_recipe("full_finetune_baseline").main(recipe_args(tiny, out, "baseline_tiny.toml", **RUN))
    return {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """The uninterrupted run: its folder (checkpoints at steps 2, 4, 6) and its loss per step."""
    out = tmp_path_factory.mktemp("damaged") / "run"
    losses = train(tiny, out)
    assert sorted(losses) == list(range(1, 7))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step_00000{s}" for s in (2, 4, 6)]
    return out, losses


def copy_run(trained, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained[0], out)
    return out


def truncate(path: Path, keep: float = 0.5) -> None:
    os.truncate(path, int(path.stat().st_size * keep))


def corrupt_stored_object(ckpt: Path) -> None:
    """Overwrite the bytes of one pickled (non-tensor) item in place: the lengths stay right, so only
    DCP's read itself can find it."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(ckpt)).read_metadata()
    info = next(v for k, v in metadata.storage_data.items() if k.fqn == "optim.param_groups.0.lr")
    with open(ckpt / info.relative_path, "r+b") as f:
        f.seek(info.offset)
        f.write(b"\xff" * info.length)


DAMAGES = {
    # name: (damage one checkpoint folder, the reason the report gives)
    "shard deleted": (lambda d: (d / SHARD).unlink(), f"shard {SHARD} is missing"),
    "shard truncated": (lambda d: truncate(d / SHARD), f"shard {SHARD} is truncated ("),
    "metadata deleted": (lambda d: (d / ".metadata").unlink(), ".metadata is missing"),
    "metadata truncated": (lambda d: truncate(d / ".metadata"), ".metadata does not load ("),
    "trainer_state truncated": (lambda d: truncate(d / "trainer_state.json"), "trainer_state.json is not valid JSON"),
    "stored object corrupted": (corrupt_stored_object, "DCP read failed"),
}


def assert_reported_and_moved(err: str, ckpt: Path, reason: str, fallback: Path | None) -> None:
    line = next((ln for ln in err.splitlines() if ln.startswith(f"[checkpoint] {ckpt} does not load: ")), None)
    assert line is not None, err
    assert reason in line and f"moved aside to {ckpt.name}.damaged" in line
    if fallback is not None:
        assert line.endswith(f"; falling back to {fallback}")
    assert_short(line, ckpt, *([fallback] if fallback else []))
    moved = ckpt.with_name(ckpt.name + ".damaged")
    assert moved.is_dir() and reason in (moved / DAMAGED_NOTE).read_text()


@pytest.mark.parametrize("case", list(DAMAGES))
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one_exactly(case, trained, tiny, tmp_path, capsys):
    out = copy_run(trained, tmp_path)
    damage, reason = DAMAGES[case]
    newest = step_dir(out, 6)
    damage(newest)
    kept = sorted(p.name for p in newest.iterdir())
    losses = train(tiny, out)
    captured = capsys.readouterr()

    assert_reported_and_moved(captured.err, newest, reason, step_dir(out, 4))
    assert f"[checkpoint] resumed from {step_dir(out, 4)} (step 4)" in captured.out
    # Moved aside as it was (plus the note), not deleted; the resumed run saved a new, good step 6.
    assert sorted(p.name for p in newest.with_name("step_000006.damaged").iterdir()) == sorted(kept + [DAMAGED_NOTE])
    read_trainer_state(newest)
    check_shard_files(newest)
    assert losses == trained[1]  # steps 1-4 from before, 5-6 trained again: bit-identical


def test_two_damaged_checkpoints_fall_back_two_steps(trained, tiny, tmp_path, capsys):
    out = copy_run(trained, tmp_path)
    (step_dir(out, 6) / SHARD).unlink()
    truncate(step_dir(out, 4) / "trainer_state.json", 0.3)
    losses = train(tiny, out)
    captured = capsys.readouterr()
    assert_reported_and_moved(captured.err, step_dir(out, 6), f"shard {SHARD} is missing", step_dir(out, 4))
    assert_reported_and_moved(captured.err, step_dir(out, 4), "trainer_state.json is not valid JSON", step_dir(out, 2))
    assert f"resumed from {step_dir(out, 2)} (step 2)" in captured.out
    assert losses == trained[1]


def test_every_checkpoint_damaged_is_an_error_not_a_start_from_step_0(trained, tiny, tmp_path, capsys):
    out = copy_run(trained, tmp_path)
    before = (out / "metrics.jsonl").read_text()
    for step in (2, 4, 6):
        truncate(step_dir(out, step) / SHARD)
    with pytest.raises(NoLoadableCheckpointError) as info:
        train(tiny, out)
    message = str(info.value)
    assert f"no checkpoint in {out / 'checkpoints'} loads" in message
    for step in (2, 4, 6):
        assert f"step_00000{step} (shard {SHARD} is truncated" in message
    err = capsys.readouterr().err
    assert_reported_and_moved(err, step_dir(out, 2), f"shard {SHARD} is truncated", None)
    assert "falling back" not in err.splitlines()[-1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step_00000{s}.damaged" for s in (2, 4, 6)]
    assert (out / "metrics.jsonl").read_text() == before  # nothing trained, nothing logged


def test_a_second_damaged_copy_of_a_step_is_moved_beside_the_first(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=0, is_main=True)
    for n, name in enumerate(("step_000004.damaged", "step_000004.damaged-2"), 1):
        ckpt.path_of(4).mkdir(parents=True)
        (ckpt.path_of(4) / "trainer_state.json").write_text("{")
        assert ckpt.complete_steps() == [4]
        assert ckpt.move_aside(ckpt.path_of(4), f"reason {n}") == ckpt.root / name
    assert (ckpt.root / "step_000004.damaged-2" / DAMAGED_NOTE).read_text() == "step_000004 did not load: reason 2\n"
    assert ckpt.complete_steps() == []


def test_trainer_state_checks_name_the_problem(tmp_path):
    ckpt = tmp_path / "step_000004"
    ckpt.mkdir()
    cases = {
        "[1, 2]": "holds a list, not an object",
        '{"step": 4}': "lacks 'loader'",
        '{"step": 5, "loader": {}}': "says step 5, the folder is step 4",
    }
    for text, reason in cases.items():
        (ckpt / "trainer_state.json").write_text(text)
        with pytest.raises(DamagedCheckpoint, match=reason):
            read_trainer_state(ckpt, ("step", "loader"))
    (ckpt / "trainer_state.json").unlink()
    with pytest.raises(DamagedCheckpoint, match="trainer_state.json is missing"):
        read_trainer_state(ckpt)


# ---------------------------------------------------------------------------------------------
# Disk full


class Tiny(nn.Module):
    """Big enough that a checkpoint (weights + two AdamW moments) needs ~1.5 MiB."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(256, 256), nn.Linear(256, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def trained_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    torch.manual_seed(seed)
    model(torch.randn(4, 256)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def fresh(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Tiny()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str):
    where.mkdir()
    try:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs to fill ({exc}); the /dev/full test covers ENOSPC")
    if proc.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs to fill (needs root: {proc.stderr.strip()}); the /dev/full test covers ENOSPC"
        )
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def fill(folder: Path) -> None:
    """Fill the file system of `folder` up to its last byte."""
    with contextlib.suppress(OSError), open(folder / "filler", "wb", buffering=0) as f:
        for chunk in (1 << 16, 1 << 9, 1):
            with contextlib.suppress(OSError):
                while f.write(b"\0" * chunk):
                    pass


def assert_save_failed_cleanly(exc: CheckpointSaveError, ckpt: Checkpointer, step: int) -> None:
    message = str(exc)
    tmp = ckpt.path_of(step).with_name(ckpt.path_of(step).name + ".tmp")
    assert exc.errno == errno.ENOSPC
    assert f"checkpoint step {step}: no space left on device at {tmp}" in message, message
    assert f"nothing was saved ({tmp.name} removed)" in message
    assert "the newest complete checkpoint is step_000001." in message
    assert "unexpected pos" not in message
    assert_short(message, ckpt.root / tmp.name / SHARD, tmp)
    assert sorted(p.name for p in ckpt.root.iterdir()) == ["step_000001"]
    assert ckpt.complete_steps() == [1]


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {
        **{k: v.clone() for k, v in model.state_dict().items()},
        "exp_avg": opt.state_dict()["state"][0]["exp_avg"].clone(),
    }


def assert_loads(ckpt: Checkpointer, saved: dict[str, torch.Tensor]) -> None:
    """The newest checkpoint is step 1, and it restores a fresh model and optimizer exactly."""
    model, opt = fresh(seed=1)
    path, state = ckpt.load_latest(model, opt)
    assert path == ckpt.path_of(1) and state == {"step": 1, "note": "x"}
    assert snapshot(model, opt).keys() == saved.keys()
    for k, v in snapshot(model, opt).items():
        assert torch.equal(v, saved[k]), k


def saved_once(root: Path) -> tuple[Checkpointer, nn.Module, torch.optim.Optimizer, dict[str, torch.Tensor]]:
    """A checkpointer in `root` with step 1 saved; the model trained one step further."""
    ckpt = Checkpointer(root, keep_last=2, is_main=True)
    model, opt = fresh()
    trained_step(model, opt, 0)
    ckpt.save(1, model, opt, {"note": "x"})
    saved = snapshot(model, opt)
    trained_step(model, opt, 1)
    return ckpt, model, opt, saved


def test_checkpoint_save_on_a_full_tmpfs_names_the_path_and_keeps_the_previous_one(tmp_path):
    with small_tmpfs(tmp_path / "disk", "8m") as disk:
        ckpt, model, opt, saved = saved_once(disk / "run")
        fill(disk)
        with pytest.raises(CheckpointSaveError) as info:
            ckpt.save(2, model, opt, {"note": "y"})
        assert_save_failed_cleanly(info.value, ckpt, 2)
        assert "(0 B free)" in str(info.value) or "KiB free)" in str(info.value)  # the real free space
        assert_loads(ckpt, saved)
        # On the same full disk, atomic_write_text and the final export (save_mtp) name the path.
        target = disk / "run" / "notes.txt"
        with pytest.raises(WriteError) as info:
            atomic_write_text(target, "x" * 100_000)
        assert str(info.value).startswith(f"writing notes.txt: no space left on device at {target}")
        assert info.value.errno == errno.ENOSPC and not target.with_name("notes.txt.tmp").exists()
        final = disk / "run" / "final"
        with pytest.raises(WriteError) as info:
            save_mtp(final, ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=256), {"w": torch.zeros(512, 512)})
        message = str(info.value)
        assert message.startswith(f"writing {final}: no space left on device at {final}.tmp"), message
        assert info.value.errno == errno.ENOSPC
        assert_short(message, final.with_name("final.tmp"), final)
        assert not final.exists() and not final.with_name("final.tmp").exists()


@pytest.fixture
def dev_full():
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system (the tmpfs test covers ENOSPC)")
    return Path("/dev/full")


def redirect_writes(suffix: str, dev_full: Path):
    """Path.open that opens /dev/full instead of any `*suffix` file opened for writing."""
    real_open = Path.open

    def open_(self, mode="r", *args, **kwargs):
        return real_open(dev_full if self.name.endswith(suffix) and "w" in mode else self, mode, *args, **kwargs)

    return open_


def test_save_mtp_hitting_enospc_names_the_export_and_leaves_nothing(tmp_path, dev_full, monkeypatch):
    final = tmp_path / "final"
    monkeypatch.setattr(Path, "open", redirect_writes("params.json", dev_full))
    with pytest.raises(WriteError) as info:
        save_mtp(final, ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=256), {"w": torch.zeros(4)})
    assert str(info.value).startswith(f"writing {final}: no space left on device at {final}.tmp"), info.value
    assert info.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []


def test_checkpoint_save_hitting_enospc_in_a_shard_write(tmp_path, dev_full, monkeypatch):
    """Every DCP shard opened for writing is /dev/full: the kernel answers ENOSPC (the zip and
    buffered writers above it lose the errno; the report still says it)."""
    ckpt, model, opt, saved = saved_once(tmp_path / "run")
    monkeypatch.setattr(Path, "open", redirect_writes(".distcp", dev_full))
    with pytest.raises(CheckpointSaveError) as info:
        ckpt.save(2, model, opt, {"note": "y"})
    monkeypatch.undo()
    assert f"no space left on device at {ckpt.root}/step_000002.tmp/{SHARD}" in str(info.value)
    assert_save_failed_cleanly(info.value, ckpt, 2)
    assert_loads(ckpt, saved)


def test_atomic_write_text_hitting_enospc_names_the_path(tmp_path, dev_full):
    target = tmp_path / "state.json"
    target.write_text("old")
    # The temporary file is a link to /dev/full: the real write fails with ENOSPC.
    (tmp_path / "state.json.tmp").symlink_to(dev_full)
    with pytest.raises(WriteError) as info:
        atomic_write_text(target, json.dumps({"x": "y" * 10_000}))
    assert str(info.value).startswith(f"writing state.json: no space left on device at {target}")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_text() == "old" and not (tmp_path / "state.json.tmp").exists()


def test_checkpointer_save_failure_before_dcp_is_reported_too(tmp_path):
    """A run folder that cannot be written (a file where the checkpoints folder should be)."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("not a folder")
    model, opt = fresh()
    with pytest.raises(CheckpointSaveError) as info:
        Checkpointer(tmp_path / "run", keep_last=1, is_main=True).save(1, model, opt, {})
    assert "checkpoint step 1: " in str(info.value) and "step_000001.tmp" in str(info.value)
    assert_short(str(info.value), tmp_path / "run" / "checkpoints" / "step_000001.tmp")


def test_a_checkpoint_of_another_model_is_an_error_and_left_in_place(tmp_path):
    """Not damage: a changed config. Moving it aside (or falling back) would hide the mistake."""
    ckpt, *_ = saved_once(tmp_path / "run")
    other = nn.Sequential(nn.Linear(256, 128))
    with pytest.raises(
        CheckpointMismatchError,
        match=r"step_000001 does not fit this model/optimizer \(was the "
        r"config changed\?\): .*; it was left in place",
    ):
        ckpt.load_latest(other, torch.optim.AdamW(other.parameters()))
    assert ckpt.complete_steps() == [1]


def test_under_torchrun_all_ranks_fall_back_together(tiny, tmp_path):
    """Two ranks (FSDP2, a shard file each): rank 1's shard of the newest checkpoint is cut short;
    both ranks report, agree and resume from the previous checkpoint, reproducing the losses."""
    out = tmp_path / "fsdp"
    args = recipe_args(
        tiny, out, "baseline_tiny.toml", **{**RUN, "training.max_steps": 4, "training.micro_batch_size": 1}
    )
    torchrun("recipes/full_finetune_baseline.py", args)
    first = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    newest = step_dir(out, 4)
    assert sorted(p.name for p in newest.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    truncate(newest / "__1_0.distcp")
    proc = torchrun("recipes/full_finetune_baseline.py", args)
    assert_reported_and_moved(proc.stderr, newest, "shard __1_0.distcp is truncated (", step_dir(out, 2))
    assert proc.stderr.count("does not load") == 1  # reported once (rank 0), not once per rank
    assert f"resumed from {step_dir(out, 2)} (step 2)" in proc.stdout
    assert {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r} == first
