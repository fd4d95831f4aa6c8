"""Label on-policy samples by execution: k completions per problem from a policy, each run against
the problem's tests in the sandbox, written as processed rows for the critic and verifiable recipes.

    python scripts/label_samples.py --policy outputs/baseline_a100 --data data/codecontests/train.jsonl \\
        --out data/labelled/codecontests --samples 8 --temperature 0.8
    torchrun --nproc_per_node=8 scripts/label_samples.py --policy ... --data ... --out ...

--data is a processed JSONL (CodeContests with its *_tests.jsonl beside it, MBPP or HumanEval rows
from the prepare scripts); its problems are read through the row index. --policy is what evaluation
loads: a model folder, a final/ export or a training run folder. Prompts are the training template
around each problem's instruction; completions come from the evaluation generator (KV-cached,
temperature / top-p sampling), one batch of k per problem seeded by the problem's position, so a
problem's samples do not depend on the world size or on a restart. CodeContests samples run on
every test (public, private, generated; the first --max-tests if set) with the problem's time
limit (times --time-scale) and memory limit, outputs compared as AlphaCode compares them; MBPP and
HumanEval samples run their test program, which passes iff its code ran to the end (a sample that
leaves early, exit() or sys.exit(0) included, is labelled incorrect); a CodeContests sample may end
with exit(). --require-isolation stops the run unless the sandbox isolates programs fully here.

OUT/labelled.jsonl        the labelled rows, problems in file order (written at the end)
OUT/stats.json            problems labelled and skipped by reason, rows, correct, statuses
OUT/rank*.jsonl, rank*.done.jsonl, settings.json   the resumable state: a restarted run (any world
                          size) skips problems already labelled; other settings are refused
Under torchrun the problems are dealt round-robin to the ranks; OUT must be a folder every rank sees.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wmtp.data.loader import load_index  # noqa: E402
from wmtp.distributed.env import barrier, destroy, init_distributed  # noqa: E402
from wmtp.eval.generate import generate  # noqa: E402
from wmtp.eval.judge import judge  # noqa: E402
from wmtp.eval.labelling import LABELLED_FILE, SKIP_PROMPT_TOO_LONG, LabellingSet, LabelStore, labelled_rows  # noqa: E402
from wmtp.eval.policy import load_policy, resolve_policy  # noqa: E402
from wmtp.eval.problems import build_prompt, stop_sequences, truncate_at_stop  # noqa: E402
from wmtp.eval.sandbox import SandboxIsolationError, require_isolation  # noqa: E402
from wmtp.logs import setup_logging  # noqa: E402

JUDGE_PROBLEMS = 8
"""Problems whose samples are judged together (and then written): keeps the sandbox workers busy."""
SETTINGS = (
    "data",
    "policy",
    "samples",
    "temperature",
    "top_p",
    "max_new_tokens",
    "seed",
    "max_tests",
    "time_scale",
    "timeout_s",
    "memory_mb",
)
"""Arguments a resumed run must share with the run that started the folder."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="model folder, final/ export or training run folder")
    parser.add_argument("--tokenizer", default="", help="tokenizer.model (default: the policy's)")
    parser.add_argument("--data", required=True, help="processed JSONL of the problems")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=4, help="completions per problem (k)")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="problem at position i samples with seed + i")
    parser.add_argument("--max-problems", type=int, default=0, help="label only the first N problems (0: all)")
    parser.add_argument("--max-tests", type=int, default=0, help="CodeContests: run at most N tests (0: all)")
    parser.add_argument("--time-scale", type=float, default=1.0, help="CodeContests: times the problem's time limit")
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=10.0,
        help="limit of a test program, and of CodeContests tests of problems without one",
    )
    parser.add_argument(
        "--memory-mb",
        type=int,
        default=2048,
        help="address space of a test program, and of problems without a memory limit",
    )
    parser.add_argument("--workers", type=int, default=0, help="programs run at once per rank (0: cores / ranks)")
    parser.add_argument(
        "--require-isolation",
        action="store_true",
        help="refuse to run unless the sandbox isolates programs fully on this machine",
    )
    parser.add_argument("--max-seq-len", type=int, default=2048, help="the model's positions (RoPE table / 2)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    args = parser.parse_args(argv)
    for name in ("samples", "max_new_tokens", "memory_mb", "max_seq_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("seed", "max_problems", "max_tests", "workers"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.time_scale <= 0 or args.timeout_s <= 0:
        parser.error("need --temperature >= 0, 0 < --top-p <= 1, --time-scale > 0 and --timeout-s > 0")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    try:
        return label(args)
    except (ValueError, FileNotFoundError, SandboxIsolationError) as exc:  # bad input, settings, machine: one line
        sys.exit(f"error: {exc}")


def label(args: argparse.Namespace) -> dict | None:
    t0 = time.perf_counter()
    if args.require_isolation:
        require_isolation()
    info = init_distributed(args.device)
    store = LabelStore(args.out, info.rank)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k in SETTINGS}
    if info.rank == 0:
        store.check_settings(settings, write=True)
    barrier()
    store.check_settings(settings, write=False)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and info.device.type == "cuda")
    source = resolve_policy(args.policy, args.tokenizer)
    model, tokenizer = load_policy(
        source, info=info, dtype=torch.bfloat16 if bf16 else torch.float32, max_seq_len=args.max_seq_len
    )
    index = load_index(args.data, tokenizer, rank=info.rank)
    problems = LabellingSet(index, max_problems=args.max_problems, max_tests=args.max_tests)
    skipped = dict(problems.skipped)
    done = store.done()
    barrier()  # every rank has read what is done before any rank appends
    todo = [p for p in problems.items if p.task_id not in done]
    mine = todo[info.rank :: info.world_size]
    workers = args.workers or max(1, (os.cpu_count() or 1) // info.local_world_size)
    if info.is_main:
        print(
            f"[label] {len(problems.items)} problems in {args.data} ({len(done)} already labelled, "
            f"skipped {sum(skipped.values())}: {skipped or 'none'}); {len(todo)} to label on "
            f"{info.world_size} rank(s), {args.samples} samples each, policy {source.describe()}",
            flush=True,
        )
    limit = model.args.max_seq_len * 2  # the RoPE table
    store.open()
    try:
        for start in range(0, len(mine), JUDGE_PROBLEMS):
            group = mine[start : start + JUDGE_PROBLEMS]
            judged, generated = [], []
            for item in group:
                problem = problems.problem(item)
                prompt = [tokenizer.bos_id, *tokenizer.encode(build_prompt(problem), prefix=True)]
                if len(prompt) + args.max_new_tokens > limit:  # counted, as the problems skipped up front
                    store.add(item.task_id, [], skipped=SKIP_PROMPT_TOO_LONG)
                    continue
                judged.append((item, problem))
                out = generate(
                    model,
                    [prompt] * args.samples,
                    max_new_tokens=args.max_new_tokens,
                    eos_id=tokenizer.eos_id,
                    temperature=args.temperature,
                    top_p=args.top_p,
                    seed=args.seed + item.position,
                )
                stops = stop_sequences(problem)
                generated.append(
                    ([truncate_at_stop(tokenizer.decode(t), stops) for t in out.tokens], [len(t) for t in out.tokens])
                )
            verdicts = judge(
                [(problem, c) for (_, problem), (texts, _) in zip(judged, generated) for c in texts],
                workers=workers,
                timeout_s=args.timeout_s,
                memory_mb=args.memory_mb,
                time_scale=args.time_scale,
            )
            for i, ((item, _), (texts, lengths)) in enumerate(zip(judged, generated)):
                mine_verdicts = verdicts[i * args.samples : (i + 1) * args.samples]
                store.add(
                    item.task_id,
                    labelled_rows(item, texts, mine_verdicts, policy=source.describe(), new_tokens=lengths),
                )
            if info.is_main:
                print(f"[label] rank 0: {min(start + JUDGE_PROBLEMS, len(mine))}/{len(mine)} problems", flush=True)
    finally:
        store.close()
    barrier()
    stats = None
    if info.is_main:
        counts = store.merge([p.task_id for p in problems.items])
        statuses = counts["statuses"]
        for reason, n in counts["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
        stats = {
            "problems": len(problems.items) + sum(problems.skipped.values()),
            "labelled_problems": counts["problems"],
            "skipped": skipped,
            "rows": counts["rows"],
            "correct": counts["correct"],
            "incorrect": counts["rows"] - counts["correct"],
            "statuses": statuses,
            "seconds_this_run": round(time.perf_counter() - t0, 1),
        }
        (args.out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
        print(
            f"[label] {args.out / LABELLED_FILE}: {counts['problems']} problems, {counts['rows']} rows, "
            f"{counts['correct']} correct; statuses {statuses}",
            flush=True,
        )
    destroy()
    return stats


if __name__ == "__main__":
    setup_logging()
    main()
