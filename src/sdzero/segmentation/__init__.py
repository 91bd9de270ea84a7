"""OVDiff open-vocabulary segmentation by generated prototypes.

Prototype building: ``support`` (support sets and their attribution maps), ``masks`` (FG/BG mask
proposers), ``features`` (SD / DINO / CLIP / colour extractors), ``kmeans``, ``prototypes``
(prototypes and their cache). Inference: ``inference``, ``filters``, ``pamr``, ``explain``. Import
the submodules directly; nothing heavy loads here.
"""
