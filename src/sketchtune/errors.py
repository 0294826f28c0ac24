"""One exception type for everything a user can get wrong, so the CLI can print it as a single line."""


class SketchError(ValueError):
    """Bad input (arguments, model, checkpoint or data): the message is meant to be shown as is."""
