"""``python -m iscsi.target`` is ``iscsi-target``."""
from .cli import main

main()
