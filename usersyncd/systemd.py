"""systemd integration: sd_notify(3) messages and the watchdog (Type=notify, WatchdogSec=)."""

from __future__ import annotations

import asyncio
import os
import socket

from loguru import logger

DEFAULT_EVERY = 5.0  # seconds between WATCHDOG=1 when systemd does not say (no WATCHDOG_USEC)


def notify(message: str) -> None:
    """sd_notify(3): tell systemd about readiness, status, stopping, watchdog. No-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        logger.bind(error=str(exc)).debug("sd_notify failed")


def watchdog_interval() -> float | None:
    """How often to send WATCHDOG=1: a third of systemd's WatchdogSec; DEFAULT_EVERY under a
    notify socket without a watchdog; None outside systemd or when the watchdog is another pid's."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return DEFAULT_EVERY
    return min(usec / 3e6, DEFAULT_EVERY) if usec > 0 else DEFAULT_EVERY


async def watchdog() -> None:
    """WATCHDOG=1 while the event loop turns, whatever the database does (a database outage is
    waited out, never a reason for systemd to kill and restart the process)."""
    every = watchdog_interval()
    if every is None:
        return
    while True:  # until cancelled: the shutdown itself may take shutdown_grace seconds
        notify("WATCHDOG=1")
        await asyncio.sleep(every)
