"""params.yaml and the profiles, read and written as DVC reads and writes them.

DVC reads params.yaml with ruamel.yaml's safe loader, YAML 1.2 (``dvc.utils.serialize``'s
``parse_yaml``): what it hashes, shows (``dvc params diff``, ``dvc exp show``) and writes back
on ``dvc exp run -S`` is that reading. PyYAML reads YAML 1.1, where the same text means other
things (``off`` is False, ``1e-3`` a string, ``010`` octal 8), so every reader of params goes
through :func:`parse_yaml` here and the stages train with the values DVC shows. One difference
is ours: a key written twice in one mapping is refused in one line that names it and both
lines (ruamel refuses it too, in a dozen lines that name the line of the mapping, not of the
first key).

Imports ruamel.yaml only, never DVC (a stage's start-up pays for what it imports).
"""

from __future__ import annotations

from io import StringIO
from pathlib import Path

from freezecache.core.errors import FreezecacheError


def _safe():
    from ruamel.yaml import YAML

    return YAML(typ="safe")  # dvc.utils.serialize._yaml.parse_yaml's loader


def parse_yaml(text: str, source: str) -> object:
    """The document in ``text`` as DVC parses a params file (an empty one: ``{}``); a syntax
    error or a duplicate key is one FreezecacheError line naming ``source``."""
    from ruamel.yaml.constructor import DuplicateKeyError
    from ruamel.yaml.error import YAMLError

    try:
        return _safe().load(text) or {}
    except DuplicateKeyError:
        raise FreezecacheError(_duplicate(text, source)) from None
    except YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        message = f"{source}:{where} not valid YAML ({problem}) — fix the syntax"
        raise FreezecacheError(message) from None


def load_yaml(path: str | Path) -> object:
    """:func:`parse_yaml` of a file."""
    path = Path(path)
    return parse_yaml(path.read_text(encoding="utf-8"), str(path))


def parse_value(text: str, source: str) -> object:
    """One value written as in params.yaml (``4``, ``off``, ``[1, 2]``), e.g. a ``KEY=VALUE``
    option on the command line; the empty string is None, as ``key:`` is in a file."""
    return parse_yaml(f"v: {text}", source)["v"] if text.strip() else None


def dump_yaml(data: object) -> str:
    """``data`` as DVC writes params.yaml back (ruamel.yaml, block style, YAML 1.2): read
    again by :func:`parse_yaml`, every value means what it meant."""
    from ruamel.yaml import YAML

    yaml = YAML()  # dvc.utils.serialize._yaml._get_yaml
    yaml.default_flow_style = False
    out = StringIO()
    yaml.dump(data, out)
    return out.getvalue()


def _duplicate(text: str, source: str) -> str:
    """The first key written twice in one mapping, with the lines of both."""
    from ruamel.yaml.nodes import MappingNode, SequenceNode

    def walk(node, path: str) -> str | None:
        if isinstance(node, MappingNode):
            seen: dict[object, int] = {}
            for key, value in node.value:
                name = f"{path}.{key.value}" if path else str(key.value)
                line = key.start_mark.line + 1
                if key.value in seen:
                    return (
                        f"{source}: {name} is written twice (lines {seen[key.value]} and {line}); "
                        "DVC refuses the file — keep one"
                    )
                seen[key.value] = line
                if found := walk(value, name):
                    return found
        elif isinstance(node, SequenceNode):
            for i, item in enumerate(node.value):
                if found := walk(item, f"{path}.{i}"):
                    return found
        return None

    return walk(_safe().compose(text), "") or f"{source}: a key is written twice — keep one"
