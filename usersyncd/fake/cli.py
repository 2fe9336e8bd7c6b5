"""`python -m usersyncd.fakeapi` (or `usersyncd.fake`): the fake API in a process of its own."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading

from usersyncd.fake.server import FakeApi


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or stdin's end, if asked), then exit 0."""
    p = argparse.ArgumentParser(
        prog="python -m usersyncd.fakeapi",
        description="A fake of the subscriber batch API on loopback; prints 'listening on URL'.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--requests", dest="limit_requests", type=int, metavar="N", help="quota")
    p.add_argument("--window", type=float, default=3600.0, help="quota window, seconds")
    p.add_argument("--api-key", default="test-key")
    p.add_argument("--auth", default="bearer", help="bearer | basic | header:NAME")
    p.add_argument("--latency", type=float, default=0.0, help="seconds each request is held")
    p.add_argument("--max-batch", type=int, default=1000)
    p.add_argument("--max-body-bytes", type=int)
    p.add_argument("--batch-path", default="/subscribers/batches")
    p.add_argument("--flavour", default="indexed", help="indexed | drip (Drip's paths and answers)")
    p.add_argument("--account-id", default="9999999", help="the drip flavour's account id")
    p.add_argument("--retry-after-on-429", action="store_true")
    p.add_argument("--rate-limit-remaining-header", action="store_true")
    p.add_argument("--journal-length", metavar="FILE", help="8-byte file to publish the journal length in")
    p.add_argument(
        "--exit-on-stdin-eof", action="store_true", help="stop when stdin closes (the parent died)"
    )
    opts = vars(p.parse_args(argv))  # the remaining dests equal FakeApi's keyword names
    host, port, latency = opts.pop("host"), opts.pop("port"), opts.pop("latency")
    journal_length, watch_stdin = opts.pop("journal_length"), opts.pop("exit_on_stdin_eof")
    try:
        fake = FakeApi(**opts)
    except ValueError as exc:
        p.error(str(exc))  # exits 2
    fake.latency = latency
    if journal_length:
        fake.publish_journal_length(journal_length)
    return asyncio.run(_serve(fake, host, port, watch_stdin))


async def _serve(fake: FakeApi, host: str, port: int, watch_stdin: bool) -> int:
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    if watch_stdin:  # a pipe from the parent: its end means the parent is gone
        threading.Thread(target=_wait_for_eof, args=(loop, stopping), daemon=True).start()
    url = await fake.start(host, port)
    print(f"listening on {url}", flush=True)  # the parent reads this one line
    try:
        await stopping.wait()
    finally:
        await fake.stop()
    return 0


def _wait_for_eof(loop: asyncio.AbstractEventLoop, stopping: asyncio.Event) -> None:
    while os.read(0, 65536):  # raw reads: a buffered stdin would hold a lock at exit
        pass
    try:
        loop.call_soon_threadsafe(stopping.set)
    except RuntimeError:  # the loop already ended (SIGTERM came first)
        pass


if __name__ == "__main__":
    sys.exit(main())
