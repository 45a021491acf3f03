"""The operator's policy for the HTTP API: what a remote user may put in a spec.

A spec submitted through the API (JSON or YAML) is checked against ``ApiPolicy`` after it
validates and before a job is stored or started. The CLI on one's own machine is not: there the
user is the operator. The defaults are safe for a server that strangers reach:

- **Outputs** go under a prefix per API key (``output_prefix``, default
  ``<data_dir>/datasets/{owner}``, ``{owner}`` being the key's id). ``output.uri`` is a path
  relative to it (``pets`` -> ``<prefix>/pets``; none -> ``<prefix>/<job id>``), or a URI
  already under it. An absolute path, another scheme (``file://``, ``s3://``), ``..`` or another
  key's prefix is refused, so ``overwrite`` can only ever replace one's own dataset.
- **Local files**: a ``urllist`` source's ``path`` only under ``url_list_dirs`` (default: none).
  URL lists come in the request body instead, as each class's ``urls``.
- **Endpoints**: ``sources[].url`` and ``sources[].options.base_url`` only under
  ``source_urls``, ``search.llm_base_url`` only under ``llm_base_urls``, ``options.proxy`` only
  with ``allow_proxy``, ``download.allow_private_networks`` only with
  ``allow_private_networks`` (or, with ``private_network_sources``, for a spec that fetches
  only what those sources find), models other than the spec's defaults only from ``models``
  (a model name can be a local path), and ``search.llm_model`` on the server's own LLM
  endpoint only from ``llm_models``, and keyword expansion (``search.expand``: a call per
  class) on the server's own LLM endpoint only with ``allow_expand``.
- **Opt-outs and identity**: the fetches go out from the operator's addresses, so turning off
  ``download.respect_robots``, ``download.respect_optouts`` or an honoured
  ``download.signals.*`` (or narrowing ``signals.usage`` to ``train-ai``) needs
  ``allow_ignore_optouts``, and a ``download.user_agent`` other than the default must be in
  ``user_agents`` (default: none), so a job can neither ignore a site's AI opt-outs nor claim
  to be another crawler. ``download.contact`` stays the user's to set.
- **Caps** on targets, classes, total images, download concurrency, per-host concurrency and
  delay (``download.hosts`` included, where a host with a built-in profile may only be made
  politer), ``max_bytes``, ``max_pixels``, the timeout, retries, backoff and Retry-After wait of
  a fetch, what a worker buffers before it writes (``output.shard_size``,
  ``resources.max_buffered_mb``) and what it holds while it works: the bodies it reads at once
  (``download.max_bytes_in_flight``), the images its running units hold
  (``resources.max_held_mb``), the candidates of a unit (``resources.batch_size``; a
  unit holds its validated images until it is decided), the units it runs at once
  (``resources.max_in_flight_batches``) and the images a scorer takes at once
  (``resources.gpu_batch_size``). A value set above a cap is refused; a field left unset whose
  default is above the cap takes the cap. Left unset, the batch size and the units in flight are
  sized from the job; where that size (a URL list's grown slices included) is above the cap,
  the job runs at the cap.
- **Resources**: each job's pools are sized to its share of the cluster (``job_cpus``, default:
  the cluster's CPUs / ``max_running_jobs``; see ``serve.schedule`` for the order jobs start
  in). Pool sizes a user sets must fit in that share, each shard worker and scorer with at
  least ``min_actor_cpus`` (the per-worker caps above count once per worker, so CPUs split
  thinner would multiply them). ``resources.worker_resources`` may only
  name the custom Ray resources in ``worker_resources`` (default: none), so a job can neither
  pin its workers to a node (``node:<ip>``) nor claim resources the operator reserved. A
  running job is stopped after ``max_job_hours`` (``serve.jobs.Reconciler``).

A refused spec raises ``PolicyRefused``: 403 when a field asks for something the policy does not
permit, 422 when a value is over a cap; each problem names the field and the policy setting.
"""

from __future__ import annotations

import math
import os
import re
import stat
import unicodedata
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator
from yarl import URL

from actors.options import plan_pools
from builder.expand import operator_endpoint, same_endpoint
from builder.netguard import check_url
from builder.ratelimit import DEFAULT_LIMITS, SHARED_LIMIT_KEYS, EngineLimits
from builder.pipeline import units_per_worker
from builder.spec import (
    MAX_BATCH,
    DatasetSpec,
    DownloadSpec,
    ResourcesSpec,
    SignalsSpec,
    ValidationSpec,
    parse_spec,
)
from builder.storage import is_local_uri

OWNER = "{owner}"
_DEFAULT_PORTS = {"http": 80, "https": 443}
# One part of a relative output path: what a dataset name may be (see DatasetSpec.name).
_OUTPUT_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
# The resources fields that size a job's pools (a user who sets one must fit in the share).
POOL_FIELDS = ("workers", "worker_cpus", "dedup_partitions", "gpu_actors", "gpus_per_actor",
               "gpu_actor_cpus")


def _default(model: type[BaseModel], name: str) -> Any:
    return model.model_fields[name].default


class ApiPolicy(BaseModel):
    """What API users may set (``policy`` in the serve config; see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    output_prefix: Optional[str] = Field(
        default=None, description="where each key's datasets go, with {owner} (the key's id) "
        "as a path part of its own: a local directory or any fsspec URI (s3://bucket/{owner}); "
        "default <data_dir>/datasets/{owner}")
    url_list_dirs: list[str] = Field(
        default_factory=list, description="local directories a urllist source's path may read "
        "from (a relative path is taken in the first); {owner} in one is the key's id, so that "
        "each key reads only its own (lists/{owner}); none by default")
    source_urls: list[str] = Field(
        default_factory=list, description="http(s) URL prefixes that sources[].url and "
        "sources[].options.base_url may name; none by default")
    llm_base_urls: list[str] = Field(
        default_factory=list, description="http(s) URL prefixes search.llm_base_url may name; "
        "none by default")
    llm_models: list[str] = Field(
        default_factory=list, description="search.llm_model values a job may ask of the "
        "server's own LLM endpoint (and key), whether its spec leaves llm_base_url unset or "
        "names that endpoint; none by default: the server's model")
    allow_expand: bool = Field(
        default=False, description="search.expand: true on the server's own LLM endpoint "
        "and key (a call per class); a spec naming another llm_base_url under llm_base_urls "
        "needs no more")
    allow_proxy: bool = Field(default=False, description="sources[].options.proxy (the "
                              "search engines' requests then go through the proxy a spec "
                              "names; without allow_private_networks a proxy given as a "
                              "private address or localhost is refused, but a name that "
                              "resolves to one is not checked: allow only where the "
                              "server's network has nothing a proxy request could reach)")
    allow_engine_limits: bool = Field(
        default=False, description="sources[].options rate, burst, min_rate, "
        "failure_threshold, cooldown_s and max_requests_per_day: every job of an engine "
        "shares one rate limiter, so these change it for every other job of the engine "
        "(max_requests_per_job, a job's own cap, is always allowed)")
    allow_private_networks: bool = Field(
        default=False, description="download.allow_private_networks: true (the fetcher may "
        "then reach loopback and private addresses, such as this server's own)")
    private_network_sources: list[str] = Field(
        default_factory=list, description="http(s) URL prefixes of search sources whose "
        "results may be fetched from private addresses: download.allow_private_networks: true "
        "is allowed for a spec whose every source's engine asks a server under one of them "
        "(a sandbox's url, or the options.base_url of wikimedia, openverse, google or baidu), "
        "reads no URL-list file, and whose classes list no urls of their own "
        "(pixcrawler serve --demo puts its sandbox web here)")
    models: list[str] = Field(
        default_factory=list, description="validation.clip_model / nsfw_model values allowed "
        "besides the spec's defaults")
    allow_ignore_optouts: bool = Field(
        default=False, description="download.respect_robots: false, respect_optouts: false, "
        "a download.signals.* switch turned off or signals.usage narrowed (the fetcher then "
        "ignores those opt-outs, from this server's addresses)")
    user_agents: list[str] = Field(
        default_factory=list, description="download.user_agent values allowed besides the "
        "spec's default; none by default (a User-Agent can claim to be another crawler)")
    max_pages: int = Field(default=50, ge=1, description="sources[].max_pages of a search "
                           "engine: each page is one request or more from the server's "
                           "addresses, drawn from the engine's budget that every job shares "
                           "(a URL list's pages are lines of a file, and not capped)")
    max_budget_share: float = Field(
        default=0.25, gt=0, le=1, description="the share of an engine's daily request budget "
        "(openverse 200, google 100) one job may spend, split between its sources of that "
        "engine as each one's options.max_requests_per_job (a source that sets a higher one "
        "is refused): every job and key shares the budget, so without a cap one job could "
        "spend the day's searches of every other")
    max_candidates_factor: float = Field(default=4.0, ge=1.0, description="search."
                                         "candidates_factor: candidates asked for per image "
                                         "still missing, each one a download")
    max_sources: int = Field(default=16, ge=1, description="sources in one spec: each "
                             "search engine's is a budget of requests from the server's "
                             "addresses and, on Ray, a limiter actor")
    max_classes: int = Field(default=1000, ge=1)
    max_target: int = Field(default=10_000, ge=1, description="accepted images per class")
    max_images: int = Field(default=100_000, ge=1, description="the targets of all classes")
    max_job_gb: float = Field(
        default=500.0, gt=0, description="the most a job may write, in GB: the classes' "
        "targets x download.max_bytes x its output formats that hold images. Left unset, "
        "download.max_bytes is lowered to fit (not under 256 KiB); a larger one set by the "
        "spec is refused. Every job writes to this server's storage. A copy re-encoded by "
        "output.encode can be larger than its download: that is not bounded")
    max_download_concurrency: int = Field(default=_default(DownloadSpec, "concurrency"), ge=1)
    max_per_host_concurrency: int = Field(
        default=_default(DownloadSpec, "per_host_concurrency"), ge=1)
    max_bytes: int = Field(default=_default(DownloadSpec, "max_bytes"), ge=1024)
    max_pixels: int = Field(default=_default(ValidationSpec, "max_pixels"), ge=1)
    max_timeout_s: float = Field(default=60.0, gt=0, description="download.timeout_s")
    max_deadline_s: float = Field(default=300.0, gt=0, description="download.deadline_s")
    max_retries: int = Field(default=5, ge=0, description="download.retries")
    max_backoff_s: float = Field(default=10.0, ge=0, description="download.backoff_s")
    max_retry_after_s: float = Field(default=60.0, ge=0,
                                     description="download.max_retry_after_s")
    max_per_host_delay_s: float = Field(
        default=10.0, ge=0, description="download.per_host_delay_s and download.hosts.*.delay_s")
    max_shard_size: int = Field(default=10_000, ge=1, description="output.shard_size: the rows "
                                "a worker holds before it writes a shard")
    max_buffered_mb: int = Field(default=2048, ge=16, description="resources.max_buffered_mb: "
                                 "what a worker holds of accepted images before it writes")
    max_bytes_in_flight: int = Field(
        default=_default(DownloadSpec, "max_bytes_in_flight"), ge=65_536,
        description="download.max_bytes_in_flight: the bodies a worker reads at once")
    max_held_mb: int = Field(default=2048, ge=0, description="resources.max_held_mb: the "
                             "images a worker's running units hold until each is decided")
    max_batch_size: int = Field(
        default=MAX_BATCH, ge=1, description="resources.batch_size: the candidates of a unit, "
        "whose validated images a worker holds until the unit is decided; unset, the size "
        "from the job (a URL list's grown slices included) is held to it")
    max_in_flight_batches: int = Field(
        default=8, ge=1, description="resources.max_in_flight_batches: units a worker runs at "
        "once; unset, the number sized from download.concurrency is held to it")
    max_gpu_batch_size: int = Field(
        default=_default(ResourcesSpec, "gpu_batch_size"), ge=1,
        description="resources.gpu_batch_size: images a slow-level scorer takes at once")
    worker_resources: list[str] = Field(
        default_factory=list, description="custom Ray resources resources.worker_resources may "
        "name; none by default (a node:<ip> resource would pin a job's workers to that node)")
    max_running_jobs: int = Field(default=2, ge=1, description="API jobs running at once in "
                                  "the cluster; the rest wait, queued")
    max_running_jobs_per_key: int = Field(default=1, ge=1)
    max_job_hours: Optional[float] = Field(default=24.0, gt=0, description="a running API "
                                           "job is stopped after this long (its partial "
                                           "dataset published); null: no limit")
    min_actor_cpus: float = Field(
        default=0.25, gt=0, description="resources.worker_cpus and gpu_actor_cpus (slow level) "
        "a user sets are at least this: each worker has its own fetcher and buffers and each "
        "scorer its own models, so it bounds how many a job's share of the CPUs holds")
    job_cpus: Optional[float] = Field(
        default=None, gt=0, description="CPUs one job's pools are sized to (at most what the "
        "cluster has beside the API's replicas); default: those CPUs / max_running_jobs")

    @field_validator("output_prefix")
    @classmethod
    def _owner_part(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return v
        path = v.split("://", 1)[1] if "://" in v else v
        parts = path.rstrip("/").split("/")
        if "://" in v:
            parts = parts[1:]  # the host or bucket is not a place for it
        if parts.count(OWNER) != 1 or v.count(OWNER) != 1:
            raise ValueError(f"must hold {OWNER} once, as a path part of its own (e.g. "
                             f"/srv/pixcrawler/{OWNER} or s3://bucket/datasets/{OWNER}), so "
                             f"each API key writes under its own prefix; got {v!r}")
        return v.rstrip("/")

    @field_validator("source_urls", "llm_base_urls", "private_network_sources")
    @classmethod
    def _http_prefixes(cls, v: list[str]) -> list[str]:
        for url in v:
            parts = urlsplit(url)
            if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
                raise ValueError(f"{url!r} is not an http(s) URL with a host")
        return v

    def resolved(self, data_dir: str) -> "ApiPolicy":
        """Absolute locations: the output prefix (default under ``data_dir``; a relative
        local one is taken there too) and the url_list_dirs, symbolic links resolved."""
        prefix = self.output_prefix or f"{data_dir.rstrip('/')}/datasets/{OWNER}"
        if is_local_uri(prefix) and not prefix.startswith("file:") and \
                not os.path.isabs(prefix):
            prefix = os.path.join(data_dir, prefix)
        dirs = [os.path.realpath(os.path.join(data_dir, d)) for d in self.url_list_dirs]
        return self.model_copy(update={"output_prefix": prefix, "url_list_dirs": dirs})

    def prefix_for(self, owner: str) -> str:
        """The output prefix of one API key (``resolved`` first)."""
        return (self.output_prefix or "").replace(OWNER, owner)

    def url_list_dirs_for(self, owner: str) -> list[str]:
        """The directories one API key's URL lists may be read from (``resolved`` first):
        ``{owner}`` in a directory is the key's id, symbolic links resolved after it."""
        return [os.path.realpath(d.replace(OWNER, owner)) if OWNER in d else d
                for d in self.url_list_dirs]

    def job_share(self, cluster: Mapping[str, float]) -> dict[str, float]:
        """The CPUs (and GPUs, where the cluster has some) one job's pools are sized to."""
        cpus = float(cluster.get("CPU", 1.0))
        share = {"CPU": min(self.job_cpus, cpus) if self.job_cpus else cpus / self.max_running_jobs}
        if cluster.get("GPU"):
            share["GPU"] = float(cluster["GPU"]) / self.max_running_jobs
        return share


@dataclass(frozen=True)
class Refusal:
    """One refused field: its path in the spec, the policy setting, and why. ``forbidden``:
    a permission the policy does not give (403); else a value over a cap (422)."""

    field: str
    setting: str
    message: str
    forbidden: bool


class PolicyRefused(Exception):
    """A spec the API policy does not accept; ``problems`` lists every refused field."""

    def __init__(self, problems: list[Refusal]):
        self.problems = problems
        super().__init__("; ".join(f"{p.field}: {p.message}" for p in problems))

    @property
    def status(self) -> int:
        return 403 if any(p.forbidden for p in self.problems) else 422


def _dot_segment(path: str) -> bool:
    """Whether a path has a '.' or '..' segment, however often percent-encoded, before any
    ';' parameters."""
    for _ in range(4):
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    else:
        return True  # still encoded after four rounds: no server means that innocently
    return any(segment.split(";", 1)[0] in (".", "..") for segment in path.split("/"))


def url_within(url: str, prefixes: Iterable[str]) -> bool:
    """Whether ``url`` is an http(s) URL under one of ``prefixes``: the same scheme, host and
    port, and a path at or below the prefix's (compared by whole segments). A URL with user
    info, whitespace, a backslash, a control character or a '.' / '..' segment (percent-encoded
    once or more, or with ';' parameters, as some servers read ``..;``) is never within:
    parsers disagree on such URLs."""
    if any(ch.isspace() or ch == "\\" or unicodedata.category(ch) == "Cc" for ch in url):
        return False
    try:
        parts = urlsplit(url)
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return False
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or parts.username is not None \
            or parts.password is not None:
        return False
    if _dot_segment(parts.path):
        return False
    for prefix in prefixes:
        allowed = urlsplit(prefix)
        base = allowed.path.rstrip("/")
        if (parts.scheme, parts.hostname, port) == (
                allowed.scheme, allowed.hostname,
                allowed.port or _DEFAULT_PORTS.get(allowed.scheme)) and \
                (not base or parts.path == base or parts.path.startswith(base + "/")):
            return True
    return False


def place_output(uri: Optional[str], prefix: str, job_id: str) -> tuple[str, Optional[Refusal]]:
    """Where a job's output goes under ``prefix``: ``(uri, None)``, or ``("", refusal)``."""
    if not uri:
        return f"{prefix}/{job_id}", None
    example = f"give a path relative to your output prefix {prefix}, e.g. 'pets' (written to " \
              f"{prefix}/pets)"
    if uri == prefix or uri.startswith(prefix + "/"):
        rest = uri[len(prefix) + 1:]
    elif uri.startswith(("/", "~")) or _SCHEME.match(uri):
        return "", Refusal("output.uri", "output_prefix", f"{uri!r} is outside your output "
                           f"prefix: {example}", True)
    else:
        rest = uri
    parts = [p for p in rest.split("/") if p not in ("", ".")]
    if ".." in parts:
        return "", Refusal("output.uri", "output_prefix", f"{uri!r}: '..' would leave your "
                           f"output prefix; {example}", True)
    bad = [p for p in parts if not _OUTPUT_PART.fullmatch(p)]
    if bad or not parts:
        return "", Refusal("output.uri", "output_prefix", f"{uri!r}: each part of an output "
                           "path is a name of letters, digits, '.', '_' and '-' that starts "
                           f"with a letter or digit (not {bad[0]!r}); {example}" if bad else
                           f"{uri!r} names your output prefix itself; {example}", False)
    return f"{prefix}/{'/'.join(parts)}", None


def place_url_list(path: str, dirs: list[str]) -> Optional[str]:
    """The real path of a urllist file if it lies in one of ``dirs`` (real paths), else None.
    A relative path is taken in the first directory."""
    if not dirs:
        return None
    real = os.path.realpath(path if os.path.isabs(path) else os.path.join(dirs[0], path))
    for directory in dirs:
        if real == directory or real.startswith(directory.rstrip(os.sep) + os.sep):
            return real
    return None


class _Check:
    """Collects the refusals and the changes (dotted path -> value) for one spec."""

    def __init__(self, spec: DatasetSpec):
        self.spec = spec
        self.refusals: list[Refusal] = []
        self.changes: dict[str, Any] = {}

    def forbid(self, field: str, setting: str, message: str) -> None:
        self.refusals.append(Refusal(field, setting, message, True))

    def over(self, field: str, setting: str, message: str) -> None:
        self.refusals.append(Refusal(field, setting, message, False))

    def over_cap(self, field: str, setting: str, value: Any, cap: float) -> None:
        self.over(field, setting, f"{value} is over this server's limit {cap} ({setting})")

    def cap(self, section: str, name: str, setting: str, cap: float) -> None:
        """A value set above ``cap`` is refused; an unset default above it takes the cap. An
        unset None (sized from the job) is held to the cap by ``_hold_sizes``."""
        self.cap_field(getattr(self.spec, section), section, name, setting, cap)

    def cap_field(self, model: BaseModel, at: str, name: str, setting: str,
                  cap: float) -> None:
        """``cap`` on the field ``name`` of ``model``, which the spec holds at ``at``."""
        value = getattr(model, name)
        if value is None or value <= cap:
            return
        if name in model.model_fields_set:
            self.over_cap(f"{at}.{name}", setting, value, cap)
        else:
            self.changes[f"{at}.{name}"] = cap


def _share_budgets(check: _Check, spec: DatasetSpec, policy: ApiPolicy) -> None:
    """Hold each engine's sources with a daily budget to ``max_budget_share`` of it, split
    between them (each source of an engine counts its own ``max_requests_per_job``). The
    budget is the server's: a spec allowed to set its own (``allow_engine_limits``) may
    lower it, never lift it or take it away."""
    by_engine: dict[str, list[tuple[int, Optional[int], int]]] = {}
    for i, src in enumerate(spec.sources):
        server = DEFAULT_LIMITS.get(src.engine, EngineLimits()).max_requests_per_day
        days = [d for d in (server, src.options.get("max_requests_per_day")) if d is not None]
        if days:
            by_engine.setdefault(src.engine, []).append(
                (i, src.options.get("max_requests_per_job"), min(days)))
    for engine, sources in sorted(by_engine.items()):
        allowed = math.floor(policy.max_budget_share * min(day for _, _, day in sources))
        each = allowed // len(sources)
        if each < 1:
            check.over("sources", "max_budget_share", f"{len(sources)} {engine} sources are "
                       f"more than the {allowed} requests a job may spend of {engine}'s daily "
                       f"budget on this server (max_budget_share); list fewer")
            continue
        for i, own, _ in sources:
            field = f"sources.{i}.options.max_requests_per_job"
            if own is None:
                check.changes[field] = each
            elif own > each:
                check.over(field, "max_budget_share", f"{own} is over the {each} requests this "
                           f"source may spend of {engine}'s daily budget, which every job "
                           f"shares (this server's max_budget_share, split between the job's "
                           f"{len(sources)} {engine} source(s))")


def _apply(data: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    for dotted, value in changes.items():
        node: Any = data
        *path, last = dotted.split(".")
        for key in path:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value
    return data


def _target_field(spec: DatasetSpec, label: str, flat: set[str]) -> str:
    if label in flat and spec.classes[label].target is not None:
        return f"classes.{label}.target"
    if label in flat:
        return "target"
    return "categories." + ".".join(spec.levels_of(label))


def apply_policy(policy: ApiPolicy, spec: DatasetSpec, owner: str, job_id: str,
                 cluster: Mapping[str, float]) -> DatasetSpec:
    """``spec`` as the API runs it for ``owner``: its output placed under the owner's prefix,
    url-list paths resolved, unset values above a cap lowered to it, pools sized to the job's
    share of ``cluster`` (what jobs can have: the total less the API's replicas). Raises
    ``PolicyRefused`` listing every field the policy refuses. ``policy`` must be
    ``resolved``."""
    check = _Check(spec)

    uri, refusal = place_output(spec.output.uri, policy.prefix_for(owner), job_id)
    if refusal:
        check.refusals.append(refusal)
    check.changes["output.uri"] = uri

    for i, src in enumerate(spec.sources):
        at = f"sources.{i}"
        if src.path:
            dirs = policy.url_list_dirs_for(owner)
            real = place_url_list(src.path, dirs)
            if real is None:
                where = f"only files in {', '.join(dirs)}" if dirs else "no files of the server"
                check.forbid(f"{at}.path", "url_list_dirs", f"{src.path!r}: this server lets "
                             f"API users read {where}; send the URLs in the request as each "
                             "class's urls: (classes: {cat: {urls: [...]}})")
            else:
                check.changes[f"{at}.path"] = real
                # the job reads this file and no other: a link put in its place later (the
                # folder is the key user's to write) would have it read any file the server can
                try:
                    found = os.stat(real)
                except OSError as exc:
                    check.forbid(f"{at}.path", "url_list_dirs", f"{src.path!r}: cannot be read "
                                 f"here ({exc.strerror}); upload the list before the job")
                else:
                    if stat.S_ISREG(found.st_mode):
                        check.changes[f"{at}.path_inode"] = found.st_ino
                    else:
                        check.forbid(f"{at}.path", "url_list_dirs", f"{src.path!r} is not a "
                                     "file; name one URL list file")
        for field, url in ((f"{at}.url", src.url),
                           (f"{at}.options.base_url", src.options.get("base_url"))):
            if url is not None and not (isinstance(url, str) and
                                        url_within(url, policy.source_urls)):
                allowed = ", ".join(policy.source_urls) or "none"
                check.forbid(field, "source_urls", f"{url!r} is not an endpoint this server "
                             f"lets API users name (allowed prefixes: {allowed})")
        timeout = src.options.get("timeout_s")
        if timeout not in (None, ""):
            try:  # as the engine reads it (registry_web._number): "600" is 600 s
                seconds = float(timeout)
            except (TypeError, ValueError, OverflowError):
                seconds = math.inf
            if not seconds <= policy.max_timeout_s:  # a NaN too
                check.over_cap(f"{at}.options.timeout_s", "max_timeout_s", timeout,
                               policy.max_timeout_s)
        if src.engine != "urllist":
            check.cap_field(src, at, "max_pages", "max_pages", policy.max_pages)
        if not policy.allow_engine_limits:
            for key in sorted(k for k in src.options if k in SHARED_LIMIT_KEYS):
                check.forbid(f"{at}.options.{key}", "allow_engine_limits", "every job of an "
                             "engine shares one rate limiter (and its daily budget), so a "
                             "job's limits would be every other job's; this server keeps its "
                             "own (options.max_requests_per_job caps a job's own searches)")
        proxy = src.options.get("proxy")
        if proxy not in (None, "") and not policy.allow_proxy:
            check.forbid(f"{at}.options.proxy", "allow_proxy", "this server does not let "
                         "API users set a proxy")
        elif proxy not in (None, "") and not policy.allow_private_networks:
            refusal = _private_proxy(str(proxy))
            if refusal:
                check.forbid(f"{at}.options.proxy", "allow_private_networks", refusal)
    llm = spec.search.llm_base_url
    if llm is not None and not url_within(llm, policy.llm_base_urls):
        allowed = ", ".join(policy.llm_base_urls) or "none; leave it unset to use the server's"
        check.forbid("search.llm_base_url", "llm_base_urls", f"{llm!r} is not an LLM endpoint "
                     f"this server lets API users name (allowed prefixes: {allowed})")
    # A spec naming the operator's own endpoint runs on the operator's key (builder.expand):
    # it asks what leaving the endpoint unset asks.
    own = llm is None or same_endpoint(llm, operator_endpoint())
    model = spec.search.llm_model
    if model is not None and own and model not in policy.llm_models:
        allowed = ", ".join(policy.llm_models) or "none; leave it unset for the server's"
        check.forbid("search.llm_model", "llm_models", f"{model!r} is not a model this server "
                     f"lets API users run on its LLM endpoint (allowed: {allowed})")
    if spec.search.expand and own and not policy.allow_expand:
        check.forbid("search.expand", "allow_expand", "this server does not let API users "
                     "generate queries on its own LLM endpoint (each class costs a call, on "
                     "its key); list the queries in each class instead"
                     + (f", or name an endpoint under {', '.join(policy.llm_base_urls)} as "
                        "search.llm_base_url" if policy.llm_base_urls else ""))
    _share_budgets(check, spec, policy)
    _check_hosts(check, policy)
    if spec.download.allow_private_networks and not policy.allow_private_networks:
        if not policy.private_network_sources:
            check.forbid("download.allow_private_networks", "allow_private_networks",
                         "this server does not let API users fetch from loopback or private "
                         "addresses")
        elif not _private_sources_only(spec, policy.private_network_sources):
            allowed = ", ".join(policy.private_network_sources)
            check.forbid("download.allow_private_networks", "private_network_sources",
                         "this server lets API users fetch from loopback or private "
                         f"addresses only what the sources under {allowed} find: every "
                         "source's engine must ask a server there (a sandbox's url, or the "
                         "base_url of wikimedia, openverse, google or baidu), with no URL-list "
                         "file and no class's own urls")
    _check_optouts(check, policy)
    for name in ("clip_model", "nsfw_model"):
        value = getattr(spec.validation, name)
        if value != _default(ValidationSpec, name) and value not in policy.models:
            allowed = ", ".join(policy.models) or "only the defaults"
            check.forbid(f"validation.{name}", "models", f"{value!r} is not a model this "
                         f"server lets API users load (allowed: {allowed})")

    check.cap("download", "concurrency", "max_download_concurrency",
              policy.max_download_concurrency)
    check.cap("download", "per_host_concurrency", "max_per_host_concurrency",
              policy.max_per_host_concurrency)
    check.cap("download", "max_bytes", "max_bytes", policy.max_bytes)
    check.cap("validation", "max_pixels", "max_pixels", policy.max_pixels)
    check.cap("download", "timeout_s", "max_timeout_s", policy.max_timeout_s)
    check.cap("download", "deadline_s", "max_deadline_s", policy.max_deadline_s)
    check.cap("download", "retries", "max_retries", policy.max_retries)
    check.cap("download", "backoff_s", "max_backoff_s", policy.max_backoff_s)
    check.cap("download", "max_retry_after_s", "max_retry_after_s", policy.max_retry_after_s)
    check.cap("download", "per_host_delay_s", "max_per_host_delay_s",
              policy.max_per_host_delay_s)
    check.cap("output", "shard_size", "max_shard_size", policy.max_shard_size)
    check.cap("search", "candidates_factor", "max_candidates_factor",
              policy.max_candidates_factor)
    check.cap("resources", "max_buffered_mb", "max_buffered_mb", policy.max_buffered_mb)
    check.cap("download", "max_bytes_in_flight", "max_bytes_in_flight",
              policy.max_bytes_in_flight)
    check.cap("resources", "max_held_mb", "max_held_mb", policy.max_held_mb)
    check.cap("resources", "batch_size", "max_batch_size", policy.max_batch_size)
    check.cap("resources", "max_in_flight_batches", "max_in_flight_batches",
              policy.max_in_flight_batches)
    check.cap("resources", "gpu_batch_size", "max_gpu_batch_size", policy.max_gpu_batch_size)
    _check_worker_resources(check, policy)
    _check_output_size(check, policy, _check_targets(check, policy))
    _size_pools(check, policy, cluster)

    if check.refusals:
        raise PolicyRefused(check.refusals)
    return _hold_sizes(parse_spec(_apply(spec.model_dump(mode="json"), check.changes),
                                  "request body"), policy)


_PROXY_HOST = re.compile(r"[a-z0-9.:_-]+")


def _private_proxy(proxy: str) -> Optional[str]:
    """Why ``proxy`` names what an API user may not reach (a private address, localhost or a
    malformed host), or None. A name is not resolved here: see ``allow_proxy``."""
    try:
        host = (URL(proxy).raw_host or "").rstrip(".").lower()  # IDNA-encoded, escapes kept
    except (ValueError, TypeError):
        return f"{proxy[:200]!r} is not a proxy URL"
    if not host or host == "localhost" or host.endswith(".localhost"):
        return f"{proxy[:200]!r} names no host or this server itself"
    if not _PROXY_HOST.fullmatch(host):
        # "%31%32%37.0.0.1": the proxy client decodes it to 127.0.0.1 (WHATWG URL rules)
        return f"{proxy[:200]!r}: a proxy host is a name or an address, spelled plainly"
    verdict = check_url(f"http://{host}/" if ":" not in host else f"http://[{host}]/")
    if verdict is not None:
        return f"{proxy[:200]!r}: {verdict[1]}; this server does not let API users reach it"
    return None


def _hold_sizes(spec: DatasetSpec, policy: ApiPolicy) -> DatasetSpec:
    """What a job sizes itself where ``resources.batch_size`` and ``max_in_flight_batches``
    are unset, held to ``max_batch_size`` and ``max_in_flight_batches`` (reckoned on the spec
    as it will run, its other caps applied). Where only a URL list's grown slices would pass
    the cap, the batch size is pinned to the job's own (which turns growth off)."""
    res = spec.resources
    if res.batch_size is None:
        base = spec.batch_size()
        if max(base, spec.list_growth()[1]) > policy.max_batch_size:
            res.batch_size = min(base, policy.max_batch_size)
    if res.max_in_flight_batches is None and \
            units_per_worker(spec) > policy.max_in_flight_batches:
        res.max_in_flight_batches = policy.max_in_flight_batches
    return spec


def _private_sources_only(spec: DatasetSpec, prefixes: list[str]) -> bool:
    """Whether every URL the spec's job can fetch comes from a source under ``prefixes``:
    the server that answers there chooses the image URLs, not the API user. Only the server
    an engine actually asks counts (``SourceSpec.endpoint``): a web search engine's hits
    point at whatever pages anyone can put in its index, private addresses allowed."""
    if any(c.urls for c in spec.classes.values()):
        return False
    for src in spec.sources:
        endpoint = src.endpoint()
        if src.path or endpoint is None or not url_within(endpoint, prefixes):
            return False
    return True


def _check_optouts(check: _Check, policy: ApiPolicy) -> None:
    """Opt-outs the fetcher honours by default, and the User-Agent it sends: the requests go
    out from the operator's addresses, so only the operator may have them ignore a site's
    robots.txt or AI opt-outs, or claim to be another crawler."""
    download = check.spec.download
    if not policy.allow_ignore_optouts:
        fields = [f"download.{name}" for name in ("respect_robots", "respect_optouts")
                  if not getattr(download, name)]
        fields += [f"download.signals.{name}" for name, field in SignalsSpec.model_fields.items()
                   if field.default is True and not getattr(download.signals, name)]
        if download.signals.usage != _default(SignalsSpec, "usage"):
            fields.append("download.signals.usage")
        for field in fields:
            check.forbid(field, "allow_ignore_optouts", "this server does not let API users "
                         "turn off robots.txt or an AI opt-out signal it honours "
                         "(allow_ignore_optouts)")
    agent = download.user_agent.strip()
    allowed_agents = [a.strip() for a in policy.user_agents]
    if agent != _default(DownloadSpec, "user_agent") and agent not in allowed_agents:
        allowed = ", ".join(repr(a) for a in allowed_agents) or "only the default"
        check.forbid("download.user_agent", "user_agents", f"{agent[:80]!r} is not a "
                     f"User-Agent this server lets API users send (user_agents; allowed: "
                     f"{allowed}); set download.contact to name yourself in the default one")
    contact = download.contact or ""
    named = next((bot for bot in OTHER_CRAWLERS if bot in contact.lower()), None)
    if named is not None:
        check.forbid("download.contact", "user_agents", f"{contact[:80]!r} names another "
                     f"crawler ({named}); sites that look for it in the User-Agent would take "
                     "this server for it. Give your own email or URL")


OTHER_CRAWLERS = ("googlebot", "googleother", "google-extended", "google-inspectiontool",
                  "storebot-google", "mediapartners-google", "adsbot", "bingbot", "bingpreview",
                  "msnbot", "applebot", "gptbot", "chatgpt-user", "oai-searchbot", "ccbot",
                  "claudebot", "claude-web", "anthropic-ai", "perplexitybot", "duckduckbot",
                  "yandexbot", "baiduspider", "slurp", "facebookexternalhit",
                  "meta-externalagent", "twitterbot", "linkedinbot", "bytespider", "amazonbot",
                  "petalbot", "ahrefsbot", "semrushbot", "mj12bot", "dotbot", "seznambot",
                  "sogou", "yeti", "diffbot", "imagesiftbot", "cohere-ai")
"""Names of other crawlers, as sites match them in a User-Agent (case-insensitive
substrings): a contact holding one would put it in ours."""


def _check_hosts(check: _Check, policy: ApiPolicy) -> None:
    """``download.hosts`` through the API: no host faster than ``max_per_host_concurrency``
    nor with a longer delay than ``max_per_host_delay_s``, and a host with a built-in profile
    (a site's published robot policy) only made politer. On one's own machine a value there
    stands as written (``builder.profiles``)."""
    from builder.profiles import BUILTIN_PROFILES, faster_than_published

    caps = (("concurrency", "max_per_host_concurrency", policy.max_per_host_concurrency),
            ("delay_s", "max_per_host_delay_s", policy.max_per_host_delay_s))
    for host, profile in check.spec.download.hosts.items():
        at = f"download.hosts.{host}"
        for name, setting, cap in caps:
            value = getattr(profile, name)
            if value is not None and value > cap:
                check.over_cap(f"{at}.{name}", setting, value, cap)
        for name, mine, theirs in faster_than_published(host, profile):
            word = "below" if name == "delay_s" else "above"
            check.forbid(f"{at}.{name}", "max_per_host_concurrency",
                         f"{mine:g} is {word} {host}'s published robot policy ({theirs:g}); "
                         "through this server a spec may only make it politer")
        builtin = BUILTIN_PROFILES.get(host)
        if builtin is None:
            continue
        widths, standard = profile.thumb_widths, builtin.thumb_widths
        if widths is not None and standard is not None and not set(widths) <= set(standard):
            check.forbid(f"{at}.thumb_widths", "max_per_host_concurrency",
                         f"{host} serves thumbnails only at its standard widths "
                         f"({', '.join(map(str, standard))}); through this server a spec may "
                         "only choose among them")


def _check_worker_resources(check: _Check, policy: ApiPolicy) -> None:
    """Custom Ray resources only from ``worker_resources``: a resource name places workers
    (``node:<ip>`` pins them to one node) and claims what the operator may keep for others."""
    allowed = ", ".join(policy.worker_resources) or "none"
    for name in check.spec.resources.worker_resources:
        if name not in policy.worker_resources:
            check.forbid(f"resources.worker_resources.{name}", "worker_resources",
                         f"{name!r} is not a resource this server lets API users ask for "
                         f"(allowed: {allowed})")


def _check_targets(check: _Check, policy: ApiPolicy) -> int:
    """Caps on the job's sources, classes and targets; returns the images it asks for."""
    spec = check.spec
    if len(spec.sources) > policy.max_sources:
        check.over("sources", "max_sources", f"{len(spec.sources)} sources; this server takes "
                   f"at most {policy.max_sources} in one job")
    if len(spec.labels) > policy.max_classes:
        check.over("classes", "max_classes", f"{len(spec.labels)} classes; this server takes "
                   f"at most {policy.max_classes} in one job")
    default = spec.target
    if default > policy.max_target:
        if "target" in spec.model_fields_set:
            check.over("target", "max_target", f"{default} is over this server's limit "
                       f"{policy.max_target} images per class (max_target)")
        else:
            check.changes["target"] = default = policy.max_target
    flat = set(spec.model_dump(mode="json", include={"classes"})["classes"])
    total = 0
    for label in spec.labels:
        target = spec.classes[label].target or default
        total += target
        if target > policy.max_target and spec.classes[label].target is not None:
            check.over(_target_field(spec, label, flat), "max_target",
                       f"{target} images for {label!r} is over this server's limit "
                       f"{policy.max_target} per class (max_target)")
    if total > policy.max_images:
        check.over("target", "max_images", f"the classes' targets add up to {total} images; "
                   f"this server takes at most {policy.max_images} in one job (max_images)")
    return total


MIN_FITTED_BYTES = 256 * 1024
"""The least ``download.max_bytes`` that ``max_job_gb`` lowers an unset one to: below it, a
job of ordinary photos would reject most as too large, so the spec is refused instead."""


def _check_output_size(check: _Check, policy: ApiPolicy, images: int) -> None:
    """Hold what the job may write to ``max_job_gb``: each accepted image is written once per
    output format, at most ``download.max_bytes`` each (a resized image is re-encoded
    smaller)."""
    spec = check.spec
    copies = len(set(spec.output.formats))
    if not images or not copies:
        return
    limit = int(policy.max_job_gb * 1e9)
    per_image = check.changes.get("download.max_bytes", spec.download.max_bytes)
    if images * copies * per_image <= limit:
        return
    fit = limit // (images * copies)
    what = (f"{images} images x {copies} output format(s) x {per_image} bytes "
            f"(download.max_bytes) is {images * copies * per_image / 1e9:.0f} GB, over this "
            f"server's limit of {policy.max_job_gb:g} GB a job (max_job_gb)")
    if "max_bytes" in spec.download.model_fields_set:
        check.over("download.max_bytes", "max_job_gb", f"{what}; set at most {fit} bytes an "
                   "image, or ask for fewer images or output formats")
    elif fit >= MIN_FITTED_BYTES:
        check.changes["download.max_bytes"] = fit
    else:
        check.over("target", "max_job_gb", f"{what}; even at {MIN_FITTED_BYTES} bytes an "
                   "image it would not fit: ask for fewer images or output formats")


def _size_pools(check: _Check, policy: ApiPolicy, cluster: Mapping[str, float]) -> None:
    """Pools sized to the job's share: what the user left unset is filled in as the planner
    would on a cluster of that size; what the user set must fit in it."""
    spec = check.spec
    share = policy.job_share(cluster)
    plan = plan_pools(spec, share, units_per_worker(spec))
    chosen = spec.resources.model_fields_set & set(POOL_FIELDS)
    floored = ["worker_cpus"] + (["gpu_actor_cpus"] if spec.validation.level == "slow" else [])
    for name in floored:
        value = getattr(spec.resources, name)
        if name in chosen and value < policy.min_actor_cpus:
            check.over(f"resources.{name}", "min_actor_cpus", f"{value:g} is under this "
                       f"server's least {policy.min_actor_cpus:g} CPUs per actor "
                       "(min_actor_cpus): each actor holds its own fetcher, buffers or models")
    if chosen:
        needs = plan.required()
        setting = "job_cpus" if policy.job_cpus else "max_running_jobs"
        for kind, amount in needs.items():
            if kind in share and amount > share[kind] + 1e-9:
                check.over("resources", setting if kind == "CPU" else "max_running_jobs",
                           f"the pools set in resources ({', '.join(sorted(chosen))}) need "
                           f"{amount:g} {kind}s; a job on this server gets {share[kind]:g} "
                           f"{kind}s (its share of the cluster); lower them or leave them "
                           "unset to have them sized to the share")
    if spec.resources.workers is None:
        check.changes["resources.workers"] = plan.workers
        check.changes["resources.worker_cpus"] = plan.worker_cpus
    if spec.resources.dedup_partitions is None:
        check.changes["resources.dedup_partitions"] = plan.partitions
