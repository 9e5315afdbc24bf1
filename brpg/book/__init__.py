"""Helpers of the book's chapters, not of training: warm models and memories for the demos
(:mod:`.demo`, :mod:`.demo_proto`), figures (:mod:`.viz`), the committed DigitScenes results
(:mod:`.results`) and the chapters' tooling (:mod:`.tools`: badges, source rendering, the
Sphinx extension)."""
