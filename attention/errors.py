"""Errors the attention library raises for input it cannot compute on.

The library knows nothing of HTTP: the service maps these to a 422 in one place.
"""


class AttentionInputError(ValueError):
    """The input or a parameter cannot be used; `field` names the request field at fault."""

    def __init__(self, message: str, *, field: str | None = None, value: object = None) -> None:
        super().__init__(message)
        self.field = field
        self.value = value


class AnswerOverflowError(AttentionInputError):
    """The arithmetic overflowed float32: the inputs (or supplied weights) are too large."""
