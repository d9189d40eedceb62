"""Interactive explorers (ipywidgets + plotly), installed as ``instseg_edu.widgets``.

Each explorer calls the same library functions the models train with; it never re-implements a
computation.
"""
