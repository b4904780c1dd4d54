"""The passage record and the retriever protocol that rollouts code against."""
from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable


@dataclasses.dataclass(frozen=True)
class Passage:
  """One retrieved passage. `score` is the retriever's similarity (higher = closer). `raw_contents`: the
  corpus record's `contents` as read when it is not the canonical '"Title"\\ntext' (e.g. an unquoted title),
  else None, so equal passages compare equal however they were read."""
  id: str
  title: str
  text: str
  score: float = 0.0
  raw_contents: str | None = None

  @property
  def contents(self) -> str:
    """The wiki-18 form: the record's own `contents` byte for byte when it had one (Search-R1 formats
    observations from it, quotes or not), else '"Title"\\ntext'."""
    if self.raw_contents is not None:
      return self.raw_contents
    return f'"{self.title}"\n{self.text}'

  @classmethod
  def from_contents(cls, id: str, contents: str, score: float = 0.0) -> "Passage":
    """Parses wiki-18 `contents`: first line is the title (surrounding quotes removed), the rest is text."""
    title, _, text = contents.partition("\n")
    if len(title) >= 2 and title[0] == '"' and title[-1] == '"':
      title = title[1:-1]
    canonical = f'"{title}"\n{text}'
    raw = None if contents == canonical else contents
    return cls(id=str(id), title=title, text=text, score=score, raw_contents=raw)


@runtime_checkable
class Retriever(Protocol):

  def retrieve(self, queries: list[str], topk: int) -> list[list[Passage]]:
    """One list per query, sorted by score (descending), at most `topk` passages each."""
    ...


def check_queries(queries: list[str], topk: int) -> None:
  """Validates `Retriever.retrieve` arguments."""
  if isinstance(queries, str) or not all(isinstance(q, str) for q in queries):
    raise TypeError("queries must be a list of strings")
  if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
    raise ValueError(f"topk must be a positive integer, got {topk!r}")
