import sys

from wenet_moe.cli import main

if __name__ == "__main__":
    sys.exit(main())
