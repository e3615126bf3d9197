"""The effort ladder: accuracy against minutes of the low-bit commands a user would type, each run as a user runs
it (`zeroquant quantize` under GNU time, then `zeroquant eval` against the float file). Distillation runs once, into
an empty cache, and its seconds are added to every row, so a row's minutes are those of a fresh machine. Writes the
effort section of benchmarks/RESULTS.md; rows of variants not run this time are kept from the last run that had them.

    python benchmarks/effort.py [--variants 'W4A8 calibration only,W4A8 fast'] [--model zoo:efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from results_file import provenance, provenance_lines, write_section  # noqa: E402  (a sibling script)
from timed_cli import run_zeroquant  # noqa: E402

VARIANTS = {
    "W4A8 calibration only": ["--wbits", "4", "--reconstruct", "off"],
    "W4A8 fast": ["--wbits", "4", "--reconstruct", "on", "--effort", "fast"],
    "W4A8 default": ["--wbits", "4", "--reconstruct", "on"],
    "mixed 5.0 bits A8 calibration only": ["--budget", "5.0", "--reconstruct", "off"],
    "mixed 5.0 bits A8 fast": ["--budget", "5.0", "--reconstruct", "on", "--effort", "fast"],
    "mixed 5.0 bits A8 default": ["--budget", "5.0", "--reconstruct", "on"],
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:efficientnet_lite0")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    parser.add_argument("--output", type=Path, default=HERE)
    args = parser.parse_args(argv)
    zoo = args.model.removeprefix("zoo:")
    run = provenance()
    store = args.output / "effort.json"
    kept = json.loads(store.read_text()) if store.exists() else {"rows": []}
    rows = {r["variant"]: r for r in kept["rows"] if r["model"] == args.model}
    with tempfile.TemporaryDirectory() as folder:
        work, cache = Path(folder), Path(folder) / "cache"
        fp32 = work / "fp32.onnx"
        distilled, _, distill_peak = run_zeroquant(["quantize", args.model, "-o", str(work / "w8a8.onnx"),
                                                 "--float-output", str(fp32)], cache)
        distill_s = distilled["timings"]["distill"]
        reference, _, _ = run_zeroquant(["eval", str(fp32), "--zoo", zoo], cache)
        for name in args.variants.split(","):
            _, seconds, peak = run_zeroquant(["quantize", args.model, *VARIANTS[name], "-o", str(work / "q.onnx")],
                                               cache)
            scored, _, _ = run_zeroquant(["eval", str(work / "q.onnx"), "--zoo", zoo, "--reference", str(fp32)], cache)
            rows[name] = {"model": args.model, "variant": name, "command": f"zeroquant quantize {args.model} "
                          + " ".join(VARIANTS[name]), "top1": scored["top1"], "fp32_top1": reference["top1"],
                          "agreement": scored["agreement"], "images": scored["n"],
                          "minutes": (seconds + distill_s) / 60, "distill_s": distill_s, "peak_rss_gib": peak,
                          "run": {"date": run["date"], "zeroquant": run["versions"]["zeroquant"],
                                  "load_average": run["machine"]["load_average"]}}
    ordered = [rows[n] for n in VARIANTS if n in rows]
    run["distillation"] = {"seconds": distill_s, "peak_rss_gib": distill_peak}
    lines = ["## Effort ladder: accuracy against minutes of the low-bit commands", "", *provenance_lines(run), "",
             f"`zeroquant quantize {args.model} ...` under GNU time, scored by `zeroquant eval --zoo {zoo} "
             "--reference fp32.onnx`; minutes include distillation (run once into an empty cache, its seconds added "
             "to each row); a row's peak memory is its own command's, on the cached images. Rows not re-run this "
             "time keep their own date and commit.", "",
             f"Distillation this run (the default command into an empty cache): {distill_s:.0f} s, peak resident "
             f"memory {distill_peak:.2f} GiB.", "",
             "| variant | command | top-1 % | Δ FP32 | agreement % | minutes | peak RSS GiB | run |",
             "|---|---|--:|--:|--:|--:|--:|---|"]
    lines += [f"| {r['variant']} | `{r['command']}` | {r['top1']:.2f} | {r['top1'] - r['fp32_top1']:+.2f} | "
              f"{r['agreement']:.2f} | {r['minutes']:.1f} | {r['peak_rss_gib']:.2f} | "
              f"{r['run']['date'][:16]} {r['run']['zeroquant']} |" for r in ordered]
    args.output.mkdir(parents=True, exist_ok=True)
    store.write_text(json.dumps({"run": run, "rows": ordered + [r for r in kept["rows"]
                                                                if r["model"] != args.model]}, indent=1) + "\n")
    write_section(args.output / "RESULTS.md", "effort", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
