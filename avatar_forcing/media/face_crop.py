"""Square face crops for the avatar portrait and for the user's camera frames.

Faces are found with OpenCV's Haar cascade (shipped inside the opencv wheel, no download).
A detection box covers roughly forehead to chin; the crop expands it by `scale` around a
centre moved up by `lift` (in units of the detection's side) so that hair and chin fit, as in
talking-head datasets. When upright detection fails, the frame is also searched rotated by
+-15 and +-30 degrees, so tilted heads are still found; the crop itself is never rotated,
because head pose is part of the motion the model reads.

- `crop_portrait`: one image, the largest face.
- `crop_video`: a whole clip; the box is tracked, gaps are interpolated and the track is
  smoothed in time (median, then Gaussian) so that the crop does not jitter.
- `crop_frame`: one frame at a time for streaming; the box follows detections with an
  exponential moving average and holds still when a frame has no face.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from avatar_forcing.config import MotionAutoEncoderConfig

CASCADE_PATH = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
ROTATIONS = (15.0, -15.0, 30.0, -30.0)  # degrees tried, in order, when upright detection fails
# The mouth relative to a Haar detection, in units of its side (FaceCropper.mouth_region).
MOUTH_BELOW_DETECTION = 0.2
MOUTH_HALF_SIZE = (0.18, 0.28)  # (half height, half width)


class NoFaceError(ValueError):
    """No face where one is required; the message names the source and the frame index."""


@dataclass(frozen=True)
class FaceBox:
    """A square crop region in source-image pixels: centre (cx, cy) and side length."""

    cx: float
    cy: float
    side: float

    def toward(self, other: FaceBox, weight: float) -> FaceBox:
        """Move `weight` of the way to `other` (0 stays, 1 jumps)."""
        return FaceBox(
            self.cx + weight * (other.cx - self.cx),
            self.cy + weight * (other.cy - self.cy),
            self.side + weight * (other.side - self.side),
        )


def _check_frame(name: str, frame: np.ndarray) -> None:
    if not isinstance(frame, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array, got {type(frame).__name__}")
    if frame.dtype != np.uint8:
        raise ValueError(f"{name}: expected dtype uint8, got {frame.dtype}")
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.shape[0] == 0 or frame.shape[1] == 0:
        raise ValueError(f"{name}: expected an RGB image of shape (H, W, 3), got {frame.shape}")


def _smooth(track: np.ndarray, median_window: int, sigma: float) -> np.ndarray:
    """(T, C) -> (T, C): running median (drops single-frame outliers), then a Gaussian (no lag)."""
    if track.shape[0] < 2:
        return track
    half = median_window // 2
    if half > 0:
        padded = np.pad(track, ((half, half), (0, 0)), mode="edge")
        windows = np.lib.stride_tricks.sliding_window_view(padded, median_window, axis=0)  # (T, C, w)
        track = np.median(windows, axis=-1)
    if sigma > 0:
        radius = max(1, round(3 * sigma))
        offsets = np.arange(-radius, radius + 1)
        kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
        kernel /= kernel.sum()
        padded = np.pad(track, ((radius, radius), (0, 0)), mode="edge")
        windows = np.lib.stride_tricks.sliding_window_view(padded, kernel.size, axis=0)  # (T, C, k)
        track = windows @ kernel
    return track


class FaceCropper:
    """Finds a face and cuts a square `size` x `size` RGB crop around it.

    size: output side in pixels.
    scale: crop side / detected face side (Haar boxes span about forehead to chin).
    lift: how far the crop centre sits above the detection centre, in detection sides.
    search_frames: `crop_video` requires a face within this many leading frames.
    detect_every: `crop_video` runs the detector on every k-th frame and interpolates between.
    smoothing: Gaussian sigma, in frames, of the `crop_video` box track.
    stream_weight: `crop_frame` moves the box this fraction of the way to each new detection.
    min_face: smallest face searched, as a fraction of the image's shorter side.
    detect_side: images are shrunk so their longer side is at most this before detection.
    """

    def __init__(
        self,
        size: int,
        scale: float = 1.8,
        lift: float = 0.1,
        search_frames: int = 50,
        detect_every: int = 1,
        smoothing: float = 2.0,
        stream_weight: float = 0.4,
        min_face: float = 0.1,
        detect_side: int = 360,
    ) -> None:
        if not isinstance(size, int) or size < 8:
            raise ValueError(f"size: expected an integer >= 8, got {size!r}")
        if not scale > 0:
            raise ValueError(f"scale: expected > 0, got {scale!r}")
        if not isinstance(search_frames, int) or search_frames < 1:
            raise ValueError(f"search_frames: expected an integer >= 1, got {search_frames!r}")
        if not isinstance(detect_every, int) or detect_every < 1:
            raise ValueError(f"detect_every: expected an integer >= 1, got {detect_every!r}")
        if smoothing < 0:
            raise ValueError(f"smoothing: expected >= 0 frames, got {smoothing!r}")
        if not 0 < stream_weight <= 1:
            raise ValueError(f"stream_weight: expected 0 < stream_weight <= 1, got {stream_weight!r}")
        if not 0 < min_face < 1:
            raise ValueError(f"min_face: expected a fraction in (0, 1), got {min_face!r}")
        if not isinstance(detect_side, int) or detect_side < 64:
            raise ValueError(f"detect_side: expected an integer >= 64, got {detect_side!r}")
        self.size = size
        self.scale = scale
        self.lift = lift
        self.search_frames = search_frames
        self.detect_every = detect_every
        self.smoothing = smoothing
        self.stream_weight = stream_weight
        self.min_face = min_face
        self.detect_side = detect_side
        self._cascade = cv2.CascadeClassifier(str(CASCADE_PATH))
        if self._cascade.empty():
            raise RuntimeError(f"{CASCADE_PATH}: OpenCV could not load the Haar cascade")

    @classmethod
    def for_model(cls, config: MotionAutoEncoderConfig, **options: Any) -> FaceCropper:
        """The crops a motion auto-encoder takes: its image size and its framing (`crop_scale`)."""
        return cls(config.image_size, scale=config.crop_scale, **options)

    def mouth_region(self) -> tuple[float, float, float, float]:
        """Where a mouth lies in this cropper's crops: (top, bottom, left, right) as fractions of the
        side. A Haar box is centred near the nose; the mouth sits about a fifth of its side below
        that centre at any head pose the detector finds, so the region is a band 0.36 of the box
        high and 0.56 wide around that point, placed by the framing (`scale`, `lift`)."""
        centre = 0.5 + (MOUTH_BELOW_DETECTION + self.lift) / self.scale
        half_height, half_width = MOUTH_HALF_SIZE[0] / self.scale, MOUTH_HALF_SIZE[1] / self.scale
        return (
            max(0.0, centre - half_height),
            min(1.0, centre + half_height),
            max(0.0, 0.5 - half_width),
            min(1.0, 0.5 + half_width),
        )

    # --- detection ------------------------------------------------------------------------------

    def detect(self, frame: np.ndarray) -> list[FaceBox]:
        """Crop boxes of every face found in `frame` (H, W, 3) uint8, largest first; [] if none."""
        _check_frame("frame", frame)
        grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        shrink = min(1.0, self.detect_side / max(grey.shape))
        if shrink < 1.0:
            grey = cv2.resize(grey, None, fx=shrink, fy=shrink, interpolation=cv2.INTER_AREA)
        grey = cv2.equalizeHist(grey)
        height, width = grey.shape
        min_side = max(24, round(self.min_face * min(height, width)))
        for angle in (0.0, *ROTATIONS):
            if angle:
                rotation = cv2.getRotationMatrix2D((width / 2, height / 2), angle, 1.0)  # (2, 3)
                searched = cv2.warpAffine(grey, rotation, (width, height), borderMode=cv2.BORDER_REPLICATE)
                back = cv2.invertAffineTransform(rotation)
            else:
                searched, back = grey, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
            found = self._cascade.detectMultiScale(
                searched, scaleFactor=1.1, minNeighbors=5, minSize=(min_side, min_side)
            )
            if len(found):
                break
        else:
            return []
        boxes = []
        for x, y, w, h in found:
            side = float(max(w, h))
            centre = back @ np.array([x + w / 2, y + h / 2, 1.0])  # rotated -> detection image
            cx, cy = centre / shrink
            side /= shrink
            boxes.append(FaceBox(float(cx), float(cy - self.lift * side), self.scale * side))
        return sorted(boxes, key=lambda box: box.side, reverse=True)

    @staticmethod
    def _match(boxes: list[FaceBox], previous: FaceBox) -> FaceBox | None:
        """The detection that continues `previous` (near it and of similar size), if any."""
        plausible = [
            box
            for box in boxes
            if 2 / 3 <= box.side / previous.side <= 3 / 2
            and np.hypot(box.cx - previous.cx, box.cy - previous.cy) <= 0.5 * previous.side
        ]
        if not plausible:
            return None
        return min(plausible, key=lambda box: np.hypot(box.cx - previous.cx, box.cy - previous.cy))

    # --- cropping -------------------------------------------------------------------------------

    def crop(self, frame: np.ndarray, box: FaceBox) -> np.ndarray:
        """Cut `box` out of `frame` and resize to (size, size, 3).

        The box is shifted inside the frame where it fits; where it is larger than the frame,
        the missing border is filled by repeating the edge pixels.
        """
        _check_frame("frame", frame)
        height, width = frame.shape[:2]
        side = max(1, round(box.side))
        x0, y0 = round(box.cx - side / 2), round(box.cy - side / 2)
        x0 = min(max(x0, 0), width - side) if side <= width else (width - side) // 2
        y0 = min(max(y0, 0), height - side) if side <= height else (height - side) // 2
        region = frame[max(y0, 0) : min(y0 + side, height), max(x0, 0) : min(x0 + side, width)]
        top, left = max(0, -y0), max(0, -x0)
        bottom, right = side - top - region.shape[0], side - left - region.shape[1]
        if top or bottom or left or right:
            region = cv2.copyMakeBorder(region, top, bottom, left, right, cv2.BORDER_REPLICATE)
        interpolation = cv2.INTER_AREA if side > self.size else cv2.INTER_CUBIC
        return cv2.resize(region, (self.size, self.size), interpolation=interpolation)

    def crop_portrait(self, image: np.ndarray, source: str) -> np.ndarray:
        """(H, W, 3) uint8 -> (size, size, 3) crop around the largest face.

        `source` names the image in errors (a file name, an avatar id).
        """
        _check_frame("image", image)
        boxes = self.detect(image)
        if not boxes:
            raise NoFaceError(f"{source}: no face found in the image ({image.shape[1]}x{image.shape[0]})")
        return self.crop(image, boxes[0])

    def track(self, frames: np.ndarray, source: str) -> list[FaceBox]:
        """(T, H, W, 3) uint8 -> one smoothed crop box per frame, following one face.

        The face is the largest one in the first frame that has a face, which must be among the
        first `search_frames` frames (else NoFaceError naming `source` and the frames searched);
        later detections are kept only where they continue the track. Frames without a kept
        detection take the box interpolated from their neighbours (held at the ends).
        """
        if not isinstance(frames, np.ndarray):
            raise ValueError(f"frames: expected a numpy array, got {type(frames).__name__}")
        if frames.dtype != np.uint8:
            raise ValueError(f"frames: expected dtype uint8, got {frames.dtype}")
        if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
            raise ValueError(f"frames: expected a clip of shape (T, H, W, 3) with T >= 1, got {frames.shape}")
        num_frames = frames.shape[0]

        searched = min(self.search_frames, num_frames)
        for first in range(searched):
            boxes = self.detect(frames[first])
            if boxes:
                break
        else:
            raise NoFaceError(
                f"{source}: no face found in frames 0-{searched - 1} "
                f"(a face must appear within the first {searched} of {num_frames} frames)"
            )
        previous = boxes[0]
        detections = {first: previous}
        for index in range(first + self.detect_every, num_frames, self.detect_every):
            match = self._match(self.detect(frames[index]), previous)
            if match is not None:
                detections[index] = previous = match

        known = np.array(sorted(detections))
        values = np.array([[detections[i].cx, detections[i].cy, detections[i].side] for i in known])  # (K, 3)
        every = np.arange(num_frames)
        path = np.stack([np.interp(every, known, values[:, c]) for c in range(3)], axis=1)  # (T, 3)
        path = _smooth(path, median_window=5, sigma=self.smoothing)
        return [FaceBox(float(cx), float(cy), float(side)) for cx, cy, side in path]

    def crop_video(self, frames: np.ndarray, source: str) -> np.ndarray:
        """(T, H, W, 3) uint8 -> (T, size, size, 3) crops along the smoothed track of one face.

        See `track` for how the face is chosen and followed; `source` names the clip in errors.
        """
        boxes = self.track(frames, source)
        crops = np.empty((len(boxes), self.size, self.size, 3), np.uint8)
        for index, box in enumerate(boxes):
            crops[index] = self.crop(frames[index], box)
        return crops

    def crop_frame(
        self, frame: np.ndarray, previous_box: FaceBox | None = None, source: str = "frame"
    ) -> tuple[np.ndarray, FaceBox]:
        """One streaming frame (H, W, 3) uint8 -> its (size, size, 3) crop and the box used.

        Pass the returned box back in with the next frame. Without `previous_box` the frame must
        contain a face (else NoFaceError naming `source`); with it, a frame without a matching
        face reuses `previous_box`.
        """
        _check_frame("frame", frame)
        boxes = self.detect(frame)
        if previous_box is None:
            if not boxes:
                raise NoFaceError(f"{source}: no face found to start the crop track")
            box = boxes[0]
        else:
            match = self._match(boxes, previous_box)
            box = previous_box if match is None else previous_box.toward(match, self.stream_weight)
        return self.crop(frame, box), box


class FaceTrack:
    """Streaming face crops of one camera: detect every `detect_every` frames, follow the box between.

    Detection is the expensive part (tens of ms per frame on a CPU core); a head moves little
    in 1/5 s, so the box found on one frame serves the next few. Shared by the in-process live
    session and the session ingress so both crop identically.
    """

    def __init__(self, cropper: FaceCropper, detect_every: int = 5) -> None:
        if detect_every < 1:
            raise ValueError(f"detect_every: expected >= 1, got {detect_every}")
        self.cropper = cropper
        self.detect_every = detect_every
        self.box: FaceBox | None = None
        self.frames_seen = 0

    def crops(self, frames: np.ndarray, source: str = "camera") -> np.ndarray:
        """(n, H, W, 3) uint8 frames -> (n, size, size, 3) crops; NoFaceError until a face is found."""
        out = []
        for frame in frames:
            label = f"{source} frame {self.frames_seen}"
            if self.box is None or self.frames_seen % self.detect_every == 0:
                crop, self.box = self.cropper.crop_frame(frame, self.box, source=label)
            else:
                _check_frame("frame", frame)
                crop = self.cropper.crop(frame, self.box)
            out.append(crop)
            self.frames_seen += 1
        size = self.cropper.size
        return np.stack(out) if out else np.zeros((0, size, size, 3), np.uint8)

    def state(self) -> list[float]:
        box = [] if self.box is None else [self.box.cx, self.box.cy, self.box.side]
        return [float(self.frames_seen), *box]

    def load_state(self, state: list[float]) -> None:
        self.frames_seen = int(state[0])
        self.box = FaceBox(*state[1:]) if len(state) == 4 else None
