"""The `adl` logger: every part logs through a child of it (logging.getLogger("adl.<part>")),
and configure() (the CLI's --log-level, run_job) installs the one handler that writes
each record as `[adl HH:MM:SS] message` on stderr."""
from __future__ import annotations

import logging
import re

from common.logs import configure

LINE = r"\[adl \d\d:\d\d:\d\d\] "


def test_child_loggers_write_through_the_configured_handler(capsys):
    adl = logging.getLogger("adl")
    assert configure() is adl and len(adl.handlers) == 1
    level = adl.level   # INFO unless a test set another
    try:
        configure()   # installed once
        assert len(adl.handlers) == 1
        logging.getLogger("adl.storage").info("storage: a retry")
        logging.getLogger("adl.scheduler").debug("not at INFO")
        configure("warning")   # --log-level WARNING
        logging.getLogger("adl.driver").info("hidden")
        logging.getLogger("adl.driver").warning("a warning")
    finally:
        adl.setLevel(level)
    err = capsys.readouterr().err
    assert re.fullmatch(f"{LINE}storage: a retry\n{LINE}a warning\n", err), err


def test_a_registered_secret_never_reaches_a_log_line(capsys):
    from common.redact import register
    configure()
    secret = "hf_" + "x7Q2planted" * 2
    logging.getLogger("adl.driver").info(f"a model answered 401 to {secret}")
    assert secret in capsys.readouterr().err   # not registered yet: the test can fail
    register(secret)   # what `adl run --spec-env` does for each name adl submit --env forwarded
    logging.getLogger("adl.driver").info(f"a model answered 401 to {secret}")
    err = capsys.readouterr().err
    assert secret not in err and err.endswith("a model answered 401 to ***\n"), err
