"""One-line accounts of exceptions, for warnings and error messages that name what failed."""

from __future__ import annotations

REASON_MAX_CHARS = 200
"""A reason longer than this is cut (with "..."): library messages can run to paragraphs."""


def exception_line(exc: BaseException, limit: int = REASON_MAX_CHARS) -> str:
    """`Type: message` on one line (white space folded), cut after `limit` characters."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[:limit] + "..."
