"""A user's datasets as CSV files ("csv:") and WebDataset shards ("wds:"): labels, names, parts, streaming."""

from __future__ import annotations

import io
import tarfile
import tracemalloc
from pathlib import Path

import pytest
from PIL import Image

from patcher.base.errors import PatcherError
from patcher.data.tasks import get_task
from patcher.data.tasks.user_data import named_spec

SHADES = {"circle": 40, "cross": 120, "square": 200}


def png(shade: int, size: int = 6) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (shade, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_csv(folder: Path, part: str, counts: dict[str, int], header: str = "filepath,label",
              separator: str = ",") -> None:
    """folder/<part>.csv listing images under folder/images/<part>/, each coloured by its label."""
    (folder / "images" / part).mkdir(parents=True, exist_ok=True)
    lines = [header.replace(",", separator)]
    for label, count in counts.items():
        for number in range(count):
            relative = f"images/{part}/{label}-{number}.png"
            (folder / relative).write_bytes(png(SHADES[label]))
            lines.append(f"{relative}{separator}{label}")
    (folder / f"{part}.csv").write_text("\n".join(lines) + "\n")


def write_shard(path: Path, counts: dict[str, int], label_ext: str = "cls", start: int = 0) -> None:
    """A WebDataset shard made with the standard library: <key>.png and <key>.<label_ext> per sample."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        number = start
        for label, count in counts.items():
            for _ in range(count):
                for extension, data in (("png", png(SHADES[label])), (label_ext, label.encode())):
                    info = tarfile.TarInfo(f"sample{number:06d}.{extension}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                number += 1


def colour_says_label(task, split: str) -> None:
    data = task.dataset(split)
    for index in range(len(data)):
        image, label = data[index]
        assert image.mode == "RGB" and image.getpixel((0, 0))[0] == SHADES[task.classnames[label]]


def test_csv_folder_with_val_and_test(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    write_csv(root, "train", {"square": 4, "circle": 4, "cross": 4})
    write_csv(root, "val", {"circle": 2, "cross": 1})
    write_csv(root, "test", {"square": 2})
    task = get_task(f"csv:{root}")
    assert task.name == "shapes" and task.source == f"csv:{root}"
    assert task.classnames == ("circle", "cross", "square")
    assert [len(task.dataset(s)) for s in ("train", "val", "test")] == [12, 3, 2]
    for split in ("train", "val", "test"):
        colour_says_label(task, split)


def test_one_csv_file_is_split_four_to_one_with_open_clip_keys(tmp_path: Path) -> None:
    write_csv(tmp_path, "all", {"circle": 5, "cross": 5}, header="path\ttitle", separator="\t")
    spec = named_spec(f"csv:{tmp_path / 'all.csv'}", "mine", {"img_key": "path", "label_key": "title", "sep": "\t"})
    task = get_task(spec)
    assert task.name == "mine" and "img_key=path" in (task.source or "")
    assert [len(task.dataset(s)) for s in ("train", "val", "test")] == [7, 1, 2]
    colour_says_label(task, "test")
    assert get_task(task.source or "", "mine").classnames == task.classnames  # what export and verify reopen


@pytest.mark.parametrize(("edit", "message"), [
    (lambda root: (root / "train.csv").write_text("image,label\nx.png,a\n"), "has no column filepath"),
    (lambda root: (root / "train.csv").write_text("filepath,label\nx.png,\n"), "line 2 has no label"),
    (lambda root: write_csv(root, "test", {"cross": 1}), "have labels that train lacks: cross"),
    (lambda root: (root / "classnames.txt").write_text("circle\n"), "is not `LABEL: NAME`"),
])
def test_csv_problems_are_one_line(tmp_path: Path, edit, message: str) -> None:
    write_csv(tmp_path, "train", {"circle": 2})
    edit(tmp_path)
    with pytest.raises(PatcherError, match=message) as raised:
        get_task(f"csv:{tmp_path}")
    assert "\n" not in str(raised.value)


def test_csv_classnames_map(tmp_path: Path) -> None:
    write_csv(tmp_path / "d", "train", {"cross": 2, "circle": 2})
    (tmp_path / "d" / "classnames.txt").write_text("cross: a plus sign\ncircle: a ring\n")
    task = get_task(f"csv:{tmp_path / 'd'}")
    assert task.classnames == ("a ring", "a plus sign")


def test_shards_with_parts_and_labels(tmp_path: Path) -> None:
    root = tmp_path / "shards"
    write_shard(root / "train" / "train-000000.tar", {"circle": 3, "square": 2})
    write_shard(root / "train" / "train-000001.tar", {"cross": 3, "square": 1}, start=100)
    write_shard(root / "val" / "val-000000.tar", {"cross": 2}, label_ext="txt")
    write_shard(root / "test" / "test-000000.tar", {"circle": 1, "square": 1})
    task = get_task(f"wds:{root}")
    assert task.name == "shards" and task.classnames == ("circle", "cross", "square")
    assert [len(task.dataset(s)) for s in ("train", "val", "test")] == [9, 2, 2]
    for split in ("train", "val", "test"):
        colour_says_label(task, split)


def test_shards_in_one_folder_are_split(tmp_path: Path) -> None:
    write_shard(tmp_path / "s" / "000.tar", {"circle": 5, "cross": 5})
    task = get_task(f"wds:{tmp_path / 's'}")
    assert [len(task.dataset(s)) for s in ("train", "val", "test")] == [7, 1, 2]
    colour_says_label(task, "test")


def test_shard_index_holds_no_image_data(tmp_path: Path) -> None:
    """Indexing 2,000 samples of 30 KB images keeps kilobytes, not the 60 MB of pixels: memory does not grow with
    the images' size, only with a few numbers per sample."""
    path = tmp_path / "big" / "000.tar"
    path.parent.mkdir()
    noise = Image.effect_noise((100, 100), 64).convert("RGB")
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    data = buffer.getvalue()
    assert len(data) > 20_000
    with tarfile.open(path, "w") as tar:
        for number in range(2000):
            for extension, payload in (("png", data), ("cls", b"circle" if number % 2 else b"cross")):
                info = tarfile.TarInfo(f"{number:06d}.{extension}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    tracemalloc.start()
    task = get_task(f"wds:{path.parent}")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(task.dataset("train")) + len(task.dataset("val")) == 1600
    assert peak < 2_000_000, f"indexing took {peak} bytes"


@pytest.mark.parametrize(("make", "message"), [
    (lambda root: write_shard(root / "000.tar", {"circle": 1}, label_ext="json"), "lacks a label"),
    (lambda root: (root / "000.tar.gz").write_bytes(b"x"), "is compressed"),
    (lambda root: (root / "000.tar").write_bytes(b"not a tar"), "cannot read shard"),
    (lambda root: root.joinpath("x.txt").write_text("x"), "has no .tar shards"),
])
def test_shard_problems_are_one_line(tmp_path: Path, make, message: str) -> None:
    make(tmp_path)
    with pytest.raises(PatcherError, match=message) as raised:
        get_task(f"wds:{tmp_path}")
    assert "\n" not in str(raised.value)


def test_unknown_option_and_nearest_task_name() -> None:
    with pytest.raises(PatcherError, match="option colour is unknown"):
        get_task("csv:/data/x.csv?colour=red")
    with pytest.raises(PatcherError, match="did you mean gtsrb"):
        get_task("gtrsb")


def test_support_specs_of_every_kind_keep_their_paths() -> None:
    from patcher.patching.alpha import parse_support

    names, tolerances = parse_support(["csv:/data/x.csv", "wds:/d:2", "toys=folder:/a:b", "imagenet:0.5"], 1.0)
    assert names == ["csv:/data/x.csv", "wds:/d", "toys=folder:/a:b", "imagenet"]
    assert tolerances == {"csv:/data/x.csv": 1.0, "wds:/d": 2.0, "toys=folder:/a:b": 1.0, "imagenet": 0.5}
