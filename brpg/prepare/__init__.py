"""Dataset preparation: download, verify, extract and convert VOC+SBD, Cityscapes and COCO.

One module per job:

- :mod:`brpg.prepare.common`: errors, resumable downloads, checksums, safe extraction, atomic
  writes, parallel conversion, markers and the validation report;
- :mod:`brpg.prepare.splits`: fetch, verify, parse and derive the BRPG split lists;
- :mod:`brpg.prepare.pascal`, :mod:`brpg.prepare.cityscapes`, :mod:`brpg.prepare.coco`: one
  preparation pipeline per dataset (appendix: data).

The command-line wrappers live in ``data_scripts/``; see ``data_scripts/README.md``.
"""

from brpg.prepare.common import PrepareError

__all__ = ["PrepareError"]
