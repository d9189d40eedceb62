"""What a plotly FigureWidget sends to the browser, recorded for headless widget tests."""

from __future__ import annotations


def sent_messages(fig) -> list[dict]:
    """Record the update messages a FigureWidget sends to the browser."""
    msgs: list[dict] = []

    def record(change):
        if change["new"] is not None:
            msgs.append(change["new"])

    fig.observe(record, names=["_py2js_update", "_py2js_restyle", "_py2js_relayout"])
    return msgs


def sent_traces(msgs: list[dict]) -> dict[int, dict]:
    """Trace index -> the properties sent for it (the last message wins)."""
    out: dict[int, dict] = {}
    for m in msgs:
        data = m.get("style_data") or m.get("restyle_data") or {}
        traces = m.get("style_traces") or m.get("restyle_traces") or []
        for j, t in enumerate(traces):
            out.setdefault(t, {}).update(
                {
                    k: (v[j] if isinstance(v, list) and len(v) == len(traces) else v)
                    for k, v in data.items()
                }
            )
    return out
