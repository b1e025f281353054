"""``python -m hooktrain`` is the ``hooktrain`` command (torchrun launches modules this way)."""

from hooktrain.cli import main

main()
