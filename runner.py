#!/usr/bin/env python3
"""Batch rollouts over a benchmark (same as ``freelm run``); ``python3 runner.py --help`` lists every flag."""

import sys

from freelm.run.cli import main

if __name__ == "__main__":
    sys.exit(main())
