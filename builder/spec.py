"""The dataset spec: what a user asks for, validated at load time.

``load_spec(path)`` reads YAML or JSON; ``parse_spec(dict)`` validates a mapping. Any problem raises
``SpecError`` whose message names each bad field by its path, the bad value and what is allowed.
The full reference lives in README.md ("The dataset spec").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from builder.errors import SpecError

ENGINES = ("sandbox", "urllist", "duckduckgo", "bing", "wikimedia", "openverse", "google", "baidu")
EngineName = Literal["sandbox", "urllist", "duckduckgo", "bing", "wikimedia", "openverse",
                     "google", "baidu"]
ImageFormat = Literal["jpeg", "png", "webp", "gif", "bmp", "tiff"]
OutputFormat = Literal["parquet", "imagefolder", "webdataset"]
LabelFormat = Literal["json", "csv", "yaml", "txt"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ClassSpec(_Model):
    """One class: the queries that find it and how many accepted images it needs."""

    queries: list[str] = Field(default_factory=list)
    target: Optional[int] = Field(default=None, ge=1)
    urls: list[str] = Field(default_factory=list)

    @field_validator("queries", "urls", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [v]
        return v


class SourceSpec(_Model):
    """One search source. ``engine`` picks the implementation; the rest are its options."""

    engine: EngineName
    url: Optional[str] = None
    path: Optional[str] = None
    url_column: str = "url"
    label_column: str = "label"
    max_pages: int = Field(default=20, ge=1)
    per_page: int = Field(default=50, ge=1, le=500)
    region: str = "wt-wt"
    safesearch: Literal["on", "moderate", "off"] = "moderate"
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _needs(self) -> "SourceSpec":
        if self.engine == "urllist" and not self.path:
            raise ValueError("engine 'urllist' needs 'path' (a txt/csv/jsonl/parquet file of URLs)")
        if self.engine == "sandbox" and not self.url:
            raise ValueError("engine 'sandbox' needs 'url' (the sandbox web's base URL)")
        return self


class SearchSpec(_Model):
    """How the planner asks sources for candidates."""

    candidates_factor: float = Field(default=2.0, ge=1.0, le=100.0,
                                     description="candidates requested per missing image")


class DownloadSpec(_Model):
    timeout_s: float = Field(default=15.0, gt=0)
    max_bytes: int = Field(default=20_000_000, ge=1024)
    retries: int = Field(default=2, ge=0, le=10)
    backoff_s: float = Field(default=0.5, ge=0)
    max_retry_after_s: float = Field(default=30.0, ge=0)
    per_host_concurrency: int = Field(default=16, ge=1)
    per_host_delay_s: float = Field(default=0.0, ge=0)
    concurrency: int = Field(default=128, ge=1, description="fetches in flight per downloader")
    max_redirects: int = Field(default=5, ge=0)
    user_agent: str = "PixCrawler/0.1 (+https://github.com/pixcrawler/pixcrawler)"
    respect_robots: bool = True
    respect_optouts: bool = True
    allow_private_networks: bool = False


class ValidationSpec(_Model):
    level: Literal["fast", "medium", "slow"] = "medium"
    min_side: int = Field(default=64, ge=1)
    max_side: int = Field(default=16384, ge=1)
    max_aspect_ratio: float = Field(default=4.0, ge=1.0)
    max_pixels: int = Field(default=89_478_485, ge=1, description="decompression-bomb limit")
    formats: list[ImageFormat] = Field(default_factory=lambda: ["jpeg", "png", "webp", "gif"])
    animated: Literal["first_frame", "reject"] = "first_frame"
    near_duplicate_threshold: int = Field(default=4, ge=0, le=32)
    nsfw_threshold: float = Field(default=0.8, ge=0.0, le=1.0)
    clip_threshold: float = Field(default=0.2, ge=-1.0, le=1.0)

    @model_validator(mode="after")
    def _sides(self) -> "ValidationSpec":
        if self.min_side > self.max_side:
            raise ValueError(f"min_side ({self.min_side}) is above max_side ({self.max_side})")
        return self


class ResizeSpec(_Model):
    max_side: int = Field(ge=8)
    mode: Literal["keep_ratio", "center_crop"] = "keep_ratio"


class EncodeSpec(_Model):
    format: Literal["jpeg", "webp"] = "jpeg"
    quality: int = Field(default=90, ge=1, le=100)


class OutputSpec(_Model):
    uri: Optional[str] = None
    formats: list[OutputFormat] = Field(default_factory=lambda: ["parquet", "imagefolder"])
    label_formats: list[LabelFormat] = Field(default_factory=lambda: ["json", "csv", "yaml",
                                                                        "txt"])
    splits: dict[str, float] = Field(default_factory=lambda: {"train": 0.8, "val": 0.1,
                                                               "test": 0.1})
    shard_size: int = Field(default=1000, ge=1, description="images per Parquet/tar shard")
    resize: Optional[ResizeSpec] = None
    encode: Optional[EncodeSpec] = None
    overwrite: bool = False

    @field_validator("splits")
    @classmethod
    def _splits(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("needs at least one split, e.g. {train: 1.0}")
        if any(f < 0 for f in v.values()):
            raise ValueError("split fractions must be >= 0")
        total = sum(v.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1.0, got {total:g}")
        for name in v:
            if not name or "/" in name:
                raise ValueError(f"bad split name {name!r}")
        return v


class ResourcesSpec(_Model):
    """Ray resources. ``None`` means: size from the cluster (see README, 'Resources')."""

    download_actors: Optional[int] = Field(default=None, ge=1)
    download_cpus: float = Field(default=0.25, gt=0)
    hash_actors: Optional[int] = Field(default=None, ge=1)
    hash_cpus: float = Field(default=1.0, gt=0)
    search_workers: int = Field(default=2, ge=1)
    batch_size: int = Field(default=64, ge=1)
    max_in_flight_batches: Optional[int] = Field(default=None, ge=1)
    gpu_actors: int = Field(default=1, ge=1)
    gpus_per_actor: float = Field(default=0.0, ge=0)
    gpu_batch_size: int = Field(default=128, ge=1)
    on_no_gpu: Literal["cpu", "fail"] = "cpu"


class DatasetSpec(_Model):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    target: int = Field(default=100, ge=1, description="default target per class")
    classes: dict[str, ClassSpec]
    sources: list[SourceSpec] = Field(default_factory=list)
    search: SearchSpec = Field(default_factory=SearchSpec)
    download: DownloadSpec = Field(default_factory=DownloadSpec)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)

    @field_validator("classes", mode="before")
    @classmethod
    def _classes(cls, v: Any) -> Any:
        if isinstance(v, dict):
            out = {}
            for label, body in v.items():
                if body is None:
                    body = {}
                elif isinstance(body, (str, list)):
                    body = {"queries": body}
                out[label] = body
            return out
        if isinstance(v, list):
            return {str(label): {} for label in v}
        return v

    @model_validator(mode="after")
    def _check(self) -> "DatasetSpec":
        if not self.classes:
            raise ValueError("classes: needs at least one class")
        for label in self.classes:
            if not label or "\\" in label or any(part in ("", ".", "..")
                                                   for part in label.split("/")):
                raise ValueError(f"classes: bad class label {label!r}")
        if not self.sources and not any(c.urls for c in self.classes.values()):
            raise ValueError("sources: needs at least one source (or per-class 'urls')")
        return self

    def target_of(self, label: str) -> int:
        return self.classes[label].target or self.target

    def queries_of(self, label: str) -> list[str]:
        """A class with no queries searches by its own name."""
        return self.classes[label].queries or [label.replace("/", " ").replace("_", " ")]

    @property
    def labels(self) -> list[str]:
        return list(self.classes)

    def output_uri(self) -> str:
        return self.output.uri or f"./datasets/{self.name}"


def _allowed_for(loc: tuple, err: dict) -> str:
    """The allowed values for a Literal field, read from the model, for the error message."""
    ctx = err.get("ctx") or {}
    if "expected" in ctx:
        return str(ctx["expected"])
    return ""


def _format_errors(exc: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and
                                                              p.startswith("function-")))
        value = err.get("input")
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
            parent = _model_at(err["loc"][:-1])
            if parent is not None:
                msg += "; valid fields: " + ", ".join(parent.model_fields)
        elif err["type"] in ("literal_error", "enum"):
            msg = f"{value!r} is not valid; allowed: {_allowed_for(err['loc'], err)}"
        elif err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        elif not isinstance(value, (dict, list)) and value is not None:
            msg = f"{msg} (got {value!r})"
        problems.append((path or "(top level)", msg))
    return problems


def _model_at(loc: tuple) -> Optional[type[BaseModel]]:
    """The model class at a location path in DatasetSpec, for listing its valid fields."""
    model: Any = DatasetSpec
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(str(part))
        if field is None:
            if model is DatasetSpec or model is None:
                return None
            return None
        ann = field.annotation
        model = _unwrap(ann)
        if model is None and str(part) == "classes":
            model = ClassSpec
    if isinstance(model, type) and issubclass(model, BaseModel):
        return model
    return None


def _unwrap(ann: Any) -> Any:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in get_args(ann):
        found = _unwrap(arg)
        if found is not None:
            return found
    return None


def parse_spec(data: Any, source: str = "spec") -> DatasetSpec:
    """Validate a mapping as a DatasetSpec, raising SpecError with every problem listed."""
    if not isinstance(data, dict):
        raise SpecError([("(top level)", f"a spec is a mapping, got {type(data).__name__}")],
                        source)
    try:
        return DatasetSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_format_errors(exc), source) from None


def loads_spec(text: str, source: str = "spec") -> DatasetSpec:
    """Parse YAML (a superset of JSON) text as a spec."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError([("(file)", f"not valid YAML/JSON: {exc}")], source) from None
    return parse_spec(data, source)


def load_spec(path: Union[str, Path]) -> DatasetSpec:
    """Load a spec from a .yaml/.yml/.json file."""
    p = Path(path)
    if not p.is_file():
        raise SpecError([("(file)", f"no such file: {p}")], str(p))
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecError([("(file)", f"not valid JSON: {exc}")], str(p)) from None
        return parse_spec(data, str(p))
    return loads_spec(text, str(p))
