"""The one exception type a case can fail with; its message names the file and the problem.

Everything in the inference core that refuses a case's input, a method's result or a weights folder raises CaseError;
the runner reports any other exception as an unexpected failure (a bug), with the traceback in the verbose log.
Only input discovery (`layouts.discover`: no input folder, no scan at all) raises ValueError, which stops the run
before any case (exit code 2).
"""


class CaseError(Exception):
    """A problem with one case's input (or a weights folder) that stops that case but not the batch."""
