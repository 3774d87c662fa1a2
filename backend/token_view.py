"""The token view of per-token scalars (backend.scalars) as HTML; every piece of model text is
escaped before it is placed, so model output is never rendered as markup."""
from __future__ import annotations

import math
from typing import Sequence


def diverging_colour(value: float, vmax: float) -> str:
    """Blue (negative) - white (0) - red (positive), as an rgb() string; |value| >= vmax is full colour."""
    t = 0.0 if vmax <= 0 or not math.isfinite(value) else max(-1.0, min(1.0, value / vmax))
    if t >= 0:
        rgb = (255, round(255 - 190 * t), round(255 - 190 * t))
    else:
        rgb = (round(255 + 190 * t), round(255 + 140 * t), 255)
    return f"rgb({rgb[0]},{rgb[1]},{rgb[2]})"


def token_html(tokens: Sequence[str], values: Sequence[float], vmax: float | None = None) -> str:
    """The response as spans shaded by value; hover (title) shows the value. Tokens are html.escape()d
    first; no model text reaches the HTML unescaped."""
    import html

    values = [float(v) for v in values]
    if vmax is None:
        vmax = max((abs(v) for v in values), default=0.0)
    spans = []
    for token, value in zip(tokens, values):
        text = html.escape(token, quote=True)
        spans.append(f'<span style="background:{diverging_colour(value, vmax)};border-radius:2px;padding:1px 0" '
                     f'title="{text.strip() or "(space)"}: {value:+.4f}">{text}</span>')
    return ('<div style="font-family:monospace;white-space:pre-wrap;line-height:1.9;color:#111">'
            + "".join(spans) + "</div>")


def legend_html(vmax: float, label: str = "raw A·x") -> str:
    import html

    stops = ", ".join(diverging_colour(v * vmax, vmax) for v in (-1, -0.5, 0, 0.5, 1))
    return (f'<div style="font-size:0.8em">{html.escape(label)}: '
            f'<span>{-vmax:+.3g}</span> <span style="display:inline-block;width:160px;height:10px;'
            f'vertical-align:middle;background:linear-gradient(to right, {stops})"></span> '
            f'<span>{vmax:+.3g}</span> (white = 0)</div>')
