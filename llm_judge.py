#!/usr/bin/env python3
"""LLM judge of extracted answers vs ground truth through any OpenAI-compatible endpoint (= `freelm judge`)."""

import argparse
import sys

from freelm.evaluation import judge_cli

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    judge_cli.add_arguments(parser)
    sys.exit(judge_cli.run(parser.parse_args()))
