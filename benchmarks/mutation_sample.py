"""Mutation score of a seeded sample of mutmut 3 mutants: each runs the chosen tests (pytest -x) through mutmut's
trampolines; killed = the tests fail. All of zeroquant/quant and zeroquant/export (~3,600 mutants, 20-60 s each) does
not fit a session on 2 cores, and mutmut's own stats step fails on this layout, hence the sample.

    # in a checkout with [mutmut] in setup.cfg (source_paths = zeroquant; only_mutate = zeroquant/quant/*,
    # zeroquant/export/*), after `mutmut run` has generated mutants/:
    python benchmarks/mutation_sample.py CHECKOUT 30 out.json --mutmut-path DIR -- tests/test_ranges.py ...
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path


def mutant_names(mutants: Path) -> list[str]:
    """Every mutant mutmut wrote for quant/ and export/, as MUTANT_UNDER_TEST names (module.key)."""
    names = []
    for path in sorted([*(mutants / "zeroquant/quant").glob("*.py"), *(mutants / "zeroquant/export").glob("*.py")]):
        module = ".".join(path.relative_to(mutants).with_suffix("").parts)
        names += [f"{module}.{key}" for key in re.findall(r"^mutants_\S+\['(\S+)'\] = ", path.read_text(), re.M)
                  if key != "_mutmut_orig"]
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path)
    parser.add_argument("count", type=int)
    parser.add_argument("output", type=Path)
    parser.add_argument("--mutmut-path", required=True, help="where mutmut is installed (pip --target)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("pytest_args", nargs="+", help="test files, --deselect ..., as pytest takes them")
    args = parser.parse_args()
    mutants = args.checkout / "mutants"
    names = mutant_names(mutants)
    env = dict(os.environ, PYTHONPATH=f"{mutants}{os.pathsep}{args.mutmut_path}", OMP_NUM_THREADS="1", CI="true")
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args.pytest_args]
    results = {"checkout": str(args.checkout), "mutants": len(names), "seed": args.seed, "command": command[1:],
               "runs": []}
    baseline = subprocess.run(command, env=env, cwd=mutants, capture_output=True, text=True)
    results["baseline"] = {"rc": baseline.returncode, "summary": baseline.stdout.strip().splitlines()[-1:]}
    if baseline.returncode:
        sys.exit(f"the tests fail without a mutant: {results['baseline']['summary']}")
    for name in random.Random(args.seed).sample(names, args.count):
        start = time.perf_counter()
        try:
            run = subprocess.run(command, env=dict(env, MUTANT_UNDER_TEST=name), cwd=mutants, capture_output=True,
                                 text=True, timeout=900)
            rc, summary = run.returncode, run.stdout.strip().splitlines()[-1:]
        except subprocess.TimeoutExpired:
            rc, summary = "timeout", []
        results["runs"].append({"mutant": name, "killed": rc != 0, "rc": rc, "summary": summary,
                                "s": round(time.perf_counter() - start)})
        results["score"] = f"{sum(r['killed'] for r in results['runs'])}/{len(results['runs'])}"
        args.output.write_text(json.dumps(results, indent=1) + "\n")
        print(name, "killed" if rc != 0 else "survived", results["score"], flush=True)


if __name__ == "__main__":
    main()
