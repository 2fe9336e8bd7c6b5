"""The fake subscriber API (SPEC §2); the code lives in `usersyncd.fake`.

`python -m usersyncd.fakeapi` serves it in a process of its own until SIGTERM/SIGINT.
"""

from __future__ import annotations

import sys

from usersyncd.fake.cli import main
from usersyncd.fake.model import RecordedRequest
from usersyncd.fake.process import FakeApiProcess
from usersyncd.fake.server import FakeApi

__all__ = ["FakeApi", "FakeApiProcess", "RecordedRequest", "main"]

if __name__ == "__main__":
    sys.exit(main())
