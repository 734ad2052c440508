"""Run by tests/test_hugepages.py after a re-exec: prints what the new process got."""

import json
import os
import sys

print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES"), "argv": sys.argv[1:]}))
