"""The Hugging Face -> engine checkpoint converter (gfm-convert).

Its module lives in the repository's top-level `convert/` folder (run there as `python
convert/convert_hf_checkpoint.py`) and is linked in here, so it installs and imports as
`gpt_fast_magicdec.convert`; the top-level folder has no `__init__.py`, so it never shadows a
published package named `convert`."""
