"""adaptflow: scheduled retraining of classifier heads on frozen pretrained encoders."""

__version__ = "0.1.0"
