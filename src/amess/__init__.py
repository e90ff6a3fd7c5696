"""amess: multimodal intent recognition, with A-MESS as its reference method."""

__version__ = "0.1.0"
