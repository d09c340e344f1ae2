"""Image checking for shard writing: prove an input decodes, and return the RGB JPEG to store.

Every input is decoded with Pillow to prove it is readable. A baseline/progressive JPEG that is already RGB,
upright (EXIF orientation 1) and at most `max_image_side` on its longer side is stored byte-identical; anything
else (PNG/GIF/TIFF/..., grayscale, CMYK, alpha, rotated, larger) is converted to RGB (alpha over white), downscaled
to `max_image_side` (Lanczos, after JPEG DCT scaling), turned upright and re-encoded at `jpeg_quality`.
Undecodable or truncated inputs raise `BadImageError`; the shard writer skips and reports them.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

from PIL import ExifTags, Image, ImageOps


class BadImageError(ValueError):
    """An input that is not a usable image (undecodable, truncated, empty); the message says why."""


@dataclass(frozen=True)
class PreparedImage:
    jpeg: bytes
    width: int
    height: int
    reencoded: str | None  # None when the input bytes are stored as they are, else why it was re-encoded


def describe_error(exc: BaseException) -> str:
    """`Type: message` without object addresses, so reports (and sidecars) are the same on every run."""
    return f"{type(exc).__name__}: " + re.sub(r"\s*<[^<>]* at 0x[0-9a-f]+>", "", str(exc))


def open_image(data: bytes) -> Image.Image:
    """The image in `data`, opened (header read, pixels not decoded yet)."""
    if not data:
        raise BadImageError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise BadImageError(f"too many pixels: {exc}") from exc
    except Exception as exc:  # UnidentifiedImageError and the plugins' assorted header errors
        raise BadImageError(f"not a readable image ({describe_error(exc)})") from exc


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8); 1 (upright) when there is none or it cannot be read."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
        return int(value) if value in range(1, 9) else 1
    except Exception:  # a broken EXIF block does not make the pixels unusable
        return 1


def _upright(image: Image.Image, orientation: int) -> Image.Image:
    """`image` (pixels in stored orientation) turned as `orientation` says, by `ImageOps.exif_transpose`.

    Applied after resizing, as the writer always has: resampling a turned image rounds differently.
    """
    if orientation == 1:
        return image
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    image.info["exif"] = exif.tobytes()  # the resized copy's own, so exif_transpose reads only the orientation
    return ImageOps.exif_transpose(image)


def reencode_reason(image: Image.Image, max_side: int) -> str | None:
    """Why `image` (opened, not decoded) cannot be stored as it is; None if its bytes can."""
    if image.format != "JPEG":
        return f"format {image.format or 'unknown'}"
    if image.mode != "RGB":
        return f"mode {image.mode}"
    if max(image.size) > max_side:
        return "downscaled"
    if _orientation(image) != 1:
        return "exif orientation"
    return None


def target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The stored size: (width, height) scaled so that the longer side is at most `max_side`."""
    longer = max(width, height)
    if longer <= max_side:
        return width, height
    scale = max_side / longer
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = image.convert("F")
        high = image.getextrema()[1]
        if isinstance(high, (int, float)) and high > 255:  # 16-bit data: map 0..65535 to 0..255
            image = image.point(lambda v: v / 257.0)
        image = image.convert("L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def prepare_image(data: bytes, max_image_side: int, jpeg_quality: int) -> PreparedImage:
    """Validate one encoded image and return the RGB JPEG to store (the rules: the module docstring).

    Raises `BadImageError` (with the reason) for anything Pillow cannot fully decode.
    """
    image = open_image(data)
    reason = reencode_reason(image, max_image_side)
    width, height = image.size
    target = target_size(width, height, max_image_side)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if reason is not None and image.format == "JPEG" and target != (width, height):
                image.draft(None, target)  # DCT-domain downscale by 1/2, 1/4, 1/8 (never below the target)
            image.load()  # full decode: truncated or corrupt data raises here
            if reason is None:
                return PreparedImage(jpeg=data, width=width, height=height, reencoded=None)
            orientation = _orientation(image)
            image = _to_rgb(image)
            if image.size != target:
                image = image.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
            image = _upright(image, orientation)
    except BadImageError:
        raise
    except Exception as exc:  # OSError "image file is truncated", SyntaxError, zlib errors, ...
        raise BadImageError(f"corrupt or truncated image data ({describe_error(exc)})") from exc
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=jpeg_quality)
    return PreparedImage(jpeg=out.getvalue(), width=image.width, height=image.height, reencoded=reason)
