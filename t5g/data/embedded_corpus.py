"""The embedded corpus: real English text that every Python install carries, for offline runs.

The documents are the help topics of Python's own documentation (`pydoc_data.topics`, the text
behind `help("assignment")`): 79 topics, about 465,000 characters of prose and code samples on
CPython 3.11. The text changes a little between Python releases; the shipped vocabulary records
which corpus it was trained on (see `t5g.data.make_embedded_vocabulary`).
"""

from __future__ import annotations

from t5g.errors import MissingDependencyError


def documents() -> list[str]:
  """The corpus as one document per help topic, in the order of the topic names.

  Raises:
    RuntimeError: this Python was installed without `pydoc_data`.
  """
  try:
    from pydoc_data.topics import topics
  except ImportError as error:
    raise MissingDependencyError(
        "the embedded corpus needs Python's pydoc_data.topics, which this Python install lacks "
        "(minimal installs may omit it); install the full standard library or use a task over "
        "your own files instead") from error
  return [topics[name] for name in sorted(topics)]
