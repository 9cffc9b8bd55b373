"""The two exception types the runner expects; their messages name the file or folder and the problem.

- CaseError: a problem with one case's input, a method's result, a weights folder or one case's output file. That
  case fails (its outputs are removed), the batch goes on.
- RunError: the run cannot start (no input folder, no scan at all, an unusable output folder or setting): exit 2
  before any inference.
The runner reports any other exception as an unexpected failure of that case (a bug), with the traceback in the
verbose log.
"""


class CaseError(Exception):
    """A problem with one case that stops that case but not the batch."""


class RunError(Exception):
    """A problem that stops the whole run before it starts."""
