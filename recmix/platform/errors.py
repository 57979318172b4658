"""User-facing errors: one clear line, exit code 2, no traceback."""


class RecmixError(ValueError):
    """A user mistake (bad input, missing file, checksum mismatch). The CLI prints it and exits 2."""
