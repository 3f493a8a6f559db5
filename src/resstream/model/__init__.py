from resstream.model.lm import LM

__all__ = ["LM"]
