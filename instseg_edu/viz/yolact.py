"""Plotly figures for YOLACT's mask assembly (used by ``PrototypeExplorer`` and notebook 08).

A YOLACT mask is ``crop(sigmoid(Prototypes · c), box)`` (Bolya et al. 2019, Sec. 3.3): ``P`` shared
prototype images mixed by one detection's ``P`` coefficients. The figure shows the coefficients as
bars, the assembled mask and the box it is cropped to. Every mask drawn comes from
:func:`instseg_edu.models.yolact.assemble_masks`, the function ``predict`` uses; nothing is
recomputed here.

Drawing convention: prototype pixel ``(i, j)`` covers input pixels ``[s·j, s·(j+1)) ×
[s·i, s·(i+1))`` for the prototype stride ``s`` (4), so boxes are drawn in input pixels.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from instseg_edu.models.yolact import assemble_masks

__all__ = [
    "TRACE_NAMES",
    "MaskAssembly",
    "assemble_one",
    "assembly_figure",
    "assembly_traces",
]

# The figure's traces, in order; the explorer updates them in place by index.
TRACE_NAMES = ("coefficients", "assembled mask", "box")


class MaskAssembly(NamedTuple):
    """One detection's mask, as ``predict`` builds it before upsampling."""

    coeffs: Tensor  # [P]
    box: Tensor | None  # [4] xyxy input pixels, or None (no crop)
    mask: Tensor  # [Hm, Wm] probabilities in [0, 1]
    stride: int  # input pixels per prototype pixel


def assemble_one(
    prototypes: Tensor, coeffs: Tensor, box: Tensor | None = None, stride: int = 4
) -> MaskAssembly:
    """:func:`~instseg_edu.models.yolact.assemble_masks` for one detection.

    Args:
        prototypes: ``float [P, Hm, Wm]``.
        coeffs: ``float [P]``.
        box: ``float [4]`` xyxy in input pixels (divided by ``stride`` for the crop), or ``None``.
        stride: the prototype stride.
    """
    prototypes = prototypes.detach().float().cpu()
    coeffs = torch.as_tensor(coeffs, dtype=torch.float32).detach().cpu()
    box_m = None if box is None else (box.detach().float().cpu() / stride)[None]  # [1, 4]
    mask = assemble_masks(prototypes, coeffs[None], box_m)[0]  # [Hm, Wm]
    return MaskAssembly(coeffs, None if box is None else box.detach().float().cpu(), mask, stride)


def _box_outline(box: Tensor | None) -> tuple[list, list]:
    if box is None:
        return [], []
    x1, y1, x2, y2 = box.tolist()
    return [x1, x2, x2, x1, x1], [y1, y1, y2, y2, y1]


def assembly_traces(a: MaskAssembly) -> list[dict]:
    """The data of every trace of :func:`assembly_figure`, in ``TRACE_NAMES`` order."""
    c = a.coeffs.numpy()
    bx, by = _box_outline(a.box)
    return [
        dict(
            x=list(range(len(c))),
            y=c,
            marker=dict(color=["#1f77b4" if v >= 0 else "#d62728" for v in c]),
        ),  # fmt: skip
        dict(z=a.mask.numpy(), x0=0.5 * a.stride, dx=a.stride, y0=0.5 * a.stride, dy=a.stride),
        dict(x=bx, y=by),
    ]


def assembly_figure(a: MaskAssembly, title: str = "YOLACT mask assembly"):
    """Coefficient bars (left) and the assembled, cropped mask with its box (right).

    Returns:
        A ``plotly.graph_objects.Figure`` with the traces of ``TRACE_NAMES``.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    data = assembly_traces(a)
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.45, 0.55],
        subplot_titles=("coefficients c (tanh, in [-1, 1])", "crop(sigmoid(Prototypes · c))"),
    )
    fig.add_trace(go.Bar(name=TRACE_NAMES[0], **data[0]), row=1, col=1)
    fig.add_trace(
        go.Heatmap(name=TRACE_NAMES[1], zmin=0.0, zmax=1.0, colorscale="Magma", **data[1]),
        row=1,
        col=2,
    )
    fig.add_trace(
        go.Scatter(name=TRACE_NAMES[2], mode="lines", line=dict(color="cyan"), **data[2]),
        row=1,
        col=2,
    )
    fig.update_yaxes(range=[-1.05, 1.05], row=1, col=1)
    fig.update_xaxes(title_text="prototype", row=1, col=1)
    fig.update_yaxes(autorange="reversed", scaleanchor="x2", row=1, col=2)
    fig.update_layout(title=title, height=380, showlegend=False, margin=dict(t=60, b=40))
    return fig
