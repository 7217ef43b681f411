"""The job's one error type for user mistakes, and the import of user-named targets.

Torch-free, so that the config can be refused before torch loads. Everything that a user
can get wrong in a config, a data loader or a checkpoint path ends as one
:class:`ConfigError`: the CLI prints its message on one line and exits with code 2.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config value (or a file it names) that cannot run; ``key`` is its dotted name."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config error at {key}: {message}")
        self.key = key


class RunFailed(RuntimeError):
    """A run that cannot go on (training diverged, a peer's data differs); the CLI prints
    its message on one line and exits with code 1."""


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def import_target(spec: str, key: str, base_dir: Path = Path(".")) -> tuple[str, Any]:
    """Import ``package.module:attr`` or ``path/to/file.py:attr``.

    :returns: the spec with a file path made to work from the working directory, and the
        object it names.
    :raises ConfigError: naming ``key`` when the file is missing or does not import.
    """
    module, sep, attr = spec.rpartition(":")
    require(
        bool(sep and module and attr),
        key,
        f"{spec!r} is neither a built-in name nor package.module:attr / path/to/file.py:attr",
    )
    try:
        if module.endswith(".py"):
            found = [p for p in (Path(module), base_dir / module) if p.is_file()]
            require(
                bool(found),
                key,
                f"file {module!r} does not exist (relative paths are tried from the working "
                "directory and from the config's directory)",
            )
            spec = f"{found[0]}:{attr}"
            name = f"distsvi_user_{found[0].stem}_{abs(hash(str(found[0].resolve())))}"
            if name not in sys.modules:
                loader_spec = importlib.util.spec_from_file_location(name, found[0])
                mod = importlib.util.module_from_spec(loader_spec)
                sys.modules[name] = mod
                try:
                    loader_spec.loader.exec_module(mod)
                except BaseException:
                    del sys.modules[name]
                    raise
            mod = sys.modules[name]
        else:
            mod = importlib.import_module(module)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the user's module raises, report it under the key
        raise ConfigError(
            key, f"{module!r} does not import: {type(e).__name__}: {first_line(e)}"
        ) from None
    require(hasattr(mod, attr), key, f"{module!r} has no attribute {attr!r}")
    return spec, getattr(mod, attr)
