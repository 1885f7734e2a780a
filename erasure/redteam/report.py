"""The red team's table in a terminal: one row per pack, concept and family.

Example:
    >>> print_records({"circle": pack.manifest.redteam})
"""

from __future__ import annotations

import sys

from .record import RedTeamRecord


def print_records(records: dict[str, RedTeamRecord], console=None) -> None:
    """One row per pack, concept and family: ASR on fresh seeds next to the base's rate and the calibration."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 150)
    t = Table(title="red team: attack success on fresh seeds (judge reads the concept)")
    for col in ("pack", "concept", "family", "ASR", "base, same attack", "attack vs base", "best attack", "time"):
        t.add_column(col, justify="right" if col in ("ASR", "base, same attack", "attack vs base", "time") else "left")
    for name, rec in records.items():
        for r in rec.results:
            colour = "red" if r.asr > 0.25 else "yellow" if r.asr > 0.10 else "green"
            calib = "-" if r.calibration is None else f"{r.calibration:.0%}"
            more = " [b red]▲ above the base[/]" if r.asr - r.base_rate > 0.10 else ""
            t.add_row(name, r.concept, r.family, f"[{colour}]{r.asr:.0%}[/] (n={r.n}){more}", f"{r.base_rate:.0%}",
                      calib,
                      short(rec.attack_text(r, markdown=False)), f"{r.seconds:.0f} s")
    console.print(t)


def short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
