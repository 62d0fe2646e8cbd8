"""`python -m kimivl_local.app MODEL [--host --port ...]`: the same as `kimivl-local serve`."""

import sys

from kimivl_local.cli.main import main

sys.exit(main(["serve", *sys.argv[1:]]))
