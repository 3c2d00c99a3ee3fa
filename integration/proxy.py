#!/usr/bin/env python3
"""P/D proxy router, the same as `kvxfer proxy`: `python integration/proxy.py --prefill URL... --decode URL...`.

The implementation is kvxfer.entrypoints.proxy (importable by the demo and the tests).
"""

import sys

from kvxfer.entrypoints.cli import main

if __name__ == "__main__":
    sys.exit(main(["proxy", *sys.argv[1:]]))
