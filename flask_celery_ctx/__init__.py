from .extension import FlaskCelery as FlaskCelery
from .task import ContextTask as ContextTask

__all__ = ["ContextTask", "FlaskCelery"]
