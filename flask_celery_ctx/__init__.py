from .extension import FlaskCelery as FlaskCelery
from .models import MissingInstanceError as MissingInstanceError
from .task import ContextTask as ContextTask

__all__ = ["ContextTask", "FlaskCelery", "MissingInstanceError"]
