"""The ``pixcrawler`` command line.

    pixcrawler demo                      sandbox web + a small 3-class dataset, end to end
    pixcrawler build SPEC [--local|--ray] [--address A] [--output URI] [--resume]
    pixcrawler retry-failed URI          retry transient failures, merge the new images
    pixcrawler check SPEC [--engines]    validate a spec and print it with defaults filled in;
                                         --engines: probe each source once and say if it works
    pixcrawler recheck URI               re-evaluate a dataset's opt-out signals; list removals
    pixcrawler sandbox [--port P]        run the sandbox web (offline stand-in for the internet)

    pixcrawler serve / keys              the HTTP job API and its API keys (``serve.cli``)

Exit codes: 0 done (a shortfall is reported, not an error, unless --strict: 4); 2 bad spec or
arguments; 1 the job failed; 3 nothing was accepted; 130 cancelled (a partial result is written
and marked); 141 the reader of the output went away (``pixcrawler check spec.yaml | head``).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from typing import Any, Optional

import yaml

from builder.errors import (CancelledUnpublished, PixCrawlerError, SpecError, printable,
                            printable_lines)
from builder.spec import (DatasetSpec, load_spec, loads_spec, parse_spec,
                          require_trusted_networks, require_trusted_opt_outs)
from builder.worker_start import StartedWorkers, local_workers

log = logging.getLogger("pixcrawler")

EXIT_FAILED, EXIT_USAGE, EXIT_EMPTY, EXIT_SHORTFALL, EXIT_CANCELLED = 1, 2, 3, 4, 130
EXIT_PIPE = 141
"""What a shell reports for a command that its pipe's reader closed early (128 + SIGPIPE)."""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("ray", "filelock", "asyncio", "urllib3", "aiobotocore", "botocore", "s3fs"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _apply_overrides(spec: DatasetSpec, args: argparse.Namespace) -> DatasetSpec:
    data = spec.model_dump(mode="json", exclude_unset=False)
    if getattr(args, "output", None):
        data["output"]["uri"] = args.output
    if getattr(args, "overwrite", False):
        data["output"]["overwrite"] = True
    # (a spec the API saved, --spec-env, is read as saved again)
    return parse_spec(data, "spec with command-line overrides",
                      stored=bool(getattr(args, "spec_env", None)))


def _storage_options(uri: str) -> Optional[dict[str, Any]]:
    endpoint = os.environ.get("PIXCRAWLER_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    if uri.startswith("s3://") and endpoint:
        return {"endpoint_url": endpoint}
    return None


def run_spec(spec: DatasetSpec, *, address: Optional[str], local: bool, job_id: Optional[str],
             strict: bool, dashboard: bool = False, resume: bool = False,
             continuation: Any = None, uri: Optional[str] = None, ray: bool = False) -> int:
    """Run a spec with a progress display and a summary; returns the exit code. ``local`` /
    ``ray`` force a runner; otherwise ``choose_runner`` picks one and the log says which."""
    from cluster.runner import choose_runner

    choice = choose_runner(spec, address=address, local=local, ray=ray, dashboard=dashboard)
    log.info("%s", choice.describe())
    started = None
    if not choice.ray and (workers := local_workers(spec)):
        # Before the runner's imports: the workers' own imports run alongside them.
        started = StartedWorkers(workers)
    try:
        return _run_chosen(spec, choice.ray, started, address=address, job_id=job_id,
                           strict=strict, dashboard=dashboard, resume=resume,
                           continuation=continuation, uri=uri)
    finally:
        if started is not None:
            started.close()  # the job closed them already, unless it failed before starting


def observed(info: dict[str, Any], dashboard: bool) -> bool:
    """Whether a Ray job needs its progress actor (``run_job_async``): not on an embedded
    Ray that this command started without a dashboard, which is this command's alone, so no
    one else could follow the job there."""
    return dashboard or not (info["started"] and info["mode"] == "embedded")


def _run_chosen(spec: DatasetSpec, on_ray: bool, started: Optional[StartedWorkers], *,
                address: Optional[str], job_id: Optional[str], strict: bool, dashboard: bool,
                resume: bool, continuation: Any, uri: Optional[str]) -> int:
    from builder.card import empty_cause
    from builder.journal import new_job_id
    from cluster.display import ProgressDisplay, summary

    uri = uri or spec.output_uri()
    if continuation is not None:
        job_id = continuation.job_id
    elif not resume:
        job_id = job_id or new_job_id(spec)
    display = ProgressDisplay(job_id or "resume")
    stop_request = None
    kwargs = dict(job_id=job_id, uri=uri, progress=display, resume=resume,
                  continuation=continuation, storage_options=_storage_options(uri))
    try:
        if not on_ray:
            from builder.pipeline import run_local

            result = run_local(spec, install_signals=True, started=started, **kwargs)
        else:
            import asyncio

            from cluster.connect import connect, shutdown
            from cluster.coordinator import run_job_async

            info = connect(address, dashboard=dashboard)
            try:
                log.info("[%s] Ray %s (%s), %g CPUs%s", job_id, info["mode"], info["address"],
                         info["resources"].get("CPU", 0),
                         f", dashboard {info['dashboard_url']}" if info.get("dashboard_url")
                         else "")
                result = asyncio.run(run_job_async(spec, install_signals=True,
                                                   observed=observed(info, dashboard), **kwargs))
                if result.stats.get("partial_reason") == "cancelled" and \
                        result.stats.get("cancelled_by") == "request":
                    # A signal came from Ray's own stop (then Ray records STOPPED) or from
                    # outside Ray; a request (the API, the progress actor) needs asking.
                    from cluster.rayjob import stop_request as ray_job_stop_request

                    stop_request = ray_job_stop_request()
            finally:
                if info["started"]:
                    shutdown()
    finally:
        display.close()
    summary(result.stats, result.uri)
    if result.stats.get("partial_reason") == "empty":
        print(f"error: no image was accepted, so {result.uri} is not a dataset (marked "
              f"_PARTIAL). {empty_cause(result.stats)}", file=sys.stderr)
        return EXIT_EMPTY
    if result.partial and result.stats.get("partial_kept"):
        print(f"the dataset stays partial (its crawl was "
              f"{printable(str(result.stats['partial_reason']))} "
              "before this retry); `pixcrawler build SPEC --resume` continues it",
              file=sys.stderr)
        return 0
    if result.partial:
        if stop_request is not None:
            # A Ray job cancelled on request: Ray records it as STOPPED only if its
            # supervisor stops it (cluster/rayjob.py).
            from cluster.rayjob import end_as_stopped

            sys.stdout.flush()
            sys.stderr.flush()
            end_as_stopped(stop_request)
        return EXIT_CANCELLED
    if strict and result.stats.get("shortfall"):
        return EXIT_SHORTFALL
    return 0


def _spec_from_args(args: argparse.Namespace) -> DatasetSpec:
    """The spec from a file, or (``--spec-env VAR``) from JSON in an environment variable: how
    the HTTP API hands a spec to a Ray job without a filesystem the nodes share."""
    if bool(args.spec) == bool(args.spec_env):
        raise SpecError([("(arguments)", "give a spec file or --spec-env VAR, not both or none")])
    if args.spec:
        return load_spec(args.spec)
    text = os.environ.get(args.spec_env)
    if text is None:
        raise SpecError([("(arguments)", f"--spec-env: environment variable {args.spec_env} "
                          "is not set")])
    # A spec the API saved when it queued the job, maybe before an upgrade: read as saved.
    return loads_spec(text, f"${args.spec_env}", stored=True)


TRUST_HELP = ("request private, loopback and link-local addresses where the dataset's spec "
              "sets download.allow_private_networks (refused otherwise: pass it only for a "
              "dataset you trust)")
OPT_OUTS_HELP = ("keep the dataset's own opt-out settings where they honour less than the "
                 "defaults (robots.txt or an opt-out signal turned off, a host faster than its "
                 "published policy; refused otherwise: pass it only for a dataset you trust)")


def _require_contact(spec: DatasetSpec) -> None:
    """A crawl of the public web must name its operator in the User-Agent."""
    from builder.profiles import contact_problem

    problem = contact_problem(spec)
    if problem:
        raise SpecError([("download.contact", problem)])


def cmd_build(args: argparse.Namespace) -> int:
    spec = _apply_overrides(_spec_from_args(args), args)
    _require_contact(spec)
    return run_spec(spec, address=args.address, local=args.local, job_id=args.job_id,
                    strict=args.strict, dashboard=args.dashboard, resume=args.resume,
                    ray=args.ray)


def cmd_retry_failed(args: argparse.Namespace) -> int:
    from builder.pipeline import count_retryable, plan_retry

    uri = args.output
    spec, cont = plan_retry(uri, _storage_options(uri), args.job_id,
                            allow_private_networks=args.allow_private_networks,
                            allow_weaker_opt_outs=args.allow_weaker_opt_outs)
    if not count_retryable(uri, _storage_options(uri)):
        print(f"nothing to retry: no candidate at {uri} was rejected for a transient reason")
        return 0
    return run_spec(spec, address=args.address, local=args.local, job_id=None, strict=False,
                    dashboard=args.dashboard, continuation=cont, uri=uri, ray=args.ray)


def cmd_check(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    _require_contact(spec)
    print(yaml.safe_dump(spec.public_dump(), sort_keys=False))
    if not args.engines:
        return 0
    from builder.engines.probe import probe_sources, probe_table

    results = probe_sources(spec)
    print(probe_table(results))
    return 0 if all(r.ok for r in results) else EXIT_FAILED


def cmd_recheck(args: argparse.Namespace) -> int:
    from builder.recheck import (check_destination, check_source, dataset_spec, needs_contact,
                                 recheck, write_removals, write_without)

    uri, options = args.uri, _storage_options(args.uri)
    if args.write:  # before the origins are asked: a published dataset, to where it can go
        check_source(uri, options)
        check_destination(uri, args.write, overwrite=args.overwrite, storage_options=options,
                          out_storage_options=_storage_options(args.write))
    published = dataset_spec(uri, options)
    require_trusted_networks(published, uri, "recheck", args.allow_private_networks)
    require_trusted_opt_outs(published, uri, "recheck", args.allow_weaker_opt_outs)
    download = published.download
    if args.contact:
        download = download.model_copy(update={"contact": args.contact})
    if needs_contact(uri, download, options):
        raise SpecError([("--contact", "the dataset's images are on the public web and its "
                          "spec names no operator in the User-Agent: pass --contact "
                          "you@example.org (or a URL)")])
    result = recheck(uri, mode="full" if args.full else "origins", download=download,
                     storage_options=options)
    write_removals(result, args.out, _storage_options(args.out))
    by_signal = ", ".join(f"{k} {v}" for k, v in sorted(result.by_signal().items()))
    print(f"checked {result.checked} images on {result.origins} origins ({result.mode}): "
          f"{len(result.removals)} to remove{f' ({by_signal})' if by_signal else ''}"
          f"{f', {result.unreachable} unreachable (kept)' if result.unreachable else ''}; "
          f"removal list: {args.out}")
    if not args.write:
        return 0
    copy = write_without(uri, result, args.write, overwrite=args.overwrite,
                         storage_options=options,
                         out_storage_options=_storage_options(args.write))
    if copy.partial_reason == "empty":
        print(f"error: the recheck removed every image, so {copy.uri} is not a dataset "
              f"(marked _PARTIAL); {args.out} lists each image and the signal that removed it",
              file=sys.stderr)
        return EXIT_EMPTY
    if copy.partial_reason:
        print(f"dataset without them: {copy.uri}, marked _PARTIAL as {uri} is (its crawl: "
              f"{printable(copy.partial_reason)}); `pixcrawler build SPEC --resume` continues "
              "the source")
        return 0
    print(f"dataset without them: {copy.uri}")
    return 0


def demo_spec(base_url: str, output: str, target: int, classes: list[str]) -> dict[str, Any]:
    """The demo's spec: the sandbox engine, every class, faults included."""
    return {
        "name": "demo",
        "description": "PixCrawler demo dataset built from the offline sandbox web.",
        "target": target,
        "classes": {c: [f"{c} photo"] for c in classes},
        "sources": [{"engine": "sandbox", "url": base_url, "per_page": 20}],
        "download": {"timeout_s": 1.5, "retries": 1, "backoff_s": 0.1,
                     "max_bytes": 2_000_000, "allow_private_networks": True},
        "validation": {"level": "medium"},
        "output": {"uri": output, "overwrite": True, "shard_size": 50},
    }


def demo_output_taken(uri: str) -> Optional[str]:
    """Why the demo, which replaces its own earlier dataset, must not write to ``uri``: a
    dataset or an interrupted job there that another spec made (None if there is none)."""
    from builder.journal import resumable_jobs
    from builder.writers import read_marker

    marker = read_marker(uri) or {}
    jobs = [j for j in resumable_jobs(uri) if not j.startswith("demo-")]
    theirs = marker.get("job_id") or ""
    if marker and not theirs.startswith("demo-"):
        return f"{uri} holds a dataset the demo did not build (job {theirs or '?'})"
    if jobs:
        return f"{uri} holds an interrupted job the demo did not start ({', '.join(jobs)})"
    return None


def cmd_demo(args: argparse.Namespace) -> int:
    from builder.sandbox import SandboxWeb

    taken = demo_output_taken(args.output)
    if taken:
        print(f"pixcrawler demo: error: {printable(taken)}; the demo replaces what it wrote "
              "before, so give it another --output", file=sys.stderr)
        return 1
    classes = args.classes
    with SandboxWeb(classes=classes, images_per_class=args.images_per_class,
                    slow_s=3.0) as web:
        spec = parse_spec(demo_spec(web.base_url, args.output, args.target, classes), "demo")
        log.info("sandbox web at %s; building %d classes x %d images into %s", web.base_url,
                 len(classes), args.target, args.output)
        return run_spec(spec, address=args.address, local=args.local, job_id=None,
                        strict=False, dashboard=args.dashboard, ray=args.ray)


def cmd_sandbox(args: argparse.Namespace) -> int:
    from builder.sandbox import serve_forever

    try:
        serve_forever(host=args.host, port=args.port, classes=args.classes,
                      images_per_class=args.images_per_class)
    except OSError as exc:  # cannot listen there (start() says why): as `serve` reports it
        print(f"pixcrawler sandbox: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def count_arg(text: str) -> int:
    """An argparse type: a whole number, 0 or more."""
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative: give 0 or more")
    return value


def port_arg(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free one) to 65535."""
    value = _whole_number(text)
    if not 0 <= value <= 65_535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port: give 0-65535 (0: any "
                                         "free one)")
    return value


def classes_arg(text: str) -> list[str]:
    """An argparse type: comma-separated class names, each named once."""
    names = text.split(",")
    if "" in names:
        raise argparse.ArgumentTypeError(f"{text!r} has an empty class name: separate the "
                                         "names with single commas, as in cat,dog")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"{', '.join(map(repr, twice))} given more than "
                                         "once: name each class once")
    return names


def job_id_arg(text: str) -> str:
    """An argparse type: a job id as the output's files and folders are named after it."""
    from builder.writers import JOB_ID_RE

    if not JOB_ID_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a job id: use letters, digits, '.', "
                                         "'_' and '-', starting with a letter or digit")
    return text


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (unset, or a flag)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False):
            return action.help or ""
        return super()._get_help_string(action) or ""


def _with_help_formatter(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``HelpFormatter`` for the parser and every subcommand's parser below it."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _with_help_formatter(child)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pixcrawler")
    except PackageNotFoundError:
        return "unknown (not installed; pip install -e .)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pixcrawler", description="Build image datasets on Ray.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"pixcrawler {_version()}")
    sub = p.add_subparsers(dest="command", required=True, help="what to do")

    def runner_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else no "
                        "cluster: this process, or an embedded Ray; see 'Runners' in the README)")
        where = sp.add_mutually_exclusive_group()
        where.add_argument("--local", action="store_true",
                           help="run in this process without Ray (the default for a job that "
                           "fits this machine: see 'Runners' in the README)")
        where.add_argument("--ray", action="store_true",
                           help="run on Ray (the default when joining a cluster, for a job that "
                           "needs GPUs, custom worker resources or more cores than this machine "
                           "has, and on a machine of more than 4 cores)")
        sp.add_argument("--dashboard", action="store_true",
                        help="run on Ray (as --ray) and, with an embedded Ray, also start the "
                        "Ray dashboard on 127.0.0.1")

    b = sub.add_parser("build", help="build a dataset from a spec (YAML or JSON)")
    b.add_argument("spec", nargs="?", help="the spec file (YAML or JSON)")
    b.add_argument("--spec-env", metavar="VAR", help="read the spec (JSON or YAML) from this "
                   "environment variable instead of a file, as the HTTP API hands it over: a "
                   "field an earlier version saved and this one refuses is read with a "
                   "warning, not refused")
    b.add_argument("--output", help="output URI (local path or s3://...), overrides output.uri")
    b.add_argument("--overwrite", action="store_true",
                   help="replace the dataset there (complete or partial)")
    b.add_argument("--job-id", type=job_id_arg, help="job id (default: <name>-<random>)")
    b.add_argument("--strict", action="store_true", help="exit 4 when a class falls short")
    b.add_argument("--resume", action="store_true",
                   help="continue the interrupted job (or partial dataset) at the output URI")
    runner_args(b)
    b.set_defaults(func=cmd_build)

    r = sub.add_parser("retry-failed", help="retry candidates rejected for transient reasons "
                       "(timeouts, 5xx, 429, connection errors) and merge what is accepted")
    r.add_argument("output", help="the dataset's URI")
    r.add_argument("--job-id", type=job_id_arg,
                   help="job id (default: <name>-retry-<random>)")
    r.add_argument("--allow-private-networks", action="store_true", help=TRUST_HELP)
    r.add_argument("--allow-weaker-opt-outs", action="store_true", help=OPT_OUTS_HELP)
    runner_args(r)
    r.set_defaults(func=cmd_retry_failed)

    c = sub.add_parser("check", help="validate a spec; print it with defaults filled in")
    c.add_argument("spec", help="the spec file (YAML or JSON)")
    c.add_argument("--engines", action="store_true", help="probe each source once: works / "
                   "blocked / needs a key / down / ended / unavailable (exit 1 unless all "
                   "work)")
    c.set_defaults(func=cmd_check)

    rc = sub.add_parser("recheck", help="re-evaluate the opt-out signals of a built dataset's "
                        "images and list those to remove")
    rc.add_argument("uri", help="the dataset's URI")
    rc.add_argument("--full", action="store_true", help="request every image again (headers "
                    "and embedded XMP too), not only each origin's robots.txt / tdmrep.json / "
                    "ai.txt")
    rc.add_argument("--out", default="recheck-removals.csv",
                    help="where to write the removal list (CSV; a path or URI)")
    rc.add_argument("--write", metavar="URI", help="also write a new dataset without them here")
    rc.add_argument("--overwrite", action="store_true", help="replace a dataset at --write")
    rc.add_argument("--contact", help="your email or URL for the User-Agent, when the "
                    "dataset's spec has none")
    rc.add_argument("--allow-private-networks", action="store_true", help=TRUST_HELP)
    rc.add_argument("--allow-weaker-opt-outs", action="store_true", help=OPT_OUTS_HELP)
    rc.set_defaults(func=cmd_recheck)

    d = sub.add_parser("demo", help="build a small dataset from the sandbox web, offline")
    d.add_argument("--output", default="./datasets/demo", help="output URI")
    d.add_argument("--target", type=int, default=20, help="images per class")
    d.add_argument("--classes", type=classes_arg, default="cat,dog,bird",
                   help="comma-separated class names")
    d.add_argument("--images-per-class", type=count_arg, default=40,
                   help="images the sandbox web holds per class")
    runner_args(d)
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("sandbox", help="serve the sandbox web (search + images + faults)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=port_arg, default=8800,
                   help="port to listen on (0: any free one)")
    s.add_argument("--classes", type=classes_arg, default="cat,dog,bird",
                   help="comma-separated class names")
    s.add_argument("--images-per-class", type=count_arg, default=200,
                   help="images served per class")
    s.set_defaults(func=cmd_sandbox)
    from serve.cli import add_commands

    add_commands(sub)
    return _with_help_formatter(p)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "local", False) and getattr(args, "dashboard", False):
        # --dashboard means Ray (as --ray, which the parser already refuses with --local)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error("argument --dashboard: not allowed with argument --local")
    _setup_logging(args.verbose)
    try:
        code = args.func(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # The reader went away (`pixcrawler check spec.yaml | head`): nothing more to say.
        # stdout points at /dev/null from here, so the interpreter's last flush is quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE
    except SpecError as exc:
        print(f"error: {printable_lines(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except CancelledUnpublished as exc:
        print(f"cancelled: {printable_lines(str(exc))}", file=sys.stderr)
        return EXIT_CANCELLED
    except PixCrawlerError as exc:
        print(f"error: {printable_lines(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_CANCELLED


def entry() -> None:
    """The ``pixcrawler`` command (and ``python -m cluster.cli``): ``main``, then exit.

    The objects still alive are frozen out of the garbage collector first: the interpreter's
    last collections at exit would walk all of them (every imported module's) for nothing,
    about 0.2 s a command here. Only the command does this; ``main`` leaves the caller's
    collector alone."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
