"""Imported first by every stage: one clear line, not a traceback, when the stage runs under an
interpreter without the project's packages (e.g. `.venv/bin/dvc repro` without activation,
where DVC runs `python` from PATH), or when it is interrupted while it loads."""

import sys

try:
    from freezecache.core.interrupts import exit_on_signal

    exit_on_signal()  # until the stage's guard takes over: Ctrl-C while importing ends it cleanly
    import torch  # noqa: F401
except ModuleNotFoundError as err:
    sys.exit(
        f"error: {sys.executable} has no module {err.name!r} — activate the project's venv "
        "(`source .venv/bin/activate`) or run `make repro`"
    )
