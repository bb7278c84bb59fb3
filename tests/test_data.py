"""cpcx.data on the real VOC and COCO slices: splits, labels, masks, the training view, folders, errors."""
from __future__ import annotations

import contextlib
import csv
import gc
import io
import json
import pickle
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cpcx.data import (
    VOC_CLASSES, VOC_PALETTE, ImageLabelDataset, build_dataset, describe, load_label_png, save_label_png, summary,
)
from cpcx.errors import CpcxError
from cpcx.recipe import COCODatasetConfig, FolderDatasetConfig, VOCDatasetConfig


def split_ids(voc_root: Path, split: str) -> list[str]:
    return (voc_root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def mask_classes(path: Path) -> set[int]:
    """Independent of cpcx: the class indices in a VOC mask PNG, 0 and 255 left out."""
    return set(np.unique(np.array(Image.open(path))).tolist()) - {0, 255}


def fake_voc(tmp_path: Path, voc_root: Path, splits: dict[str, list[str]], masks: bool = True) -> Path:
    """A VOC2012 folder in tmp_path with the real images (symlinked) and custom split lists."""
    root = tmp_path / "VOC2012"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for sub in ("JPEGImages", "Annotations") + (("SegmentationClass",) if masks else ()):
        (root / sub).symlink_to(voc_root / sub)
    for name, ids in splits.items():
        (root / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


@pytest.fixture(scope="module")
def voc(voc_root):
    cfg = VOCDatasetConfig(root=voc_root)
    return {split: build_dataset(cfg, split) for split in ("train", "val")}


@pytest.fixture(scope="module")
def coco(coco_root):
    cfg = COCODatasetConfig(root=coco_root)
    return {split: build_dataset(cfg, split) for split in ("train", "val")}


# ------------------------------------------------------------------------------------------------- VOC
def test_voc_splits_follow_the_split_files(voc, voc_root):
    assert len(voc["train"]) == 311 and len(voc["val"]) == 172
    for split, ds in voc.items():
        assert ds.ids == split_ids(voc_root, split)
        assert ds.split == split and ds.has_masks
        assert ds.classes == ("background", *VOC_CLASSES) and ds.num_classes == 21
        assert ds.index_of(ds.ids[5]) == 5
        assert ds.image_path(3) == voc_root / "JPEGImages" / f"{ds.ids[3]}.jpg"
    with pytest.raises(CpcxError, match="not in split 'val'"):
        voc["val"].index_of(voc["train"].ids[0])


def test_voc_root_may_be_the_folder_its_parent_or_above_vocdevkit(voc, voc_root, tmp_path):
    devkit = tmp_path / "VOCdevkit"
    devkit.mkdir()
    (devkit / "VOC2012").symlink_to(voc_root)
    for root in (voc_root.parent, tmp_path):
        ds = build_dataset(VOCDatasetConfig(root=root), "val")
        assert ds.ids == voc["val"].ids and ds.image_path(0).is_file()
    with pytest.raises(CpcxError, match="holds no JPEGImages"):
        build_dataset(VOCDatasetConfig(root=devkit.parent.parent), "val")


@pytest.mark.parametrize("split", ["train", "val"])
def test_voc_labels_are_the_classes_present_in_the_masks(voc, voc_root, split):
    ds = voc[split]
    labels = ds.labels
    assert labels.dtype == np.float32 and labels.shape == (len(ds), 21)
    assert (labels[:, 0] == 1).all() and set(np.unique(labels).tolist()) <= {0.0, 1.0}
    assert not labels.flags.writeable  # a shared cache: nobody may edit it in place
    expected_counts = np.zeros(21, dtype=int)
    for i, image_id in enumerate(ds.ids):
        present = mask_classes(voc_root / "SegmentationClass" / f"{image_id}.png")
        assert set(np.flatnonzero(labels[i, 1:]) + 1) == present, image_id
        expected_counts[list(present)] += 1
    stats = summary(ds)
    assert stats["images"] == len(ds)
    assert list(stats["per_class"].values()) == expected_counts[1:].tolist()
    assert list(stats["per_class"]) == list(VOC_CLASSES)
    if split == "train":  # the slice's README: every class occurs, person in about 40% of the images
        assert min(stats["per_class"].values()) > 0
        assert 0.3 < stats["per_class"]["person"] / len(ds) < 0.5


@pytest.mark.parametrize("split", ["train", "val"])
def test_voc_xml_labels_equal_mask_labels(voc, split):
    # Measured on this slice: the XML object names give exactly the mask classes for all 483 images.
    xml = voc[split].labels_from_xml()
    np.testing.assert_array_equal(xml[:, 1:], voc[split].labels[:, 1:])


def test_voc_without_masks_falls_back_on_the_xml(voc, voc_root, tmp_path):
    ids = voc["train"].ids[:40]
    root = fake_voc(tmp_path, voc_root, {"train": ids}, masks=False)
    ds = build_dataset(VOCDatasetConfig(root=root), "train")
    assert not ds.has_masks
    np.testing.assert_array_equal(ds.labels, voc["train"].labels[:40])
    with pytest.raises(CpcxError, match="no ground-truth masks"):
        ds.load_mask(0)


def test_voc_train_aug_uses_the_aug_list_and_masks(voc, voc_root, tmp_path):
    ids = voc["train"].ids[:6]
    root = fake_voc(tmp_path, voc_root, {}, masks=True)
    # DeepLab-style list lines, and an Aug mask folder whose masks differ from SegmentationClass/
    (root / "train_aug.txt").write_text("".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in ids))
    (root / "SegmentationClassAug").mkdir()
    for image_id in ids:
        h, w = voc["train"].load_mask(voc["train"].index_of(image_id)).shape
        save_label_png(root / "SegmentationClassAug" / f"{image_id}.png", np.full((h, w), 3, np.uint8))
    ds = build_dataset(VOCDatasetConfig(root=root, train_split="train_aug"), "train")
    assert ds.ids == ids and ds.has_masks
    assert (ds.labels[:, 1:].argmax(axis=1) == 2).all() and ds.labels[:, 1:].sum() == len(ids)  # class 3 = bird


def test_limit_keeps_the_first_ids_in_split_order(voc, voc_root, coco_root, coco):
    ds = build_dataset(VOCDatasetConfig(root=voc_root, limit=7), "train")
    assert ds.ids == voc["train"].ids[:7]
    np.testing.assert_array_equal(ds.labels, voc["train"].labels[:7])
    small = build_dataset(COCODatasetConfig(root=coco_root, limit=5), "val")
    assert small.ids == coco["val"].ids[:5]
    big = build_dataset(VOCDatasetConfig(root=voc_root, limit=10_000), "val")
    assert len(big) == 172


def test_voc_images_and_masks_align(voc):
    ds = voc["val"]
    for i in (0, 50, 171):
        image, mask = ds.load_image(i), ds.load_mask(i)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert mask.dtype == np.uint8 and mask.shape == image.shape[:2]
        assert set(np.unique(mask).tolist()) <= set(range(21)) | {255}
        assert 255 in mask  # VOC outlines objects with the void label
        with Image.open(ds.image_path(i)) as pil:
            assert pil.size == (image.shape[1], image.shape[0])


# --------------------------------------------------------------------------------------- training view
def test_image_label_view_holds_labels_only(voc_root):
    ds = build_dataset(VOCDatasetConfig(root=voc_root, limit=12), "val")
    expected = ds.labels.copy()
    ids = list(ds.ids)
    view = ImageLabelDataset(ds, transform=lambda img: torch.from_numpy(img).permute(2, 0, 1))
    ref = weakref.ref(ds)
    del ds
    gc.collect()
    assert ref() is None, "the training view keeps the SegmentationDataset (and so its masks) alive"
    assert not any(hasattr(view, name) for name in ("load_mask", "has_masks", "mask_dir"))
    assert len(view) == 12 and view.classes[0] == "background"
    item = view[4]
    assert set(item) == {"image", "label", "index", "id"}
    assert item["index"] == 4 and item["id"] == ids[4]
    assert item["label"].dtype == torch.float32 and item["label"].shape == (21,)
    np.testing.assert_array_equal(item["label"].numpy(), expected[4])
    assert item["image"].shape[0] == 3 and item["image"].dtype == torch.uint8
    item["label"][1] = 7  # the caller's tensor is a copy
    assert view[4]["label"][1] != 7
    plain = ImageLabelDataset(build_dataset(VOCDatasetConfig(root=voc_root, limit=2), "val"))
    raw = pickle.loads(pickle.dumps(plain))[1]["image"]  # DataLoader workers may receive it pickled
    assert isinstance(raw, np.ndarray) and raw.dtype == np.uint8 and raw.shape[2] == 3


# ------------------------------------------------------------------------------------------------ COCO
def test_coco_splits_and_classes(coco, coco_root):
    assert len(coco["train"]) == 166 and len(coco["val"]) == 94
    data = json.loads((coco_root / "annotations" / "instances_val2017.json").read_text())
    names = [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
    for split, ds in coco.items():
        assert ds.classes == ("background", *names) and ds.num_classes == 81
        assert ds.ids == sorted(ds.ids) and ds.has_masks
        assert ds.image_path(0).parent == coco_root / f"{split}2017"
    assert coco["val"].classes[1] == "person" and coco["val"].classes[80] == "toothbrush"


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_masks_agree_with_labels_and_instances(coco, coco_root, split):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        api = COCO(str(coco_root / "annotations" / f"instances_{split}2017.json"))
    label_of = {cat_id: k + 1 for k, cat_id in enumerate(sorted(api.getCatIds()))}
    by_file = {img["file_name"]: img["id"] for img in api.dataset["images"]}
    ds = coco[split]
    assert (ds.labels[:, 0] == 1).all()
    images_with_crowd = 0
    for i in range(len(ds)):
        anns = api.loadAnns(api.getAnnIds(imgIds=by_file[ds.image_path(i).name]))
        mask = ds.load_mask(i)
        h, w = mask.shape
        assert mask.dtype == np.uint8 and ds.load_image(i).shape[:2] == (h, w)
        values = set(np.unique(mask).tolist())
        assert values <= set(range(81)) | {255}
        label_classes = set(np.flatnonzero(ds.labels[i, 1:]) + 1)
        assert label_classes == {label_of[a["category_id"]] for a in anns if not a["iscrowd"]}
        # measured: every labelled class keeps visible pixels after the overlaps are resolved
        assert values - {0, 255} == label_classes
        # every pixel's value is explained by the instances under it (decoded with pycocotools' own API)
        union = {c: np.zeros((h, w), bool) for c in label_classes | {255}}
        for a in anns:
            union[255 if a["iscrowd"] else label_of[a["category_id"]]] |= api.annToMask(a).astype(bool)
        things = np.logical_or.reduce([m for c, m in union.items() if c != 255])
        assert not (things & (mask == 0)).any(), "an instance pixel was left as background"
        for c in values - {0}:
            assert union[c][mask == c].all()
        if 255 in values:
            images_with_crowd += 1
            assert not things[mask == 255].any(), "a non-crowd instance must win over a crowd region"
    assert images_with_crowd == {"train": 13, "val": 8}[split]  # one crowd annotation each, all visible


def test_coco_small_instances_are_drawn_on_top(coco):
    # Find an image where a smaller instance overlaps a larger one; the overlap must carry the smaller's label.
    ds = coco["val"]
    from cpcx.data.coco import decode_segmentation

    checked = 0
    for i in range(len(ds)):
        img = ds._images[i]
        things = [a for a in img.instances if not a.crowd]
        masks = [decode_segmentation(a.segmentation, img.height, img.width).astype(bool) for a in things]
        drawn = ds.load_mask(i)
        for a, ma in zip(things, masks):
            for b, mb in zip(things, masks):
                if a.label != b.label and a.area < b.area and (ma & mb).sum() > 50:
                    covered_by_smaller = np.logical_or.reduce(
                        [m for t, m in zip(things, masks) if t.area < a.area] + [np.zeros_like(ma)]
                    )
                    overlap = ma & mb & ~covered_by_smaller
                    assert (drawn[overlap] == a.label).all()
                    checked += 1
    assert checked > 20


def test_coco_missing_json_and_missing_images(coco_root, tmp_path):
    with pytest.raises(CpcxError, match=r"instances_val2017\.json: annotation JSON not found"):
        build_dataset(COCODatasetConfig(root=tmp_path), "val")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2017").mkdir()
    shutil.copy(coco_root / "annotations" / "instances_val2017.json", tmp_path / "annotations")
    with pytest.raises(CpcxError, match=r"image not found \(and 93 more\)"):
        build_dataset(COCODatasetConfig(root=tmp_path), "val")
    (tmp_path / "annotations" / "instances_train2017.json").write_text("{not json")
    (tmp_path / "train2017").mkdir()
    with pytest.raises(CpcxError, match="not a COCO instances JSON"):
        build_dataset(COCODatasetConfig(root=tmp_path), "train")


# ---------------------------------------------------------------------------------------------- folder
def make_folder(tmp_path: Path, voc, voc_root: Path, rows: list[tuple[str, str]], masks: bool = True) -> Path:
    """A folder data set from VOC images: (voc id, split) rows, labels written from the VOC labels."""
    root = tmp_path / "mine"
    (root / "images" / "sub").mkdir(parents=True)
    if masks:
        (root / "masks" / "sub").mkdir(parents=True)
    train = voc["train"]
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "labels", "split"])
        for n, (image_id, split) in enumerate(rows):
            name = f"sub/{image_id}.jpg" if n % 2 else f"{image_id}.jpg"  # ids may hold a sub-folder
            shutil.copy(voc_root / "JPEGImages" / f"{image_id}.jpg", root / "images" / name)
            if masks:
                shutil.copy(voc_root / "SegmentationClass" / f"{image_id}.png", root / "masks" / f"{name[:-4]}.png")
            names = [train.classes[c] for c in np.flatnonzero(train.labels[train.index_of(image_id), 1:]) + 1]
            writer.writerow([name, ";".join(names), split])
    return root


def test_folder_dataset_from_voc_images(voc, voc_root, tmp_path):
    picks = voc["train"].ids[:6]
    root = make_folder(tmp_path, voc, voc_root, [(i, "val" if n == 2 else "") for n, i in enumerate(picks)])
    cfg = FolderDatasetConfig(root=root, classes=list(VOC_CLASSES))
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert len(train) == 5 and len(val) == 1 and val.ids == [f"{picks[2]}"]
    assert train.ids[0] == picks[0] and train.ids[1] == f"sub/{picks[1]}"
    assert train.classes == ("background", *VOC_CLASSES) and train.has_masks and train.name == "mine"
    source = voc["train"]
    for i, image_id in enumerate(train.ids):
        j = source.index_of(image_id.removeprefix("sub/"))
        np.testing.assert_array_equal(train.labels[i], source.labels[j])
        np.testing.assert_array_equal(train.load_mask(i), source.load_mask(j))
        np.testing.assert_array_equal(train.load_image(i), source.load_image(j))
    # default classes: the sorted union of the names in the CSV, over both splits
    auto = build_dataset(FolderDatasetConfig(root=root), "train")
    assert auto.classes == ("background", "aeroplane", "bird", "bottle", "chair", "dog", "person", "tvmonitor")
    assert build_dataset(FolderDatasetConfig(root=root), "val").classes == auto.classes
    for i in range(len(auto)):
        assert {auto.classes[c] for c in np.flatnonzero(auto.labels[i, 1:]) + 1} == {
            train.classes[c] for c in np.flatnonzero(train.labels[i, 1:]) + 1
        }
    # with the auto class list the VOC mask values no longer fit (person = 15): a clear error, not wrong scores
    with pytest.raises(CpcxError, match=r"mask holds value 15 but the classes are 0\.\.7"):
        auto.load_mask(0)


def test_folder_errors(voc, voc_root, tmp_path):
    root = make_folder(tmp_path, voc, voc_root, [(i, "train") for i in voc["train"].ids[:3]], masks=False)
    csv_path = root / "labels.csv"
    ds = build_dataset(FolderDatasetConfig(root=root), "train")
    assert not ds.has_masks
    with pytest.raises(CpcxError, match="no ground-truth masks"):
        ds.load_mask(0)
    with pytest.raises(CpcxError, match="split 'val' has no images"):
        build_dataset(FolderDatasetConfig(root=root), "val")

    text = csv_path.read_text()
    csv_path.write_text(text + "extra.jpg,cat;unicorn,train\n")
    with pytest.raises(CpcxError, match=r"labels\.csv: line 5 \(extra\.jpg\): unknown class 'unicorn'"):
        build_dataset(FolderDatasetConfig(root=root, classes=list(VOC_CLASSES)), "train")
    csv_path.write_text(text + "extra.jpg,cat,train\n")
    with pytest.raises(CpcxError, match=r"extra\.jpg: image not found"):
        build_dataset(FolderDatasetConfig(root=root), "train")
    csv_path.write_text(text.replace("image,labels,split", "image,label,split"))
    with pytest.raises(CpcxError, match="header is 'image,label,split'"):
        build_dataset(FolderDatasetConfig(root=root), "train")
    csv_path.write_text(text + "../x.jpg,cat,train\n")
    with pytest.raises(CpcxError, match="must be a path inside the image folder"):
        build_dataset(FolderDatasetConfig(root=root), "train")
    csv_path.write_text(text)
    with pytest.raises(CpcxError, match="leave out 'background'"):
        build_dataset(FolderDatasetConfig(root=root, classes=["background", "cat"]), "train")
    (root / "masks").mkdir()  # a half-annotated split is refused
    shutil.copy(voc_root / "SegmentationClass" / f"{ds.ids[0]}.png", root / "masks")
    with pytest.raises(CpcxError, match="mask missing, while other 'train' images have one"):
        build_dataset(FolderDatasetConfig(root=root), "train")


# ---------------------------------------------------------------------------------------------- errors
def test_voc_errors(voc, voc_root, tmp_path):
    with pytest.raises(CpcxError, match=r"Segmentation/nope\.txt: split list for 'nope' not found"):
        build_dataset(VOCDatasetConfig(root=voc_root, val_split="nope"), "val")
    root = fake_voc(tmp_path, voc_root, {"empty": [], "ghost": [voc["val"].ids[0], "2099_000001"]})
    with pytest.raises(CpcxError, match="split 'train' has no images"):
        build_dataset(VOCDatasetConfig(root=root, train_split="empty"), "train")
    with pytest.raises(CpcxError, match=r"2099_000001\.jpg: image not found; the split list .*ghost\.txt"):
        build_dataset(VOCDatasetConfig(root=root, val_split="ghost"), "val")
    with pytest.raises(ValueError):
        build_dataset(VOCDatasetConfig(root=voc_root), "test")


# --------------------------------------------------------------------------------------------- palette
def test_palette_is_the_one_in_the_voc_pngs(voc_root):
    with Image.open(next((voc_root / "SegmentationClass").glob("*.png"))) as png:
        palette = np.array(png.getpalette(), dtype=np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(palette, VOC_PALETTE[: len(palette)])
    assert VOC_PALETTE.shape == (256, 3) and tuple(VOC_PALETTE[255]) == (224, 224, 192)


def test_label_png_roundtrip(tmp_path, voc_root):
    label = np.random.default_rng(0).integers(0, 21, size=(37, 53)).astype(np.uint8)
    label[:3] = 255
    path = save_label_png(tmp_path / "out" / "a.png", label)
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.png"]  # no temp file left behind
    with Image.open(path) as png:
        assert png.mode == "P"
    np.testing.assert_array_equal(load_label_png(path), label)
    save_label_png(path, label.astype(np.int64))  # overwrite, other integer dtype
    np.testing.assert_array_equal(load_label_png(path), label)
    with pytest.raises(ValueError):
        save_label_png(path, np.full((4, 4), 300))
    real = voc_root / "SegmentationClass" / "2007_000032.png"
    np.testing.assert_array_equal(load_label_png(real), np.array(Image.open(real)))
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(CpcxError, match="mode RGB"):
        load_label_png(tmp_path / "rgb.png")


def test_describe_renders_a_table(voc_root):
    from rich.console import Console

    table = describe(VOCDatasetConfig(root=voc_root))
    console = Console(file=io.StringIO(), width=120)
    console.print(table)
    text = console.file.getvalue()
    assert "aeroplane" in text and "311" in text and "172" in text and table.row_count == 22
