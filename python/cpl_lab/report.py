"""The terminal table: last epoch of every (method, lr), mean over seeds."""
from __future__ import annotations

from collections import defaultdict

COLUMNS = (  # (header, row key, format)
    ("method", "method", "{}"), ("lr", "lr", "{:g}"), ("learned", "learned", "{:.1f}"),
    ("forgot", "forgotten", "{:.1f}"), ("in-set", "forgotten_in", "{:.1f}"),
    ("out-set", "forgotten_out", "{:.1f}"), ("xp learned", "xp_learned", "{:.1f}"),
    ("xp forgot", "xp_forgotten", "{:.1f}"), ("frozen", "frozen", "{:.1%}"),
    ("time s", "wall_s", "{:.1f}"), ("peak MB", "peak_mem_mb", "{:.0f}"),
    ("state MB", "state_mb", "{:.2f}"),
)


def final_rows(cells: list[dict]) -> list[dict]:
    """One row per (method, lr): the last epoch's numbers, averaged over seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for cell in cells:
        groups[(cell["method"], cell["lr"])].append(cell["rows"][-1])
    from .runner import ORDER
    out = []
    for (method, lr), rows in sorted(groups.items(), key=lambda kv: (ORDER.index(kv[0][0]), kv[0][1])):
        avg = {"method": method, "lr": lr, "seeds": len(rows), "epoch": rows[0]["epoch"],
               "n_inject": rows[0]["n_inject"], "n_mastered_in": rows[0]["n_mastered_in"],
               "n_mastered_out": rows[0]["n_mastered_out"]}
        for _, key, _ in COLUMNS[2:]:
            vals = [r[key] for r in rows if r.get(key) is not None]
            avg[key] = sum(vals) / len(vals) if vals else None
        out.append(avg)
    return out


def table(cells: list[dict]) -> str:
    rows = final_rows(cells)
    if not rows:
        return "(no results)"
    body = [[("-" if r[key] is None else fmt.format(r[key])) for _, key, fmt in COLUMNS] for r in rows]
    header = [h for h, _, _ in COLUMNS]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    line = lambda cols: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cols, widths)))
    r0 = rows[0]
    seeds = max(r["seeds"] for r in rows)
    head = (f"after {r0['epoch']} epochs, {seeds} seed(s): learned of {r0['n_inject']} injected; "
            f"forgotten of {r0['n_mastered_in']} in-set + {r0['n_mastered_out']} out-of-set mastered; "
            "xp = held-out question templates")
    return "\n".join([head, line(header), line(["-" * w for w in widths])] + [line(b) for b in body])
