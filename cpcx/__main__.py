"""``python -m cpcx`` (also what ``torchrun -m cpcx train ...`` runs)."""
from cpcx.cli import main

main()
