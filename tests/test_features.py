"""Feature extraction and the feature cache (keyed by encoder weights and data)."""

import pytest
import torch

from blip3o_mini.artifacts import mark_complete
from blip3o_mini.features import (ENCODER_DIR, FEATURES_DIR, cached_features, extract_features,
                                  feature_stats, load_split_features, measure_stats)
from blip3o_mini.vision import ClipEncoder


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_extract_features_in_row_order(encoder, images):
    feats = extract_features(encoder, images, batch_size=2)
    assert feats.shape == (5, 64, 128) and feats.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(feats[3], encoder.encode_tokens(images[3:4])[0])
    with pytest.raises(ValueError, match="no images"):
        extract_features(encoder, images[:0])


def test_cache_equals_fresh_and_changed_encoder_invalidates(encoder, images, tmp_path):
    calls = []

    def source():
        calls.append(1)
        return images

    first = cached_features(encoder, source, tmp_path, "val", "data0")
    again = cached_features(encoder, source, tmp_path, "val", "data0")
    assert len(calls) == 1  # the second call is a cache hit that never touches the images
    assert torch.equal(first, again)
    assert torch.equal(again, extract_features(encoder, images))  # cached == freshly computed

    changed = ClipEncoder.load(encoder.save(tmp_path / "enc"))
    with torch.no_grad():
        changed.model.visual.transformer.resblocks[-1].mlp.c_proj.bias.add_(1.0)
    fresh = cached_features(changed, source, tmp_path, "val", "data0")
    assert len(calls) == 2 and not torch.equal(fresh, first)
    torch.testing.assert_close(fresh, extract_features(changed, images))
    # other data (a regenerated data stage) also misses; only the newest entry per split is kept
    cached_features(changed, source, tmp_path, "val", "data1")
    assert len(calls) == 3 and len(list(tmp_path.glob("val-*.safetensors"))) == 1


def test_load_split_features_from_a_stage_dir(encoder, images, tmp_path):
    """A CLIP stage directory as the stage writes it; the cache serves the split's rows."""
    clip_dir = tmp_path / "clip"
    mean, std = measure_stats(extract_features(encoder, images, normalize=False))
    encoder.set_feature_stats(mean, std)
    try:
        encoder.save(clip_dir / ENCODER_DIR)
        mark_complete(tmp_path / "data", "datakey")
        feats = cached_features(encoder, images, clip_dir / FEATURES_DIR, "train", "datakey")
        loaded = load_split_features(clip_dir, "train")  # cache hit: no dataset needed
        assert torch.equal(loaded, feats)
        stats = feature_stats(clip_dir)
        assert stats.normalized is False
        torch.testing.assert_close(stats.mean, mean)
        with pytest.raises(FileNotFoundError, match="shapesworld"):
            load_split_features(clip_dir, "val")  # miss, and this run dir has no dataset
    finally:
        encoder.set_feature_stats(torch.zeros(128), torch.ones(128))


def test_measure_stats_per_dimension():
    feats = torch.stack([torch.zeros(4, 2), torch.ones(4, 2) * torch.tensor([2.0, 4.0])])  # (2, 4, 2)
    mean, std = measure_stats(feats)
    torch.testing.assert_close(mean, torch.tensor([1.0, 2.0]))
    assert std[1] > std[0] > 0


def test_missing_stage_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train the CLIP stage first"):
        load_split_features(tmp_path / "clip", "train")


def test_clip_stage_end_to_end_on_a_tiny_run(tmp_path):
    """The "clip" stage: trains, writes weights/configs/metrics/features, then is skipped."""
    import json

    from blip3o_mini.run import STAGES, ensure_stage

    assert [n for n, _ in STAGES][:2] == ["data", "clip"]
    cfg = {"seed": 0, "data": {"num_train": 64, "num_val": 64},
           "clip": {"train": {"batch_size": 32, "max_steps": 2, "warmup_steps": 1, "precision": "32-true"}}}
    first = ensure_stage("clip", cfg, tmp_path)["clip"]
    clip_dir = tmp_path / "clip"
    metrics = json.loads((clip_dir / "metrics.json").read_text())
    for k in ("zero_shot_color_acc", "zero_shot_shape_acc", "recall_at_1"):
        assert 0.0 <= metrics[k] <= 1.0
    assert metrics["num_retrieval_queries"] == 64 and metrics["train_steps"] == 2
    assert len(json.loads((clip_dir / "loss_history.json").read_text())) >= 1
    assert not list(clip_dir.glob("lightning-*"))  # resume state removed once complete
    train = load_split_features(clip_dir, "train")
    assert train.shape == (64, 64, 128)
    again = ensure_stage("clip", cfg, tmp_path)["clip"]
    assert again.skipped and again.key == first.key
    cfg["clip"]["pool_grid"] = 4  # a changed config section changes the key
    from blip3o_mini.artifacts import fingerprint, stage_complete
    assert not stage_complete(clip_dir, fingerprint("clip", 1, 0, cfg["clip"], first.key))
