"""Which dataset item each position of a rank's infinite sample stream holds, as a pure function of the seed.

Per epoch: a seeded permutation of the dataset (or, with sampling probabilities, a seeded draw with replacement),
padded by repetition to a multiple of world_size and dealt to ranks round-robin (as torch's DistributedSampler and
the official DistributedWeightedSampler); epochs are chained, so the stream never ends.
"""
import math

import numpy as np

# Stream tags keep the epoch orders and the per-clip generators apart although both derive from the same seed.
ORDER_STREAM = 0
CLIP_STREAM = 1


class SampleOrder:
    """The sample stream of one rank: stream position -> (global sample position, dataset index)."""

    def __init__(self, num_items: int, seed: int, rank: int, world_size: int,
                 probabilities: np.ndarray | None = None):
        self.num_items = num_items
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.probabilities = probabilities
        self.per_rank = math.ceil(num_items / world_size)  # positions per epoch on each rank
        self.epoch_size = self.per_rank * world_size
        self._cached_epoch = (-1, None)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Dataset indices [epoch_size] of one epoch, all ranks interleaved (rank r holds slots r, r+W, ...)."""
        if self._cached_epoch[0] != epoch:
            rng = np.random.default_rng((self.seed, ORDER_STREAM, epoch))
            if self.probabilities is None:
                order = np.resize(rng.permutation(self.num_items), self.epoch_size)  # pads by repeating the start
            else:
                order = rng.choice(self.num_items, size=self.epoch_size, p=self.probabilities)
            self._cached_epoch = (epoch, order)
        return self._cached_epoch[1]

    def draw(self, position: int) -> tuple[int, int]:
        """(global sample position, dataset index) at this rank's stream position; the global position is unique
        across ranks and epochs, and seeds the clip's own random choices."""
        epoch, offset = divmod(position, self.per_rank)
        slot = offset * self.world_size + self.rank
        return epoch * self.epoch_size + slot, int(self.epoch_order(epoch)[slot])

    def batch(self, step: int, batch_size: int) -> list[tuple[int, int]]:
        """The draws of batch `step`: stream positions step*batch_size .. step*batch_size + batch_size - 1."""
        return [self.draw(position) for position in range(step * batch_size, (step + 1) * batch_size)]
