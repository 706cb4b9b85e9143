"""Several datasets in one manifest (``data.sources``): the data of radsynth's own multi-dataset base."""

import json

import numpy as np
import pytest
import yaml

from radsynth.configs import UserInputError, load_config
from radsynth.configs.schema import pooled_modality
from radsynth.flows.cli import main
from radsynth.generators.data import ConditioningSpec
from radsynth.pipelines.bases import check_compatible
from radsynth.pipelines.data.ingest import ingest
from radsynth.pipelines.data.manifest import CaseRecord, matches
from radsynth.pipelines.finetuning import matching_cases
from radsynth.pipelines.release.redaction import REDACTED, redacted_config
from radsynth.pipelines.release.stage import dataset_info

from .conftest import REPO, write_image_folder


def pooled_config(tmp_path, *overrides, edit=None):
    """Two image folders (one listing each row's modality and region) and a phantom cohort, pooled."""
    xray = write_image_folder(tmp_path / "xray", n_cases=12, seed=1)
    mixed = write_image_folder(tmp_path / "mixed", n_cases=8, seed=2)
    lines = (mixed / "manifest.csv").read_text().splitlines()
    rows = [lines[0] + ",modality,region"] + [f"{line},{'ct' if i % 2 else 'mri'},{'head' if i % 2 else 'knee'}"
                                              for i, line in enumerate(lines[1:])]
    (mixed / "manifest.csv").write_text("\n".join(rows) + "\n")
    folder = {"csv": "manifest.csv", "images_dir": "images", "id_column": "id", "patient_column": "patientid",
              "attribute_columns": ["sex"]}
    sources = [
        {"name": "xray", "format": "image_folder", "root": str(xray), "modality": "xray", "body_region": "chest",
         "label_names": {0: "background", 1: "lung"}, "image_folder": folder},
        {"name": "mixed", "format": "image_folder", "root": str(mixed), "train_only": True, "with_labels": False,
         "image_folder": {**folder, "masks_dir": None, "modality_column": "modality", "body_region_column": "region"}},
        {"name": "phantom", "format": "phantom", "with_labels": False,
         "phantom": {"kind": "chest_xray", "n_cases": 9, "size": 32}},
    ]
    data = {"name": "pool", "sources": sources, "preprocess": {"target_shape": [16, 16], "intensity": {"mode": "percentile"}},
            "split": {"seed": 0}}
    config = {"data": data, "conditioning": {"attributes": ["modality", "body_region", "sex"], "include_text": False},
              "runtime": {"output_dir": str(tmp_path / "run")}}
    if edit:
        edit(config)
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_config(path, list(overrides))


def single_config(tmp_path, root, *overrides):
    """The x-ray folder alone, split as the pool splits it (the default fractions; the cxr preset has its own)."""
    return load_config(REPO / "configs" / "cxr.yaml", [
        f"data.root={root}", "data.image_folder.attribute_columns=[sex]", "data.preprocess.target_shape=[16,16]",
        "data.split.train=0.7", "data.split.holdout=0.15", "data.split.test=0.15",
        "data.label_names={0: background, 1: lung}", "conditioning.attributes=[sex]",
        f"runtime.output_dir={tmp_path / 'alone'}", *overrides])


def test_pooled_sources_are_split_each_as_if_alone_with_prefixed_ids_and_lead_prompts(tmp_path):
    config = pooled_config(tmp_path)
    result = ingest(config, progress=False)
    records = {record.case_id: record for record in result.records}
    assert len(records) == 12 + 8 + 9
    assert {record.source for record in records.values()} == {"xray", "mixed", "phantom"}
    assert all(case_id.startswith(f"{record.source}.") and record.patient_id.startswith(f"{record.source}/")
               for case_id, record in records.items())

    # The x-ray source lands in the same splits as when it is ingested alone: a base pretrained on the pool has
    # seen none of that dataset's holdout and test patients.
    alone = {record.case_id: record.split for record in ingest(single_config(tmp_path, tmp_path / "xray"),
                                                                progress=False).records}
    assert {case_id.removeprefix("xray."): records[case_id].split for case_id in records
            if case_id.startswith("xray.")} == alone
    assert {split for split in alone.values()} == {"train", "holdout", "test"}
    # train_only: never a holdout, test or privacy reference.
    assert {record.split for record in records.values() if record.source == "mixed"} == {"train"}

    # Modality and region come from the rows' columns, lead the attributes and the prompt.
    mixed = records["mixed.img001"]
    assert (mixed.modality, mixed.body_region, mixed.label) == ("ct", "head", None)
    assert records["mixed.img000"].modality == "mri"
    prompt = ConditioningSpec(config.conditioning.attributes, include_text=False).prompt(mixed)
    assert prompt == f"modality: ct; body_region: head; sex: {mixed.attributes['sex']}."
    assert records["xray.img000"].label is not None and records["xray.img000"].label_names == {0: "background",
                                                                                                1: "lung"}
    assert all(record.label is None for record in records.values() if record.source != "xray")
    # Images without labels take the pool's one vocabulary; the summary names every modality.
    assert all(record.label_names == {0: "background", 1: "lung"} for record in records.values())
    assert result.summary["modality"] == {"xray": 12 + 9, "mri": 4, "ct": 4}
    assert pooled_modality(result.summary["modality"]) == "ct+mri+xray"
    assert {path.stem for path in result.cache_dir.glob("*.safetensors")} == set(records)

    # A rerun reads everything from the cache.
    assert ingest(config, progress=False).preprocessed == 0


def test_images_of_one_value_are_refused_or_skipped_and_counted(tmp_path):
    from radsynth.pipelines.data.io import write_png

    config = pooled_config(tmp_path)
    write_png(tmp_path / "mixed" / "images" / "img003.png", np.full((40, 36), 700, np.uint16))
    with pytest.raises(UserInputError, match="img003.png: empty image: every voxel is 700"):
        ingest(config, progress=False)
    assert not (tmp_path / "run" / "data" / "manifest.jsonl").exists()

    config.data.sources[1].skip_constant = True
    result = ingest(config, progress=False)
    assert "mixed.img003" not in {record.case_id for record in result.records}
    assert len(result.records) == 12 + 7 + 9
    assert result.summary["skipped_constant_images"] == {"mixed": 1}
    assert "mixed.img003" not in (tmp_path / "run" / "data" / "manifest.jsonl").read_text()


def test_max_cases_draws_whole_patients(tmp_path):
    def cap(config):
        config["data"]["sources"][0]["max_cases"] = 5
    records = ingest(pooled_config(tmp_path, edit=cap), progress=False).records
    xray = [record for record in records if record.source == "xray"]
    assert len(xray) == 4  # two cases per patient: two whole patients fit under 5
    patients = {record.patient_id for record in xray}
    assert all(sum(r.patient_id == p for r in xray) == 2 for p in patients)


def test_sources_with_different_label_vocabularies_are_refused_in_one_line(tmp_path, capsys):
    def relabel(config):
        mixed = config["data"]["sources"][1]
        mixed.update(with_labels=True, label_names={0: "background", 1: "tumour"})
        mixed["image_folder"]["masks_dir"] = "masks"
    config = pooled_config(tmp_path, edit=relabel)
    with pytest.raises(UserInputError, match=r"data.sources: the sources name their labels differently .*with_labels"):
        ingest(config, progress=False)
    assert not (tmp_path / "run" / "data" / "manifest.jsonl").exists()


def _shared_vocabulary(config):
    """The X-ray folder's 'lung' masks pooled with the chest phantoms' maps under one vocabulary named by the pool."""
    phantom = config["data"]["sources"][2]
    phantom["with_labels"] = True
    config["data"]["sources"][0]["label_names"] = {0: "background", 1: "Right Lung"}  # its masks are one lung here
    config["data"]["label_names"] = {0: "background", 1: "heart", 2: "right-lung"}


def test_sources_with_other_vocabularies_are_mapped_by_name_onto_the_pools(tmp_path):
    from safetensors.numpy import load_file

    from radsynth.pipelines.data.phantoms import generate_cohort

    config = pooled_config(tmp_path, edit=_shared_vocabulary)
    result = ingest(config, progress=False)
    by_source = {}
    for record in result.records:
        by_source.setdefault(record.source, []).append(record)
        assert record.label_names == {0: "background", 1: "heart", 2: "right-lung"}
    assert by_source["xray"][0].label_values == {0: 0, 1: 2}
    phantom = by_source["phantom"][0]
    assert phantom.label_values == {0: 0, 1: 2, 2: 0, 3: 1, 4: 0, 5: 0, 6: 0, 7: 0}  # left lung, findings: background
    cached = {r.case_id: load_file(str(result.cache_dir / f"{r.case_id}.safetensors"))["label"]
              for r in by_source["xray"] + by_source["phantom"]}
    assert set(np.unique(cached[by_source["xray"][0].case_id]).tolist()) == {0, 2}
    drawn = next(case for case in generate_cohort("chest_xray", 9, 0, size=32)
                 if f"phantom.{case.case_id}" == phantom.case_id)
    heart_share = (drawn.label == 3).mean()
    assert (cached[phantom.case_id] == 1).mean() == pytest.approx(heart_share, abs=0.03)  # the heart, resized to 16
    assert set(np.unique(cached[phantom.case_id]).tolist()) <= {0, 1, 2}


def test_a_pool_vocabulary_name_no_source_uses_is_refused(tmp_path):
    def unnamed(config):
        _shared_vocabulary(config)
        config["data"]["label_names"][3] = "spleen"
    config = pooled_config(tmp_path, edit=unnamed)
    with pytest.raises(UserInputError, match=r"data.label_names: no labelled source names \['spleen'\]"):
        ingest(config, progress=False)


@pytest.mark.parametrize("edit, expected", [
    (lambda c: c["data"]["sources"][1].update(name="xray"), "data.sources names must be unique; repeated: ['xray']"),
    (lambda c: c["data"].update(root="/somewhere"), "data.root is not used with data.sources"),
    (lambda c: c["data"].update(format="msd"), "data.sources (a list of datasets) goes with format 'sources'"),
    (lambda c: c["data"]["sources"][0].update(format="sources"), "data.sources.0.format"),
    (lambda c: c["data"]["sources"][0].update(modality=None), "data.modality (one of ct, mri, xray) or "
                                                              "data.image_folder.modality_column is required"),
])
def test_bad_pooled_configs_name_what_is_wrong(tmp_path, edit, expected):
    with pytest.raises(UserInputError) as caught:
        pooled_config(tmp_path, edit=edit)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_a_source_filter_keeps_the_cases_of_its_values_and_one_matching_none_exits_2(tmp_path, capsys):
    def head_ct_only(config):
        config["data"]["sources"][1]["filter"] = {"modality": "ct", "body_region": "head"}
    records = ingest(pooled_config(tmp_path / "kept", edit=head_ct_only), progress=False).records
    mixed = [record for record in records if record.source == "mixed"]
    assert len(mixed) == 4 and {(r.modality, r.body_region) for r in mixed} == {("ct", "head")}
    assert sum(record.source == "xray" for record in records) == 12  # the other sources as they were

    def nothing(config):
        config["data"]["sources"][1]["filter"] = {"modality": "xray"}
    pooled_config(tmp_path / "none", edit=nothing)
    assert main(["ingest", str(tmp_path / "none" / "pool.yaml")]) == 2
    error = capsys.readouterr().err.strip()
    assert "data.sources[mixed].filter: no case has {'modality': 'xray'}" in error and "\n" not in error
    assert not (tmp_path / "none" / "run" / "data" / "manifest.jsonl").exists()


def test_one_filter_rule_for_sources_and_fine_tunes_record_fields_and_attributes_compared_as_text():
    def case(case_id, modality, split, **attributes):
        return CaseRecord(case_id=case_id, patient_id=case_id, modality=modality, body_region="chest", image="x.png",
                          spacing=(1.0, 1.0), shape=(8, 8), attributes=attributes, split=split, source="s",
                          sha256="0")
    records = [case("a", "xray", "train", finding="nodule", age=3), case("b", "ct", "train", finding="nodule", age=4),
               case("c", "xray", "test", finding="nodule", age=3), case("d", "xray", "train", finding="none", age=3)]
    assert matches(records[0], {"modality": "xray", "finding": "nodule", "age": "3"})  # a YAML "3" is the manifest's 3
    assert matches(records[0], {"body_region": "chest", "age": 3})
    assert not matches(records[0], {"modality": "ct"}) and not matches(records[0], {"view": "PA"})
    # A fine-tune's filter reads record fields too (it read attributes alone before), and keeps train cases only.
    assert [r.case_id for r in matching_cases(records, {"modality": "xray", "finding": "nodule"}, 10)] == ["a"]
    assert [r.case_id for r in matching_cases(records, {"age": 3}, 1)] == ["a"]


def test_unknown_modality_in_a_modality_column_exits_2_with_the_row(tmp_path, capsys):
    config = pooled_config(tmp_path)
    mixed = tmp_path / "mixed" / "manifest.csv"
    mixed.write_text(mixed.read_text().replace(",ct,head", ",pet,head", 1))
    path = tmp_path / "pool.yaml"
    assert main(["ingest", str(path)]) == 2
    error = capsys.readouterr().err.strip()
    assert "manifest.csv:3: unknown modality 'pet' in column modality; one of ct, mri, xray" in error
    assert "\n" not in error
    assert config.data.sources and not (tmp_path / "run" / "data" / "manifest.jsonl").exists()


def test_a_pooled_base_takes_fine_tunes_of_its_modalities_only():
    base = {"modality": "mri+xray", "image_shape": (64, 64), "spacing": (4.0, 4.0), "intensity_low": 0.0,
            "intensity_high": 1.0, "class_attribute": None, "class_names": []}
    local = {**base, "modality": "xray"}
    check_compatible(base, local, set())
    with pytest.raises(UserInputError, match="the base generates mri\\+xray and the data is ct"):
        check_compatible(base, {**local, "modality": "ct"}, set())


def test_a_multi_modality_pool_is_not_released_and_its_roots_are_redacted(tmp_path):
    config = pooled_config(tmp_path)
    with pytest.raises(UserInputError, match="a multi-modality base is pretraining, not a dataset to release"):
        dataset_info(config, [], {"modality": {"xray": 21, "mri": 4, "ct": 4}})
    sources = redacted_config(config)["data"]["sources"]
    assert [source["root"] for source in sources[:2]] == [REDACTED, REDACTED]
    assert str(tmp_path) not in json.dumps(redacted_config(config))


@pytest.mark.parametrize("preset, modalities, train_only", [("base-2d", {"ct", "mri", "xray"}, "mednist"),
                                                            ("base-cxr", {"xray"}, "mednist"),
                                                            ("base-3d", {"ct", "mri"}, None)])
def test_base_presets_ingest_from_the_shared_data(shared_data, tmp_path, preset, modalities, train_only):
    config = load_config(REPO / "configs" / f"{preset}.yaml", [f"runtime.output_dir={tmp_path / 'run'}"])
    for source in config.data.sources:  # a few cases of each: the preset's wiring, not its size
        source.max_cases = 30  # MedNIST's seeded draw of 30 holds all three modalities
        source.phantom.n_cases = 6
        source.root = source.root and str(shared_data / source.root.rsplit("/", 1)[1])
    result = ingest(config, progress=False)
    assert set(result.summary["modality"]) == modalities
    assert result.summary["preprocessed_shape"] == config.data.preprocess.target_shape
    assert {record.source for record in result.records} == {source.name for source in config.data.sources}
    if train_only:
        assert {record.split for record in result.records if record.source == train_only} == {"train"}
    assert all(record.label is None for record in result.records)  # the presets pool images only


def test_a_label_value_outside_the_source_vocabulary_is_refused_before_mapping():
    from radsynth.pipelines.data.checks import pooled_label_values

    mapped = pooled_label_values(np.array([[0, 1], [3, 1]]), {0: 0, 1: 2, 3: 0}, "case.nii.gz")
    np.testing.assert_array_equal(mapped, [[0, 2], [0, 2]])
    with pytest.raises(UserInputError, match=r"case.nii.gz: label values \[5\] are not in the source's label map"):
        pooled_label_values(np.array([0, 1, 5]), {0: 0, 1: 2}, "case.nii.gz")


def test_the_chaos_translation_preset_pools_real_mri_and_ct_phantoms_under_one_vocabulary(shared_data, tmp_path):
    from safetensors.numpy import load_file

    config = load_config(REPO / "configs" / "translate-chaos.yaml", [f"runtime.output_dir={tmp_path / 'run'}"])
    chaos, phantom = config.data.sources
    chaos.root, phantom.phantom.n_cases = str(shared_data / "chaos-t2-abdomen-mri"), 4
    result = ingest(config, progress=False)
    assert result.summary["modality"] == {"mri": 20, "ct": 4}
    for record in result.records:
        labels = load_file(str(result.cache_dir / f"{record.case_id}.safetensors"))["label"]
        # Every organ of the vocabulary is drawn in every case, under the same value in both modalities.
        assert set(np.unique(labels).tolist()) == {0, 1, 2, 3, 4}, record.case_id
        liver, spleen = (labels == 1).mean(), (labels == 4).mean()
        assert liver > spleen, record.case_id  # value 1 is the liver (the larger organ) in both sources
        # Both in RAS, the patient's right (the liver) at high i: a mirrored source would teach a pooled model
        # two anatomies (the CT phantoms once were).
        sides = [np.argwhere(labels[0] == value)[:, 0].mean() for value in (1, 4)]
        assert sides[0] > sides[1], record.case_id


TINY_NETWORKS = ["autoencoder.channels=[8,16,16]", "autoencoder.norm_num_groups=8", "autoencoder.max_steps=2",
                 "autoencoder.batch_size=4", "diffusion.channels=[16,32,32]", "diffusion.norm_num_groups=8",
                 "diffusion.num_head_channels=8", "diffusion.batch_size=4", "diffusion.max_steps=2",
                 "diffusion.warmup_steps=1", "diffusion.validate_every=100", "conditioning.embed_dim=32"]


def _every_source_train_only(config):
    for source in config["data"]["sources"]:
        source["train_only"] = True


def test_a_base_of_train_only_sources_trains_and_says_its_autoencoder_was_not_measured(tmp_path, capsys):
    pooled_config(tmp_path, edit=_every_source_train_only)  # writes pool.yaml
    path = str(tmp_path / "pool.yaml")
    assert main(["ingest", path]) == 0
    assert main(["train", path, *TINY_NETWORKS]) == 0
    assert "autoencoder on holdout: not measured (no holdout cases)" in capsys.readouterr().out
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "autoencoder reconstruction: not measured (the data has no holdout cases)" in card


def test_a_frontier_over_train_only_sources_is_refused_before_training(tmp_path):
    from radsynth.pipelines.training import train, train_dir

    config = pooled_config(tmp_path, *TINY_NETWORKS, "diffusion.frontier_every=1", edit=_every_source_train_only)
    ingest(config, progress=False)
    with pytest.raises(UserInputError, match="data.split.holdout: the holdout split is empty"):
        train(config, progress=False)
    assert not (train_dir(config) / "autoencoder").exists()
