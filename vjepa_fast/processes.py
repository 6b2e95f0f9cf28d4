"""Whether another process still runs, from its pid alone (no handle on it): a loader worker watching the training
process, a dataset build finding the temporary folders of builders that were killed."""
import os


def process_gone(pid: int) -> bool:
    """Whether process `pid` has ended; a zombie (ended, not yet reaped by its parent) counts as ended."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # it exists, as another user's process
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"  # the state follows "(command name)"
    except (OSError, IndexError):
        return False  # no /proc (macOS): os.kill's answer stands
