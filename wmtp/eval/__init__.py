"""Evaluation: problems, sandboxed execution, generation and pass@k (SPEC "Evaluation")."""

from wmtp.eval.generate import Generation, generate
from wmtp.eval.passk import mean_pass_at_k, pass_at_k
from wmtp.eval.sandbox import (
    ExecResult,
    SandboxIsolationError,
    require_isolation,
    run_program,
    run_programs,
    sandbox_protections,
)

__all__ = [
    "ExecResult",
    "Generation",
    "SandboxIsolationError",
    "generate",
    "mean_pass_at_k",
    "pass_at_k",
    "require_isolation",
    "run_program",
    "run_programs",
    "sandbox_protections",
]
