"""The ``modelwatch`` command line (contract v1).

User mistakes (bad flags, unreadable or malformed files) end with one line on
stderr naming the file, line and field, and exit status 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from pathlib import Path

import msgspec
import numpy as np

from detectors.config import ConfigError
from streams.settings import COMMAND_SETTINGS, add_arguments, resolve
from streams.tabular import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UserError(f"{self.prog.removeprefix('modelwatch ')}: {message} (see --help)")


def _profile(args) -> int:
    from detectors.profile import ProfileError, build_profile
    from streams.files import write_profile
    from streams.tabular import read_table

    X, y, names = read_table(args.data, args.label_column)
    complete = ~np.isnan(X).any(1)  # rows with empty cells say nothing about joint structure
    try:
        profile = build_profile(X[complete], y[complete], names, model=args.model,
                                dataset=args.dataset or args.model, label_column=args.label_column)
    except ProfileError as exc:
        raise UserError(f"{args.data}: {exc}") from None
    write_profile(profile, args.out)
    print(f"profile: {len(X)} rows, {len(names)} features, {len(profile.classes)} classes "
          f"-> {args.out}", file=sys.stderr)
    for note in profile.notes:  # rules this training set is too small to calibrate
        print(f"profile: warning: {note}", file=sys.stderr)
    return 0


def _stats(args) -> int:
    from streams.files import load_profile
    from streams.records import parse_ts
    from streams.stats import stats_event_from_csv

    settings = resolve(args) if args.kafka else None
    if settings is not None and settings.broker is None:
        raise UserError("stats: --kafka needs --broker or MODELWATCH_BROKER")
    try:
        ts = parse_ts(args.ts) if args.ts is not None else time.time()
    except ValueError:
        raise UserError(f"stats: --ts: not an RFC 3339 time: {args.ts!r}") from None
    profile = load_profile(args.profile)
    dataset = profile.dataset or profile.model  # what the worker matches batches on
    if args.dataset is not None and args.dataset != dataset:
        raise UserError(f"{args.profile}: field 'dataset' is {dataset!r}, but --dataset is "
                        f"{args.dataset!r}: a batch is judged only against its dataset's "
                        "profile (leave --dataset out, or profile again with --dataset)")
    event = stats_event_from_csv(args.profile, args.batch, dataset=dataset, source=args.source,
                                 batch_id=args.batch_id, ts=ts, profile=profile)
    line = msgspec.json.encode(event)
    if settings is None:
        sys.stdout.buffer.write(line + b"\n")
        return 0
    from streams.worker.kafka import send_one

    where = send_one(settings, settings.topic_stats, key=dataset.encode(), value=line)
    print(f"stats: batch {args.batch_id} -> {where}", file=sys.stderr)
    return 0


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def _replay(args) -> int:
    from streams.files import load_profile, read_thresholds
    from streams.replay import replay, write_alerts

    if args.inference_log is None and args.training_stats is None:
        raise UserError("replay: give --inference-log, --training-stats or both")
    from streams.explain import Scores, key_of
    from streams.pipeline import DATASET_TOTAL

    thresholds = read_thresholds(args.thresholds)
    profiles = [load_profile(p) for p in args.profile]
    scores = Scores(set(args.explain)) if args.explain or args.report is not None else None
    result = replay(profiles, thresholds, inference_log=args.inference_log,
                    training_stats=args.training_stats, deadletter=args.deadletter,
                    scores=scores, partitions=args.partitions)
    write_alerts(result.alerts, args.alerts_out)
    if args.report is not None:
        from streams.report.html import write_report

        pipeline = result.pipeline
        sources = [k for k in pipeline.sources if not k.endswith(DATASET_TOTAL)]
        write_report([msgspec.to_builtins(a) for a in result.alerts], args.report,
                     summary={"events": result.events, "batches": result.batches,
                              "clients_judged": len(pipeline.clients),
                              "sources_judged": len(sources),
                              "dead_letters": result.rejected, "late": result.late},
                     near_misses=scores.near_misses({key_of(a) for a in result.alerts}))
    if args.explain:
        print("\n".join(scores.lines(result.alerts)))
    print(f"replay: {result.events} events, {result.batches} training batches, "
          f"{len(result.alerts)} alerts -> {args.alerts_out}", file=sys.stderr)
    if result.late:
        print(f"replay: {result.late} events were far out of time order in the log and were "
              "judged after later ones", file=sys.stderr)
    if result.rejected:
        where = f" -> {args.deadletter}" if args.deadletter else " (give --deadletter to keep them)"
        print(f"replay: {result.rejected} bad records skipped{where}", file=sys.stderr)
    _warn_unprofiled(result, args.training_stats)
    return 0


def _warn_unprofiled(result, training_stats: Path | None) -> None:
    """One warning line per model or dataset that matched no profile (bounded)."""
    from streams.cli.run import MAX_UNKNOWN_NAMES, unknown_line

    pipeline = result.pipeline
    unknown = [("model", m) for m in sorted(set(pipeline.labels) - set(pipeline.profiles))]
    if pipeline.counters.unprofiled_batches and training_stats is not None:
        unknown += [("dataset", d) for d in
                    sorted(_datasets(training_stats) - set(pipeline.dataset_profiles))]
    for kind, name in unknown[:MAX_UNKNOWN_NAMES]:
        print(unknown_line("replay", kind, name), file=sys.stderr)
    if len(unknown) > MAX_UNKNOWN_NAMES:
        print(f"replay: warning: {len(unknown) - MAX_UNKNOWN_NAMES} more models or datasets "
              "match no profile", file=sys.stderr)


class _Dataset(msgspec.Struct):
    dataset: str


def _datasets(path: Path) -> set[str]:
    """The dataset names of a training-stats file (lines that do not parse are skipped)."""
    decoder = msgspec.json.Decoder(_Dataset)
    names = set()
    with open(path, "rb") as handle:
        for raw in handle:
            with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
                names.add(decoder.decode(raw).dataset)
    return names


def _worker(args) -> int:
    from streams.files import load_profile, read_thresholds

    settings = resolve(args)
    if settings.broker is None:
        raise UserError("worker: needs --broker or MODELWATCH_BROKER")
    profiles = []
    if settings.profiles is not None:
        if not settings.profiles.is_dir():
            raise UserError(f"{settings.profiles}: not a folder of profiles")
        profiles = [load_profile(p) for p in sorted(settings.profiles.glob("*.json"))]
    thresholds = read_thresholds(settings.thresholds)
    import faust

    from streams.metrics import WorkerMetrics
    from streams.sinks import open_sinks
    from streams.worker.app import build_app, topic_partitions

    outboxes = open_sinks(settings.sinks)
    from kafka.errors import KafkaError

    from streams.worker.kafka import cannot_connect

    try:
        partitions = topic_partitions(settings, [settings.topic_inference, settings.topic_stats])
    except KafkaError as exc:
        raise cannot_connect(settings, exc) from None
    metrics = WorkerMetrics()
    try:
        metrics.serve(settings.metrics_port)
    except OSError as exc:
        raise UserError(f"--metrics-port {settings.metrics_port}: {exc.strerror}") from None
    app = build_app(settings, profiles, thresholds, partitions=partitions, metrics=metrics,
                    outboxes=outboxes)
    from streams.worker.startup import start_clean_if_stale

    start_clean_if_stale(app, settings)  # else a ConsistencyError at every start
    print(f"worker: {len(profiles)} profiles, consuming {settings.topic_inference} and "
          f"{settings.topic_stats} from {settings.broker}", file=sys.stderr)
    worker = faust.Worker(app, loglevel=args.log_level, quiet=True)
    worker.execute_from_commandline()
    return 0


def _interrupt(*_):
    raise KeyboardInterrupt


def tail_checkpoint(settings, path: str) -> Path:
    """Where ``tail`` keeps its position for ``path`` by default: in the state dir, named
    after the file (the compose file's tail healthcheck looks for ``tail-*.json``)."""
    import hashlib

    name = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:12]
    return settings.state_dir / f"tail-{Path(path).name}-{name}.json"


def _tail(args) -> int:
    from streams.cli.tail import Checkpoint, follow

    settings = resolve(args)
    if settings.broker is None:
        raise UserError("tail: needs --broker or MODELWATCH_BROKER")
    checkpoint_path = args.checkpoint
    if checkpoint_path is None and args.path != "-":
        try:
            settings.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{settings.state_dir}: cannot create: {exc.strerror}") from None
        checkpoint_path = tail_checkpoint(settings, args.path)
    if args.once and args.path != "-" and not Path(args.path).exists():
        raise UserError(f"{args.path}: cannot read: no such file")
    convert = None
    if args.format == "oip":
        from streams.cli.tail import oip_converter
        from streams.files import load_profile

        if args.profile is None:
            raise UserError("tail --format oip: needs --profile (it says how to read the tensors)")
        convert = oip_converter(load_profile(args.profile), args.client_field)
    shipper = _shipper(settings, args, convert=convert)
    signal.signal(signal.SIGTERM, _interrupt)  # stopped as a service: flush and checkpoint first
    try:
        follow(args.path, shipper, Checkpoint(checkpoint_path), once=args.once)
    finally:
        shipper.close()
        print(f"tail: {shipper.shipped} events shipped, {shipper.rejected} bad lines to "
              f"{settings.topic_deadletter}", file=sys.stderr)
    return 0


def _shipper(settings, args, **options):
    """A Shipper sized by the command's --batch-events and --linger-ms flags."""
    from streams.cli.tail import Shipper

    return Shipper(settings, batch_events=args.batch_events, linger_s=args.linger_ms / 1000,
                   **options)


def _intake_kserve(args) -> int:
    import asyncio

    from streams.files import load_profile
    from streams.intake.kserve import Receiver, serve

    settings = resolve(args)
    if settings.broker is None:
        raise UserError("intake kserve: needs --broker or MODELWATCH_BROKER")
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--listen {args.listen}: expected HOST:PORT")
    if args.pair_timeout <= 0 or args.max_pending < 1:
        raise UserError("--pair-timeout and --max-pending must be positive")
    profile = load_profile(args.profile)
    shipper = _shipper(settings, args)
    receiver = Receiver(shipper, profile, args.client_header, wait_s=args.pair_timeout,
                        max_pending=args.max_pending, source_header=args.source_header)

    async def main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await serve(receiver, host.strip("[]"), int(port), stop=stop)
        except OSError as exc:
            raise UserError(f"--listen {args.listen}: {exc.strerror}") from None

    try:
        asyncio.run(main())
    finally:
        shipper.close()
        print(f"intake kserve: {receiver.received} CloudEvents received, {shipper.shipped} events "
              f"shipped, {shipper.rejected} to {settings.topic_deadletter}", file=sys.stderr)
    return 0


def _run(args) -> int:
    if args.demo and args.offline:
        from streams.demo.play import play_demo_offline

        return play_demo_offline(args.thresholds)
    from streams.cli.run import check_inputs, run, run_demo

    settings = resolve(args)
    if args.demo:
        return run_demo(settings)
    checked = check_inputs(settings, args.log)  # before anything starts
    return run(settings, args.log, checked)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="modelwatch", description=(
        "Streaming security monitor for ML systems: model extraction, adversarial queries, "
        "training-data poisoning."))
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("profile", help="profile a training set (CSV or Parquet)")
    p.add_argument("--model", required=True, metavar="NAME",
                   help="the model's name, as in the inference events' model field "
                        "(a name, not a model file)")
    p.add_argument("--data", required=True, type=Path, help="training data, header row")
    p.add_argument("--label-column", required=True, help="the label's column")
    p.add_argument("--dataset", help="dataset name, as in training-stats events (default: model)")
    p.add_argument("--out", required=True, type=Path, help="profile JSON to write")
    p.set_defaults(func=_profile)

    p = sub.add_parser("stats", help="one training batch (CSV) -> one training-stats event")
    p.add_argument("--profile", required=True, type=Path,
                   help="the reference profile of the batch's dataset")
    p.add_argument("--dataset", help="dataset name; must be the profile's (default: the profile's)")
    p.add_argument("--source", required=True,
                   help="who supplied the batch (a vendor, feed or pipeline): the poisoning "
                        "detectors compare each source with its own history")
    p.add_argument("--batch-id", required=True, help="the batch's id, carried into alerts")
    p.add_argument("--ts", help="event time, RFC 3339 (default: now)")
    p.add_argument("--kafka", action="store_true",
                   help="send the event to the training-stats topic instead of stdout")
    p.add_argument("batch", type=Path, help="batch CSV with the profile's columns")
    add_arguments(p)
    p.set_defaults(func=_stats)

    p = sub.add_parser("replay", help="run the detectors over recorded files, write alerts")
    p.add_argument("--profile", action="append", type=Path, default=[],
                   help="reference profile (repeat for several models)")
    p.add_argument("--inference-log", type=Path, help="inference events, one JSON per line")
    p.add_argument("--training-stats", type=Path, help="training-stats events, one JSON per line")
    p.add_argument("--alerts-out", required=True, type=Path, help="alerts, one ECS JSON per line")
    p.add_argument("--deadletter", type=Path, help="bad records with file, line and reason")
    p.add_argument("--thresholds", type=Path, help="thresholds TOML overriding the defaults")
    p.add_argument("--partitions", type=positive_int, default=1,
                   help="judge as a worker reading an inference topic of this many partitions "
                        "does (the same alerts); default 1")
    p.add_argument("--report", type=Path, help="also write a self-contained HTML report here")
    p.add_argument("--explain", action="append", default=[], metavar="KEY",
                   help="print each rule's best score against its threshold for KEY: a client id, "
                        "model/client, a dataset, dataset/source or a batch id (repeatable)")
    p.set_defaults(func=_replay)

    p = sub.add_parser("tail", help="follow an inference log (like tail -F) and ship it to Kafka")
    p.add_argument("path", help="the log file, or - for standard input")
    p.add_argument("--once", action="store_true", help="ship what is there, then exit")
    p.add_argument("--checkpoint", type=Path,
                   help="where the shipped position is kept (default: in the state dir)")
    p.add_argument("--batch-events", type=int, default=500, help="events per flush at most")
    p.add_argument("--linger-ms", type=float, default=200.0,
                   help="longest wait before a partial batch is sent")
    p.add_argument("--format", choices=("events", "oip"), default="events",
                   help="events: contract inference events (default); oip: one JSON object a "
                        "line with a served request and response (Open Inference Protocol v2, "
                        "or KServe v1), mapped with --profile")
    p.add_argument("--profile", type=Path,
                   help="with --format oip: the served model's reference profile")
    p.add_argument("--client-field", default="client_id", metavar="PATH",
                   help="with --format oip: where a line holds the client id, a dotted path "
                        "(e.g. headers.x-api-key; default client_id)")
    add_arguments(p)
    p.set_defaults(func=_tail)

    p = sub.add_parser("intake", help="receive inferences from a serving stack, ship them to Kafka")
    intake = p.add_subparsers(dest="intake", required=True, parser_class=_Parser)
    p = intake.add_parser("kserve", help="KServe inference-logger CloudEvents over HTTP")
    p.add_argument("--listen", default="0.0.0.0:8080", metavar="HOST:PORT",
                   help="where the logger's url points (default 0.0.0.0:8080)")
    p.add_argument("--profile", type=Path, required=True,
                   help="the served model's reference profile (maps tensors to features)")
    p.add_argument("--client-header", required=True, metavar="NAME",
                   help="the header that names the client (e.g. X-Api-Key), as KServe's "
                        "logger forwards it (metadataHeaders)")
    p.add_argument("--source-header", metavar="NAME",
                   help="the forwarded header holding the client's address (e.g. "
                        "X-Forwarded-For; first hop), if the logger forwards one")
    p.add_argument("--pair-timeout", type=float, default=30.0, metavar="S",
                   help="longest wait for a request's response (or the reverse), seconds")
    p.add_argument("--max-pending", type=int, default=10_000,
                   help="unpaired halves kept at most; the oldest go to the dead-letter topic")
    p.add_argument("--batch-events", type=int, default=500, help="events per flush at most")
    p.add_argument("--linger-ms", type=float, default=200.0,
                   help="longest wait before a partial batch is sent")
    add_arguments(p, [n for n in COMMAND_SETTINGS["tail"] if n != "state_dir"])
    p.set_defaults(func=_intake_kserve)

    p = sub.add_parser("worker", help="the streaming worker: detectors on Kafka, alerts out")
    p.add_argument("--log-level", default="warning", help="worker log level")
    add_arguments(p)
    p.set_defaults(func=_worker)

    p = sub.add_parser("run", help="everything on one machine: embedded broker, worker, tail")
    p.add_argument("--demo", action="store_true",
                   help="play the built-in scenario through the stack and print its alerts")
    p.add_argument("--offline", action="store_true",
                   help="with --demo: play it through replay, without a broker")
    p.add_argument("--log", type=Path,
                   help="an inference log to follow and ship (checked before anything starts)")
    add_arguments(p)
    p.set_defaults(func=_run)

    from streams.cli.forward import add_forward_parser
    from streams.dashboards.push import add_dashboards_parser

    add_dashboards_parser(sub)
    add_forward_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (UserError, ConfigError) as exc:
        print(f"modelwatch: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
