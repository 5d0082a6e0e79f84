"""Stopping the processors without committing (the commit story: see the Checkpoint docstring, item 4)."""

from __future__ import annotations

import logging
import os
from typing import Any, NoReturn

log = logging.getLogger(__name__)

# Exit status when records could not be delivered or skipped messages not read: a restart redoes them.
EXIT_DELIVERY_FAILED = 75
# Exit status when the dead-letter limit stopped the worker (EX_DATAERR, as the sink): a restart reads the same
# messages again.
EXIT_DEAD_LETTER_LIMIT = 65


def exit_without_committing(status: int, message: str, **extra: Any) -> NoReturn:
    """Logs `message` (critical, with `extra`) and ends the process at once: no faust shutdown runs, so no commit
    barrier and no offset commit either. Everything after the last commit is redone by the next worker."""
    log.critical(message, extra=extra)
    logging.shutdown()
    os._exit(status)
