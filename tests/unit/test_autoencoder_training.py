"""Motion auto-encoder training (training/autoencoder.py, `avatar-forcing train-autoencoder`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from avatar_forcing.config import tiny
from avatar_forcing.media.face_crop import FaceCropper
from avatar_forcing.nn.checkpoints import load_pretrained
from avatar_forcing.nn.model import random_model
from avatar_forcing.synthetic.world import generate_conversation
from avatar_forcing.training.autoencoder import (
    AutoEncoderOptions,
    PairSampler,
    jitter_colours,
    load_face_crops,
    motion_weights,
    reconstruction_loss,
    region_weights,
    start_with_identity_warp,
    train_autoencoder,
    validation_loss,
)


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    """Face crops of two short synthetic conversations (4 identities), cut as `prepare` cuts them."""
    cropper = FaceCropper(64, detect_every=5)
    out = []
    for seed in (7, 8):
        conv = generate_conversation(seed, 2.0)
        out += [cropper.crop_video(conv.frames(side), f"synth-{seed}") for side in (0, 1)]
    return out


def test_pairs_come_from_one_clip_and_the_seed_fixes_them():
    clips = [np.full((5, 4, 4, 3), k, np.uint8) for k in range(3)]
    source, driving = PairSampler(clips, seed=3).sample(32)
    # each clip is one constant value, so a pair from one clip has equal values
    assert np.array_equal(source[:, 0, 0, 0], driving[:, 0, 0, 0])
    again = PairSampler(clips, seed=3).sample(32)
    assert np.array_equal(again[0], source) and np.array_equal(again[1], driving)
    with pytest.raises(ValueError, match="clips: expected at least one clip of >= 2"):
        PairSampler([np.zeros((1, 4, 4, 3), np.uint8)], seed=0)


def test_reconstruction_loss_is_zero_only_for_the_target():
    target = torch.rand(2, 3, 16, 16) * 2 - 1
    assert float(reconstruction_loss(target, target)) == 0.0
    assert float(reconstruction_loss(target + 0.1, target)) == pytest.approx(0.3, abs=1e-5)  # 3 scales x 0.1


def test_motion_weights_favour_what_changed_and_keep_the_loss_scale():
    source = torch.zeros(2, 3, 32, 32)
    driving = source.clone()
    driving[0, :, 20:24, 12:20] = 1.0  # a "mouth" opens in image 0; image 1 does not move
    weights = motion_weights(source, driving, strength=4.0)
    assert weights.shape == (2, 1, 32, 32)
    assert torch.allclose(weights.mean((2, 3)), torch.ones(2, 1))  # mean 1: the loss keeps its scale
    assert torch.allclose(weights[1], torch.ones(1, 32, 32))  # nothing changed: uniform
    changed, still = weights[0, 0, 20:24, 12:20].mean(), weights[0, 0, :8, :8].mean()
    assert changed > 5 * still, (changed, still)
    assert float(weights[0, 0, 18, 12]) > float(still)  # the 5x5 widening reaches 2 px beyond the change
    # an error on the changed region costs more than the same error on the still backdrop
    target = driving
    on_mouth, on_backdrop = target.clone(), target.clone()
    on_mouth[0, :, 20:24, 12:20] += 0.5
    on_backdrop[0, :, 0:4, 0:8] += 0.5
    assert reconstruction_loss(on_mouth, target, weights) > 5 * reconstruction_loss(on_backdrop, target, weights)
    uniform = [float(reconstruction_loss(x, target)) for x in (on_mouth, on_backdrop)]
    assert uniform[0] == pytest.approx(uniform[1])


def test_identity_warp_start_samples_every_level_in_place():
    torch.manual_seed(0)
    mae = random_model(tiny()).motion_autoencoder
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    encoded = mae.encode(images)
    S = mae.config.image_size
    xs = torch.linspace(-1.0, 1.0, S)
    identity = torch.stack(torch.meshgrid(xs, xs, indexing="xy"), dim=-1)
    _, grid = mae.decode(encoded.identity + encoded.reference_motion, encoded.feature_maps, return_flow=True)
    assert (grid - identity).abs().max() > 0.05  # a random start warps
    start_with_identity_warp(mae)
    _, grid = mae.decode(encoded.identity + encoded.reference_motion, encoded.feature_maps, return_flow=True)
    assert torch.equal(grid, identity.expand(2, -1, -1, -1))
    assert all(head.conv.weight.requires_grad for head in mae.dec.to_flows)  # still trained


def test_most_different_of_several_candidates_is_the_driving_crop():
    clip = np.zeros((50, 4, 4, 3), np.uint8)
    clip[7] = 200  # one frame far from every other
    source, driving = PairSampler([clip], seed=0, candidates=50).sample(64)
    # 50 draws miss frame 7 with probability (49/50)^50 ~ 0.36, so most pairs pick it (or have it as source)
    picked = (driving[:, 0, 0, 0] == 200) | (source[:, 0, 0, 0] == 200)
    assert picked.mean() > 0.5
    assert (PairSampler([clip], seed=0).sample(64)[1][:, 0, 0, 0] == 200).mean() < 0.15  # uniform: ~1/50
    with pytest.raises(ValueError, match="candidates: expected >= 1"):
        PairSampler([clip], seed=0, candidates=0)


def test_the_mouth_region_covers_the_mouth_of_a_synthetic_face_at_both_framings():
    """Where the rendered mouth opens (the pixels that change between a shut and an open mouth on
    a still head) lies inside `mouth_region`, for the release's framing and a tight one."""
    from avatar_forcing.synthetic.identity import random_identity
    from avatar_forcing.synthetic.params import INDEX
    from avatar_forcing.synthetic.render import FaceRenderer

    renderer = FaceRenderer(random_identity(np.random.default_rng(5)))
    shut = np.zeros(8, np.float32)
    opened = shut.copy()
    opened[INDEX["mouth_open"]] = 1.0
    frames = np.stack([renderer.frame(shut), renderer.frame(opened)])
    for scale in (1.8, 1.3):
        cropper = FaceCropper(64, scale=scale)
        box = cropper.detect(frames[0])[0]
        crops = np.stack([cropper.crop(f, box) for f in frames]).astype(np.int16)
        change = np.abs(crops[1] - crops[0]).sum(-1)  # (64, 64)
        top, bottom, left, right = (round(f * 64) for f in cropper.mouth_region())
        inside = change[top:bottom, left:right].sum()
        assert inside > 0.9 * change.sum(), (scale, inside / change.sum())
        assert (bottom - top) * (right - left) < 0.25 * 64 * 64  # and it is not most of the crop


def test_mouth_weights_and_mouth_pairs():
    weights = region_weights((0.5, 0.75, 0.25, 0.75), 32, strength=8.0)
    assert weights.shape == (1, 1, 32, 32) and float(weights.mean()) == pytest.approx(1.0)
    assert float(weights[0, 0, 20, 16]) == pytest.approx(9 * float(weights[0, 0, 2, 2]))
    # a clip where frame 3 moves everywhere but the mouth, frame 8 only the mouth
    clip = np.zeros((10, 32, 32, 3), np.uint8)
    clip[3, :16] = 255
    clip[8, 16:24, 8:24] = 60
    mouth = (0.5, 0.75, 0.25, 0.75)
    by_frame = PairSampler([clip], seed=0, candidates=10).sample(200)
    by_mouth = PairSampler([clip], seed=0, candidates=10, region=mouth).sample(200)
    assert (by_frame[1][:, 0, 0, 0] == 255).mean() > 0.5  # the whole frame: the big change wins
    assert (by_mouth[1][:, 20, 16, 0] == 60).mean() > 0.5  # the mouth: the mouth's change wins


def test_training_lowers_the_loss_on_held_out_pairs(clips, tmp_path):
    torch.manual_seed(0)
    mae = random_model(tiny()).motion_autoencoder
    held = PairSampler(clips, seed=99).sample(16)
    before = validation_loss(mae, held)
    options = AutoEncoderOptions(steps=40, batch_size=8, log_every=20)
    left_out = ["blank.mp4: no face found in frames 0-49"]
    record = train_autoencoder(mae, clips, options, tmp_path, val_clips=clips[:1], progress=False, left_out=left_out)
    after = validation_loss(mae, held)
    # a random decoder starts near L1 ~ 1.5 (3 scales x ~0.5); 40 steps learn at least the
    # backdrop and the face's colours, which more than halves it
    assert after < 0.5 * before, (before, after)
    assert record["train_crops"] == sum(len(c) for c in clips)
    assert json.loads((tmp_path / "autoencoder_record.json").read_text())["left_out"] == left_out
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss,val_loss") and len(rows) == 3
    assert not mae.training and not any(p.requires_grad for p in mae.parameters())


def test_colour_jitter_changes_both_crops_of_a_pair_alike():
    g = torch.Generator().manual_seed(0)
    source = torch.rand(6, 3, 8, 8) - 0.5
    driving = source.clone()
    driving[:, :, 2:4, 2:4] += 0.3  # the pair differs only where the "mouth" moved
    jittered_source, jittered_driving = jitter_colours(source, driving, 0.3, g)
    assert not torch.allclose(jittered_source, source)
    # one affine change per pair and channel, the same for both crops: outside the moved pixels
    # the two stay equal, and inside them the difference is the original one times the gain
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[2:4, 2:4] = False
    assert torch.equal(jittered_source[..., outside], jittered_driving[..., outside])
    gain = (jittered_source[..., 0, 0] - jittered_source[..., 0, 1]) / (source[..., 0, 0] - source[..., 0, 1])
    moved = jittered_driving[..., 2, 2] - jittered_source[..., 2, 2]
    torch.testing.assert_close(moved, 0.3 * gain, rtol=1e-4, atol=1e-5)
    assert ((gain > 0.69) & (gain < 1.31)).all() and gain.std() > 0.05  # the pairs' changes differ
    assert jitter_colours(source * 10, driving, 0.3, g)[0].abs().max() <= 1.0  # clamped to the image range


def test_a_video_without_a_face_is_left_out_and_named_or_raised(tmp_path):
    from avatar_forcing.media.io import write_video

    conv = generate_conversation(7, 2.0)
    face, blank = tmp_path / "face.mp4", tmp_path / "blank.mp4"
    write_video(face, conv.frames(0))
    write_video(blank, np.full((50, 128, 128, 3), 90, np.uint8))  # a wall: no face to track
    config = tiny().motion_autoencoder
    skipped: list[str] = []
    clips = load_face_crops([blank, face], config, detect_every=5, skipped=skipped)
    assert len(clips) == 1 and clips[0].shape == (50, 64, 64, 3)
    assert len(skipped) == 1 and "blank.mp4" in skipped[0] and "no face" in skipped[0]
    with pytest.raises(ValueError, match=r"blank\.mp4.*no face"):
        load_face_crops([face, blank], config, detect_every=5)


def test_options_are_checked():
    with pytest.raises(ValueError, match="steps: expected an integer >= 1"):
        AutoEncoderOptions(steps=0)
    with pytest.raises(ValueError, match="lr: expected > 0"):
        AutoEncoderOptions(lr=0.0)
    with pytest.raises(ValueError, match="motion_weight: expected >= 0"):
        AutoEncoderOptions(motion_weight=-1.0)
    with pytest.raises(ValueError, match="mouth_weight: expected >= 0"):
        AutoEncoderOptions(mouth_weight=-1.0)
    with pytest.raises(ValueError, match="pairs_by: expected one of"):
        AutoEncoderOptions(pairs_by="lips")
    with pytest.raises(ValueError, match="colour_jitter: expected a number in"):
        AutoEncoderOptions(colour_jitter=1.5)


def test_cli_writes_a_weights_folder_prepare_can_use(tmp_path):
    from avatar_forcing.apps.cli import main

    assert main(["synth", "--out", str(tmp_path / "synth"), "--conversations", "1", "--seconds", "2", "--quiet"]) == 0
    manifest = tmp_path / "synth" / "manifest.jsonl"
    out = tmp_path / "mae"
    argv = ["train-autoencoder", "--manifest", str(manifest), "--random-init", "--out", str(out), "--steps", "3",
            "--batch-size", "2", "--mouth-weight", "8", "--pairs-by", "mouth", "--pair-candidates", "2",
            "--colour-jitter", "0.3", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    start = random_model(tiny())
    trained = load_pretrained(out)
    changed = lambda prefix: any(
        not torch.equal(v, trained.state_dict()[k]) for k, v in start.state_dict().items() if k.startswith(prefix)
    )
    assert changed("motion_autoencoder.") and not changed("flow_transformer.") and not changed("audio_encoder.")
    options = json.loads((out / "autoencoder_record.json").read_text())["options"]
    assert (options["steps"], options["mouth_weight"], options["pairs_by"]) == (3, 8.0, "mouth")
    assert options["colour_jitter"] == 0.3
    assert main(["prepare", "--manifest", str(manifest), "--out", str(tmp_path / "prep"), "--weights", str(out),
                 "--detect-every", "5", "--quiet"]) == 0  # fmt: skip
    assert main(["train-autoencoder", "--manifest", str(manifest), "--out", str(out)]) == 2  # no start weights
    assert (
        main(["train-autoencoder", "--manifest", str(tmp_path / "none.jsonl"), "--random-init", "--out", str(out)]) == 2
    )
