"""The processed row schema shared by every dataset builder, the index and the samplers.

A row is one JSON object per JSONL line::

    {"instruction": str, "input": str, "output": str, "task_id": str, "is_correct": bool,
     "metadata": {"source": str, "difficulty": int, "has_tests": bool, ...}}

Rows that come with executable tests (MBPP, HumanEval, synthetic) also keep, inside ``metadata``,
``tests`` (list of assert statements, or HumanEval's single ``check`` source), ``test_setup_code``
(str) and, for HumanEval, ``entry_point`` (str). Rows of one problem share a ``task_id``. A row
made as one of a correct/incorrect pair that differ by a known edit (the synthetic generator's)
keeps ``first_diff_char`` (int in [0, len(output)]): where its output first differs from its
sibling's (len(output): the sibling goes on where this row ends), and ``sibling_output`` (str).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

REQUIRED_FIELDS: Mapping[str, type] = {
    "instruction": str,
    "input": str,
    "output": str,
    "task_id": str,
    "is_correct": bool,
    "metadata": dict,
}
"""Top-level fields every row must have, with their types."""

REQUIRED_METADATA_FIELDS: Mapping[str, type] = {
    "source": str,
    "difficulty": int,
    "has_tests": bool,
}
"""Fields every row's ``metadata`` must have, with their types."""

OPTIONAL_METADATA_FIELDS: Mapping[str, type] = {
    "test_setup_code": str,
    "entry_point": str,
    "first_diff_char": int,
    "sibling_output": str,
}
"""Metadata fields that are type-checked when present (``tests`` is checked separately)."""

TEST_COLUMNS = ("public_tests", "private_tests", "generated_tests")
"""CodeContests' test lists in a problem's tests record (its split's ``*_tests.jsonl``), in the
order they are run."""

TESTS_HEADER = "\nYour code should pass these tests:\n"
"""Joins a problem statement and its asserts in the instruction (MBPP's prompt convention)."""


def _type_name(expected: type) -> str:
    return {str: "a str", bool: "a bool", int: "an int", dict: "an object"}[expected]


def _has_type(value: Any, expected: type) -> bool:
    # bool is a subclass of int: a difficulty of True is a bug, not a difficulty of 1.
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def validate_row(obj: Any) -> str | None:
    """A short reason why ``obj`` is not a valid processed row, or None if it is valid."""
    if not isinstance(obj, dict):
        return "row is not an object"
    for name, expected in REQUIRED_FIELDS.items():
        if name not in obj:
            return f"missing field '{name}'"
        if not _has_type(obj[name], expected):
            return f"field '{name}' is not {_type_name(expected)}"
    meta = obj["metadata"]
    for name, expected in REQUIRED_METADATA_FIELDS.items():
        if name not in meta:
            return f"missing field 'metadata.{name}'"
        if not _has_type(meta[name], expected):
            return f"metadata.{name} is not {_type_name(expected)}"
    if meta["difficulty"] < 0:
        return "metadata.difficulty is negative"
    for name, expected in OPTIONAL_METADATA_FIELDS.items():
        if name in meta and not _has_type(meta[name], expected):
            return f"metadata.{name} is not {_type_name(expected)}"
    if "first_diff_char" in meta and not 0 <= meta["first_diff_char"] <= len(obj["output"]):
        return "metadata.first_diff_char is outside [0, len(output)]"
    if "tests" in meta:
        tests = meta["tests"]
        if not (isinstance(tests, list) and all(isinstance(t, str) for t in tests)):
            return "metadata.tests is not a list of str"
        if meta["has_tests"] and not tests:
            return "metadata.has_tests is true but metadata.tests is empty"
    return None


def tests_instruction(text: str, tests: Sequence[str]) -> str:
    """The instruction of a problem with tests: its statement, then one assert per line."""
    return text + TESTS_HEADER + "\n".join(tests)


def make_row(
    *,
    instruction: str,
    output: str,
    task_id: str,
    is_correct: bool,
    source: str,
    difficulty: int,
    tests: Sequence[str] = (),
    test_setup_code: str = "",
    input_text: str = "",
    **extra_metadata: Any,
) -> dict[str, Any]:
    """A processed row; ``tests`` and ``test_setup_code`` are kept in metadata when tests exist."""
    metadata: dict[str, Any] = {"source": source, "difficulty": difficulty, "has_tests": bool(tests)}
    if tests:
        metadata["tests"] = list(tests)
        metadata["test_setup_code"] = test_setup_code
    metadata.update(extra_metadata)
    return {
        "instruction": instruction,
        "input": input_text,
        "output": output,
        "task_id": task_id,
        "is_correct": is_correct,
        "metadata": metadata,
    }
