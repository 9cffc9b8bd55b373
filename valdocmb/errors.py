"""The one exception type a case can fail with; its message names the file and the problem."""


class CaseError(Exception):
    """A problem with one case's input that stops that case but not the batch."""
