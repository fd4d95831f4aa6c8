"""The config loader: defaults < file < command line, typed values, precise errors, --dry-run/--help."""

# String annotations on purpose: the loader must resolve them with typing.get_type_hints.
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from wmtp.config.loader import (
    ConfigError,
    config_to_dict,
    field_docs,
    flatten,
    main_config,
    parse_config,
    to_toml,
)


@dataclasses.dataclass
class ModelSection:
    name: str = "tiny"
    """Model name."""
    dim: int = 64
    """Hidden size."""


@dataclasses.dataclass(frozen=True)
class TrainSection:
    lr: float = 1e-3
    """Peak learning rate.

    Decays to zero."""
    steps: int = 10
    """Optimizer steps."""
    compile: bool = False
    """torch.compile the model."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Compute dtype."""
    stop_at: int | None = None
    """Stop early after this step."""
    clip: float | None = 1.0
    """Gradient clipping norm (none: no clipping)."""
    run_name: str | None = None
    """Run name."""
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    edges: list[int] = dataclasses.field(default_factory=lambda: [0, 5])
    """Bin edges."""
    tags: list[str] = dataclasses.field(default_factory=list)
    """Free-form tags."""
    schedule: list[list[float]] = dataclasses.field(default_factory=lambda: [[0.0, 1.0], [1.0, 0.5]])
    """Rows [progress, weight]."""
    phases: list[tuple[float, list[float]]] = dataclasses.field(default_factory=lambda: [(0.0, [1.0, 0.0])])
    """(progress, weights) pairs."""


@dataclasses.dataclass
class CheckedSection:
    low: int = 0
    """Lower bound."""
    high: int = 1
    """Upper bound."""

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) > high ({self.high})")


@dataclasses.dataclass(frozen=True)
class Cfg:
    model: ModelSection = dataclasses.field(default_factory=lambda: ModelSection(dim=128))
    """The network."""
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    bounds: CheckedSection = dataclasses.field(default_factory=CheckedSection)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return str(path)


def error_of(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(Cfg, argv)
    return str(info.value)


def test_defaults_include_the_recipes_own_section_defaults():
    cfg = parse_config(Cfg, [])
    assert cfg == Cfg()
    assert cfg.model.dim == 128  # from Cfg's default_factory, not ModelSection's default


def test_file_overrides_defaults_and_cli_overrides_file(tmp_path):
    path = write(tmp_path, '[model]\nname = "from_file"\ndim = 32\n[train]\nlr = 0.5\nsteps = 7\n')
    cfg = parse_config(Cfg, ["--config", path, "--train.lr", "0.25", "--model.dim=16"])
    assert (cfg.model.name, cfg.model.dim, cfg.train.lr, cfg.train.steps) == ("from_file", 16, 0.25, 7)
    assert cfg.train.compile is False  # untouched: default


@pytest.mark.parametrize("form", ["space", "equals"])
@pytest.mark.parametrize(
    "key, raw, expected",
    [
        ("lr", "2e-5", 2e-5),
        ("lr", "3", 3.0),
        ("steps", "-4", -4),
        ("compile", "true", True),
        ("compile", "YES", True),
        ("compile", "1", True),
        ("compile", "false", False),
        ("compile", "no", False),
        ("compile", "0", False),
        ("precision", "bf16", "bf16"),
        ("stop_at", "12", 12),
        ("stop_at", "none", None),
        ("clip", "null", None),
        ("clip", "0.5", 0.5),
        ("run_name", "a b=c", "a b=c"),
        ("run_name", "None", None),
        ("betas", "[0.8, 1]", [0.8, 1.0]),
        ("edges", "[1, 2, 3]", [1, 2, 3]),
        ("tags", '["x", "y"]', ["x", "y"]),
        ("tags", "[]", []),
        ("schedule", "[[0, 1.0], [0.5, 0.25]]", [[0.0, 1.0], [0.5, 0.25]]),
        ("phases", "[[0, [1, 0]], [0.5, [0.5, 0.5]]]", [(0.0, [1.0, 0.0]), (0.5, [0.5, 0.5])]),
    ],
)
def test_cli_values_are_parsed_by_field_type(form, key, raw, expected):
    argv = [f"--train.{key}", raw] if form == "space" else [f"--train.{key}={raw}"]
    value = getattr(parse_config(Cfg, argv).train, key)
    assert value == expected and type(value) is type(expected)
    if key == "phases":
        assert all(type(p) is tuple and type(p[0]) is float for p in value)


def test_str_fields_take_values_verbatim_even_if_they_look_like_other_types():
    cfg = parse_config(Cfg, ["--model.name", "none", "--train.tags", '["1"]', "--model.dim", "8"])
    assert cfg.model.name == "none" and cfg.train.tags == ["1"]
    assert parse_config(Cfg, ["--model.name=--odd"]).model.name == "--odd"


def test_file_values_of_every_type(tmp_path):
    path = write(
        tmp_path,
        """
[train]
lr = 1              # an int is fine for a float field
steps = 3
compile = true
precision = "bf16"
stop_at = 5
clip = "none"       # TOML has no null
run_name = "r1"
betas = [0.5, 1]
edges = [2, 4, 8]
tags = ["a", "b"]
schedule = [[0.0, 1], [1, 0.0]]
phases = [[0, [1, 2]], [1.0, []]]
""",
    )
    train = parse_config(Cfg, ["--config", path]).train
    assert train == TrainSection(
        lr=1.0,
        steps=3,
        compile=True,
        precision="bf16",
        stop_at=5,
        clip=None,
        run_name="r1",
        betas=[0.5, 1.0],
        edges=[2, 4, 8],
        tags=["a", "b"],
        schedule=[[0.0, 1.0], [1.0, 0.0]],
        phases=[(0.0, [1.0, 2.0]), (1.0, [])],
    )
    assert type(train.lr) is float and type(train.schedule[0][1]) is float


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[trian]\nlr = 1.0\n", "unknown section 'trian'; did you mean 'train'?"),
        ("[train]\nlrr = 1.0\n", "unknown key 'train.lrr'; did you mean 'train.lr'?"),
        ("[model]\nlr = 1.0\n", "unknown key 'model.lr'; did you mean 'train.lr'?"),
        ("train = 3\n", "train: expected a table [train], got 3 (integer)"),
        ('[train]\nlr = "fast"\n', 'train.lr: expected float, got "fast" (string)'),
        ("[train]\nsteps = 1.5\n", "train.steps: expected int, got 1.5 (float)"),
        ("[train]\nsteps = true\n", "train.steps: expected int, got true (boolean)"),
        ("[train]\ncompile = 1\n", "train.compile: expected bool, got 1 (integer)"),
        ("[train]\nstop_at = 1.0\n", "train.stop_at: expected int | None, got 1.0 (float)"),
        ('[train]\nprecision = "fp16"\n', 'train.precision: expected "fp32" | "bf16", got "fp16" (string)'),
        ("[train]\nbetas = 0.9\n", "train.betas: expected list[float], got 0.9 (float)"),
        ('[train]\nedges = [1, "2"]\n', 'train.edges[1]: expected int, got "2" (string)'),
        ('[train]\nschedule = [[0.0, 1.0], [1.0, "x"]]\n', 'train.schedule[1][1]: expected float, got "x" (string)'),
        ("[train]\nphases = [[0.0]]\n", "train.phases[0]: expected tuple[float, list[float]], got [0.0] (array)"),
        ("[train]\nrun_name = 1979-05-27\n", "train.run_name: expected str | None, got 1979-05-27 (date)"),
    ],
)
def test_file_errors_name_the_file_key_type_and_value(tmp_path, text, expected):
    path = write(tmp_path, text)
    assert error_of(["--config", path]) == f"{path}: {expected}"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--trian.lr", "1"], "unknown section 'trian'; did you mean 'train'?"),
        (["--train.lrr", "1"], "unknown key 'train.lrr'; did you mean 'train.lr'?"),
        (["--model.steps=1"], "unknown key 'model.steps'; did you mean 'train.steps'?"),
        (["--train.lr", "fast"], "train.lr: expected float, got 'fast'"),
        (["--train.steps", "1.5"], "train.steps: expected int, got '1.5'"),
        (["--train.compile", "maybe"], "train.compile: expected bool (true/false/1/0/yes/no), got 'maybe'"),
        (["--train.clip", "off"], "train.clip: expected float | None, got 'off'"),
        (["--train.precision", "fp16"], 'train.precision: expected "fp32" | "bf16", got \'fp16\''),
        (["--train.edges", "[1, 2"], "train.edges: expected list[int] (a TOML array such as [1, 2]), got '[1, 2'"),
        (["--train.edges", "3"], "train.edges: expected list[int] (a TOML array such as [1, 2]), got '3'"),
        (["--train.edges", "[1, 2.5]"], "train.edges[1]: expected int, got 2.5 (float)"),
        (["--train.schedule", "[[0, true]]"], "train.schedule[0][1]: expected float, got true (boolean)"),
        (["--train.lr"], "--train.lr expects a value"),
        (["--train.lr", "--dry-run"], "--train.lr expects a value"),
        (["--config"], "--config expects a value"),
        (["--config", "a.toml", "--config", "b.toml"], "--config given twice ('a.toml', 'b.toml')"),
        (["run.toml"], "unexpected argument 'run.toml'"),
        (["--lr", "1"], "unknown option '--lr'"),
    ],
)
def test_cli_errors_name_the_command_line_key_type_and_value(argv, expected):
    message = error_of(argv)
    assert message.startswith(f"command line: {expected}"), message


def test_malformed_toml_names_the_file_and_line(tmp_path):
    path = write(tmp_path, "[train]\nlr = 1.0\nsteps = = 3\n")
    message = error_of(["--config", path])
    assert message.startswith(f"{path}: invalid TOML") and "line 3" in message


def test_missing_file(tmp_path):
    path = str(tmp_path / "absent.toml")
    assert error_of(["--config", path]) == f"{path}: config file not found"


def test_section_validation_becomes_a_config_error():
    assert error_of(["--bounds.low", "5"]) == "[bounds]: low (5) > high (1)"


def test_dry_run_prints_a_toml_that_round_trips(tmp_path, capsys):
    argv = [
        "--train.clip",
        "none",
        "--train.run_name",
        'say "hi"\\\n\tbye é',
        "--train.lr",
        "1e-16",
        "--train.phases",
        "[[0.5, [1, 2]]]",
    ]
    expected = parse_config(Cfg, argv)
    with pytest.raises(SystemExit) as info:
        parse_config(Cfg, [*argv, "--dry-run"])
    assert info.value.code == 0
    out = capsys.readouterr().out

    none_as_text = {
        s: {k: "none" if v is None else v for k, v in kv.items()} for s, kv in config_to_dict(expected).items()
    }
    assert tomllib.loads(out) == none_as_text
    assert "# Peak learning rate.\n#\n# Decays to zero.\nlr = 1e-16\n" in out
    assert "# The network.\n[model]\n# Model name.\nname = " in out
    assert parse_config(Cfg, ["--config", write(tmp_path, out)]) == expected


def test_to_toml_without_docs_has_no_comments():
    text = to_toml(Cfg(), with_docs=False)
    assert "#" not in text and tomllib.loads(text)["model"] == {"name": "tiny", "dim": 128}


def test_help_lists_fields_with_type_default_and_doc(capsys):
    with pytest.raises(SystemExit) as info:
        parse_config(Cfg, ["--train.lr", "bad", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "[train]\n  --train.lr  float = 0.001\n      Peak learning rate.\n" in out
    assert '--train.precision  "fp32" | "bf16" = "fp32"' in out
    assert "--train.phases  list[tuple[float, list[float]]] = [[0.0, [1.0, 0.0]]]" in out


def test_main_config_exits_2_with_the_message_on_stderr(capsys):
    with pytest.raises(SystemExit) as info:
        main_config(Cfg, ["--train.lrr", "1"])
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: command line: unknown key 'train.lrr'; did you mean 'train.lr'?\n"
    assert main_config(Cfg, ["--train.steps", "2"]).train.steps == 2


def test_field_docs_reads_attribute_docstrings_including_inherited_ones():
    @dataclasses.dataclass
    class Child(ModelSection):
        extra: int = 0
        """Added by the subclass."""
        undocumented: int = 0

    assert field_docs(Child) == {"name": "Model name.", "dim": "Hidden size.", "extra": "Added by the subclass."}
    assert field_docs(TrainSection)["lr"] == "Peak learning rate.\n\nDecays to zero."


def test_config_to_dict_and_flatten():
    d = config_to_dict(Cfg())
    assert d["model"] == {"name": "tiny", "dim": 128}
    assert d["train"]["phases"] == [[0.0, [1.0, 0.0]]]  # tuples become lists
    flat = flatten(d)
    assert flat["train.lr"] == 1e-3 and flat["train.stop_at"] is None and flat["bounds.high"] == 1
    assert len(flat) == sum(len(v) for v in d.values())
