"""Probe training as the official evals train: the frozen encoder runs every epoch on freshly augmented clips."""
import numpy as np
import pytest
import torch

from data_fixtures import write_video
from vjepa_fast.eval.augment import Rngs
from vjepa_fast.errors import UserError
from vjepa_fast.eval.online import AugmentedDataset, EncodedBatches
from vjepa_fast.eval.protocols import epoch_order
from vjepa_fast.eval.views import ViewSpec, train_video_clips
from vjepa_fast.models import VisionTransformer

SPEC = ViewSpec(num_frames=4, sampling_rate=2, crop_size=16, num_segments=2)


def _encoder():
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, num_frames=4, patch_size=8, tubelet_size=2, embed_dim=24, depth=1,
                             num_heads=2).eval().requires_grad_(False)


def _videos(tmp_path, count):
    rng = np.random.default_rng(0)
    return [write_video(tmp_path / f"v{i}.webm", rng.integers(0, 256, size=(30, 24, 32, 3), dtype=np.uint8))
            for i in range(count)]


def test_each_epoch_encodes_every_video_once_freshly_augmented(tmp_path):
    encoder = _encoder()
    calls = []
    encoder.register_forward_hook(lambda *_: calls.append(1))
    paths = _videos(tmp_path, 5)
    batches = EncodedBatches(encoder, paths, [0, 1, 2, 3, 4], SPEC, kind="video", batch_size=3, micro_batch=2,
                             seed=3, device=torch.device("cpu"), num_workers=0)
    assert len(batches) == 2
    epochs = []
    for e in range(2):
        sizes, chunks = [], []
        for size, micro in batches.epoch(e):
            sizes.append(size)
            chunks += list(micro)
        assert sizes == [3, 2] and [len(labels) for _, labels in chunks] == [2, 1, 2]  # micro-batches of 2
        epochs.append(chunks)
    assert len(calls) == 6  # the encoder runs each epoch, a micro-batch at a time: no training features are stored
    for epoch, got in enumerate(epochs):
        labels = torch.cat([labels for _, labels in got])
        order = epoch_order(5, 3, epoch)
        assert labels.tolist() == order.tolist()  # one sample per video, in the sampler's order
        tokens = torch.cat([t for t, _ in got])
        assert tokens.shape == (5, 2 * encoder.num_patches, 24)  # the segments' tokens concatenated
        first = int(order[0])
        clips = train_video_clips(paths[first], SPEC, Rngs.seeded(hash((3, epoch, first)) % 2 ** 63))
        torch.testing.assert_close(tokens[0], encoder(clips).reshape(-1, 24))
    assert not torch.equal(torch.cat([t for t, _ in epochs[0]])[epoch_order(5, 3, 0).argsort()],
                           torch.cat([t for t, _ in epochs[1]])[epoch_order(5, 3, 1).argsort()])  # fresh draws


def test_unusable_training_videos_are_replaced_by_another_sample(tmp_path):
    paths = _videos(tmp_path, 3) + [str(tmp_path / "missing.webm")]
    batches = EncodedBatches(_encoder(), paths, [0, 1, 2, 3], SPEC, kind="video", batch_size=4, micro_batch=4,
                             seed=0, device=torch.device("cpu"), num_workers=0)
    (size, chunks), = list(batches.epoch(0))
    (tokens, labels), = list(chunks)
    assert len(labels) == 4 and 3 not in labels.tolist()  # the replacement's label, as the official loader
    assert batches.skips.bad_files == {paths[3]: "missing"}


def test_a_dataset_of_unusable_items_names_the_files_that_failed(tmp_path):
    paths = [str(tmp_path / f"missing{i}.webm") for i in range(2)]
    dataset = AugmentedDataset(paths, [0, 1], SPEC, "video", seed=0)
    with pytest.raises(UserError, match=r"100 unusable items drawn in a row \(2 files: .*missing0.webm, "
                                        r".*missing1.webm\)"):
        dataset[0]
