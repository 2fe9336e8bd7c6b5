"""A fake of the subscriber batch API, in-process (`FakeApi`) or in a child process (`FakeApiProcess`)."""

from usersyncd.fake.model import RecordedRequest
from usersyncd.fake.process import FakeApiProcess
from usersyncd.fake.server import FakeApi

__all__ = ["FakeApi", "FakeApiProcess", "RecordedRequest"]
