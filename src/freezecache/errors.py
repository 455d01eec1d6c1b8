"""User-facing errors: one line that says what is wrong and what to do."""


class FreezecacheError(Exception):
    """An error caused by the user's input (params, data files, caches).

    The CLI and the stages print ``error: <message>`` and exit with status 2, no traceback.
    """
