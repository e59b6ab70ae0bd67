"""The method's stages, one module per stage (``main(argv) -> int``), and what they share (``common``)."""
