"""The README's API reference, generated from the public names' docstrings (``freezecache
readme`` writes it between the ``api`` markers; a test keeps it current), so the reference and
the code cannot disagree."""

from __future__ import annotations

import inspect
import re
import textwrap

METHODS = {"CachedFeatures": ("batches", "num_batches")}  # public methods shown with a class


def _signature(name: str, obj) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return name
    sig = re.sub(r": '([^']*)'", r": \1", sig)  # annotations read as strings (PEP 563)
    sig = re.sub(r" -> '?None'?$| -> '([^']*)'$", lambda m: f" -> {m[1]}" if m[1] else "", sig)
    return f"{name}{sig}"


def _markdown(doc: str) -> str:
    """A docstring as markdown: ``Example::`` blocks become Python code fences, double
    backticks single ones, Sphinx roles their plain name."""
    text = inspect.cleandoc(doc)
    text = re.sub(r":(?:func|class|meth|mod|data|attr):`~?([^`]+)`", r"`\1`", text)
    text = text.replace("``", "`")
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::"):
            out.append(line.rstrip()[:-1])
            block, i = [], i + 1
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith("    ")):
                block.append(lines[i])
                i += 1
            code = textwrap.dedent("\n".join(block)).strip("\n")
            out += ["", "```python", code, "```", ""]
            continue
        out.append(line)
        i += 1
    return "\n".join(out).strip() + "\n"


def reference() -> str:
    """The generated section: each name of ``freezecache.__all__``, its signature and docs."""
    import freezecache

    parts = []
    for name in freezecache.__all__:
        if name.startswith("__"):
            continue
        obj = getattr(freezecache, name)
        kind = "class" if inspect.isclass(obj) else "function"
        shown = obj.__init__ if kind == "class" and name != "FreezecacheError" else obj
        sig = _signature(name, shown).replace("(self, ", "(").replace("(self)", "()")
        if name == "FreezecacheError":
            sig = name
        parts.append(f"#### `freezecache.{sig}`\n\n{_markdown(obj.__doc__ or '')}")
        for method in METHODS.get(name, ()):
            fn = getattr(obj, method)
            msig = _signature(method, fn).replace("(self, ", "(").replace("(self)", "()")
            parts.append(f"##### `.{msig}`\n\n{_markdown(fn.__doc__ or '')}")
    return "\n".join(parts)
