"""``python -m hooktrain`` is the ``hooktrain`` command (torchrun launches modules this way)."""

from hooktrain.cli import main

# Named as typed at a shell, not "python -m hooktrain", in usage lines and error advice.
main(prog_name="hooktrain")
