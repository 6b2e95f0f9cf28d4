"""Bad input accounting: unusable videos are skipped, counted by reason, logged once, and stop training when most
of the files tried fail (docs/design.md, section 6: bad input never stops training silently or loses work)."""
import logging

import numpy as np

from ..errors import RunStopped

logger = logging.getLogger(__name__)

SKIP_REASONS = ("missing", "empty", "truncated", "undecodable", "unsupported", "too_short", "too_large")

# Most files failing is checked once this many distinct files (or the whole dataset, if smaller) were tried.
MIN_FILES_FOR_FAILURE_CHECK = 8


class VideoError(Exception):
    """A video that cannot be used: `reason` is one of SKIP_REASONS, `detail` says what was found."""

    def __init__(self, reason: str, detail: str):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def describe_failures(failures: list[tuple[str, str, str]], limit: int = 5) -> str:
    """One line per (path, reason, detail), the first `limit` of them."""
    lines = [f"  {path}: {reason} ({detail})" for path, reason, detail in failures[:limit]]
    if len(failures) > limit:
        lines.append(f"  ... and {len(failures) - limit} more")
    return "\n".join(lines)


class SkipTracker:
    """Main-process record of the load attempts workers report with each batch.

    An attempt is (dataset index, reason, detail), with reason None for a clip that loaded. Counts skips by reason,
    logs each bad file once (logger "vjepa_fast.dali_pipelines.bad_input"), and raises RunStopped when more than half
    of the distinct files tried are bad.
    """

    def __init__(self, paths: tuple[str, ...]):
        self.paths = paths
        self.counts = dict.fromkeys(SKIP_REASONS, 0)
        self.bad_files: dict[str, str] = {}  # path -> reason, in the order they were logged
        self._bad_details: dict[str, str] = {}
        self._tried = np.zeros(len(paths), dtype=bool)
        self._num_tried = 0

    def record(self, attempts: list[tuple[int, str | None, str | None]]) -> None:
        for index, reason, detail in attempts:
            if not self._tried[index]:
                self._tried[index] = True
                self._num_tried += 1
            if reason is None:
                continue
            self.counts[reason] += 1
            path = self.paths[index]
            if path not in self.bad_files:
                self.bad_files[path] = reason
                self._bad_details[path] = detail
                logger.warning("skipping video %s: %s (%s)", path, reason, detail)
        enough_tried = self._num_tried >= min(MIN_FILES_FOR_FAILURE_CHECK, len(self.paths))
        if enough_tried and len(self.bad_files) > self._num_tried / 2:
            failures = [(path, reason, self._bad_details[path]) for path, reason in self.bad_files.items()]
            raise RunStopped(f"{len(self.bad_files)} of the {self._num_tried} distinct videos tried are unusable; "
                             f"check the dataset files:\n{describe_failures(failures)}")
