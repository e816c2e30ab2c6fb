"""The one exception type the data package shows to users."""


class DataError(Exception):
    """A user-facing data problem. The message is one line naming the file and line, the path or the config key."""
