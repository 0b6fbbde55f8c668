"""rmjob's reward-model trainer.

Kept import-light on purpose (no torch, no datasets): ``python -m rmjob_trainer --help``,
config validation and the operator's use of :mod:`rmjob_trainer.config` must not pay for the
heavy imports.
"""

from rmjob_trainer.config import RewardConfig


class UserInputError(ValueError):
    """Bad input the user has to fix (a flag, a config file, a dataset).

    The command line prints it as one ``error: <message>`` line and exits with status 2,
    like argparse does, instead of a traceback.
    """


class ConfigError(UserInputError):
    """An invalid flag, config-file key or value; the message names the flag."""


class DataError(UserInputError):
    """Unusable training data (missing columns, invalid rows, nothing left after filtering)."""


__all__ = ["ConfigError", "DataError", "RewardConfig", "UserInputError"]
