"""Motion latent auto-encoder (LIA family), `docs/model-spec.md` §1.

    image (B, 3, S, S) in [-1, 1]
      └─ enc.net_app ──► identity latent s_r (B, 512) + feature maps (8x8 ... SxS)
           └─ enc.fc ──► motion coefficients alpha (B, 20)
                └─ dec.direction ──► motion latent r = alpha @ Q^T (B, 512)

    latent w = s_r + r_d (B, 512) + the portrait's feature maps
      └─ dec: StyleGAN2 synthesis; at every level a flow head warps the feature map
         of that resolution into the activations ──► image (B, 3, S, S)

Parameter names follow the released checkpoint (`motion_autoencoder.*`), including modules
the release builds but never runs (`dec.to_rgb1`, the noise injections), so that it loads.
"Equalised" layers store N(0, 1) weights and multiply by 1/sqrt(fan_in) at run time.

Element-wise steps write in place into tensors the same function just made (never into an
argument): one allocation less per step, the same values.

One file on purpose (~560 lines): like a nanoGPT `model.py`, the whole network reads top to
bottom in the order data flows (layers, encoder, decoder, the auto-encoder), and its parameter
names must mirror the release's module tree, which is easiest to check in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from avatar_forcing.config import MotionAutoEncoderConfig

# -----------------------------------------------------------------------------
# channel table


def channels_at(resolution: int, channel_multiplier: int = 1, max_channels: int = 512) -> int:
    """Feature channels at a given resolution (shared by encoder and decoder).

    `max_channels` caps the table (512 in the release); a small cap makes a CPU-fast model.
    """
    table = {
        4: 512,
        8: 512,
        16: 512,
        32: 512,
        64: 256 * channel_multiplier,
        128: 128 * channel_multiplier,
        256: 64 * channel_multiplier,
        512: 32 * channel_multiplier,
        1024: 16 * channel_multiplier,
    }
    return min(table[resolution], max_channels)


# -----------------------------------------------------------------------------
# FIR filtering (blur, 2x up-sampling) on a 2-D separable kernel


def make_kernel(taps: tuple[int, ...]) -> Tensor:
    """Outer product of the 1-D taps, normalised to sum 1: (K, K)."""
    k = torch.tensor(taps, dtype=torch.float32)
    k = k[None, :] * k[:, None]
    return k / k.sum()


def fir_filter(x: Tensor, kernel: Tensor, pad: tuple[int, int], up: int = 1) -> Tensor:
    """Zero-insert by `up`, pad (before, after) on both axes, convolve each channel with `kernel`.

    x: (B, C, H, W) -> (B, C, H*up + pad0 + pad1 - K + 1, ...). A true convolution (the kernel
    is flipped), which only matters for asymmetric kernels.
    """
    B, C, H, W = x.shape
    if up > 1:
        # (B, C, H, 1, W, 1) -> pad the singleton axes with zeros -> (B, C, H*up, W*up)
        x = x.reshape(B, C, H, 1, W, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1))
        x = x.reshape(B, C, H * up, W * up)
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    weight = kernel.flip(0, 1).to(x.dtype)[None, None].expand(C, 1, *kernel.shape)  # (C, 1, K, K)
    return F.conv2d(x, weight, groups=C)


class Blur(nn.Module):
    """FIR low-pass filter; `scale` restores the gain lost to zero insertion when up-sampling."""

    def __init__(self, taps: tuple[int, ...], pad: tuple[int, int], scale: float = 1.0):
        super().__init__()
        self.register_buffer("kernel", make_kernel(taps) * scale)  # (K, K), persistent like the release
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        return fir_filter(x, self.kernel, self.pad)


class Upsample(nn.Module):
    """2x up-sampling of a skip (RGB or flow): zero insertion, then the FIR kernel x4."""

    def __init__(self, taps: tuple[int, ...]):
        super().__init__()
        self.register_buffer("kernel", make_kernel(taps) * 4)  # (K, K)
        p = len(taps) - 2
        self.pad = ((p + 1) // 2 + 1, p // 2)  # (2, 1) for 4 taps: output exactly 2H

    def forward(self, x: Tensor) -> Tensor:
        return fir_filter(x, self.kernel, self.pad, up=2)


# -----------------------------------------------------------------------------
# equalised layers


class FusedLeakyReLU(nn.Module):
    """leaky_relu(x + bias, 0.2) * sqrt(2): the bias of the preceding (bias-less) conv lives here."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x + self.bias, 0.2).mul_(math.sqrt(2))


class EqualConv2d(nn.Module):
    """Bias-less: every conv of this network gets its bias from the FusedLeakyReLU after it."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        self.scale = 1 / math.sqrt(in_ch * kernel_size**2)
        self.stride = stride
        self.padding = padding

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.scale, stride=self.stride, padding=self.padding)


class EqualLinear(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, bias_init: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim))
        self.bias = nn.Parameter(torch.full((out_dim,), bias_init))
        self.scale = 1 / math.sqrt(in_dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.scale, self.bias)


def conv_layer(
    in_ch: int,
    out_ch: int,
    kernel_size: int,
    taps: tuple[int, ...],
    downsample: bool = False,
    activate: bool = True,
) -> nn.Sequential:
    """[Blur] -> EqualConv2d (no bias) -> [FusedLeakyReLU], as a Sequential so the indices
    match the checkpoint (`conv1.0.weight`, `conv2.1.weight`, `skip.1.weight`, ...)."""
    layers: list[nn.Module] = []
    if downsample:
        # blur first so the stride-2 conv does not alias: (2, 2) for a 3x3 conv, (1, 1) for a 1x1
        p = (len(taps) - 2) + (kernel_size - 1)
        layers.append(Blur(taps, pad=((p + 1) // 2, p // 2)))
        layers.append(EqualConv2d(in_ch, out_ch, kernel_size, stride=2))
    else:
        layers.append(EqualConv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2))
    if activate:
        layers.append(FusedLeakyReLU(out_ch))
    return nn.Sequential(*layers)


# -----------------------------------------------------------------------------
# encoder


class ResBlock(nn.Module):
    """Residual down-sampling block: (conv2(conv1(x)) + skip(x)) / sqrt(2), H -> H/2."""

    def __init__(self, in_ch: int, out_ch: int, taps: tuple[int, ...]):
        super().__init__()
        self.conv1 = conv_layer(in_ch, in_ch, 3, taps)
        self.conv2 = conv_layer(in_ch, out_ch, 3, taps, downsample=True)
        self.skip = conv_layer(in_ch, out_ch, 1, taps, downsample=True, activate=False)

    def forward(self, x: Tensor) -> Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)).div_(math.sqrt(2))


class AppearanceEncoder(nn.Module):
    """StyleGAN2 discriminator trunk: image -> identity latent h and the warp-source feature maps."""

    def __init__(self, config: MotionAutoEncoderConfig):
        super().__init__()
        size, cm, taps = config.image_size, config.channel_multiplier, tuple(config.blur_kernel)
        cap = config.max_channels
        convs: list[nn.Module] = [conv_layer(3, channels_at(size, cm, cap), 1, taps)]
        res = size
        while res > 4:
            convs.append(ResBlock(channels_at(res, cm, cap), channels_at(res // 2, cm, cap), taps))
            res //= 2
        convs.append(EqualConv2d(channels_at(4, cm, cap), config.style_dim, 4))  # 4x4 -> 1x1
        self.convs = nn.ModuleList(convs)

    def forward(self, image: Tensor, keep_features: bool = True) -> tuple[Tensor, list[Tensor]]:
        """image (B, 3, S, S) -> h (B, style_dim), feature maps deepest first (8x8 ... SxS).

        The last ResBlock (4x4 output) and the final 4x4 conv are not warp sources.
        """
        features = []
        x = image
        for conv in self.convs[:-2]:
            x = conv(x)
            if keep_features:
                features.append(x)
        x = self.convs[-2](x)  # (B, 512, 4, 4)
        h = self.convs[-1](x)  # (B, style_dim, 1, 1)
        return h.flatten(1), features[::-1]


class Encoder(nn.Module):
    def __init__(self, config: MotionAutoEncoderConfig):
        super().__init__()
        self.net_app = AppearanceEncoder(config)
        d = config.style_dim
        # 4 x (512 -> 512) then 512 -> 20, no activation in between (the release's choice)
        self.fc = nn.Sequential(*[EqualLinear(d, d) for _ in range(4)], EqualLinear(d, config.motion_dim))


# -----------------------------------------------------------------------------
# decoder


class Direction(nn.Module):
    """Motion basis: r = alpha @ Q^T with Q the orthonormalised (QR) columns of `weight`.

    Q is cached while no gradient can flow into `weight` (eval mode, no autograd). The cache
    holds a view of the weight it was computed from, so that memory cannot be reused by another
    tensor, and is valid only while `weight` still is that memory at the same in-place version:
    loading, editing or moving the weights recomputes it.
    """

    def __init__(self, style_dim: int, motion_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(style_dim, motion_dim))
        self._cache: tuple[Tensor, int, Tensor] | None = None  # (weight view, version, Q)

    def _version(self) -> int | None:
        """The weight's in-place version when Q may be cached, else None."""
        w = self.weight
        if self.training or (torch.is_grad_enabled() and w.requires_grad) or w.is_meta:
            return None
        try:
            return w._version
        except RuntimeError:  # weights created under inference_mode have no version counter
            return None

    def _qr(self) -> Tensor:
        # QR needs float32/64; the +1e-8 is the release's (it pins LAPACK's signs: keep them)
        q, _ = torch.linalg.qr(self.weight.float() + 1e-8)
        return q.to(self.weight.dtype)

    def basis(self) -> Tensor:
        """Q (style_dim, motion_dim) with orthonormal columns."""
        version = self._version()
        if version is None:
            return self._qr()
        w = self.weight
        if self._cache is not None:
            source, cached_version, q = self._cache
            same = source.data_ptr() == w.data_ptr() and source.device == w.device and source.dtype == w.dtype
            if same and cached_version == version:
                return q
        q = self._qr()
        self._cache = (w.detach(), version, q)
        return q

    def forward(self, alpha: Tensor) -> Tensor:
        """alpha (B, motion_dim) -> motion latent (B, style_dim)."""
        return alpha @ self.basis().T.to(alpha.dtype)


class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated conv, optionally up-sampling x2 (transposed conv then blur).

    Computed by scaling the activations with the style and the output with the
    demodulation coefficient: the same function as modulating the weight per sample, but
    one shared-weight conv over the whole batch of frames instead of a grouped conv.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int,
        style_dim: int,
        taps: tuple[int, ...],
        demodulate: bool = True,
        upsample: bool = False,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, out_ch, in_ch, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_ch, bias_init=1.0)
        self.scale = 1 / math.sqrt(in_ch * kernel_size**2)
        self.padding = kernel_size // 2
        self.demodulate = demodulate
        self.upsample = upsample
        if upsample:
            # transposed conv gives 2H+1 for a 3x3 kernel; a (1, 1)-padded 4-tap blur brings it to 2H
            p = (len(taps) - 2) - (kernel_size - 1)
            self.blur = Blur(taps, pad=((p + 1) // 2 + 1, p // 2 + 1), scale=4)

    def forward(self, x: Tensor, latent: Tensor) -> Tensor:
        """x (B, in, H, W), latent (B, style_dim) -> (B, out, H', W')."""
        style = self.modulation(latent)  # (B, in)
        weight = self.weight[0] * self.scale  # (out, in, k, k)
        x = x * style[:, :, None, None]
        if self.upsample:
            x = F.conv_transpose2d(x, weight.transpose(0, 1), stride=2)  # (B, out, 2H+1, 2W+1)
        else:
            x = F.conv2d(x, weight, padding=self.padding)  # (B, out, H, W)
        if self.demodulate:
            # 1 / ||w_o * style||: (B, in) @ (in, out) -> (B, out)
            demod = torch.rsqrt(style.square() @ weight.square().sum((2, 3)).T + 1e-8)
            x = x.mul_(demod[:, :, None, None])  # x: this call's conv output
        if self.upsample:
            x = self.blur(x)
        return x


class NoiseInjection(nn.Module):
    """Kept for checkpoint compatibility: the release never injects noise (noise is None)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))


class StyledConv(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, style_dim: int, taps: tuple[int, ...], upsample: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, 3, style_dim, taps, upsample=upsample)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_ch)

    def forward(self, x: Tensor, latent: Tensor) -> Tensor:
        return self.activate(self.conv(x, latent))


class ToRGB(nn.Module):
    """1x1 EqualConv + FusedLeakyReLU (not modulated), + bias, + the up-sampled previous RGB."""

    def __init__(self, in_ch: int, taps: tuple[int, ...], upsample: bool = True):
        super().__init__()
        if upsample:  # the 4x4 `to_rgb1` has none (no kernel buffer in the checkpoint)
            self.upsample = Upsample(taps)
        self.conv = conv_layer(in_ch, 3, 1, taps)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        out = self.conv(x) + self.bias  # (B, 3, H, W)
        if skip is not None:
            out = out + self.upsample(skip)
        return out


class ToFlow(nn.Module):
    """Warp head: a modulated 1x1 conv to (flow x, flow y, mask), accumulated over levels."""

    def __init__(self, in_ch: int, style_dim: int, taps: tuple[int, ...]):
        super().__init__()
        self.upsample = Upsample(taps)
        self.conv = ModulatedConv2d(in_ch, 3, 1, style_dim, taps, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(
        self, x: Tensor, latent: Tensor, feature: Tensor, skip: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x (B, C, H, W), feature (B or 1, C, H, W) ->
        next-level input (B, C, H, W): the masked warped feature, x fills in where the mask is low;
        masked warped feature alone (B, C, H, W): what this level's to_rgb reads;
        raw 3-channel output (B, 3, H, W): the next level's skip;
        sampling grid (B, H, W, 2)."""
        out = self.conv(x, latent) + self.bias  # (B, 3, H, W)
        if skip is not None:
            out = out + self.upsample(skip)
        B, _, H, W = out.shape
        # identity grid in grid_sample's (x, y) order, x along the width
        ys = torch.linspace(-1.0, 1.0, H, device=out.device, dtype=out.dtype)
        xs = torch.linspace(-1.0, 1.0, W, device=out.device, dtype=out.dtype)
        identity = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (H, W, 2)
        grid = torch.tanh(out[:, :2]).permute(0, 2, 3, 1) + identity  # (B, H, W, 2)
        mask = torch.sigmoid(out[:, 2:3])  # (B, 1, H, W)
        if feature.shape[0] != B:  # one portrait, many frames: share its feature map
            feature = feature.expand(B, -1, -1, -1)
        warped = F.grid_sample(feature, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        warped = warped.mul_(mask)  # (B, C, H, W)
        return warped + x * (1 - mask), warped, out, grid


class ConstantInput(nn.Module):
    def __init__(self, channels: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch: int) -> Tensor:
        return self.input.expand(batch, -1, -1, -1)


class Decoder(nn.Module):
    """StyleGAN2 synthesis with flow warping of the encoder's feature maps at every level."""

    def __init__(self, config: MotionAutoEncoderConfig):
        super().__init__()
        size, cm, taps, d = (
            config.image_size,
            config.channel_multiplier,
            tuple(config.blur_kernel),
            config.style_dim,
        )
        cap = config.max_channels
        self.direction = Direction(d, config.motion_dim)
        self.input = ConstantInput(channels_at(4, cm, cap))
        self.conv1 = StyledConv(channels_at(4, cm, cap), channels_at(4, cm, cap), d, taps)
        self.to_rgb1 = ToRGB(channels_at(4, cm, cap), taps, upsample=False)  # built by the release, never run
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.to_flows = nn.ModuleList()
        in_ch, res = channels_at(4, cm, cap), 8
        while res <= size:
            out_ch = channels_at(res, cm, cap)
            self.convs.append(StyledConv(in_ch, out_ch, d, taps, upsample=True))
            self.convs.append(StyledConv(out_ch, out_ch, d, taps))
            self.to_rgbs.append(ToRGB(out_ch, taps))
            self.to_flows.append(ToFlow(out_ch, d, taps))
            in_ch, res = out_ch, res * 2

    def forward(self, latent: Tensor, feature_maps: list[Tensor]) -> tuple[Tensor, Tensor]:
        """latent (B, style_dim), feature maps deepest first -> image (B, 3, S, S), grid (B, S, S, 2)."""
        x = self.conv1(self.input(latent.shape[0]), latent)  # (B, 512, 4, 4)
        rgb = flow = grid = None
        for level, feature in enumerate(feature_maps):
            x = self.convs[2 * level](x, latent)  # (B, C, 2H, 2W)
            x = self.convs[2 * level + 1](x, latent)
            x, warped, flow, grid = self.to_flows[level](x, latent, feature, flow)
            # the RGB skip sees only the warped portrait features, not the synthesised activations
            # (pinned by the parity fixture: reading x instead changes dec_img by ~3)
            rgb = self.to_rgbs[level](warped, rgb)
        return rgb, grid


# -----------------------------------------------------------------------------
# the auto-encoder


@dataclass
class EncodedPortrait:
    """What the decoder needs from a portrait, computed once and reused for every frame."""

    identity: Tensor  # s_r (B, style_dim): net_app output h
    alpha: Tensor  # (B, motion_dim): enc.fc(h), the portrait's own motion coefficients
    reference_motion: Tensor  # r_s (B, style_dim) = direction(alpha)
    feature_maps: list[Tensor]  # deepest first: (B, C_j, 8 * 2^j, 8 * 2^j)


class MotionAutoEncoder(nn.Module):
    def __init__(self, config: MotionAutoEncoderConfig):
        super().__init__()
        size = config.image_size
        if size < 64 or size & (size - 1) or size > 1024:
            # the release's decoder needs at least the 8..64 levels (it fails at 32)
            raise ValueError(f"image_size: expected a power of two in [64, 1024], got {size}")
        self.config = config
        self.enc = Encoder(config)
        self.dec = Decoder(config)

    # -- input checks ----------------------------------------------------------

    def _check_image(self, image: Tensor, name: str = "image") -> None:
        s = self.config.image_size
        if not isinstance(image, Tensor) or not image.is_floating_point():
            got = image.dtype if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"{name}: expected a floating-point tensor in [-1, 1], got {got}")
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"{name}: expected shape (B, 3, {s}, {s}), got {tuple(image.shape)}")
        if image.shape[2] != s or image.shape[3] != s:
            raise ValueError(
                f"{name}: expected size {s}x{s} (config.image_size), got {image.shape[2]}x{image.shape[3]}"
            )
        _check_finite(image, name)

    def _check_latent(self, latent: Tensor, width: int, name: str) -> None:
        if not isinstance(latent, Tensor) or latent.dim() != 2 or latent.shape[1] != width:
            got = tuple(latent.shape) if isinstance(latent, Tensor) else type(latent).__name__
            raise ValueError(f"{name}: expected shape (B, {width}), got {got}")
        _check_finite(latent, name)

    def _check_feature_maps(self, feature_maps: list[Tensor], batch: int) -> None:
        expected = [
            (channels_at(r, self.config.channel_multiplier, self.config.max_channels), r)
            for r in (8 * 2**j for j in range(len(self.dec.to_flows)))
        ]
        if len(feature_maps) != len(expected):
            raise ValueError(
                f"feature_maps: expected {len(expected)} maps (8x8 ... "
                f"{self.config.image_size}x{self.config.image_size}), got {len(feature_maps)}"
            )
        for j, (f, (c, r)) in enumerate(zip(feature_maps, expected, strict=True)):
            if f.dim() != 4 or tuple(f.shape[1:]) != (c, r, r) or f.shape[0] not in (1, batch):
                raise ValueError(
                    f"feature_maps[{j}]: expected shape (1 or {batch}, {c}, {r}, {r}), got {tuple(f.shape)}"
                )

    # -- public API ------------------------------------------------------------

    def encode(self, image: Tensor) -> EncodedPortrait:
        """Encode portraits (B, 3, S, S) in [-1, 1] into identity, motion and warp sources."""
        self._check_image(image)
        identity, feature_maps = self.enc.net_app(image)  # (B, 512), [(B, C_j, R_j, R_j)]
        alpha = self.enc.fc(identity)  # (B, 20)
        return EncodedPortrait(
            identity=identity,
            alpha=alpha,
            reference_motion=self.dec.direction(alpha),
            feature_maps=feature_maps,
        )

    def motion_coefficients(self, image: Tensor) -> Tensor:
        """alpha (B, motion_dim) of face images (B, 3, S, S), without keeping feature maps."""
        self._check_image(image)
        identity, _ = self.enc.net_app(image, keep_features=False)
        return self.enc.fc(identity)

    def motion_latent(self, alpha: Tensor) -> Tensor:
        """Motion coefficients (B, motion_dim) -> motion latent r (B, style_dim)."""
        self._check_latent(alpha, self.config.motion_dim, "alpha")
        return self.dec.direction(alpha)

    def encode_motion(self, image: Tensor) -> Tensor:
        """Motion latent r (B, style_dim) of (user) face images: direction(fc(net_app(image)))."""
        return self.dec.direction(self.motion_coefficients(image))

    def decode(
        self, latent: Tensor, feature_maps: list[Tensor], return_flow: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Render frames from latents w = s_r + r_d.

        latent (B, style_dim); feature_maps from `encode` with batch B, or batch 1 to share one
        portrait across B frames. Returns the image (B, 3, S, S), roughly in [-1, 1] (clamp when
        converting to pixels), and with `return_flow` also the final-level sampling grid
        (B, S, S, 2) in grid_sample's (x, y) convention.
        """
        self._check_latent(latent, self.config.style_dim, "latent")
        self._check_feature_maps(feature_maps, latent.shape[0])
        image, grid = self.dec(latent, feature_maps)
        return (image, grid) if return_flow else image

    def forward(self, source: Tensor, driving: Tensor) -> Tensor:
        """Reconstruct: render `source`'s identity with `driving`'s motion (B, 3, S, S) each."""
        portrait = self.encode(source)
        return self.decode(portrait.identity + self.encode_motion(driving), portrait.feature_maps)


def _check_finite(x: Tensor, name: str) -> None:
    # one device sync; skipped for meta tensors, which have no values
    if not x.is_meta and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: expected finite values, got NaN or Inf")
