"""Data: sources, validation, decoding, cache and splits → one :class:`FaceDataset`.

This package imports nothing: ``agelab.config`` reads :data:`.sources.SOURCES` without pulling
in torch, the generator or the cache. Import what you need from its modules:

:mod:`.load`      ``load_dataset(cfg)``: a ``DataConfig`` → :class:`FaceDataset` (decoded
                  once, cached, split) — the one entry point a study uses
:mod:`.dataset`   :class:`FaceDataset`, the in-memory dataset every trial trains on
:mod:`.sources`   ``SOURCES`` (synthetic, utkface, fgnet, csv) and reading a real source into
                  a validated manifest (bad rows named, counted and explained)
:mod:`.images`    decoding an image file into uint8 ``[3, S, S]`` (EXIF, RGB, crop, resize)
:mod:`.cache`     the decoded-tensor cache (atomic writes, checksums, fingerprints)
:mod:`.split`     seeded train / calib / test splits, age-stratified and subject-disjoint
:mod:`.synth`     the procedural synthetic faces (the default data set)
:mod:`.inspect`   ``agelab data inspect``: what is in a real dataset, before training on it
:mod:`.export`    a dataset → image folder + ``labels.csv`` (the ``csv`` source format)

Data problems a user can fix raise :class:`agelab.errors.DataError`.
"""
