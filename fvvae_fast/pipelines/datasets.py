"""Dataset readers: the official layouts of UCF101, CUB-200-2011, ActivityNet v1.3, and a
generic one-folder-per-class layout. Each returns a :class:`Dataset` of :class:`Item` s.

Every malformed or missing file raises :class:`DatasetError` whose message starts with
``file:line:`` (or ``file:`` when no line applies), so the user knows what to fix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import UserError

VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".webm", ".mov", ".mpg", ".mpeg", ".m4v", ".flv", ".3gp")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
SPLIT_DIRS = ("train", "test", "val", "valid", "validation", "training", "testing")


class DatasetError(UserError, ValueError):
    """A dataset file that is missing or malformed; the message names the file (and line)."""

    def __init__(self, file: str | os.PathLike, message: str, line: int | None = None) -> None:
        where = f"{os.fspath(file)}:{line}" if line is not None else os.fspath(file)
        super().__init__(f"{where}: {message}")
        self.file, self.line = os.fspath(file), line


@dataclass(frozen=True)
class Item:
    """One video, image or precomputed array.

    id: stable unique name (the path relative to the dataset root); path: the file;
    label: class index (0-based; -1 = unknown); split: "train", "test", ... ("" = none);
    box: (x, y, width, height) in pixels, for the CUB "+box" crop;
    crop: None, or k: this item is crop k of 10-crop testing of its file (:func:`ten_crops`).
    """

    id: str
    path: Path
    label: int = -1
    split: str = ""
    box: tuple[float, float, float, float] | None = None
    crop: int | None = None


@dataclass
class Dataset:
    """Items (in a fixed, documented order) and class names (label i = classes[i])."""

    name: str
    items: list[Item]
    classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def split(self, *names: str) -> Dataset:
        """The items of the given splits (all items when no name is given)."""
        if not names:
            return self
        return Dataset(self.name, [it for it in self.items if it.split in names], self.classes)

    def splits(self) -> list[str]:
        return sorted({it.split for it in self.items})


def _lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, whitespace-split fields) of the non-blank lines of a text file."""
    if not path.is_file():
        raise DatasetError(path, "file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(path, f"cannot read ({err})") from None
    for n, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if fields:
            yield n, fields


def _int(path: Path, n: int, value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DatasetError(path, f"{what} must be an integer, got {value!r}", n) from None


def _float(path: Path, n: int, value: str, what: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise DatasetError(path, f"{what} must be a number, got {value!r}", n) from None


# ---------------------------------------------------------------------------------- UCF101


def _find_ucf_lists(root: Path, annotations: Path | None) -> Path:
    candidates = [annotations] if annotations is not None else [
        root / "ucfTrainTestlist", root.parent / "ucfTrainTestlist", root]
    for c in candidates:
        if (c / "classInd.txt").is_file():
            return c
    raise DatasetError(candidates[0] / "classInd.txt", "file not found (give the folder of classInd.txt and "
                       "the train/test lists, e.g. ucfTrainTestlist/)")


def read_ucf101(root: str | os.PathLike, annotations: str | os.PathLike | None = None, split: int = 1) -> Dataset:
    """UCF101: videos ``root/<Class>/v_<Class>_gXX_cYY.avi``; lists in ``annotations``
    (default: ``root/ucfTrainTestlist`` or beside ``root``): ``classInd.txt`` ("1 ApplyEyeMakeup"),
    ``trainlist0{split}.txt`` ("ApplyEyeMakeup/v_..avi 1") and ``testlist0{split}.txt`` ("ApplyEyeMakeup/v_..avi").

    Items: the train list (split "train") then the test list (split "test"), in file order;
    labels 0-based (classInd index - 1); the id is the list's relative path.
    """
    root = Path(root)
    if split not in (1, 2, 3):
        raise ValueError(f"read_ucf101: split must be 1, 2 or 3, got {split}")
    lists = _find_ucf_lists(root, Path(annotations) if annotations is not None else None)
    class_file = lists / "classInd.txt"
    classes: dict[str, int] = {}
    for n, f in _lines(class_file):
        if len(f) != 2:
            raise DatasetError(class_file, f"expected 'index ClassName', got {' '.join(f)!r}", n)
        idx = _int(class_file, n, f[0], "class index")
        if idx != len(classes) + 1:
            raise DatasetError(class_file, f"class indices must be 1, 2, 3, ... in order; got {idx} "
                               f"after {len(classes)}", n)
        if f[1] in classes:
            raise DatasetError(class_file, f"class {f[1]!r} listed twice", n)
        classes[f[1]] = idx - 1
    if not classes:
        raise DatasetError(class_file, "no class listed")
    items: list[Item] = []
    seen: set[str] = set()
    for subset, name in (("train", f"trainlist0{split}.txt"), ("test", f"testlist0{split}.txt")):
        list_file = lists / name
        for n, f in _lines(list_file):
            if len(f) not in (1, 2):
                raise DatasetError(list_file, f"expected 'Class/video.avi [label]', got {' '.join(f)!r}", n)
            rel = f[0].replace("\\", "/")
            cls = rel.split("/")[0] if "/" in rel else None
            if cls not in classes:
                raise DatasetError(list_file, f"video {rel!r} is not under a class folder of classInd.txt", n)
            label = classes[cls]
            if len(f) == 2 and _int(list_file, n, f[1], "label") - 1 != label:
                raise DatasetError(list_file, f"label {f[1]} does not match the class {cls!r} "
                                   f"(index {label + 1} in classInd.txt)", n)
            if rel in seen:
                raise DatasetError(list_file, f"video {rel!r} listed twice", n)
            seen.add(rel)
            items.append(Item(id=rel, path=root / rel, label=label, split=subset))
    return Dataset(f"ucf101-split{split}", items, sorted(classes, key=classes.get))


# ---------------------------------------------------------------------------------- CUB-200-2011


def read_cub(root: str | os.PathLike) -> Dataset:
    """CUB-200-2011: ``root/images.txt`` ("1 001.Black_footed_Albatross/x.jpg"),
    ``image_class_labels.txt`` ("1 1"), ``train_test_split.txt`` ("1 0", 1 = train),
    ``bounding_boxes.txt`` ("1 x y width height", optional), ``classes.txt`` (optional);
    images under ``root/images/``. Items in image-id order; labels 0-based.
    """
    root = Path(root)
    images_file = root / "images.txt"
    paths: dict[int, str] = {}
    for n, f in _lines(images_file):
        if len(f) != 2:
            raise DatasetError(images_file, f"expected 'image_id path', got {' '.join(f)!r}", n)
        iid = _int(images_file, n, f[0], "image id")
        if iid in paths:
            raise DatasetError(images_file, f"image id {iid} listed twice", n)
        paths[iid] = f[1]
    if not paths:
        raise DatasetError(images_file, "no image listed")

    def per_image(name: str, fields: int, parse, required: bool = True) -> dict[int, object]:
        file = root / name
        if not required and not file.is_file():
            return {}
        out: dict[int, object] = {}
        for n, f in _lines(file):
            if len(f) != fields:
                raise DatasetError(file, f"expected {fields} fields, got {' '.join(f)!r}", n)
            iid = _int(file, n, f[0], "image id")
            if iid not in paths:
                raise DatasetError(file, f"image id {iid} is not in images.txt", n)
            out[iid] = parse(file, n, f[1:])
        missing = sorted(set(paths) - set(out))
        if missing:
            raise DatasetError(file, f"{len(missing)} image ids of images.txt have no line here (first: {missing[0]})")
        return out

    labels = per_image("image_class_labels.txt", 2, lambda p, n, f: _int(p, n, f[0], "class id") - 1)
    train = per_image("train_test_split.txt", 2, lambda p, n, f: _int(p, n, f[0], "is_training_image"))
    boxes = per_image("bounding_boxes.txt", 5,
                      lambda p, n, f: tuple(_float(p, n, v, "box coordinate") for v in f), required=False)
    n_classes = max(labels.values()) + 1
    classes = [f"class {i + 1}" for i in range(n_classes)]
    class_file = root / "classes.txt"
    if class_file.is_file():
        for n, f in _lines(class_file):
            if len(f) != 2:
                raise DatasetError(class_file, f"expected 'class_id name', got {' '.join(f)!r}", n)
            cid = _int(class_file, n, f[0], "class id")
            if 1 <= cid <= n_classes:
                classes[cid - 1] = f[1]
    items = []
    for iid in sorted(paths):
        if labels[iid] < 0:
            raise DatasetError(root / "image_class_labels.txt",
                               f"class ids start at 1, image {iid} has {labels[iid] + 1}")
        items.append(Item(id=paths[iid], path=root / "images" / paths[iid], label=labels[iid],
                          split="train" if train[iid] == 1 else "test", box=boxes.get(iid)))
    return Dataset("cub200", items, classes)


# ---------------------------------------------------------------------------------- ActivityNet


def read_activitynet(json_path: str | os.PathLike, video_dir: str | os.PathLike) -> Dataset:
    """ActivityNet v1.3: the official JSON (``{"database": {id: {"subset", "annotations": [{"label",
    "segment"}], ...}}, "taxonomy": [...]}``) and a folder of downloaded videos named
    ``v_<id>.<ext>`` or ``<id>.<ext>``.

    Splits: the file's subsets ("training", "validation", "testing"); classes: the sorted
    annotation labels; a video's label is its first annotation's (-1 for unlabelled test
    videos). Videos missing from ``video_dir`` are kept (with the expected path) so the
    extraction reports them as failed items. Items sorted by split then id.
    """
    json_path, video_dir = Path(json_path), Path(video_dir)
    if not json_path.is_file():
        raise DatasetError(json_path, "file not found")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DatasetError(json_path, f"invalid JSON: {err.msg} (column {err.colno})", err.lineno) from None
    db = data.get("database") if isinstance(data, dict) else None
    if not isinstance(db, dict):
        raise DatasetError(json_path, "no 'database' object (expected the ActivityNet v1.3 JSON)")
    if not video_dir.is_dir():
        raise DatasetError(video_dir, "video folder not found")
    by_stem: dict[str, Path] = {}
    for p in sorted(video_dir.iterdir()):
        if p.suffix.lower() in VIDEO_EXTENSIONS:
            by_stem.setdefault(p.stem, p)
            if p.stem.startswith("v_"):
                by_stem.setdefault(p.stem[2:], p)
    labels: set[str] = set()
    rows = []
    for vid, entry in db.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("subset"), str):
            raise DatasetError(json_path, f"database[{vid!r}] has no 'subset' string")
        anns = entry.get("annotations", [])
        if not isinstance(anns, list) or any(not isinstance(a, dict) or "label" not in a for a in anns):
            raise DatasetError(json_path, f"database[{vid!r}].annotations must be a list of objects with a 'label'")
        labels.update(str(a["label"]) for a in anns)
        rows.append((entry["subset"], vid, str(anns[0]["label"]) if anns else None))
    classes = sorted(labels)
    index = {c: i for i, c in enumerate(classes)}
    items = [Item(id=vid, path=by_stem.get(vid, video_dir / f"v_{vid}.mp4"),
                  label=index[label] if label is not None else -1, split=subset)
             for subset, vid, label in sorted(rows)]
    return Dataset("activitynet-v1.3", items, classes)


# ---------------------------------------------------------------------------------- generic folders


def _files(folder: Path, extensions: Sequence[str]) -> list[Path]:
    exts = {e.lower() for e in extensions}
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in exts and not p.name.startswith("."))


def read_folder(root: str | os.PathLike, extensions: Sequence[str] = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS) -> Dataset:
    """A generic layout: ``root/<class>/<files>`` (label = index of the sorted class folder),
    optionally split as ``root/<split>/<class>/<files>`` when every top-level folder is a split
    name (train, test, val, ...), or a flat ``root/<files>`` (no labels). Files are found
    recursively under each class folder, filtered by ``extensions``, sorted by path.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(root, "folder not found")
    tops = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_layout = bool(tops) and all(p.name.lower() in SPLIT_DIRS for p in tops)
    parts = [(p.name, p) for p in tops] if split_layout else [("", root)]
    class_names = sorted({c.name for _, base in parts for c in base.iterdir()
                          if c.is_dir() and not c.name.startswith(".")})
    index = {c: i for i, c in enumerate(class_names)}
    items: list[Item] = []
    for split, base in parts:
        if class_names:
            loose = [p for p in base.iterdir() if p.is_file() and p.suffix.lower() in {e.lower() for e in extensions}]
            if loose:
                raise DatasetError(loose[0], "file outside a class folder (layout: root/<class>/<file>)")
            for c in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
                for f in _files(c, extensions):
                    items.append(Item(id=f.relative_to(root).as_posix(), path=f, label=index[c.name], split=split))
        else:
            items += [Item(id=f.relative_to(root).as_posix(), path=f, split=split) for f in _files(base, extensions)]
    if not items:
        raise DatasetError(root, f"no file with extension {', '.join(extensions)} found")
    return Dataset(root.name, items, class_names)


CROP_ID = "#crop"  # item id of crop k: "<id>#crop<k>"


def ten_crops(dataset: Dataset, splits: Sequence[str]) -> Dataset:
    """The dataset with each item of ``splits`` replaced by its ten crops (10-crop testing): items
    ``<id>#crop0`` ... ``<id>#crop9`` of the same file, label and split."""
    from .crops import NUM_CROPS

    items = []
    for it in dataset.items:
        if it.split in splits:
            items += [replace(it, id=f"{it.id}{CROP_ID}{k}", crop=k) for k in range(NUM_CROPS)]
        else:
            items.append(it)
    return Dataset(dataset.name, items, dataset.classes)


def crop_parent(item_id: str) -> str:
    """The item a crop item was made from (the id itself for an item that is not a crop)."""
    head, sep, k = item_id.rpartition(CROP_ID)
    return head if sep and k.isdigit() else item_id
