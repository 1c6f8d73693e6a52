"""Environment variables set for the length of a ``with`` block, then put back as they were."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set ``values`` in ``os.environ``; on exit restore each variable (or remove it if it was unset)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
