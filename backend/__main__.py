"""`python -m backend ...`: serving, adapters, chat and the rest, without Streamlit (see backend/cli/)."""
import sys

from backend.cli import main

if __name__ == "__main__":
    sys.exit(main())
