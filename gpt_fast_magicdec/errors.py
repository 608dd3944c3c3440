"""The exception types for mistakes a user can fix (bad flag, bad checkpoint, bad prompt).

CLIs catch `UserError` and print its message as one line with a non-zero exit, no traceback.
Anything else is a bug and keeps its traceback."""
from __future__ import annotations

import string


class UserError(Exception):
    """A problem with the user's input. The message says what is wrong and what to do."""


class ParameterError(UserError):
    """A bad argument of the Python API, whose message names the parameters it is about.

    The message is a template with a `{name}` field per parameter: the library says `gamma must be
    >= 1`, and a CLI renames the fields to its flags (`--gamma must be >= 1`) with `named(flags)`.
    Values go into the template directly, so a field is written with doubled braces in an f-string:
    `ParameterError(f"{{gamma}} must be >= 1, got {gamma}")`."""

    def __init__(self, template: str):
        self.template = template
        super().__init__(self.named({}))

    def __reduce__(self):  # sent between ranks as its template, so every rank can name its flags
        return type(self), (self.template,)

    @property
    def parameters(self) -> list[str]:
        return [field for _, field, _, _ in string.Formatter().parse(self.template) if field]

    def named(self, names: dict) -> str:
        """The message with each parameter called names[parameter] (default: its Python name)."""
        return self.template.format(**{p: names.get(p, p) for p in self.parameters})


def literal(value) -> str:
    """`value` as text to put into a ParameterError template as is: a path or a prompt may contain
    braces, which the template would otherwise read as parameter names."""
    return str(value).replace("{", "{{").replace("}", "}}")
