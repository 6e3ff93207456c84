"""Image decoding: one file with PIL (`decode_image`, what the loader workers do), a batch of files on
a device (`decode_batch`: nvJPEG on CUDA, PIL for the files it does not take), and what training
does with an undecodable file of a batch decoded there (`decode_training_batch`)."""

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

NO_JPEG_DECODER = ("augment_on: 'gpu' decodes with torchvision.io.decode_jpeg, which torchvision {} does not have; "
                   "set decode_on: 'cpu' to decode in the loader workers")


class UndecodableImageError(ValueError):
    """An image file that PIL cannot read (truncated, corrupt, not an image)."""


def decode_image(data: bytes, source: str) -> Image.Image:
    """Decode image bytes (JPEG, PNG, ... whatever the name says) into an RGB PIL image.

    CMYK, grayscale, palette and RGBA images are converted to RGB. Raises UndecodableImageError
    naming `source` when the bytes are not a complete image.
    """
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
    """The number of colour components in a JPEG's frame header (1 grey, 3 YCbCr/RGB, 4 CMYK/YCCK),
    or None when `data` is not a JPEG (a PNG under a .JPEG name, say) or has no frame header before
    its scan. Reads only the marker segments, never the image data."""
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
    """A file nvJPEG does not take (not a JPEG, CMYK, ...): PIL on the CPU, as the PIL recipes
    decode it, then `[3, H, W]` uint8 on `device`."""
    try:
        image = decode_image(data, f"image {index} of the batch")
    except UndecodableImageError as err:
        raise BatchDecodeError(index, str(err.__cause__ or err)) from err
    return to_device(pil_to_tensor(image), device)


ImageFiles = Union[PackedFiles, Sequence[bytes], Sequence[torch.Tensor]]


def file_tensors(files: ImageFiles) -> list[torch.Tensor]:
    """A batch's image files as 1-D uint8 CPU tensors: packed files as views of their buffer,
    `bytes` copied once (torch needs a writable buffer), tensors as they are."""
    if isinstance(files, PackedFiles):
        return files.unpack()
    return [f if isinstance(f, torch.Tensor) else torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files]


def jpeg_decoder() -> Callable | None:
    """torchvision's `decode_jpeg` to RGB (batched, nvJPEG on CUDA): `(data, device=...)`; or None
    where torchvision no longer has it (0.29 deprecated its decoders in favour of TorchCodec)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    return functools.partial(decode_jpeg, mode=ImageReadMode.RGB)


def decode_batch(files: ImageFiles, device: torch.device | str) -> list[torch.Tensor]:
    """Decode a batch's image files on `device` (nvJPEG, batched, on CUDA): B files (packed, bytes or
    uint8 tensors) -> B x uint8 `[3, H_i, W_i]`.

    Grey and colour JPEGs are decoded there, 3 channels each. The rare others (ImageNet's training set
    has 22 CMYK JPEGs and one PNG under a .JPEG name) are decoded by PIL on the CPU, as the PIL
    recipes decode them, and copied over. Raises BatchDecodeError naming the index of the first file
    that neither decodes (a truncated file, say).
    """
    decode_jpeg = jpeg_decoder()
    if decode_jpeg is None:
        raise RuntimeError(NO_JPEG_DECODER.format(torchvision.__version__))
    tensors = file_tensors(files)
    buffers = [memoryview(t.numpy()) for t in tensors]  # the headers are read without a copy
    images: list[torch.Tensor | None] = [None] * len(tensors)
    on_device = [i for i, b in enumerate(buffers) if jpeg_components(b) in (1, 3)]
    data = [tensors[i] for i in on_device]
    if data and torch.device(device).type == "cuda":
        # nvJPEG writes its outputs from a stream of its own that does not wait for this one, into
        # memory the caching allocator may have just taken back from tensors that kernels queued
        # here still read (pytorch/vision#9606): let those kernels finish first. On the prefetching
        # thread that is its own side stream, the previous batch's augmentation.
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
    """`decode_batch` for a training batch: an undecodable file is replaced by a copy of the next
    decodable-so-far file of the batch, with a warning naming `where` (the step), and the batch
    decoded again, so that every process keeps its batch size (which the cross-process gathers of
    the losses need), as the loader workers keep theirs when they decode. RuntimeError when no file
    of the batch decodes."""
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
