"""Face crops: portrait and video detection, tracking stability, errors naming their source."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from avatar_forcing.config import ModelConfig, tiny
from avatar_forcing.media.face_crop import FaceBox, FaceCropper, NoFaceError
from avatar_forcing.media.io import load_image, read_video

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    return load_image(SAMPLES / "portrait.png")


@pytest.fixture(scope="module")
def user_frames() -> np.ndarray:
    return read_video(SAMPLES / "user.mp4").frames[:60]  # (60, 144, 176, 3)


def test_portrait_crop_finds_the_face(portrait: np.ndarray) -> None:
    cropper = FaceCropper(128)
    boxes = cropper.detect(portrait)
    assert boxes, "no face in samples/portrait.png"
    box = boxes[0]
    height, width = portrait.shape[:2]
    assert 0.25 * width < box.cx < 0.75 * width and 0.2 * height < box.cy < 0.7 * height
    crop = cropper.crop_portrait(portrait, "portrait.png")
    assert crop.shape == (128, 128, 3) and crop.dtype == np.uint8
    # The crop is centred on the face, so cropping it again finds the face near the centre.
    again = FaceCropper(128).detect(crop)
    assert again and abs(again[0].cx - 64) < 16


def test_video_crop_tracks_the_user(user_frames: np.ndarray) -> None:
    cropper = FaceCropper(96, detect_every=2)
    boxes = cropper.track(user_frames, "user.mp4")
    assert len(boxes) == user_frames.shape[0]
    track = np.array([[b.cx, b.cy, b.side] for b in boxes])  # (T, 3)
    assert np.abs(np.diff(track, axis=0)).max() < 4, "box jumps between neighbouring frames"
    crops = cropper.crop_video(user_frames, "user.mp4")
    assert crops.shape == (60, 96, 96, 3) and crops.dtype == np.uint8


def test_static_face_gives_a_still_box_and_gaps_reuse_neighbours(portrait: np.ndarray) -> None:
    noise = np.random.default_rng(0).integers(-6, 7, (12, *portrait.shape))
    frames = np.clip(portrait[None].astype(int) + noise, 0, 255).astype(np.uint8)
    frames[5] = 0  # a frame without a face in the middle
    boxes = FaceCropper(64).track(frames, "static.mp4")
    track = np.array([[b.cx, b.cy, b.side] for b in boxes])
    assert track.std(axis=0).max() < 1.5
    crops = FaceCropper(64).crop_video(frames, "static.mp4")
    assert crops.shape == (12, 64, 64, 3)


def test_blank_inputs_raise_no_face_error_naming_the_source() -> None:
    cropper = FaceCropper(64, search_frames=4)
    with pytest.raises(NoFaceError, match=r"blank\.png"):
        cropper.crop_portrait(np.full((120, 160, 3), 90, np.uint8), "blank.png")
    with pytest.raises(NoFaceError, match=r"blank\.mp4: no face found in frames 0-3"):
        cropper.crop_video(np.zeros((6, 120, 160, 3), np.uint8), "blank.mp4")
    with pytest.raises(NoFaceError, match=r"short\.mp4: no face found in frames 0-1"):
        cropper.crop_video(np.zeros((2, 120, 160, 3), np.uint8), "short.mp4")
    assert issubclass(NoFaceError, ValueError)


def test_face_appearing_too_late_is_an_error(portrait: np.ndarray) -> None:
    frames = np.zeros((5, *portrait.shape), np.uint8)
    frames[4] = portrait
    with pytest.raises(NoFaceError, match=r"late\.mp4: no face found in frames 0-2"):
        FaceCropper(64, search_frames=3).crop_video(frames, "late.mp4")
    crops = FaceCropper(64, search_frames=5).crop_video(frames, "late.mp4")
    assert crops.shape == (5, 64, 64, 3)


def test_streaming_crop_holds_the_box_without_a_face(user_frames: np.ndarray) -> None:
    cropper = FaceCropper(64)
    blank = np.zeros_like(user_frames[0])
    with pytest.raises(NoFaceError, match="camera:7"):
        cropper.crop_frame(blank, source="camera:7")
    crop, box = cropper.crop_frame(user_frames[0])
    assert crop.shape == (64, 64, 3) and isinstance(box, FaceBox)
    held_crop, held_box = cropper.crop_frame(blank, previous_box=box)
    assert held_box == box and held_crop.shape == (64, 64, 3)
    _, next_box = cropper.crop_frame(user_frames[1], previous_box=box)
    assert abs(next_box.cx - box.cx) < 0.25 * box.side


def test_crop_pads_boxes_larger_than_the_frame() -> None:
    frame = np.full((40, 60, 3), 200, np.uint8)
    crop = FaceCropper(32).crop(frame, FaceBox(cx=5.0, cy=5.0, side=100.0))
    assert crop.shape == (32, 32, 3)
    assert crop.min() == 200  # edge pixels repeated, no black border


def test_bad_inputs_raise_value_errors_naming_the_argument(portrait: np.ndarray) -> None:
    cropper = FaceCropper(64)
    with pytest.raises(ValueError, match="image: expected dtype uint8"):
        cropper.crop_portrait(portrait.astype(np.float32), "p.png")
    with pytest.raises(ValueError, match=r"image: expected an RGB image of shape \(H, W, 3\)"):
        cropper.crop_portrait(portrait[..., 0], "p.png")
    with pytest.raises(ValueError, match=r"image: expected an RGB image"):
        cropper.crop_portrait(np.zeros((8, 8, 4), np.uint8), "p.png")
    with pytest.raises(ValueError, match=r"frames: expected a clip of shape \(T, H, W, 3\)"):
        cropper.crop_video(portrait, "v.mp4")
    with pytest.raises(ValueError, match="frames: expected dtype uint8"):
        cropper.crop_video(portrait[None].astype(np.float64), "v.mp4")
    with pytest.raises(ValueError, match="frame: expected a numpy array"):
        cropper.crop_frame([[1, 2, 3]])
    with pytest.raises(ValueError, match="size"):
        FaceCropper(0)
    with pytest.raises(ValueError, match="detect_every"):
        FaceCropper(64, detect_every=0)


def test_the_synthetic_sample_portrait_and_user_video_have_findable_faces():
    """scripts/demo.sh feeds samples/synthetic/ to an installed demo model: `generate` crops the
    portrait with `crop_portrait` and the user video with `crop_video`, and both must find the face."""
    cropper = FaceCropper(64)
    crop = cropper.crop_portrait(load_image(SAMPLES / "synthetic" / "portrait.png"), "synthetic portrait")
    assert crop.shape == (64, 64, 3)
    user = read_video(SAMPLES / "synthetic" / "user.mp4").frames
    assert cropper.crop_video(user, "synthetic user").shape == (len(user), 64, 64, 3)


def test_a_models_crops_follow_its_framing(portrait: np.ndarray) -> None:
    """`crop_scale` is part of the auto-encoder's config: the crops of its inputs use it, a tighter
    framing shows the face larger, and configs written before it load with the old framing."""
    tight = dataclasses.replace(tiny().motion_autoencoder, crop_scale=1.3)
    cropper = FaceCropper.for_model(tight)
    assert (cropper.size, cropper.scale) == (64, 1.3)
    assert FaceCropper.for_model(tiny().motion_autoencoder).scale == 1.8
    wide = FaceCropper(64).crop_portrait(portrait, "p")
    close = cropper.crop_portrait(portrait, "p")
    # the same face, 1.8 / 1.3 times larger: re-detected, its box is that much wider
    ratio = FaceCropper(64, min_face=0.2).detect(close)[0].side / FaceCropper(64, min_face=0.2).detect(wide)[0].side
    assert 1.2 < ratio < 1.6, ratio
    data = ModelConfig(name="t", flow=tiny().flow, motion_autoencoder=tight, audio=tiny().audio).to_dict()
    assert ModelConfig.from_dict(data).motion_autoencoder.crop_scale == 1.3
    del data["motion_autoencoder"]["crop_scale"]  # a config.json from before the field
    assert ModelConfig.from_dict(data).motion_autoencoder.crop_scale == 1.8
    with pytest.raises(ValueError, match="crop_scale"):
        dataclasses.replace(tight, crop_scale=0.0)
