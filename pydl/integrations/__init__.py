"""Optional adapters to other libraries (import-guarded: each module imports its library on first
use, and pydl imports none of them unless asked).

    pydl.integrations.transformers   Hugging Face: from_transformers / to_transformers
"""
