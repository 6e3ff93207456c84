"""Image decoding: one file with PIL (`decode_image`, in the loader workers), a batch on a device
(`decode_batch`: nvJPEG on CUDA), and training's repair of a batch (`decode_training_batch`)."""

from __future__ import annotations

import functools
import io
from typing import Callable, Sequence, Union

import torch
import torchvision
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from data_loader.transforms import PackedFiles
from utils.logging import get_logger

NO_JPEG_DECODER = ("augment_on: 'gpu' decodes with TorchCodec's decode_jpeg or torchvision.io.decode_jpeg: TorchCodec "
                   "is not installed (or does not load with this torch) and torchvision {} does not have one; "
                   "set decode_on: 'cpu' to decode in the loader workers")


class UndecodableImageError(ValueError):
    """An image file that PIL cannot read (truncated, corrupt, not an image)."""


def decode_image(data: bytes, source: str) -> Image.Image:
    """Image bytes of any format PIL reads -> an RGB PIL image, decoded now; UndecodableImageError
    naming `source` when they are not a complete image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes now: a truncated file fails here, not inside a transform
            return image if image.mode == "RGB" else image.convert("RGB")  # convert would copy an RGB image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UndecodableImageError(f"{source}: cannot decode the image ({err})") from err


class BatchDecodeError(UndecodableImageError):
    """Image `index` of a batch cannot be decoded."""

    def __init__(self, index: int, message: str):
        super().__init__(f"image {index} of the batch: cannot decode it ({message})")
        self.index = index


def jpeg_components(data: bytes | memoryview) -> int | None:
    """The colour components in a JPEG's frame header (1 grey, 3 YCbCr/RGB, 4 CMYK/YCCK), or None
    when `data` is not a JPEG or has no frame header before its scan; reads only the markers."""
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
            return data[pos + 9] if pos + 9 < len(data) else None
        if marker == 0xDA:  # start of scan without a frame
            return None
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A CPU tensor on `device` without waiting: through pinned memory, non-blocking, on CUDA."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _decode_on_cpu(data: bytes, index: int, device: torch.device | str) -> torch.Tensor:
    """A file nvJPEG does not take, decoded by PIL -> uint8 `[3, H, W]` on `device`."""
    try:
        image = decode_image(data, f"image {index} of the batch")
    except UndecodableImageError as err:
        raise BatchDecodeError(index, str(err.__cause__ or err)) from err
    return to_device(pil_to_tensor(image), device)


ImageFiles = Union[PackedFiles, Sequence[bytes], Sequence[torch.Tensor]]


def file_tensors(files: ImageFiles) -> list[torch.Tensor]:
    """A batch's files as 1-D uint8 CPU tensors (views of a packed buffer; `bytes` copied once, as
    torch needs a writable buffer)."""
    if isinstance(files, PackedFiles):
        return files.unpack()
    return [f if isinstance(f, torch.Tensor) else torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files]


@functools.cache
def torchcodec_decode_jpeg() -> Callable | None:
    """TorchCodec's `decode_jpeg`, or None where TorchCodec is not installed or does not load (a build
    for another torch fails with OSError or RuntimeError as its native library loads). Tried once."""
    try:
        from torchcodec.decoders import decode_jpeg
    except (ImportError, OSError, RuntimeError):
        return None
    return decode_jpeg


_announced: str | None = None  # the decoder the log last named


def _announce(name: str) -> None:
    global _announced
    if _announced != name:
        _announced = name
        get_logger().info("augment_on: 'gpu' decodes JPEGs with %s", name)


def jpeg_decoder() -> Callable | None:
    """A batched JPEG decoder to RGB (nvJPEG on CUDA) called as `(data, device=...)`, where `data` is
    one 1-D uint8 CPU tensor or a list of them: TorchCodec's `decode_jpeg` where it loads, else
    torchvision's (deprecated since 0.29), else None. The first call logs which one."""
    decode_jpeg = torchcodec_decode_jpeg()
    if decode_jpeg is not None:
        _announce("TorchCodec (torchcodec.decoders.decode_jpeg)")
        return functools.partial(decode_jpeg, mode="RGB")
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    _announce("torchvision.io.decode_jpeg")
    return functools.partial(decode_jpeg, mode=ImageReadMode.RGB)


def decode_batch(files: ImageFiles, device: torch.device | str) -> list[torch.Tensor]:
    """B files (packed, bytes or uint8 tensors) -> B x uint8 `[3, H_i, W_i]` on `device`. Grey and
    colour JPEGs decode there; the rest (ImageNet's train split has 22 CMYK JPEGs and a PNG) by PIL.
    BatchDecodeError names the first file that neither decodes."""
    decode_jpeg = jpeg_decoder()
    if decode_jpeg is None:
        raise RuntimeError(NO_JPEG_DECODER.format(torchvision.__version__))
    tensors = file_tensors(files)
    buffers = [memoryview(t.numpy()) for t in tensors]  # the headers are read without a copy
    images: list[torch.Tensor | None] = [None] * len(tensors)
    on_device = [i for i, b in enumerate(buffers) if jpeg_components(b) in (1, 3)]
    data = [tensors[i] for i in on_device]
    if data and torch.device(device).type == "cuda":
        # nvJPEG writes from a stream of its own into memory that kernels queued here may still read
        # (pytorch/vision#9606): let them finish first.
        torch.cuda.current_stream(device).synchronize()
    try:
        decoded = decode_jpeg(data, device=device) if data else []
    except RuntimeError:  # the batched call fails as a whole: one by one, to find the file
        decoded = []
        for i, one in zip(on_device, data):
            try:
                decoded.append(decode_jpeg(one, device=device))
            except RuntimeError:
                decoded.append(_decode_on_cpu(bytes(buffers[i]), i, device))
    for i, image in zip(on_device, decoded):
        images[i] = image
    for i, image in enumerate(images):
        if image is None:
            images[i] = _decode_on_cpu(bytes(buffers[i]), i, device)
    return images


def decode_training_batch(files: ImageFiles, device: torch.device | str, where: str) -> list[torch.Tensor]:
    """`decode_batch`, an undecodable file replaced by a copy of the next good one with a warning
    naming `where` (the step): the batch keeps its size, which the losses' gathers need.
    RuntimeError when no file decodes."""
    originals = file_tensors(files)
    files, source, bad = list(originals), list(range(len(originals))), set()
    for _ in range(len(files)):  # each failure finds a new undecodable file
        try:
            return decode_batch(files, device)
        except BatchDecodeError as err:
            get_logger().warning("%s: %s; a copy of another image of the batch takes its place", where, err)
            bad.add(source[err.index])
            good = [(err.index + k) % len(files) for k in range(1, len(files))]
            good = [i for i in good if i not in bad]
            if not good:
                break
            for slot in range(len(files)):  # every slot that holds the bad file, copies included
                if source[slot] in bad:
                    files[slot], source[slot] = originals[good[0]], good[0]
    raise RuntimeError(f"{where}: no image of the batch could be decoded")
