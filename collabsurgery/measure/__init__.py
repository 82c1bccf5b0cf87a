"""Measurements of models and training graphs: FLOP/parameter/activation costs
(:mod:`.costs`), step time and memory against the plain model (:mod:`.bench`, :mod:`.memory`),
the sweep over every timm family and torchvision classifier (:mod:`.sweep`), and accuracy under
weight noise (:mod:`.robustness`).

May import every layer below it except studies/ and detection/. See docs/architecture.md.
"""
