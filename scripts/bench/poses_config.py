#!/usr/bin/env python3
"""Writes a poses-only copy of a configuration for the benchmarks (coordinate maps and NOCS outputs off,
so a run measures registration alone); `--category-off` also turns stage 4b off (`category.rounds: 0`).
Usage: scripts/bench/poses_config.py CONFIG OUT_YAML [--category-off]"""
import sys

import yaml


def main():
    args = sys.argv[1:]
    off = "--category-off" in args
    args = [a for a in args if a != "--category-off"]
    if len(args) != 2:
        sys.exit(__doc__)
    c = yaml.safe_load(open(args[0])) or {}
    c.setdefault("coord_maps", {})["enabled"] = False
    c.setdefault("output", {})["nocs"] = False
    if off:
        c.setdefault("category", {})["rounds"] = 0
    yaml.safe_dump(c, open(args[1], "w"))


if __name__ == "__main__":
    main()
