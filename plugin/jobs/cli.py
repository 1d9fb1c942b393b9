"""The `backpain-screen` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import orjson

from plugin import __version__

if TYPE_CHECKING:  # each command imports what it runs: `batch` need not load httpx, asyncio or the stores
    from collections import Counter

    from plugin.ehr.subscribe import Change
    from plugin.jobs.bulk import Line, Partition
    from plugin.screening.outcome import InvalidInput
    from plugin.screening.pipeline import Outcome, Settings
    from plugin.stores.store import Store
    from plugin.stores.writeback import Written

EXIT_SERVER = 1  # the FHIR server refused or could not be reached
EXIT_BAD_INPUT = 2
STRATEGIES = ("asas-2015", "nice-ng65")
SYNC_PAGE = 200  # plugin.stores.sync.PAGE (a test keeps them equal), here so the parser need not import sync


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from plugin.screening.pipeline import Settings

    base = getattr(args, "fhir_base_url", None) or os.environ.get("FHIR_BASE_URL") or None
    settings = Settings(strategy=getattr(args, "strategy", None), fhir_base=base)  # publish has no strategy
    from plugin.settings import SettingError

    try:
        return args.run(args, settings)
    except SettingError as error:  # e.g. BACKPAIN_PORT=abc: one line, not a traceback, from every command
        print(f"backpain-screen: a setting is not valid: {error}.", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:  # the reader went away (`... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backpain-screen",
        description="Screen back pain for axial spondyloarthritis and red flags (FHIR R4).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the plugin's HTTP service (the main job)")
    serve.add_argument("--host", help="address to listen on (default $BACKPAIN_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default $BACKPAIN_PORT or 8000)")
    serve.add_argument("--workers", type=int, help="worker processes (default $BACKPAIN_WORKERS or 1)")
    serve.add_argument("--store", help="the embedded store's file, used when no FHIR server is configured")
    serve.add_argument("--fhir-base-url", help="write to this FHIR server (default $FHIR_BASE_URL; unset: embedded)")
    _strategy(serve)
    serve.set_defaults(run=_serve)

    score = commands.add_parser("score", help="score one QuestionnaireResponse; print the transaction Bundle")
    score.add_argument("file", help="a QuestionnaireResponse in FHIR JSON or XML; - reads standard input")
    _strategy(score)
    score.set_defaults(run=_score)

    batch = commands.add_parser("batch", help="score NDJSON (FHIR Bulk Data): print the results, or --upload them")
    batch.add_argument("input", nargs="+", help="NDJSON files of QuestionnaireResponses (gzip or not), a Bulk Data "
                       "export manifest (.json), or - for standard input")
    batch.add_argument("-o", "--output", help="where to write NDJSON results (default: standard output)")
    batch.add_argument("--workers", type=int, default=1, help="worker processes for scoring (default 1)")
    batch.add_argument("--partition", default="0/1", help="score only partition i of n (0 <= i < n), e.g. "
                       "$(JOB_COMPLETION_INDEX)/4; responses are split by a hash of their identity")
    batch.add_argument("--upload", action="store_true", help="write each response and its results as submit "
                       "does, instead of printing them")
    batch.add_argument("--concurrency", type=int, default=8, help="responses written at once with --upload "
                       "(default 8)")
    batch.add_argument("--json", action="store_true", help="also print the summary as JSON on standard output "
                       "(with -o or --upload, so that it does not mix with the NDJSON results)")
    _server(batch)
    _strategy(batch)
    batch.set_defaults(run=_batch)

    publish = commands.add_parser("publish", help="put the Questionnaires, CodeSystems and Device on a FHIR server")
    _server(publish)
    publish.set_defaults(run=_publish)

    submit = commands.add_parser("submit", help="score a response and write it with its results to a FHIR server")
    submit.add_argument("file", help="a QuestionnaireResponse in FHIR JSON or XML; - reads standard input")
    _server(submit)
    _strategy(submit)
    submit.set_defaults(run=_submit)

    sync_ = commands.add_parser("sync", help="score responses on a FHIR server that lack current results")
    _server(sync_)
    sync_.add_argument("--since", help="start from this instant instead of the saved watermark (FHIR instant)")
    sync_.add_argument("--page-size", type=_page_size, default=SYNC_PAGE, metavar="N",
                       help=f"responses read per query; the watermark is saved after each page (1-1000, "
                            f"default {SYNC_PAGE})")
    sync_.add_argument("--state", type=Path, default=None,
                       help="the watermark file (default: $XDG_STATE_HOME/backpain-screen/sync-state.json)")
    _strategy(sync_)
    sync_.set_defaults(run=_sync)

    subscribe_ = commands.add_parser("subscribe", help="create or update the FHIR server's rest-hook Subscriptions "
                                     "that notify the plugin (secret from $BACKPAIN_NOTIFY_SECRET)")
    subscribe_.add_argument("--fhir-base-url", help="the EHR's FHIR server (default: $FHIR_BASE_URL)")
    subscribe_.add_argument("--endpoint", help="where the server sends notifications: the plugin's /notify "
                            "(default: $BACKPAIN_PUBLIC_URL/notify)")
    subscribe_.add_argument("--allow-http", action="store_true",
                            help="allow a plain-http endpoint on a public-looking host (on a private network only)")
    subscribe_.add_argument("--dry-run", action="store_true", help="say what would change and print the "
                            "Subscriptions (secret hidden); write nothing")
    subscribe_.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")
    subscribe_.set_defaults(run=_subscribe, store=None)
    return parser


def _server(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fhir-base-url", help="the FHIR server's base URL (default: $FHIR_BASE_URL; "
                        "without one, the embedded store)")
    parser.add_argument("--store", help="the embedded store's file (default: $BACKPAIN_STORE or "
                        "$XDG_STATE_HOME/backpain-screen/store.sqlite3)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default 30)")


def _client(args: argparse.Namespace) -> Store:
    """The FHIR server when one is given (flag or environment), else the embedded store."""
    from plugin.settings import service_settings
    from plugin.stores.store import open_store

    chosen = service_settings(fhir_base_url=args.fhir_base_url, store_path=args.store)
    # batch --upload keeps `--concurrency` responses in flight, each a read and then a transaction
    return open_store(chosen, timeout=args.timeout, concurrency=max(8, getattr(args, "concurrency", 8)))


def _publish(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from plugin.fhir.client import FhirError
    from plugin.screening.pipeline import Screener
    from plugin.stores.writeback import publish

    async def run() -> list[str]:
        async with _client(args) as client:
            return await publish(client, Screener(settings))

    try:
        published = asyncio.run(run())
    except FhirError as error:
        print(f"backpain-screen: {error}", file=sys.stderr)
        return EXIT_SERVER
    _print_json({"published": published})
    print(f"backpain-screen: published {len(published)} resources.", file=sys.stderr)
    return 0


def _submit(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from plugin.fhir.client import FhirError
    from plugin.screening import data
    from plugin.screening.outcome import InvalidInput
    from plugin.screening.parsing import parse_body
    from plugin.screening.pipeline import Screener
    from plugin.stores.writeback import prepare, raise_refusal, save

    data.remember_validation()  # scripts run one `submit` a response: validating at each start was half of it
    screener = Screener(settings)

    async def run() -> tuple[Outcome, list[Written]]:
        body, content_type = _read(args.file, settings.max_body_bytes)
        qr = parse_body(body, content_type, settings.max_body_bytes)
        job = prepare(screener, qr)  # bad input with no red flag is refused before the server is asked anything
        async with _client(args) as client:
            written = await save(client, job)
        raise_refusal(job)  # refused, but its red flags were written: exit 2, saying so
        return job.outcome, written

    try:
        outcome, written = asyncio.run(run())
    except InvalidInput as error:
        return _refuse(error)
    except FhirError as error:
        print(f"backpain-screen: {error} Nothing was written.", file=sys.stderr)
        return EXIT_SERVER
    _print_json({"outcome": outcome.label, "written": [{"resource": w.location, "status": w.status}
                                                       for w in written if w.changed],
                 "unchanged": [w.location for w in written if not w.changed]})
    created = sum(w.status == "201" for w in written if w.changed)
    updated = sum(w.changed for w in written) - created
    print(f"backpain-screen: outcome {outcome.label}; {created} created, {updated} updated, "
          f"{len(written) - created - updated} already there.", file=sys.stderr)
    return 0


def _page_size(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 1000:
        raise argparse.ArgumentTypeError("must be a whole number from 1 to 1000")
    return int(value)


def _sync(args: argparse.Namespace, settings: Settings) -> int:
    import asyncio

    from plugin.fhir.client import FhirError
    from plugin.screening.pipeline import Screener
    from plugin.stores.sync import SyncBusy, default_state_file, sync

    async def run() -> Counter:
        async with _client(args) as client:
            return await sync(client, Screener(settings), args.state or default_state_file(), args.since,
                              args.page_size)

    try:
        counts = asyncio.run(run())
    except SyncBusy as busy:
        print(f"backpain-screen: {busy}", file=sys.stderr)
        return 0
    except FhirError as error:
        print(f"backpain-screen: {error} The watermark stays where it was; run sync again.", file=sys.stderr)
        return EXIT_SERVER
    _print_json(dict(counts))
    summary_line = ", ".join(f"{n} {what}" for what, n in sorted(counts.items())) or "nothing new"
    print(f"backpain-screen: sync done: {summary_line}.", file=sys.stderr)
    return 0


def _subscribe(args: argparse.Namespace, _: Settings) -> int:
    import asyncio

    from plugin.ehr.subscribe import check_endpoint, check_secret, report, subscribe
    from plugin.fhir.client import FhirClient, FhirError
    from plugin.settings import service_settings

    public_url = os.environ.get("BACKPAIN_PUBLIC_URL")
    endpoint = args.endpoint or (f"{public_url.rstrip('/')}/notify" if public_url else None)
    try:
        if not service_settings(fhir_base_url=args.fhir_base_url).fhir_base_url:
            raise ValueError("subscribe needs a FHIR server (--fhir-base-url or FHIR_BASE_URL); "
                             "the embedded store sends no notifications")
        if not endpoint:
            raise ValueError("give --endpoint (the plugin's /notify URL as the FHIR server reaches it), "
                             "or set BACKPAIN_PUBLIC_URL")
        endpoint, warning = check_endpoint(endpoint, args.allow_http)
        secret = check_secret(os.environ.get("BACKPAIN_NOTIFY_SECRET"))
    except ValueError as error:
        print(f"backpain-screen: {error}.", file=sys.stderr)
        return EXIT_BAD_INPUT
    if warning:
        print(f"backpain-screen: warning: {warning}.", file=sys.stderr)

    async def run() -> list[Change]:
        async with _client(args) as client:
            assert isinstance(client, FhirClient)  # a FHIR server was checked for above
            return await subscribe(client, endpoint, secret, dry_run=args.dry_run)

    try:
        changes = asyncio.run(run())
    except FhirError as error:
        hint = " (changed by someone else meanwhile: run subscribe again)" if error.status in (409, 412) else ""
        print(f"backpain-screen: {error}{hint}", file=sys.stderr)
        return EXIT_SERVER
    _print_json(report(changes, endpoint, args.dry_run))
    counts = ", ".join(f"{sum(c.action == a for c in changes)} {a}" for a in ("created", "updated", "unchanged"))
    print(f"backpain-screen: Subscriptions{' (dry run)' if args.dry_run else ''}: {counts}.", file=sys.stderr)
    for change in changes:
        if change.duplicates:
            extra = ", ".join(f"Subscription/{d}" for d in change.duplicates)
            print(f"backpain-screen: warning: {extra} also notify about {change.questionnaire} "
                  f"(left alone; delete them to stop duplicate notifications).", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    """uvicorn with uvloop and httptools; each worker builds the app from the environment, so flags go there."""
    import functools

    import uvicorn

    from plugin.settings import SERVICE_SETTINGS, service_settings
    from plugin.web import slow_clients

    flags = {"host": args.host, "port": args.port, "workers": args.workers, "store_path": args.store,
             "fhir_base_url": args.fhir_base_url, "strategy": args.strategy}
    service = service_settings(**flags)  # a SettingError is said in one line by main(), as for every command
    service.check_client_limits()
    for name, value in flags.items():
        if value is not None:
            os.environ[SERVICE_SETTINGS[name][0]] = str(value)
    if not service.fhir_base_url and (problem := _unopenable(service.store_path)):
        print(f"backpain-screen: cannot serve: {problem}", file=sys.stderr)  # one line, not a startup traceback
        return EXIT_SERVER
    where = service.fhir_base_url or f"the embedded store {service.store_path}"
    print(f"backpain-screen: serving on http://{service.host}:{service.port}, writing to {where}", file=sys.stderr)
    http = functools.partial(slow_clients.HeaderDeadline, header_seconds=service.header_seconds)
    uvicorn.run("plugin.app:from_environment", factory=True, host=service.host, port=service.port,
                workers=service.workers, loop="uvloop", http=http,  # type: ignore[arg-type]  # a protocol factory
                log_level=service.log_level, access_log=False, proxy_headers=True, server_header=False,
                timeout_keep_alive=service.keep_alive_seconds, limit_concurrency=slow_clients.MAX_CONNECTIONS)
    return 0


def _unopenable(path: Path) -> str | None:
    """Why the embedded store cannot be opened (read-only, no access), or None. A full disk is not refused
    here: the service starts, answers 503 while it lasts, and writes again when space returns."""
    import asyncio

    from plugin.fhir.client import FhirError
    from plugin.stores.sqlite import SqliteStore

    async def probe() -> None:
        async with SqliteStore(path):
            pass

    try:
        asyncio.run(probe())
    except FhirError as error:
        return str(error)
    return None


def _refuse(error: InvalidInput) -> int:
    """Bad input: the OperationOutcome on standard output, one sentence on standard error."""
    _print_json(error.to_fhir())
    print(f"backpain-screen: {error.summary()}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _print_json(value: dict) -> None:
    sys.stdout.buffer.write(orjson.dumps(value, option=orjson.OPT_INDENT_2) + b"\n")


def _strategy(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strategy", choices=STRATEGIES, default=None,
                        help="referral strategy (default asas-2015)")


def _score(args: argparse.Namespace, settings: Settings) -> int:
    from plugin.screening import data
    from plugin.screening.outcome import InvalidInput
    from plugin.screening.pipeline import Screener, recorded

    data.remember_validation()  # start-up is most of one `score`
    screener = Screener(settings)
    try:
        body, content_type = _read(args.file, settings.max_body_bytes)
        outcome = screener.process_body(body, content_type)
    except InvalidInput as error:
        return _refuse(recorded(error) if error.rescued else error)
    _print_json(outcome.bundle)
    print(f"backpain-screen: outcome {outcome.label}", file=sys.stderr)
    return 0


def _read(name: str, limit: int) -> tuple[bytes, str | None]:
    """Reads at most limit + 1 bytes, so an oversized file is refused without loading it."""
    from plugin.screening.outcome import invalid

    if name == "-":
        return sys.stdin.buffer.read(limit + 1), None
    path = Path(name)
    try:
        with path.open("rb") as handle:
            body = handle.read(limit + 1)
    except OSError as error:
        raise invalid("not-found", f"Cannot read {name}: {error.strerror}.") from None
    return body, "application/fhir+xml" if path.suffix.lower() == ".xml" else None


def _batch(args: argparse.Namespace, settings: Settings) -> int:
    from plugin.jobs.bulk import BadInput, check_readable, expand, owned
    from plugin.screening import data

    data.remember_validation()  # a short batch is mostly start-up

    try:
        partition = _batch_options(args)
        inputs, other_files = expand(args.input)
        check_readable(inputs)
    except (ValueError, BadInput) as error:
        print(f"backpain-screen: {error}.", file=sys.stderr)
        return EXIT_BAD_INPUT
    if other_files:
        print(f"backpain-screen: {other_files} files of other resource types in the manifest are not read.",
              file=sys.stderr)
    unreadable: list[str] = []  # inputs that broke off (a truncated gzip): the others are still scored
    lines = owned(inputs, settings.max_body_bytes, partition, unreadable)
    status = (_batch_upload if args.upload else _batch_ndjson)(args, settings, lines)
    for problem in unreadable:
        print(f"backpain-screen: {problem}; the lines before that were scored, the rest of that file was not.",
              file=sys.stderr)
    return status or (EXIT_BAD_INPUT if unreadable else 0)


def _batch_ndjson(args: argparse.Namespace, settings: Settings, lines: Iterator[Line]) -> int:
    from plugin.jobs.batch import run_batch, summary
    from plugin.jobs.summary import as_json as summary_json

    try:
        with ExitStack() as stack:  # closing the file is a write too: a failure there lands below as well
            try:
                sink = _open(stack, args.output or "-", "wb", sys.stdout.buffer)
            except OSError as error:
                print(f"backpain-screen: cannot open {error.filename}: {error.strerror}.", file=sys.stderr)
                return EXIT_BAD_INPUT
            counts = run_batch(lines, sink, settings, args.workers, progress=sys.stderr.isatty())
    except BrokenPipeError:
        raise  # the reader went away: main() stops quietly
    except OSError as error:  # a full disk: the output is incomplete, and says so
        print(f"backpain-screen: cannot write {args.output or 'standard output'}: {error.strerror}; "
              "the output is incomplete.", file=sys.stderr)
        return EXIT_SERVER
    print(f"backpain-screen: {summary(counts)}", file=sys.stderr)
    if args.json:
        _print_json(summary_json(counts))
    return 0


def _batch_options(args: argparse.Namespace) -> Partition:
    from plugin.jobs.bulk import Partition

    if args.workers < 1 or args.concurrency < 1:
        raise ValueError("--workers and --concurrency must be 1 or more")
    if args.upload and args.output:
        raise ValueError("--upload writes to the store: -o/--output is not used with it")
    if not args.upload and (args.fhir_base_url or args.store):
        raise ValueError("--fhir-base-url and --store are for --upload")
    if args.json and not (args.upload or (args.output and args.output != "-")):
        raise ValueError("--json prints on standard output, where the results go: use it with -o FILE or --upload")
    return Partition.parse(args.partition)


def _batch_upload(args: argparse.Namespace, settings: Settings, lines: Iterator[Line]) -> int:
    import asyncio

    from plugin.fhir.client import FhirError
    from plugin.jobs.batch import Report, progress_bar
    from plugin.jobs.summary import as_json as summary_json
    from plugin.jobs.upload import FAILED, upload, upload_summary

    report = Report()

    async def run() -> None:
        async with _client(args) as client:
            await upload(lines, client, settings, workers=args.workers, concurrency=args.concurrency,
                         report=report, progress=bar)

    bar = progress_bar(sys.stderr.isatty())
    try:
        asyncio.run(run())
    except FhirError as error:  # the store could not be opened (a failed write is counted, never raised)
        print(f"backpain-screen: {error} Nothing was written.", file=sys.stderr)
        return EXIT_SERVER
    finally:
        bar.close()
    print(f"backpain-screen: {upload_summary(report)}", file=sys.stderr)
    if args.json:
        _print_json(summary_json(report.counts, report.writes))
    if report.writes[FAILED]:
        print(f"backpain-screen: {report.writes[FAILED]} responses were not written; run the same command again "
              "(what is already written is left as it is).", file=sys.stderr)
        return EXIT_SERVER
    return 0


def _open(stack: ExitStack, name: str, mode: str, standard: BinaryIO) -> BinaryIO:
    if name == "-":
        return standard
    return stack.enter_context(open(name, mode, buffering=1 << 20))


if __name__ == "__main__":
    sys.exit(main())
