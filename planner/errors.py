"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class PlannerError(Exception):
    """A problem with the user's input or environment, worded for the user (one line, no traceback)."""
