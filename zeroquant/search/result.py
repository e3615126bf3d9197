"""What `zeroquant pareto` produces: the pareto.json schema, and the object the Python API returns around it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from zeroquant.errors import OutputError
from zeroquant.files import write_all
from zeroquant.search import Search
from zeroquant.search.pareto import choose, parse_budget
from zeroquant.search.plot import render

NOTES = ["sensitivity: KL divergence from the FP32 softmax with only that layer's weights quantized, averaged over the "
         "distilled images; a point's estimate is the sum over layers",
         "size_bytes: weights packed at their bit-width; the ONNX file stores every weight as int8",
         "measured: plain rounding with calibrated activations; quantize may add block reconstruction"]


def pareto_data(model: str, found: Search, measured: dict[int, dict], uniform: list[dict], chosen: int | None,
                budget: dict | None, calibration_images: int, held_out_images: int, timings: dict) -> dict:
    """pareto.json: every layer's sensitivity, the whole frontier (with the measurements of the checked points),
    the uniform-precision baselines and the chosen point."""
    problem, front = found.problem, found.front
    points = [dict(point, **({"measured": measured[i]} if i in measured else {}))
              for i, point in enumerate(front.points)]
    return {
        "model": model, "objective": problem.objective, "abits": problem.abits, "choices": list(problem.choices),
        "total_params": int(problem.params.sum()), "total_macs": int(problem.macs.sum()),
        "layers": [{"name": name, "params": int(params), "macs": int(macs),
                    "sensitivity": dict(zip(map(str, found.measured_bits), row.tolist()))}
                   for name, params, macs, row in zip(problem.layers, problem.params, problem.macs, found.kl)],
        "frontier": points, "uniform": uniform, "chosen": chosen, "budget": budget,
        "calibration_images": calibration_images, "held_out_images": held_out_images,
        "timings": timings, "notes": NOTES,
    }


@dataclass
class ParetoResult:
    """The mixed-precision frontier of a model: `points`, `choose(budget)`, `plot(path)`, `save(folder)`."""

    data: dict  # the pareto.json content
    found: Search

    @property
    def points(self) -> list[dict]:
        """Frontier points, cheapest first: bits per layer, average bits, size, BOPs, estimated sensitivity (and
        `measured` on the points checked end to end)."""
        return self.data["frontier"]

    def choose(self, budget: str) -> dict:
        """The point with the least estimated sensitivity within `budget`, read as quantize's --budget reads it."""
        problem = self.found.problem
        limit = parse_budget(budget, problem.choices, problem.objective)
        return self.points[choose(self.found.front, limit.cost(problem))]

    def plot(self, path: str | Path | None = None) -> bytes:
        """pareto.png (the frontier, the uniform baselines, the measured points); written to `path` if given."""
        png = render(self.data)
        if path is not None:
            write_all([(path, png)])
        return png

    def to_json(self) -> str:
        return json.dumps(self.data, indent=1)

    def save(self, folder: str | Path) -> None:
        """pareto.json and pareto.png in `folder`, made if need be (both files or neither)."""
        folder = Path(folder)
        try:
            folder.mkdir(exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create {folder}: {exc.strerror}", "choose a writable folder") from exc
        write_all([(folder / "pareto.json", self.to_json().encode()), (folder / "pareto.png", render(self.data))])
