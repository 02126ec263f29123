"""Bounded reading of small files a user or a damaged disk may hand us: a size cap read without
reading more than the cap, UTF-8 checked, and YAML whose alias expansion is capped before it
can cost memory. Every failure is one ``error`` with a message that names the file."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

import yaml

MAX_NODES = 20_000  # YAML nodes after alias expansion: nested aliases cannot blow up memory


KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
         (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def not_regular(mode: int) -> str | None:
    """What a file of ``mode`` is when it is not a regular file ("a named pipe"), else None."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in KINDS if test(mode)), "not a regular file")


def open_regular(path: str | os.PathLike, error: type[Exception], what: str) -> BinaryIO:
    """``path`` opened for reading in binary, refused in one line unless it is a regular file: a
    named pipe, a device or a socket could block a reader forever (or never end). The file is
    opened without blocking (a named pipe with no writer would block ``open`` itself) and checked
    on the descriptor, so that a swap after a check cannot slip one in."""
    path = Path(path)
    try:
        kind = not_regular(os.stat(path).st_mode)   # a device is never even opened
        if kind is None:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
            try:
                kind = not_regular(os.fstat(fd).st_mode)
                if kind is None:
                    return os.fdopen(fd, "rb")
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
    except FileNotFoundError:
        raise error(f"{path} not found; give the path of an existing file") from None
    except PermissionError:
        raise error(f"cannot read {path}: permission denied; check its permissions") from None
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
    if kind == "a folder":
        raise error(f"{path} is a folder, not {what} file")
    raise error(f"{path} is {kind}, not a regular file; it is not {what} file")


def read_bytes_bounded(path: str | os.PathLike, limit: int, error: type[Exception], what: str) -> bytes:
    """The bytes of a small regular file, refusing anything larger than ``limit`` bytes without
    reading more than ``limit + 1`` bytes, and anything that is not a regular file (a named pipe
    would block, a device never end) without reading it at all."""
    path = Path(path)
    fh = open_regular(path, error, what)
    try:
        with fh:
            raw = fh.read(limit + 1)
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
    return parse_yaml_bounded(read_text_bounded(path, limit, error, what), str(path), error, what)


def parse_yaml_bounded(text: str, where: str, error: type[Exception], what: str) -> tuple[Any, Any]:
    """``load_yaml_bounded`` of text already read (bounded by its reader); ``where`` names it.
    Plain data only: a tag (``!!python/...``) or a merge key is one line saying so."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        check_yaml_size(root, what, where, error)  # type: ignore[arg-type]
        return yaml.load(text, Loader=_UniqueKeyLoader), root  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f", line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or ["?"])[0]
        if problem.startswith("could not determine a constructor for the tag"):
            tag = problem.rsplit(" ", 1)[-1].strip("'").replace("tag:yaml.org,2002:", "!!")
            raise error(f"{where}{at}: " + ("a merge key (<<) is not supported: write the values out" if tag == "!!merge"
                        else f"the tag {tag} is not allowed: {what} is plain data (names, numbers, true/false)")) from None
        raise error(f"{where}{at}: not valid YAML ({problem})") from None
    except RecursionError:
        raise error(f"{where}: nested too deeply to be {what}") from None


def yaml_line(root: Any, path: tuple) -> int | None:
    """The line of the node at ``path`` (mapping keys, sequence indices) in a composed YAML tree,
    else of the nearest enclosing node YAML marks; the one way a record's error names its line."""
    node, line = root, None
    for step in path:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(step)]
            if not match:
                break
            line, node = match[0][0].start_mark.line + 1, match[0][1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) and 0 <= step < len(node.value):
            node = node.value[step]
            line = node.start_mark.line + 1
        else:
            break
    return line
