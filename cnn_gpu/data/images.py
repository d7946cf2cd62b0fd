"""Your own images: a folder of class subfolders (or train/ test/ [val/] folders) as a Dataset.

Layouts (docs/DATA.md)::

    flowers/daisy/*.jpg  flowers/rose/*.png ...          classes = the sorted subfolder names;
                                                         a seeded, stratified test split is taken off
    flowers/train/daisy/...  flowers/test/daisy/...      the splits as given (val/ optional); every
    [flowers/val/daisy/...]                              split must have the same classes

Images (PNG, JPEG, BMP, GIF, TIFF, WebP; read with Pillow; subfolders of a class folder are
searched too) are decoded once, in parallel threads (Pillow releases the GIL while decoding), into
the decode cache (cnn_gpu/data/cache.py): a second open of an unchanged folder decodes nothing.

Size and channels: ``image_size`` (int or (H, W)) resizes every image (bilinear, antialiased when
shrinking); without it the most common size is used (ties: the larger) and images of other sizes
are resized to it, with a note. ``channels`` 1 converts to gray (ITU-R 601 luma), 3 to RGB; without
it, 1 when every image is gray (gray modes, or a palette of grays), else 3. Transparent images
are composited over black (premultiplied alpha: what shows is what the alpha lets through);
16-bit images are scaled to 8 bits; JPEG EXIF orientation is applied; an animated GIF gives its
first frame.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from . import cache
from .errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test")
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SIXTEEN_BIT = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


# --------------------------------------------------------------------------------------
# one image
# --------------------------------------------------------------------------------------
def _pil():
    """PIL.Image and PIL.ImageOps, or a one-line DataError when Pillow cannot be imported."""
    try:
        from PIL import Image, ImageOps  # noqa: PLC0415
    except ImportError as exc:
        raise DataError(f"reading images needs Pillow (pip install 'pillow>=9.1'), which cannot be imported: {exc}") from None
    return Image, ImageOps


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _open(path: Path):
    Image, _ = _pil()
    try:
        return Image.open(path)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: not a readable image ({_why(exc)})") from None


def _is_gray(im) -> bool:
    """Whether ``im`` holds gray values only (a gray mode, or a palette whose colours are all gray)."""
    if im.mode in _GRAY_MODES:
        return True
    if im.mode in ("P", "PA"):
        pal = im.getpalette()
        if pal is None:
            return False
        rgb = np.asarray(pal[: len(pal) // 3 * 3]).reshape(-1, 3)  # (colours, 3)
        return bool((rgb[:, 0] == rgb[:, 1]).all() and (rgb[:, 1] == rgb[:, 2]).all())
    return False


def probe(path: Path) -> tuple[int, int, bool]:
    """(height, width, gray) of an image from its header (after its EXIF orientation), not decoded."""
    im = _open(path)
    with im:
        w, h = im.size
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001 - a broken EXIF block: the decode will tell
            orientation = 1
        if orientation in (5, 6, 7, 8):  # rotated by 90 degrees
            w, h = h, w
        return h, w, _is_gray(im)


def _flatten(im, channels: int):
    """``im`` as an "L" (channels 1) or "RGB" (3) image: 16-bit scaled to 8, alpha composited over black."""
    Image, _ = _pil()
    if im.mode in _SIXTEEN_BIT:
        a = np.asarray(im).astype(np.float64)
        im = Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.rint(np.asarray(im, dtype=np.float64)), 0, 255).astype(np.uint8), "L")
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return im.convert("L" if channels == 1 else "RGB")


def _decode(path: Path, size: tuple[int, int] | None, channels: int | None) -> np.ndarray:
    """One image file -> uint8 (C, H, W): oriented, converted, resized (``size`` (H, W) or None:
    its own; ``channels`` None: 1 if gray, else 3). Raises DataError naming the file."""
    Image, ImageOps = _pil()
    im = _open(path)
    try:
        with im:
            im.seek(0)
            im.load()
            if channels is None:
                channels = 1 if _is_gray(im) else 3
            out = _flatten(ImageOps.exif_transpose(im), channels)
            if size is not None and out.size != (size[1], size[0]):
                out = out.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            a = np.asarray(out, dtype=np.uint8)  # (H, W) or (H, W, 3)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: not a readable image ({_why(exc)})") from None
    return a[None] if a.ndim == 2 else np.ascontiguousarray(a.transpose(2, 0, 1))


def _size_arg(image_size: Any) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if (
        not isinstance(image_size, (tuple, list))
        or len(image_size) != 2
        or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in image_size)
    ):
        raise ValueError(f"image_size: expected a positive int or (height, width), got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def _channels_arg(channels: Any) -> int | None:
    if channels is None:
        return None
    if isinstance(channels, bool) or channels not in (1, 3):
        raise ValueError(f"channels: expected 1 (gray) or 3 (RGB), got {channels!r}")
    return int(channels)


def read_image(path: str | os.PathLike, image_size: Any = None, channels: int | None = None) -> np.ndarray:
    """One image as uint8 (C, H, W), decoded, converted and resized exactly as :class:`ImageFolder`
    does: ``image_size`` int or (H, W) (None: its own size), ``channels`` 1 or 3 (None: 1 if gray)."""
    size, c = _size_arg(image_size), _channels_arg(channels)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such image file")
    return _decode(path, size, c)


# --------------------------------------------------------------------------------------
# the folder
# --------------------------------------------------------------------------------------
def _hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


def _subfolders(folder: Path) -> list[Path]:
    return sorted((d for d in folder.iterdir() if d.is_dir() and not _hidden(d.name)), key=lambda d: d.name)


def _files_under(folder: Path) -> tuple[list[Path], list[Path]]:
    """(images, other files) under ``folder`` (its subfolders too), sorted, hidden ones left out."""
    images: list[Path] = []
    others: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not _hidden(d))
        for name in sorted(files):
            if _hidden(name):
                continue
            p = Path(root) / name
            (images if p.suffix.lower() in IMAGE_SUFFIXES else others).append(p)
    return images, others


def _loose_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not _hidden(p.name))


_EXPECTED = "one subfolder per class (or train/ and test/ folders of class subfolders)"


def _scan_classes(folder: Path, notes: list[str]) -> tuple[list[str], list[list[Path]]]:
    """(class names, the images of each) of a folder of class subfolders; DataError otherwise."""
    dirs = _subfolders(folder)
    loose = _loose_files(folder)
    if not dirs:
        n = sum(p.suffix.lower() in IMAGE_SUFFIXES for p in loose)
        if n:
            raise DataError(f"{folder}: expected {_EXPECTED}, got {n} images directly in it and no subfolders")
        raise DataError(f"{folder}: no images: expected {_EXPECTED} holding {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} files")
    if len(dirs) == 1:
        raise DataError(f"{folder}: expected at least 2 classes (one subfolder each), got a single class: {dirs[0].name}/")
    if loose:
        notes.append(f"note: {folder}: {len(loose)} file(s) beside the class folders are not used (e.g. {loose[0].name})")
    files, skipped = [], []
    for d in dirs:
        images, others = _files_under(d)
        if not images:
            what = f"{len(others)} files that are not images" if others else "nothing"
            raise DataError(f"{d}: empty class folder: expected {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images, found {what}")
        files.append(images)
        skipped += others
    if skipped:
        notes.append(f"note: {folder}: {len(skipped)} file(s) that are not images are not used (e.g. {skipped[0]})")
    return [d.name for d in dirs], files


def _layout(folder: Path) -> str:
    """ "split" (train/ and test/ [val/]) or "classes" (class subfolders); DataError for neither."""
    names = {d.name for d in _subfolders(folder)}
    given = [s for s in SPLITS if s in names]
    if not given:
        return "classes"
    if "train" not in names or "test" not in names:
        missing = "test/" if "train" in names else "train/"
        raise DataError(
            f"{folder}: has {', '.join(g + '/' for g in given)} but no {missing}: expected train/ and test/ "
            f"(and optionally val/), each of class subfolders, or {_EXPECTED.split(' (')[0]}"
        )
    extra = sorted(names - set(SPLITS))
    if extra:
        raise DataError(
            f"{folder}: expected only train/, test/ and val/ beside each other, also found {', '.join(e + '/' for e in extra)}"
        )
    return "split"


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices), each sorted: per class, round(fraction * n) examples (at least
    one, and at most n - 1) drawn with ``np.random.default_rng(seed)``; a class of one example stays
    in train. Depends only on the labels, ``fraction`` and ``seed``."""
    rng = np.random.default_rng(seed)
    test = np.zeros(labels.shape[0], dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = min(max(int(round(fraction * idx.size)), 1), idx.size - 1)
        test[rng.permutation(idx)[:k]] = True
    return np.flatnonzero(~test), np.flatnonzero(test)


def _check_fraction(test_fraction: Any) -> float:
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a fraction in (0, 1), got {test_fraction!r}")
    return float(test_fraction)


def _splits(folder: Path, layout: str, fraction: float, seed: int, notes: list[str]) -> tuple[list[str], dict]:
    """(classes, {split: (files, labels)}) of the folder."""
    if layout == "classes":
        classes, per_class = _scan_classes(folder, notes)
        files = [f for fs in per_class for f in fs]
        labels = np.repeat(np.arange(len(classes), dtype=np.int64), [len(fs) for fs in per_class])
        tr, te = stratified_split(labels, fraction, seed)
        return classes, {"train": ([files[i] for i in tr], labels[tr]), "test": ([files[i] for i in te], labels[te])}
    out: dict = {}
    known: list[str] = []
    for split in SPLITS:
        sub = folder / split
        if not sub.is_dir():
            continue
        names, per_class = _scan_classes(sub, notes)
        if not known:
            known = names
        elif names != known:
            missing, extra = sorted(set(known) - set(names)), sorted(set(names) - set(known))
            raise DataError(
                f"{sub}: expected the classes of {folder / 'train'} ({len(known)}), got {len(names)}"
                + (f"; missing: {', '.join(missing)}" if missing else "")
                + (f"; extra: {', '.join(extra)}" if extra else "")
            )
        labels = np.repeat(np.arange(len(names), dtype=np.int64), [len(fs) for fs in per_class])
        out[split] = ([f for fs in per_class for f in fs], labels)
    return known, out


def _fingerprint(folder: Path, splits: dict) -> dict:
    """Every image's path (relative to the folder), size and mtime (ns), per split."""

    def stat(p: Path):
        st = p.stat()
        return [p.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns]

    return {s: [stat(p) for p in files] for s, (files, _) in splits.items()}


def _workers(workers: int | None, n: int) -> int:
    if workers is None:
        return max(1, min(32, (os.cpu_count() or 1) + 4, n))
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers: expected a positive int (threads that decode), got {workers!r}")
    return workers


def _resolve(files: list[Path], size, channels, pool: ThreadPoolExecutor) -> tuple[tuple[int, int], int, int, int]:
    """(size, channels, images resized, distinct sizes) from the images' headers."""
    heads = _parallel(pool, lambda i: probe(files[i]), len(files))
    sizes = collections.Counter((h, w) for h, w, _ in heads)
    if size is None:
        size = max(sizes, key=lambda s: (sizes[s], s[0] * s[1], s))
    if channels is None:
        channels = 1 if all(g for _, _, g in heads) else 3
    return size, channels, sum(n for s, n in sizes.items() if s != size), len(sizes)


def _decode_all(writer, splits: dict, size, channels: int, pool: ThreadPoolExecutor) -> None:
    """Decode every split's images into the writer's arrays (x_<split> uint8 NCHW, y_<split> int64)."""
    for split, (files, labels) in splits.items():
        out = writer.empty(f"x_{split}", (len(files), channels, *size), np.uint8)

        def one(i: int, files=files, out=out) -> None:
            out[i] = _decode(files[i], size, channels)

        _parallel(pool, one, len(files))
        writer.save(f"y_{split}", labels)


def _parallel(pool: ThreadPoolExecutor, fn: Callable[[int], Any], n: int, chunk: int = 4096) -> list:
    """[fn(0), ..., fn(n - 1)] computed by the pool, ``chunk`` tasks in flight at a time (a million
    images are not a million futures at once); the first error is raised, the rest of its chunk cancelled."""
    out: list = []
    for lo in range(0, n, chunk):
        out.extend(pool.map(fn, range(lo, min(n, lo + chunk))))
    return out


def _dataset(name: str, meta: dict, arrays: dict):
    from . import Dataset  # noqa: PLC0415  (the package defines it before importing this module)

    val = (arrays.get("x_val"), arrays.get("y_val"))
    return Dataset(
        name,
        arrays["x_train"],
        arrays["y_train"],
        arrays["x_test"],
        arrays["y_test"],
        len(meta["classes"]),
        255.0,
        tuple(meta["classes"]),
        *val,
    )


def ImageFolder(
    path: str | os.PathLike,
    image_size: Any = None,
    channels: int | None = None,
    *,
    test_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    say: Callable[[str], None] | None = None,
):
    """A folder of images as a :class:`cnn_gpu.data.Dataset` (see the module docs): x uint8 NCHW
    (``scale`` 255), labels int64, ``classes`` the folder names. ``test_fraction`` and ``seed`` make
    the test split of a folder of class subfolders (unused with train/ and test/ folders);
    ``cache_dir`` replaces the decode cache's folder; ``workers``: decoding threads; ``say``
    receives one-line notes (images resized, files not used, decoded or read from the cache)."""
    size, channels = _size_arg(image_size), _channels_arg(channels)
    fraction = _check_fraction(test_fraction)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(
            f"{folder}: no such folder"
            if not folder.exists()
            else f"{folder}: expected a folder of images (or an .npz of arrays), got a file"
        )
    folder = folder.resolve()
    say = say or (lambda line: None)
    notes: list[str] = []
    layout = _layout(folder)
    classes, splits = _splits(folder, layout, fraction, int(seed), notes)
    settings: dict[str, Any] = {"layout": layout, "image_size": list(size) if size else None, "channels": channels}
    if layout == "classes":
        settings.update(test_fraction=fraction, seed=int(seed))
    elif test_fraction != 0.1:
        notes.append(f"note: {folder} has train/ and test/ folders: test_fraction {test_fraction} is not used")
    key_doc = {"source": str(folder), "files": _fingerprint(folder, splits), "settings": settings}
    root, key = cache.cache_root(cache_dir), cache.cache_key(key_doc)
    for line in notes:
        say(line)
    hit = cache.open_entry(root, key)
    if hit is None:
        cache.discard(root, key)  # an entry that cannot be trusted (a file missing or cut short)
        _build_entry(folder, classes, splits, size, channels, settings, root, key, workers, say)
        hit = cache.open_entry(root, key)
        if hit is None:
            raise DataError(f"{root / key}: the decode cache just written cannot be read back")
    else:
        say(f"{folder}: {cache.describe(hit[0])} read from the decode cache {root / key}")
    meta, arrays = hit
    if meta.get("resized"):
        say(_resize_note(folder, meta))
    return _dataset(folder.name, meta, arrays)


def _resize_note(folder: Path, meta: dict) -> str:
    c, h, w = meta["input_shape"]
    return (
        f"note: {folder}: images of {meta['sizes']} sizes; {meta['resized']} of {meta['images']} resized to "
        f"{h}x{w}, the most common size (choose one with image_size / --image-size)"
    )


def _build_entry(folder: Path, classes, splits: dict, size, channels, settings: dict, root: Path, key: str, workers, say) -> None:
    """Probe, decode and write the cache entry ``key`` for the folder."""
    every = [f for files, _ in splits.values() for f in files]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(_workers(workers, len(every)), thread_name_prefix="cnn_gpu-decode") as pool:
        given = size
        size, channels, resized, n_sizes = _resolve(every, size, channels, pool)
        try:
            with cache.writing(root, key) as writer:
                _decode_all(writer, splits, size, channels, pool)
                meta = {
                    "source": str(folder),
                    "classes": list(classes),
                    "input_shape": [channels, *size],
                    "images": len(every),
                    "splits": {s: len(f) for s, (f, _) in splits.items()},
                    "resized": resized if given is None else 0,
                    "sizes": n_sizes,
                    "settings": settings,
                }
                writer.commit(meta)
        except OSError as exc:  # the images themselves raise DataError: this is the cache folder
            raise DataError(
                f"{root}: cannot write the decode cache ({type(exc).__name__}: {exc.strerror or exc}); "
                "choose a writable folder with CNN_GPU_DATA (or cache_dir=)"
            ) from None
    cache.remove_stale(root, str(folder), settings, key)
    say(
        f"{folder}: decoded {len(every)} images ({size[0]}x{size[1]}, {channels} channel{'s' if channels > 1 else ''}) "
        f"in {time.perf_counter() - t0:.1f} s into the decode cache {root / key}"
    )


# --------------------------------------------------------------------------------------
# any data
# --------------------------------------------------------------------------------------
def open_data(
    path: str | os.PathLike,
    image_size: Any = None,
    channels: int | None = None,
    *,
    test_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    say: Callable[[str], None] | None = None,
):
    """A Dataset from ``path``: a folder of images (:func:`ImageFolder`) or an ``.npz`` of arrays
    (:func:`cnn_gpu.data.load_arrays`; ``image_size`` and ``channels`` apply to images only)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return ImageFolder(
            p, image_size, channels, test_fraction=test_fraction, seed=seed, cache_dir=cache_dir, workers=workers, say=say
        )
    if not p.exists():
        raise DataError(f"{p}: no such file or folder (expected a folder of images or an .npz of arrays)")
    if p.suffix.lower() != ".npz":
        kind = "an image" if p.suffix.lower() in IMAGE_SUFFIXES else "a file"
        raise DataError(f"{p}: expected a folder of images (one subfolder per class) or an .npz of arrays, got {kind}")
    for name, value in (("image_size", image_size), ("channels", channels)):
        if value is not None:
            raise ValueError(f"{name}: applies to image folders; the arrays of {p} are used as they are, got {value!r}")
    from .arrays import load_arrays  # noqa: PLC0415

    return load_arrays(p)


__all__ = ["IMAGE_SUFFIXES", "ImageFolder", "open_data", "read_image", "probe", "stratified_split", "DataError"]
