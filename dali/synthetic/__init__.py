"""The built-in synthetic audiovisual world and its tiny image captioner."""
