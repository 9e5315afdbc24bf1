"""brpg: Boundary-Refined Prototype Generation for semi-supervised semantic segmentation.

A typed, device-agnostic PyTorch re-implementation of Dong et al., *Boundary-Refined
Prototype Generation: A General End-to-End Paradigm for Semi-Supervised Semantic
Segmentation* (EAAI 2024, arXiv 2307.10097), written from the project's algorithm spec.

Import layers, bottom to top. A module imports its own part and the parts of lower layers,
never a higher one (``tests/test_layers.py`` checks every import, lazy ones included):

====  =================================================  =======================================
layer part                                               what it is
====  =================================================  =======================================
0     ``config``, ``prepare/``                           typed configs; dataset preparation
                                                         (torch-free)
1     ``timeline``, ``distributed``, ``metrics``         the phases of a run (a function of the
                                                         config); device, process group,
                                                         seeding; IoU and Boundary IoU
2     ``data/``, ``models/``                             datasets and transforms; networks and
                                                         the resizing of their logits
3     ``method/``                                        BRPG itself: CPG, APO, clustering,
                                                         prototype bank, L_pro, the plug-in
4     ``frameworks/``                                    what BRPG plugs into: SupOnly, mean
                                                         teacher, UniMatch
5     ``engine/``                                        the training loop: trainer,
                                                         checkpoints, batches, optimiser,
                                                         inference, precision, TensorBoard
6     ``book/``                                          the chapters' helpers
7     ``reproduce/``                                     the paper's table cells and runs
8     ``cli``, ``__main__``                              the ``brpg`` command
====  =================================================  =======================================

So the loop drives the method and the frameworks, and they never import it.
"""

__version__ = "0.1.0"
