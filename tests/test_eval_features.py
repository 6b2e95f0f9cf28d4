import logging

import numpy as np
import pytest
import torch

from data_fixtures import write_video
from vjepa_fast.eval.features import FeatureSet, autocast, cached_features, encode, encoder_for_frames
from vjepa_fast.eval.protocols import predict
from vjepa_fast.eval.views import ViewSpec, video_views
from vjepa_fast.models import VisionTransformer, sincos_3d


def _encoder(num_frames=4, use_rope=False):
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, num_frames=num_frames, patch_size=8, tubelet_size=2, embed_dim=24, depth=1,
                             num_heads=2, use_rope=use_rope).eval().requires_grad_(False)


def _videos(tmp_path, count=3):
    rng = np.random.default_rng(0)
    return [write_video(tmp_path / f"v{i}.webm", rng.integers(0, 256, size=(20, 24, 32, 3), dtype=np.uint8))
            for i in range(count)]


def test_multi_clip_multi_view_tokens_are_the_encoder_on_each_clip(tmp_path):
    encoder = _encoder()
    paths = _videos(tmp_path, 2)
    spec = ViewSpec(num_frames=4, sampling_rate=2, crop_size=16, num_segments=2, num_views=3)
    features = cached_features(encoder, paths, [0, 1], spec, cache_dir=str(tmp_path / "cache"), progress=False)
    assert features.tokens.shape == (2, 3, 2 * encoder.num_patches, 24)  # segments concatenated as tokens
    views = video_views(paths[1], spec)  # [V, S, 3, T, C, C]
    for view in range(3):
        expected = torch.cat([encoder(views[view, s:s + 1])[0] for s in range(2)])
        actual = torch.from_numpy(features.tokens[1, view].astype(np.float32))
        torch.testing.assert_close(actual, expected, atol=2e-3, rtol=2e-3)  # stored as float16


def test_cache_is_reused_across_labelings_and_keyed_by_the_weights(tmp_path):
    encoder = _encoder()
    calls = []
    encoder.register_forward_hook(lambda *_: calls.append(1))
    paths = _videos(tmp_path)
    spec = ViewSpec(num_frames=4, sampling_rate=2, crop_size=16)
    first = cached_features(encoder, paths, [0, 1, 2], spec, cache_dir=str(tmp_path / "c"), progress=False)
    n = len(calls)
    again = cached_features(encoder, paths, [2, 2, 0], spec, cache_dir=str(tmp_path / "c"), progress=False)
    assert len(calls) == n > 0 and again.path == first.path  # other labels, same videos: no encoder pass
    np.testing.assert_array_equal(again.tokens, first.tokens)
    assert again.labels.tolist() == [2, 2, 0]
    with torch.no_grad():
        encoder.norm.bias.add_(1.0)
    changed = cached_features(encoder, paths, [0, 1, 2], spec, cache_dir=str(tmp_path / "c"), progress=False)
    assert changed.path != first.path and len(calls) > n


def test_unusable_videos_are_replaced_by_another_sample_and_named(tmp_path, caplog):
    paths = _videos(tmp_path, 3)
    paths.insert(1, str(tmp_path / "missing.webm"))
    with caplog.at_level(logging.WARNING):
        features = cached_features(_encoder(), paths, [0, 1, 2, 3], ViewSpec(4, 2, 16),
                                   cache_dir=str(tmp_path / "c"), progress=False)
    # the official loaders draw another sample (and its label) until one loads: the split keeps its size
    rows = features.rows.tolist()
    assert len(rows) == 4 and rows[0] == 0 and rows[2:] == [2, 3] and rows[1] in (0, 2, 3)
    assert features.labels.tolist() == rows  # label i for video i: the replacement's label
    assert "missing.webm" in caplog.text and "replaced" in caplog.text


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_the_probes_run_in_float16_on_cuda_as_official():
    assert autocast(torch.device("cuda")).fast_dtype == torch.float16
    assert not autocast(torch.device("cpu"))._enabled


@pytest.mark.parametrize("use_rope", [False, True])
def test_the_fast_encoder_pass_gives_the_reference_features(use_rope):
    encoder = _encoder(use_rope=use_rope)
    calls = []
    encoder.blocks[0].register_forward_hook(lambda *_: calls.append("dense"))  # forward_packed bypasses it
    clips = torch.randn(3, 3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    fast = encode(encoder, clips)
    assert calls == [] and not fast.requires_grad
    torch.testing.assert_close(fast, encoder(clips), rtol=1e-5, atol=1e-5)  # CPU, float32


def test_shorter_clips_use_the_first_rows_of_the_sincos_embedding():
    encoder = _encoder(num_frames=8)
    still = encoder_for_frames(encoder, 2)
    assert still.num_frames == 2 and still.num_patches == 4
    torch.testing.assert_close(still.pos_embed[0], sincos_3d(24, 1, 2, True).float())
    assert torch.equal(still.blocks[0].mlp.fc1.weight, encoder.blocks[0].mlp.fc1.weight)
    assert encoder_for_frames(encoder, 8) is encoder


def test_a_rope_encoder_takes_clips_of_any_length_as_it_is(tmp_path):
    encoder = _encoder(num_frames=4, use_rope=True)
    assert encoder_for_frames(encoder, 8) is encoder and encoder_for_frames(encoder, 2) is encoder
    paths = _videos(tmp_path, 1)
    spec = ViewSpec(num_frames=8, sampling_rate=2, crop_size=16)  # longer clips than the encoder was built for
    features = cached_features(encoder, paths, [0], spec, cache_dir=str(tmp_path / "cache"), progress=False)
    assert features.tokens.shape == (1, 1, 4 * 4, 24)
    expected = encoder(video_views(paths[0], spec)[0])[0]
    torch.testing.assert_close(torch.from_numpy(features.tokens[0, 0].astype(np.float32)), expected, atol=2e-3,
                               rtol=2e-3)  # stored as float16


def test_views_are_averaged_as_probabilities():
    tokens = np.random.default_rng(0).normal(size=(4, 3, 5, 6)).astype(np.float16)  # 4 items, 3 views
    features = FeatureSet(tokens, rows=np.array([0, 2, 3]), labels=np.array([0, 1, 2]), path="")
    first_token = torch.nn.Module()
    first_token.forward = lambda t: t[:, 0, :4]  # logits = the first token's first 4 dims
    probs = predict(first_token, features, torch.device("cpu"), batch_size=2)
    expected = torch.from_numpy(tokens[[0, 2, 3], :, 0, :4].astype(np.float32)).softmax(-1).mean(1)
    torch.testing.assert_close(probs, expected)
