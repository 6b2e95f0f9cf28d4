"""Decode only the frames a clip needs with PyAV (any codec FFmpeg reads), classifying unusable files.

A probe demuxes the packets once (no decoding) to count the frames and learn their presentation timestamps; it is
cached per process. Reading then seeks to the keyframe before the first needed frame and decodes forward to the
last one, falling back to decoding from the start when the seek cannot be trusted.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

from .bad_input import VideoError

# A container that declares a duration but whose video packets end before this fraction of it is truncated.
# (Not 1.0: an audio track may legitimately outlast the video by a little.)
TRUNCATED_DURATION_FRACTION = 0.9


def pyav():
    """The PyAV module, imported on first use: importing this package (as training and benchmarks on in-memory
    data do) must not need PyAV, which GPU images often lack."""
    try:
        import av
    except ImportError as e:
        raise ImportError(f"decoding or encoding video needs PyAV, which is not importable ({e}): pip install av") \
            from e
    return av


@dataclass(frozen=True)
class VideoInfo:
    """What the probe learnt: the frame count and the frames' presentation timestamps (sorted, in the stream's time
    base; None when the container gives no usable timestamps, so frames are located by decoding from the start),
    the codec (FFmpeg's name: h264, vp9, ...), frame size, frame rate and keyframe spacing (seeking cost)."""
    num_frames: int
    frame_pts: np.ndarray | None
    codec: str
    width: int
    height: int
    fps: float
    num_keyframes: int
    max_keyframe_gap: int  # most packets from a keyframe to the next one (or to the end)


def probe_video(path: str) -> VideoInfo:
    """Frame count and timestamps of `path`; raises VideoError for a missing, empty, unreadable or truncated file."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise VideoError("missing", "no such file") from None
    if stat.st_size == 0:
        raise VideoError("empty", "zero-byte file")
    return _probe(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8192)
def _probe(path: str, mtime_ns: int, size: int) -> VideoInfo:
    """probe_video's work, cached per (path, modification time, size) so a rewritten file is probed again."""
    av = pyav()
    try:
        container = av.open(path)
    except (av.FFmpegError, OSError) as error:
        raise VideoError("undecodable", f"cannot open: {error}") from None
    with container:
        if not container.streams.video:
            raise VideoError("unsupported", "no video stream")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise VideoError("unsupported", "FFmpeg has no decoder for its video codec")
        codec, width, height = stream.codec_context.name, stream.codec_context.width, stream.codec_context.height
        if width <= 0 or height <= 0:
            raise VideoError("undecodable", f"no frame size in the {codec} stream header")
        pts, end_pts, keyframes = [], None, []
        try:
            for packet in container.demux(stream):
                if packet.size == 0 or packet.is_discard:
                    continue  # the end-of-stream flush packet; frames an edit list hides are never shown
                if packet.is_keyframe:
                    keyframes.append(len(pts))
                pts.append(packet.pts)
                if packet.pts is not None:
                    packet_end = packet.pts + (packet.duration or 0)
                    end_pts = packet_end if end_pts is None else max(end_pts, packet_end)
        except av.FFmpegError as error:
            if not pts:
                raise VideoError("undecodable", f"cannot read packets: {error}") from None
            raise VideoError("truncated", f"packets stop after {len(pts)} frames: {error}") from None
        if not pts:
            raise VideoError("undecodable", "no video frames")
        if stream.frames > 0 and len(pts) < stream.frames:
            raise VideoError("truncated", f"{len(pts)} of the {stream.frames} frames its header declares")
        _check_duration(container, stream, end_pts)
        fps = float(stream.average_rate or stream.guessed_rate or 0)
    frame_pts = None if None in pts or len(set(pts)) != len(pts) else np.sort(np.asarray(pts, dtype=np.int64))
    gaps = np.diff(keyframes + [len(pts)]) if keyframes else [len(pts)]
    return VideoInfo(len(pts), frame_pts, codec, width, height, fps, len(keyframes), int(max(gaps)))


def _check_duration(container, stream, end_pts: int | None) -> None:
    """Raise 'truncated' when the video packets end well before the duration the container header declares."""
    av = pyav()
    if stream.duration:
        declared = float(stream.duration * stream.time_base)
    elif container.duration:
        declared = container.duration / av.time_base
    else:
        return
    if end_pts is None:
        return
    ends_at = float((end_pts - (stream.start_time or 0)) * stream.time_base)
    if ends_at < TRUNCATED_DURATION_FRACTION * declared:
        raise VideoError("truncated", f"video ends at {ends_at:.2f} s of the {declared:.2f} s its header declares")


def read_frames(path: str, indices: np.ndarray, info: VideoInfo) -> np.ndarray:
    """uint8 RGB frames [len(indices), H, W, 3] at the given presentation-order indices (repeats allowed)."""
    av = pyav()
    wanted = np.unique(indices)
    to_rgb = av.video.reformatter.VideoReformatter()  # reused: a fresh one per frame costs ~7x more on small frames
    try:
        frames = None
        if info.frame_pts is not None:
            frames = _decode_after_seek(path, wanted, info.frame_pts, to_rgb)
        if frames is None:
            frames = _decode_from_start(path, wanted, to_rgb)
    except av.FFmpegError as error:
        raise VideoError("undecodable", f"decoding failed: {error}") from None
    shapes = {frame.shape[:2] for frame in frames.values()}
    if shapes != {(info.height, info.width)}:
        sizes = ", ".join(f"{w}x{h}" for h, w in sorted(shapes))
        raise VideoError("unsupported", f"frames decode at {sizes}, the stream header says {info.width}x{info.height}")
    return np.stack([frames[index] for index in indices.tolist()])


def _decode_after_seek(path: str, wanted: np.ndarray, frame_pts: np.ndarray,
                       to_rgb) -> dict[int, np.ndarray] | None:
    """Frames by index, decoded from the keyframe before wanted[0]; None when the decoded timestamps show the seek
    landed after the first wanted frame or frames do not match the probe (the caller then decodes from the start)."""
    first, last = int(wanted[0]), int(wanted[-1])
    needed = set(wanted.tolist())
    frames = {}
    with pyav().open(path) as container:
        stream = container.streams.video[0]
        if first > 0:
            container.seek(int(frame_pts[first]), stream=stream, backward=True, any_frame=False)
        for decoded_count, frame in enumerate(container.decode(stream)):
            index = int(np.searchsorted(frame_pts, frame.pts)) if frame.pts is not None else -1
            known = 0 <= index < len(frame_pts) and frame_pts[index] == frame.pts
            if not known or (decoded_count == 0 and index > first):
                return None  # a timestamp the probe did not see, or the seek landed past the first wanted frame
            if index in needed:
                frames[index] = to_rgb.reformat(frame, format="rgb24").to_ndarray()
            if index >= last:
                break
    return frames if len(frames) == len(needed) else None


def _decode_from_start(path: str, wanted: np.ndarray, to_rgb) -> dict[int, np.ndarray]:
    """Frames by index, counting decoded frames from the first: slow but needs no timestamps."""
    last = int(wanted[-1])
    needed = set(wanted.tolist())
    frames = {}
    decoded_count = 0
    with pyav().open(path) as container:
        for index, frame in enumerate(container.decode(container.streams.video[0])):
            decoded_count = index + 1
            if index in needed:
                frames[index] = to_rgb.reformat(frame, format="rgb24").to_ndarray()
            if index >= last:
                break
    if len(frames) < len(needed):
        raise VideoError("undecodable", f"only {decoded_count} frames decode, frame {last} is needed")
    return frames
