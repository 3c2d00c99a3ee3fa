#!/usr/bin/env python3
"""P/D proxy router: `python integration/proxy.py --prefill URL... --decode URL... --port P`.

The implementation is kvxfer.entrypoints.proxy (importable by the demo and the tests).
"""

import argparse
import sys

from kvxfer.entrypoints.proxy import __doc__ as DOC, add_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="proxy.py", description=DOC.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
