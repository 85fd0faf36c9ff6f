"""``qwen3c bench --plot``: a PNG of the benchmark rows, one line or bar per engine.

Left: prefill tok/s against prompt length (the context the prefill builds); right: decode
tok/s after a ``DECODE_CONTEXT``-token context. Needs matplotlib (``pip install
'qwen3c[plot]'``).
"""

from __future__ import annotations

from pathlib import Path

from qwen3c.errors import Qwen3cError
from qwen3c.runtime.bench import DECODE_CONTEXT, BenchRow


def plot_rows(rows: list[BenchRow], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise Qwen3cError("--plot needs matplotlib: pip install 'qwen3c[plot]'") from None
    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot

    engines = list(dict.fromkeys(r.engine for r in rows))
    palette = pyplot.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {engine: palette[i % len(palette)] for i, engine in enumerate(engines)}
    figure, (prefill_axes, decode_axes) = pyplot.subplots(
        1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [2, 1]})
    prefill = sorted((int(r.metric.removeprefix("prefill-")), r.value, r.engine) for r in rows
                     if r.metric.startswith("prefill-"))
    for engine in engines:
        points = [(n, value) for n, value, e in prefill if e == engine]
        if points:
            prefill_axes.plot(*zip(*points, strict=True), marker="o", label=engine,
                              color=color[engine])
    prefill_axes.set(xscale="log", xlabel="prompt length (tokens)", ylabel="prefill tok/s",
                     title="prefill")
    lengths = sorted({n for n, _, _ in prefill})
    prefill_axes.set_xticks(lengths, [str(n) for n in lengths])
    prefill_axes.minorticks_off()
    prefill_axes.legend()
    decode = {r.engine: r.value for r in rows if r.metric == "decode"}
    decode_axes.bar(list(decode), list(decode.values()), color=[color[e] for e in decode])
    decode_axes.set(ylabel="decode tok/s", title=f"decode after {DECODE_CONTEXT} tokens")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
