"""Dataset preparation: download, verify, extract and convert VOC+SBD, Cityscapes and COCO.

One module per job:

- :mod:`~brpg.prepare.base`: :class:`~brpg.prepare.base.PrepareError` (the one exception of
  bad input), :class:`~brpg.prepare.base.Archive`, shared constants; imports nothing else;
- :mod:`~brpg.prepare.atomic`: atomic writes;
- :mod:`~brpg.prepare.label_png`: label maps as palette PNGs, the VOC colour map;
- :mod:`~brpg.prepare.checksums`: archive checksums and their cache;
- :mod:`~brpg.prepare.downloads`: resumable downloads;
- :mod:`~brpg.prepare.extraction`: safe, resumable extraction of tar and zip members;
- :mod:`~brpg.prepare.parallel`: the process pool of the per-file conversions;
- :mod:`~brpg.prepare.bookkeeping`: step markers, the label manifest and the validation report;
- :mod:`~brpg.prepare.cli`: the options every script shares;
- :mod:`~brpg.prepare.splits`: fetch, verify, parse and derive the BRPG split lists;
- :mod:`~brpg.prepare.pascal`, :mod:`~brpg.prepare.cityscapes`, :mod:`~brpg.prepare.coco`: one
  preparation pipeline per dataset (appendix: data); :mod:`~brpg.prepare.fixtures`: miniature
  archives for the tests and the book.

The package imports neither torch nor any other part of ``brpg`` (``--help`` answers at once);
``brpg.data`` imports it. The command-line wrappers live in ``data_scripts/``; see
``data_scripts/README.md``.
"""
