"""Output files that appear whole or not at all (the jsonl outputs of `t5g score` / `generate`)."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, TextIO


@contextlib.contextmanager
def atomic_write(path: str) -> Iterator[TextIO]:
  """A text file written under a temporary name beside `path` and renamed to `path` when the
  block ends normally; on an error it is removed and `path` is left as it was."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      yield f
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
