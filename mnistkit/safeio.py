"""Bounded reading of small files a user or a damaged disk may hand us: a size cap read without
reading more than the cap, UTF-8 checked, and YAML whose alias expansion is capped before it
can cost memory. Every failure is one ``error`` with a message that names the file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

MAX_NODES = 20_000  # YAML nodes after alias expansion: nested aliases cannot blow up memory


def read_bytes_bounded(path: str | os.PathLike, limit: int, error: type[Exception], what: str) -> bytes:
    """The bytes of a small file, refusing anything larger than ``limit`` bytes (and endless
    sources such as /dev/zero) without reading more than ``limit + 1`` bytes."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(limit + 1)
    except FileNotFoundError:
        raise error(f"{path} not found; give the path of an existing file") from None
    except IsADirectoryError:
        raise error(f"{path} is a folder, not {what} file") from None
    except PermissionError:
        raise error(f"cannot read {path}: permission denied; check its permissions") from None
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > limit:
        raise error(f"{path} is larger than {limit // 1024:,} KiB; it is not {what} file")
    return raw


def read_text_bounded(path: str | os.PathLike, limit: int, error: type[Exception], what: str) -> str:
    """The UTF-8 text of a small file, bounded as ``read_bytes_bounded``."""
    raw = read_bytes_bounded(path, limit, error, what)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{Path(path)} is not UTF-8 text; it is not {what} file") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML says keys are unique;
    PyYAML would silently keep the last value)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: let PyYAML report it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def check_yaml_size(root: Any, what: str, path: Path, error: type[Exception]) -> None:
    """Count nodes as loading would build them, aliases expanded, and stop early: the "billion
    laughs" shape (aliases of aliases) is refused before it costs memory."""
    count, stack = 0, [root] if root is not None else []
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise error(f"{path} expands to more than {MAX_NODES:,} YAML nodes (nested aliases?); it is not {what}")
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                stack += [k, v]
        elif isinstance(node, yaml.SequenceNode):
            stack += node.value


def load_yaml_bounded(path: str | os.PathLike, limit: int, error: type[Exception], what: str) -> tuple[Any, Any]:
    """``(data, root)`` of a small YAML file: the loaded data and its node tree (with line
    marks), bounded in bytes and in expanded nodes, with unique keys. A YAML error is one line
    naming the file and the line."""
    path = Path(path)
    text = read_text_bounded(path, limit, error, what)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        check_yaml_size(root, what, path, error)
        return yaml.load(text, Loader=_UniqueKeyLoader), root
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{path}{where}: not valid YAML ({problem})") from None
    except RecursionError:
        raise error(f"{path}: nested too deeply to be {what}") from None
