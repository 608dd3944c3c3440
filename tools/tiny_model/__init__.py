"""Tools that build and measure the bundled tiny model (training, export, acceptance). Not part of
the runtime package: `python -m tools.tiny_model.train ...` from the repository root."""
