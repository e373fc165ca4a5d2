"""The family of errors that mean "the input or the settings are wrong", not "the code is wrong".

The command line prints these (and OSError: a missing file, a full disk) as one
``fvvae <stage>: error: ...`` line with exit status 2; anything else is a bug and keeps its
traceback. Each subclass is also a ValueError (or, for missing data, a FileNotFoundError): the
API's error for bad input.
"""

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


class UserError(Exception):
    """Base of the project's user-facing errors."""


def is_user_error(err: BaseException) -> bool:
    """True for the project's user errors, OSError (missing file, full disk), and a ValueError or
    TypeError raised by the project's own checks (its raising frame is in this package): bad input by
    the API's contract. A ValueError raised inside another library is a bug here and keeps its traceback."""
    if isinstance(err, (UserError, OSError)):
        return True
    if not isinstance(err, (ValueError, TypeError)):
        return False
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE)
