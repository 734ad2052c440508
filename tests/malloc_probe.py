"""Run by tests/test_malloc_tuning.py after a re-exec: prints what the new process got."""

import json
import os
import sys

print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES"), "argv": sys.argv[1:]}))
