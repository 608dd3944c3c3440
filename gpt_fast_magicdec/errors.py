"""The one exception type for mistakes a user can fix (bad flag, bad checkpoint, bad prompt).

CLIs catch `UserError` and print its message as one line with a non-zero exit, no traceback.
Anything else is a bug and keeps its traceback."""


class UserError(Exception):
    """A problem with the user's input. The message says what is wrong and what to do."""
