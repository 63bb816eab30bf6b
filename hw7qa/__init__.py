"""hw7qa: fine-tune a Chinese BERT-family model for extractive QA (ML2022 Spring HW7).

The data's way, one module per stage: data → windows → train → decode → submission.
"""
__version__ = "0.1.0"
