"""The two kinds of failure the tool reports: bad usage (exit 2) and a model it cannot widen (exit 1)."""


class WidenError(Exception):
    """The model cannot be widened or validated; the message names the node or tensor."""

    exit_code = 1


class UsageError(WidenError):
    """The request itself is wrong (bad factor, output over input, missing file...)."""

    exit_code = 2
