"""pareto.png, drawn from the pareto.json data alone (so a saved search can be re-plotted): the frontier with the
uniform-precision baselines and the chosen point, and beside it what end-to-end measurement says of the estimate."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

FLOOR = 1e-7  # measured KL can be 0; a log axis cannot show it


def _axis(data: dict):
    """x value of a point, the axis label, and the factor from x to average weight bits."""
    if data["objective"] == "size":
        scale, unit = (1e3, "KB") if data["uniform"][-1]["size_bytes"] < 1e6 else (1e6, "MB")
        return (lambda p: p["size_bytes"] / scale, f"weight size packed at b bits ({unit}; ONNX stores int8)",
                8 * scale / data["total_params"])
    scale, unit = (1e6, "MBOPs") if data["uniform"][-1]["bops"] < 1e9 else (1e9, "GBOPs")
    return (lambda p: p["bops"] / scale, f"bit operations per image, MACs x wbits x abits ({unit})",
            scale / (data["total_macs"] * data["abits"]))


def render(data: dict) -> bytes:
    x_of, xlabel, to_bits = _axis(data)
    front, uniform = data["frontier"], data["uniform"]
    checked = [p for p in front if "measured" in p]
    chosen = front[data["chosen"]] if data.get("chosen") is not None else None
    fig, (est, agree) = plt.subplots(1, 2, figsize=(14, 6), dpi=110, constrained_layout=True)
    fig.suptitle(f"{data['model']}: mixed-precision weights over {len(data['layers'])} layers "
                 f"(bits {','.join(map(str, data['choices']))}; activations {data['abits']} bits)")

    est.step([x_of(p) for p in front], [p["sensitivity"] for p in front], where="post", color="C0", lw=1.5,
             label=f"Pareto frontier, estimated ({len(front)} points)")
    est.scatter([x_of(p) for p in uniform], [p["sensitivity"] for p in uniform], marker="s", color="C7", zorder=3,
                label="uniform precision, estimated")
    for bits, p in zip(data["choices"], uniform):
        est.annotate(f"W{bits}", (x_of(p), p["sensitivity"]),
                     textcoords="offset points", xytext=(5, 5), fontsize=8, color="C7")
    est.scatter([x_of(p) for p in checked], [p["sensitivity"] for p in checked], color="C0", zorder=3,
                label="frontier points that were measured")
    for points, marker, label in ((checked, "o", "frontier"), (uniform, "s", "uniform")):
        for mode, color, what in (("weights_only", "C1", "weights only"),
                                  ("with_activations", "C2", f"+ A{data['abits']}")):
            xs, ys = [x_of(p) for p in points], [max(p["measured"][mode]["kl"], FLOOR) for p in points]
            est.scatter(xs, ys, marker=marker, facecolors="none", edgecolors=color, zorder=4,
                        label=f"{label}, measured ({what})")
            agree.plot(xs, [p["measured"][mode]["top1_agreement"] for p in points], marker=marker, color=color,
                       ls="-" if label == "frontier" else ":", mfc="none" if label == "uniform" else color,
                       label=f"{label}, {what}")
    est.set_yscale("log")
    est.set_ylabel("KL divergence from the FP32 output (nats, log scale)")
    est.set_title("estimated (sum of per-layer KL) vs measured on held-out images", fontsize=10)
    agree.set_ylabel(f"top-1 agreement with FP32 on {data['held_out_images']} held-out distilled images (%)")
    agree.set_title("measured end to end", fontsize=10)
    for ax in (est, agree):
        if chosen is not None:
            ax.axvline(x_of(data["budget"]), color="C3", ls="--", lw=1, label=f"budget {data['budget']['text']}")
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
        top = ax.secondary_xaxis("top", functions=(lambda x: x * to_bits, lambda b: b / to_bits))
        top.set_xlabel("average weight bits" + (" (MAC-weighted)" if data["objective"] == "bops" else ""))
    if chosen is not None:
        est.scatter([x_of(chosen)], [chosen["sensitivity"]], marker="*", s=250, color="C3", zorder=5,
                    label=f"chosen ({chosen['average_bits']:.2f} average bits)")
        agree.scatter([x_of(chosen)], [chosen["measured"]["with_activations"]["top1_agreement"]], marker="*", s=250,
                      color="C3", zorder=5, label="chosen")
    est.legend(fontsize=8, loc="upper right")
    agree.legend(fontsize=8, loc="lower right")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
