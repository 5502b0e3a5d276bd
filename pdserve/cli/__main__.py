"""python -m pdserve.cli <command>"""
import sys

from pdserve.cli import main

sys.exit(main())
