"""Placeholder for `show_rainbow2.py`: the real script lands with its issue; this one only parses --help."""

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Not implemented yet in this checkout: this entry point only prints its usage."
    )
    parser.parse_args(argv)
    print("show_rainbow2.py is not implemented yet.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
