"""ConSLU: constrained end-to-end spoken language understanding with Whisper."""

__version__ = "0.1.0"
