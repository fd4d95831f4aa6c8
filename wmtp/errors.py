"""One-line accounts of exceptions, for warnings and error messages that name what failed."""

from __future__ import annotations

from pathlib import Path

REASON_MAX_CHARS = 200
"""A reason longer than this is cut (with "..."): library messages can run to paragraphs."""


def exception_line(exc: BaseException, limit: int = REASON_MAX_CHARS) -> str:
    """`Type: message` on one line (white space folded), cut after `limit` characters."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[:limit] + "..."


def unreadable_weights(path: Path, exc: BaseException) -> ValueError:
    """A weights file that exists but does not load, named (a cut-short copy or download, usually);
    the loader's own message is kept to its first sentence (torch's zip reader adds a paragraph)."""
    size = path.stat().st_size if path.is_file() else 0
    detail = exception_line(exc).split(". ")[0]
    return ValueError(f"model weights {path} ({size} bytes) do not load, truncated or damaged? ({detail})")
