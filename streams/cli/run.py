"""``modelwatch run``: everything on one machine.

It first checks everything it was given (profiles, thresholds, the log, sinks,
TLS files, the metrics port, the state folder) and stops with one line if
anything is wrong, before it starts anything. With no broker configured it then
starts the embedded one, creates the topics, starts the worker (and ``tail`` on
``--log``), and prints each alert as it fires.

The console stays readable: alert lines on stdout; on stderr only run's own
lines (the start, warnings about models or datasets that match no profile, a
periodic one-line summary of dead letters). What the worker and ``tail`` say
goes to ``run.log`` in the state folder.

The embedded broker keeps its data in memory, so state that belongs to it (the
worker's tables, tail's shipped position) lives in a fresh folder under the
state folder for each run, removed at the end: a second run in the same folder
ships and judges the log again. With ``--broker`` the state folder is used as
it is (it belongs to that broker), and a lock keeps a second run from sharing it.
Ctrl-C or SIGTERM stops everything it started, children first, then the broker.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

from streams.alerts import alert_line
from streams.settings import COMMAND_SETTINGS, Settings, settings_argv, settings_env
from streams.tabular import UserError
from streams.worker.broker import EmbeddedBroker

PARTITIONS = 8
DEADLETTER_SUMMARY_S = 10.0   # at most one dead-letter line per this many seconds
UNKNOWN_CHECK_S = 5.0         # how often the worker's metrics are read for unknown names
MAX_UNKNOWN_NAMES = 10        # names warned about one by one; more are counted on one line
LOG_NAME = "run.log"
NO_PROFILE_CHECKS = "only the checks that need no profile (rate, query similarity, PRADA)"


@dataclass
class Checked:
    """What ``run`` was given, checked: the names profiles cover, where logs go."""

    models: set[str] = field(default_factory=set)
    datasets: set[str] = field(default_factory=set)
    profiles: int = 0


def check_inputs(settings: Settings, log: Path | None, *, demo: bool = False) -> Checked:
    """Everything ``run`` needs, checked before anything starts; a ``UserError`` otherwise.

    With ``demo`` the profiles and state folder are the demo's own and not checked.
    """
    from streams.files import load_profile, read_thresholds

    checked = Checked()
    if settings.profiles is not None and not demo:
        if not settings.profiles.is_dir():
            raise UserError(f"{settings.profiles}: --profiles: not a folder of profiles")
        for path in sorted(settings.profiles.glob("*.json")):
            profile = load_profile(path)  # names the file and field when it is bad
            checked.models.add(profile.model)
            checked.datasets.add(profile.dataset or profile.model)
            checked.profiles += 1
    read_thresholds(settings.thresholds)
    if log is not None:
        if not log.exists():
            raise UserError(f"{log}: --log: no such file")
        if not log.is_file():
            raise UserError(f"{log}: --log: not a file")
        try:
            with open(log, "rb"):
                pass
        except OSError as exc:
            raise UserError(f"{log}: --log: cannot read: {exc.strerror}") from None
    for name in ("tls_ca", "tls_cert", "tls_key"):
        path = getattr(settings, name)
        if path is not None and not path.is_file():
            raise UserError(f"{path}: --{name.replace('_', '-')}: no such file")
    if settings.sinks:
        from streams.sinks import open_sink

        for url in (part.strip() for part in settings.sinks.split(",")):
            if url:
                open_sink(url)  # parses and checks the URL; connects only when used
    if settings.metrics_port:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("0.0.0.0", settings.metrics_port))
            except OSError as exc:
                raise UserError(f"--metrics-port {settings.metrics_port}: {exc.strerror} "
                                "(another modelwatch run or worker? choose another port, "
                                "or 0 to disable)") from None
    if demo:
        return checked
    try:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{settings.state_dir}: --state-dir: cannot create: {exc.strerror}") \
            from None
    if not os.access(settings.state_dir, os.W_OK):
        raise UserError(f"{settings.state_dir}: --state-dir: not writable")
    return checked


def create_topics(address: str, settings: Settings) -> None:
    """The four topics, on the broker at ``address`` (with the TLS and SASL settings)."""
    from streams.worker.kafka import create_topics as create

    create(replace(settings, broker=f"kafka://{address}"), {topic: PARTITIONS for topic in (
        settings.topic_inference, settings.topic_stats, settings.topic_alerts,
        settings.topic_deadletter)})


def _broker_with_topics(stack: ExitStack, settings: Settings) -> Settings:
    """The settings with the configured broker, or the embedded one (stopped with
    ``stack``); topics created."""
    if settings.broker is None:
        broker = stack.enter_context(EmbeddedBroker())
        settings = replace(settings, broker=broker.url)
    create_topics(settings.broker.removeprefix("kafka://"), settings)
    return settings


def _stop_on_sigterm() -> None:
    def stop(*_):
        raise KeyboardInterrupt  # unwinds like Ctrl-C: children, then the broker

    signal.signal(signal.SIGTERM, stop)
    # A shell without job control starts background commands with SIGINT ignored, and
    # Python keeps it so: run stops on SIGINT however it was started.
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _state_folder(stack: ExitStack, settings: Settings) -> Path:
    """Where the worker and tail keep state for this run (see the module docstring)."""
    if settings.broker is None:
        folder = Path(tempfile.mkdtemp(prefix="run-", dir=settings.state_dir))
        stack.callback(shutil.rmtree, folder, ignore_errors=True)
        return folder
    import fcntl

    lock = open(settings.state_dir / "run.lock", "w")  # noqa: SIM115 - held until the end
    stack.callback(lock.close)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise UserError(f"{settings.state_dir}: another modelwatch run uses this state folder; "
                        "give this one another --state-dir") from None
    return settings.state_dir


def run(settings: Settings, log: Path | None, checked: Checked | None = None) -> int:
    """Check, start the broker, the worker and tail; print alerts until stopped."""
    checked = checked if checked is not None else check_inputs(settings, log)
    _stop_on_sigterm()
    with ExitStack() as stack:
        state = _state_folder(stack, settings)
        log_path = settings.state_dir / LOG_NAME
        connected = _broker_with_topics(stack, settings)
        url = connected.broker
        watch = Watch(connected, checked)
        stack.callback(watch.close)
        print(f"run: broker {url}; alerts below (Ctrl-C stops everything)", flush=True)
        if settings.profiles is None:
            print(f"run: no --profiles: every model gets {NO_PROFILE_CHECKS}", file=sys.stderr)
        else:
            print(f"run: {checked.profiles} profiles in {settings.profiles} "
                  f"(models: {', '.join(sorted(checked.models)) or 'none'})", file=sys.stderr)
        if not settings.metrics_port:
            print("run: --metrics-port 0: models and datasets without a profile go unreported",
                  file=sys.stderr)
        print(f"run: messages of the worker and tail go to {log_path}", file=sys.stderr,
              flush=True)
        children_log = stack.enter_context(open(log_path, "ab"))
        children_log.write(f"--- modelwatch run {time.strftime('%Y-%m-%dT%H:%M:%S')} broker "
                           f"{url}\n".encode())
        children_log.flush()
        base = [sys.executable, "-m", "streams.cli"]
        state_flag = ["--state-dir", str(state)]
        worker_argv = [*base, "worker", "--broker", url, *_child_settings(settings, "worker"),
                       *state_flag]
        children = [subprocess.Popen(worker_argv, stdout=children_log, stderr=children_log,
                                     env=_child_env(settings, "worker"))]
        stack.callback(_stop_children, children)
        if log is not None:
            children.append(subprocess.Popen(
                [*base, "tail", str(log), "--broker", url, *_child_settings(settings, "tail"),
                 *state_flag], stdout=children_log, stderr=children_log,
                env=_child_env(settings, "tail")))
        _print_alerts(watch, children, log_path=log_path)
    return 0


def _child_env(settings: Settings, command: str) -> dict[str, str]:
    """This process's environment plus the child's secret settings (never in its argv)."""
    return {**os.environ, **settings_env(settings, COMMAND_SETTINGS[command])}


def _child_settings(settings: Settings, command: str) -> list[str]:
    """The settings a child command takes, as flags (the broker and state folder apart)."""
    names = [n for n in COMMAND_SETTINGS[command] if n not in ("broker", "state_dir")]
    return settings_argv(settings, names)


class Watch:
    """Reads the alerts and dead-letter topics and the worker's metrics for ``run``."""

    def __init__(self, settings: Settings, checked: Checked | None = None,
                 clock=time.monotonic):
        from kafka import KafkaConsumer, TopicPartition

        from streams.worker.kafka import client_options

        self.settings = settings
        self.checked = checked
        self.clock = clock
        self.consumer = KafkaConsumer(auto_offset_reset="earliest", enable_auto_commit=False,
                                      consumer_timeout_ms=500, **client_options(settings))
        alerts = [TopicPartition(settings.topic_alerts, p)
                  for p in self._partitions(settings.topic_alerts)]
        dead = [TopicPartition(settings.topic_deadletter, p)
                for p in self._partitions(settings.topic_deadletter)]
        self.consumer.assign(alerts + dead)
        self.consumer.seek_to_end(*dead)  # only this run's dead letters are summed up
        for tp in dead:
            self.consumer.position(tp)
        self.dead = DeadLetterSummary(settings.topic_deadletter, clock=clock)
        self.unknown = UnknownNames(checked.models if checked else set(),
                                    checked.datasets if checked else set())
        self._next_check = clock() + UNKNOWN_CHECK_S

    def _partitions(self, topic: str) -> list[int]:
        found = self.consumer.partitions_for_topic(topic)
        return sorted(found) if found else list(range(PARTITIONS))

    def poll(self) -> list[dict]:
        """New alerts (printed by the caller); dead letters and unknown names reported here."""
        alerts = []
        for record in self.consumer:
            if record.topic == self.settings.topic_alerts:
                alerts.append(json.loads(record.value))
            else:
                headers = dict(record.headers or [])
                self.dead.add(headers.get("reason", b"").decode(errors="replace"))
        line = self.dead.line()
        if line:
            print(line, file=sys.stderr, flush=True)
        if self.checked is not None and self.settings.metrics_port and \
                self.clock() >= self._next_check:
            self._next_check = self.clock() + UNKNOWN_CHECK_S
            for line in self.unknown.from_metrics(self._metrics(), self.settings):
                print(line, file=sys.stderr, flush=True)
        return alerts

    def _metrics(self) -> str:
        url = f"http://127.0.0.1:{self.settings.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.read().decode()
        except OSError:
            return ""  # not up yet

    def close(self) -> None:
        self.consumer.close()


class DeadLetterSummary:
    """Dead letters counted by the field or kind of their reason; one line now and then.

    >>> clock = iter([0.0, 0.0, 11.0, 12.0]).__next__
    >>> s = DeadLetterSummary("modelwatch-deadletter", clock=clock)
    >>> s.add("features: expected 64 values for model digits, got 3")
    >>> s.add("JSON is malformed: invalid character (byte 0)")
    >>> s.line()  # too soon after the start
    >>> s.line()
    'run: 2 bad records in the last 11 s (features 1, json 1; 2 since start) -> topic modelwatch-deadletter'
    >>> s.line()  # nothing new: nothing said
    """

    def __init__(self, topic: str, every_s: float = DEADLETTER_SUMMARY_S, clock=time.monotonic):
        self.topic, self.every_s, self.clock = topic, every_s, clock
        self.new: Counter = Counter()
        self.total = 0
        self.since = clock()

    def add(self, reason: str) -> None:
        from streams.metrics import reason_label

        self.new[reason_label(reason) if reason else "other"] += 1
        self.total += 1

    def line(self) -> str | None:
        now = self.clock()
        if not self.new or now - self.since < self.every_s:
            return None
        parts = ", ".join(f"{label} {n}" for label, n in self.new.most_common())
        text = (f"run: {sum(self.new.values())} bad records in the last {now - self.since:.0f} s "
                f"({parts}; {self.total} since start) -> topic {self.topic}")
        self.new.clear()
        self.since = now
        return text


class UnknownNames:
    """Models and datasets seen by the worker that match no profile: warned once each.

    >>> u = UnknownNames({"digits"}, {"digits-train"})
    >>> text = ('modelwatch_records_consumed_total{model="digits",topic="inference-logs"} 5.0\\n'
    ...         'modelwatch_records_consumed_total{model="fraud-v4",topic="inference-logs"} 9.0\\n'
    ...         'modelwatch_records_consumed_total{model="other-train",topic="training-stats"} 1.0\\n')
    >>> from streams.settings import resolve
    >>> import argparse
    >>> for line in u.from_metrics(text, resolve(argparse.Namespace(), environ={})):
    ...     print(line)  # doctest: +ELLIPSIS
    run: warning: model 'fraud-v4' matches no profile (9 events so far): it gets only the checks ...
    run: warning: dataset 'other-train' matches no profile (1 batches so far): its training batches are not checked for poisoning
    >>> list(u.from_metrics(text, resolve(argparse.Namespace(), environ={})))  # once per name
    []
    """

    def __init__(self, models: set[str], datasets: set[str], limit: int = MAX_UNKNOWN_NAMES):
        self.models, self.datasets, self.limit = models, datasets, limit
        self.warned: set[tuple[str, str]] = set()
        self.more = False

    def from_metrics(self, text: str, settings: Settings):
        from prometheus_client.parser import text_string_to_metric_families

        seen = []
        try:
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name != "modelwatch_records_consumed_total" or not sample.value:
                        continue
                    topic, name = sample.labels.get("topic"), sample.labels.get("model", "")
                    if topic == settings.topic_inference and name not in self.models:
                        seen.append(("model", name, sample.value))
                    elif topic == settings.topic_stats and name not in self.datasets:
                        seen.append(("dataset", name, sample.value))
        except ValueError:
            return
        yield from self.warn(seen)

    def warn(self, seen):
        """Lines for (kind, name, count) not warned about yet, at most ``limit`` names."""
        for kind, name, count in seen:
            if (kind, name) in self.warned:
                continue
            if len(self.warned) >= self.limit:
                if not self.more:
                    self.more = True
                    yield (f"run: warning: more models or datasets match no profile "
                           f"(only the first {self.limit} are named)")
                return
            self.warned.add((kind, name))
            yield unknown_line("run", kind, name, count)


def unknown_line(command: str, kind: str, name: str, count: float | None = None) -> str:
    """The warning for a model or dataset that matches no profile."""
    if kind == "model":
        so_far = f" ({count:.0f} events so far)" if count is not None else ""
        return (f"{command}: warning: model {name!r} matches no profile{so_far}: it gets "
                f"{NO_PROFILE_CHECKS}; profile it (modelwatch profile --model {name} ...) "
                "or fix the events' model field")
    so_far = f" ({count:.0f} batches so far)" if count is not None else ""
    return (f"{command}: warning: dataset {name!r} matches no profile{so_far}: its training "
            "batches are not checked for poisoning")


def _print_alerts(watch: Watch, children: list[subprocess.Popen],
                  until=lambda alerts: False, idle_s: float | None = None,
                  log_path: Path | None = None) -> list[dict]:
    """Print alerts as they arrive; stop when ``until(alerts)`` or after ``idle_s`` quiet."""
    alerts, last = [], time.monotonic()
    while not until(alerts) and (idle_s is None or time.monotonic() - last < idle_s):
        for alert in watch.poll():
            alerts.append(alert)
            print(alert_line(alert), flush=True)
            last = time.monotonic()
        for child in children:
            if child.poll() not in (None, 0):
                raise UserError(f"run: {' '.join(child.args[3:5])} exited with status "
                                f"{child.returncode}{_last_words(log_path)}")
        time.sleep(0.1)
    return alerts


def _last_words(log_path: Path | None) -> str:
    """The last line a child wrote to the log, to name why it stopped."""
    if log_path is None or not log_path.exists():
        return ""
    with open(log_path, "rb") as handle:
        handle.seek(max(0, log_path.stat().st_size - 4096))
        lines = [line for line in handle.read().decode(errors="replace").splitlines()
                 if line.strip()]
    return f": {lines[-1].strip()} (see {log_path})" if lines else f" (see {log_path})"


def run_demo(settings: Settings) -> int:
    """The built-in scenario through the streaming stack; exits once it is played."""
    from kafka import KafkaProducer

    from streams.demo.play import GENERATING, expected_detections, prepare, summary
    from streams.worker.kafka import client_options

    check_inputs(settings, None, demo=True)
    _stop_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="modelwatch-demo-") as tmp, ExitStack() as stack:
        folder = Path(tmp)
        print(GENERATING, file=sys.stderr)
        paths = prepare(folder)
        (folder / "profiles").mkdir()
        (folder / "profiles" / "demo.json").write_bytes(paths["profile"].read_bytes())
        truth = json.loads(paths["truth.json"].read_text())
        connected = _broker_with_topics(stack, settings)
        url = connected.broker
        print(f"modelwatch demo: broker {url}; starting the worker and shipping the log...",
              file=sys.stderr, flush=True)
        watch = Watch(connected)
        stack.callback(watch.close)
        base = [sys.executable, "-m", "streams.cli"]
        common = ["--broker", url, "--state-dir", str(folder / "state")]
        log_path = folder / LOG_NAME
        children_log = stack.enter_context(open(log_path, "ab"))
        worker_settings = _child_settings(settings, "worker")
        worker_settings = _drop_flags(worker_settings, ("--profiles",))
        children = [subprocess.Popen([*base, "worker", *common, *worker_settings,
                                      "--profiles", str(folder / "profiles")],
                                     stdout=children_log, stderr=children_log,
                                     env=_child_env(settings, "worker"))]
        stack.callback(_stop_children, children)
        subprocess.run([*base, "tail", str(paths["inference.jsonl"]), "--once", *common,
                        *_child_settings(settings, "tail")], check=True,
                       stdout=children_log, stderr=children_log, env=_child_env(settings, "tail"))
        producer = KafkaProducer(acks="all", **client_options(connected))
        for line in paths["stats"].read_bytes().splitlines():
            producer.send(settings.topic_stats, key=json.loads(line)["dataset"].encode(), value=line)
        producer.flush()
        producer.close()
        wanted = expected_detections(truth)

        def all_caught(alerts):
            seen = {a["modelwatch"].get("client_id") for a in alerts}
            return wanted <= seen | {a["modelwatch"].get("batch_id") for a in alerts}

        alerts = _print_alerts(watch, children, until=all_caught, idle_s=DEMO_IDLE_S,
                               log_path=log_path)
        caught = {a["modelwatch"].get("client_id") for a in alerts} | {
            a["modelwatch"].get("batch_id") for a in alerts}
        n_events = sum(1 for _ in paths["inference.jsonl"].open("rb"))
        print(summary(truth, caught, n_events, len(truth["batches"]), len(alerts)))
    return 0


DEMO_IDLE_S = 45.0  # the demo ends this long after its last alert if an attack goes unseen


def _drop_flags(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item in flags:
            skip = True
        else:
            out.append(item)
    return out


def _stop_children(children: list[subprocess.Popen]) -> None:
    for child in children:
        if child.poll() is None:
            child.terminate()
    for child in children:
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
