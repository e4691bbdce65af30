#!/usr/bin/env python3
"""Grade runner outputs: pass@k / maj@k / avg@n, metrics.json, the paper-format table, plots (= `freelm eval`)."""

import argparse
import sys

from freelm.evaluation import eval_cli

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    eval_cli.add_arguments(parser)
    sys.exit(eval_cli.run(parser.parse_args()))
