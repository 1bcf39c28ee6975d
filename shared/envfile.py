"""KEY=value env files (the local stack's stack.env, the CLI's --env-file): one reader, one writer, one quoting."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from dotenv import dotenv_values, set_key

# Values of only these characters are written bare, so a stack.env of URLs, paths and ids stays plain
# KEY=value lines (what shells and simple readers expect); anything else is quoted.
_BARE = re.compile(r"[\w./:@,+=%-]*", re.ASCII)


def read_env_file(path: Path) -> dict[str, str]:
    """The file's values, as written by `write_env_file` or by hand (comments, blank lines, `export `
    prefixes, single or double quotes). `${VAR}` is kept literally. Raises OSError if unreadable."""
    with open(path, encoding="utf-8") as fh:  # dotenv_values(path) would return {} for a missing file
        values = dotenv_values(stream=fh, interpolate=False)
    return {key: value for key, value in values.items() if value is not None}  # None: a line with no '='


def write_env_file(path: Path, env: Mapping[str, str], mode: int | None = None) -> None:
    """Write `env` so that `read_env_file` gives it back unchanged. A value with characters outside
    `_BARE` is single-quoted with `\\` and `'` escaped (python-dotenv's own quoting); a shell can source
    the file (`set -a; . FILE`) as long as no value holds a quote or backslash. A carriage return reads
    back as a newline (text files). Readers see the old file or the whole new one. `mode` (e.g. 0o600
    for secrets): the file has it from its creation, before any value is written."""
    tmp = path.with_name(f".{path.name}.writing")
    tmp.unlink(missing_ok=True)
    if mode is not None:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode))
        os.chmod(tmp, mode)  # the umask may have narrowed it
    for key, value in env.items():
        set_key(tmp, key, value, quote_mode="never" if _BARE.fullmatch(value) else "always")
    tmp.touch()  # an empty env still yields a file
    if mode is not None:
        os.chmod(tmp, mode)
    tmp.replace(path)


def load_env_file(path: Path) -> dict[str, str]:
    """`read_env_file` into os.environ (the file's values win); returns them."""
    loaded = read_env_file(path)
    os.environ.update(loaded)
    return loaded
