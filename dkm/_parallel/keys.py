"""Structured task keys, so the dashboard's task stream reads as the algorithm.

A key is ``<algorithm>-<phase>-<token>[-<counter>...][-<index>]``, e.g.
``lloyd-assign-3f9a1c07b2-r0-it5-1``. The task stream colours tasks by the words before the
first token-like word (:func:`dask.utils.key_split`), so ``lloyd-assign`` and
``kmeans||-round`` show as what they do; the token keeps keys of concurrent fits apart and
the counters keep the keys of one fit unique.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

__all__ = ["Keys"]


def _token() -> str:
    # key_split stops at the first word that is not purely alphabetic; a token made only of
    # the letters a-f would be read as part of the prefix.
    token = uuid.uuid4().hex[:10]
    return token if not token.isalpha() else "0" + token[1:]


@dataclass(frozen=True)
class Keys:
    """Key maker for one fit: ``keys("lloyd", "assign", it=5)``.

    Parameters
    ----------
    token : str
        Unique per fit (:meth:`new` draws one).
    counters : tuple of str
        Counters every key of this maker carries (see :meth:`sub`).
    """

    token: str
    counters: tuple[str, ...] = ()

    @classmethod
    def new(cls) -> Keys:
        return cls(_token())

    def sub(self, **counters: int) -> Keys:
        """A maker whose keys also carry ``counters`` (e.g. ``r=2`` for the third start)."""
        return Keys(self.token, self.counters + tuple(f"{k}{v}" for k, v in counters.items()))

    def __call__(self, algorithm: str, phase: str, **counters: int) -> str:
        words = [algorithm, phase, self.token, *self.counters]
        words += [f"{k}{v}" for k, v in counters.items()]
        return "-".join(words)
