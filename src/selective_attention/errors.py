"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user (missing file, invalid option, ...): shown as one line, exit code 2."""
