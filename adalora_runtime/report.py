"""Where the ranks went: module paths grouped into a layer x module-kind table, printed or as a heatmap."""

from __future__ import annotations

import os

NO_LAYER = -1
"""Layer index of module paths without a numeric block index (e.g. a top-level projection)."""


def _split(path: str) -> tuple[int, tuple[str, ...]]:
    """'model.layers.3.self_attn.q_proj' -> (3, ('self_attn', 'q_proj')): the first numeric part is the layer."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return int(part), tuple(parts[i + 1:]) or (parts[i - 1] if i else part,)
    return NO_LAYER, tuple(parts)


def _short_kinds(remainders: set[tuple[str, ...]]) -> dict[tuple[str, ...], str]:
    """The shortest dotted suffix of each remainder that no other remainder ends with."""
    out = {}
    for rem in remainders:
        for n in range(1, len(rem) + 1):
            suffix = rem[-n:]
            if n == len(rem) or not any(other != rem and other[-n:] == suffix for other in remainders):
                out[rem] = ".".join(suffix)
                break
    return out


def rank_table(ranks: dict[str, int]) -> tuple[list[int], list[str], list[list[int | None]]]:
    """(layer indices, module kinds in first-seen order, matrix[layer][kind] = rank or None if absent).

    'model.layers.3.self_attn.q_proj' -> layer 3, kind 'q_proj'; BERT's 'attention.output.dense' and
    'output.dense' stay distinct kinds.
    """
    split = {path: _split(path) for path in ranks}
    kinds_of = _short_kinds({rem for _, rem in split.values()})
    layers = sorted({layer for layer, _ in split.values()})
    kinds: list[str] = []
    for _, rem in split.values():
        if kinds_of[rem] not in kinds:
            kinds.append(kinds_of[rem])
    matrix: list[list[int | None]] = [[None] * len(kinds) for _ in layers]
    for path, r in ranks.items():
        layer, rem = split[path]
        matrix[layers.index(layer)][kinds.index(kinds_of[rem])] = int(r)
    return layers, kinds, matrix


def table_dict(ranks: dict[str, int]) -> dict[str, dict[str, int]]:
    """{layer index (str, for JSON): {module kind: rank}}."""
    layers, kinds, matrix = rank_table(ranks)
    return {str(layer): {k: r for k, r in zip(kinds, row) if r is not None} for layer, row in zip(layers, matrix)}


def format_rank_table(ranks: dict[str, int]) -> str:
    """Plain-text table: one row per layer, one column per module kind, with row totals."""
    layers, kinds, matrix = rank_table(ranks)
    widths = [max(len(k), 3) + 2 for k in kinds]
    lines = ["layer".ljust(7) + "".join(k.rjust(w) for k, w in zip(kinds, widths)) + "total".rjust(7)]
    for layer, row in zip(layers, matrix):
        cells = "".join(("-" if r is None else str(r)).rjust(w) for r, w in zip(row, widths))
        name = "other" if layer == NO_LAYER else str(layer)
        lines.append(name.ljust(7) + cells + str(sum(r or 0 for r in row)).rjust(7))
    lines.append(f"total rank {sum(ranks.values())} over {len(ranks)} modules")
    return "\n".join(lines)


def plot_rank_heatmap(ranks: dict[str, int], path: str | os.PathLike, title: str = "AdaLoRA ranks") -> None:
    """PNG heatmap (layers x module kinds), each cell annotated with its rank; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from adalora.atomic import atomic_file

    layers, kinds, matrix = rank_table(ranks)
    values = np.ma.masked_invalid(np.array([[np.nan if r is None else r for r in row] for row in matrix], dtype=float))
    fig, ax = plt.subplots(figsize=(2.5 + 0.9 * len(kinds), 2.5 + 0.35 * len(layers)))
    image = ax.imshow(values, cmap="viridis", aspect="auto", vmin=0)
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), ["other" if x == NO_LAYER else str(x) for x in layers])
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    ax.set_title(title)
    top = float(values.max()) if values.count() else 0.0
    for i, row in enumerate(matrix):
        for j, r in enumerate(row):
            if r is not None:
                ax.text(j, i, str(r), ha="center", va="center", color="black" if r > top / 2 else "white", fontsize=8)
    fig.colorbar(image, ax=ax, label="rank")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
