"""Config: defaults, overrides, and one clear error per kind of bad input."""

import pytest
import yaml

from dedt.config import apply_override, build_config, load_pipelines, resolve
from dedt.errors import DedtError


def test_override_parses_yaml_scalars():
    raw = apply_override({"select": {"keep_frac": 0.3}}, "select.keep_frac=0.2")
    raw = apply_override(raw, "dataset.source=mnist5k")
    cfg = build_config(raw, "x")
    assert cfg.select.keep_frac == 0.2 and cfg.dataset.source == "mnist5k"


@pytest.mark.parametrize(
    "override,field",
    [
        ("select.keep_frac=0", "select.keep_frac"),
        ("select.keep_frac=1.5", "select.keep_frac"),
        ("select.keep_fraction=0.2", "select.keep_fraction"),
        ("score.method=magic", "score.method"),
        ("score.index=annoy", "score.index"),
        ("score.nprobe=0", "score.nprobe"),
        ("encode.encoder=nonsense", "encode.encoder"),
        ("train.preset=huge", "train.preset"),
        ("train.budget_kimg=0", "train.budget_kimg"),
        ("reweight.eta=0", "reweight.eta"),
        ("reweight.smoothing=1", "reweight.smoothing"),
        ("reweight.method=magic", "reweight.method"),
        ("train.weighting=magic", "train.weighting"),
        ("reweight.groups=kmeans", "train.conditional=false"),
        ("reweight.t_max_frac=0", "reweight.t_max_frac"),
        ("seed=abc", "seed"),
        ("dataset.source=imagenet", "dataset.source"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(DedtError) as err:
        build_config({}, "p", [override])
    assert field in str(err.value)


def test_timestep_range_must_be_ordered():
    with pytest.raises(DedtError, match="t_min_frac 0.6 must be below reweight.t_max_frac 0.5"):
        build_config({}, "p", ["reweight.t_min_frac=0.6", "reweight.t_max_frac=0.5"])


def test_bad_yaml_and_unknown_pipeline(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pipelines: {a: [1, 2")
    with pytest.raises(DedtError, match="not valid YAML"):
        load_pipelines(bad)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"pipelines": {"a": {}}}))
    with pytest.raises(DedtError, match="no pipeline 'b'.*known: a"):
        resolve("b", good)
    with pytest.raises(DedtError, match="not found"):
        resolve("a", tmp_path / "missing.yaml")


def test_repo_pipelines_validate():
    from pathlib import Path

    path = Path(__file__).parent.parent / "pipelines.yaml"
    for name in load_pipelines(path):
        resolve(name, path)


def test_score_methods_are_the_scorer_registry():
    from dedt.scoring import SCORERS

    for name in SCORERS:
        assert build_config({}, "p", [f"score.method={name}"]).score.method == name
    with pytest.raises(DedtError) as err:
        build_config({}, "p", ["score.method=magic"])
    assert ", ".join(SCORERS) in str(err.value)


def test_config_validates_without_loading_scipy_or_faiss():
    import subprocess
    import sys

    code = (
        "import sys; from dedt.config import build_config; build_config({}, 'p', ['score.method=knn']); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'scipy', 'faiss', 'torch'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
