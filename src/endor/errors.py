"""Typed errors for user-facing failures (bad files, bad arguments)."""


class FormatError(ValueError):
    """A file or tensor does not follow docs/FORMAT.md. The message names the file, the tensor and
    what is wrong."""

    def __init__(self, reason: str, *, path=None, tensor=None):
        self.reason = reason
        self.path = None if path is None else str(path)
        self.tensor = tensor
        where = []
        if self.path is not None:
            where.append(f"file {self.path!r}")
        if tensor is not None:
            where.append(f"tensor {tensor!r}")
        super().__init__(f"{', '.join(where)}: {reason}" if where else reason)

    def at(self, *, path=None, tensor=None) -> "FormatError":
        """The same error, located in a file and/or tensor it did not yet name."""
        return FormatError(self.reason, path=self.path or path, tensor=self.tensor or tensor)
