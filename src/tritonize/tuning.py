"""The persistent tuning cache: the fastest measured kernel config per (kernel, card, shape class), as JSON.

Two layers, looked up in this order:
  1. the user's file, `$TRITONIZE_TUNING_CACHE` (default `~/.cache/tritonize/tuning.json`), which
     `autotuning()` fills: a new process reads what an earlier one measured;
  2. the table shipped inside tritonize (`tritonize/data/tuning.json`), measured by the maintainers on
     the cards it names (regenerated with `tritonize bench --model bert-base --tune` after removing the
     card's entries; see docs/benchmarks.md).
Entries are keyed by the card's name, so a config measured on one GPU never steers another. A miss
means the kernel's own shape heuristic. Plain JSON (no pickle), written atomically.

This module knows nothing of Triton: it stores dictionaries; `tritonize.ops` turns them into kernel
configs and asks the kernels to time candidates while `autotuning()` is on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger("tritonize")

ENV_PATH = "TRITONIZE_TUNING_CACHE"
SHIPPED = Path(__file__).with_name("data") / "tuning.json"
FORMAT_VERSION = 1

_lock = threading.Lock()
_autotuning = threading.local()


def user_path() -> Path:
    """Where measured configs are written: $TRITONIZE_TUNING_CACHE or ~/.cache/tritonize/tuning.json."""
    return Path(os.environ.get(ENV_PATH) or Path.home() / ".cache" / "tritonize" / "tuning.json")


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        logger.warning("tritonize: ignoring the unreadable tuning cache %s (%s)", path, err)
        return {}
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
        logger.warning("tritonize: ignoring tuning cache %s: not a version-%d tritonize cache", path, FORMAT_VERSION)
        return {}
    return data


class TuningCache:
    """{kernel: {card: {shape key: config dict}}} from the user's file over the shipped table."""

    def __init__(self, path: Path | None = None, shipped: Path = SHIPPED) -> None:
        self.path = path or user_path()
        self._shipped = _read(shipped).get("entries", {})
        self._user = _read(self.path).get("entries", {})

    def get(self, kernel: str, card: str, key: str) -> dict | None:
        for layer in (self._user, self._shipped):
            found = layer.get(kernel, {}).get(card, {}).get(key)
            if found is not None:
                return found
        return None

    def entries(self, kernel: str, card: str) -> dict[str, dict]:
        """Every {shape key: config} of one kernel on one card, the user's over the shipped ones."""
        return {**self._shipped.get(kernel, {}).get(card, {}), **self._user.get(kernel, {}).get(card, {})}

    def put(self, kernel: str, card: str, key: str, config: dict) -> None:
        """Records a measured config and rewrites the user's file (atomically: temp file, then rename)."""
        with _lock:
            self._user.setdefault(kernel, {}).setdefault(card, {})[key] = config
            self.path.parent.mkdir(parents=True, exist_ok=True)
            payload = json.dumps({"version": FORMAT_VERSION, "entries": self._user}, indent=1, sort_keys=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, suffix=".tmp") as tmp:
                tmp.write(payload)
            os.replace(tmp.name, self.path)


_cache: TuningCache | None = None
_cache_env: str | None = None  # the $TRITONIZE_TUNING_CACHE that _cache was read under


def cache() -> TuningCache:
    """The process's cache, read on first use and again when $TRITONIZE_TUNING_CACHE changes (a string
    comparison per call: this runs on every linear launch)."""
    global _cache, _cache_env
    env = os.environ.get(ENV_PATH)
    if _cache is None or env != _cache_env:
        with _lock:
            _cache, _cache_env = TuningCache(), env
    return _cache


@contextlib.contextmanager
def autotuning() -> Iterator[None]:
    """Within it (this thread), a kernel launch whose config the cache lacks times its candidates
    first and stores the fastest. Outside it, misses use the kernels' shape heuristics."""
    previous = getattr(_autotuning, "on", False)
    _autotuning.on = True
    try:
        yield
    finally:
        _autotuning.on = previous


def is_autotuning() -> bool:
    return getattr(_autotuning, "on", False)
