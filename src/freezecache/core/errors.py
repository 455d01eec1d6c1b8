"""User-facing errors: one line that says what is wrong and what to do."""

from __future__ import annotations

import importlib
from types import ModuleType


class FreezecacheError(Exception):
    """An error caused by the user's input (params, data files, caches, a model or a path given
    to the public functions): one line that says what is wrong and what to do.

    The CLI and the stages print ``error: <message>`` and exit with status 2, no traceback; a
    training loop can catch it (``except freezecache.FreezecacheError``).
    """


class ModelOptionError(FreezecacheError):
    """A model that cannot be built as asked, because of one option of the ``model`` params.

    ``key`` names the option under ``model`` (``name``, ``kwargs``, ``kwargs.patch_size``), so
    the code that knows the params can say where to fix it; the message does not repeat it.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def optional(module: str, package: str, avoid: str | None = None, *, why: str = "") -> ModuleType:
    """Import a package that only some features need, or raise one line that names it, the
    setting that avoids it (``avoid``, e.g. ``cache.codec: quant``) or what needs it (``why``).

    A package can be missing, or present but broken (zfpy's wheels built against numpy 1 fail
    to import under numpy 2 with an ImportError, not a ModuleNotFoundError; numba refuses a
    numpy newer than it supports), so any exception of the import counts."""
    try:
        return importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 (any import failure of an optional package)
        fix = f"install it (pip install {package})"
        if avoid:
            fix += f" or set {avoid}"
        if why:
            fix += f"; {why}"
        reason = first_line(err)
        raise FreezecacheError(f"{package} is not usable here ({reason}) — {fix}") from None
