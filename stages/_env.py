"""Imported first by every stage: one clear line, not a traceback, when the stage runs under an
interpreter without the project's packages (e.g. `.venv/bin/dvc repro` without activation,
where DVC runs `python` from PATH)."""

import sys

try:
    import torch  # noqa: F401

    import freezecache  # noqa: F401
except ModuleNotFoundError as err:
    sys.exit(
        f"error: {sys.executable} has no module {err.name!r} — activate the project's venv "
        "(`source .venv/bin/activate`) or run `make repro`"
    )
