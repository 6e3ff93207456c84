"""The batched recipes of data_loader.gpu_augment (docs/reference.md §5) against the PIL recipes and torchvision,
on CPU tensors: the sampled parameters' statistics (fixed seeds, bounds many standard deviations
wide), each step's arithmetic, shapes and normalisation, and JPEG decoding."""

import dataclasses
import io
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms as T

from data_loader import decode
from data_loader import gpu_augment as ga
from data_loader.decode import decode_image
from data_loader.recipes import MEAN, STD
from data_loader.transforms import PackedFiles, PackedImages, image_array
from utils.config import ConfigError

N = 20_000  # samples per statistic: a rate's standard deviation is at most 0.0035


def smooth_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A smooth random uint8 image `[3, H, W]` (a bicubically upsampled coarse colour field)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
    field = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
    return torch.from_numpy(np.asarray(field).copy()).permute(2, 0, 1)


def jpeg_bytes(image: torch.Tensor, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).convert(mode).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def params_of(transform_type: str, n_augs: int, size=(375, 500), n: int = N) -> list[ga.ViewParams]:
    sizes = torch.tensor([size] * n)
    return ga.GpuRecipe(transform_type, n_augs).sample_params(sizes, torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- sampled parameters


@pytest.mark.parametrize("scale", [(0.14, 1.0), (0.05, 0.14), (0.08, 1.0)])
def test_crop_boxes_follow_random_resized_crop(scale):
    height, width = 375, 500
    boxes = ga.crop_boxes(torch.tensor([[height, width]] * N), scale, torch.Generator().manual_seed(1))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    area = (h * w).double() / (height * width)
    log_ratio = torch.log(w.double() / h.double())
    # rounding to whole pixels moves the area and the ratio a little past the ranges
    assert area.min() > scale[0] * 0.97 and area.max() <= 1.0
    assert log_ratio.abs().max() < math.log(4 / 3) + 0.03

    torch.manual_seed(1)  # torchvision's get_params draws from the global generator
    ref = torch.tensor([T.RandomResizedCrop.get_params(torch.empty(3, height, width), list(scale), [3 / 4, 4 / 3])
                        for _ in range(4000)])
    ref_area = (ref[:, 2] * ref[:, 3]).double() / (height * width)
    ref_log_ratio = torch.log(ref[:, 3].double() / ref[:, 2].double())
    for ours, theirs in ((area, ref_area), (log_ratio, ref_log_ratio)):
        q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
        assert torch.allclose(ours.quantile(q), theirs.quantile(q), atol=0.03 * (theirs.max() - theirs.min()))
    # the crops that fit the image have a log-uniform ratio: inside the middle of the range where no
    # retry biases it (small scales), equal counts in equal log intervals
    if scale[1] < 0.5:
        counts = torch.histc(log_ratio, bins=4, min=-0.25, max=0.25)
        assert (counts / counts.mean() - 1).abs().max() < 0.1


def test_crop_boxes_centre_fallback_equals_torchvision():
    """No draw fits a 10 x 1000 image at scale >= 0.9: the centre crop clamped to ratio 4/3."""
    for size in ([10, 1000], [1000, 10], [40, 44]):
        scale = (0.9, 1.0) if size[0] != 40 else (2.0, 3.0)  # areas above the image's: never fits
        ours = ga.crop_boxes(torch.tensor([size] * 5), scale, torch.Generator().manual_seed(0))
        theirs = T.RandomResizedCrop.get_params(torch.empty(3, *size), list(scale), [3 / 4, 4 / 3])
        assert ours.tolist() == [list(theirs)] * 5


def rate(mask: torch.Tensor) -> float:
    return mask.float().mean().item()


@pytest.mark.parametrize("transform_type,n_augs,blur,solarize", [
    ("dino", 4, [1.0, 0.1, 1.0, 0.1], [0.0, 0.2, 0.0, 0.2]),
    ("dino_multicrop", 8, [1.0, 0.1] + [0.5] * 6, [0.0, 0.2] + [0.0] * 6),
    ("simclr", 2, [0.5, 0.5], [0.0, 0.0]),
])
def test_step_probabilities(transform_type, n_augs, blur, solarize):
    for p, blur_p, solarize_p in zip(params_of(transform_type, n_augs), blur, solarize):
        assert abs(rate(p.flip) - 0.5) < 0.03
        assert abs(rate(p.jitter) - 0.8) < 0.03
        assert abs(rate(p.gray) - 0.2) < 0.03
        assert abs(rate(p.blur) - blur_p) < 0.03
        assert abs(rate(p.solarize) - solarize_p) < 0.03
        assert p.sigma.min() >= 0.1 and p.sigma.max() <= 2.0
        assert abs(p.sigma.mean().item() - 1.05) < 0.03  # uniform in [0.1, 2]


@pytest.mark.parametrize("transform_type,jitter", [("dino", (0.4, 0.4, 0.2, 0.1)), ("simclr", (0.8, 0.8, 0.8, 0.2))])
def test_jitter_factors_and_order_follow_color_jitter(transform_type, jitter):
    p = params_of(transform_type, 2)[0]
    lo = torch.tensor([1 - jitter[0], 1 - jitter[1], 1 - jitter[2], -jitter[3]])
    hi = torch.tensor([1 + jitter[0], 1 + jitter[1], 1 + jitter[2], jitter[3]])
    assert (p.factors >= lo).all() and (p.factors <= hi).all()
    assert torch.allclose(p.factors.mean(0), (lo + hi) / 2, atol=0.02)
    assert (p.order.sort(1).values == torch.arange(4)).all()  # a permutation per sample
    first = torch.bincount(p.order[:, 0], minlength=4).float() / N
    assert (first - 0.25).abs().max() < 0.03  # every step first equally often


def test_views_use_the_recipe_sizes_and_scales():
    specs = ga.view_specs("dino_multicrop", 8)
    assert [s.size for s in specs] == [224] * 2 + [96] * 6
    assert [s.scale for s in specs] == [(0.14, 1.0)] * 2 + [(0.05, 0.14)] * 6
    assert all(s.bicubic for s in specs) and not ga.view_specs("simclr", 2)[0].bicubic
    locals_ = params_of("dino_multicrop", 8, n=2000)[2:]
    area = torch.cat([(p.boxes[:, 2] * p.boxes[:, 3]).double() / (375 * 500) for p in locals_])
    assert area.min() > 0.05 * 0.95 and area.max() < 0.14 * 1.05


@pytest.mark.parametrize("transform_type,n_augs", [("dino", 1), ("dino", 5), ("dino_multicrop", 2), ("val", 1),
                                                   ("simclr", 0), ("linear_prob", 2)])
def test_unknown_recipes_and_view_counts_are_errors(transform_type, n_augs):
    with pytest.raises(ConfigError):
        ga.GpuRecipe(transform_type, n_augs)


# ----------------------------------------------------------------------------- the steps' arithmetic


def pil_crop_resize(image: torch.Tensor, box, size: int, bicubic: bool) -> torch.Tensor:
    top, left, h, w = box
    resample = Image.BICUBIC if bicubic else Image.BILINEAR
    pil = Image.fromarray(image.permute(1, 2, 0).numpy()).crop((left, top, left + w, top + h))
    return torch.from_numpy(np.asarray(pil.resize((size, size), resample)).copy()).permute(2, 0, 1).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bicubic", [True, False])
@pytest.mark.parametrize("box,size", [((20, 30, 300, 400), 224), ((5, 7, 60, 50), 96), ((0, 0, 375, 500), 96),
                                      ((300, 420, 75, 80), 224)])
def test_crop_resize_equals_pil(box, size, bicubic, dtype):
    image = smooth_image(375, 500)
    ref = pil_crop_resize(image, box, size, bicubic)
    canvas = ga.pad_to_canvas([image, smooth_image(400, 520, seed=1)], dtype)  # padded beyond the image
    for flip in (False, True):
        out = ga.crop_resize(canvas[:1], torch.tensor([box]), torch.tensor([flip]), size, bicubic)[0] * 255
        expected = ref.flip(-1) if flip else ref
        assert out.dtype == torch.float32
        assert (out - expected).abs().max() <= 2.0  # PIL rounds to uint8 between its two passes
        assert (out - expected).abs().mean() < 0.5


def test_canvas_sides_are_multiples_of_eight():
    """The canvas's height and width (the inner sizes of the resize's float16 products) are padded
    to multiples of 8, with zeros."""
    images = [smooth_image(375, 500), smooth_image(120, 90, seed=1)]
    canvas = ga.pad_to_canvas(images)
    assert canvas.shape == (2, 376, 3, 504)
    assert torch.equal(canvas[0, :375, :, :500], images[0].transpose(0, 1).float())
    assert canvas[0, 375:].abs().sum() == 0 and canvas[0, :, :, 500:].abs().sum() == 0


@pytest.mark.parametrize("size", [224, 96])
def test_crops_of_a_batch_from_a_window_equal_pil(size):
    """Small crops are resized from a window of the canvas placed per image (`crop_window`), also
    when a crop lies in the far corner of an image or of the canvas; float16 (the CUDA
    default) stays within a third of a grey level of float32."""
    images = [smooth_image(375, 500, seed=0), smooth_image(120, 90, seed=1), smooth_image(400, 520, seed=2)]
    boxes = torch.tensor([[10, 400, 60, 90], [60, 30, 60, 60], [350, 450, 45, 70]])  # the last: window clamped
    canvas = ga.pad_to_canvas(images)
    window, inside = ga.crop_window(canvas, boxes)
    assert window.shape == (3, 64, 3, 96)  # the largest crop height and width, rounded up to ALIGN = 8
    for i, ((top, left, h, w), (t, l_, _, _)) in enumerate(zip(boxes.tolist(), inside.tolist())):
        assert torch.equal(window[i, t : t + h, :, l_ : l_ + w], canvas[i, top : top + h, :, left : left + w])
    flip = torch.tensor([True, False, True])
    out = ga.crop_resize(canvas, boxes, flip, size, True) * 255
    half = ga.crop_resize(ga.pad_to_canvas(images, torch.float16), boxes, flip, size, True) * 255
    assert (half - out).abs().max() < 1 / 3
    for i, image in enumerate(images):
        expected = pil_crop_resize(image, boxes[i].tolist(), size, True)
        expected = expected.flip(-1) if flip[i] else expected
        assert (out[i] - expected).abs().max() <= 2.0 and (out[i] - expected).abs().mean() < 0.5


def test_color_steps_equal_torchvision():
    x = smooth_image(32, 40).float().div(255)[None].repeat(4, 1, 1, 1)
    x[1] = x[1] * 0.3  # dark
    x[2] = x[2].mean(0, keepdim=True)  # grey: no hue
    factors = torch.tensor([0.6, 1.3, 1.7, 0.2])
    refs = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for step, ref in enumerate(refs):
        for f in ([-0.1, 0.05, 0.2, -0.2] if step == 3 else [0.6, 1.3, 1.7, 0.2]):
            out = ga.jitter_step(x, step, torch.full((4,), f))
            expected = torch.stack([ref(xi, f) for xi in x])
            torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]])
    factors = torch.tensor([[0.6, 1.3, 1.7, 0.1]] * 4)
    out = ga.color_jitter(x.clone(), factors, order)
    for i in range(4):
        expected = x[i]
        for step in order[i].tolist():
            expected = refs[step](expected, factors[i, step].item())
        torch.testing.assert_close(out[i], expected, atol=2e-5, rtol=0)
    torch.testing.assert_close(ga.grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)


def test_gaussian_blur_equals_torchvision_inside_the_borders():
    x = smooth_image(40, 48).float().div(255)[None].repeat(3, 1, 1, 1)
    sigma = torch.tensor([0.1, 0.9, 2.0])
    out = ga.gaussian_blur(x, sigma)
    r = ga.BLUR_RADIUS
    for i, s in enumerate(sigma.tolist()):
        expected = TF.gaussian_blur(x[i], [2 * r + 1] * 2, [s, s])
        torch.testing.assert_close(out[i, :, r:-r, r:-r], expected[:, r:-r, r:-r], atol=1e-5, rtol=0)
    const = torch.full((2, 3, 20, 20), 0.5)
    torch.testing.assert_close(ga.gaussian_blur(const, torch.tensor([0.5, 2.0])), const)  # edges replicated


def test_grey_image_normalises_to_the_imagenet_value_and_solarises_above_128():
    grey = torch.full((3, 300, 400), 128, dtype=torch.uint8)
    recipe = ga.GpuRecipe("dino", 2)
    params = recipe.sample_params(torch.tensor([[300, 400]] * 6), torch.Generator().manual_seed(0))
    plain = [dataclasses.replace(p, jitter=torch.zeros(6, dtype=torch.bool), solarize=torch.zeros(6, dtype=torch.bool))
             for p in params]  # grayscale, blur, flip, crop leave a constant image constant
    expected = ((128 / 255 - torch.tensor(MEAN)) / torch.tensor(STD)).view(1, 3, 1, 1)
    for view in recipe.apply([grey] * 6, plain):  # torchvision's luma weights sum to 0.9999: 2e-4 off
        torch.testing.assert_close(view, expected.expand_as(view), atol=5e-4, rtol=0)
    solarised = dataclasses.replace(plain[1], solarize=torch.ones(6, dtype=torch.bool))
    view = recipe.apply([grey] * 6, [plain[0], solarised])[1]
    expected = ((127 / 255 - torch.tensor(MEAN)) / torch.tensor(STD)).view(1, 3, 1, 1)
    torch.testing.assert_close(view, expected.expand_as(view), atol=5e-4, rtol=0)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("transform_type,n_augs,sizes", [
    ("dino", 2, [224] * 2), ("dino", 4, [224] * 4), ("dino_multicrop", 8, [224] * 2 + [96] * 6),
    ("simclr", 3, [224] * 3), ("linear_prob", 1, [224]),
])
def test_views_shapes_dtype_and_determinism(transform_type, n_augs, sizes):
    images = [smooth_image(375, 500, seed=0), smooth_image(500, 333, seed=1), smooth_image(64, 80, seed=2)]
    recipe = ga.GpuRecipe(transform_type, n_augs)
    views = recipe(images, torch.Generator().manual_seed(3))
    assert [tuple(v.shape) for v in views] == [(3, 3, s, s) for s in sizes]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)
    lo = ((0 - torch.tensor(MEAN)) / torch.tensor(STD)).min() - 1e-5
    hi = ((1 - torch.tensor(MEAN)) / torch.tensor(STD)).max() + 1e-5
    assert all(v.min() >= lo and v.max() <= hi for v in views)
    again = recipe(images, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(views, again))


def test_canvas_groups_keep_landscape_and_portrait_images_apart():
    sizes = torch.tensor([[375, 500], [500, 375], [333, 500], [500, 500], [500, 333], [64, 80]])
    groups = ga.canvas_groups(sizes, ga.MAX_CANVAS_ELEMENTS)
    assert sorted(torch.cat(groups).tolist()) == list(range(6))
    assert sorted(sorted(g.tolist()) for g in groups) == [[0, 2, 3, 5], [1, 4]]  # square counts as landscape


def test_canvas_groups_bound_the_padding_and_cover_every_image():
    recipe = ga.GpuRecipe("dino", 2, max_canvas_elements=3 * 400 * 500 * 2)  # room for two 375 x 500 images
    images = [smooth_image(*s, seed=i) for i, s in enumerate([(375, 500), (40, 60), (375, 500), (375, 500)])]
    groups = ga.canvas_groups(torch.tensor([im.shape[1:] for im in images]), recipe.max_canvas_elements)
    assert sorted(torch.cat(groups).tolist()) == [0, 1, 2, 3] and len(groups) == 2
    grouped = recipe(images, torch.Generator().manual_seed(0))
    single = ga.GpuRecipe("dino", 2)(images, torch.Generator().manual_seed(0))
    for a, b in zip(grouped, single):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_views_of_one_size_made_together_equal_views_made_alone():
    """apply() makes the views of one size (the two global, the six local) as one batch of crops;
    each view equals the view made by itself, over several canvas groups and both crop paths
    (whole canvas for the global views, windows for the local ones)."""
    shapes = [(375, 500), (500, 375), (120, 90), (375, 500), (64, 80)]
    images = [smooth_image(*s, seed=i) for i, s in enumerate(shapes)]
    recipe = ga.GpuRecipe("dino_multicrop", 8, max_canvas_elements=3 * 376 * 504 * 2)  # sides aligned to 8
    sizes = torch.tensor([im.shape[1:] for im in images])
    assert [len(g) for g in ga.canvas_groups(sizes, recipe.max_canvas_elements)] == [2, 1, 2]
    params = recipe.sample_params(sizes, torch.Generator().manual_seed(0))
    together = recipe.apply(images, params)
    for spec, p, view in zip(recipe.specs, params, together):
        alone = ga.GpuRecipe("dino_multicrop", 8, max_canvas_elements=recipe.max_canvas_elements)
        alone.specs = [spec]
        torch.testing.assert_close(view, alone.apply(images, [p])[0], atol=1e-5, rtol=0)


def test_decode_batch_equals_pil():
    images = [smooth_image(375, 500), smooth_image(333, 500, seed=1)]
    data = [jpeg_bytes(images[0]), jpeg_bytes(images[1], mode="L")]
    decoded = decode.decode_batch(data, "cpu")
    for tensor, raw in zip(decoded, data):
        ref = torch.from_numpy(np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")).copy()).permute(2, 0, 1)
        assert tensor.dtype == torch.uint8 and tensor.shape == ref.shape
        assert (tensor.int() - ref.int()).abs().max() <= 2


def test_decode_batch_takes_cmyk_and_png_through_pil():
    """nvJPEG gets the grey and colour JPEGs; a CMYK JPEG and a PNG under a .JPEG name (both in
    ImageNet's training set) are decoded as the PIL recipes decode them."""
    image = smooth_image(120, 160)
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    files = {}
    for name, mode, fmt in [("rgb", "RGB", "JPEG"), ("gray", "L", "JPEG"), ("cmyk", "CMYK", "JPEG"),
                            ("png", "RGBA", "PNG")]:
        buffer = io.BytesIO()
        pil.convert(mode).save(buffer, fmt, quality=95)
        files[name] = buffer.getvalue()
    assert [decode.jpeg_components(f) for f in files.values()] == [3, 1, 4, None]
    decoded = decode.decode_batch(list(files.values()), "cpu")
    for tensor, raw in zip(decoded, files.values()):
        ref = torch.from_numpy(np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")).copy()).permute(2, 0, 1)
        assert tensor.dtype == torch.uint8 and tensor.shape == (3, 120, 160)
        assert (tensor.int() - ref.int()).abs().max() <= 2
    assert torch.equal(decoded[3], image)  # the PNG is lossless


def test_packed_files_round_trip_and_decode_like_bytes():
    """A worker packs a batch's files into one buffer (PackedFiles); unpacking gives views of it,
    and decode_batch takes packed files, bytes or tensors alike."""
    files = [jpeg_bytes(smooth_image(60, 80, seed=i)) for i in range(3)]
    packed = PackedFiles.pack(files)
    assert len(packed) == 3 and packed.data.numel() == sum(map(len, files))
    assert [bytes(t.numpy()) for t in packed.unpack()] == files == [bytes(packed[i].numpy()) for i in range(3)]
    assert all(t.untyped_storage().data_ptr() == packed.data.untyped_storage().data_ptr() for t in packed.unpack())
    assert [bytes(t.numpy()) for t in PackedFiles.pack([b"ab", b"", b"c"]).unpack()] == [b"ab", b"", b"c"]
    as_bytes = decode.decode_batch(files, "cpu")
    for other in (decode.decode_batch(packed, "cpu"), decode.decode_batch(packed.unpack(), "cpu")):
        assert all(torch.equal(a, b) for a, b in zip(as_bytes, other))


def test_decode_batch_names_the_corrupt_image():
    good = jpeg_bytes(smooth_image(64, 64))
    for files in ([good, good, good[: len(good) // 3], good], PackedFiles.pack([good, good, b"not an image", good])):
        with pytest.raises(decode.BatchDecodeError, match="image 2 of the batch") as err:
            decode.decode_batch(files, "cpu")
        assert err.value.index == 2


def test_a_training_batch_replaces_undecodable_files_with_decodable_ones(warnings_of_groco):
    """Two undecodable files side by side take copies of the next good file (not of each other), one
    warning each; a batch with no decodable file is an error."""
    a, b = (jpeg_bytes(smooth_image(32, 48, seed=i)) for i in range(2))
    decoded = decode.decode_training_batch([a, b"not an image", a[: len(a) // 3], b], "cpu", "epoch 0, step 3")
    expected = decode.decode_batch([a, b, b, b], "cpu")
    assert len(decoded) == 4 and all(torch.equal(x, y) for x, y in zip(decoded, expected))
    warnings = [r.getMessage() for r in warnings_of_groco.records if "takes its place" in r.getMessage()]
    assert len(warnings) == 2 and all(w.startswith("epoch 0, step 3: image ") for w in warnings)
    with pytest.raises(RuntimeError, match="epoch 0, step 3: no image of the batch could be decoded"):
        decode.decode_training_batch([b"junk", a[:50]], "cpu", "epoch 0, step 3")


def test_gpu_views_makes_a_training_batch():
    data = [jpeg_bytes(smooth_image(375, 500, seed=i)) for i in range(3)]
    views, labels = ga.gpu_views(data, torch.tensor([4, 1, 7]), ga.GpuRecipe("dino", 2), "cpu",
                                 torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(3, 3, 224, 224)] * 2 and labels.tolist() == [4, 1, 7]


def test_packed_images_round_trip_and_give_the_views_of_the_files():
    """`decode_on: cpu`: the workers' decoded images in one buffer (PackedImages); unpacking gives
    `[3, H, W]` views of it, and the recipe makes from them the views it makes from the files."""
    images = [smooth_image(375, 500, seed=0), smooth_image(500, 333, seed=1), smooth_image(64, 48, seed=2)]
    files = [jpeg_bytes(im) for im in images]
    decoded = [image_array(decode_image(f, "x")) for f in files]  # [H, W, 3], as a worker makes them
    packed = PackedImages.pack(decoded)
    assert len(packed) == 3 and packed.shapes.tolist() == [[375, 500], [500, 333], [64, 48]]
    unpacked = packed.unpack()
    for image, hwc in zip(unpacked, decoded):
        assert image.shape == (3, *hwc.shape[:2]) and torch.equal(image, hwc.permute(2, 0, 1))
        assert image.untyped_storage().data_ptr() == packed.data.untyped_storage().data_ptr()
    assert len(PackedImages.pack([])) == 0 and PackedImages.pack([]).unpack() == []
    recipe = ga.GpuRecipe("dino_multicrop", 8)
    from_pixels, labels = ga.gpu_views(packed, torch.tensor([3, 1, 2]), recipe, "cpu", torch.Generator().manual_seed(5))
    from_files, _ = ga.gpu_views(files, torch.tensor([3, 1, 2]), recipe, "cpu", torch.Generator().manual_seed(5))
    assert labels.tolist() == [3, 1, 2]
    for a, b in zip(from_pixels, from_files):  # PIL and torchvision decode alike on the CPU (libjpeg-turbo)
        assert torch.equal(a, b)


def test_a_torchvision_without_jpeg_decoding_asks_for_decode_on_cpu(monkeypatch):
    """torchvision 0.29 deprecated its decoders for TorchCodec: with neither (a later torchvision
    without one, no TorchCodec), a GPU recipe that would decode on the device is a config error that
    says what to set instead."""
    import torchvision.io

    assert decode.jpeg_decoder() is not None  # this torchvision has one
    monkeypatch.delattr(torchvision.io, "decode_jpeg")
    monkeypatch.setattr(decode, "torchcodec_decode_jpeg", lambda: None)
    assert decode.jpeg_decoder() is None
    with pytest.raises(ConfigError, match="set decode_on: 'cpu'"):
        ga.gpu_and_worker_steps("gpu", None, "dino", 2, training=True)
    with pytest.raises(RuntimeError, match="set decode_on: 'cpu'"):
        decode.decode_batch([jpeg_bytes(smooth_image(8, 8))], "cpu")
    recipe, transform = ga.gpu_and_worker_steps("gpu", "cpu", "dino", 2, training=True)
    assert isinstance(recipe, ga.GpuRecipe) and transform is image_array


def pil_rgb(raw: bytes) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")).copy()).permute(2, 0, 1)


@pytest.fixture
def fresh_decoder_choice(monkeypatch):
    """jpeg_decoder looks for TorchCodec again and logs its choice again; afterwards as it found it."""
    decode.torchcodec_decode_jpeg.cache_clear()
    monkeypatch.setattr(decode, "_announced", None)
    yield
    decode.torchcodec_decode_jpeg.cache_clear()


def test_torchcodec_decodes_like_torchvision_and_pil(fresh_decoder_choice):
    """TorchCodec's decode_jpeg (the decoder where it is installed) takes decode_batch's calls, a list
    of 1-D uint8 tensors or one tensor, and gives torchvision's pixels, RGB for grey JPEGs too."""
    import warnings

    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as torchvision_jpeg

    images = [smooth_image(375, 500), smooth_image(333, 500, seed=1), smooth_image(77, 51, seed=2)]
    data = [jpeg_bytes(images[0]), jpeg_bytes(images[1], mode="L"), jpeg_bytes(images[2])]
    tensors = decode.file_tensors(data)
    torchcodec_jpeg = decode.torchcodec_decode_jpeg()
    if torchcodec_jpeg is None:  # pytest.importorskip, counting a TorchCodec that does not load as absent
        pytest.skip("TorchCodec is not installed or does not load with this torch")
    chosen = decode.jpeg_decoder()
    assert chosen.func is torchcodec_jpeg
    batch = chosen(tensors, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision's decoders, deprecated in 0.29
        reference = torchvision_jpeg(tensors, mode=ImageReadMode.RGB, device="cpu")
    for one, many, theirs, raw in zip(tensors, batch, reference, data):
        assert many.dtype == torch.uint8 and many.shape == theirs.shape and many.shape[0] == 3
        assert torch.equal(many, chosen(one, device="cpu"))
        assert torch.equal(many, theirs)
        assert (many.int() - pil_rgb(raw).int()).abs().max() <= 2
    with pytest.raises(RuntimeError):  # decode_batch's retry one by one and PIL fallback rely on it
        chosen([tensors[0], tensors[0][: len(tensors[0]) // 3]], device="cpu")
    assert chosen([], device="cpu") == []


@pytest.mark.parametrize("failure", [None, OSError, RuntimeError])
def test_jpeg_decoder_falls_back_to_torchvision_and_logs_once(failure, fresh_decoder_choice, monkeypatch, caplog):
    """Where TorchCodec is missing (ImportError) or does not load (OSError, RuntimeError: a build for
    another torch), the GPU recipes decode with torchvision, said once in the log; the pixels and the
    PIL fallbacks are those of TorchCodec (the test above)."""
    import importlib.abc
    import logging
    import sys

    class BrokenTorchcodec(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torchcodec" or name.startswith("torchcodec."):
                if failure is None:
                    raise ImportError(f"No module named {name!r}")
                raise failure(f"{name}: could not load libtorchcodec_core for this torch")
            return None

    for name in [m for m in sys.modules if m == "torchcodec" or m.startswith("torchcodec.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [BrokenTorchcodec(), *sys.meta_path])
    logger = decode.get_logger()
    monkeypatch.setattr(logger, "propagate", True)
    with caplog.at_level(logging.INFO, logger=logger.name):
        chosen = decode.jpeg_decoder()
        image = smooth_image(60, 80)
        files = [jpeg_bytes(image), jpeg_bytes(image, mode="L"), jpeg_bytes(image, mode="CMYK")]
        decoded = [decode.decode_batch(files, "cpu") for _ in range(3)]
        assert decode.jpeg_decoder().func is chosen.func
    import torchvision.io

    assert decode.torchcodec_decode_jpeg() is None and chosen.func is torchvision.io.decode_jpeg
    said = [r.getMessage() for r in caplog.records if "decodes JPEGs with" in r.getMessage()]
    assert said == ["augment_on: 'gpu' decodes JPEGs with torchvision.io.decode_jpeg"]
    for tensor, raw in zip(decoded[0], files):
        assert tensor.shape == (3, 60, 80) and (tensor.int() - pil_rgb(raw).int()).abs().max() <= 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_views_of_pinned_packed_images_without_waiting():
    """`decode_on: cpu` on CUDA: the pinned buffer goes over in one copy and the views are made
    without waiting for the GPU; they equal the CPU's views within the float16 resize."""
    decoded = [image_array(decode_image(jpeg_bytes(smooth_image(375, 500, seed=i)), "x")) for i in range(6)]
    packed = PackedImages.pack(decoded).pin_memory()
    assert packed.data.is_pinned()
    recipe = ga.GpuRecipe("dino", 2)
    ga.gpu_views(packed, torch.arange(6), recipe, "cuda", torch.Generator().manual_seed(0))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cuda, _ = ga.gpu_views(packed, torch.arange(6), recipe, "cuda", torch.Generator().manual_seed(1))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu, _ = ga.gpu_views(packed, torch.arange(6), recipe, "cpu", torch.Generator().manual_seed(1))
    for a, b in zip(cpu, cuda):
        assert b.is_cuda and (a - b.cpu()).abs().mean() < 0.01


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_views_equal_cpu_views():
    """The same decoded pixels (nvJPEG's; PIL's differ by a grey level or so) give the same views on
    the GPU as on the CPU, within the float16 resize."""
    images = [smooth_image(375, 500, seed=i) for i in range(4)]
    decoded = decode.decode_batch([jpeg_bytes(im) for im in images], "cuda")
    recipe = ga.GpuRecipe("dino_multicrop", 8)
    cpu = recipe([im.cpu() for im in decoded], torch.Generator().manual_seed(0))
    cuda = recipe(decoded, torch.Generator().manual_seed(0))
    for a, b in zip(cpu, cuda):
        assert b.is_cuda and (a - b.cpu()).abs().mean() < 0.01


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_decode_of_a_mixed_batch():
    pil = Image.fromarray(smooth_image(120, 160).permute(1, 2, 0).numpy())
    files = []
    for mode, fmt in [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG")]:
        buffer = io.BytesIO()
        pil.convert(mode).save(buffer, fmt, quality=95)
        files.append(buffer.getvalue())
    for cpu, cuda in zip(decode.decode_batch(files, "cpu"), decode.decode_batch(files, "cuda")):
        assert cuda.is_cuda and cuda.shape == cpu.shape and (cuda.cpu().float() - cpu.float()).abs().mean() < 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_recipe_never_waits_for_the_gpu():
    """The recipe's parameters and index sets are prepared on the CPU and copied without waiting,
    so a prefetching thread keeps queueing work while the GPU trains."""
    images = [smooth_image(375, 500, seed=i).cuda() for i in range(8)]
    recipe = ga.GpuRecipe("dino_multicrop", 8)
    recipe(images, torch.Generator().manual_seed(0))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        views = recipe(images, torch.Generator().manual_seed(1))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(v.is_cuda and torch.isfinite(v).all() for v in views)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prefetched_cuda_views_equal_views_made_in_turn():
    """The prefetcher's side stream and thread give the views the main thread would make."""
    from data_loader.base import batch_generator
    from data_loader.prefetch import Prefetcher

    files = [[jpeg_bytes(smooth_image(375, 500, seed=10 * b + i)) for i in range(6)] for b in range(4)]
    recipe = ga.GpuRecipe("dino", 2)

    def prepare(batch, step):
        return ga.gpu_views(batch, torch.arange(6), recipe, "cuda", batch_generator(0, 0, step))[0]

    with Prefetcher(files, prepare, torch.device("cuda")) as batches:
        prefetched = [[v.clone() for v in views] for views in batches]
    for step, views in enumerate(prefetched):
        for a, b in zip(views, prepare(files[step], step)):
            assert torch.equal(a, b)
