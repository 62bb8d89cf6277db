"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user (missing file, invalid option, ...): shown as one line, exit code 2."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message ("" when it has none): what a one-line error quotes."""
    text = str(e).strip()
    return text.splitlines()[0] if text else ""
