"""The one exception type for mistakes a user can fix."""


class NibbleError(Exception):
    """A user-fixable problem: bad path, corrupt file, missing tensor, bad config value, bad data line.

    The message is one line that names the file or key and says what to do. The CLI prints it
    as ``error: <message>`` and exits with status 2, without a traceback.
    """
