"""One module per stage; each has ``main(argv=None) -> int``."""
