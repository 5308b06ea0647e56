"""The one exception type that the CLI turns into a single clear sentence and a non-zero exit."""


class EffbenchError(Exception):
    """A user-facing error: bad config value, missing data, absent hardware, unusable weights.

    The message is one sentence that names the bad value and says how to fix it.
    """
