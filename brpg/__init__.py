"""brpg: Boundary-Refined Prototype Generation for semi-supervised semantic segmentation.

A typed, device-agnostic PyTorch re-implementation of Dong et al., *Boundary-Refined
Prototype Generation: A General End-to-End Paradigm for Semi-Supervised Semantic
Segmentation* (EAAI 2024, arXiv 2307.10097), written from the project's algorithm spec.
"""

__version__ = "0.1.0"
