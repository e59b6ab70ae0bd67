"""The tools beside the method: caption files with a finished run, its web page, scoring, preparing media, importing
the released weights. One module per command, each with ``main(argv) -> int``; a tool never imports a stage."""
