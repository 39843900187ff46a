"""The one base class of the user's own mistakes (a bad config or input, a mismatched model).

Every stage entry point (minimodel/cli.run_stage) ends such an error with its one-line message and exit code 2, not
a traceback; every other exception is a bug and keeps its traceback. Subclasses name the part that raised it
(ConfigError, ManifestError, MiniPostError, PlugError, EvaluationError, ...).
"""


class UserError(ValueError):
    """The message names the problem and the fix."""


class MissingInputError(UserError, FileNotFoundError):
    """An input file or directory the user named does not exist or is not what the stage needs."""
