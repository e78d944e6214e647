"""Share Studio's user-facing errors, and the helpers that keep their messages to one line.

Every failure a user can cause or fix (a missing model, a bad generation setting, a damaged
library...) is raised as a :class:`ShareStudioError` subclass whose message is a single line;
the CLI and the app print it without a traceback.
"""

from __future__ import annotations

#: Longest part of an underlying error's message quoted inside one of ours.
QUOTED_ERROR_CHARS = 200


class ShareStudioError(Exception):
    """Base class of user-facing errors. ``str(error)`` is one line, shown without a traceback."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


class ModelLoadError(ShareStudioError):
    """The model reference could not be turned into a pipeline (missing, refused, offline...)."""


class GenerationError(ShareStudioError, ValueError):
    """Invalid generation parameters (size, steps, seed, scheduler name...)."""


def one_line(text: object) -> str:
    """``text`` with every run of whitespace, newlines included, collapsed to one space."""
    return " ".join(str(text).split())


def first_line(error: BaseException, *, with_type: bool = True) -> str:
    """``"TypeName: first line of the message"``, for quoting an underlying error inside one of ours.

    With ``with_type=False``, only the first line.  Either way an empty message gives
    ``"TypeName"``, and the quoted line is cut at :data:`QUOTED_ERROR_CHARS` characters (ending in "...").
    """
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    text = lines[0].strip()
    if len(text) > QUOTED_ERROR_CHARS:
        text = text[:QUOTED_ERROR_CHARS] + "..."
    return f"{type(error).__name__}: {text}" if with_type else text
