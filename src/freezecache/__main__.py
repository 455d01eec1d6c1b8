"""`python -m freezecache` is the `freezecache` command."""

from freezecache.tooling.cli import app

if __name__ == "__main__":
    app()
