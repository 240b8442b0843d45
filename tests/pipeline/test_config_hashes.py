"""The config hash of every stage, pinned: a change to how configs are declared must not re-run existing stores.

The values were computed before the stage configs moved onto one base class; a stage whose record carries one of
these hashes is skipped, so they must stay byte-identical. The ledger's digest (reports/sequence.json) likewise.
"""

from __future__ import annotations

import pytest

from stages.calibrate.config import CalibrateConfig
from stages.depth.config import DepthConfig
from stages.evaluate.config import EvaluateConfig
from stages.export.config import ExportConfig
from stages.ingest.config import IngestConfig
from stages.matte.config import MatteConfig
from stages.optimize.config import OptimizeConfig
from stages.table import STAGE_NAMES as STAGES
from storage import config_hash, digest_of

DEFAULT_HASHES = {
    IngestConfig: "d3b627f4d1282f6b",
    CalibrateConfig: "2b22eae046c3364d",
    MatteConfig: "587707b5a4781198",
    DepthConfig: "b5302a50788189eb",
    OptimizeConfig: "cd3cebc1b99f1661",
    ExportConfig: "d2551504cf5803a9",
    EvaluateConfig: "efac259019463de5",
}

# Non-default values, execution knobs among them (which must not move the hash).
NON_DEFAULT = [
    (IngestConfig(downscale=2.5, stride=3, start=1, count=5, cameras=["222200040", "220700191"],
                  color_correction=True, calibration_size=(2200, 3208), workers=4, decoder_threads=2, lock_timeout=9),
     "39c88951085a858e"),
    (CalibrateConfig(mode="colmap", timesteps=4, use_masks=True, subject_distance=1.2, threads=3, lock_timeout=1),
     "134daaa602fda4b5"),
    (MatteConfig(method="plate", plate_dir="/x/plates", high=12.0, workers=2, onnx_threads=1, preview_cameras=2,
                 preview_frames=1, lock_timeout=5),
     "d3394527f16f6093"),
    (DepthConfig(method="sweep", device="cpu", neighbours=4, window=9, workers=2, volume_mb=32, preview_cameras=2,
                 lock_timeout=3),
     "d77117ddff31a1f6"),
    (OptimizeConfig(preset="paper", steps=10, overrides={"hash.n_grids": 8, "rays_per_batch": 2048},
                    holdout_cameras=["222200040"], use_depth=False, scene_box=((-1, -1, -1), (1, 1, 1)), device="cpu",
                    encoding="torch", time_budget_s=5, checkpoint_every=3, checkpoint_every_s=60, resume=False, threads=2,
                    seed=7, lock_timeout=2),
     "7f052f0c816b7428"),
    (ExportConfig(turntable=False, holdout=True, path_cameras=["a", "b"], benchmark=True, benchmark_size=(550, 802),
                  radius_m=1.5, elevation_deg=10, arc_deg=90, background="transparent", eval_substeps=2, device="cpu",
                  chunk=1024, threads=1, lock_timeout=4),
     "05e1e55978eeab29"),
    # An unset eval_substeps (or holdout) stays out of the hash (records written before the option existed match).
    (ExportConfig(seconds=2.0, device="cuda"), "c25f45c868539395"),
    (EvaluateConfig(timesteps=3, lpips=False, eval_substeps=4, ground_truth="/x/gt.zarr", device="cpu", chunk=512,
                    threads=1),
     "1a811e13cde00a7c"),
    (EvaluateConfig(timesteps=0, chunk=1024), "6f14c0763112c928"),
]


@pytest.mark.parametrize("model", list(DEFAULT_HASHES), ids=lambda model: model.__name__)
def test_default_config_hash_is_unchanged(model: type) -> None:
    assert config_hash(model().result_fields()) == DEFAULT_HASHES[model]


@pytest.mark.parametrize("config, expected", NON_DEFAULT, ids=lambda value: type(value).__name__)
def test_non_default_config_hash_is_unchanged(config, expected: str) -> None:
    assert config_hash(config.result_fields()) == expected


@pytest.mark.parametrize("model", [ExportConfig, EvaluateConfig], ids=lambda model: model.__name__)
def test_unset_render_step_stays_out_of_the_hash(model: type) -> None:
    assert "eval_substeps" not in model().result_fields()
    assert model(eval_substeps=1).result_fields()["eval_substeps"] == 1
    assert config_hash(model(eval_substeps=1).result_fields()) != DEFAULT_HASHES[model]


def test_ledger_digest_is_unchanged() -> None:
    """reports/sequence.json's parameters_digest: the same for the one PipelineConfig as for the seven configs."""
    from flows.ledger import parameters_digest
    from stages.config import PipelineConfig

    assert parameters_digest(list(STAGES), PipelineConfig()) == "416fd142283148fc"
    assert parameters_digest(["ingest", "calibrate", "matte"], PipelineConfig()) == "12c2f2bd8294ddd9"
    # what the digest was before: the stage list and each stage's result fields
    configs = {name: model() for name, model in zip(STAGES, DEFAULT_HASHES)}
    assert digest_of(list(STAGES), {name: c.result_fields() for name, c in configs.items()}) == "416fd142283148fc"


# The hand-kept exclude lists the knob flags replaced (and knobs added since: optimize's checkpoint_every_s).
KNOBS = {
    IngestConfig: {"workers", "decoder_threads", "codec", "lock_timeout"},
    CalibrateConfig: {"threads", "lock_timeout"},
    MatteConfig: {"workers", "onnx_threads", "device", "preview_cameras", "preview_frames", "lock_timeout"},
    DepthConfig: {"device", "workers", "volume_mb", "preview_cameras", "lock_timeout"},
    OptimizeConfig: {"device", "encoding", "time_budget_s", "checkpoint_every", "checkpoint_every_s", "resume", "threads",
                     "lock_timeout"},
    ExportConfig: {"device", "chunk", "threads", "lock_timeout"},
    EvaluateConfig: {"device", "chunk", "threads", "lock_timeout"},
}


# Fields added after stores were written: out of the hash while unset (export's holdout is another field, a bool).
HASHED_WHEN_SET_FIELDS = {ExportConfig: {"eval_substeps"}, EvaluateConfig: {"eval_substeps"},
                          DepthConfig: {"holdout"}, OptimizeConfig: {"holdout"}}


@pytest.mark.parametrize("model", list(KNOBS), ids=lambda model: model.__name__)
def test_knob_flags_match_the_old_exclude_lists(model: type) -> None:
    assert model.knobs() == KNOBS[model]
    unset_late_fields = HASHED_WHEN_SET_FIELDS.get(model, set())
    assert set(model().result_fields()) == set(model.model_fields) - KNOBS[model] - unset_late_fields


@pytest.mark.parametrize("model", [DepthConfig, OptimizeConfig], ids=lambda model: model.__name__)
def test_an_unset_hold_out_request_stays_out_of_the_hash(model: type) -> None:
    """The hold-out request came with the hold-out protocol: unset, the default hashes stay as pinned."""
    assert "holdout" not in model().result_fields()
    assert model(holdout="none").result_fields()["holdout"] == ["none"]


def test_unknown_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="strde"):
        IngestConfig(strde=2)
