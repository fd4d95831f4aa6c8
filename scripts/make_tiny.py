"""Make the tiny artifacts for the CPU demo and the tests, all locally.

    python scripts/make_tiny.py --out artifacts/tiny

DIR/tokenizer.model          sentencepiece (byte fallback, identity normalisation) trained on the data
DIR/mtp_model/               Meta format: params.json (vocab_size -1) + consolidated.00.pth
DIR/reference/               a tiny Hugging Face LlamaForCausalLM on the same tokenizer (Rho-1)
DIR/data/{train,valid}.jsonl processed rows with correct and incorrect solutions and difficulties
DIR/data/toy_eval.json       a toy evaluation set in MBPP's format (task ids 1..N) from the synthetic
                             templates, problems a tiny model trained on these rows can partly solve
DIR/pretrained/              (with --pretrained) the pretrained base the demo and the experiment
                             start from, and Rho-1's reference:
    corpus.jsonl             the code corpus: generated problems (other instances than the training
                             rows), each with its correct solution, its buggy sibling and a second
                             copy of one of them: for half of the templates the correct one, for the
                             other half the buggy one (code in the wild is neither all right nor all
                             wrong)
    base/                    an MTP model (all heads) trained from mtp_model/ on the corpus, correct and
                             buggy code alike, as code pretraining sees both: competent but imperfect,
                             right on some kinds of problems and wrong on others
    reference/               the base fine-tuned on the corpus's correct rows only (Rho-1's reference
                             is a model of clean data; the recipe uses its head 0)
    inputs.json              what they were made from (a digest of the corpus, tokenizer, initial
                             weights and training settings): they are rebuilt only when it changes

Data comes from MBPP (shared/data/mbpp_*.json) when present, with incorrect solutions made by
mutating correct ones and checking that they fail the problem's tests; otherwise from a generator.
The folder is written atomically and reused when it already exists (pass --force to rebuild; an
existing pretrained/ is kept through it and rebuilt only if its inputs changed); the pretrained
models are trained with the baseline recipe (recipes/full_finetune_baseline.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from wmtp.atomic import atomic_directory, atomic_write_text
from wmtp.data.synthetic import TEMPLATES, synthetic_problems, synthetic_rows, template_name
from wmtp.data.template import format_prompt
from wmtp.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from wmtp.eval.mutants import mbpp_rows_with_incorrect
from wmtp.layout import FINAL_DIR, PARAMS_FILENAME, TOKENIZER_FILENAME
from wmtp.logs import get_logger, setup_logging
from wmtp.models import ModelArgs, MTPTransformer

log = get_logger("tiny")

DEFAULT_SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY_MODEL = dict(
    dim=64,
    n_layers=6,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=-1,
    multiple_of=32,
    norm_eps=1e-5,
    rope_theta=10000.0,
    n_future_tokens=4,
)
TINY_VOCAB = 1024
TOY_EVAL_PROBLEMS = 40
TOY_EVAL_SEED_OFFSET = 2
"""The toy evaluation set's seed is the data seed plus this (the validation rows use plus 1)."""
CORPUS_SEED_OFFSET = 3
"""The pretraining corpus's generator seed is the data seed plus this: other problem instances."""
CORPUS_PROBLEMS = 1500
"""Problems of the pretraining corpus: each gives its correct solution, its buggy sibling and a
second copy of one of them (`corpus_rows`)."""
MOSTLY_BUGGY = frozenset(template_name(make) for make in TEMPLATES[1::2])
"""Templates whose corpus problems repeat the buggy solution (every second template of the
generator's order); the others repeat the correct one."""
ROOT = Path(__file__).resolve().parents[1]
PRETRAINED_DIR = "pretrained"
BASE_DIR, REFERENCE_DIR, CORPUS_FILE, INPUTS_FILE = "base", "reference", "corpus.jsonl", "inputs.json"
PRETRAINED_VERSION = 2
"""Bumped when the way the pretrained models are made changes (the settings below are hashed too)."""
BASE_TRAINING = {
    "data.sampler": "balanced",
    "training.micro_batch_size": 16,
    "optimizer.lr": 3e-3,
    "lr_scheduler.warmup_steps": 30,
    "lr_scheduler.min_lr_ratio": 0.1,
}
"""The base's pretraining (baseline recipe, from the random mtp_model/): the corpus's correct and
buggy rows, as many of each per step, for --base-steps steps."""
REFERENCE_TRAINING = {
    "data.sampler": "correct_only",
    "training.micro_batch_size": 16,
    "optimizer.lr": 1e-3,
    "lr_scheduler.warmup_steps": 10,
    "lr_scheduler.min_lr_ratio": 0.1,
}
"""Rho-1's reference: the base fine-tuned on the corpus's correct rows for --reference-steps steps."""
DEFAULT_BASE_STEPS = 600
DEFAULT_REFERENCE_STEPS = 150


def build_rows(source: str, shared: Path, max_problems: int | None, seed: int) -> tuple[list, list, str]:
    if source == "auto":
        source = "mbpp" if (shared / "mbpp_train.json").is_file() else "synthetic"
    if source == "mbpp":
        train, stats = mbpp_rows_with_incorrect(shared / "mbpp_train.json", max_problems=max_problems, seed=seed)
        valid, _ = mbpp_rows_with_incorrect(
            shared / "mbpp_validation.json",
            max_problems=None if max_problems is None else max(8, max_problems // 4),
            seed=seed,
        )
        log.info("[tiny] MBPP: %s", stats)
        return train, valid, source
    n = max_problems or 300
    return synthetic_rows(n, seed=seed), synthetic_rows(max(8, n // 5), seed=seed + 1), source


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def make_mtp_model(folder: Path, vocab_size: int, seed: int) -> None:
    """Random tiny MTP model saved exactly as Meta ships checkpoints (vocab_size -1 in params.json)."""
    args = ModelArgs(**{**TINY_MODEL, "vocab_size": vocab_size})
    model = MTPTransformer(args)
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    folder.mkdir(parents=True)
    torch.save(model.state_dict(), folder / "consolidated.00.pth")
    (folder / PARAMS_FILENAME).write_text(json.dumps(TINY_MODEL, indent=2) + "\n")


def make_reference(folder: Path, tokenizer: SentencePieceTokenizer, seed: int) -> None:
    """Tiny Hugging Face causal LM on the same tokenizer (loaded with transformers offline)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    (folder / TOKENIZER_FILENAME).write_bytes(tokenizer.path.read_bytes())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _train(init: Path, tiny: Path, corpus: Path, out: Path, settings: dict, steps: int) -> Path:
    """One baseline-recipe run on the corpus from the model folder `init`; returns its final/ export."""
    overrides = {
        "model.path": init,
        "tokenizer.path": tiny / TOKENIZER_FILENAME,
        "data.train_path": corpus,
        "training.output_dir": out,
        "training.max_steps": steps,
        "training.log_every": max(1, steps // 10),
        "checkpoint.save_every": 0,
        "checkpoint.resume": "false",
        "metrics.mlflow": "false",
        "metrics.report": "false",
        "metrics.progress_bar": "false",
        **settings,
    }
    args = [sys.executable, str(ROOT / "recipes" / "full_finetune_baseline.py")]
    args += ["--config", str(ROOT / "configs" / "baseline_tiny.toml")]
    args += [x for key, value in overrides.items() for x in (f"--{key}", str(value))]
    subprocess.run(args, cwd=ROOT, check=True, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    return out / FINAL_DIR


def corpus_rows(seed: int) -> list[dict]:
    """The code corpus: per problem its correct solution, its buggy sibling and a second copy of the
    correct one, or of the buggy one for the MOSTLY_BUGGY templates. Code in the wild is neither all
    right nor all wrong; at 2:1 either way the base learns to be right on half of the kinds of
    problems and wrong on the other half, by construction rather than by how a 50/50 coin falls."""
    rows = synthetic_rows(CORPUS_PROBLEMS, seed=seed)
    corpus = []
    for correct, buggy in zip(rows[::2], rows[1::2]):
        corpus += [correct, buggy, buggy if correct["metadata"]["template"] in MOSTLY_BUGGY else correct]
    return corpus


def _training_digest(rows: list[dict]) -> str:
    """sha256 of what training reads of the rows (text, label, problem, difficulty), not of metadata
    that only the diagnostics use."""
    fields = [
        [r["instruction"], r["input"], r["output"], r["task_id"], r["is_correct"], r["metadata"]["difficulty"]]
        for r in rows
    ]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


def make_pretrained(tiny: Path, *, seed: int, base_steps: int, reference_steps: int) -> None:
    """TINY/pretrained/ (corpus, base, reference), unless inputs.json says the models are up to date
    (the corpus file is then rewritten, in case only its metadata changed)."""
    target = tiny / PRETRAINED_DIR
    corpus = corpus_rows(seed + CORPUS_SEED_OFFSET)
    corpus_text = "".join(json.dumps(r) + "\n" for r in corpus)
    inputs = {
        "version": PRETRAINED_VERSION,
        "corpus": _training_digest(corpus),
        "tokenizer_sha256": _sha256(tiny / TOKENIZER_FILENAME),
        "init_sha256": _sha256(tiny / "mtp_model" / "consolidated.00.pth"),
        "base": {**BASE_TRAINING, "training.max_steps": base_steps},
        "reference": {**REFERENCE_TRAINING, "training.max_steps": reference_steps},
    }
    stamp = target / INPUTS_FILE
    if stamp.is_file() and json.loads(stamp.read_text()) == inputs:
        atomic_write_text(target / CORPUS_FILE, corpus_text)
        log.info(f"[tiny] reusing {target} (its inputs are unchanged)")
        return
    t0 = time.perf_counter()
    with atomic_directory(target, overwrite=True) as tmp:
        corpus_file = tmp / CORPUS_FILE
        corpus_file.write_text(corpus_text)
        runs = tmp / "runs"
        base_run = _train(tiny / "mtp_model", tiny, corpus_file, runs / BASE_DIR, BASE_TRAINING, base_steps)
        reference_run = _train(base_run, tiny, corpus_file, runs / REFERENCE_DIR, REFERENCE_TRAINING, reference_steps)
        shutil.copytree(base_run, tmp / BASE_DIR)
        shutil.copytree(reference_run, tmp / REFERENCE_DIR)
        shutil.rmtree(runs)
        (tmp / INPUTS_FILE).write_text(json.dumps(inputs, indent=2) + "\n")
    log.info(
        f"[tiny] {target}: base ({base_steps} steps on {len(corpus)} corpus rows) and reference "
        f"({reference_steps} steps on its correct rows), {time.perf_counter() - t0:.0f}s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("artifacts/tiny"))
    parser.add_argument("--source", choices=["auto", "mbpp", "synthetic"], default="auto")
    parser.add_argument("--shared-data", type=Path, default=DEFAULT_SHARED_DATA)
    parser.add_argument("--max-problems", type=int, default=None, help="limit problems (fast tests)")
    parser.add_argument("--no-reference", action="store_true", help="skip the Hugging Face reference model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pretrained", action="store_true", help="also make pretrained/ (the base and Rho-1's reference)"
    )
    parser.add_argument("--base-steps", type=int, default=DEFAULT_BASE_STEPS, help="pretraining steps of the base")
    parser.add_argument(
        "--reference-steps", type=int, default=DEFAULT_REFERENCE_STEPS, help="fine-tuning steps of the reference"
    )
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()

    if args.out.is_dir() and not args.force:
        log.info(f"[tiny] reusing {args.out} (--force rebuilds)")
    else:
        make_tiny(args)
    if args.pretrained:
        make_pretrained(args.out, seed=args.seed, base_steps=args.base_steps, reference_steps=args.reference_steps)


def make_tiny(args: argparse.Namespace) -> None:
    """Data, tokenizer, random model and Hugging Face reference; an existing pretrained/ is carried
    over (make_pretrained then rebuilds it if its inputs changed)."""
    t0 = time.perf_counter()
    train, valid, source = build_rows(args.source, args.shared_data, args.max_problems, args.seed)
    with atomic_directory(args.out, overwrite=True) as tmp:
        if (args.out / PRETRAINED_DIR).is_dir():
            shutil.copytree(args.out / PRETRAINED_DIR, tmp / PRETRAINED_DIR)
        write_jsonl(tmp / "data" / "train.jsonl", train)
        write_jsonl(tmp / "data" / "valid.jsonl", valid)
        toy = synthetic_problems(TOY_EVAL_PROBLEMS, seed=args.seed + TOY_EVAL_SEED_OFFSET)
        (tmp / "data" / "toy_eval.json").write_text(json.dumps(toy, indent=1) + "\n")
        corpus = [format_prompt(r["instruction"], r["input"]) + r["output"] for r in train]
        tokenizer = SentencePieceTokenizer(train_sentencepiece(corpus, tmp, vocab_size=TINY_VOCAB))
        make_mtp_model(tmp / "mtp_model", tokenizer.vocab_size, args.seed)
        if not args.no_reference:
            make_reference(tmp / "reference", tokenizer, args.seed)
    n_bad = sum(not r["is_correct"] for r in train)
    log.info(
        f"[tiny] {args.out}: source {source}, train {len(train)} rows ({n_bad} incorrect), "
        f"valid {len(valid)} rows, vocab {tokenizer.vocab_size}, {time.perf_counter() - t0:.1f}s"
    )


if __name__ == "__main__":
    setup_logging()
    main()
