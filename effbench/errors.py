"""The one exception type that the CLI turns into a single clear sentence and a non-zero exit."""


class EffbenchError(Exception):
    """A user-facing error: bad config value, missing data, absent hardware, unusable weights.

    The message is one sentence that names the bad value and says how to fix it.
    """


def root_cause(err: BaseException) -> BaseException:
    """The error under Hydra's ``InstantiationException`` wrappers (``raise … from err``)."""
    seen = set()
    while type(err).__name__ == "InstantiationException" and err.__cause__ is not None \
            and id(err) not in seen:
        seen.add(id(err))
        err = err.__cause__
    return err


def user_message(err: BaseException) -> str | None:
    """One sentence for an error the user caused (bad value, unknown option), else None.

    Hydra wraps what a constructor raises while it instantiates an object; the user must see the
    constructor's own sentence, once, not the wrapper.
    """
    import re

    cause = root_cause(err)
    if isinstance(cause, EffbenchError):
        return str(cause)
    match = re.search(r"unexpected keyword argument '(\w+)'", str(cause))
    if isinstance(cause, TypeError) and match:
        where = re.search(r"full_key: (\S+)", str(err))
        group = where.group(1) if where else "the config"
        return (f"{group}.{match.group(1)} is not an option of this {group}; remove "
                f"{group}.{match.group(1)}=… (see `effbench --cfg job` for the options).")
    return None
