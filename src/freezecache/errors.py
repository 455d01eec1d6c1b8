"""User-facing errors: one line that says what is wrong and what to do."""


class FreezecacheError(Exception):
    """An error caused by the user's input (params, data files, caches).

    The CLI and the stages print ``error: <message>`` and exit with status 2, no traceback.
    """


class ModelOptionError(FreezecacheError):
    """A model that cannot be built as asked, because of one option of the ``model`` params.

    ``key`` names the option under ``model`` (``name``, ``kwargs``, ``kwargs.patch_size``), so
    the code that knows the params can say where to fix it; the message does not repeat it.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
