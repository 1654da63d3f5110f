"""psyface: explainable prediction of psychological attributes from face images."""

__version__ = "0.1.0"
