"""The recipes (`data_loader.recipes`) as batched tensor code on any device (`augment_on: gpu`):
per-image PIL recipes on CPU workers cannot feed a GPU. The steps are torchvision's and PIL's,
vectorised; the resize is PIL's antialiased filter as two per-sample matrices, `Wy @ crop @ Wx^T`,
crop and flip folded in (`F.interpolate` takes one size per call, `roi_align` is a box filter).
Pixels stay float between steps (PIL rounds to uint8): about a grey level apart. All randomness is
drawn on the CPU from the caller's generator: the views depend on its seed, not on the device.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from data_loader.decode import NO_JPEG_DECODER, ImageFiles, decode_batch, decode_training_batch, jpeg_decoder, to_device
from data_loader.recipes import MEAN, RATIO, RECIPES, STD, ViewSpec, recipe_views
from data_loader.transforms import PackedImages, build_transform, image_array
from utils.config import ConfigError

GPU_RECIPES = tuple(name for name, recipe in RECIPES.items() if all(isinstance(v, ViewSpec) for v in recipe.views))
LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
BLUR_RADIUS = 6  # 3 sigma at the largest sigma (2): 13 taps
MAX_CANVAS_ELEMENTS = 2**28  # pixel values of one padded group of decoded images (512 MiB in float16)
WINDOW_FRACTION = 0.5  # crop_window: resize from a window of the canvas when it is at most this part
ALIGN = 8  # canvas and window sides padded to a multiple of this: float16 products on tensor cores want it


# ----------------------------------------------------------------------------- recipes


def view_specs(transform_type: str, n_augs: int) -> list[ViewSpec]:
    """The views of recipe `transform_type`; ConfigError for a recipe without a GPU version (the
    centre crops) or a view count it does not make."""
    if transform_type not in GPU_RECIPES:
        valid = ", ".join(GPU_RECIPES)
        raise ConfigError(f"transform_type: {transform_type!r} has no GPU version; GPU recipes: {valid}")
    return recipe_views(transform_type, n_augs)


@dataclasses.dataclass(frozen=True)
class ViewParams:
    """The random parameters of one view for a batch of B images (CPU tensors)."""

    boxes: torch.Tensor  # [B, 4] int64: top, left, height, width of the crop
    flip: torch.Tensor  # [B] bool
    jitter: torch.Tensor  # [B] bool: colour jitter applied
    factors: torch.Tensor  # [B, 4] float: brightness, contrast, saturation factors, hue shift
    order: torch.Tensor  # [B, 4] int64: a permutation of the 4 jitter steps
    gray: torch.Tensor  # [B] bool
    blur: torch.Tensor  # [B] bool
    sigma: torch.Tensor  # [B] float
    solarize: torch.Tensor  # [B] bool


def crop_boxes(sizes: torch.Tensor, scale: tuple[float, float], gen: torch.Generator,
               ratio: tuple[float, float] = RATIO, attempts: int = 10) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params for sizes `[B, 2]` (H, W) -> boxes `[B, 4]` int64 (top,
    left, height, width): the first of `attempts` draws that fits, else the centre crop in `ratio`."""
    n = sizes.shape[0]
    height, width = sizes[:, :1].double(), sizes[:, 1:].double()
    u = torch.rand(n, 2, attempts, generator=gen, dtype=torch.float64)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1])
    w, h = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.double().argmax(1, keepdim=True)  # the first attempt that fits (0 when none does)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    height, width = height[:, 0], width[:, 0]
    in_ratio = width / height
    fw = torch.where(in_ratio > ratio[1], torch.round(height * ratio[1]), width)
    fh = torch.where(in_ratio < ratio[0], torch.round(width / ratio[0]), height)
    found = fits.any(1)
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    u = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    top = torch.where(found, torch.floor(u[:, 0] * (height - h + 1)), torch.div(height - h, 2, rounding_mode="floor"))
    left = torch.where(found, torch.floor(u[:, 1] * (width - w + 1)), torch.div(width - w, 2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], 1).long()


def join_params(params: Sequence[ViewParams]) -> ViewParams:
    """The parameters of k views of B images as those of one batch of k B crops (view-major)."""
    fields = [f.name for f in dataclasses.fields(ViewParams)]
    return ViewParams(**{f: torch.cat([getattr(p, f) for p in params]) for f in fields})


def sample_view(spec: ViewSpec, sizes: torch.Tensor, gen: torch.Generator) -> ViewParams:
    """Draw one view's parameters for images of sizes `[B, 2]` (H, W) from the CPU generator `gen`."""
    n = sizes.shape[0]
    boxes = crop_boxes(sizes, spec.scale, gen, spec.ratio)
    u = torch.rand(n, 5, generator=gen)
    b, c, s, h = spec.jitter
    lo = torch.tensor([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h])
    hi = torch.tensor([1 + b, 1 + c, 1 + s, h])
    factors = lo + (hi - lo) * torch.rand(n, 4, generator=gen)
    order = torch.rand(n, 4, generator=gen).argsort(1)
    sigma_lo, sigma_hi = spec.blur_sigma
    sigma = sigma_lo + (sigma_hi - sigma_lo) * torch.rand(n, generator=gen)
    return ViewParams(boxes=boxes, flip=u[:, 0] < spec.flip_p, jitter=u[:, 1] < spec.jitter_p, factors=factors,
                      order=order, gray=u[:, 2] < spec.gray_p, blur=u[:, 3] < spec.blur_p, sigma=sigma,
                      solarize=u[:, 4] < spec.solarize_p)


# ----------------------------------------------------------------------------- resize


def _filter(x: torch.Tensor, bicubic: bool) -> torch.Tensor:
    """PIL's resampling filters: bicubic (a = -0.5) or bilinear (triangle), support 2 or 1."""
    x = x.abs()
    if not bicubic:
        return (1 - x).clamp(min=0)
    a = -0.5
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_taps(start: torch.Tensor, length: torch.Tensor, size: int, bicubic: bool,
                device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL's antialiased resampling of the crop [start, start + length) along one axis to `size`
    pixels, as taps: output o = `sum_t weight[b, o, t] * pixel[index[b, o, t]]`, weights normalised
    inside the crop (0 outside). start, length `[B]` int64 on the CPU (so nothing waits for the
    device) -> index `[B, size, T]` int64, weight `[B, size, T]` float32, on `device`."""
    radius = 2.0 if bicubic else 1.0  # the filter's support at scale 1
    support = radius * max(float(length.max()) / size, 1.0)
    taps = math.ceil(2 * support) + 2
    start, length = to_device(start, device), to_device(length, device)
    step = (length.float() / size)[:, None, None]  # [B, 1, 1] input pixels per output pixel
    centre = (torch.arange(size, dtype=torch.float32, device=device)[None, :, None] + 0.5) * step
    stretch = step.clamp(min=1.0)
    first = torch.floor(centre - radius * stretch - 0.5)  # [B, size, 1]
    pos = first + torch.arange(taps, dtype=torch.float32, device=device)  # [B, size, T], relative to start
    weight = _filter((pos + 0.5 - centre) / stretch, bicubic) * ((pos >= 0) & (pos < length[:, None, None]))
    weight = weight / weight.sum(-1, keepdim=True)
    index = pos.long() + start[:, None, None]
    return index, weight


def resize_matrix(start: torch.Tensor, length: torch.Tensor, size: int, extent: int, bicubic: bool,
                  flip: torch.Tensor | None = None, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`resize_taps` as matrices `[B, size, extent]` (`dtype`, on `device`) over an axis of `extent`
    pixels, rows reversed where `flip` `[B]`; start, length, flip on the CPU."""
    index, weight = resize_taps(start, length, size, bicubic, device)
    if flip is not None:
        flip = to_device(flip, device)[:, None, None]
        index, weight = torch.where(flip, index.flip(1), index), torch.where(flip, weight.flip(1), weight)
    matrix = torch.zeros(len(start), size, extent, dtype=dtype, device=device)
    return matrix.scatter_add_(2, index.clamp(0, extent - 1), weight.to(dtype))  # clamped taps add 0


def crop_window(canvas: torch.Tensor, boxes: torch.Tensor, fraction: float = WINDOW_FRACTION
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Windows `[m, h, 3, w]` of `canvas` `[n, Hc, 3, Wc]` around the crops `boxes` `[m, 4]` (CPU; crop
    c on image c mod n), h and w the largest crop's rounded up to ALIGN, and the boxes relative to
    them; None when a window would exceed `fraction` of the canvas (small crops resize cheaply)."""
    n, height, _, width = canvas.shape
    span_h, span_w = min(aligned(int(boxes[:, 2].max())), height), min(aligned(int(boxes[:, 3].max())), width)
    if span_h * span_w > fraction * height * width:
        return None
    top = boxes[:, 0].clamp(max=height - span_h)
    left = boxes[:, 1].clamp(max=width - span_w)
    image = to_device(torch.arange(len(boxes)) % n, canvas.device)
    rows = to_device(top[:, None] + torch.arange(span_h), canvas.device)
    cols = to_device(left[:, None] + torch.arange(span_w), canvas.device)
    window = canvas[image[:, None], rows]  # [m, span_h, 3, Wc]
    window = window.gather(3, cols[:, None, None, :].expand(len(boxes), span_h, 3, span_w))
    return window, boxes - torch.stack([top, left, torch.zeros_like(top), torch.zeros_like(top)], 1)


def _resize(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """`rows @ image @ cols^T` per image and channel: images `[n, H, 3, W]`, rows `[n, S, H]`, cols
    `[n, S, W]` -> `[n, S, 3, S]`. Channels between rows and columns: neither product copies."""
    n, height, _, width = images.shape
    size = rows.shape[1]
    if height >= width:  # rows first: [n, S, H] @ [n, H, 3W] -> [n, S, 3W] = [n, 3S, W]
        out = (rows @ images.view(n, height, 3 * width)).view(n, 3 * size, width) @ cols.transpose(1, 2)
    else:  # columns first: [n, 3H, W] @ [n, W, S] -> [n, 3H, S] = [n, H, 3S]
        out = rows @ (images.view(n, 3 * height, width) @ cols.transpose(1, 2)).view(n, height, 3 * size)
    return out.view(n, size, 3, size)


def crop_resize(canvas: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int,
                bicubic: bool) -> torch.Tensor:
    """Crops `boxes` `[m, 4]` (top, left, h, w; CPU; crop c of image c mod n) of `canvas`
    (`pad_to_canvas`), resized to float32 `[m, 3, size, size]` in [0, 1], mirrored where `flip`
    `[m]` (CPU)."""
    n, device, dtype = canvas.shape[0], canvas.device, canvas.dtype
    windows = crop_window(canvas, boxes)
    if windows is not None:
        canvas, boxes = windows
    height, width = canvas.shape[1], canvas.shape[3]
    rows = resize_matrix(boxes[:, 0], boxes[:, 2], size, height, bicubic, device=device, dtype=dtype)
    cols = resize_matrix(boxes[:, 1], boxes[:, 3], size, width, bicubic, flip, device=device, dtype=dtype)
    if windows is not None:
        out = _resize(canvas, rows, cols)
    else:  # the k crops of each image, each against the whole canvas
        out = torch.cat([_resize(canvas, r, c) for r, c in zip(rows.split(n), cols.split(n))])
    out = out.permute(0, 2, 1, 3).float()  # [m, S, 3, S] -> [m, 3, S, S]
    return out.mul_(1 / 255).clamp_(0, 1)


def canvas_groups(sizes: torch.Tensor, max_elements: int) -> list[torch.Tensor]:
    """Index groups of B images of sizes `[B, 2]` to pad together: landscape and portrait apart (they
    would pad to squares), by area, each canvas (n x 3 x max H x max W) under `max_elements`."""
    groups, current, max_h, max_w = [], [], 0, 0
    area, portrait = sizes.prod(1), sizes[:, 0] > sizes[:, 1]
    for i in torch.argsort(area + portrait * (area.max() + 1)).tolist():
        h, w = max(max_h, aligned(int(sizes[i, 0]))), max(max_w, aligned(int(sizes[i, 1])))
        turns = bool(current) and bool(portrait[i]) != bool(portrait[current[-1]])
        if current and (turns or (len(current) + 1) * 3 * h * w > max_elements):
            groups.append(torch.tensor(current))
            current, h, w = [], aligned(int(sizes[i, 0])), aligned(int(sizes[i, 1]))
        current.append(i)
        max_h, max_w = h, w
    groups.append(torch.tensor(current))
    return groups


def aligned(length: int) -> int:
    """`length` rounded up to a multiple of ALIGN."""
    return -(-length // ALIGN) * ALIGN


def pad_to_canvas(images: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 images `[3, H_i, W_i]` -> `[n, Hc, 3, Wc]` of `dtype` (values 0-255, exact in float16),
    each top-left, zero-padded to the largest side rounded up to ALIGN."""
    height, width = aligned(max(im.shape[1] for im in images)), aligned(max(im.shape[2] for im in images))
    canvas = images[0].new_zeros(len(images), height, 3, width, dtype=dtype)
    for i, image in enumerate(images):
        canvas[i, : image.shape[1], :, : image.shape[2]] = image.transpose(0, 1)
    return canvas


# ----------------------------------------------------------------------------- colour


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """`[n, 3, H, W]` -> the luma `[n, 1, H, W]` (one batched product over the channels)."""
    n, _, height, width = x.shape
    luma = to_device(torch.tensor([LUMA], dtype=x.dtype), x.device)  # [1, 3]
    return (luma @ x.reshape(n, 3, height * width)).view(n, 1, height, width)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other, clamped to [0, 1]; factor `[n]`."""
    return torch.lerp(other, x, factor.view(-1, 1, 1, 1)).clamp_(0, 1)


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of `[n, 3, H, W]` by `shift` `[n]` turns, as torchvision's RGB -> HSV -> RGB:
    value v and chroma c stay; channel j is v - c * clamp(min(k, 4 - k), 0, 1), k = (n_j + 6 hue)
    mod 6, n = 5, 3, 1. A grey pixel (c = 0) stays v, so it needs no case."""
    maxc = x.amax(1, keepdim=True)
    chroma = maxc - x.amin(1, keepdim=True)
    r, g, b = ((maxc - x) / torch.where(chroma > 0, chroma, 1.0)).unbind(1)  # distances from the max channel
    sextant = torch.where(x[:, 0] == maxc[:, 0], b - g, torch.where(x[:, 1] == maxc[:, 0], 2 + r - b, 4 + g - r))
    turn = to_device(torch.tensor([5.0, 3.0, 1.0]), x.device).view(1, 3, 1, 1)
    k = torch.remainder(turn + (sextant + 6 * shift.view(-1, 1, 1)).unsqueeze(1), 6)
    return maxc - chroma * torch.minimum(k, 4 - k).clamp_(0, 1)


def jitter_step(x: torch.Tensor, step: int, factor: torch.Tensor) -> torch.Tensor:
    """ColorJitter's step 0-3 (brightness, contrast, saturation, hue) on `[n, 3, H, W]`, factor `[n]`."""
    if step == 0:  # a blend with black
        return (factor.view(-1, 1, 1, 1) * x).clamp_(0, 1)
    if step == 1:  # a blend with the mean luma, which is the luma of the channel means
        return _blend(x, grayscale(x.mean((2, 3), keepdim=True)), factor)
    if step == 2:
        return _blend(x, grayscale(x), factor)
    return shift_hue(x, factor)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor,
                 applied: torch.Tensor | None = None) -> torch.Tensor:
    """torchvision's ColorJitter per sample, in place: `[n, 3, H, W]`, factors `[n, 4]`, order `[n, 4]`
    (each sample's permutation of the steps), `applied` `[n]` bool (default all), all on the CPU so
    that nothing waits for the GPU."""
    applied = torch.ones(len(order), dtype=torch.bool) if applied is None else applied
    for position in range(4):
        for step in range(4):
            x = _on_subset(x, (order[:, position] == step) & applied,
                           lambda y, f, step=step: jitter_step(y, step, f), factors[:, step])
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur `[n, 3, H, W]` with a Gaussian of per-sample std `sigma` `[n]` (13 separable taps, edges
    replicated); one grouped convolution per axis."""
    n, c, height, width = x.shape
    taps = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (taps[None] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n * c, 13]
    flat = x.reshape(1, n * c, height, width)
    flat = F.pad(flat, (BLUR_RADIUS,) * 4, mode="replicate")
    flat = F.conv2d(flat, kernel.view(n * c, 1, -1, 1), groups=n * c)
    flat = F.conv2d(flat, kernel.view(n * c, 1, 1, -1), groups=n * c)
    return flat.view(n, c, height, width)


def _on_subset(x: torch.Tensor, mask: torch.Tensor, fn, *args: torch.Tensor) -> torch.Tensor:
    """`x[mask] = fn(x[mask], *(a[mask] for a in args))` in place; `mask` `[n]` bool and `args` on the CPU."""
    idx = mask.nonzero()[:, 0]
    if len(idx) == 0:
        return x
    device_idx = to_device(idx, x.device)
    x[device_idx] = fn(x[device_idx], *(to_device(a[idx], x.device) for a in args))
    return x


def colour_view(x: torch.Tensor, p: ViewParams) -> torch.Tensor:
    """Jitter, grayscale, blur, solarisation in place: `[n, 3, S, S]` in [0, 1] (`p` on the CPU)."""
    x = color_jitter(x, p.factors, p.order, p.jitter)
    x = _on_subset(x, p.gray, lambda y: grayscale(y).expand_as(y))
    x = _on_subset(x, p.blur, gaussian_blur, p.sigma)
    # PIL inverts the uint8 pixels >= 128, i.e. the float pixels that round to 128 or more
    return _on_subset(x, p.solarize, lambda y: torch.where(y >= 127.5 / 255, 1 - y, y))


# ----------------------------------------------------------------------------- the recipe


class GpuRecipe:
    """Recipe `transform_type` with `n_augs` views: `recipe(images, generator)`, B uint8 images
    `[3, H_i, W_i]` on one device and a CPU generator -> n_augs normalised float32 `[B, 3, S, S]`
    (S = 224, or 96 for `dino_multicrop`'s local views). Crops are resized in `resize_dtype`, by
    default float16 on CUDA (tensor cores; within a third of a grey level of float32), else float32.
    """

    def __init__(self, transform_type: str, n_augs: int, max_canvas_elements: int = MAX_CANVAS_ELEMENTS,
                 resize_dtype: torch.dtype | None = None):
        self.specs = view_specs(transform_type, n_augs)
        self.max_canvas_elements = max_canvas_elements
        self.resize_dtype = resize_dtype

    def __len__(self) -> int:
        return len(self.specs)

    def sample_params(self, sizes: torch.Tensor, generator: torch.Generator) -> list[ViewParams]:
        """Every view's parameters for images of sizes `[B, 2]` (H, W)."""
        return [sample_view(spec, sizes, generator) for spec in self.specs]

    def apply(self, images: Sequence[torch.Tensor], params: Sequence[ViewParams]) -> list[torch.Tensor]:
        """The views with parameters `params`: B x uint8 `[3, H_i, W_i]` -> n_augs x `[B, 3, S, S]`. Views of
        one size and filter are made as one batch of crops (fewer kernel launches, same values)."""
        device, n = images[0].device, len(images)
        dtype = self.resize_dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        sizes = torch.tensor([im.shape[1:] for im in images])
        kinds: dict[tuple[int, bool], list[int]] = {}  # (size, bicubic) -> the views made together
        for v, spec in enumerate(self.specs):
            kinds.setdefault((spec.size, spec.bicubic), []).append(v)
        joined = {kind: join_params([params[v] for v in members]) for kind, members in kinds.items()}
        crops = {kind: torch.empty(len(members) * n, 3, kind[0], kind[0], device=device)
                 for kind, members in kinds.items()}
        for group in canvas_groups(sizes, self.max_canvas_elements):
            canvas = pad_to_canvas([images[i] for i in group], dtype)
            for kind, members in kinds.items():
                index = (torch.arange(len(members))[:, None] * n + group).flatten()  # crop j n + i: view j of image i
                p = joined[kind]
                crops[kind][to_device(index, device)] = crop_resize(canvas, p.boxes[index], p.flip[index], *kind)
        mean = to_device(torch.tensor(MEAN).view(1, 3, 1, 1), device)
        std = to_device(torch.tensor(STD).view(1, 3, 1, 1), device)
        views: dict[int, torch.Tensor] = {}
        for kind, members in kinds.items():
            x = torch.addcmul(-mean / std, colour_view(crops[kind], joined[kind]), 1 / std, out=crops[kind])
            views.update(zip(members, x.split(n)))
        return [views[v] for v in range(len(self.specs))]

    def __call__(self, images: Sequence[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
        sizes = torch.tensor([im.shape[1:] for im in images])
        return self.apply(images, self.sample_params(sizes, generator))


def gpu_views(batch: ImageFiles | PackedImages, labels: torch.Tensor, recipe: GpuRecipe, device: torch.device | str,
              generator: torch.Generator, where: str | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A loader's batch of B files (decoded here) or `PackedImages`, labels `[B]` -> (n_augs x float32
    `[B, 3, S, S]`, labels int64 `[B]`), on `device`. An undecodable file raises BatchDecodeError;
    with `where` (the training step, for the warning) a copy of another file replaces it."""
    if isinstance(batch, PackedImages):
        images = batch.to(device, non_blocking=True).unpack()
    elif where is not None:
        images = decode_training_batch(batch, device, where)
    else:
        images = decode_batch(batch, device)
    return recipe(images, generator), labels.to(device, non_blocking=True)


DecodeOn = Optional[Literal["cpu", "gpu"]]


def gpu_and_worker_steps(augment_on: Literal["cpu", "gpu"], decode_on: DecodeOn, transform_type: str, n_augs: int,
                         training: bool) -> tuple[GpuRecipe | None, Callable[[Image.Image], Any] | None]:
    """(the trainer's GPU recipe, the workers' step after PIL decoding): augment_on cpu -> (None, the
    PIL recipe); gpu -> (GpuRecipe, None: the files go undecoded); gpu with decode_on cpu ->
    (GpuRecipe, `image_array`). ConfigError: gpu outside training; decode_on gpu, augment_on cpu."""
    if augment_on == "cpu":
        if decode_on == "gpu":
            raise ConfigError("decode_on: 'gpu' needs augment_on: 'gpu' (the CPU recipes augment PIL images)")
        return None, build_transform(transform_type, n_augs)
    if not training:
        raise ConfigError("augment_on: 'gpu' is for training loaders (train: true with shuffling)")
    recipe = GpuRecipe(transform_type, n_augs)
    if decode_on != "cpu" and jpeg_decoder() is None:
        raise ConfigError(NO_JPEG_DECODER.format(torchvision.__version__))
    return recipe, image_array if decode_on == "cpu" else None
