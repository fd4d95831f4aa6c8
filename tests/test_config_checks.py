"""Config range checks and input file checks (issue #10, item 6), through the real config loader.

Every numeric field with a range (its docstring in wmtp/config/sections.py says which) is tried just
outside it (refused, `[section]: section.key must be ..., got ...`) and at its boundary (accepted),
from the command line and from a TOML file. The input checks are tried on real artifacts damaged
the usual ways (missing, empty, cut short).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest
import tomllib

from tests.conftest import load_recipe, recipe_args
from wmtp.config.inputs import InputError, check_inputs, check_inputs_or_exit, input_problems
from wmtp.config.loader import ConfigError, parse_config
from wmtp.config.sections import (
    CheckpointConfig,
    CriticConfig,
    DataConfig,
    DistributedConfig,
    EvalConfig,
    LRSchedulerConfig,
    MetricsConfig,
    ModelConfig,
    OptimizerConfig,
    ReferenceConfig,
    Rho1Config,
    S3Config,
    TDConfig,
    TokenizerConfig,
    TrainingConfig,
    ValidationConfig,
)


@dataclasses.dataclass
class AllSections:
    """Every section the recipes compose, in one config (the loader treats each the same way)."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    lr_scheduler: LRSchedulerConfig = dataclasses.field(default_factory=LRSchedulerConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    s3: S3Config = dataclasses.field(default_factory=S3Config)
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    critic: CriticConfig = dataclasses.field(default_factory=CriticConfig)
    td: TDConfig = dataclasses.field(default_factory=TDConfig)
    rho1: Rho1Config = dataclasses.field(default_factory=Rho1Config)
    reference: ReferenceConfig = dataclasses.field(default_factory=ReferenceConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)


# (section.key, value just outside its range, value at the boundary (or just inside an open end),
#  the message's requirement); values are TOML literals. Two-sided ranges have a row per end.
RANGES = [
    ("model.max_seq_len", "1", "2", "must be >= 2, got 1"),
    ("model.n_future_tokens", "-1", "0", "must be >= 0, got -1"),
    ("data.seed", "-1", "0", "must be >= 0, got -1"),
    ("data.micro_batch_tokens", "-1", "0", "must be >= 0, got -1"),
    ("training.micro_batch_size", "0", "1", "must be >= 1, got 0"),
    ("training.grad_accum_steps", "0", "1", "must be >= 1, got 0"),
    ("training.max_steps", "0", "1", "must be >= 1, got 0"),
    ("training.log_every", "0", "1", "must be >= 1, got 0"),
    ("training.stop_at_step", "0", "1", "must be >= 1 or none, got 0"),
    ("training.max_grad_norm", "0.0", "1e-9", "must be > 0 or none, got 0.0"),
    ("optimizer.lr", "0.0", "1e-12", "must be > 0, got 0.0"),
    ("optimizer.lr", "-0.001", "1e-12", "must be > 0, got -0.001"),
    ("optimizer.betas", "[-0.1, 0.9]", "[0.0, 0.9]", "optimizer.betas[0] must be in [0, 1), got -0.1"),
    ("optimizer.betas", "[0.9, 1.0]", "[0.9, 0.999999]", "optimizer.betas[1] must be in [0, 1), got 1.0"),
    ("optimizer.betas", "[0.9]", "[0.9, 0.95]", "must be two numbers [beta1, beta2], got [0.9]"),
    ("optimizer.eps", "0.0", "1e-30", "must be > 0, got 0.0"),
    ("optimizer.weight_decay", "-1e-9", "0.0", "must be >= 0, got -1e-09"),
    ("lr_scheduler.warmup_steps", "-1", "0", "must be >= 0, got -1"),
    ("lr_scheduler.min_lr_ratio", "-0.01", "0.0", "must be in [0, 1], got -0.01"),
    ("lr_scheduler.min_lr_ratio", "1.01", "1.0", "must be in [0, 1], got 1.01"),
    ("checkpoint.save_every", "-1", "0", "must be >= 0, got -1"),
    ("checkpoint.keep_last", "-1", "0", "must be >= 0, got -1"),
    ("distributed.ac_every_n", "0", "1", "must be >= 1, got 0"),
    ("distributed.hsdp_replicas", "0", "1", "must be >= 1, got 0"),
    ("s3.keep_last", "0", "1", "must be >= 1, got 0"),
    ("s3.max_retries", "0", "1", "must be >= 1, got 0"),
    ("s3.wait_s", "-0.5", "0.0", "must be >= 0, got -0.5"),
    ("validation.every", "-1", "0", "must be >= 0, got -1"),
    ("validation.max_rows", "-1", "0", "must be >= 0, got -1"),
    ("critic.lam", "-0.01", "0.0", "must be in [0, 1], got -0.01"),
    ("critic.lam", "1.01", "1.0", "must be in [0, 1], got 1.01"),
    ("critic.huber_delta", "0.0", "1e-9", "must be > 0, got 0.0"),
    ("td.beta", "0.0", "1e-9", "must be > 0, got 0.0"),
    ("td.w_min", "-0.01", "0.0", "must be >= 0, got -0.01"),
    ("td.w_max", "0.09", "0.1", "td.w_max must be >= w_min (0.1), got 0.09"),  # w_min's default: 0.1
    ("td.gamma", "0.0", "1e-9", "must be in (0, 1], got 0.0"),
    ("td.gamma", "1.01", "1.0", "must be in (0, 1], got 1.01"),
    ("td.lam", "-0.01", "0.0", "must be in [0, 1], got -0.01"),
    ("td.lam", "1.01", "1.0", "must be in [0, 1], got 1.01"),
    ("td.ema_momentum", "-0.01", "0.0", "must be in [0, 1), got -0.01"),
    ("td.ema_momentum", "1.0", "0.999999", "must be in [0, 1), got 1.0"),
    ("td.value_coef", "-0.01", "0.0", "must be >= 0, got -0.01"),
    ("rho1.ratio", "0.0", "1e-9", "must be in (0, 1], got 0.0"),
    ("rho1.ratio", "1.01", "1.0", "must be in (0, 1], got 1.01"),
    ("eval.n_samples", "0", "1", "must be >= 1, got 0"),
    ("eval.ks", "[2]", "[1]", "must be one or more k, each in [1, n_samples = 1], got [2]"),  # n_samples: 1
    ("eval.ks", "[0]", "[1]", "must be one or more k, each in [1, n_samples = 1], got [0]"),
    ("eval.ks", "[]", "[1]", "must be one or more k, each in [1, n_samples = 1], got []"),
    ("eval.temperature", "-0.01", "0.0", "must be >= 0, got -0.01"),
    ("eval.top_p", "0.0", "1e-9", "must be in (0, 1], got 0.0"),
    ("eval.top_p", "1.01", "1.0", "must be in (0, 1], got 1.01"),
    ("eval.max_new_tokens", "0", "1", "must be >= 1, got 0"),
    ("eval.batch_size", "0", "1", "must be >= 1, got 0"),
    ("eval.memory_mb", "0", "1", "must be >= 1, got 0"),
    ("eval.limit", "-1", "0", "must be >= 0, got -1"),
    ("eval.seed", "-1", "0", "must be >= 0, got -1"),
    ("eval.workers", "-1", "0", "must be >= 0, got -1"),
    ("eval.timeout_s", "0.0", "0.001", "must be > 0, got 0.0"),
    ("eval.task_ids", "[20, 10]", "[10, 10]", "must be [first, last] with first <= last, got [20, 10]"),
]
IDS = [f"{key}={bad}" for key, bad, _, _ in RANGES]


def cli(*pairs: tuple[str, str]) -> list[str]:
    return [x for key, value in pairs for x in (f"--{key}", value)]


def toml_file(path: Path, *pairs: tuple[str, str]) -> Path:
    tables: dict[str, list[str]] = {}
    for dotted, value in pairs:
        section, key = dotted.split(".")
        tables.setdefault(section, []).append(f"{key} = {value}")
    path.write_text("".join(f"[{s}]\n" + "\n".join(lines) + "\n" for s, lines in tables.items()))
    return path


def refusal(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(AllSections, argv)
    return str(info.value)


def parsed_value(cfg: AllSections, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def test_the_table_covers_every_documented_range():
    """A range in a field's docstring ((>= 1), in [0, 1], > 0, ...) without a row here fails."""
    import ast
    import inspect

    import wmtp.config.sections as sections

    documented = set()
    for node in ast.parse(inspect.getsource(sections)).body:
        section = next(
            (f.name for f in dataclasses.fields(AllSections) if isinstance(node, ast.ClassDef) and f.type == node.name),
            None,
        )
        for ann, doc in zip(node.body, node.body[1:]) if section else ():
            if (
                isinstance(ann, ast.AnnAssign)
                and re.search(r"\b(int|float)\b", ast.unparse(ann.annotation))
                and isinstance(doc, ast.Expr)
                and re.search(r"(>=?|<=?) \S|in [\[(]", str(doc.value.value))
            ):
                documented.add(f"{section}.{ann.target.id}")
    tested = {key for key, *_ in RANGES}
    # The curriculum's lists are checked together, with the curriculum sampler: their own test.
    assert documented - tested <= {"data.curriculum_schedule", "data.curriculum_bin_edges"}, documented - tested
    assert len(documented) > 40


@pytest.mark.parametrize("key,bad,good,rule", RANGES, ids=IDS)
def test_range_on_the_command_line(key, bad, good, rule):
    message = refusal(cli((key, bad)))
    section = key.split(".")[0]
    assert message.startswith(f"[{section}]: {key}"), message
    assert rule in message and len(message) < 200, message
    cfg = parse_config(AllSections, cli((key, good)))
    assert parsed_value(cfg, key) == tomllib.loads(f"v = {good}")["v"]


@pytest.mark.parametrize("key,bad,good,rule", RANGES, ids=IDS)
def test_range_in_a_toml_file(key, bad, good, rule, tmp_path):
    message = refusal(["--config", str(toml_file(tmp_path / "bad.toml", (key, bad)))])
    assert message.startswith(f"[{key.split('.')[0]}]: {key}") and rule in message, message
    cfg = parse_config(AllSections, ["--config", str(toml_file(tmp_path / "good.toml", (key, good)))])
    assert parsed_value(cfg, key) == tomllib.loads(f"v = {good}")["v"]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused(value, tmp_path):
    assert "optimizer.lr must be > 0, got nan" in refusal(cli(("optimizer.lr", "nan")))
    message = refusal(["--config", str(toml_file(tmp_path / "c.toml", ("lr_scheduler.min_lr_ratio", value)))])
    assert message.startswith("[lr_scheduler]: lr_scheduler.min_lr_ratio must be in [0, 1], got "), message


def test_none_is_accepted_where_the_range_says_so():
    cfg = parse_config(AllSections, cli(("training.stop_at_step", "none"), ("training.max_grad_norm", "none")))
    assert cfg.training.stop_at_step is None and cfg.training.max_grad_norm is None


def test_a_file_value_refused_by_its_override_and_fixed_by_it(tmp_path):
    """The range is checked on the resolved value: a file's bad value is fine when overridden."""
    path = toml_file(tmp_path / "c.toml", ("training.max_steps", "0"))
    assert "training.max_steps must be >= 1, got 0" in refusal(["--config", str(path)])
    assert parse_config(AllSections, ["--config", str(path), "--training.max_steps", "3"]).training.max_steps == 3


CURRICULUM = [
    (("data.curriculum_bin_edges", "[0, 5, 5]"), "data.curriculum_bin_edges must be non-empty and strictly increasing"),
    (("data.curriculum_bin_edges", "[]"), "data.curriculum_bin_edges must be non-empty"),
    (("data.curriculum_schedule", "[]"), "data.curriculum_schedule must have at least one row"),
    (("data.curriculum_schedule", "[[0.0, 1.0, 0.0]]"), "row 0 must be [progress, one weight per bin]"),
    (
        ("data.curriculum_schedule", "[[1.01, 1.0, 0.0, 0.0]]"),
        "data.curriculum_schedule[0][0] (progress) must be in [0, 1], got 1.01",
    ),
    (("data.curriculum_schedule", "[[0.0, 0.0, 0.0, 0.0]]"), "row 0 weights must be finite and >= 0, not all 0"),
    (("data.curriculum_schedule", "[[0.0, 1.0, -1.0, 0.0]]"), "row 0 weights must be finite and >= 0"),
    (
        ("data.curriculum_schedule", "[[0.5, 1.0, 0.0, 0.0], [0.5, 0.0, 1.0, 0.0]]"),
        "progress points must strictly increase, got [0.5, 0.5]",
    ),
]


@pytest.mark.parametrize("pair,rule", CURRICULUM, ids=[p[1] for p, _ in CURRICULUM])
def test_curriculum_checks_apply_with_the_curriculum_sampler_only(pair, rule):
    message = refusal(cli(("data.sampler", "curriculum"), pair))
    assert message.startswith("[data]: data.curriculum_") and rule in message, message
    parse_config(AllSections, cli(pair))  # another sampler ignores them
    # The boundaries: progress 0 and 1, one bin, a zero weight beside a positive one.
    cfg = parse_config(
        AllSections,
        cli(
            ("data.sampler", "curriculum"),
            ("data.curriculum_bin_edges", "[0]"),
            ("data.curriculum_schedule", "[[0.0, 1.0], [1.0, 1.0]]"),
        ),
    )
    assert cfg.data.curriculum_schedule == [[0.0, 1.0], [1.0, 1.0]]


def test_speculative_decoding_needs_greedy_decoding():
    message = refusal(cli(("eval.speculative", "true"), ("eval.temperature", "0.5")))
    assert message.startswith("[eval]: eval.speculative needs greedy decoding (temperature = 0)"), message
    assert parse_config(AllSections, cli(("eval.speculative", "true"))).eval.speculative


# ---------------------------------------------------------------------------------------------
# A recipe's entry point: exit 2, `error: ...`, before any heavy work


@pytest.mark.parametrize(
    "key,value,rule",
    [
        ("training.max_steps", "0", "training.max_steps must be >= 1, got 0"),
        ("optimizer.lr", "-0.001", "optimizer.lr must be > 0, got -0.001"),
        ("training.micro_batch_size", "0", "training.micro_batch_size must be >= 1, got 0"),
        ("training.log_every", "0", "training.log_every must be >= 1, got 0"),
    ],
)
def test_recipe_main_exits_2_naming_the_key(key, value, rule, tiny, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        load_recipe("full_finetune_baseline").main(recipe_args(tiny, out, "baseline_tiny.toml", **{key: value}))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: [{key.split('.')[0]}]: {rule}\n"
    assert not out.exists()  # nothing was started


# ---------------------------------------------------------------------------------------------
# Input files


@pytest.fixture(scope="module")
def inputs(tiny, tmp_path_factory) -> dict[str, Path]:
    """Good inputs (the tiny artifacts, and the model also as safetensors) and damaged copies."""
    from wmtp.models import load_mtp
    from wmtp.models.checkpoint import save_mtp

    root = tmp_path_factory.mktemp("inputs")
    model = load_mtp(tiny / "mtp_model")
    st = save_mtp(root / "st_model", model.args, model.state_dict())
    paths = {
        "pth_model": tiny / "mtp_model",
        "st_model": st,
        "tokenizer": tiny / "tokenizer.model",
        "data": tiny / "data" / "train.jsonl",
    }
    for name in ("pth_model", "st_model"):
        damaged = root / f"truncated_{name}"
        damaged.mkdir()
        for f in [*paths[name].iterdir(), paths["tokenizer"]]:  # params.json may say vocab_size -1
            (damaged / f.name).write_bytes(f.read_bytes())
        weights = next(p for p in damaged.iterdir() if p.suffix in (".pth", ".safetensors"))
        os.truncate(weights, weights.stat().st_size // 2)
        paths[f"truncated_{name}"] = damaged
        paths[f"truncated_{name}_file"] = weights
    (root / "empty_model").mkdir()
    no_params = root / "no_params"
    no_params.mkdir()
    (no_params / "model.safetensors").write_bytes((st / "model.safetensors").read_bytes())
    (root / "empty.model").write_bytes(b"")
    (root / "empty.jsonl").write_bytes(b"")
    truncated_tok = root / "truncated.model"
    truncated_tok.write_bytes(paths["tokenizer"].read_bytes()[:1000])
    paths.update(
        empty_model=root / "empty_model",
        no_params=no_params,
        empty_tokenizer=root / "empty.model",
        empty_data=root / "empty.jsonl",
        truncated_tokenizer=truncated_tok,
        missing=root / "missing",
    )
    return paths


def config(p: dict[str, Path], **paths) -> AllSections:
    """A baseline-like config (model, tokenizer, data, validation) on `p`'s good inputs unless given."""
    cfg = load_recipe("full_finetune_baseline").BaselineConfig()
    chosen = {
        "model.path": p["pth_model"],
        "tokenizer.path": p["tokenizer"],
        "data.train_path": p["data"],
        **{k.replace("__", "."): v for k, v in paths.items()},
    }
    for dotted, value in chosen.items():
        section, key = dotted.split(".")
        setattr(getattr(cfg, section), key, str(value))
    return cfg


def test_good_inputs_pass(inputs):
    assert input_problems(config(inputs)) == []
    assert input_problems(config(inputs, model__path=inputs["st_model"], validation__path=inputs["data"])) == []


@pytest.mark.parametrize(
    "case",
    [
        "model missing",
        "model empty",
        "no params.json",
        "tokenizer empty",
        "safetensors truncated",
        "pth truncated",
        "data empty",
        "validation missing",
        "tokenizer folder without one",
    ],
)
def test_each_input_problem_is_named_by_key_and_path(case, inputs):
    p = inputs
    overrides, expected = {
        "model missing": ({"model__path": p["missing"]}, f"model.path: {p['missing']} does not exist"),
        "model empty": ({"model__path": p["empty_model"]}, f"model.path: {p['empty_model']} is empty"),
        "no params.json": ({"model__path": p["no_params"]}, f"model.path: no params.json in {p['no_params']}"),
        "tokenizer empty": (
            {"tokenizer__path": p["empty_tokenizer"]},
            f"tokenizer.path: {p['empty_tokenizer']} is empty",
        ),
        "safetensors truncated": (
            {"model__path": p["truncated_st_model"]},
            f"model.path: {p['truncated_st_model_file']} is truncated (",
        ),
        "pth truncated": (
            {"model__path": p["truncated_pth_model"]},
            f"model.path: {p['truncated_pth_model_file']} is truncated (its zip directory is missing)",
        ),
        "data empty": ({"data__train_path": p["empty_data"]}, f"data.train_path: {p['empty_data']} is empty"),
        "validation missing": ({"validation__path": p["missing"]}, f"validation.path: {p['missing']} does not exist"),
        "tokenizer folder without one": (
            {"tokenizer__path": p["empty_model"]},
            f"tokenizer.path: no tokenizer.model in {p['empty_model']}",
        ),
    }[case]
    problems = input_problems(config(p, **overrides))
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_every_problem_is_reported_at_once(inputs, capsys):
    p = inputs
    cfg = config(
        p,
        model__path=p["truncated_st_model"],
        tokenizer__path=p["empty_tokenizer"],
        data__train_path=p["empty_data"],
        validation__path=p["missing"],
    )
    with pytest.raises(InputError) as info:
        check_inputs(cfg)
    lines = str(info.value).splitlines()
    assert lines[0] == "4 input file problems:"
    assert [ln.split(":")[0].strip() for ln in lines[1:]] == [
        "model.path",
        "tokenizer.path",
        "data.train_path",
        "validation.path",
    ]
    assert all(len(ln) < len(str(p["truncated_st_model_file"])) + 120 for ln in lines), lines
    with pytest.raises(SystemExit) as exit_info:
        check_inputs_or_exit(cfg)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {info.value}\n"


def test_recipe_main_exits_2_on_a_missing_input(inputs, tiny, tmp_path, capsys):
    out = tmp_path / "run"
    argv = recipe_args(
        tiny,
        out,
        "baseline_tiny.toml",
        **{"data.train_path": inputs["empty_data"], "validation.path": inputs["missing"]},
    )
    with pytest.raises(SystemExit) as info:
        load_recipe("full_finetune_baseline").main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 2 input file problems:\n")
    assert f"data.train_path: {inputs['empty_data']} is empty" in err
    assert f"validation.path: {inputs['missing']} does not exist" in err
    assert not out.exists()


def test_loading_a_truncated_weights_file_or_tokenizer_names_its_path(inputs):
    from wmtp.models import load_mtp
    from wmtp.models.checkpoint import read_value_head

    for name in ("truncated_st_model", "truncated_pth_model"):
        file = inputs[f"{name}_file"]
        with pytest.raises(ValueError) as info:
            load_mtp(inputs[name])
        message = str(info.value)
        assert message.startswith(f"model weights {file} ({file.stat().st_size} bytes) do not load, truncated"), message
        assert len(message) < len(str(file)) + 250, message
    with pytest.raises(ValueError) as info:
        read_value_head(inputs["truncated_st_model_file"], dim=8)
    assert str(inputs["truncated_st_model_file"]) in str(info.value)
    message = tokenizer_error(inputs["truncated_tokenizer"])
    assert message.startswith(
        f"tokenizer {inputs['truncated_tokenizer']} (1000 bytes) does not load, truncated or "
        f"not a sentencepiece model? (RuntimeError: "
    ), message
    assert len(message) < len(str(inputs["truncated_tokenizer"])) * 2 + 200, message  # the loader repeats it
    assert tokenizer_error(inputs["empty_tokenizer"]) == f"tokenizer {inputs['empty_tokenizer']} is empty (0 bytes)"


def tokenizer_error(path: Path) -> str:
    from wmtp.data.tokenizer import SentencePieceTokenizer

    with pytest.raises(ValueError) as info:
        SentencePieceTokenizer(path)
    return str(info.value)
