"""Figure builders on top of the core: static matplotlib figures (:mod:`instseg_edu.viz.draw`) and
the figures the explorers show. The core never imports this package, and these modules import
matplotlib or plotly inside their functions, so ``import instseg_edu`` stays light."""
