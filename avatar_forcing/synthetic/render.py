"""A small 2.5D face renderer in numpy / OpenCV: Identity + one frame of FaceParams -> RGB.

Geometry. The head is an ellipsoid with half-axes (a, b, c) = (face_width, face_width *
face_aspect, 0.85 face_width) times the image side, centred at (0.5, 0.52) of the image.
Features (eyes, brows, nose, mouth, hairline) are placed in face coordinates (u, v) — u in
half-widths (+ image right), v in half-heights (+ down) — lifted onto the ellipsoid's front
surface (z = c sqrt(1 - u^2 - v^2), plus a nose bump), rotated by yaw (vertical axis), pitch
(horizontal axis) and roll (view axis), and projected orthographically. The silhouette is
the upright outline (with the identity's jaw narrowing) rotated by roll and shifted a little
with yaw and pitch, so a turned head shows its features moving across a stable outline, as in
a real turn of a roughly round head. Shapes are filled polygons drawn with OpenCV's
antialiased rasteriser; the face gets soft shading toward its rim.

Defaults: 256 x 256 frames (`SIZE`), 25 fps set by the caller. The face spans about half the
frame, which the project's Haar face detector (`media/face_crop.py`) finds on most frames.
"""

from __future__ import annotations

import cv2
import numpy as np

from avatar_forcing.synthetic.identity import Identity
from avatar_forcing.synthetic.params import CHANNELS, FaceParams

SIZE = 256
SHIFT = 4  # fixed-point bits for cv2 polygon coordinates (sub-pixel placement)
_AA = cv2.LINE_AA


def _ellipse(n: int, rx: float, ry: float, start: float = 0.0, stop: float = 2 * np.pi) -> np.ndarray:
    angles = np.linspace(start, stop, n)
    return np.stack([rx * np.cos(angles), ry * np.sin(angles)], axis=1)


class FaceRenderer:
    """Renders one identity; `frame(values)` takes one row of FaceParams (CHANNELS order)."""

    def __init__(self, identity: Identity, size: int = SIZE) -> None:
        if size < 64:
            raise ValueError(f"size: expected >= 64 pixels, got {size}")
        self.identity = identity
        self.size = size
        self.a = identity.face_width * size
        self.b = self.a * identity.face_aspect
        self.c = 0.85 * self.a
        self.centre = np.array([0.5 * size, 0.52 * size])
        shade = np.linspace(1.08, 0.88, size)[:, None, None]  # top-lit backdrop
        self._backdrop = np.clip(np.array(identity.background, float) * shade, 0, 255).astype(np.uint8)
        self._backdrop = np.ascontiguousarray(np.broadcast_to(self._backdrop, (size, size, 3)))
        # Upright silhouette with the jaw narrowing the lower half.
        outline = _ellipse(72, 1.0, 1.0)
        lower = np.clip(outline[:, 1], 0, None)
        outline[:, 0] *= 1.0 - 0.22 * identity.jaw * lower**2
        self._outline = outline * np.array([self.a, self.b])

    # --- geometry -------------------------------------------------------------------------------

    def _rotation(self, yaw: float, pitch: float, roll: float) -> np.ndarray:
        y, p, r = np.radians([yaw, pitch, roll])
        ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
        rx = np.array([[1, 0, 0], [0, np.cos(p), np.sin(p)], [0, -np.sin(p), np.cos(p)]])
        rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
        return rz @ rx @ ry

    def _project(self, uv: np.ndarray, rotation: np.ndarray, bump: float = 0.0) -> np.ndarray:
        """(N, 2) face coordinates -> (N, 2) image pixels on the rotated ellipsoid surface."""
        u, v = uv[:, 0], uv[:, 1]
        z = self.c * np.sqrt(np.clip(1.0 - u**2 - v**2, 0.05, None)) + bump * self.a
        points = np.stack([u * self.a, v * self.b, z], axis=1) @ rotation.T
        return points[:, :2] + self.centre

    def _silhouette(self, points: np.ndarray, yaw: float, pitch: float, roll: float) -> np.ndarray:
        r = np.radians(roll)
        turn = np.array([[np.cos(r), -np.sin(r)], [np.sin(r), np.cos(r)]])
        shift = np.array([0.06 * self.a * np.sin(np.radians(yaw)), 0.06 * self.b * np.sin(np.radians(pitch))])
        return points @ turn.T + self.centre + shift

    @staticmethod
    def _fill(image: np.ndarray, points: np.ndarray, colour) -> None:
        pts = np.round(points * (1 << SHIFT)).astype(np.int32)[None]
        cv2.fillPoly(image, pts, tuple(int(c) for c in colour), _AA, SHIFT)

    @staticmethod
    def _line(image: np.ndarray, points: np.ndarray, colour, thickness: float) -> None:
        pts = np.round(points * (1 << SHIFT)).astype(np.int32)[None]
        cv2.polylines(image, pts, False, tuple(int(c) for c in colour), max(1, round(thickness)), _AA, SHIFT)

    # --- drawing --------------------------------------------------------------------------------

    def frame(self, values: np.ndarray) -> np.ndarray:
        """One FaceParams row (len(CHANNELS),) -> (size, size, 3) uint8 RGB."""
        values = np.asarray(values, float)
        if values.shape != (len(CHANNELS),):
            raise ValueError(f"values: expected shape ({len(CHANNELS)},), got {values.shape}")
        yaw, pitch, roll, mouth, smile, blink, gaze_x, gaze_y = values
        ident, a, b = self.identity, self.a, self.b
        rot = self._rotation(yaw, pitch, roll)
        skin = np.array(ident.skin, float)
        hair = np.array(ident.hair, float)
        image = self._backdrop.copy()
        s = self.size

        # Body: shoulders and neck (they do not turn with the head).
        shoulders = _ellipse(48, 2.1 * a, 0.5 * s, np.pi, 2 * np.pi) + np.array([0.5 * s, 1.08 * s])
        self._fill(image, np.vstack([shoulders, [[0.5 * s + 2.1 * a, s], [0.5 * s - 2.1 * a, s]]]), ident.shirt)
        neck_top = self.centre[1] + 0.55 * b
        neck = np.array([[-0.48 * a, 0], [0.48 * a, 0], [0.55 * a, s], [-0.55 * a, s]]) + np.array([0.5 * s, neck_top])
        self._fill(image, neck, skin * 0.78)
        if ident.hair_style == 2:  # long hair behind the head and shoulders
            back = _ellipse(48, 1.22 * a, 1.18 * b) + np.array([0, 0.22 * b])
            self._fill(image, self._silhouette(back, yaw, pitch, roll), hair * 0.85)

        # Ears sit on the sides, slightly behind the face plane.
        for side in (-1.0, 1.0):
            ear = _ellipse(16, 0.045, 0.16) + np.array([side * 0.985, -0.02])
            centre = self._project(np.array([[side * 0.985, -0.02]]), rot, bump=-0.55)[0]
            outline = self._silhouette(ear * np.array([a, b]) - np.array([[side * 0.985 * a, -0.02 * b]]), 0, 0, roll)
            outline = outline - self.centre + centre
            self._fill(image, outline, skin * 0.86)

        # Head with soft rim shading.
        head = self._silhouette(self._outline, yaw, pitch, roll)
        mask = np.zeros((s, s), np.uint8)
        self._fill(mask, head, (255,))
        small = cv2.resize(mask, (s // 4, s // 4), interpolation=cv2.INTER_AREA)
        small = cv2.GaussianBlur(small, (0, 0), sigmaX=a / 16)
        soft = cv2.resize(small, (s, s), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
        alpha = mask.astype(np.float32)[..., None] / 255.0
        shaded = skin[None, None] * (0.72 + 0.30 * soft[..., None])
        image = (image * (1 - alpha) + np.clip(shaded, 0, 255) * alpha).astype(np.uint8)

        # Hair on top: from the outer cap down to the hairline (which moves with the head).
        hairline_v = {0: -0.58, 1: -0.42, 2: -0.55, 3: -0.52}[ident.hair_style]
        us = np.linspace(-0.97, 0.97, 25)
        if ident.hair_style == 1:  # fringe with a ragged edge
            line_v = hairline_v + 0.05 * np.abs(np.sin(us * 9))
        elif ident.hair_style == 3:  # side part: low on the left, high on the right
            line_v = hairline_v + 0.10 * (us < -0.2) - 0.08 * (us > 0.2) * (1 - np.abs(us))
        else:
            line_v = hairline_v + 0.12 * us**2
        line_v = line_v + 0.22 * np.clip(np.abs(us) - 0.7, 0, None) / 0.3  # down toward the temples
        hairline = self._project(np.stack([us, line_v], axis=1), rot)
        cap = self._silhouette(_ellipse(33, 1.06 * a, 1.07 * b, np.pi * 0.98, np.pi * 2.02), yaw, pitch, roll)
        self._fill(image, np.vstack([hairline[::-1], cap]), hair)

        # Eye sockets: a soft darker band under the brows (the cue face detectors key on).
        for side in (-1.0, 1.0):
            socket = _ellipse(20, ident.eye_size * 1.45, 0.13) + np.array([side * ident.eye_spacing, -0.16])
            self._fill(image, self._project(socket, rot), skin * 0.70)

        # Eyebrows: dark, thick, raised a little by a smile.
        brow_colour = hair * 0.6
        brow_width = ident.brow * a * 2.2
        for side in (-1.0, 1.0):
            bu = side * ident.eye_spacing + np.linspace(-1.0, 1.0, 9) * ident.eye_size * 1.15
            bv = -0.30 - 0.04 * smile - 0.05 * (1 - ((bu - side * ident.eye_spacing) / (ident.eye_size * 1.15)) ** 2)
            self._line(image, self._project(np.stack([bu, bv], axis=1), rot), brow_colour, brow_width)

        # Eyes: sclera, iris following gaze (clipped to the lids), lid line; a blink lowers the lid.
        open_ = 1.0 - float(np.clip(blink, 0, 1))
        for side in (-1.0, 1.0):
            eu, ev = side * ident.eye_spacing, -0.12
            w, h = ident.eye_size, ident.eye_size * ident.eye_round * (a / b)
            centre = np.array([eu, ev + 0.35 * h * (1 - open_)])
            top = _ellipse(13, w, h * open_, np.pi, 2 * np.pi) + centre
            bottom = _ellipse(13, w, 0.8 * h, 0, np.pi) + centre
            lid = self._project(top, rot)
            if open_ > 0.12:
                eye = self._project(np.vstack([top, bottom[1:-1]]), rot)
                eye_mask = np.zeros((s, s), np.uint8)
                self._fill(eye_mask, eye, (255,))
                self._fill(image, eye, (214, 210, 204))
                iris_centre = self._project(np.array([[eu + gaze_x * 0.45 * w, ev + gaze_y * 0.35 * h]]), rot)[0]
                radius = 0.8 * h * b
                iris = np.zeros((s, s, 3), np.uint8)
                cv2.circle(
                    iris, tuple(np.round(iris_centre * 16).astype(int)), round(radius * 16), ident.iris, -1, _AA, 4
                )
                cv2.circle(
                    iris, tuple(np.round(iris_centre * 16).astype(int)), round(radius * 8), (12, 10, 10), -1, _AA, 4
                )
                inside = (eye_mask.astype(np.float32) / 255.0)[..., None] * (iris.any(axis=2, keepdims=True))
                image = (image * (1 - inside) + iris * inside).astype(np.uint8)
            self._line(image, lid, (25, 18, 16), max(2.0, 0.055 * a))

        # Nose: a shaded side line and two nostrils, standing out from the surface.
        nose = np.array([[0.06, -0.02], [0.08, 0.10], [0.11, 0.22], [0.05, 0.27]])
        self._line(image, self._project(nose, rot, bump=0.10), skin * 0.72, max(1.5, 0.03 * a))
        for side in (-1.0, 1.0):
            nostril = _ellipse(10, 0.045, 0.02) + np.array([side * 0.07, 0.27])
            self._fill(image, self._project(nostril, rot, bump=0.10), skin * 0.45)

        # Mouth: lips around an opening set by mouth_open, corners raised and widened by smile.
        mw = ident.mouth_width * (1 + 0.22 * smile)
        mv = 0.52
        lift = 0.07 * smile
        gap = 0.20 * float(np.clip(mouth, 0, 1))
        xs = np.linspace(-1.0, 1.0, 15)
        corner = mv - lift * xs**2
        upper_in = corner - 0.012 - 0.35 * gap * (1 - xs**2) + lift * 0.3 * (1 - xs**2)
        lower_in = corner + 0.012 + 0.65 * gap * (1 - xs**2) + lift * 0.3 * (1 - xs**2)
        upper_out = upper_in - 0.055 * (1 - xs**2) ** 0.5 + 0.015 * np.cos(xs * np.pi * 2) * (1 - xs**2)
        lower_out = lower_in + 0.07 * (1 - xs**2) ** 0.5
        u = xs * mw
        outer = np.vstack([np.stack([u, upper_out], 1), np.stack([u, lower_out], 1)[::-1]])
        self._fill(image, self._project(outer, rot), ident.lips)
        inner = np.vstack([np.stack([u, upper_in], 1), np.stack([u, lower_in], 1)[::-1]])
        if gap + lift > 0.02:
            self._fill(image, self._project(inner, rot), (70, 22, 28))
            teeth_v = np.minimum(upper_in + 0.03 + 0.25 * lift, lower_in)
            teeth = np.vstack([np.stack([u * 0.8, upper_in], 1), np.stack([u * 0.8, teeth_v], 1)[::-1]])
            self._fill(image, self._project(teeth, rot), (238, 236, 228))
        else:
            self._line(
                image, self._project(np.stack([u, (upper_in + lower_in) / 2], 1), rot), np.array(ident.lips) * 0.5, 1.5
            )
        return image

    def render(self, params: FaceParams) -> np.ndarray:
        """All frames: FaceParams (T rows) -> (T, size, size, 3) uint8 RGB."""
        frames = np.empty((len(params), self.size, self.size, 3), np.uint8)
        for t in range(len(params)):
            frames[t] = self.frame(params.values[t])
        return frames
