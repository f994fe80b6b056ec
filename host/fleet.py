"""``latentlink fleet status``: what the fleet's broker holds: the frames waiting (messages, bytes, per stream), the
workers' consumer (pending, acknowledgements pending, redelivered) and the marks of written frames."""

import asyncio
import json
import sys

from latentlink.edge.cli import ArgumentParser, run_main

from . import jetstream as fleet

EXAMPLES = """examples:
  latentlink fleet status --jetstream nats://127.0.0.1:4222
  latentlink fleet status --jetstream nats://broker:4222 --json       (for scripts)"""


def get_args_parser():
    parser = ArgumentParser(prog="latentlink fleet", description=__doc__.split(":", 1)[1].strip(), epilog=EXAMPLES)
    parser.add_argument("action", choices=["status"], help="status: the broker's backlog and consumers")
    parser.add_argument("--jetstream", required=True, metavar="URL", help="the NATS server (nats://HOST:PORT)")
    parser.add_argument("--json", action="store_true", help="print the status as one JSON object")
    return parser


async def read_status(url):
    """The status as a dict: ``stream`` (messages, bytes, limits, per-stream messages), ``consumers`` (name ->
    pending, ack_pending, redelivered, waiting), ``marks`` (keys in the marks bucket), or ``stream`` None when no
    gateway or worker created it yet."""
    from nats.js.errors import NotFoundError

    nc = await fleet.connect(url, "latentlink-fleet-status")
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info(fleet.STREAM, subjects_filter=fleet.SUBJECT_PREFIX + ">")
        except NotFoundError:
            return {"url": url, "stream": None, "consumers": {}, "marks": None}
        subjects = info.state.subjects or {}
        status = {"url": url, "stream": {
            "name": fleet.STREAM, "messages": info.state.messages, "bytes": info.state.bytes,
            "max_age_s": info.config.max_age, "max_bytes": info.config.max_bytes,
            "duplicate_window_s": info.config.duplicate_window,
            "per_stream": {s[len(fleet.SUBJECT_PREFIX):].replace("=", "."): n for s, n in sorted(subjects.items())}},
            "consumers": {}, "marks": None}
        for consumer in await js.consumers_info(fleet.STREAM):
            status["consumers"][consumer.name] = {
                "pending": consumer.num_pending, "ack_pending": consumer.num_ack_pending,
                "redelivered": consumer.num_redelivered, "waiting": consumer.num_waiting,
                "ack_wait_s": consumer.config.ack_wait}
        try:
            marks = await js.stream_info("KV_" + fleet.MARKS)
            status["marks"] = marks.state.messages
        except NotFoundError:
            pass
        return status
    finally:
        await nc.close()


def format_status(status):
    stream = status["stream"]
    if stream is None:
        return "{}: no stream {} yet (start a gateway: latentlink host --jetstream URL)".format(status["url"],
                                                                                            fleet.STREAM)
    lines = ["JetStream stream {name} on {url}: {messages} frames waiting, {bytes:,} bytes (limits: {age}, {max:,} "
             "bytes; duplicate window {dup:g} s)".format(url=status["url"], age="{:g} s".format(stream["max_age_s"])
                                                         if stream["max_age_s"] else "no age limit",
                                                         max=stream["max_bytes"], dup=stream["duplicate_window_s"],
                                                         **stream)]
    for name, n in stream["per_stream"].items():
        lines.append("  stream {:<24} {:>9} frames waiting".format(name, n))
    for name, c in sorted(status["consumers"].items()):
        lines.append("consumer {}: {pending} not yet delivered, {ack_pending} delivered and not acknowledged, "
                     "{redelivered} being redelivered, {waiting} worker requests waiting (ack-wait {ack_wait_s:g} s)"
                     .format(name, **c))
    if not status["consumers"]:
        lines.append("no consumer yet (start a worker: latentlink worker --jetstream URL --out DIR)")
    if status["marks"] is not None:
        lines.append("marks bucket {}: {} frames claimed or written within its TTL".format(fleet.MARKS,
                                                                                        status["marks"]))
    return "\n".join(lines)


def main(argv=None):
    return run_main(_main, argv)


def _main(argv):
    args = get_args_parser().parse_args(argv)
    fleet.check_url(args.jetstream)
    fleet._nats()
    status = asyncio.run(read_status(args.jetstream))
    print(json.dumps(status, sort_keys=True) if args.json else format_status(status))
    return 0


if __name__ == "__main__":
    sys.exit(main())
