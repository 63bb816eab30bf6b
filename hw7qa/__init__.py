"""hw7qa: fine-tune a Chinese BERT-family model for extractive QA (ML2022 Spring HW7).

The data's way, one module per stage: data → windows → train → inference → decode → submission.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hw7qa")       # pyproject.toml's, the one place it is written
except PackageNotFoundError:             # a checkout imported without being installed
    __version__ = "unknown"
