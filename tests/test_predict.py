"""`cpcx predict` on real VOC images and on the bad files a user's folder holds: one line per bad file, the
others predicted, the exit code telling whether any failed; outputs at the right sizes, EXIF rotation applied."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from smoke_segmenter import REPO, SMOKE, train_smoke_segmenter

from cpcx import image_inputs
from cpcx.data import load_label_png
from cpcx.errors import CpcxError
from cpcx.image_inputs import InputError, collect_inputs, load_image
from cpcx.predict import run_predict
from cpcx.recipe import load_recipe


def voc_images(voc_root: Path, n: int) -> list[Path]:
    return sorted((voc_root / "JPEGImages").glob("*.jpg"))[:n]


def cpcx(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "cpcx", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def segmenter(voc_root, tmp_path_factory) -> list[str]:
    """The overrides that point recipes/smoke.yaml at a freshly trained segment checkpoint."""
    return train_smoke_segmenter(tmp_path_factory.mktemp("runs"), voc_root)


@pytest.fixture(scope="module")
def bad_files(voc_root, tmp_path_factory) -> dict[str, Path]:
    """One file per kind of awkward input, made from a real VOC JPEG (500×281 or so)."""
    folder = tmp_path_factory.mktemp("inputs")
    source = Image.open(voc_images(voc_root, 1)[0]).convert("RGB")
    files = {name: folder / name for name in (
        "cmyk.jpg", "grey.png", "grey16.png", "la.png", "rgba.png", "exif6.jpg", "truncated.jpg", "empty.jpg",
        "text.jpg", "big.jpg")}
    source.convert("CMYK").save(files["cmyk.jpg"])
    source.convert("L").save(files["grey.png"])
    Image.fromarray(np.asarray(source.convert("L")).astype(np.uint16) * 257).save(files["grey16.png"])
    source.convert("LA").save(files["la.png"])
    rgba = source.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: flattened onto white
    rgba.save(files["rgba.png"])
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    source.save(files["exif6.jpg"], exif=exif, quality=95)
    data = files["exif6.jpg"].read_bytes()
    files["truncated.jpg"].write_bytes(data[: len(data) // 2])
    files["empty.jpg"].write_bytes(b"")
    files["text.jpg"].write_text("this is a text file with an image's name\n")
    source.resize((10000, 10000), Image.Resampling.NEAREST).save(files["big.jpg"], quality=70)
    return files


# ------------------------------------------------------------------------------------- reading inputs
def test_collect_inputs_files_folders_globs_and_clashing_names(tmp_path, voc_root):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    jpg = voc_images(voc_root, 1)[0].read_bytes()
    for rel in ("a/x.jpg", "a/x.png", "a/sub/y.jpg", "b/x.jpg", "a/notes.txt"):
        (tmp_path / rel).write_bytes(jpg)
    items, problems = collect_inputs([str(tmp_path / "a"), str(tmp_path / "b" / "x.jpg"), str(tmp_path / "a" / "x.jpg"),
                                      str(tmp_path / "nope.jpg"), str(tmp_path / "*.gif")])
    assert [i.path.relative_to(tmp_path).as_posix() for i in items] == ["a/x.jpg", "a/x.png", "b/x.jpg"]
    assert [i.name for i in items] == ["x", "x-2", "x-3"]  # no two inputs write the same output
    assert [(Path(p).name, why.split(";")[0]) for p, why in problems] == [
        ("nope.jpg", "no such file or folder"), ("*.gif", "no file matches this pattern")]

    items, _ = collect_inputs([str(tmp_path / "a")], recursive=True)
    assert [i.name for i in items] == ["sub/y", "x", "x-2"]
    items, _ = collect_inputs([str(tmp_path / "*" / "x.jpg")])
    assert [i.path.parent.name for i in items] == ["a", "b"]
    _, problems = collect_inputs([str(tmp_path / "a" / "sub" / "..")])
    assert problems == []


def test_awkward_images_are_read_as_upright_rgb_with_one_note(bad_files):
    source = np.asarray(Image.open(bad_files["exif6.jpg"]).convert("RGB"))
    height, width = source.shape[:2]

    rotated = load_image(bad_files["exif6.jpg"])
    assert rotated.image.shape == (width, height, 3) and rotated.size == (width, height)
    # orientation 6 = the stored pixels turned 90° clockwise for display
    np.testing.assert_array_equal(rotated.image, np.rot90(source, k=-1))
    assert rotated.notes == ["EXIF orientation 6 applied (predicted upright, as viewers show it)"]

    grey16 = load_image(bad_files["grey16.png"])
    grey = load_image(bad_files["grey.png"])
    np.testing.assert_array_equal(grey16.image, grey.image)  # 16-bit scaled by 257, not clipped to white
    assert grey16.notes == ["16-bit greyscale (I;16) scaled to 8 bits, predicted as RGB"]
    assert grey.notes == ["greyscale (L) image predicted as RGB"]

    assert load_image(bad_files["rgba.png"]).image.min() == 255  # fully transparent → white
    assert load_image(bad_files["la.png"]).notes == ["transparency (LA) flattened onto white"]
    assert load_image(bad_files["cmyk.jpg"]).notes == ["CMYK image converted to RGB"]
    for name in ("cmyk.jpg", "grey.png", "grey16.png", "la.png", "rgba.png", "exif6.jpg"):
        loaded = load_image(bad_files[name])
        assert loaded.image.dtype == np.uint8 and loaded.image.shape[2] == 3 and loaded.image.flags.writeable


def test_a_dark_16_bit_image_stays_dark(tmp_path):
    Image.fromarray(np.full((4, 5), 1000, np.uint16)).save(tmp_path / "dark.png")  # 1000 of 65535
    loaded = load_image(tmp_path / "dark.png")
    assert (loaded.image == 4).all() and loaded.image.shape == (4, 5, 3)  # round(1000 / 257), not 255


def test_huge_images_are_worked_on_at_2048_and_refused_past_the_pixel_limit(bad_files, monkeypatch, recwarn):
    big = load_image(bad_files["big.jpg"])
    assert big.size == (10000, 10000) and big.image.shape == (2048, 2048, 3)
    assert big.notes == ["10000×10000 is larger than the 2048-px working size: predicted at 2048×2048, "
                         "labels upsampled back"]
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__]
    monkeypatch.setattr(image_inputs, "MAX_PIXELS", 50_000_000)
    with pytest.raises(InputError, match=r"10000×10000 is 100 MP, more than the 50 MP cpcx predict reads; "
                                         r"downscale it first"):
        load_image(bad_files["big.jpg"])


@pytest.mark.parametrize("name, message", [
    ("empty.jpg", "empty file (0 bytes); replace it with the image"),
    ("text.jpg", "not an image Pillow can read; remove it or save it as JPEG or PNG"),
    ("truncated.jpg", "truncated or corrupt image (image file is truncated"),
])
def test_unreadable_files_raise_one_line(bad_files, name, message):
    with pytest.raises(InputError) as caught:
        load_image(bad_files[name])
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


# --------------------------------------------------------------------------------------- the command
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the test reads the 100 MP label PNG
def test_cli_predicts_the_good_files_and_names_each_bad_one(segmenter, bad_files, voc_root, tmp_path):
    folder = bad_files["big.jpg"].parent
    voc = voc_images(voc_root, 2)
    out = tmp_path / "out"
    # The data root need not exist: predict reads only the checkpoint.
    result = cpcx("predict", "-r", str(SMOKE), *segmenter, "dataset.root=/nonexistent/voc", str(folder),
                  *map(str, voc), str(tmp_path / "missing.jpg"), "--out", str(out))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "DecompressionBomb" not in result.stderr
    failed = [line for line in result.stderr.splitlines() if line.startswith("✘")]
    assert sorted(failed) == sorted([
        f"✘ {folder / 'empty.jpg'}: empty file (0 bytes); replace it with the image",
        f"✘ {folder / 'text.jpg'}: not an image Pillow can read; remove it or save it as JPEG or PNG",
        f"✘ {folder / 'truncated.jpg'}: truncated or corrupt image (image file is truncated "
        f"({failed_bytes(result.stderr)} bytes not processed)); re-download or re-save it",
        f"✘ {tmp_path / 'missing.jpg'}: no such file or folder; check the path",
    ])
    notes = [line for line in result.stdout.splitlines() if line.startswith("! ")]
    assert len(notes) == 7  # cmyk, grey, grey16, la, rgba, exif6, big: one line each
    assert "predict: 9 done, 4 failed in" in result.stdout and "images/s" in result.stdout
    assert "predict: 12/12" in result.stdout  # plain progress lines when stdout is not a terminal

    done = ["cmyk", "grey", "grey16", "la", "rgba", "exif6", "big", voc[0].stem, voc[1].stem]
    assert sorted(p.stem for p in (out / "labels").glob("*.png")) == sorted(done)
    assert sorted(p.stem for p in (out / "overlays").glob("*.jpg")) == sorted(done)
    assert not list(out.rglob("*.tmp"))
    for path in voc:  # labels at the image's size, class indices in the palette PNG
        labels = load_label_png(out / "labels" / f"{path.stem}.png")
        width, height = Image.open(path).size
        assert labels.shape == (height, width) and labels.max() < 21
        overlay = Image.open(out / "overlays" / f"{path.stem}.jpg")
        assert overlay.width == width and overlay.height > height  # the legend strip below the image
    exif_width, exif_height = Image.open(bad_files["exif6.jpg"]).size
    assert load_label_png(out / "labels" / "exif6.png").shape == (exif_width, exif_height)  # upright
    assert load_label_png(out / "labels" / "big.png").shape == (10000, 10000)
    assert not (out / "probs").exists()  # only with --probs


def failed_bytes(stderr: str) -> str:
    import re

    return re.search(r"truncated \((\d+) bytes", stderr).group(1)


def test_cli_exit_codes_all_good_default_folder_and_usage_errors(segmenter, voc_root, tmp_path):
    images = voc_images(voc_root, 2)
    result = cpcx("predict", "-r", str(SMOKE), *segmenter, str(images[0]), str(images[1]))
    assert result.returncode == 0, result.stderr
    runs_dir = Path(segmenter[0].split("=", 1)[1])
    assert sorted(p.name for p in (runs_dir / "smoke" / "predict" / "labels").iterdir()) == \
        sorted(f"{p.stem}.png" for p in images)
    assert "predict: 2 done, 0 failed" in result.stdout

    nothing = cpcx("predict", "-r", str(SMOKE), *segmenter, str(tmp_path / "nope.jpg"))
    assert nothing.returncode == 2
    assert nothing.stderr.splitlines()[-1] == ("✘ no image to predict among the inputs; pass image files, folders "
                                               "or quoted globs")
    untrained = cpcx("predict", "-r", str(SMOKE), f"runs_dir={tmp_path}", str(images[0]))
    assert untrained.returncode == 2
    assert untrained.stderr.strip() == (f"✘ {tmp_path}/smoke/segment/weights: no segment checkpoint (best.pt or "
                                        "last.pt); train it with `cpcx segment -r <recipe>` or pass --weights FILE")


def test_predictions_follow_the_recipes_scales_flip_and_crf(segmenter, voc_root, tmp_path):
    """Same labels as segment_infer's val predictions with the recipe's test-time settings."""
    from cpcx.crf import CRFParams
    from cpcx.segment.infer import predict_label
    from cpcx.segment.networks import load_segnet

    recipe = load_recipe(SMOKE, [*segmenter, "segment.scales=[0.75,1.0]", "segment.flip=true", "segment.crf=true"],
                         check_inputs=False)
    image_path = voc_images(voc_root, 1)[0]
    console = Console(file=io.StringIO(), width=200)
    summary = run_predict(recipe, [str(image_path)], out=tmp_path, console=console, probs=True)
    assert (summary.done, summary.failed) == (1, 0)
    assert "1 image · " in console.file.getvalue() and "2 scales + flip + CRF" in console.file.getvalue()
    model, _ = load_segnet(recipe.run_dir("segment") / "weights" / "best.pt")
    image = np.array(Image.open(image_path).convert("RGB"))
    expected = predict_label(model, image, [0.75, 1.0], True, "cpu", "fp32", CRFParams.from_config(recipe.crf))
    labels = load_label_png(tmp_path / "labels" / f"{image_path.stem}.png")
    np.testing.assert_array_equal(labels, expected)

    saved = np.load(tmp_path / "probs" / f"{image_path.stem}.npz")  # no pickle needed to read it
    probs = saved["probs"]
    assert probs.dtype == np.float16 and probs.shape == (21, *image.shape[:2])
    np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1.0, atol=5e-3)
    np.testing.assert_array_equal(saved["size"], image.shape[:2])
    assert list(saved["classes"][:2]) == ["background", "aeroplane"]
    # the CRF changes some pixels, but most keep the argmax of the saved probabilities
    assert (probs.argmax(0) == labels).mean() > 0.5


def test_no_input_is_a_usage_error(segmenter):
    recipe = load_recipe(SMOKE, segmenter, check_inputs=False)
    with pytest.raises(CpcxError) as caught:
        run_predict(recipe, ["/nonexistent/*.jpg"], console=Console(file=io.StringIO()),
                    err_console=Console(file=io.StringIO()))
    assert caught.value.code == 2


def test_recipe_loads_without_its_data_root_only_when_asked(segmenter):
    from cpcx.recipe import RecipeError

    missing = [*segmenter, "dataset.root=/nonexistent/voc", "model.weights=/nonexistent/w.safetensors"]
    with pytest.raises(RecipeError, match="dataset.root: folder /nonexistent/voc does not exist"):
        load_recipe(SMOKE, missing)
    assert load_recipe(SMOKE, missing, check_inputs=False).dataset.root == Path("/nonexistent/voc")


def test_tiny_images_a_failing_network_and_the_terminal_bar(segmenter, voc_root, tmp_path, monkeypatch):
    """1×1 and 3×2 images are predicted; an image the network fails on (e.g. out of memory) costs one line and
    the next one goes on; on a terminal the rich bar runs alongside those lines."""
    import cpcx.segment.infer as segment_infer

    Image.new("RGB", (1, 1), (200, 10, 10)).save(tmp_path / "one.png")
    Image.new("RGB", (3, 2), (10, 200, 10)).save(tmp_path / "three.png")
    voc = voc_images(voc_root, 1)[0]
    real = segment_infer.predict_probs

    def flaky(model, image, *args, **kwargs):
        if image.shape[:2] == (2, 3):
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore details")
        return real(model, image, *args, **kwargs)

    monkeypatch.setattr(segment_infer, "predict_probs", flaky)
    recipe = load_recipe(SMOKE, segmenter, check_inputs=False)
    terminal = Console(file=io.StringIO(), force_terminal=True, width=200)
    errors = Console(file=io.StringIO(), width=300)
    summary = run_predict(recipe, [str(tmp_path / "one.png"), str(tmp_path / "three.png"), str(voc)],
                          out=tmp_path / "out", console=terminal, err_console=errors)
    assert (summary.done, summary.failed) == (2, 1)
    # while the bar is live, failure lines print above it on its console (stderr would tear the bar's line)
    assert errors.file.getvalue() == ""
    assert (f"{tmp_path / 'three.png'}: the network failed on this 3×2 image (CUDA out of memory. Tried to "
            "allocate 20.00 GiB); free memory, or use fewer segment.scales") in terminal.file.getvalue()
    assert load_label_png(tmp_path / "out" / "labels" / "one.png").shape == (1, 1)
    assert "2 done, 1 failed" in terminal.file.getvalue()
