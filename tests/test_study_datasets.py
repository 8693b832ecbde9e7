"""Which datasets a study runs on: the settings' own first; Flickr8k settings bring their photos
into the calibration and generalisation studies, with openclipart across the photo / clip-art gap."""
from __future__ import annotations

from cmr.config import load_params
from cmr.studies import calibration, generalisation


def test_calibration_runs_on_the_settings_own_dataset_when_it_is_not_the_default(repo_root, shared_datasets,
                                                                                 monkeypatch):
    monkeypatch.setenv("CMR_SHARED_DATASETS", str(shared_datasets))
    photos = load_params(repo_root / "params" / "flickr8k.yaml")
    assert calibration.datasets(photos) == {"flickr8k": ("flickr8k", photos.data.source)}
    default = load_params(repo_root / "params.yaml")
    assert list(calibration.datasets(default)) == ["openclipart", "gcompris"]


def test_generalisation_pairs_flickr8k_and_openclipart_in_the_full_study(repo_root, shared_datasets, monkeypatch):
    monkeypatch.setenv("CMR_SHARED_DATASETS", str(shared_datasets))
    photos = load_params(repo_root / "params" / "flickr8k.yaml")
    sets = generalisation.datasets(photos)
    assert list(sets) == ["flickr8k", "openclipart", "gcompris", "tuxpaint"]
    assert sets["openclipart"] == ("openclipart", str(shared_datasets / "openclipart"))
    assert "openclipart" not in generalisation.datasets(photos, quick=True)  # the smoke run stays small
    default = load_params(repo_root / "params.yaml")
    assert list(generalisation.datasets(default)) == ["openclipart_mini", "flickr8k", "gcompris", "tuxpaint"]


def test_a_source_without_the_counterpart_folder_leaves_it_out(repo_root, tmp_path, monkeypatch):
    monkeypatch.setenv("CMR_SHARED_DATASETS", str(tmp_path))
    photos = load_params(repo_root / "params" / "flickr8k.yaml")
    assert list(generalisation.datasets(photos)) == ["flickr8k", "gcompris", "tuxpaint"]
