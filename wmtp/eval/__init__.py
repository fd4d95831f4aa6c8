"""Evaluation: problems, sandboxed execution, generation and pass@k (SPEC "Evaluation")."""

from wmtp.eval.generate import Generation, generate
from wmtp.eval.passk import mean_pass_at_k, pass_at_k
from wmtp.eval.sandbox import ExecResult, run_program, run_programs, sandbox_protections

__all__ = [
    "ExecResult",
    "Generation",
    "generate",
    "mean_pass_at_k",
    "pass_at_k",
    "run_program",
    "run_programs",
    "sandbox_protections",
]
