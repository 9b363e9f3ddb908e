"""The one error type a user sees: a single line naming the file or setting and the fix."""


class V2LError(Exception):
    """Bad input or a stage run out of order. The message is shown as one line."""
