"""Your own data (issue 22, the library): image folders in both layouts, .npz arrays, the decode
cache, memory-mapped arrays, and training on them. Images are tiny (8x8) and written by Pillow
into tmp_path, with class-dependent patterns; references are Pillow / NumPy computed here."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cnn_gpu
from cnn_gpu import config
from cnn_gpu.data import (
    DataError,
    DataLoader,
    Dataset,
    HostImages,
    ImageFolder,
    channel_stats,
    get_dataset,
    load_arrays,
    normalize,
    open_data,
    read_image,
)
from cnn_gpu.data import images as images_mod

PATTERNS = 3


def pattern(k: int, rng, size=(8, 8), rgb=True) -> np.ndarray:
    """An image of class ``k``: horizontal, vertical or diagonal stripes plus noise (H, W[, 3]) uint8."""
    h, w = size
    r, c = np.mgrid[0:h, 0:w]
    base = [(r % 2 == 0), (c % 2 == 0), ((r + c) % 3 == 0)][k % PATTERNS]
    img = np.where(base, 200, 40) + rng.integers(-30, 31, size)
    img = np.clip(img, 0, 255).astype(np.uint8)
    if not rgb:
        return img
    tint = np.array([[1.0, 0.8, 0.6], [0.6, 1.0, 0.8], [0.8, 0.6, 1.0]][k % 3])
    return np.clip(img[..., None] * tint, 0, 255).astype(np.uint8)


def write_classes(
    root: Path, classes=("cat", "dog", "eel"), per_class=10, size=(8, 8), rgb=True, seed=0, suffix=".png"
) -> dict[str, list[Path]]:
    rng = np.random.default_rng(seed)
    files = {}
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        files[name] = []
        for i in range(per_class):
            p = root / name / f"img{i:03d}{suffix}"
            Image.fromarray(pattern(k, rng, size, rgb)).save(p)
            files[name].append(p)
    return files


def as_chw(path: Path) -> np.ndarray:
    """The reference decode of an unresized RGB or L image: Pillow's array, channels first."""
    a = np.asarray(Image.open(path))
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def counted_decodes(monkeypatch) -> list:
    calls = []
    real = images_mod._decode

    def counting(path, size, channels):
        calls.append(Path(path))
        return real(path, size, channels)

    monkeypatch.setattr(images_mod, "_decode", counting)
    return calls


# ---------------------------------------------------------------------------------- layouts
def test_class_folders_split_is_stratified_reproducible_and_holds_the_images(tmp_path):
    files = write_classes(tmp_path / "pets", per_class=10)
    ds = ImageFolder(tmp_path / "pets", cache_dir=tmp_path / "cache")
    assert isinstance(ds, Dataset) and ds.classes == ("cat", "dog", "eel") and ds.num_classes == 3
    assert ds.x_train.shape == (27, 3, 8, 8) and ds.x_test.shape == (3, 3, 8, 8)
    assert ds.x_train.dtype == np.uint8 and ds.y_train.dtype == np.int64 and ds.scale == 255.0
    assert np.bincount(ds.y_test).tolist() == [1, 1, 1]  # stratified: round(0.1 * 10) per class
    assert np.bincount(ds.y_train).tolist() == [9, 9, 9]
    assert ds.input_shape == (3, 8, 8) and ds.x_val is None
    # every row is one of its class's files, each file exactly once
    refs = {name: [as_chw(p) for p in ps] for name, ps in files.items()}
    used = dict.fromkeys(files, 0)
    for x, y in zip(np.concatenate([ds.x_train, ds.x_test]), np.concatenate([ds.y_train, ds.y_test])):
        name = ds.classes[y]
        hits = [i for i, r in enumerate(refs[name]) if np.array_equal(r, x)]
        assert len(hits) == 1
        used[name] += 1
    assert used == {"cat": 10, "dog": 10, "eel": 10}
    # reproducible: a fresh decode (another cache) gives the same split; another seed another one
    again = ImageFolder(tmp_path / "pets", cache_dir=tmp_path / "cache2")
    assert np.array_equal(again.x_test, ds.x_test) and np.array_equal(again.y_train, ds.y_train)
    other = ImageFolder(tmp_path / "pets", seed=5, cache_dir=tmp_path / "cache")
    assert not np.array_equal(other.x_test, ds.x_test)
    bigger = ImageFolder(tmp_path / "pets", test_fraction=0.3, cache_dir=tmp_path / "cache")
    assert np.bincount(bigger.y_test).tolist() == [3, 3, 3]


def test_train_test_folders_keep_their_split_in_sorted_order(tmp_path):
    tr = write_classes(tmp_path / "d" / "train", per_class=4, seed=1)
    te = write_classes(tmp_path / "d" / "test", per_class=2, seed=2)
    ds = ImageFolder(tmp_path / "d", cache_dir=tmp_path / "c")
    assert ds.classes == ("cat", "dog", "eel") and ds.x_val is None and ds.name == "d"
    assert ds.y_train.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and ds.y_test.tolist() == [0, 0, 1, 1, 2, 2]
    assert np.array_equal(ds.x_train, np.stack([as_chw(p) for ps in tr.values() for p in ps]))
    assert np.array_equal(ds.x_test, np.stack([as_chw(p) for ps in te.values() for p in ps]))


def test_train_val_test_folders_give_a_validation_split(tmp_path):
    write_classes(tmp_path / "d" / "train", per_class=4, seed=1)
    va = write_classes(tmp_path / "d" / "val", per_class=3, seed=3)
    write_classes(tmp_path / "d" / "test", per_class=2, seed=2)
    ds = ImageFolder(tmp_path / "d", cache_dir=tmp_path / "c")
    assert ds.x_val.shape == (9, 3, 8, 8) and ds.y_val.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert np.array_equal(ds.x_val, np.stack([as_chw(p) for ps in va.values() for p in ps]))


def test_split_folders_must_have_the_same_classes(tmp_path):
    write_classes(tmp_path / "d" / "train", per_class=2)
    write_classes(tmp_path / "d" / "test", classes=("cat", "dog", "fox"), per_class=2)
    with pytest.raises(DataError, match=r"test: expected the classes of .*train \(3\), got 3; missing: eel; extra: fox"):
        ImageFolder(tmp_path / "d", cache_dir=tmp_path / "c")


@pytest.mark.parametrize("suffix", [".jpg", ".bmp", ".gif", ".tiff", ".webp"])
def test_every_image_type_reads(tmp_path, suffix):
    write_classes(tmp_path / "d", classes=("a", "b"), per_class=3, suffix=suffix)
    ds = ImageFolder(tmp_path / "d", cache_dir=tmp_path / "c")
    assert ds.x_train.shape[1:] == (3, 8, 8) and len(ds.y_train) + len(ds.y_test) == 6


# ---------------------------------------------------------------------------------- size, channels
def test_mixed_sizes_are_resized_to_the_most_common_with_a_note(tmp_path):
    files = write_classes(tmp_path / "d", classes=("a", "b"), per_class=4)
    odd = tmp_path / "d" / "a" / "odd.png"
    Image.fromarray(pattern(0, np.random.default_rng(9), (12, 10))).save(odd)
    notes = []
    ds = ImageFolder(tmp_path / "d", cache_dir=tmp_path / "c", say=notes.append)
    assert ds.input_shape == (3, 8, 8)
    assert any("images of 2 sizes; 1 of 9 resized to 8x8" in n for n in notes), notes
    expected = np.asarray(Image.open(odd).convert("RGB").resize((8, 8), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    rows = np.concatenate([ds.x_train, ds.x_test])
    assert any(np.array_equal(r, expected) for r in rows)
    # the note comes again from the cache; a given image_size resizes everything, no note
    notes.clear()
    ImageFolder(tmp_path / "d", cache_dir=tmp_path / "c", say=notes.append)
    assert any("resized to 8x8" in n for n in notes)
    notes.clear()
    sized = ImageFolder(tmp_path / "d", image_size=(6, 5), cache_dir=tmp_path / "c", say=notes.append)
    assert sized.input_shape == (3, 6, 5) and not any(" resized to " in n for n in notes)
    one = files["b"][0]
    ref = np.asarray(Image.open(one).convert("RGB").resize((5, 6), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    assert np.array_equal(read_image(one, (6, 5), 3), ref)


def test_gray_is_detected_and_channels_convert(tmp_path):
    write_classes(tmp_path / "g", classes=("a", "b"), per_class=3, rgb=False)
    ds = ImageFolder(tmp_path / "g", cache_dir=tmp_path / "c")
    assert ds.input_shape == (1, 8, 8)
    # one RGB image among gray ones: 3 channels, the gray ones repeated in each
    Image.fromarray(pattern(0, np.random.default_rng(1))).save(tmp_path / "g" / "a" / "color.png")
    mixed = ImageFolder(tmp_path / "g", cache_dir=tmp_path / "c")
    assert mixed.input_shape == (3, 8, 8)
    rows = np.concatenate([mixed.x_train, mixed.x_test])
    assert sum(np.array_equal(r[0], r[1]) and np.array_equal(r[1], r[2]) for r in rows) == 6
    forced = ImageFolder(tmp_path / "g", channels=1, cache_dir=tmp_path / "c")
    ref = np.asarray(Image.open(tmp_path / "g" / "a" / "color.png").convert("L"))
    assert forced.input_shape == (1, 8, 8)
    assert any(np.array_equal(r[0], ref) for r in np.concatenate([forced.x_train, forced.x_test]))


def test_palette_of_grays_is_gray_and_a_colour_palette_is_not(tmp_path):
    gray_pal = Image.fromarray(pattern(0, np.random.default_rng(0), rgb=False)).convert("P")
    gray_pal.save(tmp_path / "gray.png")
    assert images_mod.probe(tmp_path / "gray.png")[2] is True
    colour = Image.fromarray(pattern(1, np.random.default_rng(0))).convert("P", palette=Image.Palette.ADAPTIVE)
    colour.save(tmp_path / "colour.png")
    assert images_mod.probe(tmp_path / "colour.png")[2] is False
    assert read_image(tmp_path / "gray.png").shape == (1, 8, 8)
    assert np.array_equal(read_image(tmp_path / "colour.png", channels=3), np.asarray(colour.convert("RGB")).transpose(2, 0, 1))


def test_rgba_and_transparent_palette_composite_over_black(tmp_path):
    a = np.zeros((8, 8, 4), np.uint8)
    a[...] = (200, 100, 50, 128)
    a[0, 0] = (255, 255, 255, 0)  # fully transparent white: black
    Image.fromarray(a, "RGBA").save(tmp_path / "rgba.png")
    got = read_image(tmp_path / "rgba.png", channels=3)
    assert got[:, 0, 0].tolist() == [0, 0, 0]
    assert np.abs(got[:, 1, 1].astype(int) - np.array([200, 100, 50]) * 128 / 255).max() <= 1
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([255, 255, 255, 10, 200, 30] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    got = read_image(tmp_path / "pal.png", channels=3)
    assert got[:, 0, 0].tolist() == [0, 0, 0] and got[:, 1, 1].tolist() == [10, 200, 30]


def test_sixteen_bit_gray_is_scaled_to_eight_bits(tmp_path):
    a = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "deep.png")
    got = read_image(tmp_path / "deep.png")
    assert got.shape == (1, 8, 8)
    assert np.array_equal(got[0], np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8))


# ---------------------------------------------------------------------------------- errors
def _one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


def test_a_corrupt_image_names_the_file(tmp_path):
    write_classes(tmp_path / "d", classes=("a", "b"), per_class=3)
    bad = tmp_path / "d" / "b" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError) as exc:
        ImageFolder(tmp_path / "d", cache_dir=tmp_path / "c")
    assert _one_line(exc).startswith(f"{bad}: not a readable image")


def test_a_truncated_image_names_the_file(tmp_path):
    write_classes(tmp_path / "d", classes=("a", "b"), per_class=3)
    big = tmp_path / "d" / "a" / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(big)
    big.write_bytes(big.read_bytes()[:-30])
    with pytest.raises(DataError) as exc:
        ImageFolder(tmp_path / "d", cache_dir=tmp_path / "c")
    assert _one_line(exc).startswith(f"{big}: not a readable image")
    assert not any(p.name.endswith(".tmp") or (p / "meta.json").exists() for p in (tmp_path / "c").iterdir())


@pytest.mark.parametrize(
    "case,expected",
    [
        ("empty_class", r"empty class folder"),
        ("single_class", r"expected at least 2 classes .* got a single class: a/"),
        ("no_images", r"no images: expected one subfolder per class"),
        ("loose_images", r"got 2 images directly in it and no subfolders"),
        ("train_only", r"has train/ but no test/"),
        ("splits_and_more", r"expected only train/, test/ and val/ beside each other, also found extra/"),
        ("missing", r"no such folder"),
    ],
)
def test_folder_errors_are_one_line_and_name_the_folder(tmp_path, case, expected):
    d = tmp_path / "d"
    if case == "empty_class":
        write_classes(d, classes=("a", "b"), per_class=2)
        (d / "c").mkdir()
        (d / "c" / "notes.txt").write_text("x")
    elif case == "single_class":
        write_classes(d, classes=("a",), per_class=2)
    elif case == "no_images":
        d.mkdir()
    elif case == "loose_images":
        d.mkdir()
        for i in range(2):
            Image.fromarray(pattern(0, np.random.default_rng(i))).save(d / f"{i}.png")
    elif case == "train_only":
        write_classes(d / "train", per_class=2)
    elif case == "splits_and_more":
        write_classes(d / "train", per_class=2)
        write_classes(d / "test", per_class=2)
        write_classes(d / "extra", per_class=2)
    with pytest.raises(DataError, match=expected) as exc:
        ImageFolder(d, cache_dir=tmp_path / "c")
    msg = _one_line(exc)
    assert str(d) in msg


def test_bad_arguments_name_themselves(tmp_path):
    write_classes(tmp_path / "d", classes=("a", "b"), per_class=2)
    for kwargs, expected in [
        ({"image_size": 0}, "image_size: expected a positive int or"),
        ({"channels": 2}, "channels: expected 1 .gray. or 3 .RGB., got 2"),
        ({"test_fraction": 1.0}, r"test_fraction: expected a fraction in \(0, 1\), got 1.0"),
        ({"seed": -1}, "seed: expected a non-negative int"),
    ]:
        with pytest.raises(ValueError, match=expected):
            ImageFolder(tmp_path / "d", cache_dir=tmp_path / "c", **kwargs)


def test_pillow_missing_is_a_one_line_error(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_pil(name, *args, **kwargs):
        if name == "PIL" or name.startswith("PIL."):
            raise ImportError("No module named 'PIL'")
        return real(name, *args, **kwargs)

    write_classes(tmp_path / "d", classes=("a", "b"), per_class=2)
    monkeypatch.setattr(builtins, "__import__", no_pil)
    with pytest.raises(DataError, match=r"reading images needs Pillow \(pip install 'pillow>=9.1'\)") as exc:
        ImageFolder(tmp_path / "d", cache_dir=tmp_path / "c")
    _one_line(exc)


# ---------------------------------------------------------------------------------- the decode cache
def test_second_open_decodes_nothing_and_a_touched_file_is_decoded_again(tmp_path, monkeypatch):
    files = write_classes(tmp_path / "d", per_class=4)
    calls = counted_decodes(monkeypatch)
    first = ImageFolder(tmp_path / "d", cache_dir=tmp_path / "c")
    assert len(calls) == 12
    calls.clear()
    notes = []
    second = ImageFolder(tmp_path / "d", cache_dir=tmp_path / "c", say=notes.append)
    assert calls == [] and any("read from the decode cache" in n for n in notes)
    assert np.array_equal(first.x_train, second.x_train) and np.array_equal(first.y_test, second.y_test)
    # a modified image (new contents, new mtime) makes a new key: decoded again, the old entry removed
    victim = files["dog"][1]
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(victim)
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = ImageFolder(tmp_path / "d", cache_dir=tmp_path / "c")
    assert len(calls) == 12
    rows = np.concatenate([third.x_train, third.x_test])
    assert any((r == 7).all() for r in rows)
    entries = list((tmp_path / "c").iterdir())
    assert len(entries) == 1 and (entries[0] / "meta.json").exists()
    # touched only (same bytes, a new mtime): decoded again too
    calls.clear()
    st = files["cat"][0].stat()
    os.utime(files["cat"][0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    ImageFolder(tmp_path / "d", cache_dir=tmp_path / "c")
    assert len(calls) == 12


def test_settings_are_part_of_the_key(tmp_path, monkeypatch):
    write_classes(tmp_path / "d", classes=("a", "b"), per_class=3)
    calls = counted_decodes(monkeypatch)
    ImageFolder(tmp_path / "d", cache_dir=tmp_path / "c")
    ImageFolder(tmp_path / "d", image_size=4, cache_dir=tmp_path / "c")
    ImageFolder(tmp_path / "d", channels=1, cache_dir=tmp_path / "c")
    assert len(calls) == 18
    calls.clear()
    ImageFolder(tmp_path / "d", image_size=4, cache_dir=tmp_path / "c")
    assert calls == []


def test_an_interrupted_decode_leaves_no_cache_that_is_trusted(tmp_path, monkeypatch):
    write_classes(tmp_path / "d", per_class=4)
    real = images_mod._decode
    seen = []

    def dies(path, size, channels):
        seen.append(path)
        if len(seen) == 7:
            raise KeyboardInterrupt
        return real(path, size, channels)

    monkeypatch.setattr(images_mod, "_decode", dies)
    with pytest.raises(KeyboardInterrupt):
        ImageFolder(tmp_path / "d", cache_dir=tmp_path / "c", workers=1)
    assert [p.name for p in (tmp_path / "c").iterdir()] == []
    calls = counted_decodes(monkeypatch)
    monkeypatch.setattr(images_mod, "_decode", lambda p, s, c: (calls.append(p), real(p, s, c))[1])
    ImageFolder(tmp_path / "d", cache_dir=tmp_path / "c")
    assert len(calls) == 12


def test_a_cache_entry_with_a_wrong_file_is_not_trusted(tmp_path, monkeypatch):
    write_classes(tmp_path / "d", classes=("a", "b"), per_class=3)
    ImageFolder(tmp_path / "d", cache_dir=tmp_path / "c")
    (entry,) = list((tmp_path / "c").iterdir())
    (entry / "x_train.npy").write_bytes((entry / "x_train.npy").read_bytes()[:-5])  # a short file
    calls = counted_decodes(monkeypatch)
    ds = ImageFolder(tmp_path / "d", cache_dir=tmp_path / "c")
    assert len(calls) == 6 and ds.x_train.shape[0] == 4


def test_default_cache_folder_is_under_the_data_folder(tmp_path):
    write_classes(tmp_path / "d", classes=("a", "b"), per_class=2)
    with config.override(data_dir=str(tmp_path / "data")):
        ImageFolder(tmp_path / "d")
        assert len(list((tmp_path / "data" / "images").iterdir())) == 1
        assert cnn_gpu.data.clear_cache() == 1
        assert list((tmp_path / "data" / "images").iterdir()) == []


# ---------------------------------------------------------------------------------- memmap
def test_large_arrays_are_memory_mapped_and_train_the_same(tmp_path):
    write_classes(tmp_path / "d", per_class=12)
    ram = ImageFolder(tmp_path / "d", cache_dir=tmp_path / "c")
    assert not isinstance(ram.x_train, np.memmap)
    with config.override(mmap_mb=0):  # every array file is "larger" than 0 MiB
        mapped = ImageFolder(tmp_path / "d", cache_dir=tmp_path / "c")
    assert isinstance(mapped.x_train, np.memmap) and mapped.x_train.mode == "r"
    assert not mapped.x_train.flags.writeable
    assert np.array_equal(mapped.x_train, ram.x_train)
    a = DataLoader(ram.x_train, ram.y_train, 5, shuffle=True, seed=4)
    b = DataLoader(mapped.x_train, mapped.y_train, 5, shuffle=True, seed=4)
    for epoch in (0, 1):
        for (xa, ya), (xb, yb) in zip(a.epoch(epoch), b.epoch(epoch), strict=True):
            assert type(xb) is np.ndarray and np.array_equal(xa, xb) and np.array_equal(ya, yb)
    plain = [xb for xb, _ in DataLoader(mapped.x_train, mapped.y_train, 5).epoch(0)]
    assert np.array_equal(np.concatenate(plain), ram.x_train)


def test_channel_stats_on_a_memmap_equals_in_memory_and_the_reference(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (37, 3, 5, 4), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    monkeypatch.setattr(cnn_gpu.data.loader, "STATS_CHUNK_BYTES", 5 * 3 * 5 * 4 * 8)  # chunks of 5 rows
    m1, s1 = channel_stats(mm, 255.0)
    m2, s2 = channel_stats(x, 255.0)
    assert np.array_equal(m1, m2) and np.array_equal(s1, s2)
    ref = x.astype(np.float64) / 255.0
    np.testing.assert_allclose(m1, ref.mean(axis=(0, 2, 3)), rtol=1e-13)
    np.testing.assert_allclose(s1, ref.std(axis=(0, 2, 3)), rtol=1e-12)


# ---------------------------------------------------------------------------------- .npz arrays
def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_npz_nchw_uint8_with_classes(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10, 3, 6, 6), dtype=np.uint8)
    p = _npz(
        tmp_path / "a.npz",
        x_train=x,
        y_train=np.arange(10) % 3,
        x_test=x[:4],
        y_test=np.array([0, 1, 2, 0]),
        classes=np.array(["ant", "bee", "cow"]),
    )
    ds = load_arrays(p)
    assert ds.classes == ("ant", "bee", "cow") and ds.num_classes == 3 and ds.scale == 255.0
    assert np.array_equal(ds.x_train, x) and ds.y_train.dtype == np.int64 and ds.name == "a"


def test_npz_nhwc_float_is_transposed(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 5, 6, 3)).astype(np.float64)
    p = _npz(
        tmp_path / "b.npz",
        x_train=x,
        y_train=np.arange(8) % 2,
        x_test=x[:2],
        y_test=np.array([1, 0]),
        x_val=x[2:5],
        y_val=np.array([0, 1, 1]),
    )
    ds = load_arrays(p)
    assert ds.input_shape == (3, 5, 6) and ds.x_train.dtype == np.float32 and ds.scale == 1.0
    assert np.array_equal(ds.x_train, x.transpose(0, 3, 1, 2).astype(np.float32))
    assert ds.classes is None and ds.num_classes == 2 and ds.x_val.shape == (3, 3, 5, 6)


def test_npz_gray_without_channel_axis_and_ambiguous_shape_is_nchw(tmp_path):
    x = np.zeros((4, 7, 7), np.uint8)
    assert load_arrays(
        _npz(tmp_path / "g.npz", x_train=x, y_train=np.array([0, 1, 0, 1]), x_test=x[:1], y_test=np.array([1]))
    ).input_shape == (1, 7, 7)
    amb = np.zeros((4, 3, 4, 4), np.uint8)  # axis 1 and the last are both channel-like: read as NCHW
    assert load_arrays(
        _npz(tmp_path / "h.npz", x_train=amb, y_train=np.array([0, 1, 0, 1]), x_test=amb[:1], y_test=np.array([1]))
    ).input_shape == (3, 4, 4)


@pytest.mark.parametrize(
    "change,expected",
    [
        ({"y_test": None}, r"missing array\(s\) y_test"),
        ({"y_train": np.array([0, 1, 2, 5])}, r"labels must be in \[0, 3\) for its 3 classes, got label 5"),
        ({"y_train": np.array([0.0, 1.0, 2.0, 1.0])}, r"y_train must be integer class indices, got dtype float64"),
        ({"y_train": np.array([0, -1, 2, 1])}, r"y_train holds negative labels"),
        ({"y_train": np.array([0, 1, 2])}, r"y_train has 3 labels but x_train has 4 images"),
        ({"x_train": np.zeros((4, 6), np.uint8)}, r"x_train must be images .* got shape \(4, 6\)"),
        ({"x_train": np.full((4, 1, 3, 3), np.nan, np.float32)}, r"x_train holds non-finite values"),
        ({"x_train": np.zeros((4, 1, 3, 3), np.int32)}, r"x_train must be uint8 .* or float images, got dtype int32"),
        ({"classes": np.array(["only"])}, r"classes names 1 class; expected at least 2"),
        ({"classes": None, "y_train": np.zeros(4, np.int64), "y_test": np.zeros(2, np.int64)}, r"the labels name a single class"),
        ({"classes": np.array([{"a": 1}, None], dtype=object)}, r"classes is an object array, which would need pickle"),
        ({"x_val": np.zeros((2, 1, 3, 3), np.uint8)}, r"has x_val without y_val"),
        ({"junk": np.zeros(2)}, r"unexpected array\(s\) junk"),
        ({"x_test": np.zeros((2, 1, 4, 4), np.uint8)}, r"x_test holds uint8 images of shape .* but x_train holds"),
    ],
)
def test_npz_errors_are_one_line_and_name_the_file(tmp_path, change, expected):
    arrays = {
        "x_train": np.zeros((4, 1, 3, 3), np.uint8),
        "y_train": np.array([0, 1, 2, 1]),
        "x_test": np.zeros((2, 1, 3, 3), np.uint8),
        "y_test": np.array([0, 2]),
        "classes": np.array(["a", "b", "c"]),
    }
    for k, v in change.items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(DataError, match=expected) as exc:
        load_arrays(p)
    assert _one_line(exc).startswith(f"{p}: ")


def test_open_data_dispatches_and_refuses_what_does_not_apply(tmp_path):
    write_classes(tmp_path / "d", classes=("a", "b"), per_class=2)
    assert open_data(tmp_path / "d", cache_dir=tmp_path / "c").classes == ("a", "b")
    p = _npz(
        tmp_path / "a.npz",
        x_train=np.zeros((2, 1, 3, 3), np.uint8),
        y_train=np.array([0, 1]),
        x_test=np.zeros((1, 1, 3, 3), np.uint8),
        y_test=np.array([1]),
    )
    assert open_data(p).num_classes == 2
    with pytest.raises(ValueError, match="image_size: applies to image folders"):
        open_data(p, image_size=4)
    with pytest.raises(DataError, match="expected a folder of images .* got an image"):
        open_data(tmp_path / "d" / "a" / "img000.png")
    with pytest.raises(DataError, match="no such file or folder"):
        open_data(tmp_path / "nothing")
    with pytest.raises(DataError, match="not a readable .npz"):
        open_data(_write(tmp_path / "x.npz", b"garbage"))


def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


def test_builtin_datasets_name_their_classes():
    ds = get_dataset("digits")
    assert ds.classes == tuple("0123456789") and ds.x_val is None
    assert cnn_gpu.data.CLASS_NAMES["cifar10"][0] == "airplane" and len(cnn_gpu.data.CLASS_NAMES["fashion-mnist"]) == 10


# ---------------------------------------------------------------------------------- training
def _tiny_model(in_channels: int, classes: int):
    from cnn_gpu import nn

    cnn_gpu.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, classes)
    )


def test_fit_and_evaluate_learn_an_image_folder(tmp_path):
    from cnn_gpu import optim
    from cnn_gpu.train import evaluate, fit

    write_classes(tmp_path / "d", per_class=30)
    ds = ImageFolder(tmp_path / "d", test_fraction=0.2, cache_dir=tmp_path / "c")
    mean, std = channel_stats(ds.x_train, ds.scale)
    x_tr, x_te = (normalize(x, mean, std, ds.scale) for x in (ds.x_train, ds.x_test))
    model = _tiny_model(3, ds.num_classes)
    before = evaluate(model, x_te, ds.y_test)[1]
    fit(model, optim.Adam(model, 1e-2), DataLoader(x_tr, ds.y_train, 16, shuffle=True), 5)
    loss, acc = evaluate(model, x_te, ds.y_test)
    assert acc >= 0.9 > before or acc == 1.0, (before, acc)
    # the same through the host path (memory-mapped, normalised per batch): the same model
    with config.override(mmap_mb=0):
        mapped = ImageFolder(tmp_path / "d", test_fraction=0.2, cache_dir=tmp_path / "c")
    model2 = _tiny_model(3, ds.num_classes)
    host = HostImages(mapped.x_train, mean, std, ds.scale)
    fit(model2, optim.Adam(model2, 1e-2), DataLoader(host, mapped.y_train, 16, shuffle=True), 5)
    for (_, p1), (_, p2) in zip(model.named_parameters(), model2.named_parameters()):
        assert np.array_equal(p1.data, p2.data)
    assert evaluate(model2, HostImages(mapped.x_test, mean, std, ds.scale), mapped.y_test) == (loss, acc)


def test_an_unwritable_cache_folder_is_a_one_line_error(tmp_path):
    write_classes(tmp_path / "d", classes=("a", "b"), per_class=2)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match=r"cannot write the decode cache .* choose a writable folder") as exc:
        ImageFolder(tmp_path / "d", cache_dir=blocker / "cache")
    assert _one_line(exc).startswith(str(blocker / "cache"))


def test_images_are_decoded_by_several_threads(tmp_path, monkeypatch):
    import threading
    import time

    write_classes(tmp_path / "d", per_class=4)
    real, threads = images_mod._decode, set()

    def slow(path, size, channels):
        threads.add(threading.get_ident())
        time.sleep(0.02)  # long enough that one thread cannot take every image alone
        return real(path, size, channels)

    monkeypatch.setattr(images_mod, "_decode", slow)
    ds = ImageFolder(tmp_path / "d", cache_dir=tmp_path / "c", workers=4)
    assert len(threads) > 1 and threading.get_ident() not in threads
    assert len(ds.y_train) + len(ds.y_test) == 12
