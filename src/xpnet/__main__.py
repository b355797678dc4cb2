"""`python -m xpnet` and the `xpnet` command: Ctrl-C while the CLI is still importing (numpy,
numba) ends with the same one line as later, not a traceback."""

import sys


def main():
    try:
        from xpnet.cli import main as cli_main
    except KeyboardInterrupt:
        print("xpnet: interrupted", file=sys.stderr)
        return 130
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
