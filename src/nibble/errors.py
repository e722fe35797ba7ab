"""The one exception type for mistakes a user can fix, and the one for a run stopped by a signal."""


class NibbleError(Exception):
    """A user-fixable problem: bad path, corrupt file, missing tensor, bad config value, bad data line.

    The message is one line that names the file or key and says what to do. The CLI prints it
    as ``error: <message>`` and exits with status 2, without a traceback.
    """


class StepFailed(NibbleError):
    """A user-fixable failure inside a training step (a reward function that raised, say): the run first checkpoints
    its last completed step, so that after the fix ``--resume`` goes on from there."""


class Interrupted(BaseException):
    """A training run stopped by SIGINT or SIGTERM.

    ``step`` is the step of the checkpoint written before stopping, or None when a second signal stopped
    the run at once (only complete checkpoints are left either way). Like KeyboardInterrupt it is not an
    ``Exception``, so no ``except Exception`` on the way up swallows it. The CLI exits with ``128 + signum``
    (130 for Ctrl-C, 143 for SIGTERM).
    """

    def __init__(self, signum: int, step: int | None = None, checkpoint: object = None):
        super().__init__(signum, step)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type's name when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
