"""Check the input files a config names before any heavy work (process group, model, data index).

A recipe calls it right after reading its config:

    cfg = main_config(BaselineConfig, argv)
    check_inputs_or_exit(cfg)     # "error: ..." on stderr and exit 2, like a config error

Whichever of these sections the config has are looked at (recipes compose different ones):
model.path, tokenizer.path, data.train_path, critic.value_head, critic.model, reference.path,
validation.path, eval.problems, eval.samples. Every problem is collected and reported at once, each
by its key and path ("model.path: no params.json in /x", "data.train_path: /y is empty"); a single
problem is one line. The checks are cheap: existence, emptiness, the expected files in a model
folder, a Hugging Face model's family and config (config.json: one not supported is named, with
what is), and the length of a safetensors file or a zip-format .pth against what its own header
says (a cut-short download), never a full read.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

from wmtp.config.loader import ConfigError
from wmtp.layout import (
    HEADS_FILENAME,
    HF_CONFIG,
    HF_SAFETENSORS_INDEX,
    PARAMS_FILENAME,
    RUN_CONFIG,
    SAFETENSORS_FILENAME,
    TOKENIZER_FILENAME,
    TOKENIZER_JSON,
)
from wmtp.logs import exit_with_error

_MAX_SAFETENSORS_HEADER = 100 << 20


class InputError(ConfigError):
    """One or more input files named in the config are missing, empty or cut short."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
            return
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} input file problems:\n{lines}")


def input_problems(cfg: Any) -> list[str]:
    """Every problem with the input files of `cfg` ("key: what is wrong with which path")."""
    problems: list[str] = []
    ev = getattr(cfg, "eval", None)
    scoring_only = bool(ev is not None and getattr(ev, "samples", ""))
    evaluating = ev is not None

    model = getattr(cfg, "model", None)
    if model is not None and not scoring_only:
        problems += _model_folder(
            "model.path", model.path, run_folder_ok=evaluating, n_future_tokens=getattr(model, "n_future_tokens", 0)
        )
    tokenizer = getattr(cfg, "tokenizer", None)
    if tokenizer is not None and not scoring_only:
        # Evaluation may leave it empty (the model folder's, or the training run's, is taken).
        problems += _tokenizer("tokenizer.path", tokenizer.path, required=not evaluating)
    data = getattr(cfg, "data", None)
    if data is not None:
        problems += _file("data.train_path", data.train_path, required=True)
    critic = getattr(cfg, "critic", None)
    if critic is not None:
        problems += _file("critic.value_head", critic.value_head or "", required=False, safetensors=True)
        if getattr(critic, "model", None):
            problems += _model_folder("critic.model", critic.model)
    reference = getattr(cfg, "reference", None)
    if reference is not None:
        problems += _reference("reference.path", reference.path, kind=getattr(reference, "kind", "auto"))
    validation = getattr(cfg, "validation", None)
    if validation is not None:
        problems += _file("validation.path", validation.path, required=False)
    if ev is not None:
        problems += _file("eval.problems", ev.problems, required=True)
        problems += _file("eval.samples", ev.samples, required=False)
    return problems


def check_inputs(cfg: Any) -> None:
    """Raise InputError listing every missing, empty or cut-short input file of `cfg`."""
    problems = input_problems(cfg)
    if problems:
        raise InputError(problems)


def check_inputs_or_exit(cfg: Any) -> None:
    """check_inputs for a recipe's entry point: `error: ...` on stderr (rank 0) and exit 2."""
    try:
        check_inputs(cfg)
    except InputError as exc:
        exit_with_error(str(exc))


# ---------------------------------------------------------------------------------------------
# Checks; each returns its problems


def _file(key: str, value: str | os.PathLike | None, *, required: bool, safetensors: bool = False) -> list[str]:
    if value is None or str(value) == "":
        return [f"{key}: not set"] if required else []
    path = Path(value)
    if not path.exists():
        return [f"{key}: {path} does not exist"]
    if path.is_dir():
        return [f"{key}: {path} is a folder, not a file"]
    return _nonempty_file(key, path, safetensors=safetensors)


def _nonempty_file(key: str, path: Path, *, safetensors: bool = False) -> list[str]:
    try:
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except OSError as exc:
        return [f"{key}: {path} cannot be read ({exc.strerror or exc})"]
    if size == 0:
        return [f"{key}: {path} is empty"]
    problem = (
        _safetensors_problem(path)
        if safetensors or path.suffix == ".safetensors"
        else (_zip_problem(path) if path.suffix in (".pth", ".pt", ".bin") else None)
    )
    return [f"{key}: {problem}"] if problem else []


def _folder(key: str, value: str | os.PathLike) -> tuple[Path | None, list[str]]:
    if str(value) == "":
        return None, [f"{key}: not set"]
    path = Path(value)
    if not path.exists():
        return None, [f"{key}: {path} does not exist"]
    if not path.is_dir():
        return None, [f"{key}: {path} is not a folder"]
    try:
        empty = next(path.iterdir(), None) is None
    except OSError as exc:
        return None, [f"{key}: {path} cannot be read ({exc.strerror or exc})"]
    if empty:
        return None, [f"{key}: {path} is empty"]
    return path, []


def _model_folder(key: str, value: str, *, run_folder_ok: bool = False, n_future_tokens: int = 0) -> list[str]:
    """A Meta-format MTP folder (params.json and model.safetensors or one consolidated.*.pth), or a
    Hugging Face one (config.json and safetensors) of a supported family."""
    path, problems = _folder(key, value)
    if path is None:
        return problems
    params = path / PARAMS_FILENAME
    if not params.is_file():
        if run_folder_ok and (path / RUN_CONFIG).is_file():
            return []  # a training run folder: its final/ or newest checkpoint is resolved later
        if (path / HF_CONFIG).is_file():
            return _hf_model_folder(key, path, n_future_tokens)
        return [
            f"{key}: no {PARAMS_FILENAME} in {path} (nor a Hugging Face {HF_CONFIG}"
            + (f", nor a training run's {RUN_CONFIG})" if run_folder_ok else ")")
        ]
    problems += _nonempty_file(key, params)
    if not problems:
        try:
            stored = json.loads(params.read_text()).get("n_future_tokens", 1)
        except (OSError, ValueError, AttributeError) as exc:
            problems.append(f"{key}: {params} is not valid JSON ({exc})")
        else:
            if n_future_tokens not in (0, stored):
                problems.append(
                    f"model.n_future_tokens: {params} has {stored} heads, the config asks {n_future_tokens} "
                    f"(only a Hugging Face model gets new heads; leave it 0)"
                )
    weights = (
        [path / SAFETENSORS_FILENAME]
        if (path / SAFETENSORS_FILENAME).is_file()
        else sorted(path.glob("consolidated.*.pth"))
    )
    if not weights:
        problems.append(f"{key}: no weights ({SAFETENSORS_FILENAME} or consolidated.*.pth) in {path}")
    for w in weights:
        problems += _nonempty_file(key, w)
    return problems


def _hf_model_folder(key: str, path: Path, n_future_tokens: int) -> list[str]:
    """A Hugging Face causal-LM folder: a supported family and config, n_future_tokens set (unless
    an exported folder holds its heads), and its safetensors (every shard its index names)."""
    from wmtp.models.hf import config_problems  # torch: only for a Hugging Face folder

    config_file = path / HF_CONFIG
    problems = _nonempty_file(key, config_file)
    if problems:
        return problems
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        return [f"{key}: {config_file} is not valid JSON ({exc})"]
    if not isinstance(config, dict):
        return [f"{key}: {config_file} is not a JSON object"]
    problems = [f"{key}: {config_file}: {p}" for p in config_problems(config)]
    if problems:
        return problems
    if n_future_tokens < 1 and not (path / HEADS_FILENAME).is_file():
        problems.append(f"model.n_future_tokens: set it (>= 1) for the Hugging Face model {path}: its MTP heads")
    index = path / HF_SAFETENSORS_INDEX
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return [*problems, f"{key}: {index} is not a safetensors index ({exc})"]
        weights = [path / name for name in files]
    elif (path / SAFETENSORS_FILENAME).is_file():
        weights = [path / SAFETENSORS_FILENAME]
    else:
        return [*problems, f"{key}: no {SAFETENSORS_FILENAME} or {HF_SAFETENSORS_INDEX} in {path}"]
    for w in weights:
        missing = [f"{key}: {w} (named in {index.name}) does not exist"]
        problems += _nonempty_file(key, w) if w.is_file() else missing
    return problems


def _tokenizer(key: str, value: str, *, required: bool) -> list[str]:
    if str(value) == "":
        return [f"{key}: not set"] if required else []
    path = Path(value)
    if path.is_dir():
        found = next((path / n for n in (TOKENIZER_FILENAME, TOKENIZER_JSON) if (path / n).is_file()), None)
        if found is None:
            return [f"{key}: no {TOKENIZER_FILENAME} in {path} (nor a {TOKENIZER_JSON})"]
        path = found
    return _file(key, path, required=True)


def _reference(key: str, value: str, *, kind: str) -> list[str]:
    """The Rho-1 reference: an MTP folder (params.json) or a Hugging Face one (config.json + weights)."""
    path, problems = _folder(key, value)
    if path is None:
        return problems
    if kind == "mtp" or (kind == "auto" and (path / PARAMS_FILENAME).is_file()):
        return _model_folder(key, value)
    config = path / "config.json"
    if not config.is_file():
        return [f"{key}: no config.json (Hugging Face) or {PARAMS_FILENAME} (MTP) in {path}"]
    problems += _nonempty_file(key, config)
    weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("pytorch_model*.bin"))
    if not weights:
        problems.append(f"{key}: no weights (*.safetensors or pytorch_model*.bin) in {path}")
    for w in weights:
        problems += _nonempty_file(key, w)
    return problems


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file shorter than its header says (or without a readable header)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path} is truncated ({size} bytes: not even a safetensors header)"
            n = int.from_bytes(head, "little")
            if n > _MAX_SAFETENSORS_HEADER or 8 + n > size:
                return f"{path} is truncated or not a safetensors file (header of {n} bytes, file of {size})"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as exc:
        return f"{path} is not a readable safetensors file ({exc})"
    if not isinstance(header, dict):
        return f"{path} is not a safetensors file (its header is not a table)"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return f"{path} is not a safetensors file (malformed header)"
    if 8 + n + end > size:
        return f"{path} is truncated ({size} bytes, its tensors need {8 + n + end})"
    return None


def _zip_problem(path: Path) -> str | None:
    """A zip-format torch file (torch.save's default) cut short: its central directory is missing."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror or exc})"
    if magic == b"PK\x03\x04" and not zipfile.is_zipfile(path):
        return f"{path} is truncated (its zip directory is missing)"
    return None
