"""Image preprocessing (reference §4.1): token counts, exact pixels, and every kind of image file."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from kimivl_local.checkpoint.config import PreprocessorConfig
from kimivl_local.errors import InputError
from kimivl_local.inputs import processor
from kimivl_local.inputs.processor import ImageProcessor, token_count_for_size

CFG = PreprocessorConfig()  # CLIP mean/std: not 0.5, so a wrong normalisation cannot hide
MEAN = np.array(CFG.image_mean, dtype=np.float32)
STD = np.array(CFG.image_std, dtype=np.float32)

# (width, height, in_token_limit, grid (h, w), merged tokens): the reference's worked examples.
WORKED = [
    (896, 896, 4096, (64, 64), 1024),
    (640, 480, 4096, (36, 46), 414),
    (1920, 1080, 4096, (48, 86), 1032),
    (1920, 1080, 16384, (78, 138), 2691),
    (1792, 1792, 16384, (128, 128), 4096),
]


def random_rgb(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def expected_patches(rgb: np.ndarray, grid):
    """Hand computation: normalise, pad with (0 - mean)/std, cut raster-order patches."""
    gh, gw = grid
    out = np.empty((gh * gw, 3, 14, 14), dtype=np.float32)
    height, width, _ = rgb.shape
    for r in range(gh):
        for c in range(gw):
            for ch in range(3):
                for y in range(14):
                    for x in range(14):
                        py, px = r * 14 + y, c * 14 + x
                        v = rgb[py, px, ch] / np.float32(255) if py < height and px < width else 0.0
                        out[r * gw + c, ch, y, x] = (np.float32(v) - MEAN[ch]) / STD[ch]
    return out


@pytest.mark.parametrize("width,height,limit,grid,tokens", WORKED)
def test_worked_token_counts_formula(width, height, limit, grid, tokens):
    assert token_count_for_size(width, height, limit) == tokens


@pytest.mark.parametrize("width,height,limit,grid,tokens", WORKED)
def test_worked_token_counts_preprocess(width, height, limit, grid, tokens):
    proc = ImageProcessor(CFG, in_token_limit=limit)
    img = Image.new("RGB", (width, height), (10, 200, 30))
    out = proc.preprocess(img)
    assert out.grid_hws.tolist() == [list(grid)]
    assert out.grid_hws.dtype == torch.int64
    assert out.pixel_values.shape == (grid[0] * grid[1], 3, 14, 14)
    assert out.pixel_values.dtype == torch.float32
    assert proc.num_tokens(img) == tokens


def test_small_image_matches_hand_computation():
    img = random_rgb(30, 20)  # pads to 56x28: grid 2x4, with both right and bottom padding
    out = ImageProcessor(CFG).preprocess(img)
    assert out.grid_hws.tolist() == [[2, 4]]
    want = expected_patches(np.asarray(img), (2, 4))
    np.testing.assert_allclose(out.pixel_values.numpy(), want, rtol=0, atol=1e-6)
    # The bottom-right pixel of the last patch is padding: exactly (0 - mean) / std.
    pad = out.pixel_values[-1, :, -1, -1].numpy()
    np.testing.assert_allclose(pad, -MEAN / STD, rtol=1e-6)


def test_downscale_is_pil_bicubic_then_pad():
    img = random_rgb(1920, 1080, seed=1)
    out = ImageProcessor(CFG, in_token_limit=4096).preprocess(img)
    resized = np.asarray(img.resize((1196, 672), Image.Resampling.BICUBIC))  # antialiased
    canvas = np.zeros((672, 1204, 3), dtype=np.float32)
    canvas[:, :1196] = resized / np.float32(255)
    want = ((canvas - MEAN) / STD).reshape(48, 14, 86, 14, 3).transpose(0, 2, 4, 1, 3)
    np.testing.assert_allclose(out.pixel_values.numpy(), want.reshape(-1, 3, 14, 14), rtol=0, atol=1e-6)


def test_no_upscale_and_limit_override():
    proc = ImageProcessor(CFG, in_token_limit=16)
    assert proc.in_token_limit == 16
    out = proc.preprocess(Image.new("RGB", (14 * 8, 14 * 8)))  # 64 raw patches > 16: halve
    assert out.grid_hws.tolist() == [[4, 4]]
    assert ImageProcessor(CFG).preprocess(Image.new("RGB", (5, 3))).grid_hws.tolist() == [[2, 2]]


def test_pad_input_false_centre_crops_to_whole_patches():
    cfg = PreprocessorConfig(pad_input=False)
    img = random_rgb(59, 31, seed=4)  # crops to 56x28 at offset (left 2, top 2): round(1.5) = 2
    out = ImageProcessor(cfg).preprocess(img)
    assert out.grid_hws.tolist() == [[2, 4]]
    want = expected_patches(np.asarray(img)[2:30, 2:58], (2, 4))
    np.testing.assert_allclose(out.pixel_values.numpy(), want, rtol=0, atol=1e-6)
    with pytest.raises(InputError, match="3x4 grid"):  # 45 rows -> 3 patch rows: cannot merge 2x2
        ImageProcessor(cfg).preprocess(random_rgb(56, 45))


def test_several_images_concatenate_in_order(tmp_path):
    a, b = random_rgb(28, 28, seed=2), random_rgb(56, 28, seed=3)
    b.save(tmp_path / "b.png")
    proc = ImageProcessor(CFG)
    out = proc.preprocess([a, tmp_path / "b.png"])
    assert out.grid_hws.tolist() == [[2, 2], [2, 4]]
    torch.testing.assert_close(out.pixel_values[:4], proc.preprocess(a).pixel_values, rtol=0, atol=0)
    torch.testing.assert_close(out.pixel_values[4:], proc.preprocess(b).pixel_values, rtol=0, atol=0)
    empty = proc.preprocess([])
    assert empty.pixel_values.shape == (0, 3, 14, 14) and empty.grid_hws.shape == (0, 2)


def test_grid_beyond_rope_table_is_refused():
    with pytest.raises(InputError, match="512"):
        token_count_for_size(7168, 28, 4096)  # 512 x 2 raw patches: within the limit, too wide
    with pytest.raises(InputError, match="512"):
        ImageProcessor(CFG).preprocess(Image.new("RGB", (7168, 28)))
    assert token_count_for_size(7154 - 28, 28, 4096) == 255  # 510 columns still fit


# ---- kinds of image -------------------------------------------------------------------------

def pixels(proc_out):
    """Undo the normalisation: the 8-bit RGB the processor saw, [H, W, 3] (for a 28x28 image)."""
    x = proc_out.pixel_values.numpy() * STD[None, :, None, None] + MEAN[None, :, None, None]
    x = x.reshape(2, 2, 3, 14, 14).transpose(0, 3, 1, 4, 2).reshape(28, 28, 3)
    return np.rint(x * 255).astype(np.int64)


def test_rgba_drops_alpha_like_convert_rgb():
    img = Image.new("RGBA", (28, 28), (10, 20, 30, 0))
    assert (pixels(ImageProcessor(CFG).preprocess(img)) == [10, 20, 30]).all()


def test_palette_and_grayscale(tmp_path):
    p = Image.new("P", (28, 28), 1)
    p.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    p.info["transparency"] = 1
    p.save(tmp_path / "p.png")
    assert (pixels(ImageProcessor(CFG).preprocess(tmp_path / "p.png")) == [200, 100, 50]).all()
    assert (pixels(ImageProcessor(CFG).preprocess(Image.new("L", (28, 28), 77))) == 77).all()
    assert (pixels(ImageProcessor(CFG).preprocess(Image.new("1", (28, 28), 1))) == 255).all()


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path):
    a = np.zeros((28, 28), dtype=np.uint16)
    a[:, :7], a[:, 7:14], a[:, 14:21], a[:, 21:] = 0, 257, 32768, 65535
    Image.fromarray(a).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode == "I;16"  # PIL's convert("RGB") would clip every non-zero value to 255
    got = pixels(ImageProcessor(CFG).preprocess(tmp_path / "g16.png"))[0, :, 0]
    assert got[:7].tolist() == [0] * 7 and got[7:14].tolist() == [1] * 7
    assert got[14:21].tolist() == [128] * 7 and got[21:].tolist() == [255] * 7


def test_cmyk(tmp_path):
    img = Image.new("CMYK", (28, 28), (0, 255, 255, 0))  # pure red in PIL's naive CMYK
    img.save(tmp_path / "c.tiff")
    got = pixels(ImageProcessor(CFG).preprocess(tmp_path / "c.tiff"))
    assert (got == np.asarray(img.convert("RGB"))).all() and (got == [255, 0, 0]).all()


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (56, 28), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 14, 14))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    img.save(tmp_path / "r.png", exif=exif)
    proc = ImageProcessor(CFG)
    out = proc.preprocess(tmp_path / "r.png")
    assert out.grid_hws.tolist() == [[4, 2]]  # displayed as 28 wide, 56 tall
    assert proc.num_tokens(tmp_path / "r.png") == 2
    with Image.open(tmp_path / "r.png") as im:
        want = ImageProcessor(CFG).preprocess(ImageOps.exif_transpose(im))
        assert proc.num_tokens(im) == 2
    torch.testing.assert_close(out.pixel_values, want.pixel_values, rtol=0, atol=0)
    # The blue corner, top-left when stored, is top-right once rotated clockwise.
    top_right = out.pixel_values[1, :, 0, -1].numpy() * STD + MEAN
    np.testing.assert_allclose(top_right, [0, 0, 1], atol=1e-6)


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (28, 28), c).convert("P") for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50)
    proc = ImageProcessor(CFG)
    assert (pixels(proc.preprocess(tmp_path / "a.gif")) == [255, 0, 0]).all()
    with Image.open(tmp_path / "a.gif") as im:
        im.seek(1)
        assert (pixels(proc.preprocess(im)) == [255, 0, 0]).all()


def test_not_an_image_names_the_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, not a picture")
    with pytest.raises(InputError, match="notes.txt"):
        ImageProcessor(CFG).preprocess(path)
    with pytest.raises(InputError, match="missing.png"):
        ImageProcessor(CFG).preprocess(str(tmp_path / "missing.png"))
    with pytest.raises(InputError, match="notes.txt"):
        ImageProcessor(CFG).num_tokens(path)


def test_truncated_file_is_an_input_error(tmp_path):
    random_rgb(64, 64).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="t.png"):
        ImageProcessor(CFG).preprocess(tmp_path / "t.png")


@pytest.mark.parametrize("pil_limit", [None, 6000, 1000])  # PIL's own guard: off, warns, raises
def test_decompression_bomb_refused(tmp_path, monkeypatch, pil_limit):
    Image.new("RGB", (100, 100)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
    monkeypatch.setattr(processor, "MAX_PIXELS", 9999)  # 100x100 is one pixel over ours
    with pytest.raises(InputError, match="bomb"):
        ImageProcessor(CFG).preprocess(tmp_path / "bomb.png")
    with pytest.raises(InputError, match="bomb"):
        ImageProcessor(CFG).num_tokens(tmp_path / "bomb.png")


def test_wrong_input_type():
    with pytest.raises(InputError, match="int"):
        ImageProcessor(CFG).preprocess([3])
