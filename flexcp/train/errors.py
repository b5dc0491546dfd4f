"""The recipe's one kind of stop that is not a bug: :class:`RunError`, whose message names the cause and the fix."""

from __future__ import annotations


class RunError(RuntimeError):
    """A run cannot go on for a reason its message names, with the fix (``flexcp finetune`` prints it, exit status 2).

    Raised on every rank alike (each reaches the same verdict, or receives it from rank 0), so no
    rank is left waiting in a collective.
    """
