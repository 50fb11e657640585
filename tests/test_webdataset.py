"""WebDataset shards: export -> read round trip, corrupt data, captions, globs, ranks, the CLI."""

import io
import itertools
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest

from blip3o_mini import cli
from blip3o_mini.data import generate_split, make_sample, render, scene_of
from blip3o_mini.data.webdataset import (ShardReader, WebDatasetConfig, export_shards, jpeg_bytes,
                                         read_shards, resolve_shards)

FIXTURE = Path(__file__).resolve().parent.parent / "data" / "fixtures" / "shapesworld-sample-000000.tar"


@pytest.fixture(scope="module")
def split():
    return generate_split(0, "train", 10)


@pytest.fixture(scope="module")
def shard_dir(split, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    export_shards(split, out, prefix="train", samples_per_shard=4)
    return out


def write_tar(path, members):
    """A tar with the given (name, bytes) members, as a broken or foreign shard would be."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def good_members(key, caption="a red circle"):
    return [(f"{key}.jpg", jpeg_bytes(render(scene_of(make_sample(0, "train", 0))))),
            (f"{key}.txt", caption.encode())]


def assert_close_to_render(image, row):
    """A JPEG round trip keeps the picture: small mean error, nearly every pixel on its colour."""
    got = np.asarray(image, dtype=np.int16)
    want = np.asarray(render(scene_of(row)), dtype=np.int16)
    assert got.shape == want.shape == (64, 64, 3)
    err = np.abs(got - want)
    assert err.mean() < 2.0
    assert (err.max(axis=-1) <= 24).mean() > 0.98


def test_round_trip(split, shard_dir):
    names = sorted(p.name for p in shard_dir.iterdir())
    assert names == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]  # 4 + 4 + 2
    with tarfile.open(shard_dir / "train-000000.tar") as tar:
        assert tar.getnames()[:3] == ["train-000000.jpg", "train-000000.txt", "train-000000.json"]
    samples = read_shards(str(shard_dir / "train-*.tar"))
    assert [s["key"] for s in samples] == split["id"]
    for s, row in zip(samples, split):
        assert s["caption"] == row["captions"][0]
        assert s["image"].mode == "RGB"
        assert_close_to_render(s["image"], row)
        assert s["json"]["objects"] == row["objects"]
        assert s["json"] == {k: v for k, v in row.items() if k != "image"}
        assert Path(s["shard"]).parent == shard_dir


def test_not_streaming_reads_the_same(shard_dir, tmp_path):
    config = WebDatasetConfig(streaming=False, cache_dir=str(tmp_path / "cache"))
    a, b = read_shards(str(shard_dir / "*.tar")), read_shards(str(shard_dir / "*.tar"), config=config)
    assert [(s["key"], s["caption"], s["json"]) for s in a] == [(s["key"], s["caption"], s["json"]) for s in b]


def test_export_replaces_stale_shards_and_is_atomic(split, tmp_path, monkeypatch):
    export_shards(split, tmp_path, prefix="train", samples_per_shard=2)
    assert len(list(tmp_path.glob("train-*.tar"))) == 5
    paths = export_shards(split, tmp_path, prefix="train", samples_per_shard=5)
    assert sorted(tmp_path.iterdir()) == paths  # the 3 shards of the earlier export are gone
    before = paths[0].read_bytes()

    from blip3o_mini.data import webdataset

    calls = itertools.count()

    def failing_jpeg(image, quality=95):
        if next(calls) == 3:
            raise RuntimeError("disk full")
        return jpeg_bytes(image, quality)

    monkeypatch.setattr(webdataset, "jpeg_bytes", failing_jpeg)
    with pytest.raises(RuntimeError):
        export_shards(split, tmp_path, prefix="train", samples_per_shard=5)
    assert paths[0].read_bytes() == before  # the old shard is intact and no temp file is left
    assert sorted(tmp_path.iterdir()) == paths


def test_bad_export_arguments(split, tmp_path):
    with pytest.raises(ValueError, match="samples_per_shard"):
        export_shards(split, tmp_path, samples_per_shard=0)


def test_corrupt_images_are_skipped_counted_and_reported(tmp_path, caplog):
    good = good_members("s0") + good_members("s1") + good_members("s4")
    garbage = [("s2.jpg", b"this is not a jpeg"), ("s2.txt", b"a blue square")]
    jpg = good_members("s3")[0][1]
    truncated = [("s3.jpg", jpg[: len(jpg) // 2]), ("s3.txt", b"a green triangle")]
    shard = write_tar(tmp_path / "bad.tar", good[:4] + garbage + truncated + good[4:])
    reader = ShardReader(shard)
    with caplog.at_level(logging.WARNING, logger="blip3o_mini.data.webdataset"):
        keys = [s["key"] for s in reader]
    assert keys == ["s0", "s1", "s4"]
    assert (reader.stats.num_read, reader.stats.num_skipped) == (3, 2)
    assert [k for _, k, _ in reader.stats.skipped] == ["s2", "s3"]
    assert "skipped 2" in caplog.text and "s2" in caplog.text


def test_truncated_shard_keeps_what_was_read(split, shard_dir, tmp_path):
    data = (shard_dir / "train-000000.tar").read_bytes()
    (tmp_path / "a.tar").write_bytes(data[: len(data) // 2])  # cut in the middle of a member
    (tmp_path / "b.tar").write_bytes((shard_dir / "train-000001.tar").read_bytes())
    reader = ShardReader(str(tmp_path / "*.tar"))
    keys = [s["key"] for s in reader]
    assert 1 <= len(keys) - 4 < 4 and keys[-4:] == split["id"][4:8]
    assert [s for s, _ in reader.stats.shard_errors] == [str(tmp_path / "a.tar")]
    assert "ended early" in reader.stats.summary()


@pytest.mark.parametrize("missing", [0, 1])
def test_missing_caption_names_shard_and_key(tmp_path, missing):
    members = [good_members(f"k{i}")[: 1 if i == missing else 2] for i in range(3)]
    shard = write_tar(tmp_path / "nocap.tar", list(itertools.chain(*members)))
    with pytest.raises(ValueError, match=rf"nocap\.tar.*'k{missing}'.*k{missing}\.txt"):
        read_shards(shard)


def test_other_image_keys_and_caption_key(tmp_path):
    buf = io.BytesIO()
    render(scene_of(make_sample(0, "train", 1))).save(buf, format="PNG")
    shard = write_tar(tmp_path / "png.tar", [("p0.png", buf.getvalue()), ("p0.caption", b"two squares\n")])
    [s] = read_shards(shard, config=WebDatasetConfig(caption_key="caption"))
    assert s["caption"] == "two squares" and s["json"] is None
    assert np.array_equal(np.asarray(s["image"]), np.asarray(render(scene_of(make_sample(0, "train", 1)))))
    reader = ShardReader(shard, config=WebDatasetConfig(image_keys=("jpg",), caption_key="caption"))
    assert list(reader) == [] and reader.stats.num_skipped == 1
    assert "no image member" in reader.stats.skipped[0][2]


def test_globs_directories_and_missing_paths(shard_dir):
    listed = [str(shard_dir / f"train-{k:06d}.tar") for k in range(3)]
    assert resolve_shards(str(shard_dir / "train-*.tar")) == listed
    assert resolve_shards(shard_dir) == listed
    assert resolve_shards([listed[2], str(shard_dir / "*.tar")]) == [listed[2]] + listed[:2]
    with pytest.raises(FileNotFoundError, match="no WebDataset shard matches"):
        resolve_shards(str(shard_dir / "val-*.tar"))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ranks_are_disjoint_and_complete(split, shard_dir, world_size):
    readers = [ShardReader(shard_dir, rank=r, world_size=world_size) for r in range(world_size)]
    assert {r.split_by for r in readers} == {"shard" if 3 % world_size == 0 else "sample"}
    parts = [[s["key"] for s in r] for r in readers]
    assert sorted(itertools.chain(*parts)) == sorted(split["id"])  # complete, no duplicates
    assert all(parts)  # every rank gets work
    with pytest.raises(ValueError, match="rank"):
        ShardReader(shard_dir, rank=world_size, world_size=world_size)


def test_committed_fixture_shard():
    samples = read_shards(FIXTURE)
    assert len(samples) == 8
    for i, s in enumerate(samples):
        row = make_sample(0, "train", i)
        assert s["key"] == row["id"] and s["caption"] == row["captions"][0]
        assert s["json"]["objects"] == row["objects"] and s["json"]["answers"] == row["answers"]
        assert_close_to_render(s["image"], row)


def test_cli_writes_shards(tmp_path, capsys):
    code = cli.main(["data", "--out", str(tmp_path / "ds"), "--num-train", "5", "--num-val", "3",
                     "--shards", str(tmp_path / "shards"), "--samples-per-shard", "2"])
    assert code == 0
    names = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert names == [f"train-{k:06d}.tar" for k in range(3)] + [f"val-{k:06d}.tar" for k in range(2)]
    assert len(read_shards(str(tmp_path / "shards" / "val-*.tar"))) == 3
    assert "train: 3 WebDataset shard(s)" in capsys.readouterr().out


def test_cli_writes_the_relation_rule_asked(tmp_path):
    import datasets

    assert cli.main(["data", "--out", str(tmp_path / "ds"), "--num-train", "30", "--num-val", "1",
                     "--relation-rule", "dominant_axis"]) == 0
    train = datasets.load_from_disk(str(tmp_path / "ds"))["train"]
    assert train["captions"] == [make_sample(0, "train", i, "dominant_axis")["captions"] for i in range(30)]
    assert train["captions"] != [make_sample(0, "train", i)["captions"] for i in range(30)]


@pytest.mark.parametrize("argv, fragment", [
    (["--num-train", "-1"], "--num-train: must be a positive integer, got -1"),
    (["--num-val", "0"], "--num-val: must be a positive integer, got 0"),
    (["--samples-per-shard", "0"], "--samples-per-shard: must be at least 1 sample per shard"),
    (["--relation-rule", "diagonal"], "--relation-rule: invalid choice: 'diagonal'"),
])
def test_cli_rejects_bad_counts(tmp_path, capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["data", "--out", str(tmp_path / "ds"), *argv])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("blip3o-mini data: error:") and fragment in last
    assert not (tmp_path / "ds").exists()
