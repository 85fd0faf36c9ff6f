"""``qwen3c bench --plot``: a PNG of the benchmark rows, one line or bar per engine.

Left: prefill tok/s against prompt length (the context the prefill builds); right: decode
tok/s against the context decode starts from (``--decode-contexts``). Needs matplotlib
(``pip install 'qwen3c[plot]'``).
"""

from __future__ import annotations

from pathlib import Path

from qwen3c.errors import Qwen3cError
from qwen3c.runtime.bench import BenchRow, decode_context


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
    decode = sorted((decode_context(r.metric), r.value, r.engine) for r in rows
                    if decode_context(r.metric) is not None)
    for axes, points, what in ((prefill_axes, prefill, "prefill"), (decode_axes, decode, "decode")):
        for engine in engines:
            line = [(n, value) for n, value, e in points if e == engine]
            if line:
                axes.plot(*zip(*line, strict=True), marker="o", label=engine,
                          color=color[engine])
        ticks = sorted({n for n, _, _ in points})
        axes.set(xscale="log", ylabel=f"{what} tok/s", title=what,
                 xlabel="prompt length (tokens)" if what == "prefill" else "context (tokens)")
        axes.set_xticks(ticks, [str(n) for n in ticks])
        axes.minorticks_off()
    prefill_axes.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
