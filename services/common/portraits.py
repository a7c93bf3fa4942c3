"""Portrait photo bytes -> the avatar's `PortraitEncoding`, as every service builds it.

The motion encoder encodes a new avatar with this and the decoder rebuilds a cached one from
the photo in Redis with it, so both get the same encoding. The bytes are validated and decoded
by `services.wire.images.decode_image`, the model part is the library's `encode_portrait_photo`.
"""

from __future__ import annotations

from avatar_forcing.engine.portrait import PortraitEncoding, encode_portrait_photo
from avatar_forcing.media.face_crop import FaceCropper, NoFaceError
from avatar_forcing.nn.motion_autoencoder import MotionAutoEncoder
from services.wire.errors import ValidationError
from services.wire.images import decode_image

__all__ = ["portrait_encoding"]


def portrait_encoding(
    mae: MotionAutoEncoder, cropper: FaceCropper, portrait: bytes, source: str, field: str = "image"
) -> PortraitEncoding:
    """Portrait photo bytes -> the avatar's encoding: decode, crop the largest face, encode.

    Bad bytes and a photo without a face are INVALID_ARGUMENT on `field`; `source` names the
    image in the no-face message.
    """
    image = decode_image(portrait, field)
    try:
        return encode_portrait_photo(mae, cropper, image, source)
    except NoFaceError as exc:
        raise ValidationError(field, f"{exc}; expected a photo with a clearly visible, roughly frontal face") from None
