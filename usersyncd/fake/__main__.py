"""`python -m usersyncd.fake`: same as `python -m usersyncd.fakeapi`."""

import sys

from usersyncd.fake.cli import main

sys.exit(main())
