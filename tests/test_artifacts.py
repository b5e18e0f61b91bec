"""The artifact catalogue: round trips, the column contract, and each check on hand-made bad files."""

import json

import numpy as np
import pyarrow as pa
import pytest

from dedt import artifacts
from dedt.artifacts import EMBEDDINGS, MANIFEST, SCORES, SUBSET, WEIGHTS
from dedt.encoders.streaming import embedding_table
from dedt.errors import DedtError
from dedt.store import StageDir, parquet_metadata, write_parquet

IDS = np.arange(6, dtype=np.int64)


def folder(tmp_path, stage: str) -> StageDir:
    out = StageDir(tmp_path, stage, "fp")
    out.path.mkdir(parents=True)
    return out


def manifest(tmp_path) -> StageDir:
    """A data stage whose train split is samples 0-5 and holdout 6-7."""
    data = folder(tmp_path, "data")
    write_parquet(
        pa.table(
            {
                "sample_id": np.arange(8, dtype=np.int64),
                "label": np.zeros(8, np.int32),
                "class_name": ["a"] * 8,
                "split": ["train"] * 6 + ["holdout"] * 2,
                "image": pa.array([b""] * 8, pa.binary()),
            }
        ),
        MANIFEST.path(data),
    )
    (data.path / artifacts.SUMMARY).write_text(json.dumps({"shape": [8, 8, 1], "classes": 3}))
    return data


def test_write_read_round_trip_keeps_table_and_metadata(tmp_path):
    out = folder(tmp_path, "score")
    table = pa.table({"sample_id": IDS, "label": np.zeros(6, np.int32), "score": np.linspace(0, 1, 6)})
    SCORES.write(out, table, {"method": "gaussian"})
    back = SCORES.read(out)
    assert back.equals(table.replace_schema_metadata(back.schema.metadata))
    assert parquet_metadata(back) == {"method": "gaussian"}
    assert out.file(SCORES) == SCORES.path(out) == SCORES.path(str(out.path))  # a relative path, however named


def test_write_refuses_a_table_without_the_catalogue_columns(tmp_path):
    out = folder(tmp_path, "select")
    with pytest.raises(DedtError, match=r"subset.parquet.*\['sample_id'\]"):
        SUBSET.write(out, pa.table({"label": np.zeros(2, np.int32)}))
    assert not SUBSET.path(out).exists()


@pytest.mark.parametrize("weights", [[0.6, 0.6, 0.6], [1.2, -0.2, 0.0], [np.nan, 0.5, 0.5], []])
def test_weights_off_the_simplex_are_refused_naming_the_file(tmp_path, weights):
    out = folder(tmp_path, "reweight")
    weights = np.asarray(weights, np.float64)
    write_parquet(pa.table({"group": np.arange(len(weights), dtype=np.int32), "weight": weights}), WEIGHTS.path(out))
    for read in (artifacts.read_weights, lambda o: artifacts.check_weights(o, None)):
        with pytest.raises(DedtError, match="not on the simplex") as info:
            read(out)
        assert str(WEIGHTS.path(out)) in str(info.value) and "delete" in str(info.value)


def test_weights_on_the_simplex_read_back_and_count_against_classes(tmp_path):
    out = folder(tmp_path, "reweight")
    write_parquet(
        pa.table({"group": np.arange(3, dtype=np.int32), "weight": np.array([0.5, 0.25, 0.25])}), WEIGHTS.path(out)
    )
    np.testing.assert_array_equal(artifacts.read_weights(out), [0.5, 0.25, 0.25])
    artifacts.check_weights(out, 3)
    with pytest.raises(DedtError, match="3 class weights for 10 classes"):
        artifacts.check_weights(out, 10)


def test_train_ids_and_image_shape_of_a_data_stage(tmp_path):
    data = manifest(tmp_path)
    np.testing.assert_array_equal(artifacts.train_ids(data), IDS)
    assert artifacts.image_shape(data) == (8, 8, 1)


def test_checks_refuse_other_samples_nan_scores_and_wrong_width(tmp_path):
    ids = artifacts.train_ids(manifest(tmp_path))
    score = folder(tmp_path, "score")
    SCORES.write(score, pa.table({"sample_id": IDS, "label": np.zeros(6, np.int32), "score": np.zeros(6)}))
    artifacts.check_scores(score, ids)
    SCORES.write(score, pa.table({"sample_id": IDS + 1, "label": np.zeros(6, np.int32), "score": np.zeros(6)}))
    with pytest.raises(DedtError, match="covers other samples"):
        artifacts.check_scores(score, ids)
    SCORES.write(score, pa.table({"sample_id": IDS, "label": np.zeros(6, np.int32), "score": np.full(6, np.nan)}))
    with pytest.raises(DedtError, match="NaN/inf"):
        artifacts.check_scores(score, ids)

    select = folder(tmp_path, "select")
    SUBSET.write(select, pa.table({"sample_id": np.array([1, 7], np.int64)}))  # 7 is held out
    with pytest.raises(DedtError, match="not in the manifest's train split"):
        artifacts.check_subset(select, ids)

    encode = folder(tmp_path, "encode")
    write_parquet(
        embedding_table(IDS, np.zeros((6, 4), np.float32)),
        EMBEDDINGS.path(encode),
        {"encoder": "pixels", "dim": 4, "preprocessing": "none"},
    )
    artifacts.check_embeddings(encode, ids, "pixels", 4)
    with pytest.raises(DedtError, match="4-d embeddings but encode.encoder=pixels gives 64-d"):
        artifacts.check_embeddings(encode, ids, "pixels", 64)


def test_a_missing_column_is_named_with_the_fix(tmp_path):
    score = folder(tmp_path, "score")
    write_parquet(pa.table({"sample_id": IDS}), SCORES.path(score))
    with pytest.raises(DedtError, match=r"lacks columns \['label', 'score'\].*delete"):
        artifacts.check_scores(score, IDS)
    with pytest.raises(DedtError, match="lacks columns"):
        SCORES.read(score)
