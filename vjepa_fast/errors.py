"""The errors a user can act on. The command line prints their message on one line (the traceback with --debug);
any other exception is a bug and shows its traceback."""


class UserError(ValueError):
    """A bad value, option or file the user gave; the message names it (the key and value, the file, the option)."""


class RunStopped(RuntimeError):
    """Work stopped for a reason the message names, with what to change: out of memory, repeated non-finite steps, a
    dataset whose videos are mostly unusable."""
