"""The HTTP job API: a Ray Serve deployment with a FastAPI ingress.

    POST   /v1/jobs                 submit a dataset spec (JSON or YAML) -> 202 {id, ...}
    GET    /v1/jobs                 the caller's jobs, newest first (?state=&limit=&offset=)
    GET    /v1/jobs/{id}            state, per-class progress, rejects by reason, output, error
    DELETE /v1/jobs/{id}            cancel (a partial result is written and marked)
    GET    /v1/jobs/{id}/events     server-sent events with live progress until the job ends
    POST   /v1/jobs/{id}/events/token  a token that opens that stream (for EventSource)
    GET    /v1/jobs/{id}/samples    thumbnails of accepted images (?label=&limit=)
    GET    /v1/example              the example spec the page starts with
    GET    /healthz                 liveness + store check
    GET    /                        the web page;  /docs  the OpenAPI UI

A submitted spec is checked against the operator's policy (serve/policy.py) and stored
"queued"; the scheduler (serve/schedule.py) starts it when its key's turn comes.

Every error is ``{"error": {"code": ..., "message": ...}}``. With auth off, a request for a
host name other than localhost, an IP address or ``allowed_hosts`` gets 421, and one that
changes something from another site's page 403 (``HostGuard`` in serve/auth.py).
``build_app(args)`` is the app builder for ``serve deploy`` (see serve_config.yaml) and for
``pixcrawler serve``.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations at
# runtime, and Serve's class-based view cannot resolve them from strings.
import asyncio
import json
import logging
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Optional
from urllib.parse import quote

import ray
import yaml
from fastapi import Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve as ray_serve
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from builder.errors import SpecError, StorageError
from builder.pipeline import new_job_id
from builder.spec import CATEGORY_KEYS, DatasetSpec, parse_spec
from builder.writers import JOB_ID_RE
from cluster.connect import WORKER_NICENESS_ENV
from serve.auth import (Authenticator, HostCheck, HostGuard, Principal, RateLimiter, host_name,
                        too_many_requests, unauthorized)
from serve.cache import ReadCache, SizedLru
from serve.errors import ApiError, not_found
from serve.fastpath import (JOBS_PATH, EncodedBodies, HotReads, encode, query_params,
                            small_int)
from serve.jobs import (ClusterUnavailable, JobLauncher, ProgressReader, ReconcileLoop,
                        Reconciler, request_cancel)
from serve.policy import ApiPolicy, PolicyRefused, Refusal, apply_policy
from serve.samples import BUSY_RETRY_S, MAX_SAMPLES, NoDataset, SampleCache, SamplesBusy
from serve.schedule import Scheduler
from serve.store import (RANK, STATES, TERMINAL, JobIdTaken, JobRow, JobStore, TooManyJobs,
                         default_store_url, later_state, sqlite_path)

log = logging.getLogger("pixcrawler.serve")

APP_NAME = "pixcrawler"
PAGE = Path(__file__).with_name("page.html")
JSON_TYPES = ("application/json",)
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")

REPLICA_CPUS = 0.1
MAX_JOB_ID = 160
"""The longest job id the store holds (its ``jobs.id`` column)."""
JOB_ID_TRIES = 5
"""New ids drawn for one submit before a run of ids already taken is an error."""
LIST_MAX = 100
"""The most jobs a page of the job list holds (``?limit=``)."""
MAX_OFFSET = 999_999_999
"""The largest ``?offset=`` of a listing (nine digits, what the fast path reads); a larger
one overflowed the store's integers."""
MAX_LABEL_LEVELS = 32
"""The most levels a class label has ('/'-separated parts, or nested categories): the spec's
checks of a label's parents take time in the square of its levels."""
SPEC_THREADS = 2
"""Threads per replica that read submitted specs (see SpecReader)."""
# Serve reads this in each replica process: 0 runs the ingress on the replica's own event loop.
USER_CODE_THREAD_ENV = "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"

EXAMPLE_SPEC: dict[str, Any] = {
    "name": "pets",
    "description": "Cats and dogs from DuckDuckGo image search.",
    "target": 50,
    "classes": {"cat": ["cat photo"], "dog": ["dog photo"]},
    "sources": [{"engine": "duckduckgo"}],
    "validation": {"level": "medium"},
}


class ServeSettings(BaseModel):
    """The app's configuration (``args`` of the app in serve_config.yaml)."""

    model_config = ConfigDict(extra="forbid")

    store: str = Field(default_factory=default_store_url,
                       description="SQLAlchemy URL of the job store")
    data_dir: Optional[str] = Field(
        default=None, description="jobs' spec files and default outputs; default: the SQLite "
        "file's directory, else ~/.pixcrawler (must be shared by the nodes on a cluster)")
    auth: bool = True
    rate_limit_per_s: float = Field(default=20.0, ge=0, description="0 turns the limit off")
    rate_limit_burst: int = Field(default=40, ge=1)
    max_concurrent_jobs: int = Field(default=4, ge=1, description="jobs running or queued "
                                     "per API key")
    max_spec_bytes: int = Field(default=1_000_000, ge=1024)
    spec_body_s: float = Field(default=30.0, gt=0, description="how long a submit's body may "
                               "take to arrive; a slower one answers 408")
    max_submits_per_key: int = Field(default=2, ge=1, description="submits one API key may "
                                     "have in progress (being received or read) on a replica; "
                                     "one more answers 429")
    keep_ended_jobs: int = Field(default=1000, ge=1, description="ended jobs the store keeps "
                                 "per API key, the last ended first (older rows are deleted "
                                 "at the key's next submit; datasets stay)")
    keep_ended_mb: float = Field(default=64.0, gt=0, description="at most this much of ended "
                                 "jobs' specs, progress and stats (millions of characters) "
                                 "is kept per API key, the last ended first")
    max_yaml_spec_bytes: int = Field(default=131_072, ge=1024, description="a YAML body's "
                                     "limit: YAML is read in Python, 1 MB of it takes 6-16 s "
                                     "of CPU; a larger spec can be sent as JSON")
    example_spec: Optional[dict[str, Any]] = None
    dashboard_address: Optional[str] = None
    key_cache_s: float = Field(default=5.0, ge=0, description="a revoked key works for at "
                               "most this long on a replica that has just seen it")
    read_cache_s: float = Field(default=1.0, ge=0, description="job rows and lists read from "
                                "the store are reused this long by a replica (a change made "
                                "through the same replica shows at once, one made elsewhere "
                                "within this time); 0 reads the store on every request")
    access_log: bool = Field(default=False, description="Serve's access log line per request "
                             "(a measurable cost per request at high request rates)")
    user_code_thread: bool = Field(
        default=False, description="run the API on a thread of its own in each replica "
        "(Serve's default) instead of on the replica's event loop "
        f"({USER_CODE_THREAD_ENV}=0), which saves two hand-offs between threads per request")
    niceness: int = Field(default=0, ge=0, le=19, description="how many nice levels below "
                          "the node's Ray processes the replicas run. Ray's default for workers "
                          "is 15, so that they yield to interactive work; an API that answers "
                          "people should not yield to the crawl's own batch actors")
    num_replicas: int = Field(default=1, ge=1, description="replicas of the API (a "
                              "deployments: entry in serve_config.yaml overrides it)")
    reconcile_interval_s: float = Field(default=5.0, gt=0, description="how often a replica "
                                        "settles ended jobs and starts queued ones")
    events_interval_s: float = Field(default=0.5, gt=0)
    max_streams_per_key: int = Field(default=4, ge=1, description="event streams (GET "
                                     "/v1/jobs/{id}/events) one API key may have open on a "
                                     "replica; one more answers 429. Each stream holds one "
                                     "of the replica's max_ongoing_requests while it is open")
    max_stream_s: float = Field(default=3600.0, gt=0, description="an event stream ends after "
                                "this long with an `error` event (code `stream_expired`); "
                                "SSE clients reconnect by themselves")
    stream_token_s: float = Field(default=300.0, gt=0, description="how long a token from "
                                  "POST /v1/jobs/{id}/events/token opens that job's event "
                                  "stream (`?token=`, for a browser's EventSource, which "
                                  "cannot send the key in a header): a token in a logged URL "
                                  "lets whoever reads the log watch that job's progress for "
                                  "this long, and nothing else")
    policy: ApiPolicy = Field(default_factory=ApiPolicy, description="what API users may set "
                              "in a spec, and how the cluster is shared (serve/policy.py)")
    allowed_hosts: list[str] = Field(
        default_factory=list, description="with auth off: the host names (a proxy's, the "
        "cluster's) the API answers besides localhost and IP addresses, with any port; a "
        "request for another name gets 421, so that no web page reaches the API through DNS "
        "rebinding. Unused with auth on")

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, names: list[str]) -> list[str]:
        return [host_name(name) for name in names]

    def resolved(self) -> "ServeSettings":
        """Absolute paths, so every replica (whatever its cwd) finds the same files."""
        data_dir = self.data_dir
        if data_dir is None:
            path = sqlite_path(self.store)
            data_dir = str(path.parent) if path else str(Path("~/.pixcrawler").expanduser())
        data_dir = str(Path(data_dir).expanduser().resolve())
        return self.model_copy(update={"data_dir": data_dir,
                                       "policy": self.policy.resolved(data_dir)})


# FastAPIOffline: FastAPI whose /docs (Swagger UI) and /redoc pages load their scripts and
# styles from the fastapi-offline package, served here under DOCS_ASSETS, not from a CDN.
DOCS_ASSETS = "/docs/assets"
app = FastAPIOffline(
    static_url=DOCS_ASSETS,
    title="PixCrawler job API",
    version="1",
    description="Submit dataset specs, watch jobs build image datasets on Ray, browse results. "
                "Authenticate with `Authorization: Bearer <key>` (`pixcrawler keys create`).",
)


# GET /v1/jobs and /v1/jobs/{id} answered without FastAPI's machinery (JobAPI.hot_read).
app.add_middleware(HotReads)
# Added last, so it runs first: with auth off, a foreign Host or Origin gets no further.
app.add_middleware(HostCheck)


@app.exception_handler(ApiError)
async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def _bad_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = [{"field": ".".join(str(p) for p in err.get("loc", ())), "message": err["msg"]}
                for err in exc.errors()]
    text = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
    return JSONResponse({"error": {"code": "invalid_request", "message": text,
                                   "problems": problems}}, status_code=422)


@app.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed"}
    return JSONResponse({"error": {"code": codes.get(exc.status_code, "http_error"),
                                   "message": str(exc.detail)}},
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


@app.exception_handler(Exception)
async def _internal(_request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error")  # the details (a store's error may quote its SQL) stay here
    return JSONResponse({"error": {"code": "internal_error",
                                   "message": "an internal error; the server's log has the "
                                   "details"}}, status_code=500)


KEEP_ALIVE_S = 15.0
"""The longest an event stream goes without a byte: proxies close idle ones (nginx after 60 s)."""
CLASS_TARGETS_MAX_BYTES = 128 << 20
"""The most of the jobs' parsed class lists (``spec_classes``) a replica keeps, the least
recently used dropped first. Counted in bytes, not jobs: a job may have 1,000 labels of 1 KiB,
and a key may submit and cancel such jobs as fast as its rate limit lets it (10,000 jobs
held 10 GB). A key's stored specs are at most ``keep_ended_mb`` (64 MB) and its few active
jobs', so its own jobs' lists fit and are each parsed once."""


def _class_targets_size(found: dict[str, Optional[int]]) -> int:
    return sum(sys.getsizeof(label) + 100 for label in found) + sys.getsizeof(found)


_CLASS_TARGETS: SizedLru[dict[str, Optional[int]]] = SizedLru(CLASS_TARGETS_MAX_BYTES,
                                                                _class_targets_size)


def spec_classes(row: JobRow) -> dict[str, Optional[int]]:
    """The job's class labels and their targets, in the spec's order. The stored spec dumps
    the leaves of ``categories`` under ``categories`` only, so the labels (``mammals/dog``)
    come from parsing it; a job's spec never changes, so that is done once per job."""
    key = (row.id, row.created_at)
    found = _CLASS_TARGETS.get(key)
    if found is not None:
        return found
    spec = row.spec or {}
    try:
        parsed = parse_spec(spec, f"job {row.id}", stored=True)
    except SpecError:
        # Not a spec this version reads (stored by another one): its flat classes, as stored.
        flat: dict[str, Optional[int]] = {}
        for label, body in (spec.get("classes") or {}).items():
            target = body.get("target") if isinstance(body, dict) else None
            flat[label] = target or spec.get("target")
        return flat
    found = {label: parsed.target_of(label) for label in parsed.labels}
    _CLASS_TARGETS.put(key, found)
    return found


def class_view(row: JobRow, progress: dict[str, Any],
               stats: Optional[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per class: target, accepted, candidates, rejected (+ rejects by reason, shortfall)."""
    classes: dict[str, dict[str, Any]] = {
        label: {"target": target, "accepted": 0, "candidates": 0, "rejected": 0}
        for label, target in spec_classes(row).items()}
    for label, c in (progress.get("classes") or {}).items():
        classes.setdefault(label, {}).update(c)
    for label, c in ((stats or {}).get("classes") or {}).items():
        classes.setdefault(label, {}).update(
            {k: c[k] for k in ("target", "accepted", "candidates", "rejected",
                               "rejected_by_reason", "shortfall") if k in c})
    return classes


def job_view(row: JobRow, live: Optional[dict[str, Any]] = None,
             detail: bool = True) -> dict[str, Any]:
    """The JSON of a job: the store's row, with a running job's live progress over it."""
    live = live or {}
    stats = row.stats or live.get("stats")
    # A state never moves back: the row (written by whoever saw the job last) may be further
    # along than a live answer read a moment ago, or behind it; the later one wins, with its
    # progress.
    state = later_state(row.state, live.get("state") or row.state)
    if live.get("state") == state and live.get("progress"):
        progress = live["progress"]
    else:
        progress = row.progress or live.get("progress") or {}
    view: dict[str, Any] = {
        "id": row.id,
        "name": row.name,
        "state": state,
        "created_at": row.created_at,
        "updated_at": max(row.updated_at, live.get("updated") or 0.0),
        "started_at": row.started_at,
        "ended_at": row.ended_at,
        "output_uri": live.get("output_uri") or row.output_uri,
        "cancel_requested": row.cancel_requested or bool(live.get("cancel_requested")),
        "error": row.error or live.get("error"),
        "progress": {k: v for k, v in progress.items() if k != "classes"},
    }
    if detail:
        view["classes"] = class_view(row, progress, stats)
        view["rejected_by_reason"] = ((stats or {}).get("rejected_by_reason")
                                      or progress.get("rejected_by_reason") or {})
        view["shortfall"] = (stats or {}).get("shortfall", {})
        view["partial"] = bool((stats or {}).get("partial")) or state == "cancelled"
        view["stats"] = stats
        ray_status = row.ray_status
        if state in TERMINAL and ray_status in ("PENDING", "RUNNING"):
            ray_status = None  # seen while it ran; the job ended through its progress actor
        view["ray"] = {"submission_id": row.id, "status": ray_status}
        view["spec"] = row.spec
        view["links"] = {"self": f"/v1/jobs/{row.id}", "events": f"/v1/jobs/{row.id}/events",
                         "samples": f"/v1/jobs/{row.id}/samples"}
    return view


_COUNTS = ("candidates", "accepted", "rejected")


TOKEN_BUCKET = "/stream-token"
"""The rate limiter's bucket of a key's requests made with a stream token."""


class KeySlots:
    """What each key has in progress on this replica, at most ``per_key`` at once: an event
    stream, or a submit being read. Each holds one of the replica's ``max_ongoing_requests``
    while it lasts (a stream until its job ends, a submit while its body trickles in or its
    YAML is read), so one key could otherwise take them all and shut every other key out.
    ``code``, ``held`` ("event streams open") and ``advice`` make the 429's message. Used
    from the replica's one event loop: no lock."""

    def __init__(self, per_key: int, code: str, held: str, advice: str, retry_after_s: int):
        self.per_key = per_key
        self.code, self.held, self.advice = code, held, advice
        self.retry_after_s = retry_after_s
        self.open: dict[str, int] = {}

    def take(self, owner: str) -> Callable[[], None]:
        """Count a new one of ``owner``'s, or raise a 429; returns the slot's release (which
        does something only the first time it is called)."""
        held = self.open.get(owner, 0)
        if held >= self.per_key:
            raise ApiError(429, self.code,
                           f"this API key has {held} {self.held} (the limit is "
                           f"{self.per_key}); {self.advice}",
                           headers={"Retry-After": str(self.retry_after_s)})
        self.open[owner] = held + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self.open.get(owner, 0) - 1
            if left > 0:
                self.open[owner] = left
            else:
                self.open.pop(owner, None)

        return release


class SlotStreamingResponse(StreamingResponse):
    """A StreamingResponse that releases its stream slot however it ends: the job's end, the
    client gone, an error or a cancelled task."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None],
                 **kwargs: Any):
        super().__init__(content, **kwargs)
        self.release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


def _counts_behind(progress: dict[str, Any], sent: dict[str, int]) -> bool:
    """Whether a job's progress counts are below ones already sent (counts only grow)."""
    return any((progress.get(k) or 0) < n for k, n in sent.items())


def event_view(view: dict[str, Any]) -> dict[str, Any]:
    """A job's view as the event stream sends it: without the spec (a few kB that never
    change; GET /v1/jobs/{id} has it)."""
    return {k: v for k, v in view.items() if k != "spec"}


class _AnchorRefused(yaml.YAMLError):
    """A YAML anchor or alias in a spec (see SpecYamlLoader)."""

    def __init__(self, mark: Any):
        super().__init__(f"line {mark.line + 1}, column {mark.column + 1}")


class SpecYamlLoader(yaml.SafeLoader):
    """SafeLoader without anchors and aliases: an alias makes one small body stand for a
    huge (or self-referencing) value, which the size limit on the body does not see."""

    def compose_node(self, parent: Optional[yaml.Node], index: Any) -> Optional[yaml.Node]:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _AnchorRefused(event.start_mark)
        return super().compose_node(parent, index)


class _PlainDumper(yaml.SafeDumper):
    """SafeDumper that writes a value used twice out twice: the API refuses aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _body_error(message: str) -> SpecError:
    return SpecError([("(body)", message)], "request body")


def parse_body(body: bytes, content_type: str, max_bytes: Optional[int] = None,
               max_yaml_bytes: Optional[int] = None) -> Any:
    """The request body as data, by its content type (JSON, or YAML of at most
    ``max_yaml_bytes``). Every string must be valid Unicode (no lone surrogates). With
    ``max_bytes``, the data written out as JSON must fit in it too (413 otherwise)."""
    media = (content_type or "application/json").split(";")[0].strip().lower()
    if media in YAML_TYPES and max_yaml_bytes is not None and len(body) > max_yaml_bytes:
        raise ApiError(413, "spec_too_large", f"a YAML spec is at most {max_yaml_bytes} bytes "
                       f"(this one is {len(body)}); send a larger one as JSON")
    text = body.decode("utf-8", errors="replace")
    if media in JSON_TYPES or media.endswith("+json"):
        kind = "JSON"
        try:
            data = json.loads(text)
        except RecursionError:
            raise _body_error("not valid JSON: nested too deeply") from None
        except ValueError as exc:  # JSONDecodeError, or a number too long to convert
            raise _body_error(f"not valid JSON: {exc}") from None
    elif media in YAML_TYPES:
        kind = "YAML"
        try:
            data = yaml.load(text, Loader=SpecYamlLoader)  # noqa: S506 - a SafeLoader
        except _AnchorRefused as exc:
            raise _body_error(f"YAML anchors and aliases (&name, *name) are not supported "
                              f"in a spec; write the value out in full ({exc})") from None
        except RecursionError:
            raise _body_error("not valid YAML: nested too deeply") from None
        except (yaml.YAMLError, ValueError) as exc:  # ValueError: a number too long
            raise _body_error(f"not valid YAML: {exc}") from None
    else:
        raise ApiError(415, "unsupported_media_type",
                       f"send the spec as application/json or application/yaml, not {media!r}")
    try:
        size = len(json.dumps(data, separators=(",", ":"), ensure_ascii=False,
                              default=str).encode("utf-8"))
    except RecursionError:
        raise _body_error(f"not valid {kind}: nested too deeply") from None
    except TypeError as exc:  # a YAML key that is a date, a number's tuple, bytes...
        raise _body_error(f"not a spec: every mapping key must be a string ({exc})") from None
    except UnicodeEncodeError as exc:
        # JSON's \ud83d escape with no partner: no character, and no file can hold it.
        bad = exc.object[exc.start:exc.end]
        raise _body_error(f"not valid {kind}: a lone surrogate ({ascii(bad)}) is no Unicode "
                          "character; write the character itself, or a \\ud83d\\ude3a "
                          "pair for one beyond U+FFFF") from None
    except ValueError as exc:  # a YAML 1.1 base-60 integer (1:59:59...) of thousands of digits
        raise _body_error(f"not valid {kind}: {exc}") from None
    if max_bytes is not None and size > max_bytes:
        raise ApiError(413, "spec_too_large", f"a spec is at most {max_bytes} bytes "
                       f"(this one is {size} bytes written out as JSON)")
    return data


def _too_deep(field: str, label: str) -> SpecError:
    shown = label if len(label) <= 60 else label[:60] + "..."
    return SpecError([(field, f"the label {shown!r} has more than {MAX_LABEL_LEVELS} levels, "
                       "the most a label has on this server")], "request body")


def count_classes(data: dict[str, Any]) -> int:
    """The classes a spec's data names before it is validated, as ``DatasetSpec.labels``
    counts them (a label both in ``classes`` and under ``categories``, which validation
    refuses, counts twice). Raises SpecError for a label of over MAX_LABEL_LEVELS levels."""
    classes = data.get("classes")
    if isinstance(classes, list):
        classes = dict.fromkeys(name for name in classes if isinstance(name, str))
    names = list(classes) if isinstance(classes, dict) else []
    for name in names:
        if isinstance(name, str) and name.count("/") >= MAX_LABEL_LEVELS:
            raise _too_deep("classes", name)
    count = len(names)
    categories = data.get("categories")
    if isinstance(categories, list):
        return count + len({name for name in categories if isinstance(name, str)})
    if not isinstance(categories, dict):
        return count
    # Level by level: (the label so far, its child categories). In a category's mapping every
    # key but CATEGORY_KEYS is a child; at the top every key is.
    level: list[tuple[str, dict[Any, Any]]] = [("", categories)]
    depth = 0
    while level:
        depth += 1
        if depth > MAX_LABEL_LEVELS:
            raise _too_deep("categories", level[0][0])
        deeper = []
        for label, children in level:
            for name, node in children.items():
                kids = ({key: value for key, value in node.items() if key not in CATEGORY_KEYS}
                        if isinstance(node, dict) else {})
                if kids:
                    deeper.append((f"{label}{name}/", kids))
                else:
                    count += 1
        level = deeper
    return count


def check_size(data: Any, max_classes: int) -> None:
    """Refuse a spec of more than ``max_classes`` classes (the 422 ``apply_policy`` gives)
    or of a label deeper than MAX_LABEL_LEVELS before it is validated: validation takes
    about 30 us of CPU a class (3 s for the 110,000 names 1 MB of JSON holds), counting them
    about 0.2 us."""
    if not isinstance(data, dict):
        return  # parse_spec says what is wrong with it
    count = count_classes(data)
    if count > max_classes:
        raise PolicyRefused([Refusal("classes", "max_classes", f"{count} classes; this server "
                                     f"takes at most {max_classes} in one job", False)])


def read_spec(body: bytes, content_type: str, settings: ServeSettings) -> DatasetSpec:
    """A submitted spec, read and validated; raises ApiError, SpecError or PolicyRefused."""
    data = parse_body(body, content_type, settings.max_spec_bytes,
                      settings.max_yaml_spec_bytes)
    check_size(data, settings.policy.max_classes)
    return parse_spec(data, "request body")


class SpecReader:
    """Reads submitted specs on ``threads`` threads of its own. A large spec takes a CPU a
    while to read; on the event loop's default executor, whose threads every store read and
    key check of the replica waits for (``asyncio.to_thread``), a burst of submits would take
    them all and every other request would wait behind them."""

    def __init__(self, settings: ServeSettings, threads: int = SPEC_THREADS):
        self.settings = settings
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="pixcrawler-spec")

    async def read(self, body: bytes, content_type: str,
                   hold: Optional["SubmitHold"] = None) -> DatasetSpec:
        """The spec in ``body``; ``hold``, the submit's slot, is kept until the reading ends
        (``SubmitHold``)."""
        work = self._pool.submit(read_spec, body, content_type, self.settings)
        if hold is not None:
            hold.reading = work
        return await asyncio.wrap_future(work)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class SubmitHold:
    """A submit's slot (``KeySlots.take``'s release), held while its request lasts and, when
    the request ends first (its client went away), until its spec has been read: a read
    cannot be stopped once it runs on its thread, and a client that sent specs and hung up
    at once queued reads without bound while its slots came free."""

    def __init__(self, release: Callable[[], None]):
        self.release = release
        self.reading: Optional[Future] = None

    def end(self) -> None:
        """The request is over: free the slot now, or once its spec reading ends."""
        reading = self.reading
        if reading is None or reading.done():
            self.release()
            return
        loop = asyncio.get_running_loop()
        reading.add_done_callback(lambda _: loop.call_soon_threadsafe(self.release))


def stream_slots(per_key: int) -> KeySlots:
    """The event streams each key has open on a replica (``max_streams_per_key``)."""
    return KeySlots(per_key, "too_many_streams", "event streams open",
                    "close one, or poll GET /v1/jobs/{id}", retry_after_s=10)


def submit_slots(per_key: int) -> KeySlots:
    """The submits each key has in progress on a replica (``max_submits_per_key``)."""
    return KeySlots(per_key, "too_many_submits", "submits in progress",
                    "wait for their answers", retry_after_s=1)


async def read_body(request: Request, limit: int, within_s: float) -> bytes:
    """The request body, at most ``limit`` bytes. A larger one is refused (413) as soon as it
    is seen to be larger: from its Content-Length, else (a chunked upload) once ``limit`` + 1
    bytes have come, so the replica never holds more than that and one chunk. One that has
    not all come within ``within_s`` is refused (408): a body sent a byte a minute would
    hold one of the replica's requests for good."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "spec_too_large", f"a spec is at most {limit} bytes")
    body = bytearray()
    try:
        async with asyncio.timeout(within_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ApiError(413, "spec_too_large", f"a spec is at most {limit} bytes")
    except TimeoutError:
        raise ApiError(408, "spec_too_slow", f"the spec did not arrive within {within_s:g} "
                       f"s ({len(body)} bytes came); send it again") from None
    return bytes(body)


def parse_states(state: Optional[str]) -> Optional[list[str]]:
    """``?state=`` of the job list: comma-separated states (sorted, each once: one spelling
    per set, as replicas keep pages per set), or None for all of them."""
    states = sorted({s.strip() for s in state.split(",") if s.strip()}) if state else None
    bad = [s for s in states or [] if s not in STATES]
    if bad:
        raise ApiError(422, "invalid_request", f"unknown state(s) {', '.join(bad)}; "
                       f"valid: {', '.join(STATES)}",
                       details={"problems": [{"field": "query.state",
                                              "message": f"unknown state {bad[0]!r}"}]})
    return states


def spec_error(exc: SpecError) -> ApiError:
    problems = [{"field": path, "message": msg} for path, msg in exc.problems]
    return ApiError(422, "invalid_spec", str(exc), details={"problems": problems})


CLUSTER_RETRY_S = 30
"""The ``Retry-After`` of a 503 ``cluster_unavailable``."""


def cluster_unavailable(job_id: str, action: str) -> ApiError:
    """503 ``cluster_unavailable``. What Ray said (the cluster's internal addresses, advice
    meant for whoever runs the cluster) goes to the server's log, not to the API user: the
    caller logs it (the scheduler, for a start it refused)."""
    return ApiError(503, "cluster_unavailable", f"the Ray cluster cannot {action} job {job_id} "
                    f"now; retry in {CLUSTER_RETRY_S} s (the server's log has the details)",
                    headers={"Retry-After": str(CLUSTER_RETRY_S)})


def policy_error(exc: PolicyRefused) -> ApiError:
    """403 ``forbidden_by_policy`` when a field asks for what the server does not permit,
    else 422 ``over_policy_limit``; each problem names the field and the policy setting."""
    problems = [{"field": p.field, "policy": p.setting, "message": p.message}
                for p in exc.problems]
    text = "; ".join(f"{p.field}: {p.message} (policy: {p.setting})" for p in exc.problems)
    code = "forbidden_by_policy" if exc.status == 403 else "over_policy_limit"
    return ApiError(exc.status, code, f"this server's policy refuses the spec: {text}",
                    details={"problems": problems})


def serve_cpus(replicas: int) -> float:
    """The CPUs every Serve actor in the cluster holds (this API's replicas, other Serve
    applications', the controller's and proxies'): jobs can never have them. Where Ray's state
    API cannot answer, this API's own replicas."""
    from ray.util.state import list_actors
    from ray.util.state.exception import RayStateApiException

    try:
        actors = list_actors(address=ray.get_runtime_context().gcs_address,
                             filters=[("state", "=", "ALIVE"), ("ray_namespace", "=", "serve")],
                             detail=True, limit=10_000, raise_on_missing_output=False)
    except (RayStateApiException, ConnectionError) as exc:
        log.warning("Ray's state API did not list the Serve actors (%s): jobs are sized to the "
                    "cluster less this API's own replicas", exc)
        return replicas * REPLICA_CPUS
    held = sum(float((a.required_resources or {}).get("CPU", 0.0)) for a in actors)
    return max(held, replicas * REPLICA_CPUS)


def cluster_for_jobs(replicas: int) -> dict[str, float]:
    """The cluster's resources less what Serve holds: what jobs can have."""
    cluster = dict(ray.cluster_resources())
    cluster["CPU"] = max(0.0, cluster.get("CPU", 0.0) - serve_cpus(replicas))
    return cluster


def with_fresh_id(spec: DatasetSpec, create: Callable[[str], JobRow]) -> JobRow:
    """``create`` the job under a new id, drawing another while the one drawn is taken: an id
    is the name and 32 random bits, so two jobs of one name can draw the same."""
    for _ in range(JOB_ID_TRIES - 1):
        try:
            return create(new_job_id(spec))
        except JobIdTaken:
            continue
    return create(new_job_id(spec))


@ray_serve.deployment(name="JobAPI", ray_actor_options={"num_cpus": REPLICA_CPUS},
                      max_ongoing_requests=200, health_check_period_s=10)
@ray_serve.ingress(app)
class JobAPI:
    """One replica of the API. State lives in the store, so replicas are interchangeable."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = ServeSettings.model_validate(settings).resolved()
        s = self.settings
        self.data_dir = Path(s.data_dir or ".")
        self.store = JobStore(s.store)
        self.launcher = JobLauncher(self.data_dir / "jobs", s.dashboard_address)
        self.auth = Authenticator(self.store, enabled=s.auth, cache_s=s.key_cache_s,
                                  stream_token_s=s.stream_token_s)
        self.limiter = RateLimiter(s.rate_limit_per_s, s.rate_limit_burst)
        self.host_guard = HostGuard(enabled=not s.auth, names=s.allowed_hosts)  # HostCheck's
        self.spec_reader = SpecReader(s)
        self.reader = ProgressReader()
        # Hot reads: many clients polling the same jobs cost the store a few reads a second.
        # Answers up to read_cache_s old are served at once while one read refreshes them;
        # writes through this replica's store invalidate them (JobStore.generation).
        self.reads: ReadCache[Any] = ReadCache(
            s.read_cache_s / 2, s.read_cache_s, generation=lambda: self.store.generation,
            keep=lambda value: value is not None)
        self.health: ReadCache[int] = ReadCache(1.0)
        self.policy = s.policy
        hours = self.policy.max_job_hours
        self.reconciler = Reconciler(self.store, self.launcher,
                                     max_job_s=None if hours is None else hours * 3600)
        self.scheduler = Scheduler(self.store, self.launcher, s.policy.max_running_jobs,
                                   s.policy.max_running_jobs_per_key)
        self.cluster: ReadCache[dict[str, float]] = ReadCache(30.0)
        self.samples = SampleCache()
        self.example = yaml.dump(s.example_spec or EXAMPLE_SPEC, Dumper=_PlainDumper,
                                 sort_keys=False)
        self.page = PAGE.read_text(encoding="utf-8")
        self._checked: dict[str, float] = {}
        self.streams = stream_slots(s.max_streams_per_key)
        self.submits = submit_slots(s.max_submits_per_key)
        self._bodies = EncodedBodies()
        self.hot_reads = 0  # requests answered by hot_read (see hot_read_count)
        # The first pass runs now: jobs left "running" by a crash are settled at start.
        self.reconcile_loop = ReconcileLoop(self.reconciler, s.reconcile_interval_s,
                                            then=self.scheduler.start_ready)
        self.reconcile_loop.start()

    def __del__(self) -> None:
        loop = getattr(self, "reconcile_loop", None)
        if loop is not None:
            loop.stop()
        reader = getattr(self, "spec_reader", None)
        if reader is not None:
            reader.close()

    # -- helpers ----------------------------------------------------------------------------

    async def _caller(self, request: Request) -> Principal:
        return self._limited(await self.auth.authenticate(request.headers.get("authorization")))

    def _limited(self, principal: Principal, bucket: str = "") -> Principal:
        """``principal`` if its key's request rate allows one more, else ApiError 429.
        ``bucket`` names a separate one of the key's buckets."""
        wait = self.limiter.acquire(principal.owner + bucket)
        if wait is not None:
            raise too_many_requests(wait)
        return principal

    async def _row(self, job_id: str, principal: Principal) -> JobRow:
        if len(job_id) > MAX_JOB_ID or not JOB_ID_RE.fullmatch(job_id):
            raise not_found(job_id)  # no job has such an id (a NUL would fail a PostgreSQL query)
        # Keyed by owner too: another key's job stays a 404.
        row = await self.reads.get(
            ("job", job_id, principal.owner),
            lambda: asyncio.to_thread(self.store.get_job, job_id, principal.owner))
        if row is None:
            raise not_found(job_id)
        return row

    def _reconcile_at_most_every_s(self, row: JobRow, seconds: float = 1.0) -> JobRow:
        """Ask Ray about a job with no progress actor, at most once a second per job."""
        now = time.monotonic()
        if now - self._checked.get(row.id, 0.0) < seconds:
            return row
        if len(self._checked) > 10_000:
            self._checked.clear()
        self._checked[row.id] = now
        try:
            return self.reconciler.reconcile(row, check_live=False)
        except ClusterUnavailable as exc:
            log.warning("cannot reconcile %s: %s", row.id, exc)
            return row

    async def _sources(self, row: JobRow) -> tuple[JobRow, Optional[dict[str, Any]]]:
        """What a job's view is made of now: its row, and its live progress if it runs; a
        job that ended is reconciled with Ray first."""
        if row.terminal:
            self.reader.forget(row.id)
            return row, None
        live = await self.reader.get(row.id)
        if live is not None and live.get("state") not in TERMINAL:
            if RANK.get(live.get("state", ""), -1) > RANK[row.state]:
                # A step forward (running, writing) is stored as soon as it is seen, so the
                # job list, other replicas and a reader after the actor is gone never show
                # an earlier state.
                row = await asyncio.to_thread(self.reconciler.apply_live, row, live)
            return row, live
        if live is not None:
            row = await asyncio.to_thread(self.reconciler.apply_live, row, live)
        else:
            row = await asyncio.to_thread(self._reconcile_at_most_every_s, row)
        return row, None

    async def _current(self, row: JobRow) -> dict[str, Any]:
        """A job's view now: live progress if it runs, reconciled with Ray if it ended."""
        return job_view(*await self._sources(row))

    async def _list_rows(self, principal: Principal, states: Optional[list[str]], limit: int,
                         offset: int) -> tuple[list[JobRow], int]:
        """The rows of a page, and the total. The first page is kept (``reads``) at its
        largest size, ``LIST_MAX`` rows, once per set of states, and cut to ``limit`` when
        answered: what a replica keeps per key is then bounded by the sets of states, not by
        the spellings of a query. Later pages are read from the store each time."""
        if offset:
            return await asyncio.to_thread(self.store.list_jobs, principal.owner, states=states,
                                           limit=limit, offset=offset, brief=True)
        return await self.reads.get(
            ("list", principal.owner, tuple(states or ())),
            lambda: asyncio.to_thread(self.store.list_jobs, principal.owner, states=states,
                                      limit=LIST_MAX, brief=True))

    @staticmethod
    def _list_page(page: tuple[list[JobRow], int], limit: int,
                   offset: int) -> dict[str, Any]:
        rows, total = page
        rows = rows[:limit]
        nxt = offset + len(rows)
        return {"jobs": [job_view(r, detail=False) for r in rows], "total": total,
                "limit": limit, "offset": offset, "next_offset": nxt if nxt < total else None}

    async def hot_read(self, path: str, query: str,
                       authorization: Optional[str]) -> Optional[bytes]:
        """The body of the 200 answer to ``GET /v1/jobs`` or ``GET /v1/jobs/{id}``, the same
        JSON as the routes below give, or None for any other answer, which the routes then
        give (see serve/fastpath.py). The rate limiter's token is taken only for an answer
        given here."""
        try:
            body = await self._hot_body(path, query, authorization)
        except ApiError:
            return None
        if body is not None:
            self.hot_reads += 1
        return body

    async def _hot_body(self, path: str, query: str,
                        authorization: Optional[str]) -> Optional[bytes]:
        if path == JOBS_PATH:
            params = query_params(query, ("state", "limit", "offset"))
            if params is None:
                return None
            limit = small_int(params.get("limit"), 20, 1, LIST_MAX)
            offset = small_int(params.get("offset"), 0, 0)
            if limit is None or offset is None:
                return None
            states = parse_states(params.get("state"))
            principal = await self.auth.authenticate(authorization)
            if self.limiter.acquire(principal.owner) is not None:
                return None
            page = await self._list_rows(principal, states, limit, offset)
            if offset:  # read afresh each time (_list_rows): nothing to reuse
                return encode(self._list_page(page, limit, offset))
            key = ("list", principal.owner, tuple(states or ()))
            return self._bodies.get(key, (page,), lambda: self._list_page(page, limit, offset),
                                    variant=limit)
        if query_params(query, ()) is None:
            return None
        principal = await self.auth.authenticate(authorization)
        row = await self._row(path[len(JOBS_PATH) + 1:], principal)
        if self.limiter.acquire(principal.owner) is not None:
            return None
        row, live = await self._sources(row)
        return self._bodies.get(("job", row.id), (row, live), lambda: job_view(row, live))

    def hot_read_count(self) -> int:
        """How many requests hot_read answered (through a deployment handle, for tests)."""
        return self.hot_reads

    def _create(self, principal: Principal, job_id: str, spec: DatasetSpec) -> JobRow:
        cap = self.settings.max_concurrent_jobs
        try:
            # The check and the insert are one statement in the store: replicas share it.
            return self.store.create_job(job_id, principal.owner, spec.name,
                                         spec.model_dump(mode="json"), spec.output_uri(),
                                         max_active=cap, queued=True)
        except TooManyJobs as exc:
            raise ApiError(429, "too_many_jobs",
                           f"this API key has {exc.active} jobs running or queued (the limit "
                           f"is {cap}); wait for one to end or cancel one",
                           headers={"Retry-After": "10"}) from None

    def _start(self, job_id: str) -> None:
        """Start what the scheduler lets start now (this job, if its turn has come); a 503
        if Ray refused this job."""
        refused = self.scheduler.start_ready()
        if job_id in refused:
            raise cluster_unavailable(job_id, "start")

    # -- routes -----------------------------------------------------------------------------

    # The two routes clients poll come first: Serve matches every request against the route
    # table, in order, to name its metrics.
    @app.get("/v1/jobs", summary="The caller's jobs, newest first")
    async def list_jobs(self, request: Request,
                        state: Optional[str] = Query(None, description="comma-separated "
                                                     "states: " + ", ".join(STATES)),
                        limit: int = Query(20, ge=1, le=LIST_MAX),
                        offset: int = Query(0, ge=0, le=MAX_OFFSET)) -> dict[str, Any]:
        principal = await self._caller(request)
        states = parse_states(state)
        page = await self._list_rows(principal, states, limit, offset)
        return self._list_page(page, limit, offset)

    @app.get("/v1/jobs/{job_id}", summary="A job: state, progress, rejects, output, error")
    async def get_job(self, job_id: str, request: Request) -> dict[str, Any]:
        principal = await self._caller(request)
        return await self._current(await self._row(job_id, principal))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page_route(self) -> HTMLResponse:
        # Never inside another site's frame: a page there could overlay it and have the
        # visitor click Submit or Cancel on a job of theirs (clickjacking).
        return HTMLResponse(self.page, headers={
            "X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'"})

    @app.get("/healthz", summary="Liveness and store check")
    async def healthz(self) -> dict[str, Any]:
        try:
            # One store check a second per replica, however many probes ask.
            await self.health.get("store", lambda: asyncio.to_thread(
                self.store.count_active, "-"))
        except SQLAlchemyError as exc:
            # The driver's text may name the database's host and user: the log has it, the
            # answer (to anyone: no key is needed here) does not.
            log.warning("health check: the job store does not answer: %s", exc)
            raise ApiError(503, "store_unavailable", "the job store does not answer; the "
                           "server's log has the details") from None
        return {"status": "ok", "auth": self.settings.auth}

    @app.get("/v1/example", summary="The example spec the page starts with")
    def example_route(self) -> dict[str, Any]:
        return {"spec": self.example, "auth": self.settings.auth}

    @app.post("/v1/jobs", status_code=202, summary="Submit a dataset spec (JSON or YAML)",
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": {"type": "object"}},
                  "application/yaml": {"schema": {"type": "string"}}}}})
    async def submit(self, request: Request) -> JSONResponse:
        principal = await self._caller(request)
        hold = SubmitHold(self.submits.take(principal.owner))
        try:
            return await self._submit(request, principal, hold)
        finally:
            hold.end()

    async def _submit(self, request: Request, principal: Any, hold: SubmitHold
                      ) -> JSONResponse:
        body = await read_body(request, self.settings.max_spec_bytes, self.settings.spec_body_s)
        try:
            # Off the event loop: a large spec takes a while to read, and every request waits
            # on the loop.
            spec = await self.spec_reader.read(body, request.headers.get("content-type", ""),
                                               hold)
            cluster = await self.cluster.get("total", lambda: asyncio.to_thread(
                cluster_for_jobs, self.settings.num_replicas))
            await asyncio.to_thread(self.store.prune_ended, principal.owner,
                                    self.settings.keep_ended_jobs,
                                    int(self.settings.keep_ended_mb * 1_000_000))
            row = await asyncio.to_thread(with_fresh_id, spec, lambda job_id: self._create(
                principal, job_id, apply_policy(self.policy, spec, principal.owner, job_id,
                                                cluster)))
        except SpecError as exc:
            raise spec_error(exc) from None
        except PolicyRefused as exc:
            raise policy_error(exc) from None
        job_id = row.id
        await asyncio.to_thread(self._start, job_id)
        row = await asyncio.to_thread(self.store.get_job, job_id) or row
        body_out = job_view(row)
        return JSONResponse(body_out, status_code=202,
                            headers={"Location": f"/v1/jobs/{job_id}"})

    @app.delete("/v1/jobs/{job_id}", status_code=202, summary="Cancel a job")
    async def cancel(self, job_id: str, request: Request) -> JSONResponse:
        principal = await self._caller(request)
        row = await self._row(job_id, principal)
        if row.terminal:
            raise ApiError(409, "job_finished", f"job {job_id} already ended ({row.state})")
        if await asyncio.to_thread(self.store.cancel_queued, job_id):
            return JSONResponse(await self._current(await self._row(job_id, principal)),
                                status_code=202)
        await asyncio.to_thread(self.store.update_job, job_id, cancel_requested=True)
        if not await asyncio.to_thread(request_cancel, job_id):
            # No progress actor yet: the driver is starting; SIGTERM stops it the same way.
            try:
                await asyncio.to_thread(self.launcher.stop, job_id)
            except ClusterUnavailable as exc:
                log.warning("job %s: Ray cannot stop it: %s", job_id, exc)
                raise cluster_unavailable(job_id, "stop") from None
        self.reader.forget(job_id)
        row = await self._row(job_id, principal)
        return JSONResponse(await self._current(row), status_code=202)

    @app.get("/v1/jobs/{job_id}/events", summary="Server-sent events: live progress",
             description="`event: progress` with the job's JSON (without its spec) once "
                         "per change, then `event: end` with the final JSON when it ended; "
                         "the state never goes back; `event: error` ends the stream of a key "
                         "revoked meanwhile, or with code `stream_expired` after "
                         "`max_stream_s` (reconnect). A key may have `max_streams_per_key` "
                         "streams open per replica; one more answers 429. "
                         "Send the key as `Authorization: Bearer <key>`; a browser's "
                         "EventSource, which cannot send headers, sends `?token=` with a "
                         "token from POST /v1/jobs/{id}/events/token instead. An API key "
                         "in the URL (`?key=`) is refused: URLs reach logs.")
    async def events(self, job_id: str, request: Request,
                     token: Optional[str] = Query(None, description="a stream token (POST "
                                                  "/v1/jobs/{id}/events/token)")
                     ) -> StreamingResponse:
        if self.auth.enabled and any(name.lower() == "key" for name in request.query_params):
            raise unauthorized("an API key is not taken in a URL, where proxies, servers and "
                               "browsers log it: send 'Authorization: Bearer <key>', or "
                               "`?token=` with a token from POST /v1/jobs/{id}/events/token")
        principal, expires = await self.auth.authenticate_stream(
            request.headers.get("authorization"), token, job_id)
        # A token's requests spend a bucket of their own: one read from a log cannot use up
        # the key's requests.
        self._limited(principal, "" if expires is None else TOKEN_BUCKET)
        row = await self._row(job_id, principal)
        max_s = self.settings.max_stream_s
        if expires is not None:
            max_s = min(max_s, max(0.0, expires - time.time()))

        async def still_valid() -> None:
            await self.auth.still_active(principal)

        # Nothing is awaited from here to the response's own release: the slot cannot leak.
        release = self.streams.take(principal.owner)
        return SlotStreamingResponse(
            self._stream(row, principal, still_valid, max_s, token=expires is not None),
            release,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/jobs/{job_id}/events/token", summary="A token that opens the job's event "
              "stream", description="For a browser's EventSource, which cannot send the API "
              "key in a header: `{token, expires_at, events_url}`. The token opens this job's "
              "event stream (`GET /v1/jobs/{id}/events?token=`) until `expires_at` (Unix "
              "seconds, `stream_token_s` from now) while the key is active, and nothing "
              "else: unlike the key, it may go into a URL.")
    async def events_token(self, job_id: str, request: Request) -> JSONResponse:
        principal = await self._caller(request)
        row = await self._row(job_id, principal)
        token, expires = await self.auth.stream_token(principal, row.id)
        return JSONResponse({"token": token, "expires_at": expires,
                             "events_url": f"/v1/jobs/{quote(row.id)}/events?token={token}"})

    async def _stream(self, row: JobRow, principal: Principal,
                      still_valid: Callable[[], Awaitable[None]],
                      max_s: float = float("inf"), token: bool = False) -> AsyncIterator[str]:
        """``progress`` once per change of the job (its ``updated_at`` alone is no change),
        then ``end`` with the final view; never a state earlier than one already sent. The
        key is checked again between events (through the key cache, ``key_cache_s``): a
        revoked key's stream ends with an ``error`` event. After ``max_s`` seconds the stream
        ends with an ``error`` event of code ``stream_expired``: the client reconnects (with
        a new token, for a stream opened with one: it ends when its ``token`` expires)."""
        last, beat, shown = None, time.monotonic(), row.state
        counted: dict[str, int] = {}
        interval = self.settings.events_interval_s
        deadline = time.monotonic() + max_s
        while True:
            if time.monotonic() >= deadline:
                why = ("its stream token has expired; get a new one (POST "
                       "/v1/jobs/{id}/events/token) and reconnect" if token else
                       f"event streams end after {max_s:g} s; reconnect")
                expired = {"error": {"code": "stream_expired", "message": f"{why} to go on"}}
                yield f"event: error\ndata: {json.dumps(expired)}\n\n"
                return
            view = event_view(await self._current(row))
            # A view read from a source a moment behind what was already sent (the store's
            # row once the job's progress actor is gone, before its end is recorded; counts
            # a resent unit took back) is skipped, the stream kept alive meanwhile.
            if later_state(view["state"], shown) == view["state"] and not (
                    view["state"] == shown and _counts_behind(view["progress"], counted)):
                shown = view["state"]
                counted = {k: view["progress"].get(k, 0) for k in _COUNTS}
                data = json.dumps(view, separators=(",", ":"))
                if view["state"] in TERMINAL:
                    yield f"event: end\ndata: {data}\n\n"
                    return
                change = {k: v for k, v in view.items() if k != "updated_at"}
                if change != last:
                    yield f"event: progress\ndata: {data}\n\n"
                    last, beat = change, time.monotonic()
            if time.monotonic() - beat > KEEP_ALIVE_S:
                yield ": keep-alive\n\n"
                beat = time.monotonic()
            await asyncio.sleep(interval)
            try:
                await still_valid()
            except ApiError as exc:
                yield f"event: error\ndata: {json.dumps(exc.body())}\n\n"
                return
            row = await self._row(row.id, principal)

    @app.get("/v1/jobs/{job_id}/samples", summary="Thumbnails of accepted images",
             description="While the job runs: `ready: false`. Once it ended: its dataset's "
                         "thumbnails (a `message` says why there may be fewer than asked "
                         "for), or 409 `no_dataset` when its output holds no dataset of its "
                         "own (it failed or was cancelled before writing one, or a later job "
                         "replaced it). 429 `samples_busy` with `Retry-After` when the "
                         "replica's thumbnail reads stay taken.")
    async def samples(self, job_id: str, request: Request,
                      label: Optional[str] = Query(None, description="one class"),
                      limit: int = Query(24, ge=1, le=MAX_SAMPLES)) -> dict[str, Any]:
        principal = await self._caller(request)
        row = await self._row(job_id, principal)
        labels = list(spec_classes(row))
        if label is not None and label not in labels:
            raise ApiError(404, "label_not_found", f"job {job_id} has no class {label!r}; "
                           f"its classes: {', '.join(labels)}")
        if row.state not in TERMINAL:
            return {"job_id": job_id, "label": label, "ready": False, "samples": [],
                    "message": "thumbnails are there once the job has written its dataset"}
        try:
            found = await self.samples.get(job_id, row.output_uri, label, limit, labels,
                                           principal.owner if self.auth.enabled else None)
        except NoDataset as exc:
            raise self._no_dataset(row, str(exc)) from None
        except SamplesBusy as exc:
            raise ApiError(429, "samples_busy", f"{exc}; retry after {BUSY_RETRY_S} s",
                           headers={"Retry-After": str(BUSY_RETRY_S)}) from None
        except StorageError as exc:
            log.warning("job %s: its output cannot be read for thumbnails: %s", job_id, exc)
            raise ApiError(502, "output_unreadable", f"job {job_id}'s dataset cannot be read "
                           "now; the server's log has the details") from None
        answer = {"job_id": job_id, "label": label, "ready": True, "samples": found.samples}
        if found.note:
            answer["message"] = found.note
        return answer

    @staticmethod
    def _no_dataset(row: JobRow, why: str) -> ApiError:
        """409 ``no_dataset``: the ended job has no dataset of its own to show."""
        if row.state == "cancelled" and row.started_at is None:
            how = "was cancelled before it started, so it wrote no dataset"
        elif row.state == "failed":
            how = f"failed ({row.error or 'no error recorded'})"
        else:
            how = f"ended ({row.state})"
        return ApiError(409, "no_dataset", f"job {row.id} {how}; it has no thumbnails: {why}")


def build_app(args: Optional[dict[str, Any]] = None) -> ray_serve.Application:
    """The Serve application (``import_path: serve.app:build_app`` in serve_config.yaml)."""
    settings = ServeSettings.model_validate(args or {}).resolved()
    JobStore(settings.store).close()  # fail here, not in a replica, if the store is unusable
    env = {USER_CODE_THREAD_ENV: "1" if settings.user_code_thread else "0",
           WORKER_NICENESS_ENV: str(settings.niceness)}
    return JobAPI.options(
        num_replicas=settings.num_replicas,
        ray_actor_options={"num_cpus": REPLICA_CPUS, "runtime_env": {"env_vars": env}},
        logging_config={"enable_access_log": settings.access_log},
    ).bind(settings.model_dump())
